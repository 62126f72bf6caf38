"""The document store: collections on disk, their chunk texts, metadata and embeddings in SQLite, the source of
truth (not to be confused with the chunk-KV store, chunkcache/kv_store.py, which keeps chunks' KV caches).

Every ingest or delete is one transaction that also bumps the collection's version, so a crash leaves
the previous state whole, and the FAISS index (a derived file) can always be rebuilt from here. A collection
also has a generation, a random id drawn when it is created: a collection deleted and created again under the
same name (its version numbers starting over) is another collection to every reader that compares versions.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    embedder TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    tokenizer TEXT NOT NULL,
    generation TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    collection TEXT NOT NULL,
    path TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    ingested REAL NOT NULL,
    PRIMARY KEY (collection, path)
);
CREATE TABLE IF NOT EXISTS chunks (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    file TEXT NOT NULL,
    source TEXT NOT NULL,
    position INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    text TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks (collection, file);
CREATE INDEX IF NOT EXISTS chunks_by_place ON chunks (collection, file, source, position);
"""


def new_generation() -> str:
    """A fresh generation id: 16 hex digits, drawn when a collection is created."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class CollectionVersion:
    """Which state of a collection something reflects: the collection's generation (a random id drawn when it
    was created) and the version number (bumped by every change since). Equal only for the same state of the
    same collection, so a collection deleted and created again never matches its predecessor."""

    generation: str
    number: int

    def __str__(self) -> str:
        return f"{self.number}@{self.generation}"

    def follows(self, earlier: CollectionVersion) -> bool:
        """True when this is the state right after `earlier` (same collection, the next version)."""
        return self.generation == earlier.generation and self.number == earlier.number + 1


@dataclass(frozen=True)
class CollectionRecord:
    name: str
    version: int
    created: float
    embedder: str
    dimension: int
    tokenizer: str
    generation: str

    @property
    def state(self) -> CollectionVersion:
        return CollectionVersion(self.generation, self.version)


@dataclass(frozen=True)
class StoredChunk:
    row: int
    chunk_id: str
    source: str
    position: int
    text: str
    token_count: int


@dataclass(frozen=True)
class NewChunk:
    file: str
    source: str
    position: int
    chunk_id: str
    text: str
    token_count: int
    embedding: np.ndarray


class DocumentStore:
    """One SQLite file of collections; thread-safe, and shared with other processes (the CLI) through WAL."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")  # the CLI may ingest while the gateway reads
            self._db.executescript(_SCHEMA)
            self._add_generations()
        except sqlite3.DatabaseError as exc:
            raise sqlite3.DatabaseError(f"{path} is not a usable blendgate store ({exc}); "
                                        "move it away to start empty") from exc

    def _add_generations(self) -> None:
        """Stores written before generations existed get the column, and each collection a generation."""
        def missing() -> bool:
            return "generation" not in [row[1] for row in self._db.execute("PRAGMA table_info(collections)")]

        if not missing():
            return
        with self._transaction():
            if missing():  # checked again under the write lock: another process may be opening the store too
                self._db.execute("ALTER TABLE collections ADD COLUMN generation TEXT NOT NULL DEFAULT ''")
                for (name,) in self._db.execute("SELECT name FROM collections").fetchall():
                    self._db.execute("UPDATE collections SET generation = ? WHERE name = ?",
                                     (new_generation(), name))

    def close(self) -> None:
        self._db.close()

    def collection(self, name: str) -> CollectionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT name, version, created, embedder, dimension, tokenizer, generation "
                                   "FROM collections WHERE name = ?", (name,)).fetchone()
        return CollectionRecord(*row) if row else None

    def collections(self) -> list[tuple[CollectionRecord, int, int]]:
        """Each collection with its number of files and chunks."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.name, c.version, c.created, c.embedder, c.dimension, c.tokenizer, c.generation, "
                "(SELECT COUNT(*) FROM files f WHERE f.collection = c.name), "
                "(SELECT COUNT(*) FROM chunks k WHERE k.collection = c.name) "
                "FROM collections c ORDER BY c.name").fetchall()
        return [(CollectionRecord(*r[:7]), r[7], r[8]) for r in rows]

    def file_hashes(self, collection: str) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT path, content_hash FROM files WHERE collection = ?", (collection,)))

    def embeddings(self, collection: str, dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, vectors) of the whole collection, for rebuilding its index."""
        with self._lock:
            records = self._db.execute("SELECT row, embedding FROM chunks WHERE collection = ? ORDER BY row",
                                       (collection,)).fetchall()
        rows = np.array([r[0] for r in records], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in records), dtype=np.float32).reshape(len(records), dimension)
        return rows, vectors

    def sources(self, collection: str) -> dict[int, str]:
        """Every chunk row of a collection with its source."""
        with self._lock:
            return dict(self._db.execute("SELECT row, source FROM chunks WHERE collection = ?", (collection,)))

    def chunks_by_row(self, rows: list[int]) -> dict[int, StoredChunk]:
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        with self._lock:
            records = self._db.execute(f"SELECT row, chunk_id, source, position, text, token_count FROM chunks "
                                       f"WHERE row IN ({marks})", rows).fetchall()
        return {r[0]: StoredChunk(*r) for r in records}

    def previous_texts(self, rows: list[int]) -> dict[int, str]:
        """For each chunk row, the text of the chunk before it in its document (same collection, file and
        source, position - 1): one indexed query, no embedding search. Rows of a document's first chunk (or
        unknown rows) are absent from the answer."""
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        with self._lock:
            records = self._db.execute(
                f"SELECT c.row, p.text FROM chunks c JOIN chunks p ON p.collection = c.collection "
                f"AND p.file = c.file AND p.source = c.source AND p.position = c.position - 1 "
                f"WHERE c.row IN ({marks})", rows).fetchall()
        return dict(records)

    def replace_files(self, record: CollectionRecord, files: dict[str, str], chunks: list[NewChunk]
                      ) -> tuple[CollectionVersion, list[int], list[int]]:
        """In one transaction: create the collection as `record` describes unless it exists (then `record` only
        names it), drop the chunks of `files` (path -> content hash), insert `chunks`, record the files, bump
        the version. Returns (the collection's new version, removed rows, added rows)."""
        with self._lock, self._transaction():
            self._ensure_collection(record)
            removed: list[int] = []
            for path, content_hash in files.items():
                removed += [r[0] for r in self._db.execute(
                    "SELECT row FROM chunks WHERE collection = ? AND file = ?", (record.name, path))]
                self._db.execute("DELETE FROM chunks WHERE collection = ? AND file = ?", (record.name, path))
                self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                                 (record.name, path, content_hash, time.time()))
            added = []
            for chunk in chunks:
                cursor = self._db.execute(
                    "INSERT INTO chunks (collection, file, source, position, chunk_id, text, token_count, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.name, chunk.file, chunk.source, chunk.position, chunk.chunk_id, chunk.text,
                     chunk.token_count, np.ascontiguousarray(chunk.embedding, dtype=np.float32).tobytes()))
                added.append(int(cursor.lastrowid))
            version = self._bump(record.name)
        return version, removed, added

    def delete(self, collection: str, file: str | None = None) -> tuple[CollectionVersion | None, list[int]]:
        """Remove one file's chunks, or the whole collection. Returns (new version or None if gone, rows)."""
        with self._lock, self._transaction():
            where, args = ("collection = ?", (collection,)) if file is None else \
                ("collection = ? AND file = ?", (collection, file))
            rows = [r[0] for r in self._db.execute(f"SELECT row FROM chunks WHERE {where}", args)]
            self._db.execute(f"DELETE FROM chunks WHERE {where}", args)
            self._db.execute(f"DELETE FROM files WHERE {where.replace('file', 'path')}", args)
            if file is None:
                self._db.execute("DELETE FROM collections WHERE name = ?", (collection,))
                return None, rows
            return self._bump(collection), rows

    def files(self, collection: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT path FROM files WHERE collection = ? ORDER BY path",
                                                   (collection,))]

    def _ensure_collection(self, record: CollectionRecord) -> None:
        self._db.execute("INSERT OR IGNORE INTO collections VALUES (?, 0, ?, ?, ?, ?, ?)",
                         (record.name, record.created, record.embedder, record.dimension, record.tokenizer,
                          record.generation))

    def _bump(self, collection: str) -> CollectionVersion:
        self._db.execute("UPDATE collections SET version = version + 1 WHERE name = ?", (collection,))
        generation, number = self._db.execute("SELECT generation, version FROM collections WHERE name = ?",
                                              (collection,)).fetchone()
        return CollectionVersion(generation, int(number))

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, kind, value, traceback) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _transaction(self) -> "DocumentStore._Tx":
        return DocumentStore._Tx(self._db)


def iter_batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
