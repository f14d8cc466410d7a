"""A vector index of one model identity, keyed by the database's int64 image ids: a base and an overlay.

``VectorIndex`` answers cosine-similarity searches over L2-normalised embeddings. It is an immutable
base (``ml.index_base``: exact below ``exact_threshold`` vectors, approximate above) plus an overlay
(``ml.segments``) holding what was added, replaced or removed since. Writes change only the overlay, so
they cost the batch, not the catalog; a compaction (``ml.index_build.compact``) folds the overlay into a
new base. An allow-list of ids acts inside the search, so ``k`` results come back whenever ``k`` allowed
vectors exist. Publishing and reading files is ``ml.index_store``'s.
"""

from __future__ import annotations

import faiss
import numpy as np

from ml.index_base import BaseIndex
from ml.index_terms import DEFAULT_EXACT_THRESHOLD, FLAT, DuplicateIdError, as_ids, check_rows, normalized, sample
from ml.segments import Overlay

# An overlay past this many vectors, or this share of the base, is folded into a new base.
COMPACT_MIN_VECTORS = 10_000
COMPACT_SHARE = 0.01


class VectorIndex:
    """Cosine-similarity search over the vectors of one model identity, keyed by image id.

    ``add`` refuses ids the index already holds (``DuplicateIdError``); ``upsert`` replaces them.
    Writes replace the overlay with a new one, so searches already running finish on the state they
    started with; one writer owns a copy, readers follow the published files (``IndexReader``).
    """

    def __init__(self, identity: str, dim: int, *, exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                 base=None, overlay=None) -> None:
        if not isinstance(identity, str) or not identity:
            raise ValueError("identity must be a non-empty model identity string, e.g. 'resnet50:1a2b3c4d5e6f'")
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.identity = identity
        self.dim = int(dim)
        self.exact_threshold = int(exact_threshold)
        self.version: int | None = None  # the published version this copy holds
        self.generation: int | None = None  # the published base it stands on
        self.base = base if base is not None else BaseIndex.empty(self.dim)
        self._set_overlay(overlay if overlay is not None else Overlay(self.dim, exact=self.base.kind == FLAT))

    def _set_overlay(self, overlay) -> None:
        # The overlay and the base rows it hides change together: one reference swap each search reads.
        self._state = (overlay, self.base.rows_of(overlay.masked))

    @property
    def overlay(self):
        return self._state[0]

    # ----- contents -------------------------------------------------------------------

    def __len__(self) -> int:
        overlay, hidden = self._state
        return len(self.base) - hidden.size + len(overlay)

    def __repr__(self) -> str:
        return (f"<VectorIndex {self.identity} {self.kind} n={len(self)} d={self.dim} version={self.version} "
                f"overlay={len(self.overlay)}>")

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def recall_at_10(self) -> float | None:
        return self.base.quality.recall_at_10

    def ids(self) -> np.ndarray:
        """All ids in the index, as int64, ascending."""
        overlay, hidden = self._state
        return np.union1d(np.delete(np.asarray(self.base.ids), hidden), overlay.ids)

    def contains(self, image_id: int) -> bool:
        overlay, _ = self._state
        if overlay.contains(int(image_id)):
            return True
        return self.base.contains(int(image_id)) and not _holds(overlay.masked, int(image_id))

    @property
    def needs_compaction(self) -> bool:
        """Whether the overlay should be folded into a new base: large, or the base's kind no longer fits."""
        overlay, hidden = self._state
        changed = max(len(overlay), hidden.size)
        if changed > max(COMPACT_MIN_VECTORS, COMPACT_SHARE * len(self.base)):
            return True
        if self.kind == FLAT:
            return len(self) > self.exact_threshold
        return len(self) < self.exact_threshold // 2 or len(self) > 2 * max(1, self.base.trained_count)

    # ----- writes ---------------------------------------------------------------------

    def add(self, ids, vectors, *, identity: str | None = None) -> None:
        """Add new vectors; an id already present raises ``DuplicateIdError`` (use ``upsert``)."""
        ids, vectors = self.checked_batch(ids, vectors, identity)
        present = [int(i) for i in ids if self.contains(int(i))]
        if present:
            raise DuplicateIdError(
                f"{len(present)} id(s) already in the index, e.g. {sample(np.array(present))}; "
                "use upsert() to replace their vectors"
            )
        self.change(add_ids=ids, add_vectors=vectors, remove_ids=np.zeros(0, np.int64))

    def upsert(self, ids, vectors, *, identity: str | None = None) -> None:
        """Add or replace: the ids end up in the index once, with these vectors."""
        ids, vectors = self.checked_batch(ids, vectors, identity)
        self.change(add_ids=ids, add_vectors=vectors, remove_ids=np.zeros(0, np.int64))

    def remove(self, ids) -> int:
        """Remove these ids; returns how many were there. Absent ids are ignored."""
        ids = np.unique(as_ids(ids))
        present = np.array([i for i in ids if self.contains(int(i))], dtype=np.int64)
        if present.size:
            self.change(add_ids=np.zeros(0, np.int64), add_vectors=np.zeros((0, self.dim), np.float32),
                        remove_ids=present)
        return int(present.size)

    def change(self, *, add_ids: np.ndarray, add_vectors: np.ndarray, remove_ids: np.ndarray,
               seq: int | None = None) -> None:
        """Apply checked changes (as a segment holds them) to the overlay."""
        self._set_overlay(self.overlay.changed(add_ids=add_ids, add_vectors=add_vectors, remove_ids=remove_ids,
                                               seq=seq))

    def checked_batch(self, ids, vectors, identity: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Everything that can refuse a batch, checked before anything changes."""
        if identity is not None and identity != self.identity:
            raise ValueError(
                f"vectors from model {identity!r} cannot go into the index of {self.identity!r}; "
                "each model identity has its own index"
            )
        ids = as_ids(ids)
        vectors = self.as_vectors(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DuplicateIdError(f"ids repeated within one call: {sample(unique[counts > 1])}")
        for start in range(0, len(vectors), 65_536):
            check_rows(vectors[start : start + 65_536])
        return ids, vectors

    # ----- search ---------------------------------------------------------------------

    def search(self, queries, k: int, *, allow_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most cosine-similar vectors to each query, best first.

        Returns ``(scores, ids)``, both ``(m, k)``: float32 and int64. Missing results
        (fewer than ``k`` vectors, or allowed vectors) are id -1 with score -inf. With
        ``allow_ids`` only those ids can be returned.
        """
        queries = normalized(self.as_vectors(queries, "queries"))
        k = int(k)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        overlay, hidden = self._state
        m = len(queries)
        allow_rows = None
        if allow_ids is not None:
            allow_ids = np.unique(as_ids(allow_ids))
            if allow_ids.size == 0:
                return np.full((m, k), -np.inf, np.float32), np.full((m, k), -1, np.int64)
            allow_rows = self.base.rows_of(allow_ids)
        base_scores, rows = self.base.search(queries, k, allow_rows=allow_rows, exclude_rows=hidden)
        base_ids = self.base.ids_of(rows)
        if len(overlay) == 0:
            return base_scores, base_ids
        delta_scores, delta_ids = overlay.search(queries, k, allow_ids)
        delta_scores[delta_ids < 0] = -np.inf
        scores = np.concatenate([base_scores, delta_scores], axis=1)
        ids = np.concatenate([base_ids, delta_ids], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def as_vectors(self, vectors, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"{what} must be a 2-D array (n, {self.dim}), got shape {vectors.shape}")
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"{what} have dimension {vectors.shape[1]}, but this index holds {self.dim}-d vectors "
                f"of model {self.identity!r}"
            )
        if not np.issubdtype(vectors.dtype, np.floating):
            raise ValueError(f"{what} must be floating point, got {vectors.dtype}")
        return vectors

    def describe(self) -> dict:
        """What an operator wants to know: kind, size, how it is searched and how well, and why."""
        quality = self.base.quality
        return {
            "identity": self.identity, "kind": self.kind, "count": len(self), "base": len(self.base),
            "overlay": len(self.overlay), "version": self.version, "generation": self.generation,
            "exhaustive": self.base.settings.exhaustive, "nprobe": self.base.settings.nprobe,
            "recall_at_10": quality.recall_at_10, "recall_target": quality.target, "note": quality.note,
        }


def gpu_count() -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus() if get_num_gpus is not None else 0


def _holds(sorted_ids: np.ndarray, image_id: int) -> bool:
    position = np.searchsorted(sorted_ids, image_id)
    return bool(position < len(sorted_ids) and sorted_ids[position] == image_id)
