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
- "SpeCache 1/N": engine/specache.py's eager step with a GPU budget of C/N pairs (sinks 4, recent window of
  two groups, the rest top-k by the low-bit keys), the full KV in pinned host memory.
Rows give tokens/s (steps / synchronised wall time after warm-up), SpeCache's host milliseconds a step (the
time to queue its kernels: near 1000 / tokens/s, the eager step is launch-bound), GPU KV bytes per request
(full: C pairs; SpeCache: gpu_kv_bytes), the prefetch hit rate, and the most concurrent requests of
`--concurrent-context` tokens that fit the GPU memory left after the weights (and, for SpeCache, the host
memory for their full KV), from those per-request bytes.

Quality (`--quality`, SmolLM2-135M-Instruct's real weights from a GGUF, `--device cpu` for a smoke run):
NQ-open questions (../shared/data/qa/nq-open-oracle.dev.jsonl.gz) with k passages, the gold one at depth
(question number mod k) / k among the others (a needle in a haystack of NQ passages: `--k 40`; NQ-open at
`--k 20`), greedy answers of `--new-tokens` tokens with full KV, SpeCache at each budget, and plain eviction
of the same number of pairs (the sinks and a recent window of the budget, one top-k pair left: StreamingLLM's
window); accuracy = an answer's normalised text contains a gold answer's, with a bootstrap 95% interval, the
share of answers token for token equal to full KV's, the mean share of full KV's tokens an answer begins
with, and the KL divergence of the first decode step's next-token distribution from full KV's (the same input
for every variant; with a bootstrap 95% interval): closer measures where the small model rarely knows.

    python bench/specache.py --bytes --out bench/results/specache-bytes-DATE.md
    python bench/specache.py --contexts 16384 32768 65536 --out bench/results/specache-DATE.md
    python bench/specache.py --quality --k 20 --questions 200 --out bench/results/specache-quality-DATE.md
    python bench/specache.py --quality --k 40 --questions 200 --out bench/results/specache-needle-DATE.md
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
from datetime import date
from pathlib import Path

import torch
from blendgate.engine.batch import DecodeBatch
from blendgate.engine.decode import BatchDecoder
from blendgate.engine.kv_pool import BlockAllocator, blocks_for
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.engine.paged_kv import PagedKVPool
from blendgate.engine.specache import SpeCacheDecoder
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


def settings_for(args: argparse.Namespace, fraction: float) -> SpeCacheSettings:
    """SpeCache at a budget of `fraction` of the context with `--bits` and `--group` (a window of two groups)."""
    return SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_fraction=fraction, bits=args.bits,
                            group=args.group, recent_tokens=max(64, 2 * args.group))


def variant(args: argparse.Namespace, n: int) -> str:
    return f"SpeCache 1/{n}, {args.bits}-bit keys, group {args.group}"


def full_kv_rate(model: LlamaFamilyModel, context: int, steps: int, warmup: int) -> float:
    total = context + warmup + steps + 1
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

    for _ in range(warmup):
        step()
    return steps / synced(model.device, lambda: [step() for _ in range(steps)])


def specache_rate(model: LlamaFamilyModel, context: int, settings: SpeCacheSettings, steps: int,
                  warmup: int) -> tuple[float, float, float, int]:
    """tokens/s, host milliseconds a step (the decode call's own time: the step never waits for the device, so
    this is the time to queue its kernels; near the step's whole time, the step is bound by the host's
    launches), prefetch hit rate, host bytes per request."""
    budget = settings.budget(context)
    allocator = BlockAllocator(blocks_for(budget.tokens) + 1, 1)
    pool = PagedKVPool(model, allocator.num_blocks, 1, blocks_for(budget.tokens))
    decoder = SpeCacheDecoder(model, pool, settings)
    cache = model.new_cache(context)
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = context
    request = decoder.admit(0, allocator.allocate(0, budget.tokens), cache, warmup + steps + 1)
    del cache
    state = {"token": 0, "host": 0.0}

    def step() -> None:
        batch = decoder.batch([0], [state["token"]])
        started = time.perf_counter()
        logits = decoder.decode(batch)
        state["host"] += time.perf_counter() - started
        state["token"] = int(logits.argmax(dim=-1)[0])

    for _ in range(warmup):
        step()
    state["host"] = 0.0
    rate = steps / synced(model.device, lambda: [step() for _ in range(steps)])
    return rate, 1000 * state["host"] / steps, request.stats.hit_rate, request.host.bytes


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
               f"prefetch hit rate | most {args.concurrent_context}-token requests that fit |",
               "|---|---|---|---|---|---|---|---|---|"]
    pair = kv_shape(model).pair_bytes
    for context in args.contexts:
        with torch.inference_mode():
            full = full_kv_rate(model, context, args.steps, 3)
            torch.cuda.empty_cache() if model.device.type == "cuda" else None
            full_bytes = context * pair
            fit = gpu_free // (args.concurrent_context * pair) if gpu_free else "-"
            report.append(f"| {context} | full KV | {full:.1f} | 1.00 | - | {full_bytes / 2**20:.0f} | 1.0 | - | "
                          f"{fit} |")
            print(report[-1], flush=True)
            for n in args.fractions:
                settings = settings_for(args, 1 / n)
                gpu_bytes = gpu_kv_bytes(settings, context, kv_shape(model)).total
                rate, host_ms, hit_rate, host_bytes = specache_rate(model, context, settings, args.steps, 3)
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                scale = args.concurrent_context / context  # the bytes of one concurrent request, GPU and host
                fit = f"{int(min(gpu_free // (gpu_bytes * scale), host_total // (host_bytes * scale)))}" \
                    if gpu_free else "-"
                report.append(f"| {context} | {variant(args, n)} | {rate:.1f} | {rate / full:.2f} | {host_ms:.2f} | "
                              f"{gpu_bytes / 2**20:.0f} | {full_bytes / gpu_bytes:.1f} | {hit_rate:.3f} | {fit} |")
                print(report[-1], flush=True)
    report.append("")
    report.append(f"- weights {weight_bytes / 2**30:.1f} GiB; GPU memory free after them {gpu_free / 2**30:.1f} GiB; "
                  f"host memory {host_total / 2**30:.0f} GiB")


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
    from blendgate.engine.runner import LlamaRunner
    from blendgate.engine.weights import load_model
    from quality import bootstrap

    loaded = load_model(args.smollm, dtype="float32" if args.device == "cpu" else "bfloat16", device=args.device,
                        cache_dir=Path("/tmp/blendgate-specache"))
    runner, tokenizer = LlamaRunner(loaded), loaded.tokenizer
    variants: dict[str, object] = {"full KV": lambda length: None}
    for n in args.fractions:
        variants[variant(args, n)] = lambda length, n=n: settings_for(args, 1 / n)
        variants[f"eviction 1/{n}"] = lambda length, n=n: evicting(settings_for(args, 1 / n).budget(length).tokens)
    # [question number, 1.0 when right, 1.0 when the answer is full KV's, share of full KV's tokens it begins with,
    #  KL(full KV || variant) of the first decode step's next-token distribution]
    correct: dict[str, list[list]] = {name: [] for name in variants}
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
            logits, state = runner.prefill(Prompt.plain(ids))  # one prefill; full KV (which grows it) goes last
        answered = {name: greedy(runner, int(logits.argmax()), state, args.new_tokens, settings(len(ids)))
                    for name, settings in reversed(variants.items())}
        full, full_log_p = answered["full KV"]
        for name, (tokens, log_p) in answered.items():
            kl = float((full_log_p.exp() * (full_log_p - log_p)).sum())
            agreed = next((i for i, (a, b) in enumerate(zip(tokens, full)) if a != b), len(full))
            correct[name].append([number, float(contains(tokenizer.decode(tokens), answers)),
                                  float(tokens == full), agreed / len(full), kl])
        print(f"{len(lengths)} ({len(ids)} tokens): " + ", ".join(
            f"{n} right {sum(r[1] for r in rows):.0f} as full KV {sum(r[2] for r in rows):.0f} "
            f"prefix {sum(r[3] for r in rows) / len(rows):.2f} KL {sum(r[4] for r in rows) / len(rows):.3f}"
            for n, rows in correct.items()), flush=True)
    report += [f"- {len(lengths)} questions, k = {args.k}, prompt tokens {min(lengths)}-{max(lengths)} "
               f"(mean {sum(lengths) / len(lengths):.0f}); {args.new_tokens} new tokens, greedy", "",
               "| variant | accuracy | 95% interval | answers equal to full KV's | full KV's tokens kept before the "
               "first difference | KL from full KV, first decode step | 95% interval |",
               "|---|---|---|---|---|---|---|"]
    for name, rows in correct.items():
        low, high = bootstrap({name: rows}, lambda v, name=name: sum(r[1] for r in v[name]) / len(v[name]))
        same, prefix, kl = (sum(r[i] for r in rows) / len(rows) for i in (2, 3, 4))
        kl_low, kl_high = bootstrap({name: rows}, lambda v, name=name: sum(r[4] for r in v[name]) / len(v[name]))
        report.append(f"| {name} | {sum(r[1] for r in rows) / len(rows):.3f} | {low:.3f}-{high:.3f} | {same:.3f} | "
                      f"{prefix:.3f} | {kl:.4f} | {kl_low:.4f}-{kl_high:.4f} |")


def evicting(tokens: int) -> SpeCacheSettings:
    """Plain eviction of a budget of `tokens` pairs (StreamingLLM): the sinks and a recent window of all but
    one pair, which the policy's top-k keeps (a budget always has one)."""
    return SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=tokens, recent_tokens=tokens - 5)


def greedy(runner, first: int, state, new_tokens: int,
           settings: SpeCacheSettings | None) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after a prefill (its first token and KVState), and the log-probabilities [vocab] of the
    first decode step (the first step that reads the budget; the same input for every variant): full KV
    (settings None) decodes on the prefill's own cache, SpeCache admits a copy of it."""
    out, first_step = [first], None
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
            if first_step is None:
                first_step = logits.float().log_softmax(-1)
            out.append(int(logits.argmax()))
    return out, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", help="bench/ttft.py's architecture name (speed mode)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--fractions", type=int, nargs="+", default=[16, 20], help="budgets of 1/N of the context")
    parser.add_argument("--bits", type=int, default=1, choices=[1, 2], help="low-bit keys' bits")
    parser.add_argument("--group", type=int, default=64, choices=[32, 64], help="low-bit keys' group (tokens)")
    parser.add_argument("--bytes", action="store_true", help="only the GPU KV bytes per request (no model)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--concurrent-context", type=int, default=32768)
    parser.add_argument("--smoke", action="store_true", help="speed mode on CPU with a small random model")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--smollm", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF (quality mode)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", type=Path, default=DATA / "nq-open-oracle.dev.jsonl.gz")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=16, help="at least 2 (quality mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None,
                        help="quality mode: start no question after this long (at least one runs); the report covers those done")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = (f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else "CPU, ") + \
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.node()}"
    mode = "quality" if args.quality else "GPU KV bytes" if args.bytes else "speed and memory"
    report = [f"# SpeCache benchmark ({mode}), "
              f"{date.today().isoformat()}", "", f"- command: `python bench/specache.py {' '.join(sys.argv[1:])}`",
              f"- device: {device}", ""]
    if args.quality:
        quality(args, report)
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
