"""The typed hand-offs between layers, in plain Python (no model, no gateway): the prefill report's JSON form
(what responses and the SGLang plugin's wire carry) and its parsing, the choice of collection, and the
background-loaded parts of the application state."""

from __future__ import annotations

import dataclasses

from blendgate.engine.prefill_report import PrefillReport
from blendgate.gateway.config import ModelRagConfig
from blendgate.gateway.loadable import Loadable
from blendgate.gateway.rag import retrieval_for
from blendgate.gateway.schemas import ChatCompletionRequest
from blendgate.sglang_plugin.protocol import fallback_report, prefill_report_of

BLEND = PrefillReport(mode="blend", hits=[True, False], recompute_ratio=0.15, chunk_tokens=40, recomputed_tokens=6,
                      recomputed_per_chunk=[2, 4], selection="deviation", compute_share=0.3,
                      prefix_tokens_reused=12)


def test_a_blend_report_has_the_fields_responses_always_had() -> None:
    assert BLEND.as_dict() == {"mode": "blend", "hits": [True, False], "hit_count": 1, "miss_count": 1,
                               "recompute_ratio": 0.15, "chunk_tokens": 40, "recomputed_tokens": 6,
                               "recomputed_per_chunk": [2, 4], "selection": "deviation", "compute_share": 0.3,
                               "prefix_tokens_reused": 12}
    reuse = PrefillReport(mode="reuse", hits=[True], recompute_ratio=0.0, chunk_tokens=5, recomputed_tokens=0)
    assert reuse.as_dict()["selection"] is None  # at ratio 0 no selection ran, and the report says so
    targeted = PrefillReport(mode="blend", hits=[False], fidelity_target=0.9)
    assert targeted.as_dict()["fidelity_target"] == 0.9 and targeted.as_dict()["fidelity_estimate"] is None
    assert PrefillReport(mode="prefix", prefix_tokens_reused=30, prefill_ms=1.5).as_dict() == {
        "mode": "prefix", "prefix_tokens_reused": 30, "prefill_ms": 1.5}


def test_the_local_backend_names_each_chunk_and_the_sglang_backend_its_worker() -> None:
    named = dataclasses.replace(BLEND, chunk_ids=["castle", "river"]).as_dict()
    assert named["chunks"] == [{"id": "castle", "hit": True}, {"id": "river", "hit": False}] and "hits" not in named
    stock = PrefillReport(worker="http://w:1", chunks_sent=0).as_dict()  # a worker without the plugin
    assert stock == {"worker": "http://w:1", "chunks_sent": 0, "cached_tokens": None}


def test_the_wire_form_reads_back_as_the_same_report() -> None:
    meta = {"blendgate": [BLEND.as_dict()], "cached_tokens": 3}
    assert prefill_report_of(meta) == BLEND
    fallback = fallback_report("blend", "the radix cache is on")
    assert fallback == {"mode": "full_prefill", "requested_mode": "blend", "fallback": "the radix cache is on"}
    assert prefill_report_of({"blendgate": [fallback]}).fallback == "the radix cache is on"
    assert prefill_report_of({}) == PrefillReport()
    assert prefill_report_of({"blendgate": [{"hits": "all"}]}) == PrefillReport()  # wrong shape: ignored


def test_the_shared_tier_choice_per_chunk_is_in_the_response_and_the_wire_form() -> None:
    adapted = dataclasses.replace(BLEND, shared_fetch=["fetched", "recomputed: link 0.2 MB/s, fetch 640 ms > "
                                                                   "recompute 35 ms"])
    assert adapted.as_dict()["shared_fetch"] == adapted.shared_fetch
    assert "shared_fetch" not in BLEND.as_dict()  # no shared tier: not in the response
    assert prefill_report_of({"blendgate": [adapted.as_dict()]}) == adapted


def test_the_collection_is_the_request_s_then_the_model_s_and_none_with_inline_documents() -> None:
    configured = ModelRagConfig(collection="manuals", top_k=3)

    def request(**fields) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                     **fields})

    assert retrieval_for(request(), None) is None
    assert retrieval_for(request(), configured).collection == "manuals"
    assert retrieval_for(request(rag={"collection": "faq"}), configured).collection == "faq"
    assert retrieval_for(request(documents=["a note"], rag={"collection": "faq"}), configured) is None


def test_a_loadable_part_is_loading_until_set_or_failed() -> None:
    part: Loadable[str] = Loadable()
    assert (part.state, part.value, part.error) == ("loading", None, None)
    part.set("retriever")
    assert (part.state, part.value) == ("ready", "retriever")
    failed: Loadable[str] = Loadable()
    failed.fail("docs.faiss is corrupt")
    assert (failed.state, failed.error) == ("failed", "docs.faiss is corrupt")
    assert Loadable.of(1).state == "ready"


def test_a_cached_answer_keeps_its_rag_report_and_a_hit_gets_it_back() -> None:
    import json

    from blendgate.gateway.rag_report import RagReport
    from blendgate.retriever.document_store import CollectionVersion

    chunks = [{"id": "c1", "source": "castle.txt", "position": 0, "score": 0.83}]
    report = RagReport("docs", CollectionVersion("g1", 3), chunks, retrieval_ms=12.5)
    kept = json.loads(json.dumps(report.cached()))  # as the answer store keeps it
    assert kept == {"collection": "docs", "version": 3, "generation": "g1", "chunks": chunks}
    replayed = RagReport.from_cached(kept)
    assert replayed == RagReport("docs", CollectionVersion("g1", 3), chunks)  # no retrieval time: none ran
    inline = RagReport(None, None, chunks)
    assert RagReport.from_cached(inline.cached()) == inline
    # Entries stored without one (no RAG, or before answers kept it), or with another shape: no report.
    for data in (None, {}, {"chunks": "x"}, {"chunks": [1]}, {"collection": 5, "chunks": []}, [chunks]):
        assert RagReport.from_cached(data) is None
