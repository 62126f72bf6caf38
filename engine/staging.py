"""Small host-to-GPU uploads through reused page-locked buffers, queued without holding the host.

A blended prefill sends a few kilobytes of index tensors and tables to the GPU before its first kernel
(chunkcache/blend.py). A copy from pageable memory makes the host wait for the stream to drain; pinning a
fresh tensor each time (`Tensor.pin_memory`) costs host time on the request's critical path. Here each
device keeps a small ring of pinned buffers: an upload copies into the next one, queues the device copy
(non-blocking) and records an event; a buffer is written again only after its event, RING uploads later,
has completed (in practice long since: a wait only when the host runs RING uploads ahead of the GPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .instances import InstancePerKey

RING = 8  # buffers per device
MIN_BYTES = 64 << 10  # a buffer's first size; grown to twice what an upload needs


@dataclass
class _Slot:
    buffer: torch.Tensor | None = None  # uint8, pinned
    done: torch.cuda.Event | None = None  # the copy that last read the buffer


class PinnedUploads:
    """One device's ring of pinned buffers (`for_device`). Thread-safe."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.slots = [_Slot() for _ in range(RING)]
        self.next = 0
        self.lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device) -> "PinnedUploads":
        return _PER_DEVICE.get(device)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A copy of the CPU tensor `host` on the device, queued on the current stream (the host does not wait
        for it). Shape and dtype kept."""
        flat = host.reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        with self.lock:
            slot = self.slots[self.next]
            self.next = (self.next + 1) % RING
            if slot.done is not None:
                slot.done.synchronize()
            if slot.buffer is None or slot.buffer.numel() < nbytes:
                slot.buffer = torch.empty(max(MIN_BYTES, 2 * nbytes), dtype=torch.uint8, pin_memory=True)
            staged = slot.buffer[:nbytes].view(flat.dtype)
            staged.copy_(flat)
            out = staged.to(self.device, non_blocking=True)
            slot.done = torch.cuda.Event()
            slot.done.record(torch.cuda.current_stream(self.device))
        return out.view(host.shape)


_PER_DEVICE: InstancePerKey[torch.device, PinnedUploads] = InstancePerKey(PinnedUploads, weak=False)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`: through the device's pinned ring on CUDA (queued, no host wait), a
    plain copy elsewhere."""
    if device.type != "cuda":
        return host.to(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return PinnedUploads.for_device(device).upload(host)
