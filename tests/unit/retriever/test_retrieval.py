"""Retrieval in process: loaders, chunking, the store and FAISS indexes, with the real tokenizer and embedder."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from blendgate.retriever.chunking import Chunker
from blendgate.retriever.document_store import DocumentStore
from blendgate.retriever.loaders import LoadedFile, SkippedFile, SourceDocument, load_file
from blendgate.retriever.service import CorruptIndexError, RetrievalError, Retriever, preceding_text

FACTS = {
    "castle.txt": "The blue castle stands on a granite hill. Its secret code is 4711.\n\nThe castle has nine towers.",
    "river.md": "# Rivers\n\nThe Silverrun river flows north for 312 kilometres. It freezes every January.",
    "bakery.html": "<html><head><script>var x = 1;</script><style>p {}</style></head><body><h1>Bakery</h1>"
                   "<p>The corner bakery sells rye bread on Tuesdays.</p></body></html>",
}


def make_pdf(text: str) -> bytes:
    """A minimal one-page PDF with `text` on it (computed xref, so strict readers accept it)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "nested").mkdir(parents=True)
    for name, text in FACTS.items():
        (folder / name).write_text(text)
    (folder / "nested" / "notes.jsonl").write_text(
        json.dumps({"id": "n1", "text": "Marta's favourite colour is teal."}) + "\n"
        + json.dumps({"id": "n2", "text": "The meeting moved to Thursday at noon."}) + "\n")
    (folder / "nested" / "manual.pdf").write_bytes(make_pdf("The pump must be serviced every 90 days."))
    (folder / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    (folder / "empty.txt").write_text("   \n")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (folder / ".hidden.txt").write_text("never ingested")
    return folder


def make_retriever(path: Path, embedder, tokenizer, **options) -> Retriever:
    return Retriever(path, embedder, tokenizer, **options)


def test_loaders_read_each_format_and_skip_bad_files_with_reasons(corpus: Path) -> None:
    html = load_file(corpus / "bakery.html", max_bytes=1 << 20)
    assert isinstance(html, LoadedFile)
    assert "rye bread on Tuesdays" in html.documents[0].text and "var x" not in html.documents[0].text
    pdf = load_file(corpus / "nested" / "manual.pdf", max_bytes=1 << 20)
    assert isinstance(pdf, LoadedFile) and "serviced every 90 days" in pdf.documents[0].text
    jsonl = load_file(corpus / "nested" / "notes.jsonl", max_bytes=1 << 20)
    assert [d.source.rsplit("#", 1)[1] for d in jsonl.documents] == ["n1", "n2"]
    squad = corpus / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "One."}, {"context": "Two."}]}]}))
    assert [d.source.rsplit("#", 1)[1] for d in load_file(squad, max_bytes=1 << 20).documents] == ["T/0", "T/1"]
    reasons = {
        "image.bin": "unsupported file type",
        "empty.txt": "no text",
        "broken.jsonl": "line 2 is not JSON",
    }
    for name, reason in reasons.items():
        skipped = load_file(corpus / name, max_bytes=1 << 20)
        assert isinstance(skipped, SkippedFile) and reason in skipped.reason, (name, skipped)
    binary_txt = corpus / "fake.txt"
    binary_txt.write_bytes(b"abc\x00\x01\x02")
    assert "binary" in load_file(binary_txt, max_bytes=1 << 20).reason
    assert "larger than" in load_file(corpus / "castle.txt", max_bytes=10).reason
    fake_pdf = corpus / "fake.pdf"
    fake_pdf.write_text("not a pdf")
    assert "not a PDF" in load_file(fake_pdf, max_bytes=1 << 20).reason


def test_chunks_follow_sentences_fit_the_token_budget_and_have_stable_ids(tokenizer) -> None:
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(80)]
    text = " ".join(sentences[:40]) + "\n\n" + " ".join(sentences[40:])
    chunker = Chunker(tokenizer, chunk_tokens=64, overlap_tokens=16)
    chunks = chunker.chunk(text)
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.token_count <= 64 + 2  # joining sentences may merge a token at a boundary
        assert chunk.text.endswith(".")  # split on sentence ends
    assert [c.position for c in chunks] == list(range(len(chunks)))
    # Overlap: each chunk starts with the last sentence of the one before.
    for before, after in zip(chunks, chunks[1:]):
        assert re.split(r"(?<=\.)\s+", after.text)[0] in before.text
    again = Chunker(tokenizer, chunk_tokens=64, overlap_tokens=16).chunk(text)
    assert [c.id for c in again] == [c.id for c in chunks]
    assert len({c.id for c in chunks}) == len(chunks)
    # A sentence longer than a chunk is cut by tokens.
    giant = Chunker(tokenizer, chunk_tokens=32, overlap_tokens=4).chunk("word " * 300)
    assert len(giant) > 5 and all(c.token_count <= 34 for c in giant)


def test_ingest_search_update_and_delete(corpus: Path, tmp_path: Path, embedder, tokenizer) -> None:
    retriever = make_retriever(tmp_path / "data", embedder, tokenizer)
    summary = retriever.ingest_paths([corpus], "facts")
    assert summary.files == 5 and summary.chunks >= 6
    assert {Path(p).name for p, _ in summary.skipped} == {"image.bin", "empty.txt", "broken.jsonl"}
    top = retriever.search("facts", "What is the secret code of the blue castle?", 2)
    assert "4711" in top[0].text and top[0].source.endswith("castle.txt")
    assert top[0].score >= top[1].score
    assert "90 days" in retriever.search("facts", "How often must the pump be serviced?", 1)[0].text

    again = retriever.ingest_paths([corpus], "facts")
    assert (again.files, again.unchanged, again.chunks) == (0, 5, 0)

    (corpus / "castle.txt").write_text("The blue castle's secret code changed to 8080.")
    changed = retriever.ingest_paths([corpus / "castle.txt"], "facts")
    assert changed.files == 1 and changed.removed_chunks >= 1
    hits = retriever.search("facts", "secret code of the blue castle", 3)
    assert "8080" in hits[0].text and not any("4711" in h.text for h in hits)

    version = retriever.collection_version("facts")
    assert retriever.delete("facts", str(corpus / "river.md")) >= 1
    assert retriever.collection_version("facts").follows(version)
    assert all("Silverrun" not in h.text for h in retriever.search("facts", "Silverrun river", 5))
    with pytest.raises(RetrievalError) as missing:
        retriever.delete("facts", "/no/such/source")
    assert missing.value.status == 404

    retriever.delete("facts")
    with pytest.raises(RetrievalError) as gone:
        retriever.search("facts", "anything", 1)
    assert gone.value.status == 404 and retriever.collections() == []


def test_collections_survive_a_restart_and_a_crash_between_store_and_index(corpus, tmp_path, embedder,
                                                                            tokenizer) -> None:
    data = tmp_path / "data"
    make_retriever(data, embedder, tokenizer).ingest_paths([corpus], "facts")
    reopened = make_retriever(data, embedder, tokenizer)
    reopened.load_all()
    assert "4711" in reopened.search("facts", "secret code of the blue castle", 1)[0].text
    # A crash after the store committed but before the index was saved leaves an older index version:
    # it is rebuilt from the store, nothing lost.
    meta = data / "indexes" / "facts.json"
    meta.write_text(json.dumps({"version": 0, "size": 0}))
    (data / "indexes" / "facts.faiss").write_bytes((data / "indexes" / "facts.faiss").read_bytes())
    recovered = make_retriever(data, embedder, tokenizer)
    assert "Silverrun" in recovered.search("facts", "Silverrun river length", 1)[0].text


def test_a_corrupt_index_file_names_itself_and_the_fix(corpus, tmp_path, embedder, tokenizer) -> None:
    data = tmp_path / "data"
    make_retriever(data, embedder, tokenizer).ingest_paths([corpus], "facts")
    (data / "indexes" / "facts.faiss").write_bytes(b"this is not an index")
    broken = make_retriever(data, embedder, tokenizer)
    with pytest.raises(CorruptIndexError) as raised:
        broken.load_all()
    assert "facts.faiss" in str(raised.value) and "blendgate reindex --collection facts" in str(raised.value)
    assert broken.reindex("facts") > 0
    assert "4711" in make_retriever(data, embedder, tokenizer).search("facts", "castle secret code", 1)[0].text


def test_a_damaged_index_file_is_refused_not_searched(corpus, tmp_path, embedder, tokenizer) -> None:
    """Bytes flipped inside the vectors leave a file FAISS reads happily (scores of 1e23, wrong hits): the
    checksum written beside it catches that, at start-up and when another process's index is picked up."""
    data = tmp_path / "data"
    make_retriever(data, embedder, tokenizer).ingest_paths([corpus], "facts")
    index_file = data / "indexes" / "facts.faiss"

    def damage() -> None:
        damaged = bytearray(index_file.read_bytes())
        damaged[len(damaged) // 2] ^= 0x7F  # in the middle of the stored vectors
        index_file.write_bytes(bytes(damaged))

    damage()
    with pytest.raises(CorruptIndexError) as raised:
        make_retriever(data, embedder, tokenizer).load_all()
    assert "facts.faiss" in str(raised.value) and "checksum" in str(raised.value)
    assert "blendgate reindex --collection facts" in str(raised.value)

    gateway = make_retriever(data, embedder, tokenizer)
    assert gateway.reindex("facts") > 0
    assert "4711" in gateway.search("facts", "castle secret code", 1)[0].text
    # Another process (the CLI) changes the collection; its index file is damaged before the gateway reads it.
    extra = tmp_path / "extra.txt"
    extra.write_text("The old mill grinds barley on Mondays.")
    make_retriever(data, embedder, tokenizer).ingest_paths([extra], "facts")
    damage()
    with pytest.raises(CorruptIndexError) as at_query:
        gateway.search("facts", "castle secret code", 1)
    assert at_query.value.status == 503 and at_query.value.code == "index_corrupt"


def test_a_collection_deleted_and_created_again_elsewhere_is_another_collection(corpus, tmp_path, embedder,
                                                                                tokenizer) -> None:
    """`blendgate delete` then `blendgate ingest` of the same name while the gateway runs: the gateway must
    drop its index of the old collection and the semantic-cache key must change, although the new
    collection's version number is the old one's again."""
    from blendgate.gateway.answer_cache import AnswerCache
    from blendgate.gateway.loadable import Loadable
    from blendgate.gateway.schemas import ChatCompletionRequest
    from blendgate.semcache.settings import SemanticCacheSettings

    data = tmp_path / "data"
    gateway = make_retriever(data, embedder, tokenizer)
    cli = make_retriever(data, embedder, tokenizer)  # another process in real use: they share only the files
    cache = AnswerCache(SemanticCacheSettings(), lambda model: None, "Answer from the documents.", {},
                        retriever=Loadable.of(gateway))
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "What is sold on Tuesdays?"}],
         "rag": {"collection": "c", "top_k": 1}})

    cli.ingest_paths([corpus / "castle.txt"], "c")
    assert "4711" in gateway.search("c", "secret code of the blue castle", 1)[0].text
    before, key_before = gateway.collection_version("c"), cache.context(request, None, "c")[0]
    cli.delete("c")
    cli.ingest_paths([corpus / "bakery.html"], "c")
    hits = gateway.search("c", "When does the bakery sell rye bread?", 1)
    assert hits and "rye bread" in hits[0].text
    after = gateway.collection_version("c")
    assert after.number == before.number and after != before
    assert cache.context(request, None, "c")[0] != key_before


def test_an_embedder_factory_is_called_only_where_an_embedder_is_needed(corpus, tmp_path, embedder,
                                                                       tokenizer) -> None:
    """Listing, deleting and opening indexes load no embedder (`blendgate collections`, `blendgate delete`, a
    gateway refusing a corrupt index at start-up); ingesting and searching load it, once."""
    data = tmp_path / "data"
    make_retriever(data, embedder, tokenizer).ingest_paths([corpus], "facts")
    loads: list[int] = []

    def load():
        loads.append(1)
        return embedder

    lazy = make_retriever(data, load, tokenizer)
    lazy.load_all()
    assert [c["name"] for c in lazy.collections()] == ["facts"]
    assert lazy.delete("facts", str(corpus / "castle.txt")) >= 1
    with pytest.raises(RetrievalError, match="nothing to ingest"):
        lazy.ingest_paths([tmp_path / "missing"], "facts")
    assert loads == []
    assert "rye bread" in lazy.search("facts", "When does the bakery sell rye bread?", 1)[0].text
    assert loads == [1]
    lazy.ingest_paths([corpus / "castle.txt"], "other")
    assert loads == [1]


def test_an_ingest_that_finds_nothing_usable_in_a_path_is_an_error(corpus, tmp_path, embedder, tokenizer) -> None:
    retriever = make_retriever(tmp_path / "data", embedder, tokenizer)
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden-only").mkdir()
    (tmp_path / "hidden-only" / ".notes.txt").write_text("hidden")
    (tmp_path / "unusable").mkdir()
    (tmp_path / "unusable" / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    cases = {tmp_path / "missing.txt": "no such file or folder", tmp_path / "empty": "no files in it",
             tmp_path / "hidden-only": "no files in it", tmp_path / "unusable": "image.bin: ",
             corpus / "empty.txt": "empty"}
    for path, reason in cases.items():
        with pytest.raises(RetrievalError) as refused:
            retriever.ingest_paths([path], "c")
        assert (refused.value.status, refused.value.code) == (400, "nothing_to_ingest")
        assert str(path) in str(refused.value) and reason in str(refused.value), str(refused.value)
    # One barren path among good ones: the whole ingest is refused, naming it, and nothing is written.
    with pytest.raises(RetrievalError, match="missing.txt: no such file or folder"):
        retriever.ingest_paths([corpus / "castle.txt", tmp_path / "missing.txt"], "c")
    assert retriever.collections() == []
    # Documents sent over HTTP: one with only whitespace is nothing to ingest either.
    with pytest.raises(RetrievalError, match="api#2: no text in it") as blank:
        retriever.ingest_documents("c", [SourceDocument("api#1", "The mill grinds barley."),
                                         SourceDocument("api#2", " \n\t ")])
    assert (blank.value.status, blank.value.code) == (400, "nothing_to_ingest") and retriever.collections() == []
    # Found but unchanged is not nothing.
    assert retriever.ingest_paths([corpus / "castle.txt"], "c").files == 1
    assert retriever.ingest_paths([corpus / "castle.txt"], "c").unchanged == 1


def test_a_store_from_before_generations_gets_one_per_collection(tmp_path) -> None:
    path = tmp_path / "chunks.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE collections (name TEXT PRIMARY KEY, version INTEGER NOT NULL, created REAL NOT NULL, "
                "embedder TEXT NOT NULL, dimension INTEGER NOT NULL, tokenizer TEXT NOT NULL)")
    old.execute("INSERT INTO collections VALUES ('docs', 3, 0, 'all-MiniLM-L6-v2', 384, 'x')")
    old.commit()
    old.close()
    record = DocumentStore(path).collection("docs")
    assert record.version == 3 and re.fullmatch(r"[0-9a-f]{16}", record.generation)
    assert DocumentStore(path).collection("docs").generation == record.generation  # drawn once, then kept


def test_large_collections_switch_to_an_ivf_index(tmp_path, embedder, tokenizer) -> None:
    lines = [json.dumps({"text": f"Record {i}: the warehouse in city {i} stores {i * 3} crates of item {i}."})
             for i in range(300)]
    source = tmp_path / "records.jsonl"
    source.write_text("\n".join(lines))
    exact = make_retriever(tmp_path / "exact", embedder, tokenizer)
    exact.ingest_paths([source], "records")
    # nprobe above the number of lists makes IVF search every list: it must then agree with exact search.
    approximate = make_retriever(tmp_path / "ivf", embedder, tokenizer, approximate_threshold=100, nprobe=1000)
    approximate.ingest_paths([source], "records")
    assert exact._current("records").index.kind == "flat"
    assert approximate._current("records").index.kind == "ivf"
    for query in ("warehouse in city 123", "crates of item 7", "Record 250"):
        expected = [h.id for h in exact.search("records", query, 5)]
        assert [h.id for h in approximate.search("records", query, 5)] == expected
    approximate.delete("records", str(source))
    assert approximate.search("records", "Record 250", 5) == []


def test_bad_collection_names_are_refused(tmp_path, embedder, tokenizer, corpus) -> None:
    retriever = make_retriever(tmp_path / "data", embedder, tokenizer)
    for name in ("../escape", "", "a" * 65, "white space"):
        with pytest.raises(RetrievalError) as raised:
            retriever.ingest_paths([corpus], name)
        assert raised.value.status == 400


def test_a_retrieved_chunk_carries_its_documents_previous_chunk(tmp_path, embedder, tokenizer) -> None:
    retriever = make_retriever(tmp_path / "data", embedder, tokenizer, chunk_tokens=24, overlap_tokens=0)
    sentences = ["The lighthouse keeper rows to the island every Monday.",
                 "The island's well gives fresh water all year round.",
                 "The lighthouse lamp burns whale oil from the mainland.",
                 "The keeper's dog is called Biscuit and fears the fog horn."]
    retriever.ingest_documents("coast", [SourceDocument("log", " ".join(sentences)),
                                         SourceDocument("other", "Biscuits are baked in the harbour inn.")])
    stored = sorted(retriever.documents.chunks_by_row(list(retriever.documents.sources("coast"))).values(),
                    key=lambda c: (c.source, c.position))
    log_chunks = [c for c in stored if c.source == "log"]
    assert len(log_chunks) >= 3, "the document must span several chunks for this test"
    hits = retriever.search("coast", "What is the keeper's dog called?", 6)
    by_place = {(h.source, h.position): h for h in hits}
    for hit in hits:
        if hit.position == 0:
            assert hit.previous is None
        else:
            assert hit.previous == log_chunks[hit.position - 1].text
    assert any(h.previous is not None for h in hits) and by_place[("other", 0)].previous is None


def test_preceding_text_drops_the_sentences_a_chunk_repeats() -> None:
    assert preceding_text("A b. C d. E f.", "E f. G h.") == "A b. C d."
    assert preceding_text("A b. C d.", "G h.") == "A b. C d."  # no overlap
    assert preceding_text("A xE f.", "E f. G h.") == "A xE f."  # a match inside a word is no repeat
    assert preceding_text("E f.", "E f. G h.") is None  # all of it repeated


def test_with_overlapping_chunks_a_chunks_previous_text_is_what_precedes_it_in_its_document(
        tmp_path, embedder, tokenizer) -> None:
    retriever = make_retriever(tmp_path / "data", embedder, tokenizer, chunk_tokens=24, overlap_tokens=14)
    sentences = ["The lighthouse keeper rows to the island every Monday.",
                 "The island's well gives fresh water all year round.",
                 "The lighthouse lamp burns whale oil from the mainland.",
                 "The keeper's dog is called Biscuit and fears the fog horn."]
    document = " ".join(sentences)
    retriever.ingest_documents("coast", [SourceDocument("log", document)])
    hits = [h for h in retriever.search("coast", "What is the keeper's dog called?", 6) if h.position > 0]
    assert hits, "the document must span several chunks for this test"
    for hit in hits:
        before = document[:document.index(hit.text)].rstrip()
        assert hit.previous is not None and before.endswith(hit.previous) and not hit.previous.endswith(
            hit.text.split(". ")[0] + ".")
