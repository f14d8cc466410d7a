"""How well neighbour lists and predictions agree with the truth: one definition of each measure.

Recall against exact search (``knn_ground_truth`` over blocks, ``knn_intersection``) judges the
approximate index; ``neighbour_overlap`` judges a reduced precision against fp32; ranking and
classification measures judge a model on a catalog's own images.
"""

from __future__ import annotations

import faiss
import numpy as np

AGREEMENT_BAR = 0.98  # the least top-10 neighbour overlap with fp32 for a precision to be chosen by itself
_BLOCK = 65_536


class ExactNeighbours:
    """The exact top-``k`` by inner product of each query, gathered block by block (a stream of vectors)."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self._heap = faiss.ResultHeap(len(self.queries), k, keep_max=True)

    def add(self, block: np.ndarray, first: int) -> None:
        """Rows ``first`` .. ``first + len(block) - 1`` of the stream."""
        scores, positions = faiss.knn(self.queries, np.ascontiguousarray(block, dtype=np.float32), self.k,
                                      metric=faiss.METRIC_INNER_PRODUCT)
        self._heap.add_result(scores, np.where(positions >= 0, positions + first, -1))

    def result(self) -> np.ndarray:
        """Row numbers of each query's neighbours, best first; -1 where fewer exist."""
        self._heap.finalize()
        return self._heap.I


def knn_ground_truth(
    queries: np.ndarray, vectors: np.ndarray, k: int, *, ids: np.ndarray | None = None, normalize: bool = False
) -> np.ndarray:
    """The exact top-``k`` ids by inner product of each query among ``vectors``, scanned in blocks.

    ``ids`` names each row (default: its position); missing results are -1. With ``normalize`` each
    block of ``vectors`` is scaled to unit rows first (cosine), so no normalised copy of them all is made.
    """
    exact = ExactNeighbours(queries, k)
    for start in range(0, len(vectors), _BLOCK):
        block = np.array(vectors[start : start + _BLOCK], dtype=np.float32, order="C")
        if normalize:
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        exact.add(block, start)
    found = exact.result()
    if ids is None:
        return found
    return np.where(found >= 0, np.asarray(ids)[np.maximum(found, 0)], -1)


def knn_intersection(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact neighbours that ``found`` holds too (recall@k); -1 is no result."""
    hits = [len(np.intersect1d(f[f >= 0], e[e >= 0])) / max(1, int((e >= 0).sum())) for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 0.0


def recall_of_others(found: np.ndarray, exact: np.ndarray, own: np.ndarray, k: int = 10) -> float:
    """Recall@k when each query is one of the indexed vectors (``own``): the query itself left out of both
    lists, so the figure is about its other neighbours, as a new photo's would be (``found`` and ``exact``
    hold k + 1 results)."""
    def others(rows: np.ndarray) -> np.ndarray:
        return np.array([[r for r in row if r != mine][:k] for row, mine in zip(rows, own)], dtype=np.int64)

    return knn_intersection(others(found), others(exact))


def neighbour_overlap(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean share of each vector's top-k neighbours (cosine, among the rows) under ``reference``
    that are also its top-k under ``other``: how a reduced precision is judged against fp32."""
    return knn_intersection(_neighbours_among_rows(other, k), _neighbours_among_rows(reference, k))


def _neighbours_among_rows(vectors: np.ndarray, k: int) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


def reciprocal_rank(ranked: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1 / (position + 1) of each row's ``truth`` in its ``ranked`` ids, 0 where it is absent."""
    ranked = np.asarray(ranked)
    hit = ranked == np.asarray(truth)[:, None]
    found = hit.any(axis=1)
    return np.where(found, 1.0 / (hit.argmax(axis=1) + 1), 0.0)


def classification_metrics(true_labels, probabilities, categories: list[str]) -> dict:
    """top1, top5, per-category precision/recall/support and the confusion matrix.

    ``probabilities`` is (n, len(categories)). top-k is the share of examples whose true
    category is among the k highest; confusion rows are true and columns predicted
    categories, in ``categories`` order. Precision (recall) is None for a category never
    predicted (never present).
    """
    probabilities = np.asarray(probabilities)
    index = {c: i for i, c in enumerate(categories)}
    truth = np.array([index[label] for label in true_labels], dtype=np.int64)
    n, count = len(truth), len(categories)
    ranked = np.argsort(-probabilities, axis=1, kind="stable") if n else np.zeros((0, count), dtype=np.int64)
    predicted = ranked[:, 0] if n else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_category = {}
    for i, category in enumerate(categories):
        hits, support, claimed = int(confusion[i, i]), int(confusion[i].sum()), int(confusion[:, i].sum())
        per_category[category] = {
            "precision": hits / claimed if claimed else None,
            "recall": hits / support if support else None,
            "support": support,
        }

    def top(k: int) -> float | None:
        return float((ranked[:, :k] == truth[:, None]).any(axis=1).mean()) if n else None

    return {
        "top1": top(1),
        "top5": top(5),
        "per_category": per_category,
        "confusion": {"labels": list(categories), "matrix": confusion.tolist()},
    }
