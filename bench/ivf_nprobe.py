"""Recall@1/@10 and search time of the IVF index at several nprobe values, against exact search, on the
vectors of a collection that bench/retrieval.py built (its data folder is printed under /tmp).

    python bench/ivf_nprobe.py /tmp/blendgate-bench-XXXX/data
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blendgate.retriever.document_store import DocumentStore  # noqa: E402
from blendgate.retriever.embedder import Embedder  # noqa: E402
from blendgate.retriever.index import VectorIndex  # noqa: E402
from retrieval import load_corpus  # noqa: E402


def main() -> None:
    store = DocumentStore(Path(sys.argv[1]) / "chunks.sqlite3")
    record = store.collection("bench")
    rows, vectors = store.embeddings("bench", record.dimension)
    sources = {row: source.rsplit("#", 1)[1] for row, source in store.sources("bench").items()}
    documents, queries = load_corpus()
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)  # the same queried half as bench/retrieval.py
    queried = {d["id"] for d in shuffled[: len(shuffled) // 2]}
    queries = [q for q in queries if q[1] in queried]
    query_vectors = Embedder().embed([q for q, _ in queries])

    def recall(index: VectorIndex) -> tuple[float, float, float]:
        found1 = found10 = 0
        started = time.perf_counter()
        for vector, (_, gold) in zip(query_vectors, queries):
            top = [sources[row] for row, _ in index.search(vector, 10)]
            found1 += top[:1] == [gold]
            found10 += gold in top
        ms = (time.perf_counter() - started) / len(queries) * 1000
        return found1 / len(queries), found10 / len(queries), ms

    print(f"{len(rows)} chunks, {len(queries)} queries")
    print("exact  recall@1 %.3f recall@10 %.3f %.2f ms" % recall(
        VectorIndex.build(record.dimension, vectors, rows, approximate_threshold=len(rows) + 1)))
    ivf = VectorIndex.build(record.dimension, vectors, rows, approximate_threshold=1)
    for nprobe in (32, 64, 128, 256):
        ivf.index.nprobe = nprobe
        print(f"nprobe {nprobe:<3} recall@1 %.3f recall@10 %.3f %.2f ms" % recall(ivf))


if __name__ == "__main__":
    main()
