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
    """Thresholds on the cosine score of a result: at or above "same_product", below "weak".

    Every query stands in for two shoppers: one whose product is in the catalog (the score of the true
    product), and one whose product is not (the best score of any other product: the catalog without that
    product). "same_product" starts at the lowest score where the first are at least SAME_PRODUCT_PRECISION
    of what reaches it and the second reach it at most SAME_PRODUCT_FALSE_RATE of the time. "weak" is where
    a result becomes less likely related (same product or category) than not, by isotonic regression.
    """
    from sklearn.isotonic import IsotonicRegression  # on first use: scikit-learn takes a while to import

    truth, products, scores = rankings.truth, rankings.products, rankings.scores
    own = products == truth[:, None]
    positive = np.where(own.any(axis=1), np.where(own, scores, -np.inf).max(axis=1), -np.inf)
    negative = np.where(~own & (products >= 0), scores, -np.inf).max(axis=1)
    candidates = np.unique(np.concatenate([positive[np.isfinite(positive)], negative[np.isfinite(negative)]]))
    same = None
    for threshold in candidates:
        true_hits, false_hits = (positive >= threshold).sum(), (negative >= threshold).sum()
        if true_hits and true_hits / (true_hits + false_hits) >= SAME_PRODUCT_PRECISION and \
                false_hits / len(negative) <= SAME_PRODUCT_FALSE_RATE:
            same = float(threshold)
            break
    first_right = products[:, 0] == truth
    recall = float((positive[first_right] >= same).mean()) if same is not None and first_right.any() else 0.0
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
    return {"same_product": same, "weak": weak, "queries": int(len(truth)),
            "same_product_recall": recall,
            "false_same_rate": float((negative >= same).mean()) if same is not None else 0.0}


def match_of(score: float, calibration: dict | None) -> str:
    """ "same_product", "similar" or "weak" for a result's score; "similar" before any calibration."""
    if not calibration:
        return "similar"
    if calibration.get("same_product") is not None and score >= calibration["same_product"]:
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
