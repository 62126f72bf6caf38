"""How much a decorrelating transform could shrink chunk KV before quantisation (a diagnostic for issue 21's codec).

The cachegen codec quantises each channel of a layer's keys and values with its own bin width (entropy-coded
symbols), so at high rate its bytes follow the channels' variances. A per-model Karhunen-Loeve transform (the
eigenvectors of each layer's and KV head's channel covariance, fitted on some chunks) would code decorrelated
coefficients instead: at the same squared error (the transform is orthogonal), it saves
0.5 * log2(geometric mean of the channel variances / geometric mean of the coefficient variances) bits a
value, the transform coding gain. This script measures that gain on SmolLM2-135M's real chunk KV (NQ-open
passages computed after the system prompt, as bench/codec.py computes them), the transform fitted on the first
passages and the gain read on the others; each chunk's first token (stored apart by the codec) left out.

    python bench/kv_coding_gain.py --passages 80 --fit 50
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def chunk_kv(count: int, cache_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [layers, kv_heads, tokens, head_dim] of the first `count` NQ-open passages' chunks."""
    import codec as codec_bench
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier
    from blendgate.engine.weights import load_model
    from blendgate.gateway.rag_template import RagPrompt, encode_prompt, rag_messages

    loaded = load_model(None, dtype="float32", device="cpu", cache_dir=cache_dir)
    blender = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("memory", 1, "cpu")])).blender
    out = []
    with torch.inference_mode():
        for text in codec_bench.passages(codec_bench.DATA / "nq-open-oracle.dev.jsonl.gz", count):
            rag = RagPrompt(codec_bench.SYSTEM_PROMPT, [codec_bench.Passage("0", text)], "?")
            prompt = encode_prompt(loaded.tokenizer, rag_messages([], rag), rag, mode="blend")
            prefix = blender.prefix_for(prompt)
            ids = next(segment.token_ids for segment in prompt.segments if segment.is_chunk)
            kv, _ = blender.chunk_kv(blender.chunk_key(prefix, ids), ids, prefix)
            out.append((kv.keys.clone(), kv.values.clone()))
    return out


def coding_gain(fit: list[torch.Tensor], test: list[torch.Tensor]) -> torch.Tensor:
    """Bits a value saved per layer and KV head [layers, kv_heads]: tensors [layers, kv_heads, tokens, dim],
    the transform fitted on `fit`, the variances read on `test` (first tokens left out)."""
    layers, heads = fit[0].shape[:2]
    gain = torch.zeros(layers, heads, dtype=torch.float64)
    for layer in range(layers):
        for head in range(heads):
            train = torch.cat([t[layer, head, 1:] for t in fit]).double()
            held = torch.cat([t[layer, head, 1:] for t in test]).double()
            mean = train.mean(0)
            _, vectors = torch.linalg.eigh(torch.cov((train - mean).T))
            plain = (held - mean).var(0).log2().mean()
            rotated = ((held - mean) @ vectors).var(0).log2().mean()
            gain[layer, head] = 0.5 * (plain - rotated)
    return gain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=80, help="NQ-open passages, one chunk each")
    parser.add_argument("--fit", type=int, default=50, help="of them, the first this many fit the transform")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    args = parser.parse_args()
    if not 0 < args.fit < args.passages:
        parser.error("--fit must be between 1 and --passages - 1")
    torch.set_num_threads(1)
    cache_dir = args.cache_dir or Path(os.environ.get("BLENDGATE_CACHE_DIR", Path.home() / ".cache" / "blendgate"))
    chunks = chunk_kv(args.passages, cache_dir)
    print("| tensor | mean gain, bits a value | by layer thirds | first layer |\n|---|---|---|---|")
    for name, index in (("keys (rotated, as stored)", 0), ("values", 1)):
        gain = coding_gain([c[index] for c in chunks[: args.fit]], [c[index] for c in chunks[args.fit:]])
        per_layer = gain.mean(1)
        thirds = " / ".join(f"{float(part.mean()):.2f}" for part in per_layer.tensor_split(3))
        print(f"| {name} | {float(gain.mean()):.2f} | {thirds} | {float(per_layer[0]):.2f} |")


if __name__ == "__main__":
    main()
