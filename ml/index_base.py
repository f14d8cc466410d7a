"""The base of a vector index: an immutable set of vectors in id order, searched exactly or approximately.

A base never changes once built; what happens after it lives in the overlay (``ml.segments``) until a
compaction builds the next base. Its rows are sorted by image id, so an id finds its row by binary search
and no per-process id map is needed. Its files are read memory-mapped, so the searching processes of a
host share one copy of the pages:

- ``flat``: the fp32 vectors, scanned exactly (small catalogs);
- ``ivf``: candidates from PCA to 256-d then IVF (HNSW coarse quantizer) with 4-bit codes, searched by L2
  (which ranks like cosine after centring), re-ranked by cosine on the full vectors' 6-bit codes. When the
  approximate stage cannot reach its recall target, ``exhaustive`` search scans every 6-bit code instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ml.files import atomic_write, file_sha256
from ml.index_terms import APPROXIMATE, FLAT, KINDS, REBUILD_HINT, IndexFileError, as_ids, normalized

log = logging.getLogger(__name__)

_ADD_CHUNK = 65_536
EXACT_NOTE = "exact search over every vector"


@dataclass
class SearchSettings:
    """How a base is searched; the build tunes them to the recall target and publishes them."""

    nprobe: int = 16
    ef_search: int = 64
    refine_factor: int = 20
    filter_scan_limit: int = 50_000  # allow-lists up to this many rows are scanned exactly
    exhaustive: bool = False  # scan every code: the approximate stage misses its recall target


@dataclass
class Quality:
    """What the build measured and decided, said in manifests, `reindex` and `/api/health/`."""

    recall_at_10: float | None = None
    target: float | None = None
    note: str = ""  # why the base is searched the way it is, in words
    measured_against: str = ""  # what served as exact search for the recall figure


@dataclass
class BaseIndex:
    kind: str
    dim: int
    ids: np.ndarray  # int64, ascending: row r holds image id ids[r]
    codes: faiss.Index  # IndexFlatIP (flat) or IndexScalarQuantizer 6-bit (ivf), rows in id order
    candidates: faiss.Index | None = None  # ivf: PCA + IVF whose list entries are row numbers
    settings: SearchSettings = field(default_factory=SearchSettings)
    quality: Quality = field(default_factory=Quality)
    trained_count: int = 0  # vectors the approximate stage was trained on
    trained_residual: float = 0.0  # their mean squared distance to the nearest list centre
    candidates_file: Path | None = None  # where a base read from disk maps its candidate stage from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}")
        self._gpu_codes: faiss.Index | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dim: int) -> BaseIndex:
        return cls(FLAT, dim, np.zeros(0, np.int64), faiss.IndexFlatIP(dim),
                   quality=Quality(1.0, None, EXACT_NOTE, "itself: exact"))

    # ----- ids and rows -------------------------------------------------------------------

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The rows of those of ``ids`` that the base holds."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0 or ids.size == 0:
            return np.zeros(0, np.int64)
        positions = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return positions[self.ids[positions] == ids].astype(np.int64)

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        """The image ids of rows, -1 kept as -1."""
        if len(self.ids) == 0:
            return np.full(np.shape(rows), -1, dtype=np.int64)
        return np.where(rows >= 0, np.asarray(self.ids)[np.maximum(rows, 0)], -1)

    def contains(self, image_id: int) -> bool:
        return self.rows_of(np.array([image_id])).size > 0

    def vectors_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of these rows (decoded from their codes), unit length."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return normalized(self.codes.reconstruct_batch(rows))

    # ----- search --------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, allow_rows: np.ndarray | None = None,
               exclude_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows by cosine for unit ``queries``: (scores, rows), -1 rows where fewer exist.

        ``allow_rows`` restricts the answer to those rows; ``exclude_rows`` (the rows the overlay has
        replaced or removed) never answer.
        """
        m = len(queries)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        rows = np.full((m, k), -1, dtype=np.int64)
        if m == 0 or len(self.ids) == 0 or (allow_rows is not None and allow_rows.size == 0):
            return scores, rows
        if allow_rows is not None:
            allowed = np.setdiff1d(allow_rows, exclude_rows) if exclude_rows is not None else allow_rows
            if allowed.size <= self.settings.filter_scan_limit or self.kind == FLAT:
                return self._scan_rows(queries, k, allowed)
        selector = _selector(allow_rows, exclude_rows)
        valid = len(self.ids) - (0 if exclude_rows is None else exclude_rows.size)
        if self.kind == FLAT or self.settings.exhaustive:
            found_scores, found_rows = self._scan(queries, k, selector)
        else:
            found_scores, found_rows = self._search_approximate(queries, k, selector, wanted=min(k, valid))
        hit = found_rows >= 0
        scores[hit], rows[hit] = found_scores[hit], found_rows[hit]
        return scores, rows

    def _scan(self, queries, k, selector):
        """Every code scanned (faiss's SIMD kernels); the selector skips the rows not wanted."""
        if selector is None and self._gpu_codes is not None:
            return self._gpu_codes.search(queries, k)
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        return self.codes.search(queries, k, params=params)

    def _scan_rows(self, queries, k, rows: np.ndarray):
        """Exact scores against just these rows: a filter keeping a small share of the catalog."""
        m = len(queries)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        found = np.full((m, k), -1, dtype=np.int64)
        if rows.size == 0:
            return scores, found
        for start in range(0, rows.size, _ADD_CHUNK):
            block = rows[start : start + _ADD_CHUNK]
            block_scores = queries @ self.vectors_of_rows(block).T
            merged_scores = np.concatenate([scores, block_scores], axis=1)
            merged_rows = np.concatenate([found, np.broadcast_to(block, (m, block.size))], axis=1)
            order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(merged_scores, order, axis=1)
            found = np.take_along_axis(merged_rows, order, axis=1)
        return scores, found

    def _search_approximate(self, queries, k, selector, *, wanted: int):
        """IVF candidates re-ranked on the codes; short rows probe wider, then scan."""
        settings = self.settings
        total = len(self.ids)
        k_candidates = min(max(k * settings.refine_factor, k), total)
        nlist = faiss.extract_index_ivf(self.candidates).nlist
        candidates = np.full((len(queries), k_candidates), -1, dtype=np.int64)
        short = np.arange(len(queries))
        for nprobe in (min(settings.nprobe, nlist), min(settings.nprobe * 8, nlist)):
            quantizer_params = faiss.SearchParametersHNSW(efSearch=max(settings.ef_search, nprobe))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe, quantizer_params=quantizer_params)
            _, found = self.candidates.search(queries[short], k_candidates, params=params)
            candidates[short] = found
            short = short[(found >= 0).sum(axis=1) < wanted]
            if short.size == 0 or nprobe == nlist:
                break
        scores, rows = self._rerank(queries, candidates, k)
        if short.size:  # wanted rows far from every probed list: scan them all
            scores[short], rows[short] = self._scan(queries[short], k, selector)
        return scores, rows

    def _rerank(self, queries, candidates, k):
        m, width = candidates.shape
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        rows = np.full((m, k), -1, dtype=np.int64)
        valid = candidates >= 0
        unique = np.unique(candidates[valid])
        if unique.size == 0:
            return scores, rows
        vectors = self.vectors_of_rows(unique)
        positions = np.searchsorted(unique, np.where(valid, candidates, unique[0]))
        take = min(k, width)
        rows_per_chunk = max(1, (64 << 20) // (width * self.dim * 4))
        for start in range(0, m, rows_per_chunk):
            chunk_rows = slice(start, start + rows_per_chunk)
            chunk = np.einsum("mkd,md->mk", vectors[positions[chunk_rows]], queries[chunk_rows])
            chunk[~valid[chunk_rows]] = -np.inf
            order = np.argsort(-chunk, axis=1, kind="stable")[:, :take]
            best = np.take_along_axis(chunk, order, axis=1)
            scores[chunk_rows, :take] = best
            rows[chunk_rows, :take] = np.where(
                np.isfinite(best), np.take_along_axis(candidates[chunk_rows], order, axis=1), -1
            )
        return scores, rows

    def editable_candidates(self) -> faiss.Index:
        """A private copy of the candidate stage that can be changed (a read base maps its lists read-only)."""
        if self.candidates_file is not None:
            return faiss.read_index(str(self.candidates_file))
        return faiss.clone_index(self.candidates)

    def move_search_to_gpu(self) -> None:
        """Unfiltered exact scans on every GPU faiss sees (the flat kind; filtered searches stay on the CPU)."""
        if self.kind != FLAT:
            return
        try:
            self._gpu_codes = faiss.index_cpu_to_all_gpus(self.codes)
        except (AttributeError, RuntimeError) as exc:  # CPU-only faiss, or a layout GPUs do not take
            log.warning("searching on CPU: could not move the index to GPU (%s)", exc)

    # ----- files ----------------------------------------------------------------------------

    def write(self, directory: Path, generation: int) -> dict:
        """Write this base's files for ``generation`` (each whole or not at all); returns their manifest entry."""
        stem = f"base-{generation:08d}"
        files = {"ids": f"{stem}.ids.npy", "codes": f"{stem}.codes.faiss"}
        if self.candidates is not None:
            files["candidates"] = f"{stem}.candidates.faiss"
        digests = {
            "ids": atomic_write(directory / files["ids"], lambda f: np.save(f, self.ids, allow_pickle=False)),
            "codes": atomic_write(directory / files["codes"], lambda f: _write_faiss(f, self.codes)),
        }
        if self.candidates is not None:
            digests["candidates"] = atomic_write(directory / files["candidates"],
                                                 lambda f: _write_faiss(f, self.candidates))
        return {
            "kind": self.kind,
            "count": len(self.ids),
            "trained_count": self.trained_count,
            "trained_residual": self.trained_residual,
            "search": asdict(self.settings),
            "quality": asdict(self.quality),
            "files": {part: {"name": name, "sha256": digests[part].sha256, "size": digests[part].size}
                      for part, name in files.items()},
        }

    @classmethod
    def read(cls, directory: Path, entry: dict, dim: int, *, verify: bool = True) -> BaseIndex:
        """The base an entry of the manifest describes, memory-mapped; ``IndexFileError`` if it is not whole."""
        files = entry.get("files", {})
        try:
            paths = {part: directory / files[part]["name"] for part in files}
            if {"ids", "codes"} - set(paths) or entry["kind"] not in KINDS:
                raise KeyError("files or kind")
        except (KeyError, TypeError) as exc:
            raise IndexFileError(f"the manifest in {directory} does not describe a base ({exc}); {REBUILD_HINT}")
        for part, path in paths.items():
            _check_file(path, files[part], verify=verify)
        try:
            ids = np.load(paths["ids"], mmap_mode="r", allow_pickle=False)
            codes = faiss.read_index(str(paths["codes"]), faiss.IO_FLAG_MMAP_IFC)
            # The candidate stage's inverted lists are memory-mapped too (read-only on-disk lists), so that
            # each searching process does not hold its own copy of them.
            candidates = _read_mapped(paths["candidates"]) if "candidates" in paths else None
        except (OSError, RuntimeError, ValueError) as exc:
            raise IndexFileError(f"the index files in {directory} are corrupt ({exc}); {REBUILD_HINT}") from exc
        count = int(entry["count"])
        for name, index in (("codes", codes), ("candidates", candidates)):
            if index is not None and (index.d != dim or index.ntotal != count):
                raise IndexFileError(
                    f"index file {paths[name]} holds {index.ntotal} vectors of dimension {index.d}, but the "
                    f"manifest says {count} of dimension {dim}; {REBUILD_HINT}"
                )
        if ids.shape != (count,) or ids.dtype != np.int64:
            raise IndexFileError(f"index file {paths['ids']} does not hold {count} ids; {REBUILD_HINT}")
        if entry["kind"] == APPROXIMATE and candidates is None:
            raise IndexFileError(f"the approximate index in {directory} has no candidate stage; {REBUILD_HINT}")
        return cls(
            kind=entry["kind"], dim=dim, ids=ids, codes=codes, candidates=candidates,
            settings=SearchSettings(**entry.get("search", {})), quality=Quality(**entry.get("quality", {})),
            trained_count=int(entry.get("trained_count", 0)), trained_residual=float(entry.get("trained_residual", 0)),
            candidates_file=paths.get("candidates"),
        )

def _read_mapped(path: Path) -> faiss.Index:
    """An IVF index whose inverted lists stay in the file, mapped read-only. faiss would start up to 32
    threads per search to read the probed lists ahead; the pages are shared and mostly resident, so none."""
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if hasattr(lists, "prefetch_nthread"):  # the read-only on-disk lists faiss maps
        lists.prefetch_nthread = 0
    return index


def _write_faiss(f, index: faiss.Index) -> None:
    faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def _check_file(path: Path, expected: dict, *, verify: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IndexFileError(f"index file {path} named by its manifest is missing; {REBUILD_HINT}") from None
    if size != expected["size"]:
        raise IndexFileError(
            f"index file {path} is truncated or altered ({size} bytes, the manifest says {expected['size']}); "
            f"{REBUILD_HINT}"
        )
    if verify and file_sha256(path) != expected["sha256"]:
        raise IndexFileError(f"index file {path} is corrupt (sha256 mismatch); {REBUILD_HINT}")


def _selector(allow_rows: np.ndarray | None, exclude_rows: np.ndarray | None):
    """A faiss selector for rows that are allowed (all, without a list) and not excluded."""
    allow = faiss.IDSelectorBatch(as_ids(allow_rows)) if allow_rows is not None else None
    exclude = None
    if exclude_rows is not None and exclude_rows.size:
        excluded = faiss.IDSelectorBatch(as_ids(exclude_rows))
        exclude = faiss.IDSelectorNot(excluded)
        exclude.referenced_objects = [excluded]  # faiss keeps a pointer only: the wrapper must outlive it
    if allow is not None and exclude is not None:
        both = faiss.IDSelectorAnd(allow, exclude)
        both.referenced_objects = [allow, exclude]
        return both
    return allow or exclude


def describe(entry: dict) -> str:
    """The base of a manifest entry in a line, for logs."""
    return json.dumps({key: entry.get(key) for key in ("kind", "count", "search", "quality")})
