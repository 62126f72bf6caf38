"""Decode tokens/s of the local engine's batched, graph-captured decode against its one-request decode and
against transformers, on a GPU (issue 23's first step).

Rows, for each batch size B and context length C (every request's KV length when decoding starts), measured
in the same run on the same random bf16 weights (the real architecture's config, as vLLM's and SGLang's dummy
load format):
- "batched": engine/decode.py's BatchDecoder: one forward pass per step for all B requests over the paged KV
  pool, replayed from the batch size's CUDA graph, greedy tokens read back each step (one host sync, as the
  engine's sample_batch does);
- "one-request": the decode the engine ran before: each request's token by its own forward pass over its own
  KVCache (LlamaFamilyModel.forward), the requests stepped round-robin;
- "transformers": transformers' model stepping the B requests together, one token per forward over a
  StaticCache (what generate() runs per step; eager, no torch.compile);
- "SGLang" (--sglang, SGLang installed): stock SGLang's offline engine, dummy weights of the same config, its
  decode rate from the wall time of B requests generating 1 and 1 + steps tokens (bench/sglang_rows.py), run
  after the rows above have freed the GPU.
KV is random (decode speed does not depend on its values) and written in place, so no prefill is timed.
tokens/s = B x steps / wall time of the steps (CUDA synchronised), after warm-up steps (graph capture, Triton
compilation). The memory-bandwidth bound per step is (weight bytes + B x C x KV bytes per token) / the GPU's
bandwidth: printed as "bound tok/s" with --bandwidth-gbs (the H200's 4800 by default).

    python bench/decode.py --models llama3-8b --batch 1 8 32 --context 1024 8192 --out bench/results/decode-DATE.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from blendgate.engine.batch import DecodeBatch
from blendgate.engine.decode import BatchDecoder
from blendgate.engine.kv_pool import BlockAllocator, blocks_for
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.engine.paged_kv import PagedKVPool
from ttft import ARCHITECTURES, random_model  # bench/ is on sys.path when this runs as a script


def synced_seconds(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def batched_rate(model: LlamaFamilyModel, batch: int, context: int, steps: int, warmup: int) -> tuple[float, int]:
    """tokens/s of the batched decode and the pool's GPU KV bytes per request."""
    total = context + warmup + steps + 1
    allocator = BlockAllocator(batch * blocks_for(total) + 1, batch)
    pool = PagedKVPool(model, allocator.num_blocks, batch, blocks_for(total))
    pool.keys.normal_()
    pool.values.normal_()
    decoder = BatchDecoder(model, pool, batch, total)
    allocations = [allocator.allocate(i, total) for i in range(batch)]
    for allocation in allocations:
        pool.write_table(allocation)
    tokens = [1] * batch
    position = [context]

    def step() -> None:
        p = position[0]
        decode = DecodeBatch(tuple(range(batch)), tuple(tokens), (p,) * batch,
                             tuple(a.slot(p) for a in allocations), tuple(a.row for a in allocations))
        tokens[:] = decoder.decode(decode).argmax(dim=-1).tolist()
        position[0] += 1

    for _ in range(warmup):
        step()
    return batch * steps / synced_seconds(lambda: [step() for _ in range(steps)]), pool.bytes // batch


def one_request_rate(model: LlamaFamilyModel, batch: int, context: int, steps: int, warmup: int) -> float:
    caches = []
    for _ in range(batch):
        cache = model.new_cache(context + warmup + steps + 1)
        cache.keys.normal_()
        cache.values.normal_()
        cache.positions[:context] = torch.arange(context, device=model.device)
        cache.length = context
        caches.append(cache)
    tokens = [1] * batch

    def step() -> None:  # round-robin, one forward pass per request and token, as the engine stepped them
        for i, cache in enumerate(caches):
            logits = model.forward(torch.tensor([tokens[i]], device=model.device), None, cache)
            tokens[i] = int(logits[-1].argmax())

    for _ in range(warmup):
        step()
    return batch * steps / synced_seconds(lambda: [step() for _ in range(steps)])


def transformers_rate(hf, batch: int, context: int, steps: int, warmup: int) -> float:
    from transformers import StaticCache

    config = hf.config
    cache = StaticCache(config=config, max_cache_len=context + warmup + steps + 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = torch.randn(batch, config.num_key_value_heads, context, head_dim, device=hf.device, dtype=hf.dtype)
    for layer in range(config.num_hidden_layers):
        cache.update(kv, kv, layer)
    del kv
    ids = torch.ones(batch, 1, dtype=torch.long, device=hf.device)

    def step() -> None:
        nonlocal ids
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        ids.tolist()  # the tokens on the host, as generate's stopping checks read them

    for _ in range(warmup):
        step()
    return batch * steps / synced_seconds(lambda: [step() for _ in range(steps)])


def row_line(name: str, batch: int, context: int, row: str, rate: float, baselines: dict,
             kv_bytes: float | None) -> str:
    old, theirs, bound = baselines[(name, batch, context)]
    return (f"| {name} | {batch} | {context} | {row} | {rate:.1f} | {rate / old:.2f}x | {rate / theirs:.2f}x | "
            f"{bound:.0f} | {'-' if kv_bytes is None else f'{kv_bytes:.0f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(ARCHITECTURES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--steps", type=int, default=64, help="timed steps of the batched decode")
    parser.add_argument("--baseline-steps", type=int, default=8,
                        help="timed steps of the one-request and transformers rows (the slow ones)")
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="the GPU's memory bandwidth, GB/s")
    parser.add_argument("--sglang", action="store_true", help="add stock SGLang's decode rows")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as bench/ttft.py: cuDNN rebuilds its plan per new length
    report = [f"# Decode benchmark, {date.today().isoformat()}", "",
              f"- command: `python bench/decode.py {' '.join(sys.argv[1:])}`",
              f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"Python {platform.python_version()}, {platform.node()}",
              f"- {args.steps} timed steps (batched) and {args.baseline_steps} (one-request, transformers) after "
              "3 warm-up steps; random bf16 weights and KV; greedy tokens read back every step", "",
              "| model | batch | context | row | tokens/s | x one-request | x transformers | bound tok/s | "
              "GPU KV MiB per request |", "|---|---|---|---|---|---|---|---|---|"]
    baselines: dict[tuple[str, int, int], tuple[float, float, float]] = {}  # one-request, transformers, bound
    for name in args.models:
        started = time.perf_counter()
        hf = random_model(name)
        model = LlamaFamilyModel.from_transformers(hf)
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        kv_token_bytes = 2 * model.num_layers * model.kv_heads * model.head_dim * 2
        print(f"{name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        for context in args.context:
            for batch in args.batch:
                with torch.inference_mode():  # each row's KV is freed (empty_cache) before the next row's
                    ours, kv_bytes = batched_rate(model, batch, context, args.steps, 3)
                    torch.cuda.empty_cache()
                    print(f"{name} B={batch} C={context}: batched {ours:.1f} tok/s", flush=True)
                    old = one_request_rate(model, batch, context, args.baseline_steps, 3)
                    torch.cuda.empty_cache()
                    print(f"{name} B={batch} C={context}: one-request {old:.1f} tok/s", flush=True)
                    theirs = transformers_rate(hf, batch, context, args.baseline_steps, 3)
                    torch.cuda.empty_cache()
                    print(f"{name} B={batch} C={context}: transformers {theirs:.1f} tok/s", flush=True)
                bound = batch / ((weight_bytes + batch * context * kv_token_bytes) / (args.bandwidth_gbs * 1e9))
                baselines[(name, batch, context)] = (old, theirs, bound)
                for row, rate, kv in (("batched", ours, kv_bytes / 2**20), ("one-request", old, None),
                                      ("transformers", theirs, None)):
                    report.append(row_line(name, batch, context, row, rate, baselines, kv))
        del model, hf
        torch.cuda.empty_cache()
        if args.sglang:
            from sglang_rows import sglang_decode_rates

            for (batch, context), rate in sglang_decode_rates(ARCHITECTURES[name], args.batch, args.context,
                                                              args.steps).items():
                report.append(row_line(name, batch, context, "stock SGLang", rate, baselines, None))
    print("\n".join(report))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
