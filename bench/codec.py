"""The chunk-cache codecs (chunkcache/codec/) on real KV: size, reconstruction error and speed, CPU.

SmolLM2-135M-Instruct (the embedded model, on the CPU) computes each NQ-open passage's chunk KV as the gateway
does (after the system prompt, chunkcache/runner.py: ChunkBlender), stored in bf16 as on a GPU, with the keys'
channel weights measured there (ChunkKV.weights: the cachegen encoder's bins follow them). Every codec and level
then encodes and decodes each chunk. Per codec and level:
- bytes per token of the whole entry (framing, token ids, the codec's parameters) and the ratio bf16 / entry;
- relative MSE (sum of squared errors / sum of squares) of keys and of values, per third of the layers (the
  layer groups of the cachegen codec);
- encode and decode throughput in GB/s of bf16 KV, with torch and numpy on `--threads` threads.
The blend quality per level is bench/quality.py's (variants `RULE@R+CODEC:LEVEL`).

    python bench/codec.py --passages 200

With `--synthetic MODEL ...` it measures the cachegen codec on the KV shapes of larger models instead
(SYNTHETIC_SHAPES: Llama-3-8B, Qwen2.5-7B; 512-token chunks), with synthetic KV: Gaussian, per-channel offsets
and log-normal per-channel scales, keys a random walk along the tokens (no model is run: sizes depend on these
statistics, speeds hardly). Per model and level: bytes per token and ratio against bf16, encode GB/s on the
host, and decode GB/s of bf16 output on `--device`: on CUDA the Triton decoder alone (its inputs already on
the GPU, keys and values in one launch; CUDA events, after warm-up) and the whole entry (bytes on the host ->
checksum, pinned copy up, kernel, damage check), on the CPU the numpy reference. Appends a section to `--out`.

    python bench/codec.py --synthetic llama3-8b qwen2.5-7b --device cuda
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
# (layers, KV heads, head_dim) of the models' KV (their Hugging Face configurations).
SYNTHETIC_SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}


@dataclass
class Passage:
    """A retrieved chunk as the RAG template takes it (gateway/rag_template.py: ChunkLike)."""

    id: str
    text: str
    previous: str | None = None  # the text before it in its document (not used here)


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
    parser.add_argument("--synthetic", nargs="+", choices=sorted(SYNTHETIC_SHAPES), default=None,
                        help="measure cachegen on these models' KV shapes with synthetic KV (see above)")
    parser.add_argument("--tokens", type=int, default=512, help="chunk tokens of --synthetic")
    parser.add_argument("--device", default="cpu", help="where --synthetic decodes: cpu or cuda")
    parser.add_argument("--repeats", type=int, default=20, help="timed GPU decodes per entry (after 3 warm-ups)")
    parser.add_argument("--host-share", action="store_true",
                        help="with --synthetic: time only the host's part of decoding an entry on a GPU (checksum, "
                             "parsing, joining the word streams), at every level")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic and args.host_share:
        host_share(args)
        return
    if args.synthetic:
        synthetic(args)
        return

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
    blender = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("memory", 1, "cpu")]), channel_weights=True).blender
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
                           ChunkKV(kv.token_ids, kv.keys.bfloat16(), kv.values.bfloat16(), kv.weights)))
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


def synthetic_kv(shape: tuple[int, int, int, int], seed: int):
    """Keys and values [layers, heads, tokens, head_dim] in bf16 with per-channel offsets and scales."""
    generator = torch.Generator().manual_seed(seed)
    layers, heads, _, dim = shape
    scale = torch.exp(torch.randn(layers, heads, 1, dim, generator=generator) * 0.5)
    keys = 3 * torch.randn(layers, heads, 1, dim, generator=generator) + scale * 0.3 * torch.randn(
        shape, generator=generator).cumsum(dim=2)
    values = scale * torch.randn(shape, generator=generator)
    return keys.bfloat16(), values.bfloat16()


def synthetic(args) -> None:
    from blendgate.chunkcache.codec import Codec
    from blendgate.chunkcache.codec.cachegen import GROUP_TOKENS, CacheGenCodec, layer_groups
    from blendgate.chunkcache.defaults import CODEC_LEVELS
    from blendgate.chunkcache.keys import ChunkKey
    from blendgate.chunkcache.kv import ChunkKV
    from blendgate.kernels import rans

    device = torch.device(args.device)
    rows = []
    for model in args.synthetic:
        layers, heads, dim = SYNTHETIC_SHAPES[model]
        shape = (layers, heads, args.tokens, dim)
        keys, values = synthetic_kv(shape, seed=0)
        kv = ChunkKV(torch.arange(args.tokens), keys, values)
        key = ChunkKey.of(model, [1], kv.token_ids.tolist())
        bf16_bytes = keys.nbytes + values.nbytes
        for level in range(CODEC_LEVELS["cachegen"]):
            codec = Codec("cachegen", level)
            begun = time.perf_counter()
            data = codec.encode(key, kv)
            encode_s = time.perf_counter() - begun
            row = {"model": model, "level": level, "bytes_per_token": len(data) / args.tokens,
                   "ratio": bf16_bytes / len(data), "encode_gbs": bf16_bytes / encode_s / 1e9}
            if device.type == "cuda":
                parts = [CacheGenCodec(level).encode(tensor, kind)
                         for tensor, kind in ((keys, "keys"), (values, "values"))]
                # Keys' and values' layer groups, on the GPU: one launch, as the codec decodes an entry.
                groups = [CacheGenCodec._group(p, g, len(r), heads * dim, device).to(device)
                          for p in parts for g, r in enumerate(layer_groups(layers))]

                def kernel() -> None:
                    rans.decode_triton(groups, heads, args.tokens, dim, GROUP_TOKENS, torch.bfloat16, device)

                on_gpu, on_host = codec.decode(key, data, device), codec.decode(key, data)
                assert on_gpu is not None and on_host is not None, "an entry that does not decode"
                for got, expected in ((on_gpu.keys, on_host.keys), (on_gpu.values, on_host.values)):
                    assert torch.allclose(got.cpu().float(), expected.float(), rtol=2 ** -7, atol=1e-6)
                row["kernel_gbs"] = bf16_bytes / cuda_seconds(kernel, args.repeats) / 1e9
                row["entry_gbs"] = bf16_bytes / cuda_seconds(lambda: codec.decode(key, data, device),
                                                             max(3, args.repeats // 4)) / 1e9
            else:
                begun = time.perf_counter()
                codec.decode(key, data)
                row["entry_gbs"] = bf16_bytes / (time.perf_counter() - begun) / 1e9
            rows.append(row)
            print(row, flush=True)
    write_synthetic(args, rows, device)


def host_share(args) -> None:
    """The host's part of a fetched cachegen entry's decode on a GPU, before any copy to the device: the
    checksum and body (frame.entry_body), safetensors parsing, and joining each tensor's word streams as
    kernels/rans.py's decode_triton does. Printed as a markdown table (GB/s of entry bytes and of bf16)."""
    from blendgate.chunkcache.codec import Codec
    from blendgate.chunkcache.codec.frame import entry_body
    from blendgate.chunkcache.defaults import CODEC_LEVELS
    from blendgate.chunkcache.keys import ChunkKey
    from blendgate.chunkcache.kv import ChunkKV
    from blendgate.kernels.rans import _concatenated
    from safetensors.torch import load as load_tensors

    print("| model | level | entry MB | host ms | GB/s of entry bytes | GB/s of bf16 |")
    print("|---|---|---|---|---|---|")
    for model in args.synthetic:
        layers, heads, dim = SYNTHETIC_SHAPES[model]
        keys, values = synthetic_kv((layers, heads, args.tokens, dim), seed=0)
        ids = torch.arange(args.tokens)
        key = ChunkKey.of(model, [], ids.tolist())
        for level in range(CODEC_LEVELS["cachegen"]):
            data = Codec("cachegen", level).encode(key, ChunkKV(ids, keys, values))

            def host() -> None:
                tensors = load_tensors(entry_body(data))
                for name in ("keys", "values"):
                    _concatenated([value for part, value in tensors.items()
                                   if part.startswith(name) and part.endswith("words")])

            host()
            started = time.perf_counter()
            for _ in range(args.repeats):
                host()
            seconds = (time.perf_counter() - started) / args.repeats
            print(f"| {model} | {level} | {len(data) / 1e6:.1f} | {seconds * 1e3:.2f} | "
                  f"{len(data) / seconds / 1e9:.2f} | {2 * keys.numel() * 2 / seconds / 1e9:.1f} |", flush=True)


def cuda_seconds(call, repeats: int) -> float:
    """Mean seconds of `call` on the GPU (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def write_synthetic(args, rows: list[dict], device: torch.device) -> None:
    from blendgate.chunkcache.codec.cachegen import FORMAT

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        where = (f"{platform.machine()}, {os.cpu_count()} cores ({args.threads} threads used; load average "
                 f"{os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}")
    lines = ["", f"## cachegen (rANS, format {FORMAT}) on synthetic KV of larger models, decoding on {device.type} "
             f"({date.today()})", "",
             f"Command: `python bench/codec.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {where}  ",
             f"Data: synthetic bf16 KV ({args.tokens}-token chunks; Gaussian with per-channel offsets and "
             "log-normal scales, keys a random walk along the tokens), so sizes are this data's, not a model's.", "",
             "GB/s: bf16 keys and values per second. encode: on the host. kernel: the Triton decoder alone, "
             "inputs on the GPU; entry: the whole entry from host bytes (checksum, parse, pinned copy up, kernel, "
             "damage check) on the GPU, or the numpy reference decoder on the CPU.", "",
             "| model | level | bytes/token | ratio vs bf16 | encode GB/s | kernel GB/s | entry GB/s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        kernel = f"{row['kernel_gbs']:.1f}" if "kernel_gbs" in row else "-"
        lines.append(f"| {row['model']} | {row['level']} | {row['bytes_per_token']:.0f} | {row['ratio']:.2f} "
                     f"| {row['encode_gbs']:.3f} | {kernel} | {row['entry_gbs']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
