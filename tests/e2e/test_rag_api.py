"""RAG through the live gateway: HTTP ingestion, /v1/retrieve, chat with cited chunks, the CLI, LangChain."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest
from blendgate.retriever.document_store import _SCHEMA
from gateway_launcher import run_cli
from support import EMBEDDED, GatewayProcess, assert_openai_error

FACTS = [
    {"source": "castle",
     "text": "The blue castle stands on a granite hill. The secret code of the blue castle is 4711."},
    {"source": "river", "text": "The Silverrun river flows north for 312 kilometres and freezes every January."},
    {"source": "bakery", "text": "The corner bakery on Elm Street sells rye bread only on Tuesdays."},
]
QUESTION = "What is the secret code of the blue castle?"


@pytest.fixture(scope="module")
def facts(http: httpx.Client) -> str:
    response = http.post("/v1/collections/facts/documents", json={"documents": FACTS})
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["files"] == 3 and summary["chunks"] == 3
    return "facts"


def test_http_ingest_is_idempotent_and_collections_are_listed(http: httpx.Client, facts: str) -> None:
    again = http.post(f"/v1/collections/{facts}/documents", json={"documents": FACTS}).json()
    assert (again["files"], again["unchanged"], again["chunks"]) == (0, 3, 0)
    listed = {c["name"]: c for c in http.get("/v1/collections").json()["data"]}
    assert listed[facts]["chunks"] == 3 and listed[facts]["files"] == 3


def test_retrieve_returns_scored_chunks_with_sources(http: httpx.Client, facts: str) -> None:
    response = http.post("/v1/retrieve", json={"collection": facts, "query": QUESTION, "top_k": 2})
    assert response.status_code == 200
    hits = response.json()["data"]
    assert len(hits) == 2
    assert hits[0]["source"] == "castle" and "4711" in hits[0]["text"]
    assert hits[0]["score"] >= hits[1]["score"]
    assert set(hits[0]) >= {"id", "source", "position", "score", "text"}


def test_retrieve_and_ingest_errors(http: httpx.Client, facts: str) -> None:
    assert_openai_error(http.post("/v1/retrieve", json={"collection": "nope", "query": "q"}), 404,
                        "collection_not_found")
    for top_k in (0, 101, "many"):
        assert_openai_error(http.post("/v1/retrieve", json={"collection": facts, "query": "q", "top_k": top_k}), 400)
    assert_openai_error(http.post("/v1/retrieve", json={"collection": facts}), 400, "missing_required_parameter")
    assert_openai_error(http.post("/v1/collections/bad name!/documents", json={"documents": FACTS}), 400,
                        "invalid_collection_name")
    assert_openai_error(http.post("/v1/collections/x/documents", json={"documents": []}), 400)
    blank = http.post("/v1/collections/x/documents", json={"documents": [{"text": " \n ", "source": "blank"}]})
    assert "blank: no text in it" in assert_openai_error(blank, 400, "nothing_to_ingest")["message"]
    assert "x" not in {c["name"] for c in http.get("/v1/collections").json()["data"]}
    assert_openai_error(http.delete("/v1/collections/never-made"), 404, "collection_not_found")


def test_chat_with_rag_answers_from_the_documents_and_cites_them(client: openai.OpenAI, facts: str) -> None:
    completion = client.chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": QUESTION}], max_tokens=30, temperature=0,
        extra_body={"rag": {"collection": facts, "top_k": 2}})
    assert "4711" in completion.choices[0].message.content
    rag = completion.model_extra["blendgate"]["rag"]
    assert rag["collection"] == facts and rag["version"] >= 1
    assert [c["source"] for c in rag["chunks"]][0] == "castle"
    assert all(set(c) == {"id", "source", "position", "score"} for c in rag["chunks"])
    # Without the documents the model cannot know the code.
    bare = client.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=30, temperature=0)
    assert "4711" not in bare.choices[0].message.content
    assert bare.model_extra["blendgate"]["rag"] is None


def test_streamed_rag_answer_reports_chunks_on_the_last_frame(client: openai.OpenAI, facts: str) -> None:
    chunks = list(client.chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": QUESTION}], max_tokens=30, temperature=0, stream=True,
        extra_body={"rag": {"collection": facts, "top_k": 1}}))
    assert "4711" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].model_extra["blendgate"]["rag"]["chunks"][0]["source"] == "castle"


def test_inline_documents_and_rag_enabled_models(client: openai.OpenAI, facts: str) -> None:
    inline = client.chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": "How long is the Silverrun river?"}], max_tokens=30,
        temperature=0, extra_body={"documents": [FACTS[1]["text"]]})
    assert "312" in inline.choices[0].message.content
    assert inline.model_extra["blendgate"]["rag"]["chunks"][0]["source"] == "request#0"
    # facts-rag is configured with rag: every request to it retrieves, through litellm to the upstream.
    routed = client.chat.completions.create(model="facts-rag", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=30, temperature=0)
    assert "4711" in routed.choices[0].message.content
    assert routed.model_extra["blendgate"]["rag"]["collection"] == "facts"


def test_cli_ingest_is_seen_by_the_running_gateway(gateway, http: httpx.Client, tmp_path: Path) -> None:
    folder = tmp_path / "handbook"
    folder.mkdir()
    (folder / "vacation.md").write_text("# Vacation\n\nEmployees get 27 vacation days per year.")
    (folder / "junk.bin").write_bytes(b"\x00\x01")
    env = {**os.environ, "BLENDGATE_CACHE_DIR": gateway.env["BLENDGATE_CACHE_DIR"]}
    config = ["--config", str(gateway.config_path)]
    ingest = run_cli(["ingest", str(folder), "--collection", "handbook", *config], env, timeout=180)
    assert ingest.returncode == 0, ingest.stderr
    assert "1 files ingested" in ingest.stderr and "skipped" in ingest.stderr and "junk.bin" in ingest.stderr
    hits = http.post("/v1/retrieve", json={"collection": "handbook", "query": "vacation days"}).json()["data"]
    assert "27 vacation days" in hits[0]["text"]
    listing = run_cli(["collections", *config], env, timeout=120)
    assert "handbook" in listing.stdout
    deleted = run_cli(["delete", "--collection", "handbook", *config], env, timeout=120)
    assert deleted.returncode == 0, deleted.stderr
    assert_openai_error(http.post("/v1/retrieve", json={"collection": "handbook", "query": "vacation"}), 404)
    # Created again under the same name (its version number starts over): the gateway serves the new documents.
    (folder / "vacation.md").unlink()
    (folder / "parking.md").write_text("# Parking\n\nThe staff car park opens at 6 am.")
    again = run_cli(["ingest", str(folder / "parking.md"), "--collection", "handbook", *config], env, timeout=180)
    assert again.returncode == 0, again.stderr
    hits = http.post("/v1/retrieve", json={"collection": "handbook", "query": "when does the car park open"}).json()
    assert hits["version"] == 1 and [h["source"] for h in hits["data"]] == [str((folder / "parking.md").resolve())]
    # A path with nothing to ingest is an error that names it, not "0 files ingested".
    missing = run_cli(["ingest", str(tmp_path / "no-such-folder"), "--collection", "handbook", *config], env,
                      timeout=180)
    assert missing.returncode == 1 and "no-such-folder: no such file or folder" in missing.stderr, missing.stderr


def test_langchain_retriever_in_a_chain(gateway, client: openai.OpenAI, facts: str) -> None:
    from blendgate.retriever.langchain import BlendgateRetriever, BlendgateRetrieverError
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    retriever = BlendgateRetriever(base_url=gateway.url, collection=facts, top_k=1)
    documents = retriever.invoke(QUESTION)
    assert documents[0].metadata["source"] == "castle" and "4711" in documents[0].page_content
    assert set(documents[0].metadata) == {"id", "source", "position", "score"}
    assert asyncio.run(retriever.ainvoke("How long is the Silverrun river?"))[0].metadata["source"] == "river"

    def generate(prompt_value) -> str:
        roles = {"system": "system", "human": "user"}
        messages = [{"role": roles[m.type], "content": m.content} for m in prompt_value.to_messages()]
        return client.chat.completions.create(model=EMBEDDED, messages=messages, max_tokens=30,
                                              temperature=0).choices[0].message.content

    # The gateway's own RAG template, written out as a LangChain prompt.
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question using only the documents given."),
        ("human", "Documents:\n\n[1] {context}\n\nQuestion: {question}\nAnswer briefly from the documents."),
    ])
    chain = ({"context": retriever | (lambda docs: "\n".join(d.page_content for d in docs)),
              "question": RunnablePassthrough()} | prompt | RunnableLambda(generate) | StrOutputParser())
    assert "4711" in chain.invoke(QUESTION)

    with pytest.raises(BlendgateRetrieverError, match="404"):
        BlendgateRetriever(base_url=gateway.url, collection="missing").invoke("anything")


def test_a_corrupt_index_stops_start_up_naming_the_file(workdir, model_cache_dir, tmp_path) -> None:
    data = tmp_path / "collections"
    (data / "indexes").mkdir(parents=True)
    # A store with one collection, whose index file is garbage.
    db = sqlite3.connect(data / "chunks.sqlite3")
    db.executescript(_SCHEMA)
    db.execute("INSERT INTO collections VALUES ('docs', 1, 0, 'all-MiniLM-L6-v2', 384, 'x', 'g1')")
    db.commit()
    db.close()
    (data / "indexes" / "docs.faiss").write_bytes(b"garbage")
    (data / "indexes" / "docs.json").write_text(json.dumps(
        {"generation": "g1", "version": 1, "sha256": hashlib.sha256(b"garbage").hexdigest()}))
    process = GatewayProcess("corrupt", {"models": [{"name": "m", "backend": "litellm", "litellm_model": "openai/x",
                                                    "api_base": "http://127.0.0.1:9/v1"}],
                                         "retrieval": {"data_dir": str(data)}}, workdir, model_cache_dir)
    with pytest.raises(RuntimeError) as failed:
        process.start(timeout_s=120)
    assert "docs.faiss" in str(failed.value) and "blendgate reindex --collection docs" in str(failed.value)


def test_rag_chat_blends_cached_chunks_and_reports_them(client: openai.OpenAI, facts: str) -> None:
    documents = [{"id": "castle", "text": FACTS[0]["text"]}, {"id": "river", "text": FACTS[1]["text"]}]
    ask = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model=EMBEDDED, messages=ask, max_tokens=20, temperature=0,
                                           extra_body={"documents": documents})
    report = first.model_extra["blendgate"]["chunk_cache"]
    assert report["mode"] == "blend" and 0.1 < report["recompute_ratio"] <= 0.2
    assert [c["id"] for c in report["chunks"]] == ["castle", "river"]
    # The same chunks in another order: both come from the chunk-cache. (SmolLM2 may first restate the question:
    # room for the answer after it.)
    second = client.chat.completions.create(model=EMBEDDED, messages=ask, max_tokens=32, temperature=0,
                                            extra_body={"documents": documents[::-1]})
    report = second.model_extra["blendgate"]["chunk_cache"]
    assert [(c["id"], c["hit"]) for c in report["chunks"]] == [("river", True), ("castle", True)]
    assert "4711" in second.choices[0].message.content
    # Modes through the public API.
    for mode, ratio in (("full_prefill", None), ("reuse", None), ("blend", 0.3), ("prefix", None)):
        answer = client.chat.completions.create(
            model=EMBEDDED, messages=ask, max_tokens=5, temperature=0,
            extra_body={"documents": documents, "blend": {"mode": mode, "recompute_ratio": ratio}})
        assert answer.model_extra["blendgate"]["chunk_cache"]["mode"] == mode
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBEDDED, messages=ask, extra_body={"documents": documents,
                                                                               "blend": {"mode": "magic"}})
    # The quality-targeted mode: the target and the estimate reached come back with the ratio spent (at most r).
    targeted = client.chat.completions.create(
        model=EMBEDDED, messages=ask, max_tokens=5, temperature=0,
        extra_body={"documents": documents, "blend": {"fidelity_target": 0.6, "recompute_ratio": 0.5}})
    report = targeted.model_extra["blendgate"]["chunk_cache"]
    assert report["fidelity_target"] == 0.6 and report["recompute_ratio"] <= 0.5
    assert report["fidelity_estimate"] >= 0.6 or report["recompute_ratio"] >= 0.49
    assert sum(report["recomputed_per_chunk"]) == report["recomputed_tokens"]
    for bad in (0, 1.5, "high"):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=EMBEDDED, messages=ask, extra_body={
                "documents": documents, "blend": {"fidelity_target": bad}})


def test_a_rag_chat_over_a_multi_chunk_document_blends_each_chunk_after_its_predecessor(
        http: httpx.Client, client: openai.OpenAI) -> None:
    # One document of about 600 tokens: three chunks of at most 256 (retrieval.chunk_tokens), each but the first
    # computed after the one before it (chunk_cache.chunk_context "document", the default).
    archive = " ".join(f"Room {i} of the harbour archive holds the ledgers of the year {1800 + i}, bound in "
                       f"{'red' if i % 2 else 'green'} leather." for i in range(30))
    response = http.post("/v1/collections/archive/documents", json={"documents": [{"source": "archive",
                                                                                    "text": archive}]})
    assert response.status_code == 200 and response.json()["chunks"] >= 3, response.text
    ask = [{"role": "user", "content": "Which room holds the ledgers of the year 1815?"}]
    for attempt in ("computed", "cached"):
        answer = client.chat.completions.create(model=EMBEDDED, messages=ask, max_tokens=4, temperature=0,
                                                extra_body={"rag": {"collection": "archive", "top_k": 3}})
        rag = answer.model_extra["blendgate"]["rag"]
        report = answer.model_extra["blendgate"]["chunk_cache"]
        assert report["mode"] == "blend" and len(report["chunks"]) == len(rag["chunks"]) == 3
        assert sorted(c["position"] for c in rag["chunks"]) == [0, 1, 2]
        # The second time, each chunk's KV (kept under its own document context) is reused.
        assert all(c["hit"] for c in report["chunks"]) == (attempt == "cached")
