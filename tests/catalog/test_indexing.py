"""The index writer at work: updates as segments, compaction in the background, rebuilds in chunks."""
import hashlib

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

import ml.index
from catalog import indexing, search, services, serving
from catalog.models import ProductImage, embedding_to_bytes
from ml.index_store import index_directory, read_manifest
from tests.ml.index_data import catalog_vectors

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _offline_model(offline_model, isolated_data):
    pass


def stored_images(count: int, *, start: int = 0) -> list[ProductImage]:
    """Images already embedded by the configured model (synthetic vectors), as a large catalog holds them."""
    identity = serving.get_embedder().identity.key
    product = services.product_create(sku=f"BULK-{start}", title="bulk")
    vectors = catalog_vectors(count, 1280, seed=start)
    return ProductImage.objects.bulk_create([
        ProductImage(product=product, file=f"images/bulk/{start + i}.jpg", width=8, height=8,
                     sha256=hashlib.sha256(f"{start + i}".encode()).hexdigest(), status=ProductImage.Status.PENDING,
                     model_identity=identity, embedding=embedding_to_bytes(vector))
        for i, vector in enumerate(vectors)
    ])


def served() -> dict:
    """What the embedding task hands the index task: the model that made the vectors."""
    return serving.served_model(serving.get_embedder())


def directory():
    return index_directory(serving.settings.INDEX_DIR, serving.get_embedder().identity.key)


class ParameterCount:
    """The most parameters any one SQL statement took while the block ran."""

    def __init__(self):
        self.most = 0

    def __call__(self, execute, sql, params, many, context):
        if params is not None and not many:
            self.most = max(self.most, len(params))
        return execute(sql, params, many, context)


def test_updates_publish_small_segments_on_one_base(photo):
    cat = services.product_create(sku="CAT", title="cat")
    for name in ("chelsea", "coffee", "rocket"):
        services.product_image_add(product=cat, data=photo(name), filename=f"{name}.jpg")
    manifest = read_manifest(directory())
    assert manifest["generation"] == 1 and len(manifest["segments"]) == 3
    assert all(segment["size"] < 64 * 1024 for segment in manifest["segments"])
    assert sorted(search.index_reader().current().ids()) == sorted(cat.images.values_list("id", flat=True))


def test_a_large_overlay_is_compacted_into_a_new_base_by_the_compaction_task(monkeypatch):
    monkeypatch.setattr(ml.index, "COMPACT_MIN_VECTORS", 50)
    images = stored_images(120)
    ids = [image.pk for image in images]
    indexing.index_apply(add_ids=ids[:40], remove_ids=[], model=served())
    assert read_manifest(directory())["generation"] == 1
    indexing.index_apply(add_ids=ids[40:], remove_ids=[], model=served())  # past the threshold: compact_index runs (eager)
    manifest = read_manifest(directory())
    assert manifest["generation"] == 2 and manifest["segments"] == [] and manifest["base"]["count"] == 120
    assert sorted(search.index_reader().current().ids()) == sorted(ids)
    assert indexing.index_compact(identity=manifest["identity"])["compacted"] is False  # nothing left to fold


def test_reindex_streams_the_database_in_chunks_and_no_statement_names_every_image(monkeypatch, capsys):
    monkeypatch.setattr(indexing, "CHUNK_ROWS", 40)
    images = stored_images(300)
    counter = ParameterCount()
    with connection.execute_wrapper(counter):
        call_command("reindex")
    out = capsys.readouterr().out
    assert counter.most < 100, f"a statement took {counter.most} parameters for 300 images"
    assert "300 images published" in out and "peak memory of this process" in out and "search: exact search" in out
    assert "adding: 300/300 images" in out  # the progress bar's last line
    assert set(ProductImage.objects.values_list("status", flat=True)) == {"indexed"}
    assert sorted(search.index_reader().current().ids()) == sorted(image.pk for image in images)


def test_verify_repairs_in_batches(monkeypatch, capsys):
    monkeypatch.setattr(indexing, "REPAIR_BATCH", 25)
    images = stored_images(60)
    indexing.index_apply(add_ids=[image.pk for image in images[:10]], remove_ids=[], model=served())
    report = indexing.index_verify(repair=True)
    assert len(report["missing"]) == 50 and report["repaired"]
    assert len(read_manifest(directory())["segments"]) == 1 + 2  # one, then the repair in two batches
    assert sorted(search.index_reader().current().ids()) == sorted(image.pk for image in images)


def test_health_says_what_the_index_serves(anon, photo):
    assert anon.get("/api/health/").json()["index"] is None
    product = services.product_create(sku="CAT", title="cat")
    services.product_image_add(product=product, data=photo("chelsea"), filename="cat.jpg")
    index = anon.get("/api/health/").json()["index"]
    assert index["kind"] == "flat" and index["count"] == 1 and index["recall_at_10"] == 1.0
    assert index["note"] == "exact search over every vector" and index["exhaustive"] is False


def test_an_unusable_index_is_rebuilt_from_the_database_by_the_next_update(photo):
    product = services.product_create(sku="CAT", title="cat")
    first, _ = services.product_image_add(product=product, data=photo("chelsea"), filename="cat.jpg")
    manifest = read_manifest(directory())
    (directory() / manifest["base"]["files"]["codes"]["name"]).write_bytes(b"garbage")
    indexing._writers.clear()
    second, _ = services.product_image_add(product=product, data=photo("coffee"), filename="coffee.jpg")
    assert read_manifest(directory())["generation"] > manifest["generation"]
    assert sorted(search.index_reader().current().ids()) == sorted([first.pk, second.pk])
    assert np.isfinite(search.index_reader().current().search(np.ones((1, 1280), np.float32), 2)[0]).all()
