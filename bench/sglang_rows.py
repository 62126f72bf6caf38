"""SGLang's rows for bench/ttft.py (issue 7): stock SGLang 0.5.15 as the baseline, and SGLang with blendgate's
plugin, on the same prompts and architecture as the local engine's rows (random weights: SGLang's dummy load
format); and stock SGLang's decode rate for bench/decode.py (`sglang_decode_rates`, issue 23).

Each SGLang row is the wall time of `sglang.Engine.generate` for one request with max_new_tokens = 1 (the
offline engine: no HTTP, but SGLang's tokenizer-manager/scheduler hand-off and sampling included), median and
p90 over the runs after warm-up. The local engine's rows are GPU time measured with CUDA events, so the
"floor" row (a 16-token prompt) shows SGLang's fixed cost per request; speed-ups of SGLang rows are over
stock SGLang's own full prefill of the same run.

- stock SGLang, full prefill: the radix cache flushed before each run;
- stock SGLang, prefix caching: before each run the cache is flushed and a request sharing the system prefix
  and first chunk (then diverging) is served, so the timed one finds exactly those in the radix cache;
- SGLang + blendgate, blend r: a second engine with the plugin and --disable-radix-cache; warm-up requests
  (until one blends: warm_until_blending) put the chunks' KV in the plugin's GPU tier, the timed ones find it
  there. Only r < 1 by default: at r = 1.0 (blendgate's own full prefill inside SGLang) blending saves nothing,
  so the slower-than-full rule (chunkcache/fallback.py) hands the request to SGLang's prefill.

`plugin_profile` (issue 20: where a blend's time inside SGLang goes) starts a third engine whose plugin times
its passes (BLENDGATE_SGLANG_PROFILE=1: sglang_plugin/profile.py) and sets each request's wall time beside the
plugin's stages; the rest is SGLang's own per-request path. Its engine is apart from the timed rows' because the
profile waits for each pass's end.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.sglang_plugin.protocol import custom_params

RUNS_WARMUP = 3


def write_model_dir(spec: dict, root: Path) -> Path:
    """A model directory SGLang can load with --load-format dummy: config.json only."""
    from transformers import AutoConfig

    spec = dict(spec)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec).to_dict()
    config.update(architectures=["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
                  torch_dtype="bfloat16")
    path = root / f"{model_type}-dummy"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _engine(model_dir: Path, plugin: bool, radix: bool):
    import sglang

    # The plugin is loaded (or not) in SGLang's scheduler process, which reads this when it starts.
    os.environ["BLENDGATE_SGLANG_PLUGIN"] = "1" if plugin else "0"
    return sglang.Engine(model_path=str(model_dir), load_format="dummy", skip_tokenizer_init=True,
                         disable_radix_cache=not radix, mem_fraction_static=0.45, dtype="bfloat16",
                         random_seed=0, log_level="error")


def _timed(fn, runs: int, before=None) -> list[float]:
    times = []
    for run in range(runs + RUNS_WARMUP):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        if run >= RUNS_WARMUP:
            times.append((time.perf_counter() - started) * 1000)
    return times


def _p90(times: list[float]) -> float:
    return sorted(times)[min(len(times) - 1, round(0.9 * (len(times) - 1)))]


def sglang_rows(name: str, spec: dict, system: list[int], chunks: list[list[int]], question: list[int],
                ks: list[int], runs: int, ratios=(0.15,)) -> list[dict]:
    rows: list[dict] = []
    one_token = {"max_new_tokens": 1, "temperature": 0.0}

    def add(k: int, label: str, times: list[float]) -> dict:
        row = {"model": name, "k": k, "row": label, "median": statistics.median(times), "p90": _p90(times),
               "ideal": None}
        rows.append(row)
        print(f"{name} k={k} {label}: {row['median']:.2f} ms (p90 {row['p90']:.2f})", flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(spec, Path(tmp))
        engine = _engine(model_dir, plugin=False, radix=True)
        try:
            add(0, "SGLang floor (16-token prompt)",
                _timed(lambda: engine.generate(input_ids=question[:16], sampling_params=one_token), runs,
                       engine.flush_cache))
            full = {}
            for k in ks:
                ids = system + [t for chunk in chunks[:k] for t in chunk] + question
                full[k] = add(k, "stock SGLang full prefill", _timed(
                    lambda: engine.generate(input_ids=ids, sampling_params=one_token), runs, engine.flush_cache))
                shared = system + chunks[0]
                # Diverges right after the first chunk (its next token differs from the timed prompt's), so the
                # radix cache holds exactly system + chunk 1.
                warm = shared + [t for t in question if t != ids[len(shared)]][:8]

                def seed_prefix():
                    engine.flush_cache()
                    engine.generate(input_ids=warm, sampling_params=one_token)

                add(k, "stock SGLang prefix caching (system + first chunk)", _timed(
                    lambda: engine.generate(input_ids=ids, sampling_params=one_token), runs, seed_prefix))
        finally:
            engine.shutdown()

        engine = _engine(model_dir, plugin=True, radix=False)
        try:
            for k in ks:
                for ratio in ratios:
                    prompt = blend_prompt(system, chunks[:k], question, ratio)
                    ids = prompt.token_ids
                    params = {**one_token, "custom_params": custom_params(prompt)}  # as the gateway sends them
                    report = warm_until_blending(engine, ids, params)
                    if not report or report.get("mode") != "blend":
                        raise RuntimeError(f"the plugin did not blend: meta_info['blendgate'] = {report}")
                    label = ("SGLang + blendgate, r = 1.0 (blendgate's full prefill in SGLang)" if ratio == 1.0
                             else f"SGLang + blendgate blend r = {ratio}, chunks in GPU memory "
                                  f"({report['recomputed_tokens']} of {report['chunk_tokens']} recomputed)")
                    add(k, label, _timed(lambda: engine.generate(input_ids=ids, sampling_params=params), runs))
        finally:
            engine.shutdown()
    for row in rows:
        if row["k"] in full:
            row["speedup"] = full[row["k"]]["median"] / row["median"]
    return rows


def sglang_decode_rates(spec: dict, batches: list[int], contexts: list[int], steps: int) -> dict[tuple[int, int],
                                                                                                 float]:
    """Stock SGLang's decode tokens/s per (batch, context): B requests of C random prompt tokens sent together to
    the offline engine (radix cache off, greedy, ignore_eos), timed with 1 and with 1 + steps new tokens; the
    rate is B x steps over the difference, so the prefill (the same in both) drops out. Wall time: SGLang's
    scheduler, sampling and detokenisation-free output path included, as in its own serving."""
    import random

    rates = {}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(write_model_dir(spec, Path(tmp)), plugin=False, radix=False)
        try:
            for context in contexts:
                for batch in batches:
                    prompts = [[rng.randrange(10, spec["vocab_size"]) for _ in range(context)] for _ in range(batch)]

                    def run(new_tokens: int) -> float:
                        params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
                        started = time.perf_counter()
                        engine.generate(input_ids=prompts, sampling_params=params)
                        return time.perf_counter() - started

                    run(2)  # warm-up (this batch's shapes)
                    rates[(batch, context)] = batch * steps / max(1e-9, run(1 + steps) - run(1))
                    print(f"SGLang B={batch} C={context}: {rates[(batch, context)]:.1f} tok/s", flush=True)
        finally:
            engine.shutdown()
    return rates



def blend_prompt(system: list[int], chunks: list[list[int]], question: list[int], ratio: float) -> Prompt:
    """The benchmark's RAG prompt (system prompt, chunks, question) in "blend" mode at recompute ratio `ratio`."""
    segments = [PromptSegment(tuple(system)), *(PromptSegment(tuple(c), True) for c in chunks),
                PromptSegment(tuple(question))]
    return Prompt(segments, mode="blend", recompute_ratio=ratio)


def warm_until_blending(engine, ids: list[int], params: dict, most: int = 24) -> dict | None:
    """Sends the request until the plugin blends it (at most `most` times) and returns its last report. A cold
    prompt is prefilled in full while blending its uncached chunks would be slower; the plugin then computes
    one of them into its store after each pass (ChunkBlender.warm), so a few requests warm the tier."""
    report = None
    for _ in range(most):
        result = engine.generate(input_ids=ids, sampling_params=params)
        report = (result["meta_info"].get("blendgate") or [None])[0]
        if report and report.get("mode") == "blend" and not report.get("miss_count"):
            break
    return report


def plugin_profile(name: str, spec: dict, system: list[int], chunks: list[list[int]], question: list[int], k: int,
                   runs: int, ratio: float = 0.15) -> list[str]:
    """Median milliseconds per stage of the plugin's pass for one blend (k chunks, `ratio`), beside the
    request's wall time through sglang.Engine.generate, as report lines."""
    from blendgate.sglang_plugin.profile import PROFILE_KEY

    prompt = blend_prompt(system, chunks[:k], question, ratio)
    params = {"max_new_tokens": 1, "temperature": 0.0, "custom_params": custom_params(prompt)}
    walls, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BLENDGATE_SGLANG_PROFILE"] = "1"
        try:
            engine = _engine(write_model_dir(spec, Path(tmp)), plugin=True, radix=False)
        finally:
            os.environ.pop("BLENDGATE_SGLANG_PROFILE")
        try:
            warm_until_blending(engine, prompt.token_ids, params)
            for run in range(runs + RUNS_WARMUP):
                started = time.perf_counter()
                result = engine.generate(input_ids=prompt.token_ids, sampling_params=params)
                wall = (time.perf_counter() - started) * 1000
                report = (result["meta_info"].get("blendgate") or [None])[0] or {}
                if report.get("mode") != "blend" or PROFILE_KEY not in report:
                    raise RuntimeError(f"the plugin did not blend or time its pass: {report}")
                if run >= RUNS_WARMUP:
                    walls.append(wall)
                    stages.append(report[PROFILE_KEY])
        finally:
            engine.shutdown()
    median = {stage: statistics.median(s[stage] for s in stages) for stage in stages[0]}
    wall = statistics.median(walls)
    line = (f"- {name}, k = {k}, blend r = {ratio} inside SGLang with the plugin's profile "
            f"(BLENDGATE_SGLANG_PROFILE=1, {runs} runs), median ms: request wall {wall:.2f}; the plugin's forward "
            f"hook {median['hook_wall']:.2f} (host planning {median['plan']:.2f}, GPU {median['gpu']:.2f}: prefill "
            f"{median['prefill']:.2f}, KV written into SGLang's pool {median['kv_write']:.2f}, SGLang's logits "
            f"{median['logits']:.2f}); SGLang's own path around it {wall - median['hook_wall']:.2f}")
    print(line, flush=True)
    return [line]
