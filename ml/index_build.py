"""Building a vector index: exact for small catalogs, trained and tuned to its recall target above."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import faiss
import numpy as np

from ml.evaluation import knn_ground_truth, knn_intersection
from ml.index import (
    ADD_CHUNK,
    APPROXIMATE,
    DEFAULT_EXACT_THRESHOLD,
    FLAT,
    KINDS,
    VectorIndex,
    as_ids,
    normalized,
)

log = logging.getLogger(__name__)

MIN_APPROXIMATE_COUNT = 1_000  # fewer vectors than this cannot train IVF lists and PCA usefully
_CANDIDATE_DIM = 256


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
    ids = as_ids(ids)
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
    index.adopt_trained(*_train_approximate(vectors, rng))
    index.trained_count = len(ids)
    index.add(ids, vectors)

    queries = vectors[np.sort(rng.choice(len(vectors), size=min(recall_queries, len(vectors)), replace=False))]
    exact_ids = knn_ground_truth(normalized(queries), vectors, 10, ids=ids, normalize=True)
    for nprobe in _doubling(16, index.nlist):
        index.nprobe = nprobe
        index.recall_at_10 = knn_intersection(index.search(queries, 10)[1], exact_ids)
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
    sample = normalized(vectors[rows[:50_000]])  # enough for PCA and the scalar ranges

    quantizer = faiss.IndexHNSWFlat(candidate_dim, 32)
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, candidate_dim, nlist, faiss.ScalarQuantizer.QT_4bit)
    ivf.clustering_index = faiss.IndexFlatL2(candidate_dim)  # k-means on a flat index, then the HNSW graph
    ivf.cp.seed = int(rng.integers(2**31))
    if candidate_dim < dim:
        # Centred PCA turns cosine ranking into L2 ranking, so the candidate stage searches by L2.
        pca = _pca_transform(sample, candidate_dim, rng)
        chunks = (rows[start : start + ADD_CHUNK] for start in range(0, len(rows), ADD_CHUNK))
        projected = np.concatenate([pca.apply(normalized(vectors[chunk])) for chunk in chunks])
        ivf.train(projected)
        main = faiss.IndexPreTransform(pca, ivf)
    else:
        ivf.train(normalized(vectors[rows]))
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


def measure_recall(index: VectorIndex, sample_queries, k: int = 10, *, ids, vectors) -> float:
    """Recall@k of ``index`` against exact search over ``ids``/``vectors``, the data it holds."""
    queries = normalized(index._as_vectors(sample_queries, "sample_queries"))
    exact = knn_ground_truth(queries, index._as_vectors(vectors, "vectors"), k, ids=as_ids(ids), normalize=True)
    return knn_intersection(index.search(queries, k)[1], exact)


def _doubling(start: int, stop: int) -> Iterator[int]:
    value = min(start, stop)
    while True:
        yield value
        if value >= stop:
            return
        value = min(value * 2, stop)
