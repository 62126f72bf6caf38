"""The cachegen codec's rANS coder (chunkcache/codec/rans.py, kernels/rans.py): lossless over random symbols,
tables and shapes (edge symbols, single tokens, lanes sharing channels), damaged streams refused, the quantised
tables, and the Triton kernel against the reference where Triton runs on the CPU (TRITON_INTERPRET=1; CI has
no Triton: skipped there; the CUDA run is tests/gpu/test_rans_kernel.py)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from blendgate.chunkcache.adaptation import GPU_DECODE_BYTES_PER_S, decode_rate
from blendgate.chunkcache.codec import entropy, rans
from blendgate.chunkcache.codec.cachegen import GROUP_TOKENS, CacheGenCodec, layer_groups
from blendgate.chunkcache.codec.frame import Codec, _safetensors_metadata, entry_body
from blendgate.chunkcache.redis_tier import RedisTier
from blendgate.chunkcache.tiers import DiskTier
from blendgate.kernels import rans as decoders
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from test_codec import assert_within_bound, key_of, kv_like, reframed, relative_error


def streams_of(symbols: np.ndarray, halves: tuple[int, int], shapes: np.ndarray,
               layers: int = 1) -> decoders.GroupStreams:
    """symbols [channels, tokens] coded as one layer group (dequantisation parameters: identity-like)."""
    encoded = rans.encode(symbols, shapes, tuple(entropy.frequencies(h) for h in halves),
                          tuple(entropy.cumulative(h) for h in halves), GROUP_TOKENS)
    channels = symbols.shape[0]
    tables = torch.from_numpy(np.stack([entropy.slot_table(h) for h in halves]))
    ones = torch.ones(channels, dtype=torch.bfloat16)
    return decoders.GroupStreams(layers, torch.from_numpy(encoded.words.view(np.int16).copy()),
                                 torch.from_numpy(encoded.offsets), torch.from_numpy(encoded.states.view(np.int32)),
                                 tables, torch.from_numpy(shapes), ones * 0, ones, ones,
                                 torch.zeros(channels, dtype=torch.bool))


def random_symbols(rng: np.random.Generator, channels: int, tokens: int, halves: tuple[int, int],
                   spread: float) -> np.ndarray:
    """Laplace-like symbols clipped to each position's alphabet, with the edge symbols forced in somewhere."""
    symbols = np.empty((channels, tokens), dtype=np.int64)
    anchor = np.arange(tokens) % GROUP_TOKENS == 0
    for which, half in enumerate(halves):
        columns = anchor if which == 0 else ~anchor
        drawn = np.clip(np.round(rng.laplace(0, spread, (channels, int(columns.sum())))), -half, half)
        if drawn.size:
            drawn.flat[rng.integers(drawn.size)] = half
            drawn.flat[rng.integers(drawn.size)] = -half
        symbols[:, columns] = drawn
    return symbols


@settings(max_examples=60, deadline=None)
@given(channels=st.integers(1, 80), tokens=st.integers(1, 60), anchor_half=st.integers(1, 127),
       other_half=st.integers(1, 127), spread=st.sampled_from([0.01, 0.7, 5.0, 300.0]), seed=st.integers(0, 2**16),
       fit=st.booleans())
def test_the_coder_is_lossless(channels, tokens, anchor_half, other_half, spread, seed, fit) -> None:
    rng = np.random.default_rng(seed)
    halves = (anchor_half, other_half)
    symbols = random_symbols(rng, channels, tokens, halves, spread)
    anchor = np.arange(tokens) % GROUP_TOKENS == 0
    if fit:  # the shapes the codec would choose
        shapes = np.stack([entropy.choose_shapes(symbols[:, anchor], anchor_half),
                           entropy.choose_shapes(symbols[:, ~anchor], other_half)])
    else:  # any shape, however badly it fits (the uniform one included)
        shapes = rng.integers(0, entropy.SHAPES, (2, channels)).astype(np.uint8)
    group = streams_of(symbols, halves, shapes)
    assert np.array_equal(decoders.decode_symbols(group, tokens, GROUP_TOKENS), symbols)


def test_lanes_share_channels_of_short_chunks_and_blocks_split_long_ones() -> None:
    assert decoders.lane_shape(1920, 121) == (5, 384)
    assert decoders.lane_shape(11264, 512) == (1, 11264)
    assert decoders.lane_shape(7, 1) == (7, 1)
    rng = np.random.default_rng(0)
    for channels, tokens in ((1920, 121), (70, 512), (3, 1)):
        symbols = random_symbols(rng, channels, tokens, (20, 9), 2.0)
        group = streams_of(symbols, (20, 9), np.zeros((2, channels), dtype=np.uint8))
        assert np.array_equal(decoders.decode_symbols(group, tokens, GROUP_TOKENS), symbols)


def test_the_tables_are_exact_and_every_symbol_codable() -> None:
    for half in (1, 2, 37, 127):
        table = entropy.frequencies(half)
        assert (table.sum(axis=1) == decoders.PROB_SCALE).all()
        alphabet = table[:, decoders.SYMBOL_OFFSET - half:decoders.SYMBOL_OFFSET + half + 1]
        assert (alphabet >= 1).all() and (alphabet < 1 << 12).all()
        assert (table.sum(axis=1) == alphabet.sum(axis=1)).all()
        packed = entropy.slot_table(half).view(np.uint32).astype(np.int64)
        symbols = (packed & 0xFF) - decoders.SYMBOL_OFFSET
        assert np.array_equal(np.bincount((symbols + half).ravel(), minlength=2 * half + 1),
                              alphabet.sum(axis=0))
    with pytest.raises(ValueError):
        entropy.frequencies(128)


def test_damaged_streams_are_errors() -> None:
    rng = np.random.default_rng(3)
    symbols = random_symbols(rng, 100, 40, (30, 12), 3.0)
    group = streams_of(symbols, (30, 12), np.full((2, 100), 10, dtype=np.uint8))
    words, offsets, states = group.words.clone(), group.offsets.clone(), group.states.clone()
    words[words.shape[0] // 2] ^= 0x0100
    offsets[1] += 1
    states[5] ^= 1 << 20
    shapes = group.shapes.clone()
    shapes[0, 3] = 255  # not a shape of the family
    for damaged in (replace(group, words=words), replace(group, words=group.words[:-3]),
                    replace(group, offsets=offsets), replace(group, states=states), replace(group, shapes=shapes)):
        with pytest.raises(ValueError, match="damaged"):
            decoders.decode_symbols(damaged, 40, GROUP_TOKENS)


def test_entries_of_the_old_format_or_with_damaged_streams_are_misses() -> None:
    kv = kv_like(11, tokens=45)
    codec = Codec("cachegen", 1)
    data = codec.encode(key_of(kv), kv)
    assert codec.decode(key_of(kv), data) is not None
    stored = load_tensors(entry_body(data))
    assert codec.decode(key_of(kv), reframed(data, {"keys.format": torch.tensor([1], dtype=torch.int32)})) is None
    # An entry of format 1 (the range coder's) has no format part.
    body = save_tensors({name: value for name, value in stored.items() if not name.endswith("format")},
                        metadata=_safetensors_metadata(entry_body(data)))
    assert codec.decode(key_of(kv), b"BGKV1" + hashlib.sha256(body).digest() + body) is None
    # Format 2 (a byte per channel for the anchor choice, both bin widths for every channel) is a miss too, as
    # is format 4 with its channel parameters damaged.
    channels = stored["keys.0.width"].shape[0]
    format_2 = {"keys.format": torch.tensor([2], dtype=torch.int32), "keys.0.delta_width": stored["keys.0.width"],
                "keys.0.delta": torch.zeros(channels, dtype=torch.bool)}
    assert codec.decode(key_of(kv), reframed(data, format_2)) is None
    # Format 3 (bin widths in bf16, no codes' base) is a miss, whichever format number it carries.
    format_3 = {"keys.0.width": stored["keys.0.width"].bfloat16(), "keys.0.anchor_width":
                stored["keys.0.anchor_width"].bfloat16()}
    for number in (3, 4):
        format_3["keys.format"] = torch.tensor([number], dtype=torch.int32)
        assert codec.decode(key_of(kv), reframed(data, format_3)) is None
    for damaged in ({"keys.0.delta": stored["keys.0.delta"][:-1].clone()},
                    {"keys.0.delta": torch.full_like(stored["keys.0.delta"], 255)},  # more anchor widths than stored
                    {"keys.0.anchor_width": torch.zeros(3, dtype=torch.float32)},
                    {"values.2.width": stored["values.2.width"][1:].clone()},
                    {"values.1.base": torch.tensor([0, 1], dtype=torch.int32)}):
        assert codec.decode(key_of(kv), reframed(data, damaged)) is None
    words = stored["values.1.words"].clone()
    words[len(words) // 3] ^= 0x0040
    assert codec.decode(key_of(kv), reframed(data, {"values.1.words": words})) is None
    assert codec.decode(key_of(kv), reframed(data, {"values.1.words": words[:-1].clone()})) is None
    assert codec.decode(key_of(kv), reframed(data, {"keys.0.states": stored["keys.0.states"][:-1].clone()})) is None


def test_the_tiers_decode_cachegen_entries_on_the_blends_gpu_and_others_on_the_host(tmp_path) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert Codec("cachegen", 0).decode_device("cuda") == cuda
    assert Codec("cachegen", 0).decode_device("cpu") == cpu
    for name in ("raw", "int8", "int4"):  # a copy: streamed up from pinned host memory by the blend instead
        assert Codec(name).decode_device("cuda") == cpu
    assert DiskTier("disk", 1 << 20, tmp_path, Codec("cachegen", 2), device="cuda").decode_device == cuda
    assert DiskTier("disk", 1 << 20, tmp_path, Codec("int4"), device="cuda").decode_device == cpu
    kv = kv_like(12, tokens=15)
    tier = DiskTier("disk", 1 << 20, tmp_path, Codec("cachegen", 2), device="cpu")
    tier.write(key_of(kv), kv)
    assert tier.read(key_of(kv)).keys.device == cpu


def test_the_fetch_policy_counts_gpu_decoding_where_the_tier_decodes_on_the_gpu(redis_server) -> None:
    assert decode_rate("cachegen", 0, on_gpu=True) == GPU_DECODE_BYTES_PER_S[("cachegen", 0)]
    assert decode_rate("cachegen", 0, on_gpu=True) > 100 * decode_rate("cachegen", 0)
    assert decode_rate("int4", 0, on_gpu=True) == decode_rate("int4", 0)  # decoded on the host, streamed up
    tier = RedisTier(redis_server.url, 1 << 20, key_prefix="test:rans-device", codec=Codec("cachegen", 1),
                     device="cuda")
    try:
        assert tier.decode_device == torch.device("cuda") and not tier._pin
    finally:
        tier.close()


needs_interpreter = pytest.mark.skipif(
    decoders.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernel on CPU tensors needs triton and TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("shape", [(3, 2, 23, 8), (4, 1, 1, 3), (2, 1, 41, 4)])
@pytest.mark.parametrize("level", [0, 3])
def test_the_triton_kernel_matches_the_reference_under_the_interpreter(shape, level) -> None:
    layers, heads, tokens, dim = shape
    kv = kv_like(level, layers, heads, tokens, dim, dtype=torch.bfloat16)
    codec = CacheGenCodec(level)
    # Keys' and values' groups in one launch, as the codec decodes an entry.
    groups = [codec._group(parts, g, len(r), heads * dim, torch.device("cpu"))
              for parts in (codec.encode(kv.keys, "keys"), codec.encode(kv.values, "values"))
              for g, r in enumerate(layer_groups(layers))]
    for dtype in (torch.float32, torch.bfloat16):
        expected = decoders.decode_reference(groups, heads, tokens, dim, GROUP_TOKENS, dtype, "cpu")
        got = decoders.decode_triton(groups, heads, tokens, dim, GROUP_TOKENS, dtype, torch.device("cpu"))
        assert got.shape == (2 * layers, heads, tokens, dim)
        # float32: the same roundings; bf16: the interpreter's conversion may round another way than torch's.
        assert torch.equal(got, expected) if dtype == torch.float32 else torch.allclose(
            got.float(), expected.float(), rtol=2 ** -7, atol=0)
    words = groups[-1].words.clone()
    shapes, offsets = groups[0].shapes.clone(), groups[0].offsets.clone()
    shapes[1, -1], offsets[0] = 99, 1 << 20  # not a shape of the family; past the words
    damaged = [[replace(groups[0], shapes=shapes), *groups[1:]], [replace(groups[0], offsets=offsets), *groups[1:]]]
    if len(words):
        words[len(words) // 2] ^= 0x0100
        damaged.append([*groups[:-1], replace(groups[-1], words=words)])
    for streams in damaged:
        with pytest.raises(ValueError, match="damaged"):
            decoders.decode_triton(streams, heads, tokens, dim, GROUP_TOKENS, torch.bfloat16, torch.device("cpu"))


def test_host_parts_join_as_torch_cat_joins_them() -> None:
    from blendgate.kernels.rans import _concatenated

    kv = kv_like(12, tokens=45)
    stored = load_tensors(entry_body(Codec("cachegen", 0).encode(key_of(kv), kv)))
    words = [value for name, value in stored.items() if name.endswith("words")]
    assert torch.equal(_concatenated(words), torch.cat(words))
    halves = [torch.randn(5).bfloat16(), torch.randn(3).bfloat16()]
    assert torch.equal(_concatenated(halves), torch.cat(halves))


def test_every_level_keeps_the_first_token_and_errs_within_its_stated_bound() -> None:
    """The first token (an attention sink where the entry begins the prompt) comes back exactly; the relative
    (Frobenius) error on this fixed seed stays under each level's bound: keys offset and alike along the tokens,
    values Gaussian (no structure to exploit: the harder case)."""
    kv = kv_like(13, tokens=60)
    # Level 0's values: 1 / 0.7 / 0.5 bins per standard deviation by third, a bin's uniform error sqrt(1/12) of
    # its width: about 0.44 of the values' spread on Gaussian values.
    bounds = {0: (0.06, 0.5), 1: (0.03, 0.18), 2: (0.015, 0.09), 3: (0.005, 0.035)}
    for level, (keys_bound, values_bound) in bounds.items():
        codec = Codec("cachegen", level)
        decoded = codec.decode(key_of(kv), codec.encode(key_of(kv), kv))
        assert torch.equal(decoded.keys[:, :, 0], kv.keys[:, :, 0])
        assert torch.equal(decoded.values[:, :, 0], kv.values[:, :, 0])
        assert relative_error(decoded.keys, kv.keys) < keys_bound
        assert relative_error(decoded.values, kv.values) < values_bound


def test_encoding_leaves_its_input_as_it_was() -> None:
    """The sinks' values are replaced in the encoder's own copy, never in the caller's tensor (a float32 host
    tensor, the store's own, would otherwise come back changed)."""
    kv = kv_like(14, tokens=30)
    keys = kv.keys.clone()
    CacheGenCodec(0).encode(kv.keys, "keys")
    assert torch.equal(kv.keys, keys)


def test_width_codes_keep_every_value_within_half_its_bin_on_a_log_scale() -> None:
    """Bin widths travel as 8-bit codes, WIDTH_STEPS a doubling: each code's width is 2^(1 / WIDTH_STEPS) times
    the one below it; the codes' base puts a group's widest possible width at the top code."""
    from blendgate.chunkcache.codec.cachegen import WIDTH_STEPS, widths_of

    widths = widths_of(torch.arange(256, dtype=torch.uint8), -100).float()
    steps = widths[1:] / widths[:-1]
    assert torch.allclose(steps, torch.full_like(steps, 2 ** (1 / WIDTH_STEPS)), rtol=2 ** -7)
    kv = kv_like(16, tokens=70)
    kv = type(kv)(kv.token_ids, kv.keys * 1e-3, kv.values * 300.0)  # scales far from 1 code alike
    data = Codec("cachegen", 0).encode(key_of(kv), kv)
    assert_within_bound(Codec("cachegen", 0).decode(key_of(kv), data), kv, data)


def test_keys_and_values_take_their_own_ladders_and_the_leading_tokens_kept(monkeypatch) -> None:
    """A level's keys and values ladders set each layer slice's bin widths (a wider bin where fewer bins), its
    `sink_tokens` come back exactly, and an entry keeping another number of leading tokens than the level's
    decodes by its own count."""
    from blendgate.chunkcache.codec import cachegen

    kv = kv_like(15, layers=6, tokens=50)
    levels = (cachegen.LevelBins((1.0, 1.0, 4.0), (4.0, 1.0, 1.0), sink_tokens=1),
              cachegen.LevelBins((1.0, 1.0, 4.0), (4.0, 1.0, 1.0), sink_tokens=3))
    monkeypatch.setattr(cachegen, "LEVEL_BINS", levels)
    monkeypatch.setattr(CacheGenCodec, "levels", len(levels))
    for level, sinks in ((0, 1), (1, 3)):
        codec = CacheGenCodec(level)
        same = kv.keys.clone()
        as_keys, as_values = codec.encode(same, "keys"), codec.encode(same, "values")
        # The same tensor, coded as keys (fine in the last third) and as values (fine in the first).
        assert (as_keys["2.width"].float() < as_values["2.width"].float()).float().mean() > 0.9
        assert (as_keys["0.width"].float() > as_values["0.width"].float()).float().mean() > 0.9
        assert torch.equal(as_keys["1.width"], as_values["1.width"])
        data = Codec("cachegen", level).encode(key_of(kv), kv)
        decoded = Codec("cachegen", level).decode(key_of(kv), data)
        assert torch.equal(decoded.keys[:, :, :sinks], kv.keys[:, :, :sinks])
        assert torch.equal(decoded.values[:, :, :sinks], kv.values[:, :, :sinks])
        assert not torch.equal(decoded.values[:, :, sinks], kv.values[:, :, sinks])
        # Read by the other level's codec (same format, another count of leading tokens): as it was written.
        other = Codec("cachegen", 1 - level)
        reread = other.decode(key_of(kv), reframed(data, level=str(1 - level)))
        assert reread is not None and torch.equal(reread.keys, decoded.keys)
        stored = load_tensors(entry_body(data))
        wrong = {"values.0.first": stored["values.0.first"][:-1].clone()}
        assert Codec("cachegen", level).decode(key_of(kv), reframed(data, wrong)) is None
