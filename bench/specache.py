"""SpeCache (engine/specache.py) against full KV: decode speed and GPU KV memory per request, and quality.

The low-bit keys default to the eightfold settings (specache_policy.SpeCacheSettings.eightfold: 1-bit keys in
groups of 64 tokens, a recent window of 128) at budgets of 1/16 and 1/20 of the context; `--bits 2 --group 32`
and `--fractions 10` give the engine's defaults.

Bytes (`--bytes`, any machine, instant): the GPU KV bytes per request as the issue's bar counts them
(specache_policy.gpu_kv_bytes: the budget's full-precision pairs, the low-bit keys' codes and scales, the
residency table) against bf16 full KV, for Llama-3-8B's shapes at each context and each bits/group/budget.

Speed (the default mode; for the H200): random bf16 weights of a real architecture's config (Llama-3-8B by
default), one request per context length C, its KV random (decode speed does not depend on its values):
- "full KV": engine/decode.py's BatchDecoder at batch 1, every pair on the GPU, graph-captured;
- "SpeCache 1/N": engine/specache.py's step with a GPU budget of C/N pairs (sinks 4, recent window of
  two groups, the rest top-k by the low-bit keys), the full KV in pinned host memory; steady from the first
  step (C > the budget), so it replays a CUDA graph (engine/specache_graph.py) after the first.
Rows give tokens/s (steps / synchronised wall time after warm-up), SpeCache's host milliseconds a step (the
decode call's own time: a graph replay and the host's bookkeeping), GPU KV bytes per request
(full: C pairs; SpeCache: gpu_kv_bytes), the prefetch hit rate, and the most concurrent requests of
`--concurrent-context` tokens that fit the GPU memory left after the weights (and, for SpeCache, the host
memory for their full KV), from those per-request bytes.

With `--locality-measured HIT_RATE COPIED_SHARE` (what `--locality` measured), a second table gives the pairs
copied from the host a step and their bytes, measured with random weights (whose top-k changes every step),
and estimated at that locality (the step time less the residency update's time difference, timed alone).

Locality (`--locality`, SmolLM2-135M-Instruct's real weights, `--device cpu` works): NQ-open prompts of `--k`
passages decoded `--new-tokens` greedy tokens with SpeCache at each budget; per step, the prefetch hit rate and
the pairs copied per layer and KV head.

Quality (`--quality`, SmolLM2-135M-Instruct's real weights from a GGUF, `--device cpu` for a smoke run):
NQ-open questions (../shared/data/qa/nq-open-oracle.dev.jsonl.gz) with k passages, the gold one at depth
(question number mod k) / k among the others (a needle in a haystack of NQ passages: `--k 40`; NQ-open at
`--k 20`), greedy answers of `--new-tokens` tokens with full KV, SpeCache at each budget, and plain eviction
of the same number of pairs (the sinks and a recent window of the budget, one top-k pair left: StreamingLLM's
window); accuracy = an answer's normalised text contains a gold answer's, with a bootstrap 95% interval, the
share of answers token for token equal to full KV's, the mean share of full KV's tokens an answer begins
with, the KL divergence of the first decode step's next-token distribution from full KV's (the same input
for every variant), and its mean over the answer's steps with each variant fed full KV's greedy tokens
(teacher-forced, so every step compares the same input; this is what `--select-every` changes: its first step
always selects), each with a bootstrap 95% interval: closer measures where the small model rarely knows.

Where the time goes (`--profile`, speed mode on CUDA): torch.profiler's kernel table a step, full KV and each
SpeCache row at the first context.

    python bench/specache.py --bytes --out bench/results/specache-bytes-DATE.md
    python bench/specache.py --contexts 16384 32768 65536 --out bench/results/specache-DATE.md
    python bench/specache.py --quality --k 20 --questions 200 --out bench/results/specache-quality-DATE.md
    python bench/specache.py --quality --k 40 --questions 200 --out bench/results/specache-needle-DATE.md
    python bench/specache.py --locality --device cpu --k 50 --questions 3 --new-tokens 24
    python bench/specache.py --contexts 16384 32768 65536 --locality-measured 0.549 0.452
    python bench/specache.py --smoke   # CPU: a small random model, short contexts (checks that it runs)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from blendgate.engine.batch import DecodeBatch
from blendgate.engine.decode import BatchDecoder
from blendgate.engine.kv_pool import BlockAllocator, blocks_for
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.engine.paged_kv import PagedKVPool
from blendgate.engine.specache import OffloadedRequest, SpeCacheDecoder
from blendgate.engine.specache_policy import KVShape, SpeCacheSettings, gpu_kv_bytes

# The question sets' folder: ../shared/data/qa beside the checkout, or BLENDGATE_QA_DATA (the GPU machine).
DATA = Path(os.environ.get("BLENDGATE_QA_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"
                           / "qa"))
SMOKE_CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)


def synced(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def kv_shape(model: LlamaFamilyModel) -> KVShape:
    return KVShape(model.num_layers, model.kv_heads, model.head_dim, model.dtype.itemsize)


class Budget(NamedTuple):
    """One SpeCache row: a budget of 1/n of the context, a step selecting `share` of its top-k slots
    (SpeCacheSettings.selected_share), the steps selecting every `every` steps (SpeCacheSettings.select_every)."""

    n: int
    share: float = 1.0
    every: int = 1
    speculate: bool = False  # SpeCacheSettings.speculate
    holds: bool = False  # speed mode, speculating: every guess confirmed (specache_rate's `holds`)


def settings_for(args: argparse.Namespace, row: Budget) -> SpeCacheSettings:
    """SpeCache at `row`'s budget with `--bits` and `--group` (a window of two groups)."""
    return SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_fraction=1 / row.n, bits=args.bits,
                            group=args.group, recent_tokens=max(64, 2 * args.group), selected_share=row.share,
                            select_every=row.every, speculate=row.speculate)


def variant(args: argparse.Namespace, row: Budget) -> str:
    selecting = "" if row.share == 1 else f", selecting {row.share:g} of the top-k"
    every = "" if row.every == 1 else f", every {row.every} steps"
    speculating = ", speculative token" if row.speculate else ""
    speculating += ", every guess holding" if row.holds else ""
    return f"SpeCache 1/{row.n}, {args.bits}-bit keys, group {args.group}{selecting}{every}{speculating}"


def budgets(args: argparse.Namespace) -> list[Budget]:
    """The SpeCache rows: every --fractions with every --selected-shares and every --select-every, and with
    --speculate each --fractions and --selected-shares speculating (and, --speculation-holds in speed mode, with
    every guess confirmed)."""
    rows = [Budget(n, share, every) for n in args.fractions for share in args.selected_shares
            for every in args.select_every]
    return rows + [Budget(n, share, 1, True, holds) for n in args.fractions for share in args.selected_shares
                   for holds in (False, True) if args.speculate and (not holds or args.speculation_holds
                                                                      and not (args.quality or args.locality))]


def full_kv_stepper(model: LlamaFamilyModel, context: int, steps: int):
    """One request of `context` random pairs on engine/decode.py's BatchDecoder at batch 1 (graph-captured
    where it can be), with room for `steps` more: returns its one-step callable."""
    total = context + steps + 1
    allocator = BlockAllocator(blocks_for(total) + 1, 1)
    pool = PagedKVPool(model, allocator.num_blocks, 1, blocks_for(total))
    pool.keys.normal_()
    pool.values.normal_()
    decoder = BatchDecoder(model, pool, 1, total)
    allocation = allocator.allocate(0, total)
    pool.write_table(allocation)
    state = {"position": context, "token": 0}

    def step() -> None:
        p = state["position"]
        logits = decoder.decode(DecodeBatch((0,), (state["token"],), (p,), (allocation.slot(p),),
                                            (allocation.row,)))
        state["token"], state["position"] = int(logits.argmax(dim=-1)[0]), p + 1

    return step


def full_kv_rate(model: LlamaFamilyModel, context: int, steps: int, warmup: int) -> float:
    step = full_kv_stepper(model, context, warmup + steps)
    for _ in range(warmup):
        step()
    return steps / synced(model.device, lambda: [step() for _ in range(steps)])


@dataclass
class SpeCacheRun:
    """One SpeCache row's measurements, from `specache_rate` to the speed table."""

    rate: float  # tokens/s
    host_ms: float  # the decode call's own time a step (the time to queue its work, or to replay its graph)
    hit_rate: float  # prefetch hit rate
    copied_share: float  # pairs copied from the host a step, per layer and KV head, as a share of the top-k
    host_bytes: int  # the request's host tier
    confirmed: str = "-"  # SpeCacheSettings.speculate: the share of guesses that were the next token


def random_request(model: LlamaFamilyModel, settings: SpeCacheSettings, context: int,
                   new_tokens: int) -> tuple[SpeCacheDecoder, OffloadedRequest]:
    """A SpeCacheDecoder over a pool sized for one request (id 0) of `context` random pairs, admitted with room
    for `new_tokens` more (decode speed does not depend on the KV's values)."""
    budget = settings.budget(context)
    allocator = BlockAllocator(blocks_for(budget.tokens) + 1, 1)
    pool = PagedKVPool(model, allocator.num_blocks, 1, blocks_for(budget.tokens))
    decoder = SpeCacheDecoder(model, pool, settings)
    cache = model.new_cache(context)
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = context
    return decoder, decoder.admit(0, allocator.allocate(0, budget.tokens), cache, new_tokens)


def specache_rate(model: LlamaFamilyModel, context: int, settings: SpeCacheSettings, steps: int,
                  warmup: int, holds: bool = False) -> SpeCacheRun:
    """A request of `context` random pairs decoded `warmup` + `steps` steps (steady: from CUDA graphs on
    CUDA, engine/specache_graph.py); the rate and host time over the last `steps`, the copies over all.
    `holds` (speculating): each step is fed the token the last step's guess was fed, not its own greedy token,
    so every guess is confirmed (random weights almost never guess right; decode time does not depend on the
    tokens): the time of a step whose speculation holds."""
    budget = settings.budget(context)
    decoder, request = random_request(model, settings, context, warmup + steps + 1)
    state = {"token": 0, "host": 0.0}

    def step() -> None:
        batch = decoder.batch([0], [state["token"]])
        started = time.perf_counter()
        logits = decoder.decode(batch)
        state["host"] += time.perf_counter() - started
        state["token"] = int(logits.argmax(dim=-1)[0])
        if holds and decoder.speculated(0) is not None:  # fed what the guess was fed: every guess confirmed
            state["token"] = decoder.speculated(0)

    for _ in range(warmup):
        step()
    state["host"] = 0.0
    rate = steps / synced(model.device, lambda: [step() for _ in range(steps)])
    stats = request.stats
    copied = stats.copied / (warmup + steps) / (model.num_layers * model.kv_heads) / budget.top_k
    confirmed = f"{request.confirmed / request.guessed:.3f}" if request.guessed else "-"
    return SpeCacheRun(rate, 1000 * state["host"] / steps, stats.hit_rate, copied, request.host.bytes, confirmed)


def residency_ms(model: LlamaFamilyModel, context: int, top_k: int, copies: int, repeats: int = 20) -> float:
    """Milliseconds of one residency update (kernels/residency.py: one layer's, all KV heads) that finds
    top_k - `copies` of its wanted pairs resident and copies `copies` a KV head from pinned host memory,
    timed alone with CUDA events (a fresh residency table each call, its copy included)."""
    from blendgate.kernels.residency import ResidencyScratch, make_resident

    heads, dim, device = model.kv_heads, model.head_dim, model.device
    host_keys, host_values = (torch.randn(heads, context, dim, dtype=model.dtype).pin_memory() for _ in range(2))
    pool_keys, pool_values = (torch.zeros(heads, top_k, dim, dtype=model.dtype, device=device) for _ in range(2))
    order = torch.stack([torch.randperm(context, device=device) for _ in range(heads)])
    resident = order[:, :top_k].contiguous()
    wanted = torch.cat([order[:, copies:top_k], order[:, top_k: top_k + copies]], dim=1).contiguous()
    table, targets = resident.clone(), torch.arange(top_k, device=device)
    counts = torch.zeros(2, dtype=torch.long, device=device)
    scratch = ResidencyScratch.empty(heads, context, top_k, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):  # the first round compiles, the second is timed
        start.record()
        for _ in range(repeats):
            table.copy_(resident)
            make_resident(wanted, table, targets, host_keys, host_values, pool_keys, pool_values, counts, scratch)
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def speed(args: argparse.Namespace, report: list[str]) -> None:
    if args.smoke:
        from transformers import AutoConfig

        spec = dict(SMOKE_CONFIG)
        model = LlamaFamilyModel.random(AutoConfig.for_model(spec.pop("model_type"), **spec), device="cpu",
                                        dtype=torch.float32)
        weight_bytes = 0
    else:
        if not torch.cuda.is_available():
            sys.exit("the speed mode needs a CUDA GPU (or --smoke on CPU)")
        from ttft import random_model  # bench/ is on sys.path when this runs as a script

        hf = random_model(args.model)
        model = LlamaFamilyModel.from_transformers(hf)
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    gpu_free = torch.cuda.mem_get_info()[0] if model.device.type == "cuda" else 0
    host_total = _host_memory()
    report += ["| context | row | tokens/s | x full KV | host ms a step | GPU KV MiB per request | x smaller | "
               f"prefetch hit rate | guesses confirmed | most {args.concurrent_context}-token requests that fit |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    pair = kv_shape(model).pair_bytes
    copies: list[str] = []  # the copy-volume table's rows
    for context in args.contexts:
        with torch.inference_mode():
            full = full_kv_rate(model, context, args.steps, 3)
            torch.cuda.empty_cache() if model.device.type == "cuda" else None
            full_bytes = context * pair
            fit = gpu_free // (args.concurrent_context * pair) if gpu_free else "-"
            report.append(f"| {context} | full KV | {full:.1f} | 1.00 | - | {full_bytes / 2**20:.0f} | 1.0 | - | - | "
                          f"{fit} |")
            print(report[-1], flush=True)
            for row in budgets(args):
                settings = settings_for(args, row)
                gpu_bytes = gpu_kv_bytes(settings, context, kv_shape(model)).total
                run = specache_rate(model, context, settings, args.steps, 3, row.holds)
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                scale = args.concurrent_context / context  # the bytes of one concurrent request, GPU and host
                fit = f"{int(min(gpu_free // (gpu_bytes * scale), host_total // (run.host_bytes * scale)))}" \
                    if gpu_free else "-"
                report.append(f"| {context} | {variant(args, row)} | {run.rate:.1f} | {run.rate / full:.2f} | "
                              f"{run.host_ms:.2f} | {gpu_bytes / 2**20:.0f} | {full_bytes / gpu_bytes:.1f} | "
                              f"{run.hit_rate:.3f} | {run.confirmed} | {fit} |")
                print(report[-1], flush=True)
                if args.locality_measured and model.device.type == "cuda" and row == Budget(row.n):  # measured so
                    copies += copy_rows(args, model, context, row.n, settings.budget(context).top_k, run, full)
            if args.profile and model.device.type == "cuda" and context == args.contexts[0]:
                for row in budgets(args):
                    profile_table(args, model, context, row, full_kv_stepper(model, context, 2 * args.steps + 8),
                                  report)
                    torch.cuda.empty_cache()
    report.append("")
    report.append(f"- weights {weight_bytes / 2**30:.1f} GiB; GPU memory free after them {gpu_free / 2**30:.1f} GiB; "
                  f"host memory {host_total / 2**30:.0f} GiB")
    if copies:
        hit_rate, share = args.locality_measured
        report += ["", "Copy volume. Random weights give a top-k that changes every step (the prefetch hit rate "
                   "above); real attention has temporal locality. The rows 'at SmolLM2's locality' take the hit rate "
                   f"{hit_rate:.3f} and the pairs copied a step ({share:.3f} of the top-k per layer and KV head) "
                   f"MEASURED on SmolLM2-135M's real weights ({args.locality_source}), and ESTIMATE the step: the "
                   "random-weight step's measured time minus, per layer, the difference of the residency update's "
                   "time (kernels/residency.py, timed alone on this GPU) between the two copy volumes. Estimates, "
                   "not measurements of decoding at that locality.", "",
                   "| context | row | pairs copied a step per layer and KV head | copy MiB a step | residency update "
                   "ms a layer | step ms | tokens/s | x full KV |", "|---|---|---|---|---|---|---|---|", *copies]


def profile_table(args: argparse.Namespace, model: LlamaFamilyModel, context: int, row: Budget,
                  full_step, report: list[str]) -> None:
    """Where a step's device time goes (`--profile`): torch.profiler over `args.steps` steps of full KV and of
    SpeCache at `row` (graph replays included: CUPTI reports the kernels inside a graph), the kernels
    grouped by name, the largest first, in microseconds a step."""
    from torch.profiler import ProfilerActivity, profile

    settings = settings_for(args, row)
    decoder, request = random_request(model, settings, context, 3 + args.steps + 1)
    token = [0]

    def specache_step() -> None:
        token[0] = int(decoder.decode(decoder.batch([0], [token[0]])).argmax(dim=-1)[0])

    for label, step in (("full KV", full_step), (variant(args, row), specache_step)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
        rows.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in rows) / args.steps
        report += ["", f"Device time a step at {context} tokens, {label}: {total:.0f} us of kernels and copies "
                   "(torch.profiler, CUDA activity; the largest 15 by name)", "",
                   "| kernel or copy | calls a step | us a step | share |", "|---|---|---|---|"]
        for e in rows[:15]:
            us = e.self_device_time_total / args.steps
            report.append(f"| {e.key[:90].replace('|', '/')} | {e.count / args.steps:.1f} | {us:.0f} | "
                          f"{us / total:.2f} |")
        print("\n".join(report[-18:]), flush=True)


def copy_rows(args: argparse.Namespace, model: LlamaFamilyModel, context: int, n: int, top_k: int,
              run: SpeCacheRun, full: float) -> list[str]:
    """The copy-volume table's two rows of a SpeCache variant: measured with random weights, and estimated at
    the locality measured on SmolLM2 (`--locality-measured`)."""
    _, share = args.locality_measured
    heads, pair_head = model.num_layers * model.kv_heads, 2 * model.head_dim * model.dtype.itemsize
    random_copies, real_copies = run.copied_share * top_k, share * top_k
    random_ms = residency_ms(model, context, top_k, min(top_k, round(random_copies)))
    real_ms = residency_ms(model, context, top_k, min(top_k, round(real_copies)))
    step_ms = 1000 / run.rate
    estimate = step_ms - model.num_layers * (random_ms - real_ms)
    return [f"| {context} | {variant(args, Budget(n))}, random weights (measured) | {random_copies:.0f} | "
            f"{random_copies * heads * pair_head / 2**20:.0f} | {random_ms:.3f} | {step_ms:.2f} | {run.rate:.1f} | "
            f"{run.rate / full:.2f} |",
            f"| {context} | {variant(args, Budget(n))}, at SmolLM2's locality (ESTIMATED step) | {real_copies:.0f} | "
            f"{real_copies * heads * pair_head / 2**20:.0f} | {real_ms:.3f} | {estimate:.2f} | {1000 / estimate:.1f} | "
            f"{1000 / estimate / full:.2f} |"]


def bytes_table(args: argparse.Namespace, report: list[str]) -> None:
    """The bar's count (gpu_kv_bytes) for `--model`'s shapes at each context, for 1- and 2-bit keys in groups
    of 32 and 64 at each `--fractions` budget."""
    from ttft import ARCHITECTURES

    spec = ARCHITECTURES[args.model]
    heads = spec["num_attention_heads"]
    shape = KVShape(spec["num_hidden_layers"], spec.get("num_key_value_heads", heads),
                    spec.get("head_dim", spec["hidden_size"] // heads))
    report += [f"- {args.model}: {shape.layers} layers, {shape.kv_heads} KV heads, head_dim {shape.head_dim}, "
               "bf16; a request's GPU KV bytes (engine/specache_policy.gpu_kv_bytes) against its full KV", "",
               "| context | bits | group | budget | budget MiB | low-bit codes MiB | scales MiB | residency MiB | "
               "total MiB | full KV MiB | x smaller |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for context in args.contexts:
        for bits in (1, 2):
            for group in (32, 64):
                for n in args.fractions:
                    settings = SpeCacheSettings(gpu_budget_fraction=1 / n, bits=bits, group=group,
                                                recent_tokens=max(64, 2 * group))
                    b = gpu_kv_bytes(settings, context, shape)
                    mib = [f"{x / 2**20:.1f}" for x in (b.budget, b.codes, b.scales, b.residency, b.total, b.full)]
                    report.append(f"| {context} | {bits} | {group} | 1/{n} | {' | '.join(mib)} | {b.smaller:.2f} |")


def _host_memory() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


# -- quality ---------------------------------------------------------------------------------------------
def contains(prediction: str, answers: list[str]) -> bool:
    from quality import normalise  # bench/quality.py's SQuAD normalisation

    said = normalise(prediction)
    return any(normalise(a) and normalise(a) in said for a in answers)


def items(path: Path, count: int, k: int, seed: int) -> list[tuple[str, list[str], list[str]]]:
    """(question, answers, passages): the gold passage at depth (number mod k) / k among k - 1 others."""
    with gzip.open(path, "rt") as lines:
        rows = [json.loads(line) for line in lines]
    passages = [f"{r['ctxs'][0]['title']}. {r['ctxs'][0]['text']}" for r in rows]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out = []
    for number, i in enumerate(order[:count]):
        others = [passages[j] for j in order[count:] if passages[j] != passages[i]]
        haystack = random.Random(seed + number).sample(others, k - 1)
        haystack.insert(number % k, passages[i])
        out.append((rows[i]["question"], rows[i]["answers"], haystack))
    return out


def quality(args: argparse.Namespace, report: list[str]) -> None:
    from blendgate.engine.prompt import Prompt
    from blendgate.engine.runner import KVState, LlamaRunner
    from blendgate.engine.weights import load_model
    from quality import bootstrap

    loaded = load_model(args.smollm, dtype="float32" if args.device == "cpu" else "bfloat16", device=args.device,
                        cache_dir=Path("/tmp/blendgate-specache"))
    runner, tokenizer = LlamaRunner(loaded), loaded.tokenizer
    variants: dict[str, object] = {"full KV": lambda length: None}
    for row in budgets(args):
        variants[variant(args, row)] = lambda length, row=row: settings_for(args, row)
    for n in args.fractions:
        variants[f"eviction 1/{n}"] = lambda length, n=n: evicting(settings_for(args, Budget(n)).budget(length).tokens)
    # [question number, 1.0 when right, 1.0 when the answer is full KV's, share of full KV's tokens it begins with,
    #  KL(full KV || variant) of the first decode step's next-token distribution, and its mean over the steps
    #  fed full KV's tokens]
    correct: dict[str, list[list]] = {name: [] for name in variants}
    guessed: dict[str, list[int]] = {}  # a variant's guesses and those confirmed (free-running)
    lengths = []
    started = time.perf_counter()
    for number, (question, answers, passages) in enumerate(items(args.data, args.questions, args.k, args.seed)):
        if lengths and args.seconds is not None and time.perf_counter() - started > args.seconds:
            print(f"stopped after {args.seconds:.0f} s: {number} of {args.questions} questions", flush=True)
            break
        documents = "\n\n".join(passages)
        messages = [{"role": "system", "content": "Answer the question using only the documents given."},
                    {"role": "user", "content": f"Documents:\n\n{documents}\n\nQuestion: {question}\nAnswer briefly."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        lengths.append(len(ids))
        with torch.inference_mode():
            logits, state = runner.prefill(Prompt.plain(ids))
            full_state = KVState(state.cache.clone(), state.length)  # full KV grows its cache: a copy
        first = int(logits.argmax())
        full, full_log_p = greedy(runner, first, full_state, args.new_tokens, None)
        for name, settings in variants.items():
            if name == "full KV":
                tokens, log_p = full, full_log_p
            else:  # free-running for the answer; fed full KV's tokens for the KL of every step
                tokens, _ = greedy(runner, first, state, args.new_tokens, settings(len(ids)),
                                   guesses=guessed.setdefault(name, [0, 0]))
                _, log_p = greedy(runner, first, state, args.new_tokens, settings(len(ids)), forced=full)
            kls = [float((f.exp() * (f - v)).sum()) for f, v in zip(full_log_p, log_p)]
            agreed = next((i for i, (a, b) in enumerate(zip(tokens, full)) if a != b), len(full))
            correct[name].append([number, float(contains(tokenizer.decode(tokens), answers)),
                                  float(tokens == full), agreed / len(full), kls[0], sum(kls) / len(kls)])
        print(f"{len(lengths)} ({len(ids)} tokens): " + ", ".join(
            f"{n} right {sum(r[1] for r in rows):.0f} as full KV {sum(r[2] for r in rows):.0f} "
            f"prefix {sum(r[3] for r in rows) / len(rows):.2f} KL {sum(r[4] for r in rows) / len(rows):.3f} "
            f"steps' KL {sum(r[5] for r in rows) / len(rows):.3f}"
            for n, rows in correct.items()), flush=True)
    report += [f"- {len(lengths)} questions, k = {args.k}, prompt tokens {min(lengths)}-{max(lengths)} "
               f"(mean {sum(lengths) / len(lengths):.0f}); {args.new_tokens} new tokens, greedy; the steps' KL: each "
               "variant fed full KV's greedy tokens, KL(full KV || variant) of each decode step's next-token "
               "distribution, the mean over the steps", "",
               "| variant | accuracy | 95% interval | answers equal to full KV's | full KV's tokens kept before the "
               "first difference | KL from full KV, first decode step | 95% interval | KL, mean over the steps | "
               "95% interval |",
               "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in correct.items():
        low, high = bootstrap({name: rows}, lambda v, name=name: sum(r[1] for r in v[name]) / len(v[name]))
        same, prefix, kl, steps_kl = (sum(r[i] for r in rows) / len(rows) for i in (2, 3, 4, 5))
        kl_low, kl_high = bootstrap({name: rows}, lambda v, name=name: sum(r[4] for r in v[name]) / len(v[name]))
        steps_low, steps_high = bootstrap({name: rows},
                                          lambda v, name=name: sum(r[5] for r in v[name]) / len(v[name]))
        report.append(f"| {name} | {sum(r[1] for r in rows) / len(rows):.3f} | {low:.3f}-{high:.3f} | {same:.3f} | "
                      f"{prefix:.3f} | {kl:.4f} | {kl_low:.4f}-{kl_high:.4f} | {steps_kl:.4f} | "
                      f"{steps_low:.4f}-{steps_high:.4f} |")
    report.append("")
    for name, (guesses, confirmed) in guessed.items():
        if guesses:
            report.append(f"- {name}: {confirmed} of {guesses} guesses were the next token "
                          f"({confirmed / guesses:.3f}; free-running answers)")


def locality(args: argparse.Namespace, report: list[str]) -> None:
    """The prefetch hit rate real attention gives: SmolLM2's real weights over NQ-open prompts of `--k`
    passages, SpeCache at each budget decoding `--new-tokens` greedy tokens; per step, the share of the top-k
    pairs it wanted that the previous step's prediction had made resident (the first step after admission has
    nothing prefetched: reported apart), and the pairs copied from the host per layer and KV head."""
    from blendgate.engine.prompt import Prompt
    from blendgate.engine.runner import LlamaRunner
    from blendgate.engine.weights import load_model

    loaded = load_model(args.smollm, dtype="float32" if args.device == "cpu" else "bfloat16", device=args.device,
                        cache_dir=Path("/tmp/blendgate-specache"))
    runner, tokenizer = LlamaRunner(loaded), loaded.tokenizer
    model = runner.model
    heads = model.num_layers * model.kv_heads
    report += ["| variant | question | prompt tokens | top-k | first step: hit rate | later steps: hit rate | "
               "later steps: pairs copied a step per layer and KV head |", "|---|---|---|---|---|---|---|"]
    totals: dict[str, list[int]] = {}
    for number, (question, _, passages) in enumerate(items(args.data, args.questions, args.k, args.seed)):
        messages = [{"role": "system", "content": "Answer the question using only the documents given."},
                    {"role": "user", "content": f"Documents:\n\n{chr(10).join(passages)}\n\nQuestion: {question}\n"
                                                "Answer briefly."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits, state = runner.prefill(Prompt.plain(ids))
            for row in budgets(args):
                settings = settings_for(args, row)
                budget = settings.budget(len(ids))
                allocator = BlockAllocator(blocks_for(budget.tokens) + 1, 1)
                pool = PagedKVPool(model, allocator.num_blocks, 1, blocks_for(budget.tokens))
                decoder = SpeCacheDecoder(model, pool, settings)
                request = decoder.admit(0, allocator.allocate(0, budget.tokens), state.cache, args.new_tokens)
                token, steps = int(logits.argmax()), []
                for _ in range(args.new_tokens):
                    before = request.stats
                    token = int(decoder.decode(decoder.batch([0], [token]))[0].argmax())
                    after = request.stats
                    steps.append((after.wanted - before.wanted, after.hits - before.hits,
                                  after.copied - before.copied))
                first, later = steps[0], [sum(c) for c in zip(*steps[1:])]
                name = variant(args, row)
                total = totals.setdefault(name, [0, 0, 0, 0])  # wanted, hits, copied, top-k pairs of the steps
                total[0], total[1] = total[0] + later[0], total[1] + later[1]
                total[2], total[3] = total[2] + later[2], total[3] + (len(steps) - 1) * budget.top_k
                report.append(f"| {name} | {number} | {len(ids)} | {budget.top_k} | {first[1] / first[0]:.3f} | "
                              f"{later[1] / later[0]:.3f} | {later[2] / (len(steps) - 1) / heads:.1f} |")
                print(report[-1], flush=True)
    report += ["", "| variant | later steps: hit rate, all questions | pairs copied a step per layer and KV head, "
               "as a share of the top-k (--locality-measured's second number) |", "|---|---|---|"]
    for name, (wanted, hits, copied, top_k) in totals.items():
        report.append(f"| {name} | {hits / wanted:.3f} | {copied / top_k / heads:.3f} |")


def evicting(tokens: int) -> SpeCacheSettings:
    """Plain eviction of a budget of `tokens` pairs (StreamingLLM): the sinks and a recent window of all but
    one pair, which the policy's top-k keeps (a budget always has one)."""
    return SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=tokens, recent_tokens=tokens - 5)


def greedy(runner, first: int, state, new_tokens: int, settings: SpeCacheSettings | None,
           forced: list[int] | None = None, guesses: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens after a prefill (its first token and KVState), and each decode step's log-probabilities
    [vocab]; with `forced` (another run's tokens) each step is fed those instead of its own. Full KV (settings
    None) decodes on the prefill's own cache (it grows it), SpeCache admits a copy of it. `guesses` [2], when
    given, grows by the SpeCache request's guesses and those confirmed (SpeCacheSettings.speculate)."""
    out, log_ps = [first], []
    with torch.inference_mode():
        if settings is None:
            def step(token: int) -> torch.Tensor:
                return runner.decode(token, state).reshape(-1)
        else:
            budget = settings.budget(state.length)
            allocator = BlockAllocator(blocks_for(budget.tokens) + 1, 1)
            pool = PagedKVPool(runner.model, allocator.num_blocks, 1, blocks_for(budget.tokens))
            decoder = SpeCacheDecoder(runner.model, pool, settings)
            decoder.admit(0, allocator.allocate(0, budget.tokens), state.cache, new_tokens)

            def step(token: int) -> torch.Tensor:
                return decoder.decode(decoder.batch([0], [token]))[0]
        while len(out) < new_tokens:
            logits = step(out[-1])
            log_ps.append(logits.float().log_softmax(-1))
            out.append(forced[len(out)] if forced is not None else int(logits.argmax()))
    if guesses is not None and settings is not None:
        guesses[0] += decoder.requests[0].guessed
        guesses[1] += decoder.requests[0].confirmed
    return out, log_ps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", help="bench/ttft.py's architecture name (speed mode)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--fractions", type=int, nargs="+", default=[16, 20], help="budgets of 1/N of the context")
    parser.add_argument("--selected-shares", type=float, nargs="+", default=[1.0],
                        help="shares of the top-k slots a step selects (SpeCacheSettings.selected_share)")
    parser.add_argument("--select-every", type=int, nargs="+", default=[1],
                        help="steps between selecting steps (SpeCacheSettings.select_every)")
    parser.add_argument("--speculate", action="store_true",
                        help="also rows with SpeCache's speculative token (SpeCacheSettings.speculate) at each "
                             "--fractions and --selected-shares")
    parser.add_argument("--speculation-holds", action="store_true",
                        help="speed mode, with --speculate: also rows fed the guesses' tokens, every guess confirmed "
                             "(the step whose speculation holds; random weights almost never guess right)")
    parser.add_argument("--bits", type=int, default=1, choices=[1, 2], help="low-bit keys' bits")
    parser.add_argument("--group", type=int, default=64, choices=[32, 64], help="low-bit keys' group (tokens)")
    parser.add_argument("--bytes", action="store_true", help="only the GPU KV bytes per request (no model)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--concurrent-context", type=int, default=32768)
    parser.add_argument("--smoke", action="store_true", help="speed mode on CPU with a small random model")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--locality-measured", type=float, nargs=2, metavar=("HIT_RATE", "COPIED_SHARE"),
                        help="speed mode: a prefetch hit rate and pairs copied a step (a share of the top-k) that "
                             "--locality measured, for the copy-volume table")
    parser.add_argument("--locality-source", default="bench/results/specache-2026-11-30.md, --locality",
                        help="where --locality-measured comes from (named in the report)")
    parser.add_argument("--locality", action="store_true",
                        help="the prefetch hit rate on SmolLM2's real weights (NQ-open prompts of --k passages)")
    parser.add_argument("--smollm", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF (quality mode)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", type=Path, default=DATA / "nq-open-oracle.dev.jsonl.gz")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=16, help="at least 2 (quality mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None,
                        help="quality mode: start no question after this long (at least one runs); the report "
                             "covers those done")
    parser.add_argument("--profile", action="store_true",
                        help="speed mode: also the device time a step by kernel (torch.profiler) at the first context, "
                             "full KV and each SpeCache row")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if any(not 0 < share <= 1 for share in args.selected_shares):
        parser.error("--selected-shares are shares of the top-k slots, in (0, 1]")
    if any(every < 1 for every in args.select_every):
        parser.error("--select-every counts steps: 1 or more")
    device = (f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else "CPU, ") + \
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.node()}"
    mode = "quality" if args.quality else "prefetch locality" if args.locality else \
        "GPU KV bytes" if args.bytes else "speed and memory"
    report = [f"# SpeCache benchmark ({mode}), "
              f"{date.today().isoformat()}", "", f"- command: `python bench/specache.py {' '.join(sys.argv[1:])}`",
              f"- device: {device}", ""]
    if args.quality:
        quality(args, report)
    elif args.locality:
        locality(args, report)
    elif args.bytes:
        bytes_table(args, report)
    else:
        speed(args, report)
    print("\n".join(report))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
