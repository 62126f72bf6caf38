"""What the gateway and an SGLang worker with blendgate's plugin say to each other about chunks.

The gateway sends the prompt as token ids (`POST /generate`, `input_ids`) and marks its chunks by token spans
in `sampling_params.custom_params`, the one free-form field SGLang carries from the request to the scheduler.
Its values must be JSON scalars or flat lists of them (SGLang checks this with msgspec), hence flat spans.
The worker answers with its prefill report (engine/prefill_report.py: PrefillReport, in its `as_dict()` form)
in `meta_info["blendgate"]`, which the gateway reads back with `prefill_report_of`.

This module imports nothing from SGLang: the gateway, the plugin and the tests' stand-in worker share it.
"""

from __future__ import annotations

from typing import Any

from ..engine.prefill_report import PrefillReport
from ..engine.prompt import DEFAULT_RECOMPUTE_RATIO, PREFILL_MODES, Prompt, PromptSegment

CHUNK_SPANS = "blendgate_chunk_spans"  # [start0, end0, start1, end1, ...] token offsets in input_ids
PREFILL_MODE = "blendgate_prefill_mode"
RECOMPUTE_RATIO = "blendgate_recompute_ratio"
FIDELITY_TARGET = "blendgate_fidelity_target"  # the quality-targeted mode's target (recompute ratio: the cap)
CHUNK_CONTEXT = "blendgate_chunk_context"  # token ids each chunk's KV is computed after (Prompt.chunk_context)
# Per-chunk contexts (PromptSegment.context), flat: one length per chunk (0: the prompt's chunk_context), and
# the contexts' token ids one after another.
CHUNK_CONTEXT_LENGTHS = "blendgate_chunk_context_lengths"
CHUNK_CONTEXT_IDS = "blendgate_chunk_context_ids"
REPORT_KEY = "blendgate"  # meta_info key of the worker's prefill report


def chunk_spans(prompt: Prompt) -> list[int]:
    """Flat [start, end, ...] token offsets of the prompt's chunk segments."""
    spans, offset = [], 0
    for segment in prompt.segments:
        if segment.is_chunk:
            spans += [offset, offset + len(segment.token_ids)]
        offset += len(segment.token_ids)
    return spans


def custom_params(prompt: Prompt) -> dict[str, Any] | None:
    """The custom_params entries for a prompt; None when it has no chunks (nothing for a worker to blend).
    Chunks with a context of their own (PromptSegment.context) add CHUNK_CONTEXT_LENGTHS (one per chunk, in
    order) and CHUNK_CONTEXT_IDS (those contexts concatenated)."""
    spans = chunk_spans(prompt)
    if not spans:
        return None
    params = {CHUNK_SPANS: spans, PREFILL_MODE: prompt.mode, RECOMPUTE_RATIO: prompt.recompute_ratio}
    if prompt.fidelity_target is not None:
        params[FIDELITY_TARGET] = prompt.fidelity_target
    if prompt.chunk_context:
        params[CHUNK_CONTEXT] = list(prompt.chunk_context)
    contexts = [segment.context for segment in prompt.segments if segment.is_chunk]
    if any(contexts):
        params[CHUNK_CONTEXT_LENGTHS] = [len(context) for context in contexts]
        params[CHUNK_CONTEXT_IDS] = [t for context in contexts for t in context]
    return params


def generate_request(prompt: Prompt, sampling: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
    """The body of SGLang's `POST /generate` for a prompt: its token ids, the sampling settings with the chunk
    spans added, streamed."""
    sampling = dict(sampling)
    chunk_params = custom_params(prompt)
    if chunk_params:
        sampling["custom_params"] = chunk_params
    body = {"input_ids": prompt.token_ids, "sampling_params": sampling, "stream": True}
    if rid is not None:
        body["rid"] = rid
    return body


def wants_chunk_cache(custom: dict | None) -> bool:
    return bool(custom) and bool(custom.get(CHUNK_SPANS))


def prompt_of(input_ids: list[int], custom: dict | None, vocab_size: int | None = None) -> Prompt:
    """The prompt as a worker sees it: chunk spans from custom_params, the rest computed, each chunk with its
    own context when CHUNK_CONTEXT_LENGTHS is sent. Raises ValueError on spans that are not ordered
    [start, end, ...] offsets within the prompt, on an unknown mode, on per-chunk contexts that do not fit
    the chunks (a length per chunk, token ids as many as the lengths add up to), or on context token ids at or
    past `vocab_size` when it is given (SGLang checks the prompt's own ids, not these: an id past the
    embedding table would fail the worker's forward pass)."""
    custom = custom or {}
    spans = custom.get(CHUNK_SPANS) or []
    if len(spans) % 2 or any(not isinstance(x, int) or isinstance(x, bool) for x in spans) or \
            spans != sorted(spans) or (spans and (spans[0] < 0 or spans[-1] > len(input_ids))):
        raise ValueError(f"{CHUNK_SPANS} must be ordered [start, end, ...] offsets, got {spans}")
    mode = custom.get(PREFILL_MODE, "full_prefill")
    if mode not in PREFILL_MODES:
        raise ValueError(f"{PREFILL_MODE} must be one of {', '.join(PREFILL_MODES)}, got {mode!r}")
    ratio = float(custom.get(RECOMPUTE_RATIO, DEFAULT_RECOMPUTE_RATIO))
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{RECOMPUTE_RATIO} must be between 0 and 1, got {ratio}")
    target = custom.get(FIDELITY_TARGET)
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0.0 < target <= 1.0):
        raise ValueError(f"{FIDELITY_TARGET} must be a number in (0, 1], got {target!r}")
    context = custom.get(CHUNK_CONTEXT) or []
    if not _token_ids(context):
        raise ValueError(f"{CHUNK_CONTEXT} must be a list of token ids")
    contexts = _chunk_contexts(custom, len(spans) // 2)
    if vocab_size is not None and any(t >= vocab_size for ids in (context, *contexts) for t in ids):
        raise ValueError(f"{CHUNK_CONTEXT} and {CHUNK_CONTEXT_IDS} take token ids below the model's vocabulary "
                         f"size, {vocab_size}")
    own = iter(contexts)
    segments, offset = [], 0
    for start, end in zip(spans[::2], spans[1::2]):
        if start > offset:
            segments.append(PromptSegment(tuple(input_ids[offset:start])))
        chunk_context = next(own)
        if end > start:
            segments.append(PromptSegment(tuple(input_ids[start:end]), is_chunk=True, context=chunk_context))
        offset = end
    if offset < len(input_ids):
        segments.append(PromptSegment(tuple(input_ids[offset:])))
    return Prompt(segments, mode=mode, recompute_ratio=ratio,
                  fidelity_target=None if target is None else float(target), chunk_context=tuple(context))


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def _chunk_contexts(custom: dict, chunks: int) -> list[tuple[int, ...]]:
    """Per chunk span, its own context from CHUNK_CONTEXT_LENGTHS and CHUNK_CONTEXT_IDS (all empty when neither
    is sent). Raises ValueError when they do not fit: lengths not one non-negative int per chunk, ids not ints,
    or not as many ids as the lengths add up to."""
    lengths, ids = custom.get(CHUNK_CONTEXT_LENGTHS), custom.get(CHUNK_CONTEXT_IDS)
    if lengths is None and ids is None:
        return [()] * chunks
    if not _token_ids(lengths) or len(lengths) != chunks:
        raise ValueError(f"{CHUNK_CONTEXT_LENGTHS} must be one length per chunk ({chunks}), got {lengths!r}")
    if not _token_ids(ids):
        raise ValueError(f"{CHUNK_CONTEXT_IDS} must be a list of token ids")
    if len(ids) != sum(lengths):
        raise ValueError(f"{CHUNK_CONTEXT_IDS} has {len(ids)} token ids, the lengths add up to {sum(lengths)}")
    contexts, offset = [], 0
    for length in lengths:
        contexts.append(tuple(ids[offset:offset + length]))
        offset += length
    return contexts


def report_of(meta_info: dict) -> dict:
    """The worker's prefill report from meta_info: a dict from the stand-in, a one-element list from SGLang
    (whose customized_info carries one value per forward pass that set it)."""
    found = meta_info.get(REPORT_KEY)
    if isinstance(found, list):
        found = next((item for item in found if isinstance(item, dict)), None)
    return dict(found) if isinstance(found, dict) else {}


def fallback_report(requested_mode: str | None, reason: str, hits: list[bool] | None = None) -> dict:
    """The wire form of a worker's report for a request it prefilled in full although a blend was asked for;
    `hits`: per chunk, whether the store held it (known when the blend was weighed against a full prefill), so
    that chunk-cache hit rates count the requests prefilled in full too."""
    return PrefillReport(mode="full_prefill", requested_mode=requested_mode, fallback=reason, hits=hits).as_dict()


def prefill_report_of(meta_info: dict) -> PrefillReport:
    """The worker's prefill report (report_of) as the gateway reads it; an empty report when the worker sent
    none (a stock SGLang worker, or a request without chunks)."""
    return PrefillReport.from_dict(report_of(meta_info))
