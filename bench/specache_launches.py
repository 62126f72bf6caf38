"""SpeCache's own kernel launches in a decode step (engine/specache.py: the low-bit scores, the top-k, the
residency updates of the step and of the prefetch), counted on the CPU: with the residency update as the
PyTorch chain it replaced (kernels/residency.make_resident_reference: sorts, binary searches, argsorts,
gathers, two pair copies, a scatter) and as the one Triton kernel (kernels/residency.py).

Counted: every PyTorch operator that is not a view (a TorchDispatchMode; on CUDA each is a kernel launch) and
every Triton launch, inside the decoder's selection and residency calls, with Triton's interpreter standing in
for CUDA (TRITON_INTERPRET=1: the Triton path is the one the GPU takes). The model's own launches (QKV, rope,
attention, MLP: engine/decode.py's ~15 a layer) are not counted. A random Llama of `--layers` layers (4 KV
heads of 64) over a `--context`-token request at a budget of 1/16, steps after the first (steady state).

    TRITON_INTERPRET=1 PYTHONPATH=<a folder holding triton> python bench/specache_launches.py
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date

import torch
from blendgate.engine import specache
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.engine.specache_policy import SpeCacheSettings
from blendgate.kernels import residency
from specache import random_request  # bench/specache.py (this script's folder is on the path)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig


class Launches(TorchDispatchMode):
    """Counts non-view operators while `inside` > 0, and Triton launches (`triton_launch`)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside and not func.is_view and func not in (torch.ops.aten._local_scalar_dense.default,
                                                             torch.ops.aten.detach.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def counted(launches: Launches, fn):
    def wrapper(*args, **kwargs):
        if launches.inside:
            return fn(*args, **kwargs)
        launches.inside += 1
        try:
            return fn(*args, **kwargs)
        finally:
            launches.inside -= 1
    return wrapper


def step_launches(layers: int, context: int, kernel: bool, steps: int = 3) -> float:
    """SpeCache's own launches per steady decode step."""
    import triton.runtime.interpreter as interpreter

    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=256, intermediate_size=256,
                                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=2 * context)
    model = LlamaFamilyModel.random(config, device="cpu", dtype=torch.float32)
    settings = SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1)
    decoder, _ = random_request(model, settings, context, steps + 1)
    launches = Launches()
    run = interpreter.InterpretedFunction.run
    original = specache.make_resident

    def launch(self, *args, **kwargs):  # a Triton launch: one, and none of the interpreter's own operators
        launches.count += bool(launches.inside)
        inside, launches.inside = launches.inside, 0
        try:
            return run(self, *args, **kwargs)
        finally:
            launches.inside = inside

    interpreter.InterpretedFunction.run = launch
    specache.make_resident = residency.make_resident if kernel else (
        lambda *args, scratch=None: residency.make_resident_reference(*args[:8]))
    for name in ("_select", "_make_resident"):
        setattr(decoder, name, counted(launches, getattr(decoder, name)))
    try:
        with torch.inference_mode():
            decoder.decode(decoder.batch([0], [1]))
            with launches:
                for _ in range(steps):
                    decoder.decode(decoder.batch([0], [1]))
    finally:
        interpreter.InterpretedFunction.run = run
        specache.make_resident = original
    return launches.count / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 4], help="two depths: launches = a + b layers")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--per-step-layers", type=int, default=32, help="the depth to report a step at")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 and triton importable (the Triton path stands in for CUDA)")
    layers = " ".join(map(str, args.layers))
    print(f"# SpeCache's own launches a decode step, {date.today().isoformat()}\n")
    print(f"- command: `TRITON_INTERPRET=1 python bench/specache_launches.py --layers {layers} "
          f"--context {args.context}`\n- device: CPU (Triton interpreter), torch {torch.__version__}, Python "
          f"{platform.python_version()}, {platform.node()}\n\n| residency update | launches a layer | launches a "
          f"step at {args.per_step_layers} layers |\n|---|---|---|")
    for kernel in (False, True):
        low, high = (step_launches(layers, args.context, kernel) for layers in args.layers)
        per_layer = (high - low) / (args.layers[1] - args.layers[0])
        fixed = low - per_layer * args.layers[0]
        name = "one Triton kernel (kernels/residency.py)" if kernel else "PyTorch chain (before)"
        print(f"| {name} | {per_layer:.0f} | {fixed + per_layer * args.per_step_layers:.0f} |")


if __name__ == "__main__":
    main()
