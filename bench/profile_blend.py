"""Where a blended prefill's time goes, on CUDA: kernel launch cost, and a profile of one blend and one decode.

    python bench/profile_blend.py [--model llama3-8b] [--chunks 8] [--ratio 0.15] [--rule default[:eager]]
                                  [--trace OUT.json]

Prints: the host cost of one tiny kernel launch; the median time of each stage of a blended prefill (CUDA
events); per blended prefill the GPU busy time against the wall time (their gap is the GPU waiting for the
host); the top kernels by GPU time (kernels replayed from CUDA graphs included where CUPTI reports them); the
same for one decode step. `--rule`: 'default' or a name of bench/quality.py's RULES, ':eager' to run the
probe pass op by op. `--trace`: the blend's profile as a Chrome trace (chrome://tracing, Perfetto).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from blendgate.chunkcache.blend import blend_prefill
from blendgate.chunkcache.selection import DEFAULT_RULE, SelectionRule
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
    parser.add_argument("--rule", default="default",
                        help="'default' or a name of bench/quality.py's RULES; ':eager' runs the probe op by op")
    parser.add_argument("--trace", default=None, help="write the blend's profile here as a Chrome trace")
    args = parser.parse_args()
    from quality import RULES

    base = args.rule.removesuffix(":eager")
    rule = DEFAULT_RULE if base == "default" else SelectionRule(**RULES[base])
    graphs = False if args.rule.endswith(":eager") else None
    print(f"one tiny kernel launch: {launch_cost():.1f} us (host side, back to back)")
    bench = Bench(args.model, random_model(args.model), runs=3, max_chunks=args.chunks, reuse_system_prefix=True)
    segments = [bench.system, *bench.on_gpu[: args.chunks], bench.question]

    def blend(marks: list | None = None):
        return blend_prefill(bench.model, segments, args.ratio, marks=marks, prefix_kv=bench.prefix_gpu, rule=rule,
                             probe_graphs=graphs)

    with torch.inference_mode():
        for _ in range(3):
            blend()
        per_stage: dict[str, list[float]] = {}
        for _ in range(10):
            marks: list = []
            blend(marks)
            torch.cuda.synchronize()
            for (_, before), (stage, after) in zip(marks, marks[1:]):
                per_stage.setdefault(stage, []).append(before.elapsed_time(after))
        print(f"rule {args.rule}, k = {args.chunks}, r = {args.ratio}, median ms per stage: " + ", ".join(
            f"{stage} {statistics.median(times):.2f}" for stage, times in per_stage.items()))
        torch.cuda.synchronize()
        started = time.perf_counter()
        blend().logits.argmax().item()
        wall = (time.perf_counter() - started) * 1000
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            blend().logits.argmax().item()
        if args.trace:
            prof.export_chrome_trace(args.trace)
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1000
        print(f"blend r = {args.ratio}, k = {args.chunks}: wall {wall:.1f} ms, GPU busy {gpu:.1f} ms, "
              f"kernels launched {sum(e.count for e in events if e.self_device_time_total > 0)}")
        print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=60))
        result = blend()
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
