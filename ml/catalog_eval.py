"""Measuring a model on a catalog's own images: shopper-like queries for search, held-out products for categories.

The split and the queries are functions of the product and image ids and a salt only (a product's fold is
a hash of its id), so two models are compared on exactly the same queries, and the same products are kept
out of fine-tuning. Queries are made by ``ml.augment.shopper_photo``, whose transformations training never
uses. Search is exact (every catalog vector scanned), so the figures describe the model, not the index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ml.augment import shopper_photo
from ml.categorizer import train_category_head
from ml.evaluation import classification_metrics, knn_ground_truth, reciprocal_rank

HELD_OUT_SHARE = 0.2  # categorized products kept out of training, for the category figures
QUERY_LIMIT = 600
SALT = "visualsearch-evaluation-1"


def held_out(product_id: int, salt: str = SALT) -> bool:
    """Whether a product is kept out of training: its category is what the evaluation predicts."""
    digest = hashlib.sha256(f"{salt}:{product_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELD_OUT_SHARE


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Query:
    image_id: int  # the catalog image the shopper photographs
    product_id: int
    seed: int


def query_plan(images: list[tuple[int, int]], *, limit: int = QUERY_LIMIT, salt: str = SALT) -> list[Query]:
    """One query per product (its first image), up to ``limit`` products chosen by hash: the same set for
    every model while the catalog stays the same."""
    first: dict[int, int] = {}
    for image_id, product_id in sorted(images):
        first.setdefault(product_id, image_id)
    chosen = sorted(first, key=lambda product: _hash(f"{salt}:{product}"))[:limit]
    return [Query(first[p], p, _hash(f"{salt}:query:{first[p]}") % 2**31) for p in sorted(chosen)]


def shopper_queries(plan: list[Query], load: Callable[[int], Image.Image],
                    backgrounds: list[Image.Image]) -> list[tuple[Query, Image.Image, list[str]]]:
    """The query photos of a plan: each catalog image transformed as a phone photo would be, seeded."""
    out = []
    for query in plan:
        photo, families = shopper_photo(load(query.image_id), np.random.default_rng(query.seed), backgrounds)
        out.append((query, photo, families))
    return out


@dataclass(frozen=True)
class CatalogVectors:
    image_ids: np.ndarray  # int64
    product_ids: np.ndarray  # int64, the product of each image
    vectors: np.ndarray  # float32, unit rows


@dataclass(frozen=True)
class Rankings:
    """Each query's products, best first, with their best image's cosine score."""

    truth: np.ndarray  # int64 [q]: the query's own product
    products: np.ndarray  # int64 [q, depth], -1 past the end
    scores: np.ndarray  # float32 [q, depth]


def rank_products(catalog: CatalogVectors, plan: list[Query], query_vectors: np.ndarray, *,
                  depth: int = 200) -> Rankings:
    """Products ranked by their best image for each query (exact search). When a product has other images,
    the query's own catalog image is left out, so the query must find the product from another photo of it."""
    images_per_product: dict[int, int] = {}
    for product in catalog.product_ids.tolist():
        images_per_product[product] = images_per_product.get(product, 0) + 1
    depth = min(depth, len(catalog.image_ids))
    positions = knn_ground_truth(query_vectors, catalog.vectors, depth)
    products = np.full((len(plan), depth), -1, dtype=np.int64)
    scores = np.full((len(plan), depth), -np.inf, dtype=np.float32)
    for row, query in enumerate(plan):
        seen, order, best = set(), [], []
        for position in positions[row][positions[row] >= 0]:
            image, product = int(catalog.image_ids[position]), int(catalog.product_ids[position])
            if image == query.image_id and images_per_product[product] > 1:
                continue
            if product not in seen:
                seen.add(product)
                order.append(product)
                best.append(float(query_vectors[row] @ catalog.vectors[position]))
        products[row, : len(order)] = order
        scores[row, : len(best)] = best
    return Rankings(np.array([query.product_id for query in plan], dtype=np.int64), products, scores)


def search_metrics(rankings: Rankings, plan: list[Query], category_of: dict[int, str]) -> dict:
    """Recall@1, recall@10 and mean reciprocal rank of the exact product, overall and per category."""
    ranked, truth = rankings.products, rankings.truth
    reciprocal = reciprocal_rank(ranked, truth)
    hit1 = ranked[:, 0] == truth
    hit10 = (ranked[:, :10] == truth[:, None]).any(axis=1)

    def summary(rows: np.ndarray) -> dict:
        return {"recall_at_1": float(hit1[rows].mean()), "recall_at_10": float(hit10[rows].mean()),
                "mrr": float(reciprocal[rows].mean()), "queries": int(rows.sum())}

    per_category = {}
    names = np.array([category_of.get(query.product_id, "") for query in plan])
    for name in sorted(set(names)):
        per_category[name or "(no category)"] = summary(names == name)
    return {**summary(np.ones(len(plan), dtype=bool)), "per_category": per_category}


# ----- same product, similar, or weak --------------------------------------------------------------

SAME_PRODUCT_PRECISION = 0.95  # "same_product" must be right at least this often
SAME_PRODUCT_FALSE_RATE = 0.03  # and name a product not in the catalog at most this often (a margin under 5 %)


def match_calibration(rankings: Rankings, category_of: dict[int, str]) -> dict:
    """Thresholds for a result's labels: "same_product" at or above a score *and* a margin over the next
    product (first result only), "weak" below a score.

    Every query stands in for two shoppers: one whose product is in the catalog (the ranking as it is),
    and one whose product is not (the same ranking without that product). A score alone cannot tell them
    apart well: a product the catalog does not sell can still look much like several it does. What marks
    the same product is a first result that stands out from the rest (the ratio test of image matching), so
    the rule is a pair (score, margin): of every (score, margin) on a grid, the one that labels the most
    correct first results "same_product" while those labels are right at least SAME_PRODUCT_PRECISION of
    the time and name a product for at most SAME_PRODUCT_FALSE_RATE of the out-of-catalog shoppers. "weak"
    is where a result becomes less likely related (same product or category) than not, by isotonic
    regression.
    """
    from sklearn.isotonic import IsotonicRegression  # on first use: scikit-learn takes a while to import

    truth, products, scores = rankings.truth, rankings.products, rankings.scores
    same, margin, recall, false_rate = _same_product_rule(truth, products, scores)
    weak = None
    if category_of:
        shown = (products[:, :10] >= 0) & np.isfinite(scores[:, :10])
        related = np.array([[p == t or (category_of.get(int(p)) is not None and category_of.get(int(p)) ==
                                         category_of.get(int(t))) for p in row] for row, t in zip(products[:, :10],
                                                                                                  truth)])
        x, y = scores[:, :10][shown], related[shown].astype(float)
        if len(set(y.tolist())) == 2:
            fitted = IsotonicRegression(out_of_bounds="clip").fit(x, y)
            grid = np.linspace(float(x.min()), float(x.max()), 200)
            likely = grid[fitted.predict(grid) >= 0.5]
            weak = float(likely[0]) if likely.size else float(x.max())
    return {"same_product": same, "margin": margin, "weak": weak, "queries": int(len(truth)),
            "same_product_recall": recall, "false_same_rate": false_rate}


def _first_two(scores: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first two scores where ``keep`` (rows are best first); -inf where there is none."""
    kept = np.where(keep, scores, -np.inf)
    order = np.argsort(~keep, axis=1, kind="stable")
    ordered = np.take_along_axis(kept, order, axis=1)
    second = ordered[:, 1] if ordered.shape[1] > 1 else np.full(len(ordered), -np.inf)
    return ordered[:, 0], second


def _same_product_rule(truth, products, scores) -> tuple[float | None, float | None, float, float]:
    """(score, margin, recall of correct first results, out-of-catalog rate) of the best rule; Nones if none holds."""
    first_right = products[:, 0] == truth
    in_first, in_second = _first_two(scores, products >= 0)
    out_first, out_second = _first_two(scores, (products >= 0) & (products != truth[:, None]))
    in_margin = np.where(np.isfinite(in_second), in_first - in_second, 2.0)  # one product only: it stands out
    out_margin = np.where(np.isfinite(out_second), out_first - out_second, 2.0)
    seen = np.concatenate([in_first[np.isfinite(in_first)], out_first[np.isfinite(out_first)]])
    if not seen.size or not first_right.any():
        return None, None, 0.0, 0.0
    score_grid = np.unique(np.quantile(seen, np.linspace(0, 1, 81)))
    margins = np.concatenate([in_margin, out_margin[np.isfinite(out_first)]])
    margin_grid = np.unique(np.concatenate([[0.0], np.quantile(margins, np.linspace(0, 0.98, 50))]))
    said_in = (in_first[None, None, :] >= score_grid[:, None, None]) & (in_margin[None, None, :] >= margin_grid[None, :, None])
    said_out = (np.isfinite(out_first) & (out_first >= score_grid[:, None, None]) &
                (out_margin[None, None, :] >= margin_grid[None, :, None]))
    right = (said_in & first_right).sum(axis=2)
    wrong = (said_in & ~first_right).sum(axis=2) + said_out.sum(axis=2)
    false_rate = said_out.sum(axis=2) / len(truth)
    precision = np.where(right > 0, right / np.maximum(1, right + wrong), 0.0)
    allowed = (right > 0) & (precision >= SAME_PRODUCT_PRECISION) & (false_rate <= SAME_PRODUCT_FALSE_RATE)
    if not allowed.any():
        return None, None, 0.0, 0.0
    best = np.unravel_index(np.argmax(np.where(allowed, right, -1)), right.shape)
    return (float(score_grid[best[0]]), float(margin_grid[best[1]]), float(right[best] / first_right.sum()),
            float(false_rate[best]))


def match_of(score: float, calibration: dict | None, *, margin: float | None = None, first: bool = True) -> str:
    """ "same_product", "similar" or "weak" for a result's score; "similar" before any calibration.

    ``margin``: how far this result's score is above the next product's; with a calibrated margin, only the
    first result can be "same_product", and only when it stands out by that much."""
    if not calibration:
        return "similar"
    threshold, needed = calibration.get("same_product"), calibration.get("margin")
    if threshold is not None and score >= threshold and (
            needed is None or (first and (margin is None or margin >= needed))):
        return "same_product"
    if calibration.get("weak") is not None and score < calibration["weak"]:
        return "weak"
    return "similar"


def category_metrics(train: tuple[np.ndarray, list[str], list[int]], test: tuple[np.ndarray, list[str]], *,
                     identity: str) -> dict | None:
    """Top-1/top-5 and per-category precision and recall of a head trained on ``train`` (vectors, labels,
    products) and tested on the held-out products' images ``test`` (vectors, labels); None without enough."""
    train_vectors, train_labels, train_groups = train
    test_vectors, test_labels = test
    if len(set(train_labels)) < 2 or not test_labels:
        return None
    head = train_category_head(train_vectors, train_labels, identity=identity, groups=train_groups).head
    known = [i for i, label in enumerate(test_labels) if label in head.categories]
    if not known:
        return None
    probabilities = head.probabilities(test_vectors[known])
    metrics = classification_metrics([test_labels[i] for i in known], probabilities, head.categories)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "per_category": metrics["per_category"],
            "confusion": metrics["confusion"], "images": len(known),
            "unseen_categories": len(test_labels) - len(known)}
