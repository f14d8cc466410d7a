"""Building an index's base, exact or trained and tuned to its recall target, and compacting base and overlay.

A base is built from a stream of (ids, vectors) chunks in ascending id order, read twice for the
approximate kind (a training sample, then every vector), so a million vectors are never all in memory.
The build measures recall@10 against exact search for a sample of its own vectors (each query's ten
nearest others, as for a new photo) and does something when it misses: more probes, a larger re-rank pool, finer codes for data whose neighbours are close together,
and, last, scanning every code exactly. ``Quality.note`` says which, in words.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import faiss
import numpy as np

from ml.evaluation import ExactNeighbours, knn_ground_truth, knn_intersection, recall_of_others
from ml.index import VectorIndex
from ml.index_base import EXACT_NOTE, BaseIndex, Quality, SearchSettings
from ml.index_terms import APPROXIMATE, DEFAULT_EXACT_THRESHOLD, FLAT, KINDS, as_ids, normalized
from ml.segments import Overlay

log = logging.getLogger(__name__)

MIN_APPROXIMATE_COUNT = 1_000  # fewer vectors than this cannot train IVF lists and PCA usefully
TARGET_RECALL = 0.95
RECALL_QUERIES = 200
_CANDIDATE_DIM = 256
_CHUNK = 65_536
# Codes for the full vectors, coarsest first: the first whose exhaustive recall on a sample clears the
# target with this margin is kept (close neighbours, as in noisy clusters, need finer codes).
_CODECS = (("6-bit", faiss.ScalarQuantizer.QT_6bit), ("8-bit", faiss.ScalarQuantizer.QT_8bit),
           ("16-bit float", faiss.ScalarQuantizer.QT_fp16))
_CODEC_MARGIN = 0.03
_MAX_NPROBE_SHARE = 8  # probe at most 1/8 of the lists before scanning everything instead

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass: (ids, vectors), ids ascending
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def build_index(ids, vectors, identity: str, *, kind: str = "auto", exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                target_recall: float = TARGET_RECALL, recall_queries: int = RECALL_QUERIES, seed: int = 0) -> VectorIndex:
    """An index holding ``vectors`` under ``ids``, in memory: exact up to ``exact_threshold`` vectors."""
    ids = as_ids(ids)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"got {len(ids)} ids for vectors of shape {vectors.shape}")
    index = VectorIndex(identity, vectors.shape[1], exact_threshold=exact_threshold)
    index.checked_batch(ids, vectors)
    order = np.argsort(ids, kind="stable")

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(order), _CHUNK):
            rows = order[start : start + _CHUNK]
            yield ids[rows], vectors[rows]

    index.base = build_base(chunks, count=len(ids), dim=vectors.shape[1], kind=kind, exact_threshold=exact_threshold,
                            target_recall=target_recall, recall_queries=recall_queries, seed=seed)
    index._set_overlay(Overlay(index.dim, exact=index.base.kind == FLAT))
    return index


def build_base(chunks: Chunks, *, count: int, dim: int, kind: str = "auto",
               exact_threshold: int = DEFAULT_EXACT_THRESHOLD, target_recall: float = TARGET_RECALL,
               recall_queries: int = RECALL_QUERIES, seed: int = 0, on_progress: Progress | None = None,
               measured_against: str = "exact search over the vectors") -> BaseIndex:
    """The base that suits ``count`` vectors streamed by ``chunks``; see the module's docstring."""
    if kind == "auto":
        kind = APPROXIMATE if count > exact_threshold and count >= MIN_APPROXIMATE_COUNT else FLAT
    if kind not in KINDS:
        raise ValueError(f"kind must be 'auto', {FLAT!r} or {APPROXIMATE!r}, got {kind!r}")
    if kind == APPROXIMATE and count < MIN_APPROXIMATE_COUNT:
        raise ValueError(f"the approximate index needs at least {MIN_APPROXIMATE_COUNT} vectors, got {count}")
    progress = on_progress or (lambda stage, done, total: None)
    rng = np.random.default_rng(seed)
    if kind == FLAT:
        base = BaseIndex(FLAT, dim, np.zeros(0, np.int64), faiss.IndexFlatIP(dim))
        _fill(base, chunks, count, None, progress)
        base.quality = Quality(recall_at_10=1.0, target=target_recall, note=EXACT_NOTE, measured_against="itself: exact")
        return base

    nlist = int(max(16, min(4 * math.sqrt(count), count // 39, 65_536)))
    sample_rows = np.sort(rng.choice(count, size=min(count, max(40 * nlist, 50_000), 200_000), replace=False))
    query_rows = np.sort(rng.choice(count, size=min(recall_queries, count), replace=False))
    picked_rows = np.union1d(sample_rows, query_rows)
    picked = _rows_of_stream(chunks, picked_rows, count, progress)
    sample, queries = picked[np.isin(picked_rows, sample_rows)], picked[np.isin(picked_rows, query_rows)]
    del picked
    candidates, residual = _train_candidates(sample, nlist, rng)
    codec_name, codes, codec_note = _choose_codes(sample, target_recall, rng)
    del sample
    base = BaseIndex(APPROXIMATE, dim, np.zeros(0, np.int64), codes, candidates, trained_count=count,
                     trained_residual=residual)
    exact = _fill(base, chunks, count, queries, progress)
    _tune(base, queries, exact, query_rows, target_recall, codec_name=codec_name, codec_note=codec_note,
          measured_against=measured_against)
    return base


def _rows_of_stream(chunks: Chunks, rows: np.ndarray, count: int, progress: Progress) -> np.ndarray:
    """The normalised vectors at these stream positions (a training sample), in one pass."""
    picked, seen = [], 0
    for ids, vectors in chunks():
        inside = rows[(rows >= seen) & (rows < seen + len(ids))] - seen
        if inside.size:
            picked.append(normalized(vectors[inside]))
        seen += len(ids)
        progress("sampling", seen, count)
    return np.concatenate(picked)


def _fill(base: BaseIndex, chunks: Chunks, count: int, queries: np.ndarray | None, progress: Progress):
    """Add every streamed vector in id order, and with ``queries`` find their exact neighbours on the way."""
    exact = ExactNeighbours(queries, 11) if queries is not None else None  # the query itself, and 10 others
    ids_seen, previous, seen = [], -1, 0
    for ids, vectors in chunks():
        ids = as_ids(ids)
        if len(ids) and (ids[0] <= previous or (np.diff(ids) <= 0).any()):
            raise ValueError("the vectors must come in strictly ascending id order, each id once")
        block = normalized(vectors)
        base.codes.add(block)
        if base.candidates is not None:
            base.candidates.add_with_ids(block, np.arange(seen, seen + len(ids), dtype=np.int64))
        if exact is not None:
            exact.add(block, seen)
        ids_seen.append(ids)
        previous = int(ids[-1]) if len(ids) else previous
        seen += len(ids)
        progress("adding", seen, count)
    if seen != count:
        raise ValueError(f"the stream held {seen} vectors, not the {count} announced")
    base.ids = np.concatenate(ids_seen) if ids_seen else np.zeros(0, np.int64)
    return exact.result() if exact is not None else None


def _train_candidates(sample: np.ndarray, nlist: int, rng: np.random.Generator) -> tuple[faiss.Index, float]:
    """PCA to 256-d (centred: cosine ranking becomes L2 ranking) and IVF lists with an HNSW quantizer.

    Also the sample's mean squared distance to its nearest list centre: what a drifted catalog exceeds.
    """
    dim = sample.shape[1]
    candidate_dim = min(_CANDIDATE_DIM, dim)
    quantizer = faiss.IndexHNSWFlat(candidate_dim, 32)
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, candidate_dim, nlist, faiss.ScalarQuantizer.QT_4bit)
    ivf.clustering_index = faiss.IndexFlatL2(candidate_dim)  # k-means on a flat index, then the HNSW graph
    ivf.cp.seed = int(rng.integers(2**31))
    if candidate_dim == dim:
        ivf.train(sample)
        return ivf, _residual(ivf, sample)
    pca = _pca_transform(sample[:50_000], candidate_dim, rng)
    ivf.train(np.concatenate([pca.apply(sample[start : start + _CHUNK]) for start in range(0, len(sample), _CHUNK)]))
    candidates = faiss.IndexPreTransform(pca, ivf)
    return candidates, _residual(candidates, sample)


def _residual(candidates: faiss.Index, vectors: np.ndarray) -> float:
    """Mean squared distance of (a sample of) ``vectors`` to their nearest list centre, in the candidate space."""
    vectors = vectors[:20_000]
    if isinstance(candidates, faiss.IndexPreTransform):
        vectors = candidates.chain.at(0).apply(vectors)
    distances, _ = faiss.extract_index_ivf(candidates).quantizer.search(np.ascontiguousarray(vectors), 1)
    return float(distances.mean())


def _choose_codes(sample: np.ndarray, target: float, rng: np.random.Generator):
    """The coarsest codes whose exhaustive ranking on a sample keeps ``target`` of the exact neighbours."""
    held = sample[:50_000]
    queries = held[rng.choice(len(held), size=min(100, len(held)), replace=False)]
    exact = knn_ground_truth(queries, held, 10)
    notes = []
    for name, codec in _CODECS:
        codes = faiss.IndexScalarQuantizer(sample.shape[1], codec, faiss.METRIC_INNER_PRODUCT)
        codes.train(held)
        probe = faiss.clone_index(codes)
        probe.add(held)
        recall = knn_intersection(probe.search(queries, 10)[1], exact)
        if recall >= target + _CODEC_MARGIN or codec == _CODECS[-1][1]:
            note = f"{name} codes" + (f" ({'; '.join(notes)})" if notes else "")
            return name, codes, note
        notes.append(f"{name} codes ranked {recall:.3f} of a sample's neighbours")
    raise AssertionError("unreachable")


def _tune(base: BaseIndex, queries, exact_rows, query_rows, target: float, *, codec_name: str, codec_note: str,
          measured_against: str) -> None:
    """Raise probes, then the re-rank pool, until recall@10 reaches ``target``; else scan every code."""
    nlist = faiss.extract_index_ivf(base.candidates).nlist
    best = (-1.0, 0, 0)
    for refine in (20, 50):
        for nprobe in _doubling(16, max(16, nlist // _MAX_NPROBE_SHARE)):
            base.settings = SearchSettings(nprobe=nprobe, refine_factor=refine)
            recall = recall_of_others(base.search(queries, 11)[1], exact_rows, query_rows)
            best = max(best, (recall, nprobe, refine))
            if recall >= target:
                base.quality = Quality(recall, target, f"approximate: {nprobe} of {nlist} lists probed, "
                                       f"{refine}x re-ranked on {codec_note}", measured_against)
                return
    recall, nprobe, refine = best
    base.settings = SearchSettings(nprobe=nprobe, refine_factor=refine, exhaustive=True)
    exhaustive = recall_of_others(base.search(queries, 11)[1], exact_rows, query_rows)
    base.quality = Quality(
        exhaustive, target,
        f"exact search over every vector's {codec_name} codes: the approximate stage reached at best recall@10 "
        f"{recall:.3f} ({nprobe} of {nlist} lists, {refine}x re-ranked), under the {target:.2f} target",
        measured_against,
    )
    log.warning("index: %s", base.quality.note)


# ----- compaction ---------------------------------------------------------------------------

DRIFT_RATIO = 1.3  # new vectors this much farther from the list centres than the training sample: retrain


def compact(index: VectorIndex, *, target_recall: float = TARGET_RECALL, source: Chunks | None = None,
            source_against: str = "exact search over the database's vectors", on_progress: Progress | None = None,
            seed: int = 0) -> tuple[BaseIndex, str]:
    """The next base of ``index``, its overlay folded in, and what was done, in words.

    While the kind still fits and the new vectors lie where the base was trained, the base's codes are kept
    and the overlay's added (no retraining). Otherwise a new base is built from ``source`` (a stream of the
    true vectors: the database's) or, without one, from the index's own vectors. Recall after a merge is
    checked against ``source`` when given, else against exhaustive search of the codes.
    """
    total = len(index)
    kind = APPROXIMATE if total > index.exact_threshold and total >= MIN_APPROXIMATE_COUNT else FLAT
    base, reason = index.base, None
    if kind != base.kind:
        reason = f"{total} vectors now suit the {kind} kind"
    elif kind == FLAT:
        reason = "an exact index is rebuilt whole"
    elif total > 2 * base.trained_count:
        reason = f"{total} vectors, more than twice the {base.trained_count} it was trained on"
    else:
        drift = _drift(base, index.overlay)
        if drift > DRIFT_RATIO:
            reason = f"the new vectors lie {drift:.2f}x farther from the list centres than those it was trained on"
    if reason is None:
        merged = _merge(index)
        recall, against = _recall_of(merged, source, source_against, seed)
        if recall >= target_recall:
            merged.quality = Quality(recall, target_recall, base.quality.note, against)
            return merged, f"merged {len(index.overlay)} new vectors into the base (recall@10 {recall:.3f})"
        reason = f"recall@10 fell to {recall:.3f} after merging"
    stream = source or _own_vectors(index)
    against = source_against if source is not None else "exact search over the index's own stored vectors"
    rebuilt = build_base(stream, count=total, dim=index.dim, kind=kind, exact_threshold=index.exact_threshold,
                         target_recall=target_recall, seed=seed, on_progress=on_progress, measured_against=against)
    return rebuilt, f"built anew: {reason}"


def _drift(base: BaseIndex, overlay) -> float:
    if len(overlay) == 0 or base.trained_residual <= 0:
        return 1.0
    return _residual(base.candidates, overlay.vectors()) / base.trained_residual


def _merge(index: VectorIndex) -> BaseIndex:
    """The approximate base with the hidden rows dropped and the overlay's vectors added, codes kept as they are."""
    base, overlay = index.base, index.overlay
    hidden = base.rows_of(overlay.masked)
    kept = np.delete(np.arange(len(base), dtype=np.int64), hidden)
    ids = np.concatenate([np.asarray(base.ids)[kept], overlay.ids])
    order = np.argsort(ids, kind="stable")
    new_row = np.empty(len(ids), dtype=np.int64)
    new_row[order] = np.arange(len(ids))
    kept_new, overlay_new = new_row[: len(kept)], new_row[len(kept) :]

    code_size = base.codes.code_size
    old_codes = faiss.vector_to_array(base.codes.codes).reshape(len(base), code_size)
    codes = np.empty((len(ids), code_size), dtype=np.uint8)
    codes[kept_new] = old_codes[kept]
    del old_codes
    vectors = overlay.vectors()
    if len(vectors):
        codes[overlay_new] = base.codes.sa_encode(vectors)
    merged_codes = faiss.IndexScalarQuantizer(base.dim, base.codes.sq.qtype, faiss.METRIC_INNER_PRODUCT)
    merged_codes.sq = base.codes.sq
    merged_codes.is_trained = True
    faiss.copy_array_to_vector(codes.ravel(), merged_codes.codes)
    merged_codes.ntotal = len(ids)
    del codes

    candidates = base.editable_candidates()
    ivf = faiss.extract_index_ivf(candidates)
    if hidden.size:
        ivf.remove_ids(faiss.IDSelectorBatch(hidden))
    renumber = np.full(len(base), -1, dtype=np.int64)
    renumber[kept] = kept_new
    lists = ivf.invlists
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            entries = faiss.rev_swig_ptr(lists.get_ids(number), size)
            entries[:] = renumber[entries]
    if len(vectors):
        candidates.add_with_ids(vectors, overlay_new)
    return BaseIndex(APPROXIMATE, base.dim, ids[order], merged_codes, candidates,
                     settings=SearchSettings(**vars(base.settings)), trained_count=base.trained_count,
                     trained_residual=base.trained_residual)


def _recall_of(base: BaseIndex, source: Chunks | None, source_against: str, seed: int) -> tuple[float, str]:
    """Recall@10 of ``base`` on a sample of its own vectors, against ``source`` or its exhaustively scanned codes."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(base), size=min(RECALL_QUERIES, len(base)), replace=False))
    queries = base.vectors_of_rows(rows)
    own = base.ids_of(rows)
    found = base.ids_of(base.search(queries, 11)[1])
    if source is None:
        return recall_of_others(found, base.ids_of(base.codes.search(queries, 11)[1]), own), \
            "exhaustive search over the stored codes"
    exact, ids_seen, seen = ExactNeighbours(queries, 11), [], 0
    for ids, vectors in source():
        exact.add(normalized(vectors), seen)
        ids_seen.append(as_ids(ids))
        seen += len(ids)
    positions = exact.result()
    every = np.concatenate(ids_seen)
    return recall_of_others(found, np.where(positions >= 0, every[np.maximum(positions, 0)], -1), own), source_against


def _own_vectors(index: VectorIndex) -> Chunks:
    """A stream of the index's own vectors in id order: the base's rows still served, and the overlay's."""
    base, overlay = index.base, index.overlay

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        every = index.ids()
        decoded = overlay.vectors()
        for start in range(0, len(every), _CHUNK):
            ids = every[start : start + _CHUNK]
            in_overlay = np.isin(ids, overlay.ids)
            vectors = np.empty((len(ids), index.dim), dtype=np.float32)
            vectors[in_overlay] = decoded[np.searchsorted(overlay.ids, ids[in_overlay])]
            vectors[~in_overlay] = base.vectors_of_rows(base.rows_of(ids[~in_overlay]))
            yield ids, vectors

    return chunks


def _pca_transform(sample: np.ndarray, out_dim: int, rng: np.random.Generator) -> faiss.LinearTransform:
    """Centring plus projection on the top principal axes, found by subspace iteration.

    faiss.PCAMatrix decomposes the whole covariance (minutes on a small machine for 2048-d); the top
    axes come from a few products with it (seconds).
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


def measure_recall(index: VectorIndex, sample_queries, k: int = 10, *, ids, vectors) -> float:
    """Recall@k of ``index`` against exact search over ``ids``/``vectors``, the data it holds."""
    queries = normalized(index.as_vectors(sample_queries, "sample_queries"))
    exact = knn_ground_truth(queries, index.as_vectors(vectors, "vectors"), k, ids=as_ids(ids), normalize=True)
    return knn_intersection(index.search(queries, k)[1], exact)


def _doubling(start: int, stop: int) -> Iterator[int]:
    value = min(start, stop)
    while True:
        yield value
        if value >= stop:
            return
        value = min(value * 2, stop)
