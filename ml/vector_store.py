"""A model's vectors of the catalog's images on disk, in chunk files: appended as they are made, read in id order.

Each chunk is whole or absent (written to a temporary name, fsynced, renamed), ids ascend across chunks, so
a writer that died resumes after the last id stored, and a reader streams them without holding them all.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ml.files import atomic_write

_CHUNK = re.compile(r"^chunk-(\d{8})\.npz$")


class VectorStore:
    def __init__(self, directory) -> None:
        self.directory = Path(directory)

    def _chunks(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _CHUNK.match(p.name))

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store the next chunk; its ids must all be greater than every id stored."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if (np.diff(ids) <= 0).any() or ids[0] <= self.last_id():
            raise ValueError("vector chunks must come in ascending id order")
        self.directory.mkdir(parents=True, exist_ok=True)
        chunks = self._chunks()
        number = int(_CHUNK.match(chunks[-1].name).group(1)) + 1 if chunks else 1
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, vectors=np.asarray(vectors, dtype=np.float32))
        atomic_write(self.directory / f"chunk-{number:08d}.npz", lambda f: f.write(buffer.getvalue()))

    def last_id(self) -> int:
        """The greatest id stored (0 when empty)."""
        chunks = self._chunks()
        if not chunks:
            return 0
        with np.load(chunks[-1]) as data:
            return int(data["ids"][-1])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for path in self._chunks():
            with np.load(path) as data:
                yield data["ids"], data["vectors"]

    def count(self) -> int:
        total = 0
        for path in self._chunks():
            with np.load(path) as data:
                total += len(data["ids"])
        return total

    def clear(self) -> None:
        for path in self._chunks():
            path.unlink()
