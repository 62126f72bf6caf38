"""The disk tier's serde: a ChunkKV as bytes (safetensors) with a checksum and its key in front.

The place for CacheGen-style compression. A file that fails its checksum, holds another key's entry, or holds
token ids that do not digest to its key is refused (decode returns None): never used.
"""

from __future__ import annotations

import hashlib
import json
import struct

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .keys import ChunkKey, token_digest
from .kv import ChunkKV


class Codec:
    """ChunkKV <-> bytes: MAGIC, the SHA-256 of the body (32 bytes), then the safetensors body."""

    MAGIC = b"BGKV1"

    def encode(self, key: ChunkKey, kv: ChunkKV) -> bytes:
        body = save_tensors({"token_ids": kv.token_ids.cpu().contiguous(), "keys": kv.keys.cpu().contiguous(),
                             "values": kv.values.cpu().contiguous()}, metadata={"key": key.name})
        return self.MAGIC + hashlib.sha256(body).digest() + body

    def decode(self, key: ChunkKey, data: bytes) -> ChunkKV | None:
        """The entry `data` holds for `key`, or None when the bytes are damaged or hold another key's entry: the
        checksum must match, the key written into the file must be `key`, and its token ids must digest to
        `key.tokens` (a whole valid file of another chunk or model copied over this one is refused too)."""
        header = len(self.MAGIC) + 32
        if len(data) < header or not data.startswith(self.MAGIC):
            return None
        body = data[header:]
        if hashlib.sha256(body).digest() != data[len(self.MAGIC):header]:
            return None
        try:
            tensors = load_tensors(body)
            stored_key = _safetensors_metadata(body).get("key")
        except Exception:  # safetensors raises several types for malformed input
            return None
        if stored_key != key.name or token_digest(tensors["token_ids"]) != key.tokens:
            return None
        return ChunkKV(tensors["token_ids"], tensors["keys"], tensors["values"])


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer: its header is a little-endian u64 length, then that many
    bytes of JSON (the format's specification); safetensors' `load` reads the tensors only."""
    (length,) = struct.unpack_from("<Q", body)
    return json.loads(body[8:8 + length]).get("__metadata__") or {}
