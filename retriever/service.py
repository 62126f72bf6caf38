"""Collections as a service: ingest, search, list and delete, keeping each FAISS index in step with the
document store (document_store.py).

Each index file has a JSON file beside it naming the collection state it reflects (generation and version) and
the index file's SHA-256. An index of another state (older, or of an earlier collection of the same name) is
rebuilt from the store; one of the current state whose bytes fail the checksum or cannot be read is refused
with CorruptIndexError, which names the file and `blendgate reindex`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import defaults
from .chunking import Chunker
from .document_store import CollectionRecord, CollectionVersion, DocumentStore, NewChunk, iter_batches, new_generation
from .embedder import Embedder
from .index import IndexFileError, VectorIndex
from .loaders import LoadedFile, SkippedFile, SourceDocument, discover, load_file

log = logging.getLogger("blendgate.retriever")

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EMBED_BATCH = 256


class RetrievalError(Exception):
    """A request the retriever cannot serve; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class CorruptIndexError(RetrievalError):
    """A collection's index file is damaged; the message names the file and the `blendgate reindex` command.
    At start-up it stops the gateway; later (a file written by another process) a query gets 503."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, "index_corrupt")


def preceding_text(previous: str, text: str) -> str | None:
    """The part of a document's previous chunk that comes before `text`: `previous` without its longest end that
    `text` begins with (chunking.Chunker carries a chunk's last sentences into the next one as overlap), so that
    the chunk's KV is computed after the document as it precedes the chunk, not after a copy of the chunk's own
    start. None when nothing is left."""
    for size in range(min(len(previous), len(text)), 0, -1):  # the repeat starts where a word does
        if previous.endswith(text[:size]) and (size == len(previous) or previous[-size - 1].isspace()):
            previous = previous[:-size]
            break
    return previous.rstrip() or None


@dataclass(frozen=True)
class RetrievedChunk:
    """A chunk a query found (Retriever.search to the gateway's RAG prompt), or an inline document as one.
    `position`: its place in its source document (0 first); `score`: the index's similarity; `token_count` in
    the collection's tokenizer; `previous`: the text of the chunk before it in its document (position - 1, from
    the stored chunks) without the sentences this chunk repeats from it (the chunker's overlap:
    `preceding_text`), None for a document's first chunk and for inline documents. The gateway computes the
    chunk's KV after it (gateway/backends/chat_prompt.py)."""

    id: str
    text: str
    source: str
    position: int
    score: float
    token_count: int
    previous: str | None = None

    def citation(self) -> dict:
        return {"id": self.id, "source": self.source, "position": self.position, "score": round(self.score, 4)}


@dataclass
class IngestSummary:
    collection: str
    files: int = 0
    unchanged: int = 0
    chunks: int = 0
    removed_chunks: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"collection": self.collection, "files": self.files, "unchanged": self.unchanged,
                "chunks": self.chunks, "removed_chunks": self.removed_chunks, "seconds": round(self.seconds, 3),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


class Progress:
    """What the ingest reports as it goes; the CLI draws it as progress bars."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str, amount: int = 1) -> None: ...


@dataclass
class _LoadedIndex:
    index: VectorIndex
    version: CollectionVersion


class Retriever:
    def __init__(self, data_dir: Path, embedder: Embedder | Callable[[], Embedder], tokenizer: object | None = None, *,
                 tokenizer_factory: Callable[[], object] | None = None, chunk_tokens: int = defaults.CHUNK_TOKENS,
                 overlap_tokens: int = defaults.OVERLAP_TOKENS,
                 approximate_threshold: int = defaults.APPROXIMATE_THRESHOLD,
                 max_file_bytes: int = defaults.MAX_FILE_BYTES, nprobe: int = defaults.NPROBE) -> None:
        """Give the tokenizer, or a `tokenizer_factory` that loads it on the first ingest rather than at
        start-up (a GGUF model's tokenizer comes from its one-time conversion, which the model load does).
        `embedder`: the Embedder, or a function that loads it where it is first needed (`embedder`), so that
        listing or deleting collections, and opening their indexes, load no model."""
        if (tokenizer is None) == (tokenizer_factory is None):
            raise ValueError("give a tokenizer or a tokenizer_factory")
        self.data_dir = data_dir
        self.documents = DocumentStore(data_dir / "chunks.sqlite3")
        self._embedder = embedder if isinstance(embedder, Embedder) else None
        self._embedder_factory = None if isinstance(embedder, Embedder) else embedder
        self._tokenizer = tokenizer
        self._tokenizer_factory = tokenizer_factory
        self._chunk_tokens = chunk_tokens
        self._overlap_tokens = overlap_tokens
        self._chunker: Chunker | None = None
        self.approximate_threshold = approximate_threshold
        self.max_file_bytes = max_file_bytes
        self.nprobe = nprobe
        self._indexes: dict[str, _LoadedIndex] = {}
        self._lock = threading.RLock()
        (data_dir / "indexes").mkdir(parents=True, exist_ok=True)

    @property
    def embedder(self) -> Embedder:
        """The embedder, loaded here the first time it is needed when a factory was given."""
        with self._lock:
            if self._embedder is None:
                self._embedder = self._embedder_factory()
            return self._embedder

    @property
    def chunker(self) -> Chunker:
        with self._lock:
            if self._chunker is None:
                tokenizer = self._tokenizer if self._tokenizer is not None else self._tokenizer_factory()
                self._chunker = Chunker(tokenizer, self._chunk_tokens, self._overlap_tokens)
            return self._chunker

    # -- indexes ----------------------------------------------------------------------------------
    def _index_path(self, name: str) -> Path:
        return self.data_dir / "indexes" / f"{name}.faiss"

    def _rebuild(self, record: CollectionRecord) -> VectorIndex:
        rows, vectors = self.documents.embeddings(record.name, record.dimension)
        return VectorIndex.build(record.dimension, vectors, rows, approximate_threshold=self.approximate_threshold,
                                 nprobe=self.nprobe)

    def _save(self, name: str, loaded: _LoadedIndex) -> None:
        path = self._index_path(name)
        sha256 = loaded.index.save(path)
        # Beside the index: the collection state it reflects and its checksum; written after the index itself.
        meta = path.with_suffix(".json")
        meta.with_suffix(".json.tmp").write_text(json.dumps(
            {"generation": loaded.version.generation, "version": loaded.version.number, "size": loaded.index.size,
             "sha256": sha256}))
        meta.with_suffix(".json.tmp").replace(meta)

    def _load(self, record: CollectionRecord) -> _LoadedIndex:
        path = self._index_path(record.name)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            saved = CollectionVersion(meta["generation"], meta["version"])
        except (ValueError, KeyError, TypeError, OSError):
            saved = None
        if saved == record.state and path.exists():
            try:
                return _LoadedIndex(VectorIndex.load(path, str(meta.get("sha256")), nprobe=self.nprobe), saved)
            except IndexFileError as exc:
                raise CorruptIndexError(
                    f"the index file {path} of collection '{record.name}' is corrupt ({exc}); rebuild it from the "
                    f"stored chunks with: blendgate reindex --collection {record.name}") from exc
        # No index yet, one from before a crash mid-ingest, or one of an earlier collection of this name: the
        # store is the truth.
        log.info("building the index of collection %s from the store", record.name)
        loaded = _LoadedIndex(self._rebuild(record), record.state)
        self._save(record.name, loaded)
        return loaded

    def _current(self, name: str) -> _LoadedIndex:
        record = self.documents.collection(name)
        if record is None:
            raise RetrievalError(404, f"collection '{name}' does not exist", "collection_not_found")
        with self._lock:
            loaded = self._indexes.get(name)
            # Changed by another process (the CLI), or deleted and created again there.
            if loaded is None or loaded.version != record.state:
                loaded = self._indexes[name] = self._load(record)
            return loaded

    def load_all(self) -> None:
        """Open every collection's index now (the gateway does this at start-up)."""
        for record, _, _ in self.documents.collections():
            self._current(record.name)

    def reindex(self, name: str) -> int:
        record = self.documents.collection(name)
        if record is None:
            raise RetrievalError(404, f"collection '{name}' does not exist", "collection_not_found")
        with self._lock:
            loaded = self._indexes[name] = _LoadedIndex(self._rebuild(record), record.state)
            self._save(name, loaded)
        return loaded.index.size

    # -- ingest -----------------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: str) -> None:
        if not COLLECTION_NAME.match(name):
            raise RetrievalError(400, f"invalid collection name '{name}': use letters, digits, '_', '-' or '.', "
                                      "up to 64 characters", "invalid_collection_name")

    def _record(self, name: str) -> CollectionRecord:
        self._check_name(name)
        existing = self.documents.collection(name)
        if existing is not None:
            if existing.embedder != self.embedder.name or existing.dimension != self.embedder.dimension:
                raise RetrievalError(409, f"collection '{name}' was built with embedder {existing.embedder}; "
                                          f"this gateway uses {self.embedder.name}", "embedder_mismatch")
            if existing.tokenizer != self.chunker.fingerprint:
                raise RetrievalError(409, f"collection '{name}' was chunked with another tokenizer; "
                                          "delete and re-ingest it", "tokenizer_mismatch")
            return existing
        return CollectionRecord(name, 0, time.time(), self.embedder.name, self.embedder.dimension,
                                self.chunker.fingerprint, new_generation())

    def ingest_paths(self, paths: Iterable[Path], collection: str, progress: Progress | None = None) -> IngestSummary:
        """Ingest files and folders (walked recursively) into `collection`, created if new. Files that cannot be
        used are skipped with a reason in the summary, but every given path must hold at least one usable file
        (new, changed or unchanged): a path that is missing, an empty folder or only unusable files raises
        RetrievalError (400, "nothing_to_ingest") naming each such path and why, and nothing is written."""
        paths = list(dict.fromkeys(paths))  # each given path once
        self._check_name(collection)
        progress = progress or Progress()
        started = time.perf_counter()
        summary = IngestSummary(collection)
        found = [(given, item) for given in paths for item in discover([given])]
        known = self.documents.file_hashes(collection)
        changed: list[LoadedFile] = []
        usable: dict[Path, bool] = {given: False for given in paths}
        unusable: dict[Path, list[SkippedFile]] = {given: [] for given in paths}
        progress.start("reading", len(found))
        for given, item in found:
            loaded = item if isinstance(item, SkippedFile) else load_file(item, max_bytes=self.max_file_bytes)
            progress.advance("reading")
            if isinstance(loaded, SkippedFile):
                summary.skipped.append((str(loaded.path), loaded.reason))
                unusable[given].append(loaded)
                continue
            usable[given] = True
            if known.get(str(loaded.path.resolve())) == loaded.content_hash:
                summary.unchanged += 1
            else:
                changed.append(loaded)
        barren = [f"{given}: {_why_nothing(given, unusable[given])}" for given, ok in usable.items() if not ok]
        if barren:
            raise RetrievalError(400, "nothing to ingest from " + "; ".join(barren), "nothing_to_ingest")
        record = self._record(collection)  # after reading: a path with nothing to ingest loads no embedder
        files = {str(f.path.resolve()): f.content_hash for f in changed}
        documents = [(str(f.path.resolve()), d) for f in changed for d in f.documents]
        self._write(record, files, documents, summary, progress)
        summary.seconds = time.perf_counter() - started
        return summary

    def ingest_documents(self, collection: str, documents: list[SourceDocument]) -> IngestSummary:
        """Documents sent over HTTP: each `source` is replaced as a whole, like a file. A document with no text
        (only whitespace) raises RetrievalError (400, "nothing_to_ingest") naming its source; nothing is written."""
        record = self._record(collection)
        empty = [document.source for document in documents if not document.text.strip()]
        if empty:
            raise RetrievalError(400, "nothing to ingest from " + "; ".join(f"{source}: no text in it"
                                                                             for source in empty), "nothing_to_ingest")
        started = time.perf_counter()
        summary = IngestSummary(collection)
        known = self.documents.file_hashes(collection)
        by_source: dict[str, list[SourceDocument]] = {}
        for document in documents:
            by_source.setdefault(document.source, []).append(document)
        files, changed = {}, []
        for source, docs in by_source.items():
            digest = hashlib.sha256("\0".join(d.text for d in docs).encode()).hexdigest()
            if known.get(source) == digest:
                summary.unchanged += 1
                continue
            files[source] = digest
            changed += [(source, d) for d in docs]
        self._write(record, files, changed, summary, Progress())
        summary.seconds = time.perf_counter() - started
        return summary

    def _write(self, record: CollectionRecord, files: dict[str, str], documents: list[tuple[str, SourceDocument]],
               summary: IngestSummary, progress: Progress) -> None:
        pieces = [(file, document.source, chunk) for file, document in documents
                  for chunk in self.chunker.chunk(document.text)]
        progress.start("embedding", len(pieces))
        vectors = []
        for batch in iter_batches(pieces, EMBED_BATCH):
            vectors.append(self.embedder.embed([chunk.text for _, _, chunk in batch]))
            progress.advance("embedding", len(batch))
        embeddings = np.concatenate(vectors) if vectors else np.zeros((0, self.embedder.dimension), np.float32)
        new = [NewChunk(file, source, chunk.position, chunk.id, chunk.text, chunk.token_count, vector)
               for (file, source, chunk), vector in zip(pieces, embeddings)]
        summary.files = len(files)
        summary.chunks = len(new)
        if not files:
            return
        with self._lock:
            loaded = self._current(record.name) if record.version > 0 else None
            version, removed, added = self.documents.replace_files(record, files, new)
            summary.removed_chunks = len(removed)
            # The loaded index is updated in place only when this change came right after the state it reflects
            # (another process may have changed, or deleted and re-created, the collection in between).
            if loaded is None or not version.follows(loaded.version) or (
                    loaded.index.kind == "flat"
                    and loaded.index.size - len(removed) + len(added) >= self.approximate_threshold):
                stored = self.documents.collection(record.name)
                loaded = _LoadedIndex(self._rebuild(stored), version)  # type: ignore[arg-type]
            else:
                loaded.index.remove(np.array(removed, dtype=np.int64))
                loaded.index.add(embeddings, np.array(added, dtype=np.int64))
                loaded.version = version
            self._indexes[record.name] = loaded
            self._save(record.name, loaded)

    # -- queries ----------------------------------------------------------------------------------
    def search(self, collection: str, query: str, top_k: int, query_vector: np.ndarray | None = None
               ) -> list[RetrievedChunk]:
        """The top_k chunks nearest the query; pass query_vector when the query was embedded already (by
        this retriever's embedder, as the semantic cache does)."""
        loaded = self._current(collection)
        vector = query_vector if query_vector is not None else self.embedder.embed([query])[0]
        # Ask for a few more than needed: identical texts from different sources collapse into one result.
        with self._lock:
            hits = loaded.index.search(vector, top_k * 2)
        rows = self.documents.chunks_by_row([row for row, _ in hits])
        kept, seen = [], set()
        for row, score in hits:
            chunk = rows.get(row)
            if chunk is None or chunk.chunk_id in seen:
                continue
            seen.add(chunk.chunk_id)
            kept.append((row, chunk, score))
            if len(kept) == top_k:
                break
        previous = self.documents.previous_texts([row for row, _, _ in kept])  # of the chunks returned only
        results = []
        for row, chunk, score in kept:
            before = previous.get(row)
            before = None if before is None else preceding_text(before, chunk.text)
            results.append(RetrievedChunk(chunk.chunk_id, chunk.text, chunk.source, chunk.position, score,
                                          chunk.token_count, before))
        return results

    def collections(self) -> list[dict]:
        return [{"name": record.name, "version": record.version, "generation": record.generation, "files": files,
                 "chunks": chunks, "embedder": record.embedder, "created": int(record.created)}
                for record, files, chunks in self.documents.collections()]

    def collection_version(self, name: str) -> CollectionVersion | None:
        """The collection's current generation and version (None when it does not exist)."""
        record = self.documents.collection(name)
        return None if record is None else record.state

    def delete(self, collection: str, source: str | None = None) -> int:
        """Delete a collection, or one source (a file path as ingested, or a document source) in it."""
        if self.documents.collection(collection) is None:
            raise RetrievalError(404, f"collection '{collection}' does not exist", "collection_not_found")
        if source is not None:
            files = self.documents.files(collection)
            resolved = str(Path(source).resolve())
            match = source if source in files else resolved if resolved in files else None
            if match is None:
                raise RetrievalError(404, f"collection '{collection}' has no source '{source}'", "source_not_found")
            source = match
        with self._lock:
            version, rows = self.documents.delete(collection, source)
            if version is None:
                self._indexes.pop(collection, None)
                for path in (self._index_path(collection), self._index_path(collection).with_suffix(".json")):
                    path.unlink(missing_ok=True)
            elif collection in self._indexes:
                loaded = self._indexes[collection]
                if version.follows(loaded.version):
                    loaded.index.remove(np.array(rows, dtype=np.int64))
                    loaded.version = version
                    self._save(collection, loaded)
                else:  # changed by another process meanwhile: loaded afresh at the next query
                    del self._indexes[collection]
        return len(rows)


def _why_nothing(given: Path, skipped: list[SkippedFile]) -> str:
    """Why a path given to ingest yielded no usable file."""
    if len(skipped) == 1 and skipped[0].path == given:  # a missing path, or one file that was skipped
        return skipped[0].reason
    if not skipped:
        return "no files in it (hidden files are left out)"
    return "no usable file in it (" + "; ".join(f"{s.path.relative_to(given)}: {s.reason}" for s in skipped) + ")"


def open_retriever(data_dir: Path, tokenizer_factory: Callable[[], object], embedder_path: Path | None = None,
                   **options) -> Retriever:
    """A Retriever whose embedder loads where it is first needed (the gateway loads it at start-up, after
    opening the indexes: gateway/state.py)."""
    return Retriever(data_dir, lambda: Embedder(embedder_path), tokenizer_factory=tokenizer_factory, **options)
