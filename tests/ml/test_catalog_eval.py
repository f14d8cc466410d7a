"""The match labels' calibration: "same_product" must stay right, and rarely name a product the catalog does not sell."""
import numpy as np

from ml.catalog_eval import (
    SAME_PRODUCT_FALSE_RATE,
    SAME_PRODUCT_PRECISION,
    Rankings,
    Verification,
    first_match,
    match_calibration,
    match_of,
)


def rankings(seed: int = 0, queries: int = 400, depth: int = 20) -> Rankings:
    """Queries whose own product stands out from the rest by 0.10-0.25 for 70 % of them (found first),
    while lookalikes of other products crowd close together at 0.70-0.90, as in a catalog of similar items."""
    rng = np.random.default_rng(seed)
    truth = np.arange(queries, dtype=np.int64)
    products = np.zeros((queries, depth), dtype=np.int64)
    scores = np.zeros((queries, depth), dtype=np.float32)
    for row in range(queries):
        others = rng.choice(np.setdiff1d(np.arange(queries + 50), [row]), size=depth, replace=False)
        lookalike = np.sort(rng.uniform(0.70, 0.90, size=depth))[::-1]
        lookalike[1:] = lookalike[0] - np.cumsum(rng.uniform(0.0, 0.03, size=depth - 1))  # close together
        if rng.random() < 0.7:  # found first, standing out
            own = min(0.999, lookalike[0] + rng.uniform(0.10, 0.25))
            products[row], scores[row] = np.r_[row, others[:-1]], np.r_[own, lookalike[:-1]]
        else:  # lost among the lookalikes
            products[row], scores[row] = np.r_[others[:3], row, others[3:-1]], np.r_[lookalike[:3], lookalike[3] - 0.001,
                                                                                        lookalike[3:-1]]
    return Rankings(truth, products, scores)


def test_same_product_needs_a_first_result_that_stands_out():
    calibration = match_calibration(rankings(), {})
    assert calibration["margin"] is not None and calibration["margin"] > 0.02, calibration
    assert calibration["false_same_rate"] <= SAME_PRODUCT_FALSE_RATE
    assert calibration["same_product_recall"] >= 0.8, calibration  # a score alone could not tell these apart

    # Held to fresh queries of the same kind: right at least 95 % of the times it is said, and rarely for a
    # product the catalog does not have (the same rankings without the query's own product).
    fresh = rankings(seed=1)
    said = right = out_said = 0
    for truth, products, scores in zip(fresh.truth, fresh.products, fresh.scores):
        label = match_of(float(scores[0]), calibration, margin=float(scores[0] - scores[1]), first=True)
        said += label == "same_product"
        right += label == "same_product" and products[0] == truth
        others = scores[products != truth]
        out_said += match_of(float(others[0]), calibration, margin=float(others[0] - others[1])) == "same_product"
    assert said and right / said >= SAME_PRODUCT_PRECISION - 0.02, (right, said)
    assert out_said / len(fresh.truth) <= 0.05


def crowded(seed: int = 0, queries: int = 400, depth: int = 20) -> tuple[Rankings, Verification]:
    """Rankings where scores tell nothing (the own product first for 60 % of the queries, but inside the
    crowd), and agreeing local features that do: many for most photos of the product shown first, a few
    for the lookalikes, now and then several (a lookalike sharing a logo)."""
    rng = np.random.default_rng(seed)
    truth = np.arange(queries, dtype=np.int64)
    products = np.zeros((queries, depth), dtype=np.int64)
    scores = np.zeros((queries, depth), dtype=np.float32)
    first, first_other = np.zeros(queries, dtype=np.int64), np.zeros(queries, dtype=np.int64)

    def lookalike_points() -> int:
        return int(rng.integers(6, 12)) if rng.random() < 0.01 else int(rng.integers(0, 4))

    for row in range(queries):
        others = rng.choice(np.setdiff1d(np.arange(queries + 50), [row]), size=depth, replace=False)
        scores[row] = np.sort(rng.uniform(0.70, 0.90, size=depth))[::-1]
        found = rng.random() < 0.6
        products[row] = np.r_[row, others[:-1]] if found else np.r_[others[:3], row, others[3:-1]]
        own = int(rng.integers(12, 80)) if rng.random() < 0.9 else int(rng.integers(0, 4))
        first[row] = own if found else lookalike_points()
        first_other[row] = lookalike_points()
    unaligned = np.full(queries, -1.0)
    return Rankings(truth, products, scores), Verification(first, first_other, unaligned, unaligned)


def test_agreeing_local_features_make_same_product_where_scores_cannot():
    rankings, points = crowded()
    by_score = match_calibration(rankings, {})
    assert by_score["same_product_recall"] < 0.2, by_score  # the scores alone label few: they cannot tell
    calibration = match_calibration(rankings, {}, points)
    assert calibration["verified_points"] is not None and calibration["same_product_recall"] >= 0.8, calibration

    fresh, fresh_points = crowded(seed=1)
    said = right = out_said = 0
    for row, (truth, products, scores) in enumerate(zip(fresh.truth, fresh.products, fresh.scores)):
        label = match_of(float(scores[0]), calibration, margin=float(scores[0] - scores[1]),
                         points=int(fresh_points.points[row]))
        said += label == "same_product"
        right += label == "same_product" and products[0] == truth
        others = scores[products != truth]
        out_said += match_of(float(others[0]), calibration, margin=float(others[0] - others[1]),
                             points=int(fresh_points.points_other[row])) == "same_product"
    assert said and right / said >= SAME_PRODUCT_PRECISION - 0.02, (right, said)
    assert out_said / len(fresh.truth) <= 0.05
    found = fresh.products[:, 0] == fresh.truth
    assert right / found.sum() >= 0.8


def test_only_the_first_result_can_be_the_same_product_once_a_margin_is_calibrated():
    calibration = {"same_product": 0.8, "margin": 0.05, "weak": 0.3}
    assert match_of(0.9, calibration, margin=0.1, first=True) == "same_product"
    assert match_of(0.9, calibration, margin=0.01, first=True) == "similar"  # a crowd of lookalikes
    assert match_of(0.9, calibration, margin=0.1, first=False) == "similar"
    assert match_of(0.2, calibration, margin=0.1, first=False) == "weak"
    assert match_of(0.9, {"same_product": 0.8, "weak": 0.3}) == "same_product"  # a calibration of scores only
    assert match_of(0.9, None) == "similar"


def test_agreeing_features_label_the_first_result_only():
    calibration = {"same_product": None, "margin": None, "verified_points": 10, "weak": 0.3}
    assert match_of(0.5, calibration, points=10) == "same_product"
    assert match_of(0.5, calibration, points=9) == "similar"
    assert match_of(0.5, calibration, points=40, first=False) == "similar"
    assert match_of(0.5, calibration) == "similar"  # not counted: the image could not be read


def flat_artwork(seed: int = 0, queries: int = 400, depth: int = 20) -> tuple[Rankings, Verification]:
    """The crowd again, of flat artwork this time: no local features agree for any photo, but the product
    aligned onto the photo correlates closely (0.93-1.0) for most photos of the product shown first, and
    less (0.5-0.9) for lookalikes, now and then as closely (a letter and its capital)."""
    rankings, _ = crowded(seed, queries, depth)
    rng = np.random.default_rng(seed + 100)
    found = rankings.products[:, 0] == rankings.truth

    def lookalike() -> float:
        return float(rng.uniform(0.94, 0.99)) if rng.random() < 0.01 else float(rng.uniform(0.5, 0.9))

    own = np.array([rng.uniform(0.93, 1.0) if rng.random() < 0.9 else rng.uniform(0.3, 0.8) for _ in found])
    correlation = np.where(found, own, [lookalike() for _ in found])
    correlation_other = np.array([lookalike() for _ in found])
    none = np.zeros(queries, dtype=np.int64)
    return rankings, Verification(none, none, correlation, correlation_other)


def test_an_aligned_product_makes_same_product_where_neither_scores_nor_local_features_can():
    rankings, checks = flat_artwork()
    calibration = match_calibration(rankings, {}, checks)
    assert calibration["aligned_correlation"] is not None and calibration["same_product_recall"] >= 0.8, calibration
    assert calibration["verified_points"] is None, "local features that agree nowhere are not asked for"

    fresh, fresh_checks = flat_artwork(seed=1)
    said = right = out_said = 0
    for row, (truth, products, scores) in enumerate(zip(fresh.truth, fresh.products, fresh.scores)):
        label = match_of(float(scores[0]), calibration, margin=float(scores[0] - scores[1]), points=0,
                         correlation=float(fresh_checks.correlation[row]))
        said += label == "same_product"
        right += label == "same_product" and products[0] == truth
        others = scores[products != truth]
        out_said += match_of(float(others[0]), calibration, margin=float(others[0] - others[1]), points=0,
                             correlation=float(fresh_checks.correlation_other[row])) == "same_product"
    assert said and right / said >= SAME_PRODUCT_PRECISION - 0.02, (right, said)
    assert out_said / len(fresh.truth) <= 0.05
    assert right / (fresh.products[:, 0] == fresh.truth).sum() >= 0.8


def test_a_correlation_that_adds_nothing_is_not_asked_for():
    rankings, points = crowded()
    assert match_calibration(rankings, {}, points)["aligned_correlation"] is None  # nothing aligned: -1 everywhere


def test_the_first_result_is_checked_only_while_nothing_has_decided():
    asked = []

    def points() -> int:
        asked.append("points")
        return 12

    def correlation() -> float:
        asked.append("correlation")
        return 0.99

    both = {"same_product": 0.8, "margin": 0.05, "verified_points": 10, "aligned_correlation": 0.95, "weak": 0.3}
    assert first_match(0.9, both, margin=0.1, points=points, correlation=correlation) == "same_product"
    assert asked == []  # the score and margin decided
    assert first_match(0.5, both, margin=0.0, points=points, correlation=correlation) == "same_product"
    assert asked == ["points"]  # the local features decided
    asked.clear()
    assert first_match(0.5, {**both, "verified_points": None}, margin=0.0, points=points,
                       correlation=correlation) == "same_product"
    assert asked == ["correlation"]
    asked.clear()
    assert first_match(0.5, None, margin=0.0, points=points, correlation=correlation) == "similar" and asked == []
    # An image that can no longer be read is not checked: the label rests on the score.
    assert first_match(0.5, both, margin=0.0, points=lambda: None, correlation=lambda: None) == "similar"


def test_an_aligned_product_labels_the_first_result_only():
    calibration = {"same_product": None, "margin": None, "verified_points": None, "aligned_correlation": 0.95,
                   "weak": 0.3}
    assert match_of(0.5, calibration, correlation=0.96) == "same_product"
    assert match_of(0.5, calibration, correlation=0.94) == "similar"
    assert match_of(0.5, calibration, correlation=0.99, first=False) == "similar"
