import numpy as np
import pytest

from ml.categorizer import (
    CategoryHead,
    CategoryHeadError,
    Prediction,
    classification_metrics,
    holdout_split,
    train_category_head,
)

IDENTITY = "resnet50:1a2b3c4d5e6f"
DIM = 32
CATEGORIES = ["bags", "boots", "dresses", "hats", "lamps", "mugs"]


def catalog(products_per_category=30, photos=3, *, spread=2.6, seed=0):
    """Photos of products of overlapping categories: (vectors, labels, product ids).

    The categories are the same for every seed; the seed draws the products.
    """
    centres = np.random.default_rng(1234).standard_normal((len(CATEGORIES), DIM))
    rng = np.random.default_rng(seed)
    vectors, labels, groups = [], [], []
    for c, name in enumerate(CATEGORIES):
        for p in range(products_per_category):
            product = centres[c] + spread * rng.standard_normal(DIM)
            for _ in range(photos):
                vectors.append(product + 0.3 * rng.standard_normal(DIM))
                labels.append(name)
                groups.append(f"{name}-{p}")
    vectors = np.array(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels, groups


@pytest.fixture(scope="module")
def data():
    return catalog()


@pytest.fixture(scope="module")
def trained(data):
    vectors, labels, groups = data
    return train_category_head(vectors, labels, identity=IDENTITY, groups=groups, seed=0)


def test_metrics_of_a_constructed_case():
    categories = ["a", "b", "c", "d", "e", "f"]
    probabilities = np.array(
        [
            [0.50, 0.20, 0.10, 0.10, 0.06, 0.04],  # true a: top1 a
            [0.30, 0.40, 0.10, 0.10, 0.06, 0.04],  # true a: top1 b, a second
            [0.10, 0.60, 0.10, 0.10, 0.06, 0.04],  # true b: top1 b
            [0.60, 0.20, 0.05, 0.05, 0.06, 0.04],  # true c: top1 a, c ranked 5th of 6
            [0.50, 0.20, 0.10, 0.10, 0.06, 0.04],  # true f: f ranked last
        ]
    )
    metrics = classification_metrics(["a", "a", "b", "c", "f"], probabilities, categories)
    assert metrics["top1"] == pytest.approx(2 / 5)
    assert metrics["top5"] == pytest.approx(4 / 5)
    assert metrics["per_category"]["a"] == {"precision": pytest.approx(1 / 3), "recall": 0.5, "support": 2}
    assert metrics["per_category"]["b"] == {"precision": 0.5, "recall": 1.0, "support": 1}
    assert metrics["per_category"]["c"] == {"precision": None, "recall": 0.0, "support": 1}
    assert metrics["per_category"]["d"] == {"precision": None, "recall": None, "support": 0}
    assert metrics["confusion"]["labels"] == categories
    assert metrics["confusion"]["matrix"] == [
        [1, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
    ]


def test_training_reports_held_out_metrics(trained, data):
    vectors, labels, _ = data
    metrics = trained.metrics
    assert metrics["n_train"] + metrics["n_test"] == len(labels)
    assert 0.15 <= metrics["n_test"] / len(labels) <= 0.25
    assert 0.65 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["top1"] < 0.95, "a case hard enough for the metrics to mean something"
    assert metrics["confusion"]["labels"] == CATEGORIES == trained.head.categories
    matrix = np.array(metrics["confusion"]["matrix"])
    assert matrix.sum() == metrics["n_test"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["top1"])
    assert sum(m["support"] for m in metrics["per_category"].values()) == metrics["n_test"]
    assert metrics["untested_categories"] == []


def test_held_out_split_keeps_each_product_on_one_side(data):
    _, labels, groups = data
    labels = labels + ["umbrellas"] * 2
    groups = groups + ["umbrella-0"] * 2  # a category with one product cannot be held out
    train, test = holdout_split(labels, groups=groups, holdout=0.2, seed=3)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    train_groups = {groups[i] for i in train}
    test_groups = {groups[i] for i in test}
    assert not train_groups & test_groups
    assert {labels[i] for i in test} == set(CATEGORIES), "every category that can be tested is"
    assert {i for i in range(len(labels)) if labels[i] == "umbrellas"} <= set(train.tolist())
    for category in CATEGORIES:
        held = sum(1 for g in test_groups if g.startswith(category))
        assert held == 6, "20% of 30 products per category"


def test_single_product_category_is_trained_but_untested(data):
    vectors, labels, groups = data
    extra = vectors[:2] + 0.5
    result = train_category_head(
        np.vstack([vectors, extra]), labels + ["umbrellas"] * 2, identity=IDENTITY, groups=groups + ["u"] * 2
    )
    assert result.metrics["untested_categories"] == ["umbrellas"]
    assert "umbrellas" in result.head.categories


def test_no_worse_than_sklearn_logistic_regression_on_the_same_splits():
    from sklearn.linear_model import LogisticRegression

    ours, baseline = [], []
    for seed in range(4):  # one split is a few dozen products: compare over several
        vectors, labels, groups = catalog(products_per_category=40, spread=(2.0, 2.6)[seed % 2], seed=seed)
        ours.append(train_category_head(vectors, labels, identity=IDENTITY, groups=groups, seed=seed).metrics["top1"])
        train, test = holdout_split(labels, groups=groups, holdout=0.2, seed=seed)  # the split training used
        model = LogisticRegression(max_iter=2000).fit(vectors[train], np.array(labels)[train])
        baseline.append(model.score(vectors[test], np.array(labels)[test]))
    assert np.mean(ours) >= np.mean(baseline) - 0.01


def test_predictions_are_ranked_probabilities(trained, data):
    vectors, labels, _ = data
    head = trained.head
    np.testing.assert_allclose(head.probabilities(vectors[:50]).sum(axis=1), 1.0, atol=1e-5)
    predictions = head.predict(vectors[:50], k=3)
    assert len(predictions) == 50 and all(isinstance(p, Prediction) for p in predictions)
    for prediction in predictions:
        scores = [score for _, score in prediction.choices]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert prediction.category == prediction.choices[0][0] and prediction.probability == scores[0]
    everything = head.predict(vectors, k=1)
    assert np.mean([p.category == label for p, label in zip(everything, labels)]) > 0.7, "chance is 1/6"
    assert len(head.predict_one(vectors[0], k=10).choices) == len(CATEGORIES)


def test_unsure_predictions_are_the_ones_more_often_wrong(trained):
    vectors, labels, _ = catalog(seed=7)  # new products
    head = trained.head
    predictions = head.predict(vectors)
    assert all(p.unsure == (p.probability < head.unsure_threshold) for p in predictions)
    right = np.array([p.category == label for p, label in zip(predictions, labels)])
    unsure = np.array([p.unsure for p in predictions])
    assert 0.05 < unsure.mean() < 0.5
    assert right[~unsure].mean() > right[unsure].mean() + 0.25
    assert all(p.unsure for p in head.predict(vectors[:20], unsure_threshold=1.01))
    assert not any(p.unsure for p in head.predict(vectors[:20], unsure_threshold=0.0))


def test_probabilities_are_calibrated_on_held_out_products():
    vectors, labels, groups = catalog(products_per_category=60, seed=4)
    train, test = holdout_split(labels, groups=groups, holdout=0.3, seed=1)
    head = train_category_head(
        vectors[train], [labels[i] for i in train], identity=IDENTITY, groups=[groups[i] for i in train]
    ).head
    predictions = head.predict(vectors[test])
    confidence = np.mean([p.probability for p in predictions])
    accuracy = np.mean([p.category == labels[i] for p, i in zip(predictions, test)])
    assert 0.3 < accuracy < 0.97, "the case must be neither trivial nor hopeless"
    assert abs(confidence - accuracy) < 0.08


def test_save_and_load_round_trip(trained, data, tmp_path):
    vectors, _, _ = data
    path = tmp_path / "head.npz"
    version = trained.head.save(path)
    loaded = CategoryHead.load(path, expected_identity=IDENTITY)
    assert loaded.version == version == trained.head.version
    assert loaded.categories == CATEGORIES and loaded.dim == DIM and loaded.identity == IDENTITY
    np.testing.assert_array_equal(loaded.probabilities(vectors), trained.head.probabilities(vectors))
    assert loaded.predict(vectors[:10]) == trained.head.predict(vectors[:10])
    assert [p.name for p in tmp_path.iterdir()] == ["head.npz"], "no temporary file left behind"


def test_head_of_another_model_is_refused(trained, tmp_path):
    path = tmp_path / "head.npz"
    trained.head.save(path)
    with pytest.raises(CategoryHeadError, match="efficientnet_lite0:0011.*retrain"):
        CategoryHead.load(path, expected_identity="efficientnet_lite0:0011")


def test_corrupt_head_is_refused(trained, tmp_path):
    path = tmp_path / "head.npz"
    trained.head.save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CategoryHeadError, match="unreadable|does not match"):
        CategoryHead.load(path)
    with pytest.raises(CategoryHeadError, match="no category head"):
        CategoryHead.load(tmp_path / "missing.npz")


def test_vectors_of_the_wrong_dimension_are_refused(trained):
    with pytest.raises(ValueError, match=f"shape \\(n, {DIM}\\)"):
        trained.head.predict(np.ones((2, DIM + 1), np.float32))


def test_training_input_errors_are_explained(data):
    vectors, labels, _ = data
    with pytest.raises(ValueError, match="two categories"):
        train_category_head(vectors[:10], ["bags"] * 10, identity=IDENTITY)
    with pytest.raises(ValueError, match="one label"):
        train_category_head(vectors[:10], labels[:9], identity=IDENTITY)
