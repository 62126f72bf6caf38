"""The FAISS index of one collection: exact inner product while small, IVF once it grows.


Vectors are unit length, so inner product is cosine similarity. Ids are the chunk rows of the store,
so the index can be rebuilt from the store at any time and removals are by id. Saving returns the file's
SHA-256 and loading checks it, so a file damaged after it was written is refused rather than searched.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import faiss
import numpy as np

from . import defaults


class IndexFileError(Exception):
    """An index file that cannot be used: unreadable, not a collection index, or not the bytes written."""


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    def __init__(self, index: faiss.Index, *, nprobe: int = defaults.NPROBE) -> None:
        self.index = index
        self.nprobe = nprobe
        self._search_index = self._for_search(index)

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def _for_search(self, index: faiss.Index) -> faiss.Index:
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe
        if gpu_available():  # GPU FAISS when its build is installed; CPU FAISS otherwise
            return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    @classmethod
    def build(cls, dimension: int, vectors: np.ndarray, ids: np.ndarray, *, approximate_threshold: int,
              nprobe: int = defaults.NPROBE) -> "VectorIndex":
        """Exact search below `approximate_threshold` vectors, IVF (trained on these vectors) above."""
        if len(vectors) < approximate_threshold:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        else:
            # About 4 * sqrt(n) lists, and at least 39 training points per list as k-means in FAISS wants.
            nlist = max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // 39))
            # IVF keeps ids itself and removes by id; wrapping it in an IndexIDMap would break removal.
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        if len(vectors):
            index.add_with_ids(vectors, ids.astype(np.int64))
        return cls(index, nprobe=nprobe)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(vectors):
            self.index.add_with_ids(vectors, ids.astype(np.int64))
            self._search_index = self._for_search(self.index)

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            self._search_index = self._for_search(self.index)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self.size == 0:
            return []
        scores, ids = self._search_index.search(query.reshape(1, -1).astype(np.float32), min(k, self.size))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def save(self, path: Path) -> str:
        """Write to a temporary file and rename it over the old one: a crash leaves one or the other. Returns
        the SHA-256 (hex) of the bytes written, for `load` to check."""
        data = faiss.serialize_index(self.index).tobytes()
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: Path, sha256: str, *, nprobe: int = defaults.NPROBE) -> "VectorIndex":
        """The index in `path`, whose bytes must have the SHA-256 `save` returned. Raises IndexFileError when
        the file cannot be read, is not those bytes (damaged since), or is not a collection index."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IndexFileError(f"unreadable ({exc.strerror})") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IndexFileError("its checksum does not match the one recorded when it was written")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexFileError(str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable") from exc
        # read_index already returns the concrete class (a downcast copy would not own the index).
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVF)):
            raise IndexFileError("not a blendgate collection index")
        return cls(index, nprobe=nprobe)
