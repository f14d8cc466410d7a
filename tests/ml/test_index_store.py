"""Publishing and following an index: bases, delta segments, the manifest, crashes at every step."""
import json
import os
import signal
import warnings

import numpy as np
import pytest

import ml.files
import ml.index_base
import ml.index_store
from ml.index import VectorIndex
from ml.index_build import build_index, compact
from ml.index_store import IndexReader, IndexWriter, load_index, read_manifest, save_index
from ml.index_terms import APPROXIMATE, FLAT, IndexFileError
from tests.ml.index_data import APPROX_DIM, DIM, IDENTITY, catalog_vectors, image_ids


@pytest.fixture
def flat():
    vectors = catalog_vectors(500, DIM)
    index = VectorIndex(IDENTITY, DIM)
    index.add(image_ids(500), vectors)
    return index, vectors


def base_file(directory, part="codes"):
    return directory / read_manifest(directory)["base"]["files"][part]["name"]


def rewrite_manifest(directory, **changes):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, **changes}))


# ----- full publishes ---------------------------------------------------------------------


def test_save_and_load_round_trip_flat(flat, tmp_path):
    index, vectors = flat
    manifest = save_index(index, tmp_path)
    assert manifest["version"] == 1 and manifest["base"]["count"] == 500 and manifest["identity"] == IDENTITY
    assert manifest["base"]["kind"] == FLAT and manifest["segments"] == []
    for part in manifest["base"]["files"].values():
        assert (tmp_path / part["name"]).stat().st_size == part["size"]
    loaded = load_index(tmp_path, expected_identity=IDENTITY)
    assert loaded.version == 1 and len(loaded) == 500
    for a, b in zip(index.search(vectors[:30], 10), loaded.search(vectors[:30], 10)):
        np.testing.assert_array_equal(a, b)


def test_a_loaded_approximate_base_maps_its_files_rather_than_copying_them(tmp_path):
    """Searching processes on one host share one copy of the index: every file of the base, the candidate
    stage's lists included, is a file mapping of the process, not a private copy of it."""
    vectors = catalog_vectors(3000, APPROX_DIM, seed=1)
    save_index(build_index(image_ids(3000), vectors, IDENTITY, exact_threshold=1000), tmp_path)
    loaded = load_index(tmp_path)
    loaded.search(vectors[:5], 10)
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line}
    for part in ("ids", "codes", "candidates"):
        assert str(base_file(tmp_path, part)) in mapped, f"the base's {part} file is copied into the process"


def test_save_and_load_round_trip_approximate(tmp_path):
    vectors = catalog_vectors(3000, APPROX_DIM, seed=1)
    approximate = build_index(image_ids(3000), vectors, IDENTITY, exact_threshold=1000)
    save_index(approximate, tmp_path)
    loaded = load_index(tmp_path)
    assert loaded.kind == APPROXIMATE and loaded.base.settings == approximate.base.settings
    for allow in (None, approximate.ids()[::3]):
        expected = approximate.search(vectors[:30], 10, allow_ids=allow)
        for a, b in zip(expected, loaded.search(vectors[:30], 10, allow_ids=allow)):
            np.testing.assert_array_equal(a, b)


def test_corrupt_file_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    path = base_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=r"corrupt \(sha256 mismatch\).*manage.py reindex"):
        load_index(tmp_path)


def test_readers_check_a_base_by_size_but_leave_hashing_it_to_the_writer(flat, tmp_path, monkeypatch):
    """Searching processes do not read a whole base again to hash it (gigabytes per compaction at 1M); a
    truncated base is still refused by a reader, and a corrupt one by the writer."""
    save_index(flat[0], tmp_path)
    hashed = []
    real = ml.index_base.file_sha256
    monkeypatch.setattr(ml.index_base, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert len(IndexReader(tmp_path, check_interval=0).current()) == 500 and hashed == []
    path = base_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="corrupt"):
        IndexWriter(tmp_path, IDENTITY, DIM).current()
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(IndexFileError, match="truncated"):
        IndexReader(tmp_path, check_interval=0).current()


def test_truncated_file_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    path = base_file(tmp_path)
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(tmp_path)


def test_unreadable_file_matching_its_manifest_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    path = base_file(tmp_path)
    path.write_bytes(b"not an index at all")
    manifest = read_manifest(tmp_path)
    manifest["base"]["files"]["codes"].update(size=path.stat().st_size, sha256=ml.files.file_sha256(path))
    rewrite_manifest(tmp_path, base=manifest["base"])
    with pytest.raises(IndexFileError, match="corrupt"):
        load_index(tmp_path)


def test_identity_mismatch_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    with pytest.raises(IndexFileError, match="efficientnet_lite0:0011"):
        load_index(tmp_path, expected_identity="efficientnet_lite0:0011")


def test_dimension_mismatch_is_refused(flat, tmp_path):
    save_index(flat[0], tmp_path)
    rewrite_manifest(tmp_path, dimension=2048)
    with pytest.raises(IndexFileError, match="dimension 64, but the manifest says 500 of dimension 2048"):
        load_index(tmp_path)


def test_a_manifest_of_an_older_format_asks_for_a_rebuild(flat, tmp_path):
    save_index(flat[0], tmp_path)
    rewrite_manifest(tmp_path, format=1)
    with pytest.raises(IndexFileError, match="not one this version understands.*manage.py reindex"):
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


def test_generations_increase_and_unreferenced_files_go_after_their_grace_period(flat, tmp_path):
    index, _ = flat
    generations = [save_index(index, tmp_path, grace_seconds=3600)["generation"] for _ in range(3)]
    assert generations == [1, 2, 3]
    assert len(list(tmp_path.glob("base-*.codes.faiss"))) == 3  # still within their grace period
    save_index(index, tmp_path, grace_seconds=0)
    assert sorted(p.name for p in tmp_path.glob("base-*")) == ["base-00000004.codes.faiss", "base-00000004.ids.npy"]


def test_a_failed_write_publishes_nothing_and_leaves_no_temporary_file(flat, tmp_path, monkeypatch):
    index, vectors = flat
    save_index(index, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ml.index_base.faiss, "write_index", fail)
    index.remove(image_ids(500)[:1])
    with pytest.raises(OSError, match="No space"):
        save_index(index, tmp_path)
    assert read_manifest(tmp_path)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("base-00000002")) == names
    assert not list(tmp_path.glob(".*.tmp"))


# ----- updates as segments ------------------------------------------------------------------


def test_an_update_writes_one_small_segment_and_readers_apply_it_without_reloading_the_base(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    reader = IndexReader(tmp_path, expected_identity=IDENTITY, check_interval=0)
    first = reader.current()
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("base-*")}

    new = catalog_vectors(32, DIM, seed=4)
    manifest = writer.apply(add_ids=image_ids(32, start=90_000), vectors=new, remove_ids=image_ids(500)[:3])

    segment = tmp_path / manifest["segments"][-1]["file"]
    assert segment.stat().st_size < 32 * DIM * 4 + 1024 and manifest["generation"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("base-*")} == before, "the base is untouched"
    second = reader.current()
    assert second is not first and second.base is first.base, "the base object is shared, not reloaded"
    assert len(second) == 529 and second.contains(90_000) and not second.contains(int(image_ids(500)[0]))
    assert second.search(new[:1], 1)[1][0, 0] == 90_000
    assert len(first) == 500 and first.contains(int(image_ids(500)[0])), "searches in flight keep their state"


def test_segments_replace_and_remove_in_order(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    target = int(image_ids(500)[7])
    writer.apply(add_ids=[target], vectors=vectors[300:301], remove_ids=[])
    writer.apply(add_ids=[], vectors=np.zeros((0, DIM), np.float32), remove_ids=[target])
    writer.apply(add_ids=[target], vectors=vectors[400:401], remove_ids=[])
    loaded = load_index(tmp_path)
    assert len(loaded) == 500 and len(np.unique(loaded.ids())) == 500
    scores, found = loaded.search(vectors[400:401], 2)  # image 400 itself, and the target now alike
    assert target in found[0] and scores[0, list(found[0]).index(target)] == pytest.approx(1.0, abs=1e-5)
    assert (loaded.search(vectors[7:8], 500)[1][0] == target).sum() == 1


def test_the_first_update_of_an_empty_directory_publishes_a_base_to_stand_on(tmp_path):
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    writer.apply(add_ids=[5, 6], vectors=catalog_vectors(2, DIM), remove_ids=[])
    loaded = load_index(tmp_path)
    assert sorted(loaded.ids()) == [5, 6] and len(loaded.base) == 0


def test_a_compaction_swaps_in_a_base_and_keeps_the_segments_written_meanwhile(tmp_path):
    vectors = catalog_vectors(3000, APPROX_DIM, seed=1)
    ids = image_ids(3000)
    save_index(build_index(ids[:2000], vectors[:2000], IDENTITY, exact_threshold=1000), tmp_path)
    writer = IndexWriter(tmp_path, IDENTITY, APPROX_DIM, exact_threshold=1000)
    writer.apply(add_ids=ids[2000:2500], vectors=vectors[2000:2500], remove_ids=ids[:100])
    reader = IndexReader(tmp_path, check_interval=0)
    assert len(reader.current()) == 2400

    def build_while_updates_go_on(snapshot):
        other = IndexWriter(tmp_path, IDENTITY, APPROX_DIM, exact_threshold=1000)  # the index worker, meanwhile
        other.apply(add_ids=ids[2500:2600], vectors=vectors[2500:2600], remove_ids=ids[100:110])
        return compact(snapshot)[0]

    manifest = writer.replace_base(build_while_updates_go_on, grace_seconds=0)

    assert manifest["generation"] == 2 and len(manifest["segments"]) == 1, "the later segment is kept"
    assert manifest["base"]["count"] == 2400
    current = reader.current()
    assert len(current) == 2490 and current.contains(int(ids[2550])) and not current.contains(int(ids[105]))
    assert current.search(vectors[2550:2551], 1)[1][0, 0] == ids[2550]
    assert not (tmp_path / "base-00000001.codes.faiss").exists(), "the old generation is pruned"


def test_reader_keeps_serving_when_a_new_segment_is_corrupt(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    reader = IndexReader(tmp_path, check_interval=0)
    assert reader.current().version == 1
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    manifest = writer.apply(add_ids=[77], vectors=vectors[:1], remove_ids=[])
    segment = tmp_path / manifest["segments"][-1]["file"]
    segment.write_bytes(segment.read_bytes()[:-10] + b"0123456789")
    assert reader.current().version == 1
    writer.index = None  # the writer reads its own directory again
    with pytest.raises(IndexFileError, match="corrupt"):
        writer.current()


def test_reader_without_any_index_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexFileError, match="manage.py reindex"):
        IndexReader(tmp_path).current()


# ----- kill -9 between every pair of steps --------------------------------------------------


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def in_a_killed_child(work) -> None:
    """Run ``work`` in a forked process, which must die by SIGKILL (as kill -9 or a power cut would)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() from a process with threads
        pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(3)  # reached only if the crash did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def dying_inside_writes(after_bytes: int = 4096):
    """Make every file write die half-way once it has written ``after_bytes``."""
    write = ml.files._HashingWriter.write

    def write_then_die(self, data):
        if self.size + len(data) > after_bytes:
            write(self, data[: max(0, after_bytes - self.size)])
            die()
        return write(self, data)

    ml.files._HashingWriter.write = write_then_die


def dying_before_rename(suffix: str):
    replace = os.replace

    def replace_or_die(src, dst):
        if str(dst).endswith(suffix):
            die()
        return replace(src, dst)

    os.replace = replace_or_die


UPDATE_STEPS = ["mid-segment", "before-segment-rename", "segment written", "mid-manifest", "before-manifest-rename"]
SWAP_STEPS = ["base built", "mid-base", "before-base-rename", "base written", "before-manifest-rename"]


def arm(step: str, writer: IndexWriter) -> None:
    if step in ("segment written", "base built", "base written"):
        writer.on_step = lambda name: die() if name == step else None
    elif step.startswith("mid-"):
        dying_inside_writes()
    else:
        dying_before_rename({"before-segment-rename": ".vsd", "before-base-rename": ".faiss",
                             "before-manifest-rename": "manifest.json"}[step])


@pytest.mark.parametrize("step", UPDATE_STEPS)
def test_a_writer_killed_at_any_step_of_an_update_leaves_a_readable_index_and_the_retry_publishes(
    flat, tmp_path, step
):
    index, vectors = flat
    save_index(index, tmp_path)
    IndexWriter(tmp_path, IDENTITY, DIM).apply(add_ids=[11], vectors=vectors[:1], remove_ids=[])
    before = load_index(tmp_path).search(vectors[:10], 5)
    new = catalog_vectors(32, DIM, seed=9)

    def update():
        writer = IndexWriter(tmp_path, IDENTITY, DIM)
        arm(step, writer)
        writer.apply(add_ids=image_ids(32, start=50_000), vectors=new, remove_ids=[11])

    in_a_killed_child(update)

    assert read_manifest(tmp_path)["version"] == 2, "nothing half-published"
    for a, b in zip(before, load_index(tmp_path).search(vectors[:10], 5)):
        np.testing.assert_array_equal(a, b)
    IndexWriter(tmp_path, IDENTITY, DIM).apply(add_ids=image_ids(32, start=50_000), vectors=new, remove_ids=[11])
    after = load_index(tmp_path)
    assert after.contains(50_000) and not after.contains(11) and len(after) == 532


@pytest.mark.parametrize("step", SWAP_STEPS)
def test_a_writer_killed_at_any_step_of_a_compaction_leaves_a_readable_index_and_the_retry_swaps(
    flat, tmp_path, step
):
    index, vectors = flat
    save_index(index, tmp_path)
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    writer.apply(add_ids=image_ids(40, start=50_000), vectors=catalog_vectors(40, DIM, seed=2),
                 remove_ids=image_ids(500)[:5])
    expected = sorted(load_index(tmp_path).ids())

    def compaction():
        dying = IndexWriter(tmp_path, IDENTITY, DIM)
        arm(step, dying)
        dying.replace_base(lambda snapshot: compact(snapshot)[0])

    in_a_killed_child(compaction)

    manifest = read_manifest(tmp_path)
    assert manifest["generation"] == 1 and len(manifest["segments"]) == 1
    assert sorted(load_index(tmp_path).ids()) == expected
    manifest = IndexWriter(tmp_path, IDENTITY, DIM).replace_base(lambda snapshot: compact(snapshot)[0])
    assert manifest["generation"] >= 2 and manifest["segments"] == []  # past any file the crashed one wrote
    assert sorted(load_index(tmp_path).ids()) == expected


def test_a_busy_reader_keeps_its_base_and_new_updates_while_the_compacted_base_opens(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    writer.apply(add_ids=[90_001], vectors=catalog_vectors(1, DIM, seed=5), remove_ids=[])
    reader = IndexReader(tmp_path, check_interval=0)
    held = reader.current()
    writer.replace_base(lambda snapshot: compact(snapshot)[0])
    writer.apply(add_ids=[90_002], vectors=catalog_vectors(1, DIM, seed=6), remove_ids=[])

    during = reader.current()  # already past the compaction's snapshot: no gap, so no wait
    assert during.base is held.base and during.contains(90_002) and during.contains(90_001)
    reader._loading.join(timeout=60)
    after = reader.current()
    assert after.generation == 2 and after.base is not held.base
    assert after.contains(90_002) and after.contains(90_001) and len(after) == 502


def test_threads_asking_while_the_first_version_loads_wait_for_it(flat, tmp_path, monkeypatch):
    import threading
    import time

    index, vectors = flat
    save_index(index, tmp_path)
    reader = IndexReader(tmp_path, check_interval=60)
    slow_load = ml.index_store.load_index

    def slowly(*args, **kwargs):
        time.sleep(0.5)
        return slow_load(*args, **kwargs)

    monkeypatch.setattr(ml.index_store, "load_index", slowly)
    first = threading.Thread(target=reader.current)
    first.start()
    time.sleep(0.1)  # the first thread is loading
    assert len(reader.current()) == 500  # a second thread waits instead of finding nothing
    first.join()


def test_a_busy_reader_opens_the_compacted_base_even_when_no_update_follows_it(flat, tmp_path):
    index, vectors = flat
    save_index(index, tmp_path)
    writer = IndexWriter(tmp_path, IDENTITY, DIM)
    writer.apply(add_ids=[90_001], vectors=catalog_vectors(1, DIM, seed=5), remove_ids=[])
    reader = IndexReader(tmp_path, check_interval=0)
    held = reader.current()
    writer.replace_base(lambda snapshot: compact(snapshot)[0])
    reader.current()
    reader._loading.join(timeout=60)
    after = reader.current()
    assert after.base is not held.base and after.generation == 2 and len(after.overlay) == 0
    assert after.contains(90_001) and len(after) == 501
