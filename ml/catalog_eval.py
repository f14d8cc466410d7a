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


def search_metrics(catalog: CatalogVectors, plan: list[Query], query_vectors: np.ndarray,
                   category_of: dict[int, str], *, depth: int = 200) -> dict:
    """Recall@1, recall@10 and mean reciprocal rank of the exact product, overall and per category.

    Products are ranked by their best image. When a product has other images, the query's own catalog
    image is left out, so the query must find the product from another photo of it.
    """
    images_per_product: dict[int, int] = {}
    for product in catalog.product_ids.tolist():
        images_per_product[product] = images_per_product.get(product, 0) + 1
    depth = min(depth, len(catalog.image_ids))
    positions = knn_ground_truth(query_vectors, catalog.vectors, depth)
    ranked = np.full((len(plan), depth), -1, dtype=np.int64)  # products, best first
    for row, query in enumerate(plan):
        seen, order = set(), []
        for position in positions[row][positions[row] >= 0]:
            image, product = int(catalog.image_ids[position]), int(catalog.product_ids[position])
            if image == query.image_id and images_per_product[product] > 1:
                continue
            if product not in seen:
                seen.add(product)
                order.append(product)
        ranked[row, : len(order)] = order
    truth = np.array([query.product_id for query in plan], dtype=np.int64)
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
