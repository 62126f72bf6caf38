"""SpeCache's residency update (kernels/residency.py): the reference makes every wanted position resident with
its host pair in the pool, keeps the hits where they are, fills the lowest free slots first and counts hits
and copies; bad shapes are refused; and the Triton kernel leaves the reference's residency table, pool and
counts exactly, where Triton runs on the CPU (TRITON_INTERPRET=1; skipped otherwise; from pinned host memory
in tests/gpu/test_specache_cuda.py): m = top_k and m < top_k, all hits, all misses, an empty table, over
several calls in a row (the scratch's marks are left clear)."""

from __future__ import annotations

import os

import pytest
import torch
from blendgate.kernels import residency
from blendgate.kernels.residency import ResidencyScratch, make_resident, make_resident_reference

KV_HEADS, CAPACITY, SLOTS = 3, 5000, 2200


def state(seed: int, top_k: int, head_dim: int = 64, dtype: torch.dtype = torch.float32, filled: bool = True):
    """A layer's host KV, pool, residency table (top_k distinct positions a head, their pairs in their slots, or
    empty) and the pool slots of the top-k slots."""
    generator = torch.Generator().manual_seed(seed)
    host_keys = torch.randn(KV_HEADS, CAPACITY, head_dim, generator=generator).to(dtype)
    host_values = torch.randn(KV_HEADS, CAPACITY, head_dim, generator=generator).to(dtype)
    pool_keys = torch.randn(KV_HEADS, SLOTS, head_dim, generator=generator).to(dtype)
    pool_values = torch.randn(KV_HEADS, SLOTS, head_dim, generator=generator).to(dtype)
    if filled:
        resident = torch.stack([torch.randperm(CAPACITY, generator=generator)[:top_k] for _ in range(KV_HEADS)])
    else:
        resident = torch.full((KV_HEADS, top_k), -1, dtype=torch.long)
    targets = torch.randperm(SLOTS, generator=generator)[:top_k]
    for head in range(KV_HEADS if filled else 0):  # the slots hold the pairs the table names
        pool_keys[head, targets] = host_keys[head, resident[head]]
        pool_values[head, targets] = host_values[head, resident[head]]
    return host_keys, host_values, pool_keys, pool_values, resident, targets


def wanted_with_hits(resident: torch.Tensor, m: int, hits: int, seed: int) -> torch.Tensor:
    """[kv_heads, m] distinct positions a head, `hits` of them resident (shuffled among the misses)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in resident:
        held = row[row >= 0]
        others = torch.tensor(sorted(set(range(CAPACITY)) - set(held.tolist())))
        chosen = torch.cat([held[torch.randperm(len(held), generator=generator)[:hits]],
                            others[torch.randperm(len(others), generator=generator)[: m - hits]]])
        rows.append(chosen[torch.randperm(m, generator=generator)])
    return torch.stack(rows)


def wanted_pairs_are_the_hosts(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values) -> None:
    heads = torch.arange(KV_HEADS)[:, None].expand_as(resident)
    slots = targets.expand_as(resident)
    held = torch.stack([torch.isin(r, w) for r, w in zip(resident, wanted)])
    assert torch.equal(pool_keys[heads, slots][held], host_keys[heads, resident.clamp(min=0)][held])
    assert torch.equal(pool_values[heads, slots][held], host_values[heads, resident.clamp(min=0)][held])


def test_the_reference_makes_the_wanted_pairs_resident_keeping_the_hits() -> None:
    host_keys, host_values, pool_keys, pool_values, resident, targets = state(0, top_k=40)
    wanted = wanted_with_hits(resident, m=30, hits=12, seed=1)
    before, counts = resident.clone(), torch.zeros(2, dtype=torch.long)
    make_resident_reference(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values, counts)
    for head in range(KV_HEADS):
        assert set(wanted[head].tolist()) <= set(resident[head].tolist())
        hit = torch.isin(before[head], wanted[head])
        assert torch.equal(resident[head][hit], before[head][hit])  # hits stay in their slots
        changed = (resident[head] != before[head]).nonzero().flatten()
        assert torch.equal(changed, (~hit).nonzero().flatten()[:18])  # the lowest free slots, in order
    wanted_pairs_are_the_hosts(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values)
    assert counts.tolist() == [3 * 12, 3 * 18]


def test_a_growing_set_stays_a_prefix_of_the_slots() -> None:
    host_keys, host_values, pool_keys, pool_values, resident, targets = state(2, top_k=50, filled=False)
    counts = torch.zeros(2, dtype=torch.long)
    for m in (10, 20, 35):
        wanted = torch.arange(5, 5 + m).repeat(KV_HEADS, 1)
        make_resident_reference(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values, counts)
        assert torch.equal(resident[:, :m], wanted) and bool((resident[:, m:] == -1).all())
    assert counts.tolist() == [3 * (10 + 20), 3 * 35]


def test_bad_shapes_are_refused() -> None:
    host_keys, host_values, pool_keys, pool_values, resident, targets = state(3, top_k=8)
    counts = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="make_resident needs"):
        make_resident(resident.repeat(1, 2), resident, targets, host_keys, host_values, pool_keys, pool_values,
                      counts)
    with pytest.raises(ValueError, match="make_resident needs"):
        make_resident(resident, resident, targets[:4], host_keys, host_values, pool_keys, pool_values, counts)


@pytest.mark.skipif(residency.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel on CPU tensors needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("top_k, m, hits, filled", [
    (2100, 1500, 400, True),  # over several index blocks (1,024) and copy blocks (64)
    (300, 300, 90, True),    # m = top_k
    (300, 170, 60, True),    # m < top_k
    (200, 200, 200, True),   # all hits
    (200, 150, 0, True),     # all misses
    (130, 100, 0, False),    # an empty table (a request's first step)
])
@pytest.mark.parametrize("head_dim, dtype", [(64, torch.float32), (128, torch.bfloat16)])
def test_the_kernel_matches_its_reference(top_k, m, hits, filled, head_dim, dtype) -> None:
    host_keys, host_values, pool_keys, pool_values, resident, targets = state(top_k + m, top_k, head_dim, dtype,
                                                                              filled)
    expected = [t.clone() for t in (resident, pool_keys, pool_values)]
    expected_counts, counts = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    scratch = ResidencyScratch.empty(KV_HEADS, CAPACITY, top_k, torch.device("cpu"))
    for call in range(2):  # the second call starts from the first's table: its wanted pairs are all hits
        wanted = wanted_with_hits(expected[0], m, hits if call == 0 else m, seed=call)
        make_resident_reference(wanted, expected[0], targets, host_keys, host_values, expected[1], expected[2],
                                expected_counts)
        make_resident(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values, counts, scratch)
        assert torch.equal(resident, expected[0])
        assert torch.equal(pool_keys, expected[1]) and torch.equal(pool_values, expected[2])
        assert torch.equal(counts, expected_counts)
        assert not bool(scratch.marks.any())
