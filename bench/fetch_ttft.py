"""TTFT of RAG prompts whose chunk-caches come from the shared Redis tier over a throttled link (issue 21).

A first replica computes every prompt's chunks and writes them to Redis, encoded by each codec level in turn
(one key prefix per level). Then, per link rate (a throttling TCP proxy on loopback between a second replica and
Redis: bench/throttle.py) and per codec level, a second replica with empty local tiers prefills the same prompts:
- `fetch`: every chunk read from Redis (no bandwidth adaptation);
- `adapt`: the fetch policy chooses per chunk between fetching and recomputing from text
  (chunkcache/adaptation.py; the link's rate measured by the replica's reads, one warm-up prompt first);
and, once per run, the prompts with no shared tier (`recompute`: every chunk computed from text, then blended)
and as a plain full prefill. TTFT here is the prefill's wall time (chunk look-ups, fetches, decoding, blending,
the first token's logits): medians and p90 over the timed prompts, each prompt's chunks new to the replica.

    python bench/fetch_ttft.py --rates 1 10 --codecs raw:0 int8:0 cachegen:0 cachegen:2 --prompts 6
    python bench/fetch_ttft.py --redis-url redis://127.0.0.1:6379/0 ...   # an existing server (else one is started)
    python bench/fetch_ttft.py --architecture llama3-8b ...   # Llama-3-8B's shapes, random weights (CUDA)

Passages: NQ-open dev's gold passages (../shared/data/qa/nq-open-oracle.dev.jsonl.gz), k per prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from throttle import ThrottlingProxy
from ttft import ARCHITECTURES, random_model

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BLENDGATE_QA_DATA", REPO.parent / "shared" / "data" / "qa"))


@dataclass
class Passage:
    """A chunk as the RAG template takes it (its text)."""

    id: str
    text: str
    previous: str | None = None  # the text before it in its document (not used here)


def start_redis() -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server on a free loopback port (no persistence); SystemExit without one on PATH."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not on PATH: install it or give --redis-url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="fetch-ttft-redis-")
    process = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


def nq_prompts(path: Path, prompts: int, k: int) -> list[tuple[str, list[str]]]:
    """(question, k passages) per prompt: each question's gold passage and the next k - 1 questions' passages, no
    passage in two prompts (so every timed prompt's chunks are new to the replica)."""
    items = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            record = json.loads(line)
            context = record["ctxs"][0]
            items.append((record["question"], f"{context['title']}. {context['text']}"))
            if len(items) == prompts * k:
                break
    return [(items[i * k][0], [text for _, text in items[i * k:(i + 1) * k]]) for i in range(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 10.0],
                        help="link rates in Gbit/s (0: no throttling)")
    parser.add_argument("--codecs", nargs="+", default=["raw:0", "int8:0", "cachegen:0", "cachegen:2"],
                        help="NAME:LEVEL of the shared tier's entries")
    parser.add_argument("--k", type=int, default=5, help="chunks (passages) per prompt")
    parser.add_argument("--prompts", type=int, default=6, help="timed prompts per row (after one warm-up)")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file or model folder [embedded SmolLM2]")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default=None,
                        help="time a model of this architecture's real configuration with random weights (CUDA; the "
                             "tokenizer stays --model's): chunk-caches of its size, e.g. Llama-3-8B's 64 MiB a "
                             "512-token chunk in bf16 [the model's own]")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    parser.add_argument("--redis-url", default=None, help="an existing Redis [a redis-server is started]")
    parser.add_argument("--data", type=Path, default=None, help="NQ-open file [../shared/data/qa/...]")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"fetch-ttft-{date.today()}.md")
    args = parser.parse_args()

    from blendgate.chunkcache.adaptation import FetchPolicy, decode_rate
    from blendgate.chunkcache.codec import Codec
    from blendgate.chunkcache.fallback import DEFAULT_PLACEMENT_COST_TOKENS
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.redis_tier import RedisTier
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier
    from blendgate.engine.weights import load_model
    from blendgate.gateway.rag_template import RagPrompt, encode_prompt, rag_messages

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_dir = args.cache_dir or Path(os.environ.get("BLENDGATE_CACHE_DIR", Path.home() / ".cache" / "blendgate"))
    loaded = load_model(args.model, dtype="bfloat16" if device == "cuda" else "float32", device=device,
                        cache_dir=cache_dir)
    if args.architecture:  # the tokenizer's ids are all below the architecture's vocabulary
        if device != "cuda":
            raise SystemExit("--architecture needs a CUDA device (random weights of a 7-8B model)")
        loaded = dataclasses.replace(loaded, model=random_model(args.architecture),
                                     folder=Path(f"{args.architecture} (random weights)"))
    texts = nq_prompts(args.data or DATA / "nq-open-oracle.dev.jsonl.gz", args.prompts + 1, args.k)

    def encoded(mode: str) -> list:
        """Every prompt through the gateway's RAG template, in `mode`."""
        out = []
        for question, passages in texts:
            rag = RagPrompt("Answer the question using only the documents given.",
                            [Passage(str(i), text) for i, text in enumerate(passages)], question)
            out.append(encode_prompt(loaded.tokenizer, rag_messages([], rag), rag, mode=mode))
        return out

    prompts = encoded("blend")
    server, url = (None, args.redis_url) if args.redis_url else start_redis()
    run = uuid.uuid4().hex[:8]
    codecs = [(spec.partition(":")[0], int(spec.partition(":")[2] or 0)) for spec in args.codecs]

    def replica(shared: RedisTier | None, adapt: bool, blend_always: bool = False) -> BlendingRunner:
        """A replica of its own: empty local tiers, the shared tier if any, the fetch policy if `adapt`; its
        costs measured as the gateway's start-up measures them, or, `blend_always`, none (it blends every
        prompt, never prefilling in full: the replica filling Redis, the row computing chunks from text)."""
        policy = None
        if adapt and shared is not None:
            policy = FetchPolicy(decode_rate(shared.codec.kv_codec.name, shared.codec.kv_codec.level,
                                             on_gpu=shared.decode_device.type == "cuda"), link=shared.link)
        store = ChunkCacheStore([MemoryTier("memory", 8 << 30, device)], shared=shared, adaptation=policy)
        runner = BlendingRunner(loaded, store)
        # As the gateway's start-up; no per-chunk cost at all where the replica must blend every prompt.
        runner.costs = runner.blender.calibrate(0.0, 0.0) if blend_always else \
            runner.blender.calibrate("auto", DEFAULT_PLACEMENT_COST_TOKENS)
        return runner

    def timed(runner: BlendingRunner, these: list | None = None) -> dict:
        """Prefill the warm-up prompt, then time the others (`these`, default the blend prompts); the row."""
        seconds, fetched, recomputed, modes = [], 0, 0, set()
        with torch.inference_mode():
            for number, prompt in enumerate(these or prompts):
                started = time.perf_counter()
                _, state = runner.prefill(prompt)
                if device == "cuda":
                    torch.cuda.synchronize()
                if number == 0:
                    continue
                seconds.append(time.perf_counter() - started)
                if number == 1 and runner.store.adaptation is not None:  # what the policy knew and chose
                    print(f"  policy: {runner.store.adaptation.report()}; first timed prompt: "
                          f"{sorted(set(state.report.shared_fetch or []))}", flush=True)
                fetched += sum(word == "fetched" for word in state.report.shared_fetch or [])
                recomputed += sum(not hit for hit in state.report.hits or [])  # computed from their text
                modes.add(state.report.mode)
        shared = runner.store.shared
        ordered = sorted(seconds)
        return {"median": statistics.median(seconds) * 1e3, "p90": ordered[math.ceil(0.9 * len(ordered)) - 1] * 1e3,
                "fetched": fetched, "recomputed": recomputed, "modes": "/".join(sorted(modes)),
                "link": None if shared is None or not shared.link.samples else shared.link.rate}

    rows: list[tuple[str, str, str, dict]] = []
    try:
        for name, level in codecs:  # the first replica fills Redis with every prompt's chunks at this level
            writer = replica(RedisTier(url, 8 << 30, key_prefix=f"bench:{run}:{name}{level}",
                                       codec=Codec(name, level), device=device), adapt=False, blend_always=True)
            with torch.inference_mode():
                for prompt in prompts:
                    writer.prefill(prompt)
            writer.store.shared.flush()
            writer.store.close()
            print(f"{name}:{level}: Redis filled", flush=True)
        rows.append(("-", "-", "no shared tier: chunks computed from text, then blended",
                     timed(replica(None, False, blend_always=True))))
        print(rows[-1], flush=True)
        rows.append(("-", "-", "full prefill", timed(replica(None, False), encoded("full_prefill"))))
        print(rows[-1], flush=True)
        for rate in args.rates:
            proxy = ThrottlingProxy(int(url.rsplit(":", 1)[1].split("/")[0]), rate * 1e9 / 8 if rate else None)
            through = f"redis://127.0.0.1:{proxy.port}/0"
            try:
                for name, level in codecs:
                    for adapt in (False, True):
                        shared = RedisTier(through, 8 << 30, key_prefix=f"bench:{run}:{name}{level}", timeout_s=60,
                                           codec=Codec(name, level), device=device)
                        runner = replica(shared, adapt)
                        rows.append((f"{rate:g}" if rate else "loopback", f"{name}:{level}",
                                     "adapt" if adapt else "fetch", timed(runner)))
                        runner.store.close()
                        print(rows[-1], flush=True)
            finally:
                proxy.close()
    finally:
        if server is not None:
            server.kill()
    write(args, rows, loaded, device)


def write(args, rows, loaded, device: str) -> None:
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, "
               + (torch.cuda.get_device_name() if device == "cuda" else "CPU only") + f", torch {torch.__version__}")
    lines = [f"# TTFT with chunk-caches from the shared tier over a throttled link, {date.today()}", "",
             f"- command: `python bench/fetch_ttft.py {' '.join(sys.argv[1:])}`", f"- machine: {machine}",
             f"- model: {loaded.folder.name}; {args.k} NQ-open passages a prompt; {args.prompts} timed prompts a "
             "row after one warm-up; TTFT = the prefill's wall time (look-ups, fetches, decoding, blending, "
             "first logits)",
             "- link: a throttling TCP proxy on loopback (bench/throttle.py) at the rate asked; `measured` is "
             "the replica's own estimate of its link (what its reads got through)", "",
             "| link Gbit/s | codec | policy | TTFT median ms | TTFT p90 ms | chunks fetched | chunks computed | "
             "prefill | measured link MB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for rate, codec, policy, row in rows:
        link = "-" if row["link"] is None else f"{row['link'] / 1e6:.0f}"
        lines.append(f"| {rate} | {codec} | {policy} | {row['median']:.1f} | {row['p90']:.1f} | {row['fetched']} | "
                     f"{row['recomputed']} | {row['modes']} | {link} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
