"""The chunk-cache codecs (chunkcache/codec/) on real KV: size, reconstruction error and speed, CPU.

SmolLM2-135M-Instruct (the embedded model, on the CPU) computes each NQ-open passage's chunk KV as the gateway
does (after the system prompt, chunkcache/runner.py: ChunkBlender), stored in bf16 as on a GPU. Every codec and
level then encodes and decodes each chunk. Per codec and level:
- bytes per token of the whole entry (framing, token ids, the codec's parameters) and the ratio bf16 / entry;
- relative MSE (sum of squared errors / sum of squares) of keys and of values, per third of the layers (the
  layer groups of the cachegen codec);
- encode and decode throughput in GB/s of bf16 KV, with torch and numpy on `--threads` threads.
The blend quality per level is bench/quality.py's (variants `RULE@R+CODEC:LEVEL`).

    python bench/codec.py --passages 200
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BLENDGATE_QA_DATA", REPO.parent / "shared" / "data" / "qa"))
SYSTEM_PROMPT = "Answer the question using only the documents given."  # bench/quality.py's


@dataclass
class Passage:
    """A retrieved chunk as the RAG template takes it (gateway/rag_template.py: ChunkLike)."""

    id: str
    text: str


def passages(path: Path, count: int) -> list[str]:
    """The first `count` distinct gold passages of the NQ-open file, as the quality benchmark writes them."""
    found: dict[str, None] = {}
    with gzip.open(path, "rt") as lines:
        for line in lines:
            context = json.loads(line)["ctxs"][0]
            found[f"{context['title']}. {context['text']}"] = None
            if len(found) == count:
                break
    return list(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=200, help="NQ-open passages, one chunk each")
    parser.add_argument("--data", type=Path, default=None, help="NQ-open file [../shared/data/qa/...]")
    parser.add_argument("--codecs", nargs="+", default=None,
                        help="NAME:LEVEL (or NAME: all its levels) [every codec and level]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared CPU, 1 runs fastest)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"codec-{date.today()}.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from blendgate.chunkcache.codec import Codec
    from blendgate.chunkcache.codec.cachegen import layer_groups
    from blendgate.chunkcache.defaults import CODEC_LEVELS
    from blendgate.chunkcache.kv import ChunkKV
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier
    from blendgate.engine.weights import load_model
    from blendgate.gateway.rag_template import RagPrompt, encode_prompt, rag_messages

    codecs = []
    for spec in args.codecs or list(CODEC_LEVELS):
        name, _, level = spec.partition(":")
        codecs += [(name, int(level))] if level else [(name, lvl) for lvl in range(CODEC_LEVELS[name])]

    cache_dir = args.cache_dir or Path(os.environ.get("BLENDGATE_CACHE_DIR", Path.home() / ".cache" / "blendgate"))
    loaded = load_model(None, dtype="float32", device="cpu", cache_dir=cache_dir)
    blender = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("memory", 1, "cpu")])).blender
    texts = passages(args.data or DATA / "nq-open-oracle.dev.jsonl.gz", args.passages)
    chunks = []
    started = time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            rag = RagPrompt(SYSTEM_PROMPT, [Passage("0", text)], "?")
            prompt = encode_prompt(loaded.tokenizer, rag_messages([], rag), rag, mode="blend")
            prefix = blender.prefix_for(prompt)
            ids = next(segment.token_ids for segment in prompt.segments if segment.is_chunk)
            kv, _ = blender.chunk_kv(blender.chunk_key(prefix, ids), ids, prefix)
            chunks.append((blender.chunk_key(prefix, ids),
                           ChunkKV(kv.token_ids, kv.keys.bfloat16(), kv.values.bfloat16())))
    print(f"{len(chunks)} chunks' KV in {time.perf_counter() - started:.0f} s", flush=True)

    layers = chunks[0][1].keys.shape[0]
    groups = layer_groups(layers)
    tokens = sum(kv.length for _, kv in chunks)
    bf16_bytes = sum(kv.keys.nbytes + kv.values.nbytes for _, kv in chunks)
    rows = []
    for name, level in codecs:
        codec = Codec(name, level)
        encoded, encode_s, decode_s = 0, 0.0, 0.0
        errors = {tensor: [[0.0, 0.0] for _ in groups] for tensor in ("keys", "values")}
        for key, kv in chunks:
            begun = time.perf_counter()
            data = codec.encode(key, kv)
            encode_s += time.perf_counter() - begun
            begun = time.perf_counter()
            decoded = codec.decode(key, data)
            decode_s += time.perf_counter() - begun
            encoded += len(data)
            for tensor in ("keys", "values"):
                original, got = getattr(kv, tensor).float(), getattr(decoded, tensor).float()
                for group, layer_range in enumerate(groups):
                    part = slice(layer_range.start, layer_range.stop)
                    errors[tensor][group][0] += float((got[part] - original[part]).square().sum())
                    errors[tensor][group][1] += float(original[part].square().sum())
        rows.append({"codec": name, "level": level, "bytes_per_token": encoded / tokens,
                     "ratio": bf16_bytes / encoded,
                     "rel_mse": {tensor: [e / s for e, s in groups_] for tensor, groups_ in errors.items()},
                     "encode_gbs": bf16_bytes / encode_s / 1e9, "decode_gbs": bf16_bytes / decode_s / 1e9})
        print(f"{name}:{level} ratio {rows[-1]['ratio']:.2f}", flush=True)
    write(args, rows, len(chunks), tokens, layers, groups, loaded)


def write(args, rows: list[dict], chunks: int, tokens: int, layers: int, groups, loaded) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} cores ({args.threads} threads used; load average "
               f"{os.getloadavg()[0]:.1f} at the end: the CPU is shared), torch {torch.__version__}, "
               f"{platform.python_implementation()} {platform.python_version()}")
    spans = ", ".join(f"{g.start}-{g.stop - 1}" for g in groups)
    lines = [f"# Chunk-cache codecs on SmolLM2-135M's KV ({date.today()})", "",
             f"Command: `python bench/codec.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine}  ",
             f"Data: {chunks} NQ-open passages, one chunk each ({tokens} tokens, {tokens / chunks:.0f} per chunk), "
             f"KV computed after the system prompt ({layers} layers, "
             f"{loaded.model.config.num_key_value_heads} KV heads, head_dim "
             f"{loaded.model.config.hidden_size // loaded.model.config.num_attention_heads}), stored as bf16.", "",
             "Bytes per token: whole entries (framing, token ids, codec parameters) / tokens; ratio: bf16 keys and "
             "values / entry bytes. Relative MSE: squared error / squared values, per layer group (layers "
             f"{spans}). GB/s: bf16 KV bytes per second of encode or decode (host, into CPU memory).", "",
             "| codec | level | bytes/token | ratio vs bf16 | keys rel. MSE (early / mid / late) "
             "| values rel. MSE (early / mid / late) | encode GB/s | decode GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        keys = " / ".join(f"{e:.2e}" for e in row["rel_mse"]["keys"])
        values = " / ".join(f"{e:.2e}" for e in row["rel_mse"]["values"])
        lines.append(f"| {row['codec']} | {row['level']} | {row['bytes_per_token']:.0f} | {row['ratio']:.2f} "
                     f"| {keys} | {values} | {row['encode_gbs']:.3f} | {row['decode_gbs']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine,
                                                         "chunks": chunks, "tokens": tokens, "rows": rows}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
