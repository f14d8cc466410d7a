"""The pipeline on the embedded default: tasks run in-process, the index lives in a temp directory.

The model is the offline EfficientNet-Lite0 with its real ImageNet weights (fast on 2 cores)."""
import errno
import os

import numpy as np
import pytest
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.db import OperationalError

import ml.segments
from catalog import indexing, pipeline, process_cache, search, services, serving
from catalog.models import ProductImage
from ml.index_store import index_directory, load_index, save_index
from workers.tasks import embed_images

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _offline_model(offline_model, isolated_data):
    pass


def add_product(sku, photo_bytes, category=None):
    product = services.product_create(sku=sku, title=sku, price="10.00", category=category)
    image, _ = services.product_image_add(product=product, data=photo_bytes, filename=f"{sku}.jpg")
    image.refresh_from_db()
    return product, image


def published_ids() -> set[int]:
    active = serving.active_index()
    index = load_index(index_directory(settings.INDEX_DIR, active["identity"]))
    ids = [int(i) for i in index.ids()]
    assert len(ids) == len(set(ids)), "duplicate vectors in the index"
    return set(ids)


def test_upload_ends_indexed_labelled_and_searchable(photo):
    _, cat = add_product("CAT", photo("chelsea"))
    _, coffee = add_product("COFFEE", photo("coffee"))
    _, rocket = add_product("ROCKET", photo("rocket"))
    for image in (cat, coffee, rocket):
        assert image.status == ProductImage.Status.INDEXED, image.error
        assert image.model_identity.startswith("efficientnet_lite0:")
        vector = image.vector()
        assert vector.shape == (1280,) and abs(np.linalg.norm(vector) - 1) < 1e-3
    assert any("cat" in label["label"] for label in cat.labels[:3]), cat.labels
    assert published_ids() == {cat.pk, coffee.pk, rocket.pk}

    hits = search.similar_products(cat.vector(), k=3)
    assert [hit.product.sku for hit in hits][0] == "CAT"
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert len(hits) == 3


def test_embedding_twice_leaves_the_same_state(photo):
    _, image = add_product("CAT", photo("chelsea"))
    before = bytes(image.embedding)
    result = pipeline.images_embed(image_ids=[image.pk])
    assert result == {"embedded": 0, "already": 1, "failed": 0}
    indexing.index_apply(add_ids=[image.pk], remove_ids=[])
    indexing.index_apply(add_ids=[image.pk], remove_ids=[])
    image.refresh_from_db()
    assert bytes(image.embedding) == before and image.status == "indexed"
    assert published_ids() == {image.pk}


def test_a_stored_file_that_no_longer_decodes_ends_failed_with_the_reason(photo):
    _, image = add_product("CAT", photo("chelsea"))
    ProductImage.objects.filter(pk=image.pk).update(embedding=None, model_identity="", status="pending")
    with default_storage.open(image.file.name, "wb") as f:
        f.write(photo("chelsea")[:2000])  # truncated on disk after the upload was accepted
    pipeline.images_embed(image_ids=[image.pk])
    image.refresh_from_db()
    assert image.status == "failed"
    assert "truncated" in image.error


def test_deleting_a_product_or_an_image_removes_its_vectors(photo, staff):
    product, cat = add_product("CAT", photo("chelsea"))
    _, coffee = add_product("COFFEE", photo("coffee"))
    extra, _ = services.product_image_add(product=product, data=photo("chelsea", size=(200, 150)))
    assert published_ids() == {cat.pk, coffee.pk, extra.pk}
    services.product_image_delete(image=ProductImage.objects.get(pk=extra.pk))
    assert published_ids() == {cat.pk, coffee.pk}
    services.product_delete(product=product)
    assert published_ids() == {coffee.pk}
    assert [hit.product.sku for hit in search.similar_products(cat.vector(), k=5)] == ["COFFEE"]


def test_a_publish_refused_by_a_full_disk_keeps_the_last_version_and_its_retry_publishes(photo, monkeypatch):
    _, cat = add_product("CAT", photo("chelsea"))
    _, coffee = add_product("COFFEE", photo("coffee"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(ml.segments, "atomic_write", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            indexing.index_apply(add_ids=[], remove_ids=[cat.pk])  # the image was deleted
    assert published_ids() == {cat.pk, coffee.pk}  # the published version still serves, whole
    indexing.index_apply(add_ids=[], remove_ids=[cat.pk])  # the task's retry, once there is space again
    assert published_ids() == {coffee.pk}


def test_retries_spent_in_a_database_outage_leave_the_images_to_the_sweep(photo, settings):
    _, cat = add_product("CAT", photo("chelsea"))
    ProductImage.objects.filter(pk=cat.pk).update(status="processing")
    settings.CELERY_TASK_ALWAYS_EAGER = False  # as on a worker, where beat runs the sweep
    embed_images.on_failure(OperationalError("connection refused"), "task-id", (), {"image_ids": [cat.pk]}, None)
    cat.refresh_from_db()
    assert (cat.status, cat.error) == ("processing", "")
    embed_images.on_failure(RuntimeError("the model crashed"), "task-id", (), {"image_ids": [cat.pk]}, None)
    cat.refresh_from_db()
    assert cat.status == "failed" and "the model crashed" in cat.error


def test_a_new_version_is_searchable_without_a_restart(photo):
    _, cat = add_product("CAT", photo("chelsea"))
    reader = search.index_reader()
    first = reader.current()
    _, coffee = add_product("COFFEE", photo("coffee"))
    reader.refresh()
    assert reader.current() is not first
    assert coffee.pk in {int(i) for i in reader.current().ids()}
    assert first.version < reader.current().version
    assert cat.pk in {int(i) for i in first.ids()}  # the old object still serves searches in flight


def test_reindex_rebuilds_from_the_database(photo, isolated_data):
    _, cat = add_product("CAT", photo("chelsea"))
    _, coffee = add_product("COFFEE", photo("coffee"))
    directory = index_directory(isolated_data / "index", serving.active_index()["identity"])
    for path in directory.iterdir():
        path.unlink()
    process_cache.clear_all()
    call_command("reindex")
    assert published_ids() == {cat.pk, coffee.pk}


def test_reindex_verify_reports_and_repairs(photo, capsys):
    _, cat = add_product("CAT", photo("chelsea"))
    _, coffee = add_product("COFFEE", photo("coffee"))
    identity = serving.active_index()["identity"]
    directory = index_directory(settings.INDEX_DIR, identity)
    damaged = load_index(directory)
    damaged.remove(np.array([coffee.pk]))
    damaged.add(np.array([999_999]), cat.vector().reshape(1, -1))
    save_index(damaged, directory)

    call_command("reindex", "--verify", "--dry-run")
    out = capsys.readouterr().out
    assert f"missing from the index: 1 [{coffee.pk}]" in out
    assert "index entries with no image: 1 [999999]" in out
    assert published_ids() == {cat.pk, 999_999}

    call_command("reindex", "--verify")
    assert "repaired" in capsys.readouterr().out
    assert published_ids() == {cat.pk, coffee.pk}


def test_switching_the_model_keeps_serving_the_old_index_until_the_new_one_is_complete(photo, settings):
    _, cat = add_product("CAT", photo("chelsea"))
    _, coffee = add_product("COFFEE", photo("coffee"))
    old = serving.active_index()["identity"]

    settings.EMBED_WEIGHTS = "random"  # another model identity, same backbone
    settings.EMBED_FALLBACK = False
    new = serving.get_embedder().identity.key
    assert new != old
    pipeline.images_embed(image_ids=[cat.pk])  # half the catalog re-embedded
    assert serving.active_index()["identity"] == old
    assert search.similar_products(coffee.vector(), k=1)  # still serving the old vectors

    pipeline.images_reembed_for_current_model()  # the rest (eager: runs now)
    active = serving.active_index()
    assert active["identity"] == new and active["weights"] == "random"
    assert published_ids() == {cat.pk, coffee.pk}
    assert set(ProductImage.objects.values_list("model_identity", flat=True)) == {new}


def test_the_index_writer_switches_search_to_a_model_without_loading_it(photo, settings, monkeypatch):
    _, cat = add_product("CAT", photo("chelsea"))
    served = serving.active_index()
    (settings.INDEX_DIR / serving.ACTIVE_FILE).unlink()  # as before any model was served
    ProductImage.objects.filter(pk=cat.pk).update(status="processing")  # embedded, not indexed yet
    monkeypatch.setattr(indexing, "get_embedder", lambda spec=None: pytest.fail("the index writer loaded a model"))
    model = {key: served[key] for key in ("identity", "backbone", "weights")}

    # A leftover batch of a model configured before is indexed but never served.
    indexing.index_apply(add_ids=[cat.pk], remove_ids=[], model={**model, "configured": ["resnet50", "random"]})
    assert serving.active_index() is None

    ProductImage.objects.filter(pk=cat.pk).update(status="processing")
    indexing.index_apply(
        add_ids=[cat.pk], remove_ids=[], model={**model, "configured": [settings.EMBED_BACKBONE, settings.EMBED_WEIGHTS]}
    )
    active = serving.active_index()
    assert {key: active[key] for key in model} == model


def test_stale_pending_images_are_queued_again(photo, settings):
    _, cat = add_product("CAT", photo("chelsea"))
    ProductImage.objects.filter(pk=cat.pk).update(
        status="pending", embedding=None, model_identity="", updated_at="2000-01-01T00:00:00Z"
    )
    assert pipeline.images_requeue_stale() == {"requeued": 1}
    cat.refresh_from_db()
    assert cat.status == "indexed"
