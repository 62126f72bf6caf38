"""Where a blended prefill's time goes, on CUDA: kernel launch cost, and a profile of one blend and one decode.

    python bench/profile_blend.py [--model llama3-8b] [--chunks 8] [--ratio 0.15]

Prints: the host cost of one tiny kernel launch; per blended prefill the GPU busy time against the wall time
(their gap is the GPU waiting for the host); the top kernels by GPU time.
"""

from __future__ import annotations

import argparse
import time

import torch
from blendgate.chunkcache.blend import blend_prefill
from blendgate.engine.prompt import DEFAULT_RECOMPUTE_RATIO
from torch.profiler import ProfilerActivity, profile
from ttft import Bench, random_model  # bench/ is on sys.path when this runs as a script


def launch_cost(count: int = 2000) -> float:
    x = torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=DEFAULT_RECOMPUTE_RATIO)
    args = parser.parse_args()
    print(f"one tiny kernel launch: {launch_cost():.1f} us (host side, back to back)")
    bench = Bench(args.model, random_model(args.model), runs=3, max_chunks=args.chunks)
    segments = [bench.system, *bench.on_gpu[: args.chunks], bench.question]
    with torch.inference_mode():
        for _ in range(3):
            blend_prefill(bench.model, segments, args.ratio)
        torch.cuda.synchronize()
        started = time.perf_counter()
        blend_prefill(bench.model, segments, args.ratio).logits.argmax().item()
        wall = (time.perf_counter() - started) * 1000
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            blend_prefill(bench.model, segments, args.ratio).logits.argmax().item()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1000
        print(f"blend r = {args.ratio}, k = {args.chunks}: wall {wall:.1f} ms, GPU busy {gpu:.1f} ms, "
              f"kernels launched {sum(e.count for e in events if e.self_device_time_total > 0)}")
        print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
        result = blend_prefill(bench.model, segments, args.ratio)
        token = torch.tensor([int(result.logits.argmax())], device="cuda")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            bench.model.forward(token, None, result.cache).argmax().item()
            wall = (time.perf_counter() - started) * 1000
        events = prof.key_averages()
        print(f"one decode step: wall {wall:.1f} ms (profiled), GPU busy "
              f"{sum(e.self_device_time_total for e in events) / 1000:.1f} ms")
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
