"""A cached answer and its storage form (a flat mapping, as a Redis hash holds it).

Every entry carries a digest of what it says; an entry that fails to parse or to match its digest is
corrupt, and the cache drops it instead of serving it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


class CorruptEntry(Exception):
    pass


def owner_of(tenant: str, user: str) -> str:
    """How a user-scoped entry names its end user: 16 hex digits of a hash of the tenant and the user id,
    never the id in clear (the admin UI and Redis show it)."""
    return hashlib.blake2b(f"{tenant}\0{user}".encode(), digest_size=8).hexdigest()


@dataclass
class CacheEntry:
    tenant: str
    category: str
    # Digest of everything besides the question that changes the answer (model, documents, history, ...).
    context: str
    model: str
    query: str
    # {"content": ..., "finish_reason": ..., "usage": {...}}: what a hit replays.
    response: dict[str, Any]
    embedding: np.ndarray
    ttl_s: float
    collection: str | None = None
    # What `context` digests, for people to read (model, namespace, sampling parameters, collection and
    # version, earlier turns): the admin UI shows how entries of the same question differ.
    settings: dict[str, Any] = field(default_factory=dict)
    # "tenant" (anyone under the key may be served it) or "user" (only `owner`, an owner_of hash, may).
    scope: str = "tenant"
    owner: str = ""
    entry_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    last_hit_at: float = 0.0
    hits: int = 0

    @property
    def expires_at(self) -> float:
        return self.created_at + self.ttl_s

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.expires_at

    def _digest(self) -> str:
        # Times as floats, as from_fields reads them: an int TTL must sign the same as the 1.0 read back.
        signed = json.dumps([self.entry_id, self.tenant, self.category, self.context, self.model, self.query,
                             self.response, self.collection, float(self.created_at), float(self.ttl_s),
                             self.settings, self.scope, self.owner],
                            sort_keys=True, separators=(",", ":"))
        hasher = hashlib.blake2b(signed.encode(), digest_size=16)
        hasher.update(self.embedding.astype("<f4").tobytes())
        return hasher.hexdigest()

    def to_fields(self) -> dict[str, str | bytes]:
        return {
            "id": self.entry_id, "tenant": self.tenant, "category": self.category, "context": self.context,
            "model": self.model, "query": self.query, "response": json.dumps(self.response),
            "collection": self.collection or "", "settings": json.dumps(self.settings, sort_keys=True),
            "created_at": repr(self.created_at), "ttl_s": repr(self.ttl_s),
            "embedding": self.embedding.astype("<f4").tobytes(), "digest": self._digest(),
            "hits": str(self.hits), "last_hit_at": repr(self.last_hit_at),
            "scope": self.scope, "owner": self.owner,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str], dimension: int) -> "CacheEntry":
        def text(name: str) -> str:
            value = fields.get(name, fields.get(name.encode()))
            if value is None:
                raise CorruptEntry(f"missing field {name}")
            return value.decode() if isinstance(value, bytes) else value

        try:
            raw = fields.get("embedding", fields.get(b"embedding"))
            if not isinstance(raw, bytes) or len(raw) != 4 * dimension:
                raise CorruptEntry("embedding missing or of the wrong size")
            entry = cls(
                tenant=text("tenant"), category=text("category"), context=text("context"), model=text("model"),
                query=text("query"), response=json.loads(text("response")),
                embedding=np.frombuffer(raw, dtype="<f4").astype(np.float32),
                ttl_s=float(text("ttl_s")), collection=text("collection") or None,
                settings=json.loads(text("settings")), scope=text("scope"), owner=text("owner"),
                entry_id=text("id"),
                created_at=float(text("created_at")), last_hit_at=float(text("last_hit_at")),
                hits=int(text("hits")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptEntry(str(exc)) from None
        if not isinstance(entry.response, dict) or not isinstance(entry.response.get("content"), str):
            raise CorruptEntry("response has no content")
        if entry.scope not in ("tenant", "user") or (entry.scope == "user") != bool(entry.owner):
            raise CorruptEntry("scope and owner do not agree")
        if not isinstance(entry.settings, dict):
            raise CorruptEntry("settings are not an object")
        if entry._digest() != text("digest"):
            raise CorruptEntry("digest does not match")
        return entry
