"""CacheBlend on a tiny random-weight model: re-rotation, the r = 1 and r = 0 limits, selection size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blendgate.chunkcache import blend as blend_module
from blendgate.chunkcache.blend import blend_prefill, precompute_chunk, precompute_chunks
from blendgate.chunkcache.selection import DEFAULT_RULE, SelectionRule, selected_count, sink_count
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.kernels.rope import rotate
from support import tiny_llama


@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    return tiny_llama(layers=4, seed=3)


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, 200, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX, CHUNKS, SUFFIX = random_ids(5, 1), [random_ids(12, 2), random_ids(9, 3), random_ids(15, 4)], random_ids(6, 5)


def full_prefill(model: LlamaFamilyModel, ids: list[int]):
    cache = model.new_cache(len(ids))
    logits = model.forward(torch.tensor(ids), torch.arange(len(ids)), cache)
    return logits[-1], cache


def rotated_qkv(model: LlamaFamilyModel, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Reference: a layer's queries and keys rotated to their positions, and its values."""
    q, k, v = model.split_qkv(model.project_qkv(layer, hidden))
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def test_rotating_cached_keys_equals_computing_them_at_the_new_position(model) -> None:
    chunk = precompute_chunk(model, CHUNKS[0])
    offset = 37
    positions = torch.arange(offset, offset + chunk.length)
    cos, sin = model.rope(positions)
    hidden = F.embedding(torch.tensor(CHUNKS[0]), model.embed_tokens)
    # Layer 0's keys depend on the token and its position only, so they can be computed at the new place.
    _, keys_there, _ = rotated_qkv(model, 0, hidden, cos, sin)
    torch.testing.assert_close(rotate(chunk.keys[0], cos, sin), keys_there, rtol=0, atol=1e-6)


def test_recompute_ratio_one_equals_full_prefill_and_decodes_on(model) -> None:
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    blended = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 1.0)
    ids = PREFIX + [t for c in CHUNKS for t in c] + SUFFIX
    expected, cache = full_prefill(model, ids)
    torch.testing.assert_close(blended.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blended.cache.keys[:, :, : len(ids)], cache.keys[:, :, : len(ids)], atol=1e-4,
                               rtol=1e-4)
    assert blended.recompute_ratio == 1.0
    next_token = torch.tensor([7])
    position = torch.tensor([len(ids)])
    torch.testing.assert_close(model.forward(next_token, position, blended.cache),
                               model.forward(next_token, position, cache), atol=1e-4, rtol=1e-4)


def block_masked_logits(model: LlamaFamilyModel, prefix: list[int], chunks: list[list[int]],
                        suffix: list[int]) -> torch.Tensor:
    """Reference: each chunk attends only to itself; prefix and suffix attend causally to everything before."""
    ids = torch.tensor(prefix + [t for c in chunks for t in c] + suffix)
    total = ids.shape[0]
    block = torch.full((total,), -1)
    start = len(prefix)
    for index, chunk in enumerate(chunks):
        block[start:start + len(chunk)] = index
        start += len(chunk)
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    same_block = block[:, None] == block[None, :]
    in_chunk = block >= 0
    mask = causal & (~in_chunk[:, None] | same_block)
    cos, sin = model.rope(torch.arange(total))
    hidden = F.embedding(ids, model.embed_tokens)
    for layer in range(model.num_layers):
        q, k, v = rotated_qkv(model, layer, hidden, cos, sin)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None, None], enable_gqa=True)
        hidden = model.finish_layer(layer, hidden, out[0].transpose(0, 1).reshape(total, -1))
    return model.logits(hidden[-1:])[0]


def test_recompute_ratio_zero_equals_block_masked_computation(model) -> None:
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    blended = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.0)
    assert blended.recomputed_chunk_tokens == 0
    torch.testing.assert_close(blended.logits, block_masked_logits(model, PREFIX, CHUNKS, SUFFIX),
                               atol=1e-4, rtol=1e-4)
    # ... and that differs from full prefill: context matters, which is what blending repairs.
    full, _ = full_prefill(model, PREFIX + [t for c in CHUNKS for t in c] + SUFFIX)
    assert (blended.logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.3, 0.5])
def test_selected_token_count_follows_the_ratio(model, ratio: float) -> None:
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    blended = blend_prefill(model, [PREFIX, *chunks, SUFFIX], ratio)
    chunk_tokens = sum(len(c) for c in CHUNKS)
    assert blended.chunk_tokens == chunk_tokens
    assert blended.recomputed_chunk_tokens == selected_count(chunk_tokens, ratio)


def test_blending_moves_towards_full_prefill_as_the_ratio_grows(model) -> None:
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    full, _ = full_prefill(model, PREFIX + [t for c in CHUNKS for t in c] + SUFFIX)
    gaps = [(blend_prefill(model, [PREFIX, *chunks, SUFFIX], r).logits - full).abs().mean().item()
            for r in (0.0, 0.5, 1.0)]
    assert gaps[0] > gaps[1] > gaps[2]


def test_bad_ratios_and_layouts_are_refused(model) -> None:
    chunks = [precompute_chunk(model, CHUNKS[0])]
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            blend_prefill(model, [PREFIX, *chunks, SUFFIX], ratio)
    with pytest.raises(ValueError, match="after the last chunk"):
        blend_prefill(model, [PREFIX, *chunks], 0.15)


def test_small_computed_segments_between_chunks_are_always_computed(model) -> None:
    # "[1] ", "[2] " markers between chunks are computed tokens; r = 1 still equals full prefill.
    marker_a, marker_b = random_ids(3, 8), random_ids(3, 9)
    chunks = [precompute_chunk(model, c) for c in CHUNKS[:2]]
    segments = [PREFIX, marker_a, chunks[0], marker_b, chunks[1], SUFFIX]
    blended = blend_prefill(model, segments, 1.0)
    expected, _ = full_prefill(model, PREFIX + marker_a + CHUNKS[0] + marker_b + CHUNKS[1] + SUFFIX)
    torch.testing.assert_close(blended.logits, expected, atol=1e-4, rtol=1e-4)
    assert blend_prefill(model, segments, 0.0).chunk_tokens == len(CHUNKS[0]) + len(CHUNKS[1])


@pytest.mark.parametrize("ratio", [0.0, 0.15, 1.0])
def test_an_exact_prefix_kv_changes_nothing_but_the_work(model, ratio: float) -> None:
    """The system prompt's KV computed alone from position 0 is what computing it in place gives, so reusing it
    leaves the blend's logits and cache as they were."""
    chunks = [precompute_chunk(model, c, PREFIX) for c in CHUNKS]
    prefix_kv = precompute_chunk(model, PREFIX)
    computed = blend_prefill(model, [PREFIX, *chunks, SUFFIX], ratio)
    reused = blend_prefill(model, [PREFIX, *chunks, SUFFIX], ratio, prefix_kv=prefix_kv)
    torch.testing.assert_close(reused.logits, computed.logits, atol=1e-4, rtol=1e-4)
    length = len(PREFIX) + sum(len(c) for c in CHUNKS) + len(SUFFIX)
    torch.testing.assert_close(reused.cache.keys[:, :, :length], computed.cache.keys[:, :, :length], atol=1e-4,
                               rtol=1e-4)
    assert reused.recomputed_chunk_tokens == computed.recomputed_chunk_tokens
    with pytest.raises(ValueError, match="prefix_kv"):
        blend_prefill(model, [SUFFIX, *chunks, SUFFIX], ratio, prefix_kv=prefix_kv)


def test_the_recomputed_count_is_aligned_to_whole_gemm_tiles_only_when_that_moves_it_little() -> None:
    from blendgate.chunkcache.selection import aligned_count

    assert aligned_count(614, 32, 4096, 128) == 608  # 640 computed rows instead of 646
    assert aligned_count(1229, 32, 8192, 128) == 1248  # 1280 rows
    assert aligned_count(308, 32, 2048, 128) == 308  # the nearest whole tile would move it by 14%
    assert aligned_count(614, 32, 4096, 1) == 614  # no alignment asked (the CPU default)
    assert aligned_count(0, 32, 4096, 128) == 0 and aligned_count(4096, 32, 4096, 128) == 4096  # r = 0 and 1 kept


RULES = [SelectionRule("value"), SelectionRule("key"), SelectionRule("kv"), SelectionRule("value", layer=2),
         SelectionRule("value", gradual=2.0), SelectionRule("value", sink_tokens=2), SelectionRule("attention"),
         SelectionRule("attention", probe_layers=2), SelectionRule("attention", sink_tokens=2),
         SelectionRule("attention_value"), SelectionRule("attention", chunk_budget="uniform"),
         SelectionRule("attention", drift_shift=1.0), SelectionRule("attention", probe_layers=2, drift_shift=0.5),
         SelectionRule("attention_key"), SelectionRule("attention", neighbours=2),
         # The probe with FP8 weights (emulated on the CPU: kernels/fp8.py), as the default rule otherwise.
         SelectionRule("attention", sink_tokens=2, drift_shift=0.5, probe_weights="fp8"),
         # The default (the probe over every 4th layer) and a stride that leaves layers on both sides.
         DEFAULT_RULE, SelectionRule("attention", probe_stride=3, sink_tokens=2, drift_shift=0.5)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.score}-l{r.layer}-p{r.probe_layers}-s{r.sink_tokens}"
                         f"-g{r.gradual}-{r.chunk_budget}-{r.probe_weights}-st{r.probe_stride}")
def test_every_rule_keeps_the_limits_and_follows_the_budget(model, rule: SelectionRule) -> None:
    """r = 1 is full prefill, r = 0 full reuse, and in between the rule recomputes the budgeted count."""
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    segments = [PREFIX, *chunks, SUFFIX]
    ids = PREFIX + [t for c in CHUNKS for t in c] + SUFFIX
    full, _ = full_prefill(model, ids)
    torch.testing.assert_close(blend_prefill(model, segments, 1.0, rule=rule).logits, full, atol=1e-4, rtol=1e-4)
    reused = blend_prefill(model, segments, 0.0, rule=rule)
    assert reused.recomputed_chunk_tokens == 0 and reused.compute_share == 0.0
    torch.testing.assert_close(reused.logits, block_masked_logits(model, PREFIX, CHUNKS, SUFFIX), atol=1e-4,
                               rtol=1e-4)
    chunk_tokens = sum(len(c) for c in CHUNKS)
    for ratio in (0.15, 0.5):
        blended = blend_prefill(model, segments, ratio, rule=rule)
        count = selected_count(chunk_tokens, ratio)
        assert blended.recomputed_chunk_tokens == count
        selected = blended.selected_rows.tolist()
        assert len(set(selected)) == count
        assert all(len(PREFIX) <= row < len(PREFIX) + chunk_tokens for row in selected)
        sinks = sink_count(rule, count, len(CHUNKS))  # at most half the budget
        if rule.sink_tokens:  # each chunk's first tokens are among the recomputed ones
            assert 0 < sinks <= rule.sink_tokens and sinks * len(CHUNKS) <= count // 2
            start = len(PREFIX)
            for chunk in CHUNKS:
                assert set(range(start, start + sinks)) <= set(selected)
                start += len(chunk)
        assert 0.0 < blended.compute_share < 1.0


def test_recomputing_a_selected_token_gives_its_kv_as_computed_in_full(model) -> None:
    """What is recomputed is right wherever the rule picked it: at r = 0.5 with the attention rule, each
    recomputed token's layer-0 KV equals full prefill's and its later layers moved toward it."""
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    ids = PREFIX + [t for c in CHUNKS for t in c] + SUFFIX
    _, full_cache = full_prefill(model, ids)
    blended = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.5, rule=SelectionRule("attention"))
    reused = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.0)
    rows = blended.selected_rows
    last = model.num_layers - 1
    blended_gap = (blended.cache.values[last][:, rows] - full_cache.values[last][:, rows]).abs().mean()
    reused_gap = (reused.cache.values[last][:, rows] - full_cache.values[last][:, rows]).abs().mean()
    assert blended_gap < reused_gap


@pytest.mark.parametrize("stride", [1, 2])
def test_the_question_scores_chunks_by_the_attention_it_pays_them(model, stride) -> None:
    """The probe's scores are the question rows' attention to each chunk token, summed over layers, heads and
    rows, in a full-reuse pass: the reference runs that pass with plain float64 attention. A strided probe
    (every second layer) skips the other layers: the residual stream goes on unchanged past them."""
    from blendgate.chunkcache.blend import ChunkLoader, _layout
    from blendgate.chunkcache.probe import probe_eager
    from blendgate.kernels.attention import reference_attention
    from blendgate.kernels.selection import attention_mass_reference

    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    layout = _layout([PREFIX, *chunks, SUFFIX], None)
    total = len(layout.ids)
    positions = torch.arange(total)
    cos, sin = model.rope(positions)

    def placed_cache():
        cache = model.new_cache(total)
        cache.positions[:total] = positions
        cache.length = total
        return cache

    cache = placed_cache()
    loader = ChunkLoader(cache, layout.placements, cos, sin, 0)
    layers = SelectionRule("attention", probe_stride=stride).probe_layer_ids(model.num_layers)
    mass = probe_eager(model, layout.ids, layout.other_rows, len(layout.vote_rows),
                       total, cache, loader.ready, cos, sin, model.num_layers if stride == 1 else layers)
    scores = mass[layout.chunk_rows]

    reference = placed_cache()
    ChunkLoader(reference, layout.placements, cos, sin, 0)
    rows = layout.other_rows
    vote = torch.tensor([i for i, row in enumerate(layout.other_rows) if row in layout.vote_rows])
    hidden = F.embedding(layout.ids[rows], model.embed_tokens)
    expected = torch.zeros(total)
    for layer in range(0, model.num_layers, stride):
        q, k, v = rotated_qkv(model, layer, hidden, cos[rows], sin[rows])
        reference.keys[layer][:, rows], reference.values[layer][:, rows] = k, v
        expected += attention_mass_reference(q[:, vote], reference.keys[layer], rows[vote], total)
        out = reference_attention(q, reference.keys[layer], reference.values[layer], rows, positions).float()
        hidden = model.finish_layer(layer, hidden, out.transpose(0, 1).reshape(len(rows), -1))
    torch.testing.assert_close(scores, expected[layout.chunk_rows], atol=1e-4, rtol=1e-4)
    # Each question row and head gives 1 in all at each layer, part of it to the chunks.
    assert 0 < scores.sum() < len(layers) * model.heads * len(layout.vote_rows)


@pytest.mark.parametrize("rule", [SelectionRule("attention"), SelectionRule("attention_value")],
                         ids=["attention", "attention_value"])
def test_the_quality_targeted_mode_spends_what_its_target_needs_within_the_cap(model, rule) -> None:
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    segments = [PREFIX, *chunks, SUFFIX]
    counts = []
    for target in (0.3, 0.6, 0.9, 1.0):
        blended = blend_prefill(model, segments, 0.8, rule=rule, target_fidelity=target)
        cap = selected_count(blended.chunk_tokens, 0.8)
        assert blended.recomputed_chunk_tokens <= cap
        assert blended.covered is not None
        assert blended.covered >= target or blended.recomputed_chunk_tokens == cap
        counts.append(blended.recomputed_chunk_tokens)
    assert counts == sorted(counts) and counts[0] < counts[-1]
    with pytest.raises(ValueError, match="fidelity target"):
        blend_prefill(model, segments, 0.5, rule=rule, target_fidelity=0.0)
    with pytest.raises(ValueError, match="gradual"):
        blend_prefill(model, segments, 0.5, rule=SelectionRule("value", gradual=2.0), target_fidelity=0.5)


def test_continuing_a_computed_prefix_gives_the_chunk_kv_computing_it_whole_gives(model) -> None:
    prefix_cache = model.new_cache(len(PREFIX))
    model.forward(torch.tensor(PREFIX), None, prefix_cache)
    whole = precompute_chunk(model, CHUNKS[0], PREFIX)
    continued = precompute_chunk(model, CHUNKS[0], PREFIX, prefix_cache=prefix_cache)
    torch.testing.assert_close(continued.keys, whole.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(continued.values, whole.values, atol=1e-5, rtol=1e-5)
    assert prefix_cache.length == len(PREFIX)  # the prefix's own cache is left as it was, for the next chunk


@pytest.mark.parametrize("options", [{}, {"sink_tokens": 2, "drift_sinks": False}, {"drift_bins": 4},
                                     {"sink_tokens": 2, "drift_sinks": False, "drift_bins": 4}])
def test_the_drift_shift_moves_the_kv_not_recomputed_toward_full_prefill(model, options) -> None:
    """Each chunk's unrecomputed tokens get the mean drift its recomputed tokens showed: their KV ends nearer
    full prefill's than without the shift; so too with the sinks left out of the means, or a mean per part of
    each chunk."""
    chunks = [precompute_chunk(model, c, PREFIX) for c in CHUNKS]
    ids = PREFIX + [t for c in CHUNKS for t in c] + SUFFIX
    _, full_cache = full_prefill(model, ids)
    sinks = options.get("sink_tokens", 0)
    plain = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.3, rule=SelectionRule("attention", sink_tokens=sinks))
    shifted = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.3,
                            rule=SelectionRule("attention", drift_shift=1.0, **options))
    assert plain.selected_rows.tolist() == shifted.selected_rows.tolist()
    stale = [row for row in range(len(PREFIX), len(PREFIX) + plain.chunk_tokens)
             if row not in set(plain.selected_rows.tolist())]

    def gap(result) -> float:
        return float(sum((result.cache.keys[layer][:, stale] - full_cache.keys[layer][:, stale]).norm()
                         for layer in range(1, model.num_layers)))

    assert gap(shifted) < gap(plain)


def test_neighbours_recompute_spans_around_the_best_tokens_within_each_chunk() -> None:
    """With `neighbours`, a token scores as its best neighbour within its chunk: the budget goes to spans."""
    from blendgate.chunkcache.blend import _choose

    score = torch.tensor([0.0, 5, 0, 0, 0, 0, 9, 0, 0, 1])  # two chunks of 5: the 9 spans 5..7, not 4
    assert _choose(SelectionRule("attention", neighbours=1), score, 3, [5, 5]).tolist() == [5, 6, 7]
    assert _choose(SelectionRule("attention"), score, 3, [5, 5]).tolist() == [1, 6, 9]


def test_the_drift_shift_measures_each_chunks_sensitivity(model) -> None:
    """chunk_drift: per chunk, the mean squared KV change of its recomputed tokens; NaN where none was."""
    chunks = [precompute_chunk(model, c) for c in CHUNKS]
    shifted = blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.5, rule=SelectionRule("attention", drift_shift=0.5))
    assert shifted.chunk_drift is not None and shifted.chunk_drift.shape == (len(CHUNKS),)
    measured = shifted.chunk_drift[~shifted.chunk_drift.isnan()]
    assert measured.numel() >= 1 and (measured > 0).all()
    assert blend_prefill(model, [PREFIX, *chunks, SUFFIX], 0.5, rule=SelectionRule("attention")).chunk_drift is None


def test_the_drift_means_leave_the_sinks_out_and_follow_the_parts(model) -> None:
    """The weights that average the recomputed tokens' deltas: each mean's weights sum to 1; with skip_first the
    sinks weigh nothing; with bins each stale token reads its own part's mean, which weighs its part's
    recomputed tokens most."""
    from blendgate.chunkcache.blend import _DriftShift

    cache = model.new_cache(64)
    chunk_of = torch.tensor([-1] * 4 + [0] * 20 + [1] * 20 + [-1] * 4)
    chunk_slots = torch.arange(4, 44)
    start, length = torch.tensor([4, 24]), torch.tensor([20, 20])
    cos, sin = model.rope_table(64)
    shift = _DriftShift(model, cache, 2, chunk_of, chunk_slots, cos, sin, 0.5, start, length, skip_first=2, bins=2)
    recomputed = torch.tensor([4, 5, 10, 20, 24, 25, 40])  # chunk 0: sinks 4, 5; 10 in part 0, 20 in part 1
    shift.select(recomputed, torch.arange(7))
    weights = shift.weights  # [chunks * bins, recomputed]
    assert weights.shape == (4, 7)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    assert (weights[:, [0, 1, 4, 5]] == 0).all()  # every sink out of every mean
    assert weights[0, 2] > weights[0, 3] and weights[1, 3] > weights[1, 2]  # each part leans on its own token
    assert shift.stale_chunk[shift.stale.tolist().index(6)] == 0  # slot 6: chunk 0, part 0
    assert shift.stale_chunk[shift.stale.tolist().index(30)] == 2  # slot 30: chunk 1, part 0
    assert shift.stale_chunk[shift.stale.tolist().index(43)] == 3


@pytest.mark.parametrize("prefix", [[], PREFIX])
def test_chunks_computed_side_by_side_are_each_computed_alone(model, prefix, monkeypatch) -> None:
    """precompute_chunks: one pass over chunks of different lengths (padded at their ends), each attending to the
    prefix and itself only, gives precompute_chunk's KV and channel weights for each; past BATCH_CHUNK_TOKENS
    the chunks go to further passes, with the same numbers."""
    alone = [precompute_chunk(model, chunk, prefix, channel_weights=True) for chunk in CHUNKS]
    for batch_tokens in (8192, 30):  # one pass; and two (12 + 9 padded to 24 fit 30, the 15 goes on)
        monkeypatch.setattr(blend_module, "BATCH_CHUNK_TOKENS", batch_tokens)
        together = precompute_chunks(model, CHUNKS, prefix, channel_weights=True)
        assert len(together) == len(CHUNKS)
        for one, other in zip(alone, together):
            assert torch.equal(one.token_ids, other.token_ids) and one.keys.shape == other.keys.shape
            torch.testing.assert_close(other.keys, one.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other.values, one.values, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other.weights.keys, one.weights.keys, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        precompute_chunks(model, [CHUNKS[0], []])


def test_blends_run_together_give_each_prompts_own_blend(model) -> None:
    # blend_prefill_batch: the layers' matrix products over the computed rows of every prompt at once, each
    # prompt's selection and attention its own; a deviation rule (selecting at layer 1) runs alone beside them.
    from blendgate.chunkcache.blend import BlendJob, blend_prefill_batch

    prefix_kv = precompute_chunk(model, PREFIX)
    kvs = [precompute_chunk(model, chunk, PREFIX) for chunk in CHUNKS]
    other = [random_ids(7, 6), random_ids(11, 7)]
    other_kvs = [precompute_chunk(model, chunk, PREFIX) for chunk in other]
    jobs = [BlendJob([list(PREFIX), *kvs, list(SUFFIX)], 0.3, prefix_kv),
            BlendJob([list(PREFIX), *other_kvs, random_ids(4, 8)], 0.5, prefix_kv, logits=False),
            BlendJob([list(PREFIX), kvs[1], other_kvs[0], list(SUFFIX)], 1.0, prefix_kv),  # r = 1: every row
            BlendJob([list(PREFIX), *kvs, list(SUFFIX)], 0.0, prefix_kv),  # r = 0: no chunk row
            BlendJob([list(PREFIX), *other_kvs, list(SUFFIX)], 0.3, prefix_kv, rule=SelectionRule(score="value"))]
    together = blend_prefill_batch(model, jobs)
    for job, result in zip(jobs, together):
        alone = blend_prefill(model, job.segments, job.recompute_ratio, prefix_kv=job.prefix_kv, logits=job.logits,
                              rule=job.rule)
        assert result.recomputed_chunk_tokens == alone.recomputed_chunk_tokens
        assert torch.equal(result.selected_rows, alone.selected_rows)
        if job.logits:
            torch.testing.assert_close(result.logits, alone.logits, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(result.hidden, alone.hidden, atol=1e-5, rtol=1e-5)
        length = alone.cache.length
        assert result.cache.length == length
        torch.testing.assert_close(result.cache.keys[:, :, :length], alone.cache.keys[:, :, :length],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.cache.values[:, :, :length], alone.cache.values[:, :, :length],
                                   atol=1e-5, rtol=1e-5)
