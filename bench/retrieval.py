"""Retrieval benchmark: recall@1/5/10 and MRR on XQuAD and NQ-open, ingestion throughput and query latency.

Corpus: the 240 XQuAD paragraphs and the unique NQ-open gold passages (../shared/data/qa). The passages
are split in two halves (seeded): the questions of the first half are the queries, each with its gold
paragraph; a query counts as found at k when a chunk of its gold paragraph is among the top k. Larger
collections are synthesised from the second half only: each distractor joins two sentences drawn at random
(seeded) from two different second-half passages, so it reads like the real text but holds no sentence of
a queried passage. Each size adds distractors to the collection of the size before it.

    python bench/retrieval.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from blendgate.retriever.index import VectorIndex

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "qa"


def load_corpus() -> tuple[list[dict], list[tuple[str, str]]]:
    """Documents ({"id", "text"}) and queries (question, gold document id)."""
    documents, queries = [], []
    squad = json.loads((DATA / "xquad.en.json").read_text())
    for article in squad["data"]:
        for index, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"xquad/{article['title']}/{index}"
            documents.append({"id": doc_id, "text": paragraph["context"]})
            queries += [(qa["question"], doc_id) for qa in paragraph["qas"]]
    seen: dict[str, str] = {}
    with gzip.open(DATA / "nq-open-oracle.dev.jsonl.gz", "rt") as lines:
        for line in lines:
            row = json.loads(line)
            passage = row["ctxs"][0]
            text = f"{passage['title']}. {passage['text']}"
            if text not in seen:
                seen[text] = f"nq/{len(seen)}"
                documents.append({"id": seen[text], "text": text})
            queries.append((row["question"], seen[text]))
    return documents, queries


def distractors(documents: list[dict], count: int, seed: int) -> list[dict]:
    sentences = [[s for s in re.split(r"(?<=[.!?])\s+", d["text"]) if len(s.split()) >= 5] for d in documents]
    sentences = [s for s in sentences if s]
    rng = random.Random(seed)
    out = []
    for i in range(count):
        first, second = rng.sample(range(len(sentences)), 2)
        out.append({"id": f"synthetic/{seed}/{i}",
                    "text": f"{rng.choice(sentences[first])} {rng.choice(sentences[second])}"})
    return out


def write_jsonl(path: Path, documents: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(d) for d in documents) + "\n")
    return path


def gold_of(source: str) -> str:
    return source.rsplit("#", 1)[1]


def evaluate(retriever, collection: str, queries: list[tuple[str, str]], latency_sample: int) -> dict:
    ranks = []
    for question, gold in queries:
        hits = retriever.search(collection, question, 10)
        rank = next((i for i, h in enumerate(hits, start=1) if gold_of(h.source) == gold), None)
        ranks.append(rank)
    rng = random.Random(1)
    sample = rng.sample(queries, min(latency_sample, len(queries)))
    end_to_end, index_only = [], []
    loaded = retriever._current(collection)
    for question, _ in sample:
        started = time.perf_counter()
        retriever.search(collection, question, 10)
        end_to_end.append((time.perf_counter() - started) * 1000)
        vector = retriever.embedder.embed([question])[0]
        started = time.perf_counter()
        loaded.index.search(vector, 20)
        index_only.append((time.perf_counter() - started) * 1000)

    def recall(k: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)

    # The same queries on an exact index of the same vectors: what the approximate index costs in recall.
    record = retriever.documents.collection(collection)
    rows, vectors = retriever.documents.embeddings(collection, record.dimension)
    exact = VectorIndex.build(record.dimension, vectors, rows, approximate_threshold=len(rows) + 1)
    sources = retriever.documents.sources(collection)
    exact_found = 0
    for vector, (_, gold) in zip(retriever.embedder.embed([q for q, _ in queries]), queries):
        exact_found += gold in [gold_of(sources[row]) for row, _ in exact.search(vector, 10)]

    return {
        "recall@1": recall(1), "recall@5": recall(5), "recall@10": recall(10),
        "mrr@10": sum(1 / r for r in ranks if r is not None) / len(ranks),
        "exact_recall@10": exact_found / len(queries),
        "query_ms_p50": statistics.median(end_to_end), "query_ms_p99": float(np.percentile(end_to_end, 99)),
        "index_ms_p50": statistics.median(index_only), "index_ms_p99": float(np.percentile(index_only, 99)),
        "index_kind": loaded.index.kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--latency-sample", type=int, default=500)
    parser.add_argument("--cache-dir", type=Path, default=None, help="blendgate cache (converted tokenizer)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"retrieval-{date.today()}.md")
    args = parser.parse_args()

    from blendgate.engine.weights import load_tokenizer
    from blendgate.gateway.config import RetrievalSettings, default_cache_dir
    from blendgate.retriever.embedder import Embedder
    from blendgate.retriever.service import Retriever

    settings = RetrievalSettings()
    tokenizer = load_tokenizer(None, args.cache_dir or default_cache_dir())
    embedder = Embedder()
    documents, all_queries = load_corpus()
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)
    queried = {d["id"] for d in shuffled[: len(shuffled) // 2]}
    queries = [q for q in all_queries if q[1] in queried]
    distractor_pool = [d for d in documents if d["id"] not in queried]
    workdir = Path(tempfile.mkdtemp(prefix="blendgate-bench-"))
    retriever = Retriever(workdir / "data", embedder, tokenizer, chunk_tokens=settings.chunk_tokens,
                          overlap_tokens=settings.chunk_overlap_tokens,
                          approximate_threshold=settings.approximate_index_threshold, nprobe=settings.ivf_nprobe)
    rows = []
    summary = retriever.ingest_paths([write_jsonl(workdir / "real.jsonl", documents)], "bench")
    print(f"real corpus: {len(documents)} documents, {summary.chunks} chunks in {summary.seconds:.1f} s", flush=True)
    rows.append({"size": summary.chunks, "ingested": summary.chunks, "ingest_s": summary.seconds,
                 **evaluate(retriever, "bench", queries, args.latency_sample)})
    print(rows[-1], flush=True)
    total = summary.chunks
    for size in sorted(args.sizes):
        if size <= total:
            continue
        synthetic = distractors(distractor_pool, size - total, seed=size)
        extra = write_jsonl(workdir / f"distractors-{size}.jsonl", synthetic)
        summary = retriever.ingest_paths([extra], "bench")
        total += summary.chunks
        print(f"{total} chunks: added {summary.chunks} in {summary.seconds:.1f} s", flush=True)
        rows.append({"size": total, "ingested": summary.chunks, "ingest_s": summary.seconds,
                     **evaluate(retriever, "bench", queries, args.latency_sample)})
        print(rows[-1], flush=True)

    command = "python bench/retrieval.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Retrieval benchmark, {date.today()}",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, CPU only",
        f"- embedder: {embedder.name} on {embedder.device}, batch {embedder.batch_size}; chunks of "
        f"{settings.chunk_tokens} tokens (overlap {settings.chunk_overlap_tokens}), SmolLM2 tokenizer",
        f"- corpus: {len(documents)} documents (XQuAD paragraphs + unique NQ-open gold passages); queries: the "
        f"{len(queries)} questions of a seeded half of them; larger sizes add synthetic distractors, each two "
        "random sentences from two passages of the other half (so no distractor repeats a queried passage)",
        f"- IVF above {settings.approximate_index_threshold} chunks, nprobe {settings.ivf_nprobe}; latency over "
        f"{args.latency_sample} single queries (end to end = embed + FAISS + SQLite fetch)",
        "",
        "| chunks | index | recall@1 | recall@5 | recall@10 | recall@10 exact | MRR@10 | ingest chunks/s "
        "| query p50 ms | query p99 ms | FAISS p50 ms | FAISS p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} | {r['index_kind']} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | "
                     f"{r['recall@10']:.3f} | {r['exact_recall@10']:.3f} | {r['mrr@10']:.3f} | "
                     f"{r['ingested'] / r['ingest_s']:.1f} | "
                     f"{r['query_ms_p50']:.1f} | {r['query_ms_p99']:.1f} | {r['index_ms_p50']:.2f} | "
                     f"{r['index_ms_p99']:.2f} |")
    lines += ["", "Ingest chunks/s is for the chunks added at that row (real paragraphs first, then distractors, "
              "which are shorter). 'recall@10 exact' runs the same queries on an exact index of the same vectors, "
              "so its gap to recall@10 is what the approximate index costs.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
