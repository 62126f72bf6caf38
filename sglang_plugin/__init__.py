"""blendgate's plugin for SGLang workers: CacheBlend inside SGLang's forward pass.

SGLang (0.5.15 and later) calls `register` in each of its processes through the entry point group
"sglang.srt.plugins" (pyproject.toml), so installing blendgate next to SGLang is all it takes:

    pip install blendgate sglang==0.5.15
    python -m sglang.launch_server --model-path MODEL

(the radix cache may stay on: requests the plugin blended are kept out of it). BLENDGATE_SGLANG_PLUGIN=0 turns
it off (settings.py lists every setting). worker.py says what it does, plan.py decides which batches and how,
prefill.py computes each request, internals.py names every SGLang internal it relies on, protocol.py is what
the gateway sends it.
"""

from __future__ import annotations

from pydantic import ValidationError

from .settings import PluginSettings


def register() -> None:
    try:
        enabled = PluginSettings().plugin
    except ValidationError:  # another setting is bad: the worker logs it when it starts, and does not blend
        enabled = True
    if not enabled:
        return
    from . import internals
    from .worker import around_forward_raw, around_init_new

    internals.register_hooks(around_init_new, around_forward_raw)
