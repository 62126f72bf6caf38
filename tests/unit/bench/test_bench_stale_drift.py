"""bench/stale_drift.py's pieces on small tensors: which tokens count as recomputed, and the predictors' shapes
and limits (a stale token identical to one recomputed token takes its drift when the temperature is small)."""

from __future__ import annotations

import torch
from bench_modules import bench_module

stale_drift = bench_module("stale_drift.py")


def test_recomputed_slots_hold_every_chunks_sinks_and_the_ratio() -> None:
    chunk_of = torch.tensor([-1, -1] + [0] * 20 + [-1] + [1] * 20 + [-1])
    slots = stale_drift.recomputed_slots(chunk_of, 0.5, seed=3)
    assert slots.tolist() == sorted(slots.tolist()) and len(set(slots.tolist())) == 20  # half of 40 chunk tokens
    assert {2, 3, 4, 5, 23, 24, 25, 26} <= set(slots.tolist())  # each chunk's first 4
    assert bool((chunk_of[slots] >= 0).all())
    assert torch.equal(slots, stale_drift.recomputed_slots(chunk_of, 0.5, seed=3))  # seeded


def test_predictors_spread_the_chunks_own_drift_only() -> None:
    heads, dim = 2, 4
    recomputed_keys = torch.eye(dim)[None, :3].repeat(heads, 1, 1)  # three distinct recomputed tokens
    stale_keys = recomputed_keys[:, [1, 2]]  # the stale tokens look like recomputed tokens 1 and 2
    drift = torch.arange(heads * 3 * dim, dtype=torch.float32).view(heads, 3, dim)
    same = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # stale 0 in chunk A (recomputed 0, 1), 1 in B (2)
    found = stale_drift.predictors({"keys": stale_keys}, {"keys": recomputed_keys}, same, drift)
    assert torch.allclose(found["chunk mean x 1.0"][:, 0], drift[:, :2].mean(dim=1))
    assert torch.allclose(found["chunk mean x 0.5"][:, 1], 0.5 * drift[:, 2])
    nearest = found["similar keys, tau 0.05 x 1.0"]
    assert nearest.shape == (heads, 2, dim)
    assert torch.allclose(nearest[:, 0], drift[:, 1], atol=1e-4)  # its look-alike, within its own chunk
    assert torch.allclose(nearest[:, 1], drift[:, 2])  # alone in its chunk: that token's drift
