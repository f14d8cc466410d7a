import numpy as np
import pytest

from ml import category_audit
from ml.categorizer import fit_category_head, train_category_head

IDENTITY = "efficientnet_lite0:000000000000"
CATEGORIES = ["bags", "boots", "hats", "mugs"]


def catalog(products_per_category=12, photos=2, dim=24, seed=0):
    """(vectors, labels, product ids): photos of products around one centre per category."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(CATEGORIES), dim)) * 2
    vectors, labels, products = [], [], []
    for c, name in enumerate(CATEGORIES):
        for p in range(products_per_category):
            product = centres[c] + rng.standard_normal(dim)
            for _ in range(photos):
                vectors.append(product + 0.2 * rng.standard_normal(dim))
                labels.append(name)
                products.append(c * 1000 + p)
    return np.array(vectors, dtype=np.float32), labels, products


@pytest.fixture(scope="module")
def mislabelled():
    """The catalog with one product of mugs given the category hats, and the head trained on it."""
    vectors, labels, products = catalog()
    wrong = 3 * 1000 + 5
    labels = ["hats" if p == wrong else label for p, label in zip(products, labels)]
    result = train_category_head(vectors, labels, identity=IDENTITY, groups=products)
    return vectors, labels, products, wrong, result


def test_fit_category_head_uses_the_given_settings_and_the_labels_present():
    vectors, labels, _ = catalog()
    head = fit_category_head(vectors, labels, identity=IDENTITY, l2=0.1, temperature=2.0)
    assert head.categories == CATEGORIES and head.temperature == 2.0 and head.identity == IDENTITY
    assert [p.category for p in head.predict(vectors)] == labels
    sharper = fit_category_head(vectors, labels, identity=IDENTITY, l2=0.1, temperature=1.0)
    assert sharper.probabilities(vectors).max(axis=1).mean() > head.probabilities(vectors).max(axis=1).mean()
    with pytest.raises(ValueError, match="two categories"):
        fit_category_head(vectors[:3], labels[:3], identity=IDENTITY, l2=0.1, temperature=1.0)


def test_the_check_heads_flag_a_mislabelled_product(mislabelled):
    vectors, labels, products, wrong, result = mislabelled
    head = result.head
    check_heads = category_audit.fit_check_heads(
        vectors, labels, products, identity=IDENTITY, l2=result.metrics["l2"], temperature=result.metrics["temperature"]
    )
    assert len(check_heads) == category_audit.FOLDS and all(h is not None for h in check_heads)
    probabilities = category_audit.cross_fitted_probabilities(check_heads, vectors, products, head.categories)
    ids, per_product = category_audit.mean_per_group(probabilities, products)
    own = {p: row[head.categories.index(labels[products.index(p)])] for p, row in zip(ids, per_product)}
    assert own[wrong] < category_audit.UNLIKELY_THRESHOLD
    assert [p for p, value in own.items() if value < category_audit.UNLIKELY_THRESHOLD] == [wrong]


def test_cross_fitted_probabilities_leave_unjudged_what_a_fold_never_saw():
    vectors, labels, products = catalog(products_per_category=3, photos=1)
    only = products[labels.index("boots")]  # boots has three products; keep one, in one fold
    keep = [i for i, (p, label) in enumerate(zip(products, labels)) if label != "boots" or p == only]
    vectors, labels, products = vectors[keep], [labels[i] for i in keep], [products[i] for i in keep]
    heads = category_audit.fit_check_heads(vectors, labels, products, identity=IDENTITY, l2=0.1, temperature=1.0)
    probabilities = category_audit.cross_fitted_probabilities(heads, vectors, products, CATEGORIES)
    row = products.index(only)
    assert np.isnan(probabilities[row, CATEGORIES.index("boots")])  # its fold's head never saw a boot
    assert np.nansum(probabilities[row]) == pytest.approx(1.0, abs=1e-5)

    heads[category_audit.fold_of(only)] = None
    probabilities = category_audit.cross_fitted_probabilities(heads, vectors, products, CATEGORIES)
    assert np.isnan(probabilities[row]).all()


def test_mean_per_group_and_threshold_table():
    groups, means = category_audit.mean_per_group(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), ["b", "a", "b"])
    assert groups == ["b", "a"]
    assert means.tolist() == [[0.75, 0.25], [0.0, 1.0]]

    table = category_audit.threshold_table([0.95, 0.85, 0.85, 0.6], [True, True, False, False], thresholds=(0.5, 0.8, 0.9, 0.99))
    assert table == [
        {"threshold": 0.5, "count": 4, "coverage": 1.0, "precision": 0.5},
        {"threshold": 0.8, "count": 3, "coverage": 0.75, "precision": pytest.approx(2 / 3)},
        {"threshold": 0.9, "count": 1, "coverage": 0.25, "precision": 1.0},
        {"threshold": 0.99, "count": 0, "coverage": 0.0, "precision": None},
    ]
