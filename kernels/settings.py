"""The kernels' settings, from BLENDGATE_* environment variables, read once per process.

- BLENDGATE_ATTENTION: "auto" (the default: the fastest exact kernel per shape, attention.py), or "flex" or
  "sdpa" to send the sparse and masked shapes to that kernel (to compare them).
- BLENDGATE_SPARSE_KERNEL: which Triton kernel runs the sparse shape under "auto": "grouped" (the default: a
  block holds rows with all the query heads of one KV head, probe_attention.grouped_causal_attention) or
  "blocked" (one query head per block, sparse_attention.py).
"""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class KernelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLENDGATE_", extra="ignore", frozen=True)

    attention: Literal["auto", "flex", "sdpa"] = "auto"
    sparse_kernel: Literal["grouped", "blocked"] = "grouped"


@cache
def kernel_settings() -> KernelSettings:
    """The process's kernel settings; pydantic's ValidationError (a ValueError) names a bad value."""
    return KernelSettings()
