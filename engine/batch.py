"""The decode batch: what one batched decode step computes, from the engine's scheduling to the model executor.

Plain Python (no torch): the engine (engine.py) builds it from the requests the scheduler (scheduler.py) picked
and their KV blocks (kv_pool.py); the batch decoder (decode.py) turns it into device tensors. Sampling stays
with the engine: each request's sampler reads its row of the logits the decoder returns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step of `size` requests, row i for request_ids[i]: its last generated token `token_ids[i]`
    goes in at `positions[i]` (the request's KV length before the step), its key and value are written to pool
    slot `slots[i]`, and its query attends over positions 0..positions[i] through block-table row `rows[i]`."""

    request_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    positions: tuple[int, ...]
    slots: tuple[int, ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        sizes = {len(self.request_ids), len(self.token_ids), len(self.positions), len(self.slots), len(self.rows)}
        if len(sizes) != 1 or not self.request_ids:
            raise ValueError(f"a decode batch needs one or more requests and one entry of each field per request, "
                             f"got lengths {sorted(sizes)}")

    @property
    def size(self) -> int:
        return len(self.request_ids)
