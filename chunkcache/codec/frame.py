"""The chunk-cache entry's framing (the disk tier's and the shared tier's serde): a ChunkKV as bytes, compressed
by a KV codec, with a checksum and its key in front.

Bytes: MAGIC, the XXH3-128 checksum of the body (16 bytes; entries written before 2026-11-30's evening, magic
BGKV1, carry its SHA-256, 32 bytes, and still read), then the body, a safetensors buffer holding the token ids and
the KV codec's parts of keys ("keys.*") and values ("values.*"); its metadata records the key, the codec's name
and level and the KV layout. Entries written before codecs existed (no codec in the metadata) are `raw` level 0,
whose parts are the "keys" and "values" tensors themselves: they read unchanged. An entry that fails its
checksum, holds another key's entry, holds token ids that do not digest to its key, was written by another
codec or level than this `Codec`'s, or whose parts do not decode to the recorded layout is refused (decode
returns None): never used. The checksum detects damage, not tampering (whoever can write the tier can write a
valid entry); XXH3 (the `xxhash` library) runs at tens of GB/s where SHA-256 ran at about 2, which bounded a
fetched entry's decode on the GPU (bench/results/codec-2026-11-30.md).
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
import xxhash
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..defaults import DEFAULT_CODEC
from ..keys import ChunkKey, token_digest
from ..kv import ChunkKV
from . import base
from .base import KVCodec, KVKind, KVLayout, Parts

TENSORS: tuple[KVKind, KVKind] = ("keys", "values")


def _layout_of(kv: ChunkKV) -> KVLayout:
    """The layout of the chunk's keys, which its values and token ids must agree with (ValueError otherwise)."""
    layout = KVLayout.of(kv.keys)
    if KVLayout.of(kv.values) != layout or layout.tokens != kv.length:
        raise ValueError("keys, values and token ids of a chunk must agree in shape and dtype")
    return layout


class Codec:
    """ChunkKV <-> bytes through the KV codec `kv_codec` at `level` (base.py: KV_CODECS; default `raw`, exact)."""

    MAGIC = b"BGKV2"  # XXH3-128 checksum
    MAGIC_SHA256 = b"BGKV1"  # the first format's: SHA-256 checksum, still read

    def __init__(self, kv_codec: str = DEFAULT_CODEC, level: int = 0) -> None:
        self.kv_codec: KVCodec = base.kv_codec(kv_codec, level)

    def decode_device(self, device: str | torch.device) -> torch.device:
        """Where entries read for a blend on `device` are decoded: on that GPU when the KV codec decodes faster on
        one (KVCodec.decodes_on_device: the bytes go up through pinned memory, a kernel decodes them), else on
        the host (from where blending streams the KV up behind compute)."""
        device = torch.device(device)
        return device if device.type == "cuda" and self.kv_codec.decodes_on_device else torch.device("cpu")

    def encode(self, key: ChunkKey, kv: ChunkKV) -> bytes:
        """The entry's bytes, the KV codec spending its error by the chunk's channel weights where it has them
        (ChunkKV.weights); ValueError for keys and values of different layouts or an unsupported dtype, or
        weights of another shape (the cachegen codec)."""
        layout = _layout_of(kv)
        tensors = {"token_ids": kv.token_ids.cpu().contiguous()}
        for tensor_name, tensor in zip(TENSORS, (kv.keys, kv.values)):
            for part, value in self.kv_codec.encode(tensor, tensor_name, kv.weights).items():
                tensors[_stored_name(tensor_name, part)] = value.contiguous()
        metadata = {"key": key.name, "codec": self.kv_codec.name, "level": str(self.kv_codec.level),
                    "shape": ",".join(map(str, layout.shape)), "dtype": layout.dtype}
        body = save_tensors(tensors, metadata=metadata)
        return self.MAGIC + xxhash.xxh3_128_digest(body) + body

    def round_trip(self, kv: ChunkKV, device: str | torch.device = "cpu") -> ChunkKV:
        """The ChunkKV that decode(key, encode(key, kv), device) gives for a valid entry (keys and values bit for
        bit, by KVCodec.round_trip: the cachegen codec skips its lossless entropy coding), without the entry's
        bytes; ValueError as `encode`."""
        _layout_of(kv)
        keys, values = (self.kv_codec.round_trip(tensor, name, torch.device(device), kv.weights)
                        for name, tensor in zip(TENSORS, (kv.keys, kv.values)))
        return ChunkKV(kv.token_ids.cpu(), keys, values)

    def decode(self, key: ChunkKey, data: bytes, device: str | torch.device = "cpu") -> ChunkKV | None:
        """The entry `data` holds for `key`, keys and values on `device` (token ids on the host), or None when the
        bytes are damaged or mismatched: the checksum must match, the key written into the entry must be `key`,
        its token ids must digest to `key.tokens` (a whole valid entry of another chunk or model copied over this
        one is refused too), its codec and level must be this Codec's, and its parts must decode to the recorded
        shape and dtype."""
        body = entry_body(data)
        if body is None:
            return None
        try:
            tensors = load_tensors(body)
            metadata = _safetensors_metadata(body)
            if metadata.get("key") != key.name or token_digest(tensors["token_ids"]) != key.tokens:
                return None
            if (metadata.get("codec", "raw"), int(metadata.get("level", "0"))) != (self.kv_codec.name,
                                                                                    self.kv_codec.level):
                return None
            layout = _layout(metadata, tensors)
            if layout.tokens != tensors["token_ids"].shape[0]:
                return None
            decoded = self.kv_codec.decode_all([_parts(tensors, name) for name in TENSORS], layout,
                                               torch.device(device))
        except Exception:  # malformed safetensors, metadata or parts raise several types
            return None
        if any(t.shape != layout.shape or t.dtype != layout.torch_dtype for t in decoded):
            return None
        return ChunkKV(tensors["token_ids"], decoded[0], decoded[1])


def entry_body(data: bytes) -> bytes | None:
    """The body (safetensors bytes) of an entry whose checksum matches (XXH3-128 after Codec.MAGIC, SHA-256
    after Codec.MAGIC_SHA256), checked without a copy; None for anything else."""
    if data.startswith(Codec.MAGIC):
        magic, checksum, digest = Codec.MAGIC, 16, xxhash.xxh3_128_digest
    elif data.startswith(Codec.MAGIC_SHA256):
        magic, checksum, digest = Codec.MAGIC_SHA256, 32, lambda body: hashlib.sha256(body).digest()
    else:
        return None
    header = len(magic) + checksum
    if len(data) < header:
        return None
    view = memoryview(data)
    body = view[header:]
    return bytes(body) if digest(body) == bytes(view[len(magic):header]) else None  # safetensors reads bytes


def _stored_name(tensor_name: str, part: str) -> str:
    return f"{tensor_name}.{part}" if part else tensor_name


def _parts(tensors: dict[str, torch.Tensor], tensor_name: str) -> Parts:
    """The parts of keys or values among an entry's tensors, by the names the KV codec gave them."""
    prefix = tensor_name + "."
    parts = {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}
    if tensor_name in tensors:
        parts[""] = tensors[tensor_name]
    return parts


def _layout(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> KVLayout:
    """The layout an entry records; entries from before codecs record none: their keys tensor's own."""
    if "shape" not in metadata:
        return KVLayout.of(tensors["keys"])
    layers, kv_heads, tokens, head_dim = (int(size) for size in metadata["shape"].split(","))
    return KVLayout(layers, kv_heads, tokens, head_dim, metadata["dtype"])


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer: its header is a little-endian u64 length, then that many
    bytes of JSON (the format's specification); safetensors' `load` reads the tensors only."""
    (length,) = struct.unpack_from("<Q", body)
    return json.loads(body[8:8 + length]).get("__metadata__") or {}
