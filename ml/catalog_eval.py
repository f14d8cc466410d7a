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
from ml.verify import agreeing_points as count_agreeing, aligned_correlation, keypoints, template

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
    images: np.ndarray | None = None  # int64 [q, depth]: each product's best image, -1 past the end


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
    images = np.full((len(plan), depth), -1, dtype=np.int64)
    scores = np.full((len(plan), depth), -np.inf, dtype=np.float32)
    for row, query in enumerate(plan):
        seen, order, best, best_images = set(), [], [], []
        for position in positions[row][positions[row] >= 0]:
            image, product = int(catalog.image_ids[position]), int(catalog.product_ids[position])
            if image == query.image_id and images_per_product[product] > 1:
                continue
            if product not in seen:
                seen.add(product)
                order.append(product)
                best_images.append(image)
                best.append(float(query_vectors[row] @ catalog.vectors[position]))
        products[row, : len(order)] = order
        images[row, : len(best_images)] = best_images
        scores[row, : len(best)] = best
    return Rankings(np.array([query.product_id for query in plan], dtype=np.int64), products, scores, images)


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
POINTS_GRID = (3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50)  # agreeing local features, the candidates for the rule
CORRELATION_GRID = (0.8, 0.85, 0.88, 0.9, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98)  # the aligned products'


@dataclass(frozen=True)
class Verification:
    """How each query photo agrees with two catalog images (``ml.verify``), its first product's best image
    and the best image of the first product that is not its own: the local features one plausible view
    carries from the photo onto the image, and the correlation of the image's product aligned onto the photo."""

    points: np.ndarray  # int64 [q]
    points_other: np.ndarray  # int64 [q]
    correlation: np.ndarray  # float64 [q], -1 where nothing aligned
    correlation_other: np.ndarray  # float64 [q]


def verification(rankings: Rankings, plan: list[Query], photo_of: Callable[[Query], Image.Image],
                 load: Callable[[int], Image.Image], *, on_progress=None) -> Verification:
    """``Verification`` of the plan's query photos (``photo_of(query)``, made again: the same seeded photos)
    and the catalog images (``load(image id)``) the two shoppers of each query would be shown first."""
    others = rankings.products != rankings.truth[:, None]
    points, points_other = np.zeros(len(plan), dtype=np.int64), np.zeros(len(plan), dtype=np.int64)
    correlation, correlation_other = np.full(len(plan), -1.0), np.full(len(plan), -1.0)
    for row, query in enumerate(plan):
        photo = photo_of(query)
        features = keypoints(photo)

        def check(image_id: int) -> tuple[int, float]:
            image = load(image_id)
            return count_agreeing(features, keypoints(image)), aligned_correlation(photo, template(image))

        shown = rankings.images[row][rankings.products[row] >= 0]
        if shown.size:
            points[row], correlation[row] = check(int(shown[0]))
        other = rankings.images[row][others[row] & (rankings.products[row] >= 0)]
        if other.size:
            points_other[row], correlation_other[row] = ((points[row], correlation[row]) if other[0] == shown[0]
                                                         else check(int(other[0])))
        if on_progress:
            on_progress(row + 1)
    return Verification(points, points_other, correlation, correlation_other)


def match_calibration(rankings: Rankings, category_of: dict[int, str], checks: Verification | None = None) -> dict:
    """Thresholds for a result's labels: "same_product" for a first result whose photo and image agree in
    at least ``verified_points`` local features, or whose product aligned onto the photo correlates with it
    by at least ``aligned_correlation``, or whose score reaches a threshold *and* stands out from the next
    product's by a margin; "weak" below a score.

    Every query stands in for two shoppers: one whose product is in the catalog (the ranking as it is),
    and one whose product is not (the same ranking without that product). A score alone cannot tell them
    apart well: a product the catalog does not sell can still look much like several it does. What marks
    the same product is a first result that stands out from the rest (the ratio test of image matching) or,
    better, the photo and the catalog image agreeing under one view (``checks``: geometric verification).
    Of every (points, correlation, score, margin) on a grid, the rule kept is the one that labels the
    most correct first results "same_product" while those labels are right at least SAME_PRODUCT_PRECISION
    of the time and name a product for at most SAME_PRODUCT_FALSE_RATE of the out-of-catalog shoppers.
    "weak" is where a result becomes less likely related (same product or category) than not, by isotonic
    regression.
    """
    from sklearn.isotonic import IsotonicRegression  # on first use: scikit-learn takes a while to import

    truth, products, scores = rankings.truth, rankings.products, rankings.scores
    rule = _same_product_rule(truth, products, scores, checks)
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
    return {**rule, "weak": weak, "queries": int(len(truth))}


def _first_two(scores: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first two scores where ``keep`` (rows are best first); -inf where there is none."""
    kept = np.where(keep, scores, -np.inf)
    order = np.argsort(~keep, axis=1, kind="stable")
    ordered = np.take_along_axis(kept, order, axis=1)
    second = ordered[:, 1] if ordered.shape[1] > 1 else np.full(len(ordered), -np.inf)
    return ordered[:, 0], second


def _same_product_rule(truth, products, scores, checks: Verification | None) -> dict:
    """The best rule's thresholds (None where it uses none, all None if no rule holds), the share of correct
    first results it labels and its out-of-catalog rate."""
    none = {"same_product": None, "margin": None, "verified_points": None, "aligned_correlation": None,
            "same_product_recall": 0.0, "false_same_rate": 0.0}
    first_right = products[:, 0] == truth
    in_first, in_second = _first_two(scores, products >= 0)
    out_first, out_second = _first_two(scores, (products >= 0) & (products != truth[:, None]))
    in_margin = np.where(np.isfinite(in_second), in_first - in_second, 2.0)  # one product only: it stands out
    out_margin = np.where(np.isfinite(out_second), out_first - out_second, 2.0)
    seen = np.concatenate([in_first[np.isfinite(in_first)], out_first[np.isfinite(out_first)]])
    if not seen.size or not first_right.any():
        return none
    # The score grid's last entry is a threshold nothing reaches: that part of the rule unused.
    score_grid = np.append(np.unique(np.quantile(seen, np.linspace(0, 1, 81))), np.inf)
    margins = np.concatenate([in_margin, out_margin[np.isfinite(out_first)]])
    margin_grid = np.unique(np.concatenate([[0.0], np.quantile(margins, np.linspace(0, 0.98, 50))]))
    checked = checks is not None
    # Unused first, then strictest first: of rules that label as many correct first results with as few
    # wrong ones, the kept one asks for no check it does not need, and for the most agreement.
    points_grid = np.array([np.inf, *(sorted(POINTS_GRID, reverse=True) if checked else ())])
    correlation_grid = [np.inf, *(sorted(CORRELATION_GRID, reverse=True) if checked else ())]
    if not checked:
        nothing, unaligned = np.zeros(len(truth), dtype=np.int64), np.full(len(truth), -1.0)
        checks = Verification(nothing, nothing, unaligned, unaligned)
    listed = np.isfinite(out_first)  # the out-of-catalog shopper is shown a product at all
    by_score_in = (in_first[None, None, :] >= score_grid[:, None, None]) & (in_margin[None, None, :] >= margin_grid[None, :, None])
    by_score_out = (listed & (out_first >= score_grid[:, None, None]) &
                    (out_margin[None, None, :] >= margin_grid[None, :, None]))
    # [points, score, margin, query]
    by_points_in = by_score_in[None] | (checks.points[None, None, None, :] >= points_grid[:, None, None, None])
    by_points_out = by_score_out[None] | (listed & (checks.points_other >= points_grid[:, None, None, None]))
    best = None  # (key, correlation, points, score and margin positions, out-of-catalog rate, right)
    for correlation in correlation_grid:
        said_in = by_points_in | (checks.correlation >= correlation)
        said_out = by_points_out | (listed & (checks.correlation_other >= correlation))
        right = (said_in & first_right).sum(axis=3)
        wrong = (said_in & ~first_right).sum(axis=3) + said_out.sum(axis=3)
        false_rate = said_out.sum(axis=3) / len(truth)
        precision = np.where(right > 0, right / np.maximum(1, right + wrong), 0.0)
        allowed = (right > 0) & (precision >= SAME_PRODUCT_PRECISION) & (false_rate <= SAME_PRODUCT_FALSE_RATE)
        # The most correct labels, and of those the fewest wrong ones.
        key = np.where(allowed, right * (2 * len(truth) + 1) - wrong, -1)
        cell = np.unravel_index(np.argmax(key), key.shape)
        if key[cell] >= 0 and (best is None or key[cell] > best[0]):
            best = (int(key[cell]), correlation, *cell, float(false_rate[cell]), int(right[cell]))
    if best is None:
        return none
    _, correlation, points_at, score_at, margin_at, false_rate, best_right = best

    def used(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    by_score = np.isfinite(score_grid[score_at])
    return {"same_product": used(score_grid[score_at]), "margin": float(margin_grid[margin_at]) if by_score else None,
            "verified_points": used(points_grid[points_at]), "aligned_correlation": used(correlation),
            "same_product_recall": best_right / float(first_right.sum()), "false_same_rate": false_rate}


def match_of(score: float, calibration: dict | None, *, margin: float | None = None, first: bool = True,
             points: int | None = None, correlation: float | None = None) -> str:
    """ "same_product", "similar" or "weak" for a result's score; "similar" before any calibration.

    ``margin``: how far this result's score is above the next product's; with a calibrated margin, only the
    first result can be "same_product", and only when it stands out by that much. ``points`` and
    ``correlation``: how the query photo agrees with this result's image (``ml.verify``), when checked."""
    if not calibration:
        return "similar"
    threshold, needed = calibration.get("same_product"), calibration.get("margin")
    verified, aligned = calibration.get("verified_points"), calibration.get("aligned_correlation")
    if first and verified is not None and points is not None and points >= verified:
        return "same_product"
    if first and aligned is not None and correlation is not None and correlation >= aligned:
        return "same_product"
    if threshold is not None and score >= threshold and (
            needed is None or (first and (margin is None or margin >= needed))):
        return "same_product"
    if calibration.get("weak") is not None and score < calibration["weak"]:
        return "weak"
    return "similar"


def first_match(score: float, calibration: dict | None, *, margin: float | None,
                points: Callable[[], int | None], correlation: Callable[[], float | None]) -> str:
    """The first result's label, checking its image against the photo (``points()``, then ``correlation()``,
    each tens of milliseconds) only while the calibration uses the check and nothing has decided yet."""
    label = match_of(score, calibration, margin=margin)
    if label == "same_product" or not calibration:
        return label
    if calibration.get("verified_points") is not None:
        label = match_of(score, calibration, margin=margin, points=points())
    if label != "same_product" and calibration.get("aligned_correlation") is not None:
        label = match_of(score, calibration, margin=margin, correlation=correlation())
    return label


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
