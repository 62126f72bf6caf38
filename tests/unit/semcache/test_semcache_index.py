"""The HNSW partitions: one graph per owner, so a search reaches only the asker's own (or the shared) entries."""

from __future__ import annotations

import numpy as np
from blendgate.semcache.index import IndexedEntry, Partition
from blendgate.semcache.settings import HnswSettings


def entry(n: int, owner: str) -> IndexedEntry:
    return IndexedEntry(entry_id=f"e{n}", context="", collection=None, created_at=0.0, expires_at=1e12, owner=owner)


def test_each_owner_has_its_own_graph_and_searches_only_it() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = ["" if n % 3 else ("alice" if n % 2 else "bob") for n in range(60)]
    partition = Partition(16, HnswSettings())
    partition.add_many([entry(n, o) for n, o in enumerate(owners[:50])], vectors[:50])
    for n in range(50, 60):
        partition.add(entry(n, owners[n]), vectors[n])
    assert len(partition) == 60 and set(partition.graphs) == {"", "alice", "bob"}
    for owner in ("", "alice", "bob"):
        found = partition.search(vectors[0], 8, owner)
        assert found and all(e.owner == owner for e, _ in found)
        mine = [n for n in range(60) if owners[n] == owner]
        best = max(mine, key=lambda n: float(vectors[n] @ vectors[0]))
        assert found[0][0].entry_id == f"e{best}"  # the owner's nearest, with its cosine
        assert abs(found[0][1] - float(vectors[best] @ vectors[0])) < 1e-4
    assert partition.search(vectors[0], 8, "carol") == []  # an owner with no entries walks nothing
    for n in [n for n in range(60) if owners[n] == "bob"]:
        assert partition.remove(f"e{n}").owner == "bob"
    assert "bob" not in partition.graphs and partition.search(vectors[0], 8, "bob") == []
    partition.add(entry(99, "bob"), vectors[0])  # a new graph for bob's next entry
    assert partition.search(vectors[0], 8, "bob")[0][0].entry_id == "e99"
