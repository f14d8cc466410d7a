import numpy as np
import pytest

from ml.index import VectorIndex
from ml.index_build import build_index, compact, measure_recall
from ml.index_store import save_index
from ml.index_terms import APPROXIMATE, FLAT, DuplicateIdError
from tests.ml.index_data import APPROX_DIM, DIM, IDENTITY, catalog_vectors, image_ids


@pytest.fixture
def flat():
    vectors = catalog_vectors(500, DIM)
    index = VectorIndex(IDENTITY, DIM)
    index.add(image_ids(500), vectors)
    return index, vectors


@pytest.fixture(scope="module")
def approximate_data():
    return image_ids(3000), catalog_vectors(3000, APPROX_DIM, seed=1)


@pytest.fixture(scope="module")
def approximate(approximate_data):
    ids, vectors = approximate_data
    return build_index(ids, vectors, IDENTITY, exact_threshold=1000)


# ----- contents and search ----------------------------------------------------------------


def test_nearest_vector_is_itself_with_cosine_one(flat):
    index, vectors = flat
    scores, ids = index.search(vectors[:20], 5)
    assert scores.shape == ids.shape == (20, 5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[:, 0], image_ids(500)[:20])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "best first"


def test_vectors_and_queries_are_normalised_defensively(flat):
    index, vectors = flat
    scores, ids = index.search(vectors[:5] * 40.0, 1)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    other = VectorIndex(IDENTITY, DIM)
    other.add(image_ids(5), vectors[:5] * 0.01)
    np.testing.assert_allclose(other.search(vectors[:5], 1)[0][:, 0], 1.0, atol=1e-5)


def test_len_ids_contains(flat):
    index, _ = flat
    assert len(index) == 500
    np.testing.assert_array_equal(np.sort(index.ids()), image_ids(500))
    assert index.contains(1000) and not index.contains(1001)


def test_fewer_vectors_than_k_pads_with_minus_one():
    index = VectorIndex(IDENTITY, DIM)
    scores, ids = index.search(catalog_vectors(2, DIM), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    index.add([5, 6], catalog_vectors(2, DIM))
    scores, ids = index.search(catalog_vectors(2, DIM), 3)
    assert sorted(ids[0, :2]) == [5, 6] and ids[0, 2] == -1 and np.isneginf(scores[0, 2])


def test_remove_takes_ids_out_of_results(flat):
    index, vectors = flat
    gone = image_ids(500)[:10]
    assert index.remove(np.concatenate([gone, [999_999]])) == 10
    assert index.remove(gone) == 0
    assert len(index) == 490 and not index.contains(int(gone[0]))
    _, ids = index.search(vectors[:10], 10)
    assert not np.isin(ids, gone).any()
    assert index.search(vectors[20:21], 1)[1][0, 0] == image_ids(500)[20], "remaining ids keep their vectors"


def test_upsert_replaces_a_vector_without_duplicating_its_id(flat):
    index, vectors = flat
    target = int(image_ids(500)[3])
    replacement = vectors[400] + 0.3 * vectors[7]
    index.upsert([target], replacement[None, :])
    assert len(index) == 500
    assert len(np.unique(index.ids())) == 500
    scores, ids = index.search(replacement[None, :], 1)
    assert ids[0, 0] == target and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    old_scores, old_ids = index.search(vectors[3:4], 500)
    assert (old_ids[0] == target).sum() == 1
    assert old_scores[0][old_ids[0] == target][0] < 0.99, "the old vector is gone"


def test_adding_an_existing_id_is_refused_and_changes_nothing(flat):
    index, vectors = flat
    with pytest.raises(DuplicateIdError, match="upsert"):
        index.add([int(image_ids(500)[0]), 5], vectors[:2])
    assert len(index) == 500 and not index.contains(5)
    with pytest.raises(DuplicateIdError, match="repeated"):
        index.add([5, 5], vectors[:2])
    assert not index.contains(5)


def test_wrong_dimension_is_refused_with_a_clear_error(flat):
    index, vectors = flat
    with pytest.raises(ValueError, match=f"dimension {DIM + 1}.*{DIM}-d"):
        index.add([1], np.ones((1, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, DIM - 1), np.float32), 3)
    with pytest.raises(ValueError, match="dimension"):
        index.upsert([int(image_ids(500)[0])], np.ones((1, DIM + 1), np.float32))
    assert len(index) == 500, "a refused upsert removes nothing"


def test_vectors_of_another_model_are_refused(flat):
    index, vectors = flat
    with pytest.raises(ValueError, match="own index"):
        index.add([1], vectors[:1], identity="efficientnet_lite0:deadbeef")


# ----- filtered search --------------------------------------------------------------------


def farthest_ids(ids, vectors, query, count):
    return ids[np.argsort(vectors @ query)[:count]]


@pytest.mark.parametrize("allowed_count", [15, 300])
def test_flat_filtered_search_returns_the_k_best_allowed(flat, allowed_count):
    index, vectors = flat
    ids = image_ids(500)
    query = vectors[0]
    allowed = farthest_ids(ids, vectors, query, allowed_count)  # all far from the query
    scores, found = index.search(query[None, :], 10, allow_ids=allowed)
    mask = np.isin(ids, allowed)
    expected = ids[mask][np.argsort(-(vectors[mask] @ query), kind="stable")[:10]]
    np.testing.assert_array_equal(np.sort(found[0]), np.sort(expected))


@pytest.mark.parametrize("path", ["scan", "probe"])
def test_approximate_filtered_search_returns_k_allowed_even_far_away(approximate, approximate_data, path):
    ids, vectors = approximate_data
    # A small allow-list is scanned exactly; a large one goes through the IVF lists.
    settings = approximate.base.settings
    settings.filter_scan_limit = 10_000 if path == "scan" else 0
    try:
        queries = vectors[:8]
        for query in queries:
            allowed = farthest_ids(ids, vectors, query, 40)  # none of them in the probed lists
            scores, found = approximate.search(query[None, :], 10, allow_ids=allowed)
            assert (found[0] >= 0).all(), "k results whenever k allowed vectors exist"
            assert np.isin(found[0], allowed).all() and len(set(found[0])) == 10
            mask = np.isin(ids, allowed)
            exact = ids[mask][np.argsort(-(vectors[mask] @ query))]
            assert len(np.intersect1d(found[0], exact[:10])) >= 8
    finally:
        settings.filter_scan_limit = type(settings)().filter_scan_limit


def test_filtered_search_with_fewer_allowed_than_k(flat):
    index, vectors = flat
    allowed = image_ids(500)[[4, 99, 123]]
    _, found = index.search(vectors[:2], 5, allow_ids=np.concatenate([allowed, [3]]))
    assert (np.sort(found[:, :3], axis=1) == np.sort(allowed)).all()
    assert (found[:, 3:] == -1).all()
    _, none = index.search(vectors[:1], 5, allow_ids=np.array([], dtype=np.int64))
    assert (none == -1).all()


# ----- approximate kind -------------------------------------------------------------------


def test_approximate_index_is_chosen_above_the_threshold_and_recalls(approximate, approximate_data, tmp_path):
    ids, vectors = approximate_data
    assert approximate.kind == APPROXIMATE
    assert approximate.recall_at_10 >= 0.9
    rng = np.random.default_rng(5)  # new photos: catalog vectors moved a little
    fresh_queries = vectors[rng.choice(3000, 100)] + 0.02 * rng.standard_normal((100, APPROX_DIM)).astype(np.float32)
    assert measure_recall(approximate, fresh_queries, 10, ids=ids, vectors=vectors) >= 0.9
    assert save_index(approximate, tmp_path)["base"]["quality"]["recall_at_10"] == approximate.recall_at_10
    assert build_index(ids[:900], vectors[:900], IDENTITY, exact_threshold=1000).kind == FLAT


def test_approximate_index_add_remove_upsert(approximate_data):
    ids, vectors = approximate_data
    index = build_index(ids[:2000], vectors[:2000], IDENTITY, kind="ivf")
    index.add(ids[2000:2100], vectors[2000:2100])
    assert index.search(vectors[2050:2051], 1)[1][0, 0] == ids[2050]
    with pytest.raises(DuplicateIdError):
        index.add(ids[:1], vectors[:1])
    assert index.remove(ids[:50]) == 50
    _, found = index.search(vectors[:50], 10)
    assert not np.isin(found, ids[:50]).any()
    index.upsert(ids[60:61], vectors[2500:2501])
    assert index.search(vectors[2500:2501], 1)[1][0, 0] == ids[60]
    assert len(index) == 2050 and len(np.unique(index.ids())) == 2050


def test_needs_compaction_when_a_flat_index_outgrows_its_threshold():
    index = VectorIndex(IDENTITY, DIM, exact_threshold=100)
    index.add(image_ids(100), catalog_vectors(100, DIM))
    assert not index.needs_compaction
    index.add([5], catalog_vectors(1, DIM, seed=3))
    assert index.needs_compaction
    base, done = compact(index)
    assert base.kind == FLAT and len(base) == 101 and "rebuilt" in done  # under 1,000 vectors: still exact


def test_compaction_folds_the_overlay_into_a_new_approximate_base(approximate_data):
    ids, vectors = approximate_data
    index = build_index(ids[:2500], vectors[:2500], IDENTITY, exact_threshold=1000)
    index.remove(ids[:100])
    index.upsert(ids[100:150], vectors[2900:2950])
    index.add(ids[2500:2600], vectors[2500:2600])
    before = index.search(vectors[2500:2520], 5)

    base, done = compact(index)

    assert done.startswith("merged") and base.trained_count == index.base.trained_count  # no retraining
    folded = VectorIndex(IDENTITY, APPROX_DIM, base=base, exact_threshold=1000)
    assert len(folded) == len(index) == 2500 and not folded.contains(int(ids[0]))
    np.testing.assert_array_equal(folded.ids(), index.ids())
    assert folded.search(vectors[2900:2901], 1)[1][0, 0] == ids[100], "the replaced vector moved with its id"
    np.testing.assert_array_equal(folded.search(vectors[2500:2520], 5)[1][:, 0], before[1][:, 0])


def test_compaction_retrains_when_the_new_vectors_drifted(approximate_data):
    ids, vectors = approximate_data
    index = build_index(ids[:1500], vectors[:1500], IDENTITY, exact_threshold=1000)
    elsewhere = catalog_vectors(400, APPROX_DIM, seed=77, clusters=5)  # another catalog's vectors
    index.add(image_ids(400, start=90_000), elsewhere)

    base, done = compact(index)

    assert done.startswith("built anew") and "farther from the list centres" in done
    assert base.trained_count == 1900


def test_an_approximate_base_that_misses_its_recall_target_scans_every_code_and_says_why():
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((4000, APPROX_DIM)).astype(np.float32)  # no structure for IVF lists to use
    index = build_index(image_ids(4000), noise, IDENTITY, exact_threshold=1000, target_recall=0.99)

    assert index.base.settings.exhaustive
    assert "exact search over every vector's" in index.base.quality.note and "under the 0.99 target" in index.base.quality.note
    assert index.recall_at_10 >= 0.9  # the codes' own ranking
    assert index.describe()["exhaustive"] is True
