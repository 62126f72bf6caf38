"""CUDA graphs of SpeCache's steady-state decode step (engine/specache.py), one per batch of requests.

A SpeCache step launches per layer the model's kernels plus its own (low-bit scores, two top-k, the residency
update of the step and of the prefetch, decode attention): launched one by one from Python the step is bound by
the host. In the steady state (every request's context larger than its budget: each step scores the low-bit
keys and picks its top-k, engine/specache_policy.StepSelection.scored) the step's work has fixed shapes: the
scores cover each request's low-bit key capacity and a mask made on the device from the step's positions
stands in for the policy's Python slices, and the pairs each request reads (sinks + top_k + recent window) are
its budget. So the step is captured once and replayed, as engine/decode.py does for the full-KV step.

A graph reads fixed addresses: its inputs are copied into `StepInputs` buffers before a replay, and it bakes
in the pointers of its requests' tiers (host KV, low-bit keys, residency tables, counters). It is therefore
captured per batch of requests (their ids, in order), on the batch's second steady step (the first runs the
same function eagerly: it compiles the kernels and is that step's real work), and dropped when one of its
requests is released (or all, when the decoder's residency scratch grows for a larger request: the graphs read
it). What the policy decides on the host between steps (the counts of wanted pairs, the host
tier's length, a completed group's low-bit keys) stays outside the graph, in the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..kernels.graph_capture import capture
from .decode import StepInputs


class GraphKey(NamedTuple):
    """What a captured step is for: the batch's requests (their ids, in order), whether the step selects
    (scores, top-k, copies and prefetch: SpeCacheSettings.select_every) or reads the slots as they are, and
    whether it carries a speculative row per request (SpeCacheSettings.speculate: the guesses choose the
    prefetch; `select` then says whether the requests' own rows select too, after a failed guess)."""

    request_ids: tuple[int, ...]
    select: bool = True
    guessing: bool = False


@dataclass
class _Captured:
    inputs: StepInputs
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class SteadyStepGraphs:
    """The captured steady steps of one SpeCache decoder, by GraphKey (a batch's request ids, selecting or not).

    `run(key, host_inputs, forward)` runs `forward(StepInputs)` (the step's device work, no host-side effects:
    it returns the logits [batch, vocab]) for `host_inputs` [5, batch] long (pinned): eagerly on a batch's
    first step, then from its graph. The logits of a replay are the graph's output buffer: read them before
    the next step. On a device without CUDA graphs (CPU: the tests of the steady step's work against the eager
    step) every step runs `forward` eagerly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._captured: dict[GraphKey, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def run(self, key: GraphKey, host_inputs: torch.Tensor,
            forward: Callable[[StepInputs], torch.Tensor]) -> torch.Tensor:
        captured = self._captured.get(key)
        if captured is None:
            inputs = StepInputs(host_inputs.to(self.device, non_blocking=True))
            logits = forward(inputs)
            if self._pool is not None:
                self._captured[key] = self._capture(inputs, forward)
            return logits
        captured.inputs.packed.copy_(host_inputs, non_blocking=True)
        captured.graph.replay()
        return captured.logits

    def __len__(self) -> int:
        """The batches captured."""
        return len(self._captured)

    def drop(self, request_id: int) -> None:
        """Forget the graphs of batches that hold this request (it finished: its tiers are freed)."""
        self._forget([key for key in self._captured if request_id in key.request_ids])

    def clear(self) -> None:
        """Forget every graph (the decoder replaced a buffer they read: its residency scratch grew)."""
        self._forget(list(self._captured))

    def _forget(self, keys: list[GraphKey]) -> None:
        if keys:  # a replay may still run on the device and read what its graph's memory pool holds
            torch.cuda.current_stream(self.device).synchronize()
        for key in keys:
            del self._captured[key]

    def _capture(self, inputs: StepInputs, forward: Callable[[StepInputs], torch.Tensor]) -> _Captured:
        # The eager run before this one compiled the kernels; capture records the step without running it.
        static = StepInputs(inputs.packed.clone())
        graph = torch.cuda.CUDAGraph()
        with capture(graph, self._pool):
            logits = forward(static)
        return _Captured(static, graph, logits)
