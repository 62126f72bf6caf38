"""How much of a blend's stale-token error could a correction remove? A diagnostic for issue 16 (CPU is enough).

A blend recomputes a few chunk tokens per layer; the others keep the KV their chunk had when computed alone
(stale). The drift shift (chunkcache/blend.py: _DriftShift) moves each stale token by a share of its chunk's
mean drift, measured on the chunk's recomputed tokens. This asks whether a per-token prediction from the same
measurements would do better: each stale token's drift as a softmax-weighted mean of its chunk's recomputed
tokens' drifts, weighted by the similarity of their cached keys (or values), per KV head and layer (kernel
regression; a stale token moves like the recomputed tokens that look like it).

For each question of a set: the prompt the gateway builds (bench/quality.py's template), its full prefill's
KV (fresh) and each chunk's KV computed alone after the chunk prefix (cached), keys compared unrotated. The
recomputed tokens are each chunk's first 4 (sinks) and a random draw up to the ratio (seeded), and their drift
is taken exact (the full prefill's: an upper bound on what a blend measures). Reported per predictor: the
stale tokens' squared error left, as a share of their drift (1.0 = no correction), for keys and values, over
all layers and per third of the layers.

    python bench/stale_drift.py --set xquad --questions 6
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

SINKS = 4
TEMPERATURES = (0.05, 0.1, 0.2)


def prompt_kv(model, tokenizer, item, quality):
    """(fresh, cached, chunk_of): per layer (keys, values) [kv_heads, tokens, head_dim] float32, unrotated; and
    each slot's chunk index (-1 outside chunks)."""
    from blendgate.engine.prompt import DEFAULT_CONTEXT_DOCUMENTS
    from blendgate.gateway.rag_template import context_documents_for

    prompt = quality.gateway_prompt(tokenizer, item, "blend", 0.15, None,
                                    context_documents_for(len(item.passages), DEFAULT_CONTEXT_DOCUMENTS))
    ids = torch.tensor(prompt.token_ids)
    raw: list = []
    model.forward(ids, None, model.new_cache(len(ids) + 8), raw_kv=raw)
    fresh = [(k.float(), v.float()) for k, v in raw]
    cached = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in fresh]
    before = list(prompt.segments[0].token_ids) + list(prompt.chunk_context)
    chunk_of = torch.full((len(ids),), -1)
    start, chunk = 0, 0
    for segment in prompt.segments:
        count = len(segment.token_ids)
        if segment.is_chunk:
            alone: list = []
            model.forward(torch.tensor(before + list(segment.token_ids)), None,
                          model.new_cache(len(before) + count + 8), raw_kv=alone)
            for layer, (k, v) in enumerate(alone):
                cached[layer][0][:, start:start + count] = k[:, len(before):].float()
                cached[layer][1][:, start:start + count] = v[:, len(before):].float()
            chunk_of[start:start + count] = chunk
            chunk += 1
        start += count
    return fresh, cached, chunk_of


def recomputed_slots(chunk_of: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Each chunk's first SINKS slots and a seeded random draw of the others, `ratio` of chunk tokens in all."""
    slots = (chunk_of >= 0).nonzero()[:, 0]
    sinks = torch.cat([(chunk_of == c).nonzero()[:SINKS, 0] for c in range(int(chunk_of.max()) + 1)])
    others = slots[~torch.isin(slots, sinks)]
    draw = torch.randperm(others.shape[0], generator=torch.Generator().manual_seed(seed))
    extra = max(0, int(ratio * slots.shape[0]) - sinks.shape[0])
    return torch.sort(torch.cat((sinks, others[draw[:extra]]))).values


def predictors(stale_features: dict, recomputed_features: dict, same_chunk: torch.Tensor,
               drift: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted drift of the stale tokens [kv_heads, stale, head_dim] by name, from the recomputed tokens'
    `drift` [kv_heads, recomputed, head_dim]; same_chunk [stale, recomputed] 0/1."""
    mean = same_chunk / same_chunk.sum(1, keepdim=True).clamp(min=1)
    found = {f"chunk mean x {s}": s * torch.einsum("sr,hrd->hsd", mean, drift) for s in (0.5, 1.0)}
    for name, stale in stale_features.items():
        stale = stale / stale.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        recomputed = recomputed_features[name] / recomputed_features[name].norm(dim=-1, keepdim=True).clamp(min=1e-6)
        similarity = torch.einsum("hsd,hrd->hsr", stale, recomputed)
        for tau in TEMPERATURES:
            weights = torch.softmax(similarity / tau + torch.log(same_chunk + 1e-30)[None], dim=-1)
            predicted = torch.einsum("hsr,hrd->hsd", weights, drift)
            for strength in (0.5, 1.0):
                found[f"similar {name}, tau {tau} x {strength}"] = strength * predicted
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=["nq", "xquad"], default="xquad", dest="question_set")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--k", type=int, default=10, help="passages per prompt (nq only)")
    parser.add_argument("--ratio", type=float, default=0.15, help="share of chunk tokens recomputed")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import quality
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier
    from blendgate.engine.weights import load_model

    loaded = load_model(None, dtype="float32", device="cpu", cache_dir=args.cache_dir)
    model = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("memory", 1 << 30, loaded.device)])).model
    if args.question_set == "xquad":
        items = quality.xquad_items(quality.DATA / "xquad.en.json", args.questions, 0)
    else:
        items = quality.nq_items(quality.DATA / "nq-open-oracle.dev.jsonl.gz", args.questions, 0, args.k)
    layers = model.num_layers
    error: dict[str, torch.Tensor] = {}  # name -> [layers, keys/values, (error, drift)]
    for number, item in enumerate(items):
        fresh, cached, chunk_of = prompt_kv(model, loaded.tokenizer, item, quality)
        recomputed = recomputed_slots(chunk_of, args.ratio, number)
        stale = (chunk_of >= 0).nonzero()[:, 0]
        stale = stale[~torch.isin(stale, recomputed)]
        same = (chunk_of[stale][:, None] == chunk_of[recomputed][None, :]).float()
        for layer in range(layers):
            keys, values = cached[layer]
            features = {"keys": keys, "values": values}
            for kind in (0, 1):
                drift = fresh[layer][kind] - cached[layer][kind]
                target = drift[:, stale]
                scale = target.square().sum()
                found = predictors({n: f[:, stale] for n, f in features.items()},
                                   {n: f[:, recomputed] for n, f in features.items()}, same, drift[:, recomputed])
                for name, predicted in {"none": torch.zeros_like(target), **found}.items():
                    cell = error.setdefault(name, torch.zeros(layers, 2, 2))
                    cell[layer, kind] += torch.stack(((target - predicted).square().sum(), scale))
        print(f"question {number + 1}/{len(items)}", file=sys.stderr, flush=True)

    thirds = [(1, layers // 3), (layers // 3, 2 * layers // 3), (2 * layers // 3, layers)]

    def share(cell: torch.Tensor, kind: int, low: int, high: int) -> float:
        return float(cell[low:high, kind, 0].sum() / cell[low:high, kind, 1].sum())

    lines = [f"# Stale-token drift predictors ({args.question_set}), {date.today().isoformat()}", "",
             f"- command: `python bench/stale_drift.py {' '.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, CPU, torch {torch.__version__}; SmolLM2-135M-Instruct, float32; "
             f"{len(items)} questions; recomputed: {SINKS} sinks a chunk + random, {args.ratio:.0%} of chunk tokens",
             "", "| predictor | keys: error left (layers 1.., first / middle / last third) | values: error left |",
             "|---|---|---|"]
    for name, cell in sorted(error.items(), key=lambda pair: share(pair[1], 0, 1, layers)):
        parts = [" / ".join(f"{share(cell, kind, a, b):.3f}" for a, b in thirds) for kind in (0, 1)]
        cells = [f"{share(cell, kind, 1, layers):.3f} ({parts[kind]})" for kind in (0, 1)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
