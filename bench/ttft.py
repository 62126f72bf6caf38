"""Time to first token of blending against full prefill and prefix caching, on a GPU (issue 6's benchmark).

Prompts: a system prefix (64 tokens), k chunks of 512 tokens and a 32-token question, random token ids. With
--reuse-system-prefix, blend and reuse rows also reuse the system prefix's exact KV (computed alone from
position 0), as the gateway's blending runner does; without it (the recorded 2026-11-23 results) the
prefix is computed with the question.
Models: the real architectures' configs with random bf16 weights (as vLLM's and SGLang's dummy load format),
and optionally SmolLM2-135M-Instruct's real weights (--smollm). Every time is TTFT: from the request's token
ids (chunk-caches already in their tier) to the first token's id on the host, measured with CUDA events,
median and p90 over --runs runs after warm-up. Speed-ups are over our own full prefill of the same run.
The ideal speed-up is 1 / the compute share (chunkcache/selection.py: compute_share, the (chunk token, layer)
pairs computed); the ideal by rows computed is full prefill's rows over the rows a blend computes (recomputed
chunk tokens and the question: the system prefix is reused exactly), which counts the question as both do.
"TTFT / ideal" is the blend's TTFT over full prefill's TTFT divided by the ideal speed-up. transformers' own
model (SDPA) runs the same prompts as the dense baseline our runner must keep up with.

    python bench/ttft.py                                   # Llama-3-8B and Qwen2.5-7B shapes, k = 4 8 16
    python bench/ttft.py --models llama3-8b --chunks 8 --runs 20 --out bench/results/ttft-DATE.md
    python bench/ttft.py --smollm SmolLM2-135M-Instruct.Q4_1.gguf --models   # real-weight rows only
    python bench/ttft.py --models llama3-8b --chunks 8 --sglang   # with SGLang's rows (bench/sglang_rows.py)
    python bench/ttft.py --models llama3-8b --chunks 8 --engine-rows --sglang  # + the local engine's requests

Local rows time the prefill call (CUDA events); --engine-rows times a request to the local engine end to end, and
SGLang's rows a request to SGLang end to end (wall time): compare those two for what a client sees.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from blendgate.chunkcache.blend import blend_prefill, precompute_chunk
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.selection import DEFAULT_RULE, SelectionRule
from blendgate.engine.llama import LlamaFamilyModel

ARCHITECTURES = {
    # config.json values of meta-llama/Meta-Llama-3-8B and Qwen/Qwen2.5-7B-Instruct (written here: no hub access).
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
}
SYSTEM_TOKENS, CHUNK_TOKENS, QUESTION_TOKENS = 64, 512, 32
RATIOS = (0.05, 0.15, 0.3)


def timed(fn, runs: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call (CUDA events around the call; the call ends by reading its token on the host)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def copy_bandwidth(mib: int = 512) -> float:
    """GiB/s of one host-to-GPU copy from pinned memory."""
    pinned = torch.empty(mib * 2**20, dtype=torch.uint8).pin_memory()
    target = torch.empty_like(pinned, device="cuda")
    return mib / 1024 / statistics.median(timed(lambda: target.copy_(pinned, non_blocking=True), 10)) * 1000


def pinned(kv: ChunkKV | None) -> ChunkKV | None:
    """A copy of a chunk-cache in pinned CPU memory, as the CPU tier keeps it."""
    if kv is None:
        return None
    return ChunkKV(kv.token_ids, kv.keys.cpu().pin_memory(), kv.values.cpu().pin_memory())


def p90(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, name: str, hf_model, runs: int, max_chunks: int, seed: int = 0,
                 reuse_system_prefix: bool = False, rules: dict[str, tuple[SelectionRule, bool | None]] | None = None,
                 ratios: tuple[float, ...] = RATIOS) -> None:
        self.name, self.hf, self.runs = name, hf_model, runs
        self.rules = rules or {"default": (DEFAULT_RULE, None)}
        self.ratios = ratios
        self.model = LlamaFamilyModel.from_transformers(hf_model)
        vocab = hf_model.config.vocab_size
        generator = torch.Generator().manual_seed(seed)
        # Ids from the ordinary vocabulary (the first thousand hold the special and byte tokens).
        draw = lambda n: torch.randint(1000, vocab, (n,), generator=generator).tolist()  # noqa: E731
        self.system, self.question = draw(SYSTEM_TOKENS), draw(QUESTION_TOKENS)
        self.chunks = [draw(CHUNK_TOKENS) for _ in range(max_chunks)]
        self.on_gpu = [precompute_chunk(self.model, chunk, self.system) for chunk in self.chunks]
        self.in_cpu = [pinned(c) for c in self.on_gpu]
        # The system prefix's own KV (exact: it is a prefix), reused by blending like any serving system would.
        self.prefix_gpu = precompute_chunk(self.model, self.system) if reuse_system_prefix else None
        self.prefix_cpu = pinned(self.prefix_gpu) if reuse_system_prefix else None
        self.rows: list[dict] = []

    def ids(self, k: int) -> list[int]:
        return self.system + [t for chunk in self.chunks[:k] for t in chunk] + self.question

    def row(self, k: int, label: str, fn, ideal: float | None = None, ideal_rows: float | None = None) -> dict:
        times = timed(fn, self.runs)
        row = {"model": self.name, "k": k, "row": label, "median": statistics.median(times), "p90": p90(times),
               "ideal": ideal, "ideal_rows": ideal_rows}
        self.rows.append(row)
        print(f"{self.name} k={k} {label}: {row['median']:.2f} ms (p90 {row['p90']:.2f})", flush=True)
        return row

    @torch.inference_mode()
    def run(self, k: int, with_transformers: bool = True) -> None:
        model = self.model
        ids = self.ids(k)
        ids_gpu = torch.tensor(ids, device="cuda")

        def ours_full():
            return int(model.forward(torch.tensor(ids, device="cuda"), None, model.new_cache(len(ids) + 64))
                       [-1].argmax())

        def transformers_full():
            out = self.hf(input_ids=torch.tensor([ids], device="cuda"), use_cache=True, logits_to_keep=1)
            return int(out.logits[0, -1].argmax())

        if with_transformers:
            self.row(k, "transformers full prefill (SDPA)", transformers_full)
        full = self.row(k, "full prefill", ours_full, ideal=1.0)

        # Prefix caching: the system prefix and first chunk's KV reused (copied into the request's cache).
        reused = SYSTEM_TOKENS + CHUNK_TOKENS
        base = model.new_cache(reused)
        model.forward(ids_gpu[:reused], None, base)

        def prefix():
            cache = base.clone(len(ids) + 64)
            return int(model.forward(torch.tensor(ids[reused:], device="cuda"), None, cache)[-1].argmax())

        self.row(k, "prefix caching (first chunk)", prefix, ideal=len(ids) / (len(ids) - reused))
        for tier, chunks, prefix_kv in (("GPU", self.on_gpu, self.prefix_gpu), ("CPU", self.in_cpu, self.prefix_cpu)):
            segments = [self.system, *chunks[:k], self.question]
            self.row(k, f"full reuse (r = 0), chunks in {tier} memory",
                     lambda: int(blend_prefill(model, segments, 0.0, prefix_kv=prefix_kv).logits.argmax()))
            # Every rule with chunks in GPU memory; the first (the default) from CPU memory too.
            for name, (rule, graphs) in list(self.rules.items())[: None if tier == "GPU" else 1]:
                for ratio in self.ratios:
                    # The ideal from the compute actually spent (blending aligns the count to GEMM tiles, and a
                    # deviation rule runs its first layers in full): 1 / compute share.
                    done = blend_prefill(model, segments, ratio, prefix_kv=prefix_kv, rule=rule, probe_graphs=graphs)
                    label = (f"blend {name} r = {ratio}, chunks in {tier} memory ({done.recomputed_chunk_tokens} "
                             f"of {done.chunk_tokens} recomputed)")
                    # The ideal by rows: full prefill's time for the rows the blend computes (the recomputed
                    # chunk tokens and the question; the system prefix is reused exactly).
                    computed = done.recomputed_chunk_tokens + len(self.question)
                    self.row(k, label, lambda r=ratio, rl=rule, g=graphs: int(blend_prefill(
                        model, segments, r, prefix_kv=prefix_kv, rule=rl, probe_graphs=g).logits.argmax()),
                             ideal=1 / done.compute_share, ideal_rows=len(ids) / computed)
        for row in self.rows:
            if row["model"] == self.name and row["k"] == k:
                row["speedup"] = full["median"] / row["median"]

    def engine_rows(self, ks: list[int], ratio: float = 0.15) -> None:
        """The default blend as a request to the local engine, the way SGLang's rows time SGLang: wall time from
        LocalEngine.submit (the prompt's token ids, its chunk-caches in the GPU tier after warm-up) to its first
        token on the host, the engine's own per-request path included (its thread's hand-off, the prefill's KV
        stored into the decode pool, sampling, the event back on the asyncio loop). Raises RuntimeError when the
        engine did not blend."""
        import asyncio

        from blendgate.chunkcache.kv_store import ChunkCacheStore
        from blendgate.chunkcache.runner import BlendingRunner
        from blendgate.chunkcache.tiers import MemoryTier
        from blendgate.engine.engine import LocalEngine
        from blendgate.engine.prompt import Prompt
        from blendgate.engine.sampling import SamplingParams
        from blendgate.engine.weights import LoadedModel
        from sglang_rows import blend_prompt  # beside this script; imports SGLang only when its rows run

        device = next(self.hf.parameters()).device
        context = self.hf.config.max_position_embeddings
        loaded = LoadedModel(model=self.hf, tokenizer=None, folder=Path("."), device=device,
                             max_context_tokens=context, eos_token_ids=frozenset())
        runner = BlendingRunner(loaded, ChunkCacheStore([MemoryTier("gpu", 8 << 30, device)]))
        engine = LocalEngine(runner, max_context_tokens=context, stop_token_ids=frozenset(), max_running=1)
        loop = asyncio.new_event_loop()
        params = SamplingParams(max_new_tokens=1, temperature=0.0)

        async def first_token(prompt: Prompt) -> tuple[float, object]:
            started = time.perf_counter()
            handle = engine.submit(prompt, params)
            elapsed = None
            async for _ in handle:
                elapsed = elapsed or (time.perf_counter() - started) * 1000
            return elapsed, handle.prefill_report

        try:
            for k in ks:
                prompt = blend_prompt(self.system, self.chunks[:k], self.question, ratio)
                times = []
                for run in range(self.runs + 3):  # the first run computes and stores the chunks
                    elapsed, report = loop.run_until_complete(first_token(prompt))
                    if run >= 3:
                        times.append(elapsed)
                if report is None or report.mode != "blend" or report.miss_count:
                    raise RuntimeError(f"the local engine did not blend from its GPU tier: {report}")
                row = {"model": self.name, "k": k, "ideal": None, "median": statistics.median(times),
                       "p90": p90(times),
                       "row": f"local engine request (submit to first token), blend r = {ratio}, chunks in GPU "
                              f"memory ({report.recomputed_tokens} of {report.chunk_tokens} recomputed)"}
                full = next((r for r in self.rows if r["k"] == k and r["row"] == "full prefill"), None)
                if full is not None:  # over the same run's full prefill, as run() gives the other rows
                    row["speedup"] = full["median"] / row["median"]
                self.rows.append(row)
                print(f"{self.name} k={k} {row['row']}: {row['median']:.2f} ms (p90 {row['p90']:.2f})", flush=True)
        finally:
            engine.shutdown()
            loop.close()

    @torch.inference_mode()
    def breakdown(self, k: int, ratio: float, chunks: list[ChunkKV], prefix_kv: ChunkKV | None
                  ) -> dict[str, float]:
        """Median milliseconds per stage of a blended prefill."""
        segments = [self.system, *chunks[:k], self.question]
        per_stage: dict[str, list[float]] = {}
        for run in range(self.runs + 3):
            marks: list = []
            blend_prefill(self.model, segments, ratio, marks=marks, prefix_kv=prefix_kv)
            torch.cuda.synchronize()
            if run >= 3:
                for (_, before), (stage, after) in zip(marks, marks[1:]):
                    per_stage.setdefault(stage, []).append(before.elapsed_time(after))
        return {stage: statistics.median(times) for stage, times in per_stage.items()}

    @torch.inference_mode()
    def decode_rate(self, k: int, ratio: float, tokens: int = 64) -> tuple[float, float]:
        """Tokens per second decoding greedily after a blended prefill (ours) and after transformers' prefill."""
        result = blend_prefill(self.model, [self.system, *self.on_gpu[:k], self.question], ratio,
                               prefix_kv=self.prefix_gpu)
        cache, token = result.cache, int(result.logits.argmax())
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(tokens):
            token = int(self.model.forward(torch.tensor([token], device="cuda"), None, cache)[-1].argmax())
        ours = tokens / (time.perf_counter() - started)
        out = self.hf(input_ids=torch.tensor([self.ids(k)], device="cuda"), use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(tokens):
            out = self.hf(input_ids=torch.tensor([[token]], device="cuda"), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        return ours, tokens / (time.perf_counter() - started)


def random_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("cuda"):  # initialised on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def smollm_model(path: Path):
    from blendgate.engine.weights import load_model

    loaded = load_model(path, dtype="bfloat16", device="cuda", cache_dir=Path("/tmp/blendgate-ttft"))
    return loaded.model.eval()


def table(rows: list[dict]) -> str:
    lines = ["| model | k | row | TTFT median ms | TTFT p90 ms | speed-up over full prefill | ideal speed-up | "
             "TTFT / ideal | ideal by rows computed | TTFT / ideal by rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = f"{r['ideal']:.2f}x" if r.get("ideal") else "-"
        by_rows = f"{r['ideal_rows']:.2f}x" if r.get("ideal_rows") else "-"
        # TTFT over the ideal's TTFT (full prefill's TTFT / ideal speed-up) = ideal speed-up / speed-up.
        over = f"{r['ideal'] / r['speedup']:.2f}" if r.get("ideal") and r.get("speedup") else "-"
        over_rows = f"{r['ideal_rows'] / r['speedup']:.2f}" if r.get("ideal_rows") and r.get("speedup") else "-"
        lines.append(f"| {r['model']} | {r['k']} | {r['row']} | {r['median']:.2f} | {r['p90']:.2f} | "
                     f"{r.get('speedup', 0):.2f}x | {ideal} | {over} | {by_rows} | {over_rows} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smollm", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF: real-weight rows")
    parser.add_argument("--reuse-system-prefix", action="store_true",
                        help="blend and reuse rows reuse the system prefix's exact KV, as the gateway does")
    parser.add_argument("--sglang", action="store_true",
                        help="add SGLang 0.5.15's rows (stock, prefix caching, with blendgate's plugin): "
                             "bench/sglang_rows.py")
    parser.add_argument("--engine-rows", action="store_true",
                        help="also time the default blend as a request to the local engine (LocalEngine.submit to "
                             "the first token, wall time): the like-for-like row for SGLang's")
    parser.add_argument("--rules", nargs="+", default=["default"],
                        help="selection rules to time: 'default' and names of bench/quality.py's RULES; a name "
                             "ending in ':eager' runs the probe pass op by op instead of from CUDA graphs")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()
    from quality import RULES

    rules = {}
    for name in args.rules:
        base = name.removesuffix(":eager")
        rules[name] = (DEFAULT_RULE if base == "default" else SelectionRule(**RULES[base]),
                       False if name.endswith(":eager") else None)
    if not torch.cuda.is_available():
        sys.exit("bench/ttft.py needs a CUDA GPU")
    # transformers' SDPA would pick cuDNN, whose plan is rebuilt for every new length (~20 ms of host time
    # per layer and decode step here); FlashAttention, as blendgate's own SDPA calls use, is its fair form.
    torch.backends.cuda.enable_cudnn_sdp(False)
    report = [f"# TTFT benchmark, {date.today().isoformat()}", "",
              f"- command: `python bench/ttft.py {' '.join(sys.argv[1:])}`",
              f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"Python {platform.python_version()}",
              f"- prompts: {SYSTEM_TOKENS}-token system prefix, k chunks of {CHUNK_TOKENS} tokens, "
              f"{QUESTION_TOKENS}-token question; {args.runs} runs after 3 warm-up runs",
              "- transformers runs with cuDNN's SDPA backend turned off (FlashAttention instead): cuDNN rebuilds "
              "its plan for every new sequence length", ""]
    rows, extra = [], []
    extra.append(f"- host to GPU copy from pinned memory (512 MiB): {copy_bandwidth():.1f} GiB/s median; this "
                 "bounds chunk-caches streamed from CPU memory")
    for name in args.models:
        started = time.perf_counter()
        bench = Bench(name, random_model(name), args.runs, max(args.chunks),
                      reuse_system_prefix=args.reuse_system_prefix, rules=rules, ratios=tuple(args.ratios))
        print(f"{name}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        for k in args.chunks:
            bench.run(k)
        if args.engine_rows:
            bench.engine_rows(args.chunks)
        k = 8 if 8 in args.chunks else args.chunks[0]
        for tier, chunks, prefix_kv in (("GPU", bench.on_gpu, bench.prefix_gpu), ("CPU", bench.in_cpu,
                                                                                     bench.prefix_cpu)):
            stages = bench.breakdown(k, 0.15, chunks, prefix_kv)
            extra.append(f"- {name}, k = {k}, blend r = 0.15, chunks in {tier} memory, median ms per stage: "
                         + ", ".join(f"{stage} {ms:.2f}" for stage, ms in stages.items()))
        ours, theirs = bench.decode_rate(k, 0.15)
        extra.append(f"- {name}, decode after a blended prefill (k = {k}, r = 0.15): {ours:.1f} tokens/s; "
                     f"transformers (SDPA) after its own prefill: {theirs:.1f} tokens/s ({ours / theirs:.2f}x)")
        rows += bench.rows
        prompts = (bench.system, bench.chunks, bench.question)
        del bench
        torch.cuda.empty_cache()
        if args.sglang:
            from sglang_rows import sglang_rows

            rows += sglang_rows(name, ARCHITECTURES[name], *prompts, args.chunks, args.runs)
            from sglang_rows import plugin_profile

            extra += plugin_profile(name, ARCHITECTURES[name], *prompts, 8 if 8 in args.chunks else args.chunks[0],
                                    args.runs)
    if args.smollm:
        bench = Bench("SmolLM2-135M (real weights)", smollm_model(args.smollm), args.runs, max(args.chunks),
                      reuse_system_prefix=args.reuse_system_prefix, rules=rules, ratios=tuple(args.ratios))
        context = bench.hf.config.max_position_embeddings
        for k in args.chunks:
            if SYSTEM_TOKENS + k * CHUNK_TOKENS + QUESTION_TOKENS <= context:
                bench.run(k)
        rows += bench.rows
    report += [table(rows), "", *extra]
    print("\n".join(report[-len(extra) - 2:]))
    print(table(rows))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
