"""Cross-fitted audits of the catalog's own categories: each product judged by a head that never saw it.

A head refitted on every categorized product has learnt that catalog's mistakes too: a mislabelled
product keeps a high probability for its wrong category (docs/categorizer.md has the measurement). So the
integrity check asks ``FOLDS`` check heads, each fitted
without one fold of products; a product's fold is a function of its id, so a product categorized after
training is judged out of sample too. The same predictions say how often a top suggestion above a
threshold is right (``threshold_table``).
"""

from __future__ import annotations

import numpy as np

from ml.categorizer import CategoryHead, fit_category_head

FOLDS = 3
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# A check head gives a product's own category under this probability: it looks mislabelled
# (docs/categorizer.md: what this catches on the tuxpaint stamps).
UNLIKELY_THRESHOLD = 0.1


def fold_of(product_id: int) -> int:
    return int(product_id) % FOLDS


def fit_check_heads(
    vectors, labels: list[str], product_ids, *, identity: str, l2: float, temperature: float
) -> list[CategoryHead | None]:
    """One head per fold, fitted on the products of the other folds; None where those hold under two categories."""
    vectors = np.asarray(vectors)
    folds = np.array([fold_of(p) for p in product_ids], dtype=np.int64)
    heads: list[CategoryHead | None] = []
    for fold in range(FOLDS):
        rows = np.flatnonzero(folds != fold)
        fold_labels = [str(labels[i]) for i in rows]
        if len(set(fold_labels)) < 2:
            heads.append(None)
            continue
        heads.append(fit_category_head(vectors[rows], fold_labels, identity=identity, l2=l2, temperature=temperature))
    return heads


def cross_fitted_probabilities(heads: list[CategoryHead | None], vectors, product_ids, categories: list[str]) -> np.ndarray:
    """(n, len(categories)): each row as the head of its product's fold sees it.

    NaN for the categories that head never saw (it cannot judge them) and for whole rows whose
    fold has no head.
    """
    vectors = np.asarray(vectors)
    folds = np.array([fold_of(p) for p in product_ids], dtype=np.int64)
    column = {category: i for i, category in enumerate(categories)}
    out = np.full((len(vectors), len(categories)), np.nan)
    for fold, head in enumerate(heads):
        rows = np.flatnonzero(folds == fold)
        if head is None or not len(rows):
            continue
        known = [(j, column[c]) for j, c in enumerate(head.categories) if c in column]
        probabilities = head.probabilities(vectors[rows])
        out[np.ix_(rows, [c for _, c in known])] = probabilities[:, [j for j, _ in known]]
    return out


def mean_per_group(values: np.ndarray, groups) -> tuple[list, np.ndarray]:
    """(groups in first-seen order, the mean row of each group): e.g. a product's images to one product."""
    order: dict = {}
    index = np.array([order.setdefault(g, len(order)) for g in groups], dtype=np.int64)
    sums = np.zeros((len(order),) + values.shape[1:])
    np.add.at(sums, index, values)
    return list(order), sums / np.bincount(index, minlength=len(order)).reshape((-1,) + (1,) * (values.ndim - 1))


def threshold_table(top_probability, correct, thresholds=THRESHOLDS) -> list[dict]:
    """For each threshold: how many top predictions reach it (coverage, a share) and how many of those are right."""
    top_probability = np.asarray(top_probability, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    rows = []
    for threshold in thresholds:
        passing = top_probability >= threshold
        count = int(passing.sum())
        rows.append({
            "threshold": float(threshold),
            "count": count,
            "coverage": count / len(passing) if len(passing) else None,
            "precision": float(correct[passing].mean()) if count else None,
        })
    return rows
