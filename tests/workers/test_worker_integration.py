"""Real Celery worker processes against this machine's Redis and PostgreSQL (scripts/test, pass 2).

Each test starts `celery worker` subprocesses on the pytest database and a shared data directory,
and takes images through upload, embedding, indexing and search."""

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from catalog import pipeline, search, services
from catalog.models import ProductImage
from tests.workers.live import crops, indexed_count, published_ids, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("services_only")]

def test_upload_to_search_through_a_real_worker(workers, staff, photo):
    workers.start("w1")
    uploaded = {}
    for name in ("chelsea", "coffee", "rocket"):
        product = staff.post("/api/products/", {"sku": name, "title": name}, format="json").json()
        response = staff.post(f"/api/products/{product['id']}/images/",
                              {"image": SimpleUploadedFile(f"{name}.jpg", photo(name))}, format="multipart")
        assert response.status_code == 201 and response.json()["status"] == "pending"
        uploaded[name] = response.json()["id"]
    wait_until(lambda: indexed_count() == 3, 120, "3 images indexed", workers)
    cat = ProductImage.objects.get(pk=uploaded["chelsea"])
    assert search.similar_products(cat.vector(), k=3)[0].product.sku == "chelsea"
    assert sorted(published_ids()) == sorted(uploaded.values())


def test_a_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(workers, photo):
    ids = []
    for i, data in enumerate(crops(photo, 200)):
        product = services.product_create(sku=f"K-{i:03d}", title=f"crop {i}")
        image, _ = services.product_image_add(product=product, data=data, queue=False)
        ids.append(image.pk)
    pipeline.images_queue_embedding(image_ids=ids)

    first = workers.start("w1")
    wait_until(lambda: indexed_count() >= 40, 180, "the first batches indexed", workers)
    workers.kill(first)  # SIGKILL, mid-batch: its unacknowledged task goes back to the queue
    assert indexed_count() < 200
    workers.start("w2")
    wait_until(lambda: indexed_count() == 200, 300, "all 200 images indexed", workers)

    published = published_ids()
    assert len(published) == 200 and sorted(published) == sorted(ids)  # none lost, no duplicate vector
    vectors = np.stack([ProductImage.objects.get(pk=pk).vector() for pk in ids[:5]])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
