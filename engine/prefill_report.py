"""PrefillReport: what a prefill did with a prompt's chunks, the interface between the prefill (the local
engine's chunk-cache runner, chunkcache/runner.py, or an SGLang worker's plugin, sglang_plugin/) and the
gateway (the response's `blendgate.chunk_cache`, and gateway/metrics/ series).

The local runner fills it directly (it travels on engine.runner.KVState and engine.engine.GenerationHandle);
an SGLang worker sends its `as_dict()` in `meta_info["blendgate"]`, which the gateway parses back with
`from_dict` (sglang_plugin/protocol.py: prefill_report_of). The gateway's backends add what only they know:
each chunk's id (local) or the worker and the chunks sent (SGLang). Plain Python: no torch, no model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

log = logging.getLogger("blendgate.engine")


@dataclass(frozen=True)
class PrefillReport:
    """One prompt's prefill, as run. Every field is optional: which are set depends on the mode that ran.

    - full_prefill: `recompute_ratio` 1.0; with `requested_mode` and `fallback` (why) when a blend was asked
      for but would have been slower, or could not run on the worker;
    - prefix: `prefix_tokens_reused` (tokens of an exact shared prefix whose KV was reused);
    - reuse / blend: `hits` (per chunk in prompt order, whether its KV came from the chunk-cache),
      `recompute_ratio` (share of chunk tokens recomputed, 0..1), `chunk_tokens`, `recomputed_tokens`,
      `recomputed_per_chunk`, `selection` (the token-selection score, None at ratio 0), `compute_share`
      (attention work done against a full prefill, 0..1), `prefix_tokens_reused` (the system prompt's KV);
      with `fidelity_target` and `fidelity_estimate` (0..1) in the quality-targeted mode; with a shared
      chunk-cache tier, `shared_fetch` (per chunk: "local", "fetched", "recomputed: <link, fetch and recompute
      estimates>" when bandwidth adaptation found fetching slower, or "not cached").
    `prefill_ms`: the prefill's wall time in milliseconds (local engine only).

    Added by the gateway's backends: `chunk_ids` (local: each chunk's document-chunk id, so the response
    names each hit), `worker`, `chunks_sent` and `cached_tokens` (SGLang: the worker's URL without password,
    chunks marked in the request, and SGLang's own radix-cache hit in tokens).
    """

    mode: str | None = None
    recompute_ratio: float | None = None
    requested_mode: str | None = None
    fallback: str | None = None
    hits: list[bool] | None = None
    chunk_tokens: int | None = None
    recomputed_tokens: int | None = None
    recomputed_per_chunk: list[int] | None = None
    selection: str | None = None
    compute_share: float | None = None
    prefix_tokens_reused: int | None = None
    fidelity_target: float | None = None
    fidelity_estimate: float | None = None
    prefill_ms: float | None = None
    chunk_ids: list[str] | None = None
    worker: str | None = None
    chunks_sent: int | None = None
    cached_tokens: int | None = None
    shared_fetch: list[str] | None = None

    @property
    def hit_count(self) -> int:
        return sum(self.hits) if self.hits is not None else 0

    @property
    def miss_count(self) -> int:
        return len(self.hits) - self.hit_count if self.hits is not None else 0

    @property
    def blended(self) -> bool:
        """True when chunk KV came from the chunk-cache (reuse or blend) with known token counts."""
        return self.mode in ("blend", "reuse") and self.chunk_tokens is not None and \
            self.recomputed_tokens is not None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: the response's `blendgate.chunk_cache` and the SGLang plugin's wire form. Fields not
        set are left out, except that a blend's report always has `selection`, a targeted blend's always has
        `fidelity_estimate` and an SGLang answer's always has `cached_tokens` (null when not known)."""
        out: dict[str, Any] = {}

        def put(name: str, value: Any, always: bool = False) -> None:
            if value is not None or always:
                out[name] = value

        put("mode", self.mode)
        put("requested_mode", self.requested_mode)
        put("fallback", self.fallback)
        if self.hits is not None:
            if self.chunk_ids is not None:
                out["chunks"] = [{"id": id_, "hit": hit} for id_, hit in zip(self.chunk_ids, self.hits)]
            else:
                out["hits"] = list(self.hits)
            out.update(hit_count=self.hit_count, miss_count=self.miss_count)
        put("recompute_ratio", self.recompute_ratio)
        put("chunk_tokens", self.chunk_tokens)
        put("recomputed_tokens", self.recomputed_tokens)
        put("recomputed_per_chunk", self.recomputed_per_chunk)
        put("shared_fetch", self.shared_fetch)
        put("selection", self.selection, always=self.hits is not None)
        put("compute_share", self.compute_share)
        put("prefix_tokens_reused", self.prefix_tokens_reused)
        if self.fidelity_target is not None:
            out.update(fidelity_target=self.fidelity_target, fidelity_estimate=self.fidelity_estimate)
        put("prefill_ms", self.prefill_ms)
        if self.worker is not None:
            out.update(worker=self.worker, chunks_sent=self.chunks_sent, cached_tokens=self.cached_tokens)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrefillReport":
        """A report from its JSON form (`as_dict`), its types checked; keys it does not know (and the derived
        hit_count, miss_count) are ignored. A report of the wrong shape is logged and read as empty."""
        try:
            return _ADAPTER.validate_python(data)
        except ValidationError as exc:
            log.warning("unreadable prefill report ignored: %s", exc)
            return cls()


_ADAPTER = TypeAdapter(PrefillReport)
