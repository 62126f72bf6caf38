"""bench/quality.py's variant names: `+CODEC:LEVEL` blends from chunk KV sent through a chunk-cache codec, and
only reuse and blend variants take one (no model loaded here)."""

from __future__ import annotations

import pytest
from bench_modules import bench_module

quality = bench_module("quality.py")


def test_a_codec_suffix_leaves_the_variant_as_it_was() -> None:
    for spec in ("default@0.15/auto", "reuse", "target=0.9@0.5/auto", "value@0.3"):
        plain = quality.parse_variant(spec)
        assert quality.parse_variant(spec + "+cachegen:1") == plain
        assert quality.parse_variant(spec + "+int4") == plain


def test_full_prefill_and_prefix_take_no_codec() -> None:
    for spec in ("full_prefill+int8", "prefix+cachegen:0"):
        with pytest.raises(SystemExit, match="a codec applies to chunk KV"):
            quality.parse_variant(spec)
