"""The chunk-cache entries' codecs (chunkcache/codec/): round trips per codec and level within each one's error
bound, raw's exactness and its reading of entries written before codecs, refusal of damaged and mismatched
entries, random shapes and dtypes, the disk tier and store storing each codec, and the setting."""

from __future__ import annotations

import hashlib

import pytest
import torch
from blendgate.chunkcache.codec import KV_CODECS, Codec, KVLayout, kv_codec
from blendgate.chunkcache.codec.cachegen import CacheGenCodec, layer_groups
from blendgate.chunkcache.codec.frame import _safetensors_metadata, entry_body
from blendgate.chunkcache.defaults import CODEC_LEVELS
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.redis_tier import RedisTier
from blendgate.chunkcache.tiers import DiskTier, MemoryTier
from blendgate.gateway.config import ChunkCacheSettings
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

ALL = [(name, level) for name, levels in CODEC_LEVELS.items() for level in range(levels)]


def kv_like(seed: int, layers: int = 6, heads: int = 2, tokens: int = 37, dim: int = 16,
            dtype: torch.dtype = torch.float32) -> ChunkKV:
    """KV with what real KV has: per-channel offsets, neighbouring tokens alike (a random walk) in the keys."""
    generator = torch.Generator().manual_seed(seed)
    offsets = 3 * torch.randn(layers, heads, 1, dim, generator=generator)
    keys = offsets + 0.2 * torch.randn(layers, heads, tokens, dim, generator=generator).cumsum(dim=2)
    values = torch.randn(layers, heads, tokens, dim, generator=generator)
    return ChunkKV(torch.randint(0, 50_000, (tokens,), generator=generator), keys.to(dtype), values.to(dtype))


def key_of(kv: ChunkKV, model: str = "m") -> ChunkKey:
    return ChunkKey.of(model, [1, 2], kv.token_ids.tolist())


def stored_bound(data: bytes, tensor_name: str, layout: KVLayout) -> torch.Tensor:
    """The most each channel's values may be off after a round trip, [layers, heads, 1, dim]: half the widest
    bin the entry records for the channel (0 for raw)."""
    tensors = load_tensors(entry_body(data))
    metadata = _safetensors_metadata(entry_body(data))
    layers, heads, _, dim = layout.shape
    if metadata["codec"] == "raw":
        return torch.zeros(layers, heads, 1, dim)
    if metadata["codec"] in ("int8", "int4"):
        return tensors[f"{tensor_name}.width"].float() / 2
    bound = torch.empty(layers, heads, 1, dim)
    for group, layer_range in enumerate(layer_groups(layers)):
        parts = {name.split(".", 1)[1]: value for name, value in tensors.items() if name.startswith(tensor_name)}
        streams = CacheGenCodec._group(parts, group, len(layer_range), heads * dim, torch.device("cpu"))
        widths = torch.maximum(streams.anchor_width.float(), streams.delta_width.float())
        bound[layer_range.start:layer_range.stop] = widths.reshape(len(layer_range), heads, dim)[:, :, None] / 2
    return bound


def assert_within_bound(decoded: ChunkKV, original: ChunkKV, data: bytes) -> None:
    """Keys and values within the entry's bin widths, of the original's shape and dtype."""
    for tensor_name in ("keys", "values"):
        got, want = getattr(decoded, tensor_name), getattr(original, tensor_name)
        assert got.shape == want.shape and got.dtype == want.dtype
        error = (got.float() - want.float()).abs()
        # The output's own rounding (bf16: 8 bits of mantissa) comes on top of the codec's bound.
        rounding = want.float().abs() * torch.finfo(want.dtype).eps + 1e-7
        assert (error <= stored_bound(data, tensor_name, KVLayout.of(want)) * 1.0001 + rounding).all()


def relative_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return float((decoded.float() - original.float()).norm() / original.float().norm())


def round_trip(name: str, level: int, kv: ChunkKV) -> tuple[ChunkKV, bytes]:
    codec = Codec(name, level)
    data = codec.encode(key_of(kv), kv)
    decoded = codec.decode(key_of(kv), data)
    assert decoded is not None
    return decoded, data


@pytest.mark.parametrize(("name", "level"), ALL)
def test_round_trip_within_the_codecs_bound(name: str, level: int) -> None:
    kv = kv_like(1)
    decoded, data = round_trip(name, level, kv)
    assert torch.equal(decoded.token_ids, kv.token_ids)
    assert_within_bound(decoded, kv, data)
    if name != "raw":  # the bound is a bin's half: a few percent of the channel's spread, not more
        spread = kv.values.amax(dim=2, keepdim=True) - kv.values.amin(dim=2, keepdim=True)
        assert (stored_bound(data, "values", KVLayout.of(kv.values)) < 0.6 * spread).all()


def test_raw_is_exact_and_the_default() -> None:
    kv = kv_like(2, dtype=torch.bfloat16)
    decoded = Codec().decode(key_of(kv), Codec().encode(key_of(kv), kv))
    assert decoded is not None and torch.equal(decoded.keys, kv.keys) and torch.equal(decoded.values, kv.values)
    assert Codec().kv_codec.name == "raw"


def test_levels_trade_size_for_error_and_cachegen_beats_int4_on_alike_tokens() -> None:
    generator = torch.Generator().manual_seed(3)

    def walk() -> torch.Tensor:  # per-channel offsets, neighbouring tokens alike
        offsets = 3 * torch.randn(6, 2, 1, 32, generator=generator)
        return (offsets + 0.2 * torch.randn(6, 2, 200, 32, generator=generator).cumsum(dim=2)).bfloat16()

    kv = ChunkKV(torch.arange(200), walk(), walk())
    sizes, errors = {}, {}
    for name, level in ALL:
        decoded, data = round_trip(name, level, kv)
        sizes[name, level] = len(data)
        errors[name, level] = relative_error(decoded.keys, kv.keys) + relative_error(decoded.values, kv.values)
    cachegen = [("cachegen", level) for level in range(CODEC_LEVELS["cachegen"])]
    assert [sizes[c] for c in cachegen] == sorted(sizes[c] for c in cachegen)
    assert [errors[c] for c in cachegen] == sorted((errors[c] for c in cachegen), reverse=True)
    assert sizes["raw", 0] > sizes["int8", 0] > sizes["int4", 0]
    assert errors["raw", 0] == 0 < errors["int8", 0] < errors["int4", 0]
    # Deltas against anchors pay here: cachegen's level 1 is both smaller and more exact than int4; its smallest
    # level is over 4.5x smaller than bf16, its most exact within 1% (relative Frobenius error).
    assert sizes["cachegen", 1] < sizes["int4", 0] and errors["cachegen", 1] < 0.9 * errors["int4", 0]
    assert sizes["raw", 0] / sizes["cachegen", 0] > 4.5
    assert errors["cachegen", 3] < 0.01


def test_entries_written_before_codecs_read_as_raw() -> None:
    kv = kv_like(4, dtype=torch.bfloat16)
    key = key_of(kv)
    body = save_tensors({"token_ids": kv.token_ids, "keys": kv.keys, "values": kv.values},
                        metadata={"key": key.name})
    old = b"BGKV1" + hashlib.sha256(body).digest() + body
    decoded = Codec().decode(key, old)
    assert decoded is not None and torch.equal(decoded.keys, kv.keys) and torch.equal(decoded.values, kv.values)
    assert Codec("int8").decode(key, old) is None  # an entry of another codec is a miss


def reframed(data: bytes, tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> bytes:
    """The entry with its tensors or metadata changed and a valid checksum (damage the checksum cannot see)."""
    body = entry_body(data)
    stored = load_tensors(body)
    stored.update(tensors or {})
    body = save_tensors(stored, metadata={**_safetensors_metadata(body), **metadata})
    return b"BGKV1" + hashlib.sha256(body).digest() + body


@pytest.mark.parametrize(("name", "level"), [("raw", 0), ("int4", 0), ("cachegen", 1)])
def test_damaged_or_mismatched_entries_are_refused(name: str, level: int) -> None:
    kv, other = kv_like(5), kv_like(6)
    codec = Codec(name, level)
    data = codec.encode(key_of(kv), kv)
    assert codec.decode(key_of(kv), data) is not None
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    assert codec.decode(key_of(kv), bytes(flipped)) is None
    assert codec.decode(key_of(kv), data[:-10]) is None
    assert codec.decode(key_of(kv), data[:20]) is None
    assert codec.decode(key_of(kv), b"") is None
    assert codec.decode(key_of(other), data) is None  # another chunk's key
    assert codec.decode(key_of(kv, model="other"), data) is None
    for name_, level_ in ALL:
        if (name_, level_) != (name, level):
            assert Codec(name_, level_).decode(key_of(kv), data) is None
    assert codec.decode(key_of(kv), reframed(data, codec="int8" if name != "int8" else "raw")) is None
    assert codec.decode(key_of(kv), reframed(data, level="7")) is None
    assert codec.decode(key_of(kv), reframed(data, shape="6,2,36,16")) is None
    assert codec.decode(key_of(kv), reframed(data, shape="6,2,37,8")) is None
    if name == "raw":  # quantised parts decode to the dtype recorded (under the checksum): nothing to disagree
        assert codec.decode(key_of(kv), reframed(data, dtype="float16")) is None
    assert codec.decode(key_of(kv), reframed(data, dtype="int8")) is None
    assert codec.decode(key_of(kv), reframed(data, shape="x")) is None
    parts = {tensor: value for tensor, value in load_tensors(entry_body(data)).items() if tensor.startswith("values")}
    truncated = {tensor: value.flatten()[:-1].clone() for tensor, value in parts.items()}
    assert codec.decode(key_of(kv), reframed(data, truncated)) is None


def test_unknown_codecs_and_levels_are_errors() -> None:
    assert {name: cls.levels for name, cls in KV_CODECS.items()} == CODEC_LEVELS
    with pytest.raises(ValueError, match="unknown KV codec"):
        kv_codec("zip")
    with pytest.raises(ValueError, match="levels 0..3"):
        Codec("cachegen", 4)
    with pytest.raises(ValueError):
        KVLayout.of(torch.zeros(2, 3, dtype=torch.float32))
    kv = kv_like(7)
    with pytest.raises(ValueError):
        Codec().encode(key_of(kv), ChunkKV(kv.token_ids, kv.keys, kv.values[:, :, :-1]))


@settings(max_examples=40, deadline=None)
@given(codec=st.sampled_from(ALL), layers=st.integers(1, 5), heads=st.integers(1, 3), tokens=st.integers(1, 25),
       dim=st.integers(1, 9), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_random_shapes_and_dtypes_round_trip(codec, layers, heads, tokens, dim, dtype, seed, scale) -> None:
    name, level = codec
    base = kv_like(seed, layers, heads, tokens, dim)
    kv = ChunkKV(base.token_ids, (base.keys * scale).to(dtype), (base.values * scale).to(dtype))
    decoded, data = round_trip(name, level, kv)
    assert_within_bound(decoded, kv, data)


@pytest.mark.parametrize("level", range(CODEC_LEVELS["cachegen"]))
def test_a_channel_whose_coded_tokens_are_alike_keeps_its_bound(level: int) -> None:
    """Two tokens: the first stored apart, the second coded in its place too, so every coded token of the
    channel is -325.25 and its spread is 0; its bf16 centre (-326) is 0.75 off, which the bins must still reach
    (found by the round-trip property below: the widths stopped at the code range and the token came back
    0.75 off against a bound of 3e-8)."""
    keys = torch.tensor([1239.0, 1240.0], dtype=torch.float16).reshape(1, 1, 2, 1)
    values = torch.tensor([170.5, -325.25], dtype=torch.float16).reshape(1, 1, 2, 1)
    kv = ChunkKV(torch.tensor([5, 6]), keys, values)
    decoded, data = round_trip("cachegen", level, kv)
    assert_within_bound(decoded, kv, data)
    assert (decoded.values.float() - values.float()).abs().max() <= 0.75 / 2


@pytest.mark.parametrize(("name", "level"), ALL)
def test_the_disk_tier_stores_and_reads_each_codec(tmp_path, name: str, level: int) -> None:
    entries = [kv_like(seed, tokens=20) for seed in range(3)]
    store = ChunkCacheStore([MemoryTier("cpu", budget_bytes=entries[0].nbytes, device="cpu"),
                             DiskTier("disk", 1 << 24, tmp_path, Codec(name, level))])
    for kv in entries:
        store.put(key_of(kv), kv, recompute_cost=20)
    assert len(list(tmp_path.glob("*.kv"))) == 2  # the first two moved down to disk
    reopened = DiskTier("disk", 1 << 24, tmp_path, Codec(name, level))
    for kv in entries[:2]:
        decoded = reopened.read(key_of(kv))
        assert decoded is not None
        assert_within_bound(decoded, kv, (tmp_path / f"{key_of(kv).name}.kv").read_bytes())
    other = "int8" if name != "int8" else "raw"
    assert DiskTier("disk", 1 << 24, tmp_path, Codec(other)).read(key_of(entries[0])) is None


@pytest.mark.parametrize(("name", "level"), [("int4", 0), ("cachegen", 1)])
def test_the_shared_tier_stores_compressed_entries_for_every_replica(redis_server, name: str, level: int) -> None:
    prefix = f"test:codec:{name}{level}"
    kv = kv_like(9, tokens=30)

    def replica(codec: Codec) -> ChunkCacheStore:
        shared = RedisTier(redis_server.url, 1 << 24, key_prefix=prefix, timeout_s=0.5, codec=codec)
        return ChunkCacheStore([MemoryTier("cpu", 1 << 24, "cpu")], shared=shared)

    first, second, other = replica(Codec(name, level)), replica(Codec(name, level)), replica(Codec())
    try:
        first.put(key_of(kv), kv, recompute_cost=30)
        first.shared.flush()
        found = second.get(key_of(kv))
        assert found is not None
        assert_within_bound(found, kv, Codec(name, level).encode(key_of(kv), kv))
        assert other.get(key_of(kv)) is None  # a replica set to another codec keeps entries of its own: a miss
        other.put(key_of(kv), kv, recompute_cost=30)
        other.shared.flush()
        first.tiers[0].remove(key_of(kv))  # not in the first's local memory any more: it reads Redis again
        first.tiers[0].forget(key_of(kv))
        assert first.get(key_of(kv)) is not None  # its own entry was not deleted by the other's
    finally:
        for store in (first, second, other):
            store.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decoding onto a GPU needs one")
@pytest.mark.parametrize(("name", "level"), ALL)
def test_decoding_onto_the_gpu_matches_the_host(name: str, level: int) -> None:
    kv = kv_like(8, dtype=torch.bfloat16)
    codec = Codec(name, level)
    data = codec.encode(key_of(kv), kv)
    host, gpu = codec.decode(key_of(kv), data), codec.decode(key_of(kv), data, device="cuda")
    assert gpu.keys.is_cuda and gpu.token_ids.device.type == "cpu"
    assert torch.allclose(gpu.keys.cpu().float(), host.keys.float(), atol=1e-2, rtol=1e-2)
    assert torch.allclose(gpu.values.cpu().float(), host.values.float(), atol=1e-2, rtol=1e-2)


def test_the_codec_setting_names_a_known_codec_and_level() -> None:
    assert ChunkCacheSettings().codec.name == "raw" and ChunkCacheSettings().codec.level == 0
    assert ChunkCacheSettings(codec={"name": "cachegen", "level": 3}).codec.level == 3
    for bad in ({"name": "zip"}, {"name": "cachegen", "level": 4}, {"name": "int8", "level": 1},
                {"name": "raw", "level": -1}):
        with pytest.raises(ValidationError):
            ChunkCacheSettings(codec=bad)


def test_entries_carry_an_xxh3_checksum_and_the_sha256_ones_still_read() -> None:
    """New entries: magic BGKV2 and the body's XXH3-128; entries of the first format (BGKV1, SHA-256) read the
    same; a checksum of either kind that does not match the body makes the entry a miss."""
    import xxhash

    kv = kv_like(9, dtype=torch.bfloat16)
    codec = Codec("int8")
    data = codec.encode(key_of(kv), kv)
    body = entry_body(data)
    assert data[:5] == b"BGKV2" and data[5:21] == xxhash.xxh3_128_digest(body)
    first = b"BGKV1" + hashlib.sha256(body).digest() + body
    for entry in (data, first):
        decoded = codec.decode(key_of(kv), entry)
        assert decoded is not None and torch.equal(decoded.keys, codec.decode(key_of(kv), data).keys)
    for entry in (data, first):
        damaged = bytearray(entry)
        damaged[-3] ^= 0x10
        assert entry_body(bytes(damaged)) is None and codec.decode(key_of(kv), bytes(damaged)) is None
    assert entry_body(b"BGKV2" + b"\0" * 10) is None and entry_body(b"other" + data[5:]) is None


def with_outliers(tensor: torch.Tensor, seed: int, count: int, size: float) -> torch.Tensor:
    """The tensor with `count` values (at seeded places) `size` times the tensor's largest magnitude (within half
    the dtype's range: finite), of either sign: the outlying channels real keys have."""
    generator = torch.Generator().manual_seed(seed)
    flat = tensor.float().flatten().clone()
    places = torch.randint(0, flat.numel(), (count,), generator=generator)
    signs = torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1
    flat[places] = signs * min(size * (float(flat.abs().max()) + 1e-3), torch.finfo(tensor.dtype).max / 2)
    return flat.reshape(tensor.shape).to(tensor.dtype)


def assert_round_trip_is_decode_of_encode(name: str, level: int, kv: ChunkKV) -> None:
    """Codec.round_trip gives what decoding the entry gives, bit for bit (values, dtype, shape, device)."""
    codec = Codec(name, level)
    decoded = codec.decode(key_of(kv), codec.encode(key_of(kv), kv))
    fast = codec.round_trip(kv)
    assert decoded is not None
    assert torch.equal(fast.token_ids, decoded.token_ids)
    for got, want in ((fast.keys, decoded.keys), (fast.values, decoded.values)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
        integers = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[want.dtype]
        assert torch.equal(got.view(integers), want.view(integers))  # the bits: -0.0 and 0.0 apart too


@settings(max_examples=60, deadline=None)
@given(codec=st.sampled_from(ALL), layers=st.integers(1, 5), heads=st.integers(1, 3), tokens=st.integers(1, 25),
       dim=st.integers(1, 9), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 300.0]), outliers=st.integers(0, 3),
       outlier_size=st.sampled_from([4.0, 50.0]))
def test_the_round_trip_without_the_entry_is_decode_of_encode(codec, layers, heads, tokens, dim, dtype, seed,
                                                               scale, outliers, outlier_size) -> None:
    """bench/quality.py's codec rows blend from Codec.round_trip: the cachegen codec's skips the entropy coding,
    so its values must be exactly the decoded entry's (1-2 tokens, single channels, every dtype, outliers)."""
    name, level = codec
    base = kv_like(seed, layers, heads, tokens, dim)
    keys = with_outliers((base.keys * scale).to(dtype), seed, outliers, outlier_size)
    values = with_outliers((base.values * scale).to(dtype), seed + 1, outliers, outlier_size)
    assert_round_trip_is_decode_of_encode(name, level, ChunkKV(base.token_ids, keys, values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", range(CODEC_LEVELS["cachegen"]))
def test_the_cachegen_round_trip_is_decode_of_encode_on_smollm2s_shape(level: int, dtype: torch.dtype) -> None:
    """SmolLM2-135M's KV shape (30 layers, 3 KV heads, head_dim 64) over 121 tokens: several anchor groups, all
    three layer groups, lanes of one channel each."""
    kv = kv_like(level, layers=30, heads=3, tokens=121, dim=64, dtype=dtype)
    assert_round_trip_is_decode_of_encode("cachegen", level, kv)


def test_the_round_trip_refuses_what_encode_refuses() -> None:
    kv = kv_like(7)
    with pytest.raises(ValueError):
        Codec("cachegen", 0).round_trip(ChunkKV(kv.token_ids, kv.keys, kv.values[:, :, :-1]))
