"""Chunk-cache entries as bytes: the framing (`Codec`, frame.py) and the pluggable KV codecs it compresses
with, by name: `raw` (exact, the default), `int8` and `int4` (per-channel quantisers, quantize.py) and
`cachegen` (CacheGen's delta, layer-group and entropy coding, cachegen.py)."""

from . import cachegen, quantize, raw  # noqa: F401  (each registers its codecs)
from .base import KV_CODECS, KVCodec, KVKind, KVLayout, Parts, kv_codec, register
from .frame import Codec

__all__ = ["Codec", "KVCodec", "KVKind", "KVLayout", "KV_CODECS", "Parts", "kv_codec", "register"]
