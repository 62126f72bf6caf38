"""bench/quality.py's variant names: `+CODEC:LEVEL` blends from chunk KV sent through a chunk-cache codec, and
only reuse and blend variants take one (no model loaded here)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from bench_modules import bench_module
from blendgate.chunkcache.selection import DEFAULT_RULE

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


def test_the_shuffled_set_has_the_same_questions_and_each_paragraph_keeps_its_predecessor() -> None:
    path = quality.DATA / "xquad.en.json"
    if not path.exists():
        pytest.skip("the XQuAD file (../shared/data/qa) is not here")
    items = quality.xquad_items(path, 40, seed=0)
    shuffled = quality.shuffled_items(items, seed=0)
    assert [i.question for i in shuffled] == [i.question for i in items]
    moved = 0
    for plain, mixed in zip(items, shuffled):
        # In the article's order each paragraph's predecessor is the one before it; the first has none.
        assert plain.previous == ["", *plain.passages[:-1]]
        # The control's texts: as many, none of them from the question's own article.
        assert [bool(x) for x in plain.elsewhere] == [bool(x) for x in plain.previous]
        assert not set(plain.elsewhere) & set(plain.passages)
        assert sorted(zip(mixed.passages, mixed.previous)) == sorted(zip(plain.passages, plain.previous))
        moved += mixed.passages != plain.passages
    assert moved > 30  # seeded, and mostly another order than the article's
    assert [i.passages for i in quality.shuffled_items(items, seed=0)] == [i.passages for i in shuffled]


def test_every_named_rule_is_a_valid_selection_rule_and_the_probe_weights_rows_differ_only_there() -> None:
    """The rules the lead compares on the same questions: the default's probe on FP8 and on the model's weights."""
    for name in quality.RULES:
        quality.parse_variant(f"{name}@0.15")
    _, _, fp8, _ = quality.parse_variant("default-fp8@0.15")
    _, _, bf16, _ = quality.parse_variant("default-bf16@0.15")
    _, _, default, _ = quality.parse_variant("default@0.15")
    _, _, every_layer, _ = quality.parse_variant("default-s1@0.15")
    assert (fp8.probe_weights, bf16.probe_weights, default.probe_weights) == ("fp8", "model", "model")
    # default-fp8 and default-bf16 were measured with the probe over every layer (default-s1), before the
    # default's probe stride became 4.
    assert replace(fp8, probe_weights="model") == bf16 == every_layer == replace(DEFAULT_RULE, probe_stride=1)
    assert default == DEFAULT_RULE


def test_the_round_trip_blender_blends_from_kv_sent_through_the_codec() -> None:
    """Every chunk's KV (and the chunk prefix's) reaches the blend decoded: the blender's chunk_kvs is where
    chunk KV is found, one chunk at a time or several in one pass."""
    import torch
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import WantedChunk
    from blendgate.chunkcache.tiers import MemoryTier
    from support import tiny_llama

    model = tiny_llama(layers=2, seed=4)
    blender = quality.round_trip_blender(model, ChunkCacheStore([MemoryTier("cpu", 1 << 26, "cpu")]), "system",
                                         "int4")
    chunks = [(11, 12, 13, 14), (21, 22, 23)]
    wanted = [WantedChunk(blender.chunk_key((1, 2), ids), ids, (1, 2)) for ids in chunks]
    found = blender.chunk_kvs(wanted)
    again = blender.chunk_kvs(wanted)  # read back from the store: the same decoded KV
    for (kv, hit), (same, hit_again) in zip(found, again):
        assert not hit and hit_again and same is kv
    plain = [kv for kv, _ in super(type(blender), blender).chunk_kvs(wanted)]  # the store's entries, as computed
    assert any(not torch.equal(kv.keys, raw.keys) for (kv, _), raw in zip(found, plain))  # int4 is lossy
