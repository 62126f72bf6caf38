"""Serving under load (issue 20): open-loop Poisson arrivals against an SGLang server's `/generate`, RAG mixed
with plain chat, rates swept until saturation.

    python bench/load.py --url http://127.0.0.1:30000 --arm blendgate --rates 1 2 4 8 16 --duration 60
    python bench/load.py --url http://127.0.0.1:30001 --arm stock ...          # the same requests, no chunks
    python bench/load.py --help

Workload (`Workload`, seeded): a RAG request is a system prompt, k chunks drawn from a pool of `--chunk-pool`
chunks with Zipf-skewed popularity (rank r drawn with probability ~ 1 / r^s), and a question, answered with
`--answer-tokens` tokens; `--chat-share` of the requests are plain chat (a prompt of `--chat-tokens` random
tokens). Token ids are random over the vocabulary (SGLang's dummy weights give no meaning anyway). With
`--arm blendgate` a RAG request carries its chunk spans in `sampling_params.custom_params`
(sglang_plugin/protocol.py), so blendgate's plugin blends them from its chunk-cache; `--arm stock` sends the
same token ids without them (stock SGLang, its radix cache on, reuses exact prefixes only).

Open loop: request i is sent at the i-th arrival of a Poisson process of the rate, whatever the server's
state (a closed loop would slow down with the server and hide its queueing). Every request streams (SSE); TTFT
is the time to the first event carrying output tokens, inter-token latency (ITL) the gaps between later tokens.
Per rate: requests sent, completed and failed, TTFT p50/p99 (RAG and chat apart), ITL p50/p99, output tokens
per second, and from the workers' prefill reports (`meta_info["blendgate"]`) the chunk-cache hit rate and the
share of RAG requests blended (the rest fell back to a full prefill). The highest rate whose RAG p99 TTFT stays
within `--slo-ms` is the arm's sustained rate.

`--precompute` first sends every pool chunk once (Workload.precompute_requests), as an operator's ingestion
would: without it a short sweep measures a chunk-cache still filling, whose misses are mostly first-time misses
that a server in service for hours no longer has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import httpx
import numpy as np
from blendgate.sglang_plugin.profile import PROFILE_KEY, TIERS_KEY

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LoadRequest:
    """One request of the workload: what bench/load.py sends (the workload -> the client)."""

    kind: str  # "rag" or "chat"
    input_ids: list[int]
    chunk_spans: list[int]  # [start, end, ...] token offsets of the chunks (empty for chat)
    chunk_ids: list[int]  # which pool chunks, in order (empty for chat)
    max_new_tokens: int

    def body(self, arm: str) -> dict:
        """SGLang's /generate body; the blendgate arm carries the chunk spans for the plugin."""
        from blendgate.sglang_plugin.protocol import CHUNK_SPANS, PREFILL_MODE

        sampling: dict = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        if arm == "blendgate" and self.chunk_spans:
            sampling["custom_params"] = {CHUNK_SPANS: self.chunk_spans, PREFILL_MODE: "blend"}
        return {"input_ids": self.input_ids, "sampling_params": sampling, "stream": True}


@dataclass
class Workload:
    """The seeded request mix. Chunk i of the pool is a fixed run of random token ids; popularity by rank."""

    vocab: int = 128256
    chunk_pool: int = 2000
    chunks: int = 8
    chunk_tokens: int = 512
    system_tokens: int = 64
    question_tokens: int = 32
    answer_tokens: int = 64
    chat_share: float = 0.3
    chat_tokens: int = 256
    zipf: float = 1.1
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _pool: np.ndarray = field(init=False, repr=False)
    _system: list[int] = field(init=False, repr=False)
    _popularity: np.ndarray = field(init=False, repr=False)
    _low: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.chat_share <= 1.0:
            raise ValueError("chat_share must be between 0 and 1")
        if self.chunks > self.chunk_pool:
            raise ValueError("a request cannot hold more distinct chunks than the pool has")
        self._rng = np.random.default_rng(self.seed)
        low = min(1000, self.vocab // 2)  # ordinary tokens: the first ids of a vocabulary hold special ones
        self._pool = self._rng.integers(low, self.vocab, size=(self.chunk_pool, self.chunk_tokens))
        self._system = self._rng.integers(low, self.vocab, size=self.system_tokens).tolist()
        weights = 1.0 / np.arange(1, self.chunk_pool + 1) ** self.zipf
        self._popularity = weights / weights.sum()
        self._low = low

    def next(self) -> LoadRequest:
        rng = self._rng
        if rng.random() < self.chat_share:
            ids = rng.integers(self._low, self.vocab, size=self.chat_tokens).tolist()
            return LoadRequest("chat", ids, [], [], self.answer_tokens)
        chosen = rng.choice(self.chunk_pool, size=self.chunks, replace=False, p=self._popularity).tolist()
        return self._rag(chosen, rng, self.answer_tokens)

    def _rag(self, chosen: list[int], rng: np.random.Generator, answer_tokens: int) -> LoadRequest:
        """A RAG request: the system prompt, the pool's chunks `chosen` in order, a question drawn from `rng`."""
        ids, spans = list(self._system), []
        for chunk in chosen:
            spans += [len(ids), len(ids) + self.chunk_tokens]
            ids += self._pool[chunk].tolist()
        ids += rng.integers(self._low, self.vocab, size=self.question_tokens).tolist()
        return LoadRequest("rag", ids, spans, chosen, answer_tokens)

    def precompute_requests(self) -> list[LoadRequest]:
        """Every chunk of the pool once, `chunks` to a RAG request (the last may hold fewer), the least popular
        first, each answered with one token: what an operator's ingestion computes before the server takes
        traffic, so the sweep measures a chunk-cache in its steady state (misses where its tiers cannot hold
        the pool) rather than one still filling (first-time misses). Sent in this order, a least-recently-used
        store too small for the pool ends up holding the most popular chunks. Draws nothing from the workload's
        generator: the measured requests are the same with and without it."""
        rng = np.random.default_rng([self.seed, 1])
        order = list(range(self.chunk_pool - 1, -1, -1))  # rank 0 is the most popular
        return [self._rag(order[start:start + self.chunks], rng, 1) for start in range(0, len(order), self.chunks)]

    def arrivals(self, rate: float, duration_s: float) -> list[float]:
        """Send times (seconds from the start) of a Poisson process of `rate` per second over the duration."""
        if rate <= 0:
            raise ValueError("the rate must be positive")
        times, now = [], 0.0
        while True:
            now += self._rng.exponential(1.0 / rate)
            if now >= duration_s:
                return times
            times.append(now)


@dataclass
class Outcome:
    """One request's measurement (the client -> the summary)."""

    kind: str
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunk_hits: int = 0
    chunks: int = 0
    plugin_gpu_ms: float | None = None  # its share of the plugin pass that prefilled it (profiled workers only)
    plugin_misses_ms: float | None = None  # of that share, computing chunks the chunk-cache lacked
    plugin_pinning_ms: float | None = None  # of the pass's host time, its share pinning new host memory
    pass_requests: int | None = None  # the requests of the plugin pass that prefilled it
    tiers: tuple[tuple[str, int, int, int], ...] = ()  # the chunk-cache's tiers after that pass: name, entries,
    # bytes, budget bytes (profiled workers only)
    blended: bool | None = None  # whether its report says it was blended (None: no report, e.g. the stock arm)
    fallback: str | None = None  # why its report says it was prefilled in full instead (a blend asked for)
    error: str | None = None


async def send(client: httpx.AsyncClient, url: str, request: LoadRequest, arm: str) -> Outcome:
    """Stream one request; never raises (a failure is an Outcome with ok False and the reason)."""
    started = time.perf_counter()
    outcome = Outcome(request.kind, ok=False)
    last_time, seen = None, 0
    try:
        async with client.stream("POST", f"{url}/generate", json=request.body(arm)) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                ids = event.get("output_ids") or []
                # SGLang sends the output ids so far (or, with incremental streaming, the new ones).
                total = len(ids) if len(ids) >= seen else seen + len(ids)
                now = time.perf_counter()
                if total > seen:
                    if outcome.ttft_s is None:
                        outcome.ttft_s = now - started
                    elif last_time is not None:
                        outcome.itl_s.append((now - last_time) / (total - seen))
                    last_time, seen = now, total
                reports = (event.get("meta_info") or {}).get("blendgate")
                if reports:
                    report = reports[-1] if isinstance(reports, list) else reports
                    # None: a request that asked no blend (a plain request batched with blending ones)
                    hits = (report.get("hits") or []) if isinstance(report, dict) else []
                    outcome.chunk_hits, outcome.chunks = sum(map(bool, hits)), len(hits)
                    if isinstance(report, dict):
                        outcome.blended = report.get("mode") == "blend"
                        outcome.fallback = report.get("fallback")
                    timings = report.get(PROFILE_KEY) if isinstance(report, dict) else None
                    if isinstance(timings, dict) and timings.get("requests"):
                        outcome.plugin_gpu_ms = timings["gpu"] / timings["requests"]
                        outcome.plugin_misses_ms = timings.get("misses", 0.0) / timings["requests"]
                        outcome.plugin_pinning_ms = timings.get("pinned_alloc", 0.0) / timings["requests"]
                        outcome.pass_requests = timings["requests"]
                    held = report.get(TIERS_KEY) if isinstance(report, dict) else None
                    if isinstance(held, list):
                        outcome.tiers = tuple((t["name"], int(t["entries"]), int(t["bytes"]), int(t["budget_bytes"]))
                                              for t in held if isinstance(t, dict))
        outcome.output_tokens = seen
        outcome.ok = outcome.ttft_s is not None
        if not outcome.ok:
            outcome.error = "no output token"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
    return outcome


async def run_rate(url: str, arm: str, workload: Workload, rate: float, duration_s: float,
                   timeout_s: float) -> tuple[list[Outcome], float]:
    """Every arrival of one rate, sent open-loop; returns the outcomes and the wall time until the last ended."""
    schedule = [(at, workload.next()) for at in workload.arrivals(rate, duration_s)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()

        async def at(when: float, request: LoadRequest) -> Outcome:
            await asyncio.sleep(max(0.0, started + when - time.perf_counter()))
            return await send(client, url, request, arm)

        outcomes = await asyncio.gather(*(at(when, request) for when, request in schedule))
        return list(outcomes), time.perf_counter() - started


async def send_all(url: str, arm: str, requests: list[LoadRequest], concurrency: int,
                   timeout_s: float) -> list[Outcome]:
    """`requests` in order, `concurrency` at a time (a closed loop: not measured); their outcomes."""
    queue = list(reversed(requests))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            while queue:
                outcomes.append(await send(client, url, queue.pop(), arm))

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return outcomes


async def warm_up(url: str, arm: str, workload: Workload, requests: int, concurrency: int,
                  timeout_s: float) -> int:
    """`requests` requests of the workload, `concurrency` at a time, not measured: the chunk-cache (blendgate)
    and the radix cache (stock) start the sweep holding what a server in service would. Returns how many
    completed."""
    outcomes = await send_all(url, arm, [workload.next() for _ in range(requests)], concurrency, timeout_s)
    return sum(o.ok for o in outcomes)


@dataclass(frozen=True)
class Precompute:
    """How the pool's precompute went (Workload.precompute_requests): requests sent and completed, the share of
    them blended (chunks computed into the chunk-cache on the way) and their chunk hit rate (already cached),
    and its wall time."""

    sent: int
    completed: int
    blended: float | None
    chunk_hit_rate: float | None
    seconds: float

    def line(self) -> str:
        share = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        return (f"the pool precomputed before the warm-up (each chunk once, least popular first, one token "
                f"answered): {self.completed} of {self.sent} requests completed in {self.seconds:.0f} s, blended "
                f"{share(self.blended)}, chunk hit rate {share(self.chunk_hit_rate)}")


async def precompute(url: str, arm: str, workload: Workload, concurrency: int, timeout_s: float) -> Precompute:
    """Sends Workload.precompute_requests, `concurrency` at a time; what came of it."""
    started = time.perf_counter()
    outcomes = await send_all(url, arm, workload.precompute_requests(), concurrency, timeout_s)
    seconds = time.perf_counter() - started
    row = summarise(0.0, outcomes, seconds)  # its counts, blended share and hit rate, as a rate's row has them
    return Precompute(row.sent, row.completed, row.rag_blended, row.chunk_hit_rate, seconds)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass(frozen=True)
class RateSummary:
    """One rate's row of the report."""

    rate: float
    sent: int
    completed: int
    failed: int
    ttft_rag_p50_ms: float | None
    ttft_rag_p99_ms: float | None
    ttft_chat_p50_ms: float | None
    ttft_chat_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    output_tokens_per_s: float
    chunk_hit_rate: float | None
    errors: tuple[str, ...]
    # With a profiled worker (BLENDGATE_SGLANG_PROFILE=1): the plugin's GPU time per RAG request (median) and
    # the share of the run's wall time the GPU spent in the plugin's passes.
    plugin_ms_p50: float | None = None
    plugin_busy: float | None = None
    # The share of completed RAG requests whose report says they were blended (the rest were prefilled in full:
    # a fallback); None without reports (the stock arm). The chunk hit rate alone hid a run that never blended.
    rag_blended: float | None = None
    # Why the RAG requests that were not blended fell back, most frequent first: (reason with its numbers
    # replaced by N, count), at most FALLBACK_REASONS of them.
    fallbacks: tuple[tuple[str, int], ...] = ()
    # The most frequent reason as one report gave it, numbers kept (the pass cost the worker calibrated at
    # start-up shows there: it decides which prompts blend).
    fallback_example: str | None = None
    # Of the plugin's GPU time a RAG request, the mean spent computing chunks not cached; and the mean number of
    # requests in the pass that prefilled a RAG request (how much one pass over a batch's blends could share).
    plugin_misses_ms_mean: float | None = None
    pass_requests_mean: float | None = None
    # The chunk-cache's tiers as the rate's last profiled report saw them: (name, entries, bytes, budget bytes).
    tiers: tuple[tuple[str, int, int, int], ...] = ()
    # The mean host time a RAG request's pass spent pinning new host memory (its share of the pass).
    plugin_pinning_ms_mean: float | None = None


# The fallback reasons a row keeps, and how much of each (the reports' reasons open with what decided them).
FALLBACK_REASONS, FALLBACK_WORDS = 4, 110


def fallback_reasons(outcomes: list[Outcome]) -> tuple[tuple[str, int], ...]:
    """The RAG outcomes' fallback reasons, their numbers replaced by N (so "2 not cached" and "3 not cached"
    count together), most frequent first."""
    counts = Counter(reason_form(o.fallback) for o in outcomes if o.kind == "rag" and o.fallback)
    return tuple(counts.most_common(FALLBACK_REASONS))


def reason_form(reason: str) -> str:
    """A fallback reason with its numbers replaced by N, cut to FALLBACK_WORDS characters."""
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:FALLBACK_WORDS]


def fallback_example(outcomes: list[Outcome], form: str | None) -> str | None:
    """The last RAG outcome's fallback reason of this form (reason_form; the most frequent), numbers kept."""
    return next((o.fallback for o in reversed(outcomes) if o.kind == "rag" and o.fallback
                 and reason_form(o.fallback) == form), None)


def summarise(rate: float, outcomes: list[Outcome], wall_s: float) -> RateSummary:
    done = [o for o in outcomes if o.ok]
    ms = lambda values, q: None if not values else 1000 * percentile(values, q)  # noqa: E731
    rag = [o.ttft_s for o in done if o.kind == "rag"]
    chat = [o.ttft_s for o in done if o.kind == "chat"]
    itl = [gap for o in done for gap in o.itl_s]
    chunks = sum(o.chunks for o in done)
    errors = sorted({o.error for o in outcomes if o.error})
    plugin = [o.plugin_gpu_ms for o in done if o.plugin_gpu_ms is not None]
    misses = [o.plugin_misses_ms for o in done if o.plugin_gpu_ms is not None and o.plugin_misses_ms is not None]
    sizes = [o.pass_requests for o in done if o.plugin_gpu_ms is not None and o.pass_requests]
    pinning = [o.plugin_pinning_ms for o in done if o.plugin_gpu_ms is not None and o.plugin_pinning_ms is not None]
    reported = [o.blended for o in done if o.kind == "rag" and o.blended is not None]
    reasons = fallback_reasons(done)
    return RateSummary(rate, len(outcomes), len(done), len(outcomes) - len(done), ms(rag, 50), ms(rag, 99),
                       ms(chat, 50), ms(chat, 99), ms(itl, 50), ms(itl, 99),
                       sum(o.output_tokens for o in done) / wall_s if wall_s > 0 else 0.0,
                       sum(o.chunk_hits for o in done) / chunks if chunks else None, tuple(errors[:3]),
                       percentile(plugin, 50) if plugin else None,
                       sum(plugin) / 1000 / wall_s if plugin and wall_s > 0 else None,
                       sum(reported) / len(reported) if reported else None, reasons,
                       fallback_example(done, reasons[0][0] if reasons else None),
                       sum(misses) / len(misses) if misses else None,
                       sum(sizes) / len(sizes) if sizes else None,
                       next((o.tiers for o in reversed(outcomes) if o.tiers), ()),
                       sum(pinning) / len(pinning) if pinning else None)


def meets(row: RateSummary, slo_ms: float) -> bool:
    """Whether a rate completed every request with RAG p99 TTFT within the SLO."""
    return row.failed == 0 and row.ttft_rag_p99_ms is not None and row.ttft_rag_p99_ms <= slo_ms


def sustained_rate(rows: list[RateSummary], slo_ms: float) -> float | None:
    """The highest rate up to which every rate run met the SLO (meets; None: not the lowest). A rate that meets
    it again above one that missed (a 15-s window's noise near saturation) does not count: an operator sizing
    for a rate needs every rate below it to hold."""
    best = None
    for row in sorted(rows, key=lambda r: r.rate):
        if not meets(row, slo_ms):
            break
        best = row.rate
    return best


def highest_rate_meeting(rows: list[RateSummary], slo_ms: float) -> float | None:
    """The highest rate run that met the SLO, whatever the rates below it did (None: none did)."""
    good = [r.rate for r in rows if meets(r, slo_ms)]
    return max(good) if good else None


def report(rows: list[RateSummary], args: argparse.Namespace, slo_ms: float,
           precomputed: Precompute | None = None) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# Load benchmark ({args.label or args.arm}), {date.today().isoformat()}", "",
             f"- command: `python bench/load.py {' '.join(sys.argv[1:])}`",
             f"- machine (client): {platform.machine()}, Python {platform.python_version()}; server: {args.url}",
             f"- workload: {args.chunks} chunks of {args.chunk_tokens} tokens from a pool of {args.chunk_pool} "
             f"(Zipf s = {args.zipf}), {args.system_tokens}-token system prompt, {args.question_tokens}-token "
             f"question, {args.answer_tokens}-token answers; {args.chat_share:.0%} plain chat of "
             f"{args.chat_tokens} tokens; Poisson arrivals for {args.duration:g} s per rate, seed {args.seed}; "
             f"{args.warmup} warm-up requests before the sweep",
             *([f"- {precomputed.line()}"] if precomputed is not None else []), "",
             "| rate (req/s) | sent | completed | failed | RAG TTFT p50 ms | RAG TTFT p99 ms | chat TTFT p50 ms | "
             "chat TTFT p99 ms | ITL p50 ms | ITL p99 ms | output tok/s | chunk hit rate | RAG blended |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hit = "-" if r.chunk_hit_rate is None else f"{r.chunk_hit_rate:.2f}"
        blended = "-" if r.rag_blended is None else f"{r.rag_blended:.2f}"
        lines.append(f"| {r.rate:g} | {r.sent} | {r.completed} | {r.failed} | {fmt(r.ttft_rag_p50_ms)} | "
                     f"{fmt(r.ttft_rag_p99_ms)} | {fmt(r.ttft_chat_p50_ms)} | {fmt(r.ttft_chat_p99_ms)} | "
                     f"{fmt(r.itl_p50_ms)} | {fmt(r.itl_p99_ms)} | {r.output_tokens_per_s:.0f} | {hit} | {blended} |")
    best, highest = sustained_rate(rows, slo_ms), highest_rate_meeting(rows, slo_ms)
    lines += ["", f"- sustained rate (RAG p99 TTFT <= {slo_ms:g} ms, no failures, at it and every rate below it): "
                  f"{'none of the rates' if best is None else f'{best:g} req/s'}"]
    if highest != best:
        lines.append(f"- a higher rate met it again after one that missed: {highest:g} req/s (not counted)")
    if any(r.plugin_ms_p50 is not None for r in rows):
        lines += ["", "Profiled worker (BLENDGATE_SGLANG_PROFILE=1): the plugin's GPU time a RAG request (its share "
                      "of the pass that prefilled it) and the share of each rate's wall time spent in those passes:",
                  "", "| rate (req/s) | plugin GPU ms a RAG request, p50 | of which uncached chunks, mean ms | "
                      "pinning host memory, mean ms | requests a pass, mean | plugin GPU busy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.rate:g} | {fmt(r.plugin_ms_p50)} | {fmt(r.plugin_misses_ms_mean)} | "
                  f"{fmt(r.plugin_pinning_ms_mean)} | {fmt(r.pass_requests_mean)} | "
                  f"{'-' if r.plugin_busy is None else f'{r.plugin_busy:.2f}'} |" for r in rows]
    if any(r.tiers for r in rows):
        lines += ["", "What the chunk-cache's tiers held at the end of each rate (a profiled worker's last "
                      "report):", ""]
        lines += [f"- {r.rate:g} req/s: " + "; ".join(f"{name} {entries} chunks, {used / 2**30:.1f} of "
                                                         f"{budget / 2**30:.1f} GiB"
                                                         for name, entries, used, budget in r.tiers)
                  for r in rows if r.tiers]
    if any(r.fallbacks for r in rows):
        lines += ["", "Why the RAG requests not blended were prefilled in full (their reports' `fallback`, numbers "
                      "as N; the most frequent first):", "", "| rate (req/s) | requests | reason |", "|---|---|---|"]
        lines += [f"| {r.rate:g} | {count} | {reason} |" for r in rows for reason, count in r.fallbacks]
        lines += ["", "The most frequent, as one report gave it:", ""]
        lines += [f"- {r.rate:g} req/s: {r.fallback_example}" for r in rows if r.fallback_example]
    for r in rows:
        if r.errors:
            lines.append(f"- errors at {r.rate:g} req/s: {'; '.join(r.errors)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the SGLang server (or tests/sglang_standin.py)")
    parser.add_argument("--arm", choices=["blendgate", "stock"], default="blendgate",
                        help="blendgate: RAG requests carry their chunk spans; stock: the same ids without")
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16], help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    parser.add_argument("--slo-ms", type=float, default=1000.0, help="the RAG p99 TTFT a sustained rate meets")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests sent before the sweep, --warmup-concurrency at a time, not measured")
    parser.add_argument("--warmup-concurrency", type=int, default=8,
                        help="requests in flight during the warm-up and the precompute")
    parser.add_argument("--precompute", action="store_true",
                        help="before the warm-up, send every pool chunk once, least popular first (an operator's "
                             "ingestion: the sweep then sees the chunk-cache's steady state, not its first misses)")
    parser.add_argument("--label", default=None, help="the arm's name in the report [--arm]")
    parser.add_argument("--stop-after-saturation", action="store_true",
                        help="skip the higher rates once one misses the SLO")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-pool", type=int, default=2000)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--system-tokens", type=int, default=64)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--chat-share", type=float, default=0.3)
    parser.add_argument("--chat-tokens", type=int, default=256)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent s of the chunk pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the markdown report here (and its rows as JSON beside it, same name .json)")
    args = parser.parse_args(argv)
    try:
        workload = Workload(vocab=args.vocab, chunk_pool=args.chunk_pool, chunks=args.chunks,
                            chunk_tokens=args.chunk_tokens, system_tokens=args.system_tokens,
                            question_tokens=args.question_tokens, answer_tokens=args.answer_tokens,
                            chat_share=args.chat_share, chat_tokens=args.chat_tokens, zipf=args.zipf,
                            seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    precomputed = None
    if args.precompute:
        precomputed = asyncio.run(precompute(args.url.rstrip("/"), args.arm, workload, args.warmup_concurrency,
                                             args.timeout))
        print(precomputed.line(), flush=True)
    if args.warmup:
        warmed = asyncio.run(warm_up(args.url.rstrip("/"), args.arm, workload, args.warmup,
                                     args.warmup_concurrency, args.timeout))
        print(f"warm-up: {warmed}/{args.warmup} requests completed", flush=True)
    rows = []
    for rate in sorted(args.rates):
        outcomes, wall = asyncio.run(run_rate(args.url.rstrip("/"), args.arm, workload, rate, args.duration,
                                              args.timeout))
        rows.append(summarise(rate, outcomes, wall))
        r = rows[-1]
        print(f"{args.arm} {rate:g} req/s: {r.completed}/{r.sent} done, RAG TTFT p99 "
              f"{r.ttft_rag_p99_ms if r.ttft_rag_p99_ms is None else round(r.ttft_rag_p99_ms, 1)} ms", flush=True)
        if args.stop_after_saturation and (r.failed or (r.ttft_rag_p99_ms or 0) > args.slo_ms):
            break
    text = report(rows, args, args.slo_ms, precomputed)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        # The rows beside the report, for bench/load_compare.py (arms run against different servers).
        args.out.with_suffix(".json").write_text(json.dumps(
            {"arm": args.label or args.arm, "command": f"python bench/load.py {' '.join(sys.argv[1:])}",
             "slo_ms": args.slo_ms, "date": date.today().isoformat(),
             "precompute": None if precomputed is None else asdict(precomputed),
             "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
