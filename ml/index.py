"""A FAISS vector index keyed by the database's int64 image ids, published in versions.

``VectorIndex`` answers cosine-similarity searches over L2-normalised embeddings of one
model identity. Below ``exact_threshold`` vectors it is exact (``IndexIDMap2`` over
``IndexFlatIP``). Above it ``build_index`` trains the approximate kind, sized for
1M x 2048-d in under 2 GB:

- candidates: PCA to 256-d, then IVF (HNSW coarse quantizer) with 4-bit scalar codes
  (128 B a vector), searched there by L2, which ranks like cosine after centring;
- vectors: the full-dimension vectors as 6-bit scalar codes (1.5 KiB a vector) keyed by
  id through ``IndexIDMap2``; the candidates are re-ranked by cosine on these. (4 bits
  lost too much: on clustered data neighbours 10 and 11 differ by ~0.002 in cosine.)

Both stages carry the database ids themselves, so ids stay stable through removal, and
an allow-list of ids acts inside the faiss search (``SearchParameters.sel``), so ``k``
results come back whenever ``k`` allowed vectors exist.

Persistence is a directory that holds versioned files ``index-<version>.vsi`` and a
``manifest.json`` naming the current one. Every file is written to a temporary name,
fsynced, renamed over, and the directory fsynced; the manifest is written last, so a
reader that follows it never sees a half-written index. ``IndexReader`` polls the
manifest and swaps in a new version without a restart.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT = "flat"
APPROXIMATE = "ivf"
KINDS = (FLAT, APPROXIMATE)

DEFAULT_EXACT_THRESHOLD = 50_000
MIN_APPROXIMATE_COUNT = 1_000  # fewer vectors than this cannot train IVF lists and PCA usefully
MANIFEST_NAME = "manifest.json"
REBUILD_HINT = "rebuild it with `manage.py reindex`"

_FORMAT = 1
_MAGIC = b"VSINDEX\x01"
_FILE_PATTERN = re.compile(r"^index-(\d+)\.vsi$")
_CANDIDATE_DIM = 256
_ADD_CHUNK = 65_536


class IndexFileError(Exception):
    """A published index cannot be used as it is; ``str(e)`` says what to do."""


class DuplicateIdError(ValueError):
    """``add`` was given ids the index already holds (or the same id twice)."""


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


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
        self._trained_count = 0
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
        return len(self) < self.exact_threshold // 2 or len(self) > 4 * self._trained_count

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
        ids = _as_ids(ids)
        vectors = self._as_vectors(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DuplicateIdError(f"ids repeated within one call: {_sample(unique[counts > 1])}")
        for start in range(0, len(vectors), _ADD_CHUNK):
            _check_rows(vectors[start : start + _ADD_CHUNK])
        return ids, vectors

    def _insert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        for start in range(0, len(ids), _ADD_CHUNK):
            chunk_ids = ids[start : start + _ADD_CHUNK]
            chunk = _normalized(vectors[start : start + _ADD_CHUNK])
            self._main.add_with_ids(chunk, chunk_ids)
            if self._store is not None:
                self._store.add_with_ids(chunk, chunk_ids)
        self._gpu_main = None

    def remove(self, ids) -> int:
        """Remove these ids; returns how many were there. Absent ids are ignored."""
        ids = _as_ids(ids)
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
        queries = _normalized(self._as_vectors(queries, "queries"))
        k = int(k)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        m = len(queries)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        labels = np.full((m, k), -1, dtype=np.int64)
        selector = None
        if allow_ids is not None:
            allow_ids = np.unique(_as_ids(allow_ids))
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

    # ----- persistence ----------------------------------------------------------------

    def save(self, directory, *, keep: int = 2, grace_seconds: float = 300.0) -> dict:
        """Publish this index as the next version in ``directory``; returns the new manifest.

        Versions older than the newest ``keep`` are deleted once they have been
        superseded for ``grace_seconds`` (readers still opening them get time to finish).
        A directory holds one model identity: saving another identity there is refused.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _writer_lock(directory):
            current = _try_read_manifest(directory)
            if current is not None and current.get("identity") != self.identity:
                raise IndexFileError(
                    f"{directory} holds the index of model {current.get('identity')!r}, not {self.identity!r}; "
                    "give each model identity its own index directory (see index_directory())"
                )
            # Past the manifest and any file a crashed writer renamed in but never published.
            version = 1 + max(_published_versions(directory)[-1:] + [int(current["version"]) if current else 0])
            name = f"index-{version:08d}.vsi"
            header = self._header(version)
            digest = atomic_write(directory / name, lambda f: self._write(f, header))
            manifest = {
                **header,
                "file": name,
                "sha256": digest.sha256,
                "size": digest.size,
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            atomic_write(directory / MANIFEST_NAME, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
            self.version = version
            _prune(directory, keep=max(1, keep), grace_seconds=grace_seconds)
        return manifest

    @classmethod
    def load(
        cls,
        directory,
        *,
        expected_identity: str | None = None,
        manifest: dict | None = None,
        use_gpu: bool | None = None,
    ) -> VectorIndex:
        """Load the version the directory's manifest names (or ``manifest``, if given).

        Raises ``IndexFileError`` for a missing, truncated or corrupt file, a file that
        does not match its manifest, or an identity other than ``expected_identity``.
        ``use_gpu`` (default: when faiss sees a GPU) moves unfiltered exact searching to GPUs.
        """
        directory = Path(directory)
        if manifest is None:
            manifest = read_manifest(directory)
        if expected_identity is not None and manifest["identity"] != expected_identity:
            raise IndexFileError(
                f"index in {directory} was built for model {manifest['identity']!r}, but this service "
                f"embeds with {expected_identity!r}; {REBUILD_HINT} for the current model"
            )
        path = directory / manifest["file"]
        _verify_file(path, manifest)
        try:
            with open(path, "rb") as f:
                header, parts = _read_container(f)
        except (OSError, RuntimeError, ValueError, struct.error) as exc:
            raise IndexFileError(f"index file {path} is corrupt ({exc}); {REBUILD_HINT}") from exc
        for key in ("identity", "dimension", "kind", "count", "version"):
            if header.get(key) != manifest.get(key):
                raise IndexFileError(
                    f"index file {path} does not match {directory / MANIFEST_NAME}: {key} is "
                    f"{header.get(key)!r} in the file and {manifest.get(key)!r} in the manifest; {REBUILD_HINT}"
                )
        try:
            index = cls._from_parts(header, parts, path)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFileError(f"index file {path} has an unreadable header ({exc!r}); {REBUILD_HINT}") from exc
        if use_gpu is None:
            use_gpu = _gpu_count() > 0
        if use_gpu:
            index._move_search_to_gpu()
        return index

    @classmethod
    def _from_parts(cls, header: dict, parts: list, path: Path) -> VectorIndex:
        index = cls(header["identity"], header["dimension"], exact_threshold=header["exact_threshold"])
        index.kind = header["kind"]
        index.version = header["version"]
        index.recall_at_10 = header.get("recall_at_10")
        for key in ("nprobe", "ef_search", "refine_factor", "filter_scan_limit"):
            setattr(index, key, int(header["search"][key]))
        index._trained_count = int(header.get("trained_count", 0))
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

    def _header(self, version: int) -> dict:
        return {
            "format": _FORMAT,
            "identity": self.identity,
            "dimension": self.dim,
            "kind": self.kind,
            "count": len(self),
            "version": version,
            "recall_at_10": self.recall_at_10,
            "exact_threshold": self.exact_threshold,
            "trained_count": self._trained_count,
            "search": {
                "nprobe": self.nprobe,
                "ef_search": self.ef_search,
                "refine_factor": self.refine_factor,
                "filter_scan_limit": self.filter_scan_limit,
            },
        }

    def _write(self, f: BinaryIO, header: dict) -> None:
        encoded = json.dumps(header).encode()
        f.write(_MAGIC + struct.pack("<I", len(encoded)) + encoded)
        writer = faiss.PyCallbackIOWriter(f.write)
        for part in self._parts():
            faiss.write_index(part, writer)

    def _parts(self) -> list:
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

    def _move_search_to_gpu(self) -> None:
        # Only the exact kind: the approximate kind meets its latency target on CPU, and
        # allow-list searches stay on CPU because GPU indexes do not take id selectors.
        if self.kind != FLAT:
            return
        try:
            self._gpu_main = faiss.index_cpu_to_all_gpus(self._main)
        except (AttributeError, RuntimeError) as exc:  # CPU-only faiss, or a layout GPUs do not take
            log.warning("searching %s on CPU: could not move it to GPU (%s)", self, exc)
            self._gpu_main = None


# ----- building -------------------------------------------------------------------------


def build_index(
    ids,
    vectors,
    identity: str,
    *,
    kind: str = "auto",
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    target_recall: float = 0.95,
    recall_queries: int = 200,
    seed: int = 0,
) -> VectorIndex:
    """Build the index that suits ``len(ids)`` vectors: exact up to ``exact_threshold``.

    ``kind`` is ``"auto"``, ``"flat"`` or ``"ivf"``. The approximate kind is trained on
    these vectors, then its ``nprobe`` is raised until recall@10 against exact search on
    ``recall_queries`` of the vectors reaches ``target_recall``; the recall it reached
    is kept in ``recall_at_10`` and published in the manifest.
    """
    ids = _as_ids(ids)
    index = VectorIndex(identity, np.asarray(vectors).shape[-1], exact_threshold=exact_threshold)
    vectors = index._as_vectors(vectors, "vectors")
    if len(ids) != len(vectors):
        raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
    if kind == "auto":
        kind = APPROXIMATE if len(ids) > exact_threshold and len(ids) >= MIN_APPROXIMATE_COUNT else FLAT
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto', {FLAT!r} or {APPROXIMATE!r}, got {kind!r}")
    if kind == FLAT:
        index.add(ids, vectors)
        return index
    if len(ids) < MIN_APPROXIMATE_COUNT:
        raise ValueError(f"the approximate index needs at least {MIN_APPROXIMATE_COUNT} vectors, got {len(ids)}")

    rng = np.random.default_rng(seed)
    index.kind = APPROXIMATE
    index._main, index._store = _train_approximate(vectors, rng)
    index._trained_count = len(ids)
    index.add(ids, vectors)

    queries = vectors[np.sort(rng.choice(len(vectors), size=min(recall_queries, len(vectors)), replace=False))]
    exact_ids = _exact_neighbours(ids, vectors, _normalized(queries), 10)
    nlist = index._ivf.nlist
    for nprobe in _doubling(16, nlist):
        index.nprobe = nprobe
        index.recall_at_10 = _recall(index.search(queries, 10)[1], exact_ids)
        if index.recall_at_10 >= target_recall:
            break
    else:
        log.warning("approximate index reached recall@10 %.3f < target %.3f", index.recall_at_10, target_recall)
    return index


def _train_approximate(vectors: np.ndarray, rng: np.random.Generator) -> tuple[faiss.Index, faiss.IndexIDMap2]:
    n, dim = vectors.shape
    nlist = int(max(16, min(4 * math.sqrt(n), n // 39, 65_536)))
    candidate_dim = min(_CANDIDATE_DIM, dim)
    rows = np.sort(rng.choice(n, size=min(n, max(40 * nlist, 50_000), 200_000), replace=False))
    sample = _normalized(vectors[rows[:50_000]])  # enough for PCA and the scalar ranges

    quantizer = faiss.IndexHNSWFlat(candidate_dim, 32)
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, candidate_dim, nlist, faiss.ScalarQuantizer.QT_4bit)
    ivf.clustering_index = faiss.IndexFlatL2(candidate_dim)  # k-means on a flat index, then the HNSW graph
    ivf.cp.seed = int(rng.integers(2**31))
    if candidate_dim < dim:
        # Centred PCA turns cosine ranking into L2 ranking, so the candidate stage searches by L2.
        pca = _pca_transform(sample, candidate_dim, rng)
        chunks = (rows[start : start + _ADD_CHUNK] for start in range(0, len(rows), _ADD_CHUNK))
        projected = np.concatenate([pca.apply(_normalized(vectors[chunk])) for chunk in chunks])
        ivf.train(projected)
        main = faiss.IndexPreTransform(pca, ivf)
    else:
        ivf.train(_normalized(vectors[rows]))
        main = ivf
    codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_6bit, faiss.METRIC_INNER_PRODUCT)
    store = faiss.IndexIDMap2(codes)
    store.train(sample)
    return main, store


def _pca_transform(sample: np.ndarray, out_dim: int, rng: np.random.Generator) -> faiss.LinearTransform:
    """Centring plus projection on the top principal axes, found by subspace iteration.

    faiss.PCAMatrix decomposes the whole 2048 x 2048 covariance (minutes on a small
    machine); the top 256 axes come from a few products with it (seconds).
    """
    mean = sample.mean(axis=0, dtype=np.float64)
    centred = sample - mean.astype(np.float32)
    covariance = (centred.T @ centred).astype(np.float64) / len(sample)
    basis = rng.standard_normal((sample.shape[1], out_dim + 16))
    for _ in range(6):
        basis, _ = np.linalg.qr(covariance @ basis)
    _, rotation = np.linalg.eigh(basis.T @ covariance @ basis)
    axes = np.ascontiguousarray((basis @ rotation[:, ::-1][:, :out_dim]).T, dtype=np.float32)
    transform = faiss.LinearTransform(sample.shape[1], out_dim, True)
    faiss.copy_array_to_vector(axes.ravel(), transform.A)
    faiss.copy_array_to_vector((-axes @ mean).astype(np.float32), transform.b)
    transform.is_trained = True
    return transform


# ----- recall -----------------------------------------------------------------------------


def measure_recall(index: VectorIndex, sample_queries, k: int = 10, *, ids, vectors) -> float:
    """Recall@k of ``index`` against exact search over ``ids``/``vectors``, the data it holds."""
    queries = _normalized(index._as_vectors(sample_queries, "sample_queries"))
    exact = _exact_neighbours(_as_ids(ids), index._as_vectors(vectors, "vectors"), queries, k)
    return _recall(index.search(queries, k)[1], exact)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(np.intersect1d(f[f >= 0], e[e >= 0])) / max(1, (e >= 0).sum()) for f, e in zip(found, exact)]
    return float(np.mean(hits))


def _exact_neighbours(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(vectors), _ADD_CHUNK):
        scores, positions = faiss.knn(
            queries, _normalized(vectors[start : start + _ADD_CHUNK]), k, metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(scores, np.where(positions >= 0, positions + start, -1))
    heap.finalize()
    return np.where(heap.I >= 0, ids[np.maximum(heap.I, 0)], -1)


# ----- reading published versions ---------------------------------------------------------


def index_directory(root, identity: str) -> Path:
    """The directory that holds the index of one model identity under ``root``."""
    return Path(root) / re.sub(r"[^A-Za-z0-9._-]+", "-", identity)


def read_manifest(directory) -> dict:
    """The current manifest of an index directory: one small JSON read, cheap to poll."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise IndexFileError(f"no index has been published in {path.parent}; build one with `manage.py reindex`")
    except (OSError, ValueError) as exc:
        raise IndexFileError(f"index manifest {path} is unreadable ({exc}); {REBUILD_HINT}") from exc
    missing = {"identity", "dimension", "kind", "count", "version", "file", "sha256", "size"} - set(manifest)
    if missing or manifest.get("format") != _FORMAT:
        raise IndexFileError(
            f"index manifest {path} is not one this version understands (missing {sorted(missing)}, "
            f"format {manifest.get('format')!r}); {REBUILD_HINT}"
        )
    return manifest


class IndexReader:
    """Holds the current published index of a directory and swaps in new versions.

    ``current()`` checks the manifest at most every ``check_interval`` seconds and loads
    a new version when it appears. The swap replaces one reference, so searches already
    running keep the object they started with. A new version that fails to load is
    logged and skipped while the previous one keeps serving.
    """

    def __init__(self, directory, *, expected_identity: str | None = None, check_interval: float = 0.5) -> None:
        self.directory = Path(directory)
        self.expected_identity = expected_identity
        self.check_interval = check_interval
        self._index: VectorIndex | None = None
        self._checked_at = -math.inf
        self._manifest_stat: tuple | None = None
        self._refused: tuple | None = None  # (version, sha256) that failed to load
        self._lock = threading.Lock()

    def current(self) -> VectorIndex:
        if time.monotonic() - self._checked_at >= self.check_interval:
            self.refresh(wait=self._index is None)
        index = self._index
        if index is None:
            raise IndexFileError(f"no usable index in {self.directory}; build one with `manage.py reindex`")
        return index

    def refresh(self, *, wait: bool = True) -> bool:
        """Check the manifest now; returns whether a new version was swapped in."""
        if not self._lock.acquire(blocking=wait):
            return False  # another thread is checking; keep serving the current version
        try:
            self._checked_at = time.monotonic()
            try:
                stat = os.stat(self.directory / MANIFEST_NAME)
            except FileNotFoundError:
                if self._index is None:
                    raise IndexFileError(
                        f"no index has been published in {self.directory}; build one with `manage.py reindex`"
                    ) from None
                return False
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if key == self._manifest_stat:
                return False
            manifest = read_manifest(self.directory)
            attempt = (manifest["version"], manifest["sha256"])
            if self._index is not None and (manifest["version"] == self._index.version or attempt == self._refused):
                self._manifest_stat = key
                return False
            try:
                index = VectorIndex.load(self.directory, expected_identity=self.expected_identity, manifest=manifest)
            except IndexFileError:
                if self._index is None:
                    raise
                log.exception("keeping index version %s: version %s failed to load", self._index.version, attempt[0])
                self._refused = attempt
                self._manifest_stat = key
                return False
            self._index = index
            self._manifest_stat = key
            log.info("loaded index %s", index)
            return True
        finally:
            self._lock.release()


# ----- files --------------------------------------------------------------------------------


class _HashingWriter:
    """Passes writes to a file while hashing them, so nothing is read back to checksum it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def digest(self) -> FileDigest:
        return FileDigest(self._sha.hexdigest(), self.size)


def atomic_write(path, write: Callable[[BinaryIO], object]) -> FileDigest:
    """Write a file so that ``path`` is either the old file or the complete new one.

    ``write`` gets a file-like object (``write``/``tell``); the data goes to a temporary
    file beside ``path``, is fsynced, renamed over ``path``, and the directory fsynced.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)
    return writer.digest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _writer_lock(directory: Path) -> Iterator[None]:
    """One publisher at a time per directory, across processes."""
    with open(directory / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _try_read_manifest(directory: Path) -> dict | None:
    try:
        return read_manifest(directory)
    except IndexFileError:
        return None


def _published_versions(directory: Path) -> list[int]:
    versions = []
    for entry in os.scandir(directory):
        match = _FILE_PATTERN.match(entry.name)
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


def _prune(directory: Path, *, keep: int, grace_seconds: float) -> None:
    """Delete versions older than the newest ``keep`` once superseded for the grace period."""
    now = time.time()
    versions = _published_versions(directory)
    paths = [directory / f"index-{v:08d}.vsi" for v in versions]
    for older, newer in zip(paths[:-keep], paths[1:]):
        with contextlib.suppress(FileNotFoundError):
            if now - newer.stat().st_mtime >= grace_seconds:
                older.unlink()
    for entry in os.scandir(directory):  # temporary files of writers that died mid-write
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= max(grace_seconds, 3600.0):
                    os.unlink(entry.path)


def _verify_file(path: Path, manifest: dict) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IndexFileError(f"index file {path} named by its manifest is missing; {REBUILD_HINT}") from None
    if size != manifest["size"]:
        raise IndexFileError(
            f"index file {path} is truncated or altered ({size} bytes, the manifest says {manifest['size']}); "
            f"{REBUILD_HINT}"
        )
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    if sha.hexdigest() != manifest["sha256"]:
        raise IndexFileError(f"index file {path} is corrupt (sha256 mismatch); {REBUILD_HINT}")


def _read_container(f: BinaryIO) -> tuple[dict, list]:
    if f.read(len(_MAGIC)) != _MAGIC:
        raise ValueError("not a visualsearch index file")
    (length,) = struct.unpack("<I", f.read(4))
    header = json.loads(f.read(length))
    if header.get("format") != _FORMAT:
        raise ValueError(f"unknown format {header.get('format')!r}")
    reader = faiss.PyCallbackIOReader(f.read)
    parts = [faiss.read_index(reader) for _ in range(1 if header.get("kind") == FLAT else 2)]
    if f.read(1):
        raise ValueError("trailing bytes after the index data")
    return header, parts


# ----- arrays ---------------------------------------------------------------------------------


def _as_ids(ids) -> np.ndarray:
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


def _normalized(vectors: np.ndarray) -> np.ndarray:
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


def _doubling(start: int, stop: int) -> Iterator[int]:
    value = min(start, stop)
    while True:
        yield value
        if value >= stop:
            return
        value = min(value * 2, stop)


def _gpu_count() -> int:
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus() if get_num_gpus is not None else 0
