"""bench/quality.py with an oracle in place of the probe: how good could token selection be?

Every query-aware blend variant of the run selects its tokens by scores computed from a full prefill of the
same prompt instead of the probe pass over the cached KV (`ORACLE` in the environment):
- `attention`: the question's attention to each chunk token with every token's KV exact (the probe's pass,
  run over the full prefill's KV instead of the chunks' cached KV);
- `deviation`: each chunk token's KV change, cached against full prefill, per layer normalised by the layer's
  mean and summed over layers 1.. (CacheBlend's deviation, at every layer and exact: no blend can know it).
Everything else (sinks, drift shift, budget) is the variant's. A diagnostic: the full prefill it needs costs
more than blending saves.

    ORACLE=attention python bench/quality_oracle.py --set xquad --questions 300 --variants full_prefill reuse \\
        attention@0.15/auto default@0.15/auto
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import blendgate.chunkcache.blend as blend  # noqa: E402
from blendgate.chunkcache.probe import probe_eager  # noqa: E402

MODE = os.environ.get("ORACLE", "attention")


def oracle_scores(model, ids, rows, votes, total, cache, ready, cos, sin, layers, projections=None) -> torch.Tensor:
    """probe_eager's signature and result ([total] float32 scores), from a full prefill of the prompt (the
    attention oracle's probe on the rule's projections, as the blend's own)."""
    for layer in range(model.num_layers):
        ready(layer)  # every chunk's cached KV in place (the deviation compares with it)
    full = model.new_cache(total + 8)
    model.forward(ids[:total], None, full)
    if MODE == "attention":
        return probe_eager(model, ids, rows, votes, total, full, lambda layer: None, cos, sin, layers, projections)
    if MODE != "deviation":
        raise SystemExit("ORACLE must be 'attention' or 'deviation'")
    score = torch.zeros(total, device=ids.device)
    for layer in range(1, model.num_layers):
        keys = (full.keys[layer][:, :total].float() - cache.keys[layer][:, :total].float()).square().sum(dim=(0, 2))
        values = (full.values[layer][:, :total].float() - cache.values[layer][:, :total].float()
                  ).square().sum(dim=(0, 2))
        score += keys / keys.mean().clamp(min=1e-12) + values / values.mean().clamp(min=1e-12)
    return score


if __name__ == "__main__":
    blend.probe_eager = oracle_scores  # the blend's eager probe (float32 quality runs never use the graphs)
    sys.argv = [str(BENCH / "quality.py"), *sys.argv[1:]]
    runpy.run_path(str(BENCH / "quality.py"), run_name="__main__")
