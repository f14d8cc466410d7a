import hashlib
import json
import os
import signal
import warnings

import numpy as np
import pytest

import ml.files
import ml.index_store
from ml.index import APPROXIMATE, FLAT, DuplicateIdError, IndexFileError, VectorIndex
from ml.index_build import build_index, measure_recall
from ml.index_store import IndexReader, load_index, read_manifest, save_index

IDENTITY = "resnet50:1a2b3c4d5e6f"
DIM = 64
APPROX_DIM = 384  # above the 256-d candidate space, so the PCA stage is exercised


def catalog_vectors(n, dim, *, seed=0, clusters=30, photos_per_product=3):
    """Photos of products in categories: a low-rank clustered structure, like real embeddings."""
    rng = np.random.default_rng(seed)
    latent = 48
    projection = rng.standard_normal((latent, dim)) / np.sqrt(latent)
    categories = rng.standard_normal((clusters, latent))
    n_products = max(1, n // photos_per_product)
    products = categories[rng.integers(clusters, size=n_products)] + 0.6 * rng.standard_normal((n_products, latent))
    z = products[np.arange(n) % n_products] + 0.25 * rng.standard_normal((n, latent))
    x = z @ projection + 0.05 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def image_ids(n, start=1000):
    return np.arange(start, start + 7 * n, 7, dtype=np.int64)  # like database ids: not positions


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
    approximate.filter_scan_limit = 10_000 if path == "scan" else 0
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
        approximate.filter_scan_limit = VectorIndex(IDENTITY, APPROX_DIM).filter_scan_limit


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
    assert save_index(approximate, tmp_path)["recall_at_10"] == approximate.recall_at_10
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


def test_needs_rebuild_when_a_flat_index_outgrows_its_threshold():
    index = VectorIndex(IDENTITY, DIM, exact_threshold=100)
    index.add(image_ids(100), catalog_vectors(100, DIM))
    assert not index.needs_rebuild
    index.add([5], catalog_vectors(1, DIM, seed=3))
    assert index.needs_rebuild


# ----- persistence ------------------------------------------------------------------------


def test_save_and_load_round_trip_flat(flat, tmp_path):
    index, vectors = flat
    manifest = save_index(index, tmp_path)
    assert manifest["version"] == 1 and manifest["count"] == 500 and manifest["identity"] == IDENTITY
    assert manifest["kind"] == FLAT and manifest["recall_at_10"] is None
    assert (tmp_path / manifest["file"]).stat().st_size == manifest["size"]
    loaded = load_index(tmp_path, expected_identity=IDENTITY)
    assert loaded.version == 1 and len(loaded) == 500
    for a, b in zip(index.search(vectors[:30], 10), loaded.search(vectors[:30], 10)):
        np.testing.assert_array_equal(a, b)


def test_save_and_load_round_trip_approximate(approximate, approximate_data, tmp_path):
    _, vectors = approximate_data
    save_index(approximate, tmp_path)
    loaded = load_index(tmp_path)
    assert loaded.kind == APPROXIMATE and loaded.nprobe == approximate.nprobe
    for allow in (None, approximate.ids()[::3]):
        expected = approximate.search(vectors[:30], 10, allow_ids=allow)
        for a, b in zip(expected, loaded.search(vectors[:30], 10, allow_ids=allow)):
            np.testing.assert_array_equal(a, b)


def published_file(directory):
    return directory / read_manifest(directory)["file"]


def test_corrupt_file_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    path = published_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=r"corrupt \(sha256 mismatch\).*manage.py reindex"):
        load_index(tmp_path)


def test_truncated_file_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    path = published_file(tmp_path)
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(tmp_path)


def test_unreadable_file_matching_its_manifest_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    path = published_file(tmp_path)
    path.write_bytes(b"not an index at all")
    rewrite_manifest(tmp_path, size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(IndexFileError, match="corrupt"):
        load_index(tmp_path)


def rewrite_manifest(directory, **changes):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, **changes}))


def test_identity_mismatch_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    with pytest.raises(IndexFileError, match="efficientnet_lite0:0011"):
        load_index(tmp_path, expected_identity="efficientnet_lite0:0011")
    rewrite_manifest(tmp_path, identity="efficientnet_lite0:0011")
    with pytest.raises(IndexFileError, match="does not match"):
        load_index(tmp_path, expected_identity="efficientnet_lite0:0011")


def test_dimension_mismatch_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    rewrite_manifest(tmp_path, dimension=2048)
    with pytest.raises(IndexFileError, match="dimension is 64 in the file and 2048 in the manifest"):
        load_index(tmp_path)


def test_manifest_naming_another_version_is_refused(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    first = read_manifest(tmp_path)
    index.remove(image_ids(500)[:5])
    save_index(index, tmp_path)
    rewrite_manifest(tmp_path, file=first["file"], sha256=first["sha256"], size=first["size"])
    with pytest.raises(IndexFileError, match="does not match .*manifest.json: count is 500 in the file and 495"):
        load_index(tmp_path)


def test_missing_index_has_an_actionable_error(tmp_path):
    with pytest.raises(IndexFileError, match="no index has been published.*manage.py reindex"):
        load_index(tmp_path)


def test_one_directory_holds_one_model_identity(flat, tmp_path):
    save_index(flat[0], tmp_path)
    other = VectorIndex("efficientnet_lite0:0011", DIM)
    with pytest.raises(IndexFileError, match="own index directory"):
        save_index(other, tmp_path)
    assert read_manifest(tmp_path)["identity"] == IDENTITY


def test_versions_increase_and_only_the_last_two_are_kept(flat, tmp_path):
    index, _ = flat
    versions = [save_index(index, tmp_path, grace_seconds=0)["version"] for _ in range(4)]
    assert versions == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("index-*")) == ["index-00000003.vsi", "index-00000004.vsi"]


def test_old_versions_survive_their_grace_period(flat, tmp_path):
    index, _ = flat
    for _ in range(3):
        save_index(index, tmp_path, grace_seconds=3600)
    assert len(list(tmp_path.glob("index-*.vsi"))) == 3


def test_a_failed_write_publishes_nothing_and_leaves_no_temporary_file(flat, tmp_path, monkeypatch):
    index, vectors = flat
    save_index(index, tmp_path)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ml.index_store.faiss, "write_index", fail)
    index.remove(image_ids(500)[:1])
    with pytest.raises(OSError, match="No space"):
        save_index(index, tmp_path)
    assert read_manifest(tmp_path)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "index-00000001.vsi", "manifest.json"]


def arm_crash(point):
    """In a forked writer: die by SIGKILL at ``point`` of publishing, as a power cut would."""

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-write":
        write = ml.files._HashingWriter.write

        def write_then_die(self, data):
            if self.size > 4096:
                write(self, data[: len(data) // 2])
                die()
            return write(self, data)

        ml.files._HashingWriter.write = write_then_die
    else:
        replace = os.replace
        target = ".vsi" if point == "before-rename" else "manifest.json"

        def replace_or_die(src, dst):
            if str(dst).endswith(target):
                die()
            return replace(src, dst)

        os.replace = replace_or_die


@pytest.mark.parametrize("point", ["mid-write", "before-rename", "before-manifest"])
def test_a_writer_killed_while_publishing_leaves_the_previous_version(flat, tmp_path, point):
    index, vectors = flat
    save_index(index, tmp_path)
    before = index.search(vectors[:10], 5)
    replacement = VectorIndex(IDENTITY, DIM)
    replacement.add(image_ids(300, start=50_000), catalog_vectors(300, DIM, seed=9))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() from a process with threads
        pid = os.fork()
    if pid == 0:
        try:
            arm_crash(point)
            save_index(replacement, tmp_path)
        finally:
            os._exit(3)  # reached only if the crash did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    manifest = read_manifest(tmp_path)
    assert manifest["version"] == 1 and manifest["file"] == "index-00000001.vsi"
    loaded = load_index(tmp_path)
    for a, b in zip(before, loaded.search(vectors[:10], 5)):
        np.testing.assert_array_equal(a, b)

    assert save_index(replacement, tmp_path)["version"] >= 2  # the next publish goes through
    assert load_index(tmp_path).contains(50_000)


# ----- reading published versions ---------------------------------------------------------


def test_reader_picks_up_a_new_version_and_keeps_the_old_object_usable(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    reader = IndexReader(tmp_path, expected_identity=IDENTITY, check_interval=0)
    first = reader.current()
    assert first.version == 1 and reader.current() is first, "no reload without a new version"

    index.upsert(image_ids(1, start=77), vectors[:1])
    save_index(index, tmp_path)
    second = reader.current()
    assert second.version == 2 and second.contains(77)
    assert not first.contains(77) and first.search(vectors[:1], 1)[1][0, 0] == image_ids(500)[0]


def test_reader_keeps_serving_when_a_new_version_is_corrupt(flat, tmp_path):
    index, _ = flat
    save_index(index, tmp_path)
    reader = IndexReader(tmp_path, check_interval=0)
    assert reader.current().version == 1
    save_index(index, tmp_path)
    path = published_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    assert reader.current().version == 1
    save_index(index, tmp_path)
    assert reader.current().version == 3


def test_reader_without_any_index_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexFileError, match="manage.py reindex"):
        IndexReader(tmp_path).current()
