"""bench/quality.py's variant names: `+CODEC:LEVEL` blends from chunk KV sent through a chunk-cache codec, and
only reuse and blend variants take one (no model loaded here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality  # dataclasses look their module up there
_spec.loader.exec_module(quality)


def test_a_codec_suffix_leaves_the_variant_as_it_was() -> None:
    for spec in ("default@0.15/auto", "reuse", "target=0.9@0.5/auto", "value@0.3"):
        plain = quality.parse_variant(spec)
        assert quality.parse_variant(spec + "+cachegen:1") == plain
        assert quality.parse_variant(spec + "+int4") == plain


def test_full_prefill_and_prefix_take_no_codec() -> None:
    for spec in ("full_prefill+int8", "prefix+cachegen:0"):
        with pytest.raises(SystemExit, match="a codec applies to chunk KV"):
            quality.parse_variant(spec)
