"""A FAISS vector index of one model identity, keyed by the database's int64 image ids.

``VectorIndex`` answers cosine-similarity searches over L2-normalised embeddings. Below
``exact_threshold`` vectors it is exact (``IndexIDMap2`` over ``IndexFlatIP``). Above it
``ml.index_build.build_index`` trains the approximate kind:

- candidates: PCA to 256-d, then IVF (HNSW coarse quantizer) with 4-bit scalar codes
  (128 B a vector), searched there by L2, which ranks like cosine after centring;
- vectors: the full-dimension vectors as 6-bit scalar codes (1.5 KiB a vector) keyed by
  id through ``IndexIDMap2``; the candidates are re-ranked by cosine on these (4 bits
  lose too much on clustered data, where neighbours 10 and 11 differ by little).

Both stages carry the database ids themselves, so ids stay stable through removal, and
an allow-list of ids acts inside the faiss search (``SearchParameters.sel``), so ``k``
results come back whenever ``k`` allowed vectors exist. Publishing and reading files is
``ml.index_store``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT = "flat"
APPROXIMATE = "ivf"
KINDS = (FLAT, APPROXIMATE)

DEFAULT_EXACT_THRESHOLD = 50_000
REBUILD_HINT = "rebuild it with `manage.py reindex`"
FORMAT = 1
ADD_CHUNK = 65_536


class IndexFileError(Exception):
    """A published index cannot be used as it is; ``str(e)`` says what to do."""


class DuplicateIdError(ValueError):
    """``add`` was given ids the index already holds (or the same id twice)."""


class VectorIndex:
    """Cosine-similarity search over the vectors of one model identity, keyed by image id.

    ``add`` refuses ids the index already holds (``DuplicateIdError``); ``upsert``
    replaces them. Searching is safe from many threads; adding or removing while other
    threads search is not, so a service searches a loaded copy (see ``IndexReader``) and
    one writer owns the copy it publishes.
    """

    def __init__(self, identity: str, dim: int, *, exact_threshold: int = DEFAULT_EXACT_THRESHOLD) -> None:
        if not isinstance(identity, str) or not identity:
            raise ValueError("identity must be a non-empty model identity string, e.g. 'resnet50:1a2b3c4d5e6f'")
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.identity = identity
        self.dim = int(dim)
        self.exact_threshold = int(exact_threshold)
        self.kind = FLAT
        self.version: int | None = None
        self.recall_at_10: float | None = None
        # Approximate-kind search settings; build_index tunes nprobe to the target recall.
        self.nprobe = 16
        self.ef_search = 64
        self.refine_factor = 20
        self.filter_scan_limit = 4_096  # allow-lists up to this size are scanned exactly
        self.trained_count = 0  # vectors the approximate kind was trained on
        self._main: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._store: faiss.IndexIDMap2 | None = None  # approximate kind: id-keyed compact vectors
        self._gpu_main: faiss.Index | None = None

    # ----- contents -------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._keyed.ntotal)

    def __repr__(self) -> str:
        return f"<VectorIndex {self.identity} {self.kind} n={len(self)} d={self.dim} version={self.version}>"

    def ids(self) -> np.ndarray:
        """All ids in the index, as int64, in storage order."""
        return faiss.vector_to_array(self._keyed.id_map).astype(np.int64, copy=False)

    def contains(self, image_id: int) -> bool:
        try:
            self._keyed.reconstruct(int(image_id))
        except RuntimeError:  # IndexIDMap2 raises when the id is not there
            return False
        return True

    @property
    def needs_rebuild(self) -> bool:
        """Whether ``build_index`` would now choose differently: the owner's cue to rebuild."""
        if self.kind == FLAT:
            return len(self) > self.exact_threshold
        return len(self) < self.exact_threshold // 2 or len(self) > 4 * self.trained_count

    # ----- writes ---------------------------------------------------------------------

    def add(self, ids, vectors, *, identity: str | None = None) -> None:
        """Add new vectors; an id already present raises ``DuplicateIdError`` (use ``upsert``)."""
        ids, vectors = self._checked_batch(ids, vectors, identity)
        present = ids[np.isin(ids, self.ids())]
        if present.size:
            raise DuplicateIdError(
                f"{present.size} id(s) already in the index, e.g. {_sample(present)}; "
                "use upsert() to replace their vectors"
            )
        self._insert(ids, vectors)

    def upsert(self, ids, vectors, *, identity: str | None = None) -> None:
        """Add or replace: the ids end up in the index once, with these vectors."""
        ids, vectors = self._checked_batch(ids, vectors, identity)
        self.remove(ids)
        self._insert(ids, vectors)

    def _checked_batch(self, ids, vectors, identity: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Everything that can refuse a batch, checked before anything changes."""
        self._check_identity(identity)
        ids = as_ids(ids)
        vectors = self._as_vectors(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DuplicateIdError(f"ids repeated within one call: {_sample(unique[counts > 1])}")
        for start in range(0, len(vectors), ADD_CHUNK):
            _check_rows(vectors[start : start + ADD_CHUNK])
        return ids, vectors

    def _insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        for start in range(0, len(ids), ADD_CHUNK):
            chunk_ids = ids[start : start + ADD_CHUNK]
            chunk = normalized(vectors[start : start + ADD_CHUNK])
            self._main.add_with_ids(chunk, chunk_ids)
            if self._store is not None:
                self._store.add_with_ids(chunk, chunk_ids)
        self._gpu_main = None

    def remove(self, ids) -> int:
        """Remove these ids; returns how many were there. Absent ids are ignored."""
        ids = as_ids(ids)
        if ids.size == 0 or len(self) == 0:
            return 0
        selector = faiss.IDSelectorBatch(ids)
        removed = int(self._main.remove_ids(selector))
        if self._store is not None:
            stored = int(self._store.remove_ids(selector))
            assert stored == removed, f"candidate and vector stores disagree: {removed} != {stored}"
        self._gpu_main = None
        return removed

    # ----- search ---------------------------------------------------------------------

    def search(self, queries, k: int, *, allow_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most cosine-similar vectors to each query, best first.

        Returns ``(scores, ids)``, both ``(m, k)``: float32 and int64. Missing results
        (fewer than ``k`` vectors, or allowed vectors) are id -1 with score -inf. With
        ``allow_ids`` only those ids can be returned.
        """
        queries = normalized(self._as_vectors(queries, "queries"))
        k = int(k)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        m = len(queries)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        labels = np.full((m, k), -1, dtype=np.int64)
        selector = None
        if allow_ids is not None:
            allow_ids = np.unique(as_ids(allow_ids))
            if allow_ids.size == 0:
                return scores, labels
            selector = faiss.IDSelectorBatch(allow_ids)
        if m == 0 or len(self) == 0:
            return scores, labels
        if self.kind == FLAT:
            found_scores, found_ids = self._search_flat(queries, k, selector)
        elif selector is not None and allow_ids.size <= self.filter_scan_limit:
            found_scores, found_ids = self._scan_store(queries, k, selector)
        else:
            found_scores, found_ids = self._search_approximate(queries, k, selector)
        found = found_ids >= 0
        scores[found] = found_scores[found]
        labels[found] = found_ids[found]
        return scores, labels

    def _search_flat(self, queries, k, selector):
        if selector is None and self._gpu_main is not None:
            return self._gpu_main.search(queries, k)
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        return self._main.search(queries, k, params=params)

    def _scan_store(self, queries, k, selector):
        """Exhaustive search of the compact vectors; the selector skips all but the allowed."""
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        return self._store.search(queries, k, params=params)

    def _search_approximate(self, queries, k, selector):
        """IVF candidates re-ranked on the compact vectors; short rows probe wider, then scan."""
        total = len(self)
        k_candidates = min(max(k * self.refine_factor, k), total)
        wanted = k if selector is not None else min(k, total)
        nlist = self._ivf.nlist
        candidates = np.full((len(queries), k_candidates), -1, dtype=np.int64)
        rows = np.arange(len(queries))
        for nprobe in (min(self.nprobe, nlist), min(self.nprobe * 8, nlist)):
            quantizer_params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, nprobe))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe, quantizer_params=quantizer_params)
            _, found = self._main.search(queries[rows], k_candidates, params=params)
            candidates[rows] = found
            rows = rows[(found >= 0).sum(axis=1) < wanted]
            if rows.size == 0 or nprobe == nlist:
                break
        scores, labels = self._rerank(queries, candidates, k)
        if rows.size:  # allowed vectors far from every probed list: scan them all
            scores[rows], labels[rows] = self._scan_store(queries[rows], k, selector)
        return scores, labels

    def _rerank(self, queries, candidates, k):
        m, width = candidates.shape
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        labels = np.full((m, k), -1, dtype=np.int64)
        valid = candidates >= 0
        unique = np.unique(candidates[valid])
        if unique.size == 0:
            return scores, labels
        vectors = self._store.reconstruct_batch(unique)
        positions = np.searchsorted(unique, np.where(valid, candidates, unique[0]))
        take = min(k, width)
        rows_per_chunk = max(1, (64 << 20) // (width * self.dim * 4))
        for start in range(0, m, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            chunk = np.einsum("mkd,md->mk", vectors[positions[rows]], queries[rows])
            chunk[~valid[rows]] = -np.inf
            order = np.argsort(-chunk, axis=1, kind="stable")[:, :take]
            best = np.take_along_axis(chunk, order, axis=1)
            scores[rows, :take] = best
            labels[rows, :take] = np.where(np.isfinite(best), np.take_along_axis(candidates[rows], order, axis=1), -1)
        return scores, labels

    # ----- parts, for index_build and index_store -------------------------------------

    def adopt_trained(self, main: faiss.Index, store: faiss.IndexIDMap2) -> None:
        """Become the approximate kind with these trained, empty stages (``index_build``)."""
        self.kind = APPROXIMATE
        self._main, self._store = main, store
        self._gpu_main = None

    @property
    def nlist(self) -> int:
        """Inverted lists of the approximate kind."""
        return self._ivf.nlist

    @classmethod
    def from_parts(cls, header: dict, parts: list, path: Path) -> VectorIndex:
        """The index that ``header()`` and ``parts()`` of a saved one describe; refuses a mismatch."""
        index = cls(header["identity"], header["dimension"], exact_threshold=header["exact_threshold"])
        index.kind = header["kind"]
        index.version = header["version"]
        index.recall_at_10 = header.get("recall_at_10")
        for key in ("nprobe", "ef_search", "refine_factor", "filter_scan_limit"):
            setattr(index, key, int(header["search"][key]))
        index.trained_count = int(header.get("trained_count", 0))
        expected_parts = 1 if index.kind == FLAT else 2
        if index.kind not in KINDS or len(parts) != expected_parts:
            raise IndexFileError(f"index file {path} has an unknown layout ({index.kind}); {REBUILD_HINT}")
        index._main = parts[0]
        index._store = parts[1] if index.kind == APPROXIMATE else None
        for part in parts:
            if part.d != index.dim or part.ntotal != header["count"]:
                raise IndexFileError(
                    f"index file {path} holds {part.ntotal} vectors of dimension {part.d}, but its header says "
                    f"{header['count']} of dimension {index.dim}; {REBUILD_HINT}"
                )
        if not isinstance(index._keyed, faiss.IndexIDMap2):
            raise IndexFileError(f"index file {path} does not key its vectors by id; {REBUILD_HINT}")
        return index

    def header(self, version: int) -> dict:
        """What a published file records besides the faiss parts."""
        return {
            "format": FORMAT,
            "identity": self.identity,
            "dimension": self.dim,
            "kind": self.kind,
            "count": len(self),
            "version": version,
            "recall_at_10": self.recall_at_10,
            "exact_threshold": self.exact_threshold,
            "trained_count": self.trained_count,
            "search": {
                "nprobe": self.nprobe,
                "ef_search": self.ef_search,
                "refine_factor": self.refine_factor,
                "filter_scan_limit": self.filter_scan_limit,
            },
        }

    def parts(self) -> list:
        """The faiss indexes that hold the vectors: the candidate stage and, approximate, the id-keyed store."""
        return [self._main] if self._store is None else [self._main, self._store]

    # ----- helpers --------------------------------------------------------------------

    @property
    def _keyed(self) -> faiss.IndexIDMap2:
        return self._main if self._store is None else self._store

    @property
    def _ivf(self) -> faiss.IndexIVF:
        return faiss.extract_index_ivf(self._main)

    def _check_identity(self, identity: str | None) -> None:
        if identity is not None and identity != self.identity:
            raise ValueError(
                f"vectors from model {identity!r} cannot go into the index of {self.identity!r}; "
                "each model identity has its own index"
            )

    def _as_vectors(self, vectors, what: str) -> np.ndarray:
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

    def move_search_to_gpu(self) -> None:
        # Only the exact kind: the approximate kind meets its latency target on CPU, and
        # allow-list searches stay on CPU because GPU indexes do not take id selectors.
        if self.kind != FLAT:
            return
        try:
            self._gpu_main = faiss.index_cpu_to_all_gpus(self._main)
        except (AttributeError, RuntimeError) as exc:  # CPU-only faiss, or a layout GPUs do not take
            log.warning("searching %s on CPU: could not move it to GPU (%s)", self, exc)
            self._gpu_main = None


# ----- arrays ---------------------------------------------------------------------------------


def as_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of image ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers (database image ids), got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if (ids < 0).any():
        raise ValueError(f"ids must be non-negative database ids, got {_sample(ids[ids < 0])}")
    return np.ascontiguousarray(ids)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy scaled to unit length; zero or non-finite rows are refused."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    out /= np.sqrt(_check_rows(out))[:, None]
    return out


def _check_rows(vectors: np.ndarray) -> np.ndarray:
    """Squared norms of the rows, after refusing non-finite and all-zero rows."""
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    squared = np.einsum("ij,ij->i", vectors, vectors)
    if (squared == 0).any():
        raise ValueError(f"{int((squared == 0).sum())} vector(s) are all zeros and have no direction to search by")
    return squared


def _sample(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def gpu_count() -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus() if get_num_gpus is not None else 0
