"""Real Celery worker processes against this machine's Redis and PostgreSQL (scripts/test, pass 2).

Each test starts `celery worker` subprocesses on the pytest database and a shared data directory,
and takes images through upload, embedding, indexing and search."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection

from catalog import pipeline, search, services
from catalog.models import ProductImage
from ml.index import VectorIndex, index_directory
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
               "--save", "", "--appendonly", "no"]


@pytest.fixture(autouse=True)
def services_only():
    if connection.vendor != "postgresql" or not os.environ.get("CELERY_BROKER_URL", "").startswith("redis"):
        pytest.fail("worker tests need DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (Redis): run scripts/test")


@pytest.fixture
def data_dir(settings, isolated_data):
    settings.EMBED_BACKBONE = "efficientnet_lite0"
    settings.EMBED_WEIGHTS = "imagenet"
    settings.STALE_IMAGE_SECONDS = 3
    subprocess.run(["redis-cli", "-u", os.environ["CELERY_BROKER_URL"], "flushdb"], check=True, capture_output=True)
    return isolated_data


class Workers:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen] = []
        db = connection.settings_dict
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "VISUALSEARCH_DATA_DIR": str(data_dir),
            "VISUALSEARCH_BACKBONE": "efficientnet_lite0",
            "VISUALSEARCH_WEIGHTS": "imagenet",
            "VISUALSEARCH_VISIBILITY_TIMEOUT": "8",
            "VISUALSEARCH_STALE_IMAGE_SECONDS": "3",
            "VISUALSEARCH_SWEEP_SECONDS": "2",
            "VISUALSEARCH_EMBED_BATCH": "16",
        }

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.data_dir / f"worker-{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "visualsearch", "worker", "-B", "-Q", "embed,index,default",
             "-c", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
             "-s", str(self.data_dir / f"beat-{name}")],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.data_dir.glob("worker-*.log")))


@pytest.fixture
def workers(data_dir):
    pool = Workers(data_dir)
    yield pool
    pool.stop_all()


def wait_until(predicate, timeout: float, what: str, workers: Workers | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{workers.logs() if workers else ''}")


def indexed_count() -> int:
    return ProductImage.objects.filter(status="indexed").count()


def published_ids() -> list[int]:
    active = pipeline.active_index()
    index = VectorIndex.load(index_directory(pipeline.settings.INDEX_DIR, active["identity"]))
    return [int(i) for i in index.ids()]


def crops(photo, n: int) -> list[bytes]:
    """n distinct real-photo images: crops of scikit-image photos at different offsets."""
    import io

    from PIL import Image

    out = []
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    for i in range(n):
        img = Image.open(io.BytesIO(photo(names[i % 4], fmt="PNG")))
        x, y = (i * 7) % 60, (i * 13) % 40
        buf = io.BytesIO()
        img.crop((x, y, x + 224, y + 224)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


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


def test_redis_down_gives_503_and_loses_nothing_accepted(workers, staff, photo):
    workers.start("w1")
    product = staff.post("/api/products/", {"sku": "R-1", "title": "outage"}, format="json").json()
    images = crops(photo, 12)
    accepted = []
    for data in images[:8]:
        response = staff.post(f"/api/products/{product['id']}/images/",
                              {"image": SimpleUploadedFile("a.jpg", data)}, format="multipart")
        assert response.status_code == 201
        accepted.append(response.json()["id"])
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    try:
        wait_until(lambda: subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True).returncode != 0,
                   10, "Redis to stop")
        refused = staff.post(f"/api/products/{product['id']}/images/",
                             {"image": SimpleUploadedFile("b.jpg", images[9])}, format="multipart")
        assert refused.status_code == 503
        assert "queue is unavailable" in refused.json()["error"] and refused["Retry-After"]
        assert ProductImage.objects.filter(product_id=product["id"]).count() == len(accepted)
    finally:
        subprocess.run(REDIS_START, check=True, capture_output=True)
    wait_until(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).stdout.strip() == b"PONG",
               10, "Redis to restart")
    # Redis kept nothing (no persistence): the stale-image sweep re-queues what the outage dropped.
    wait_until(lambda: indexed_count() == len(accepted), 240, "every accepted image indexed", workers)
    assert sorted(published_ids()) == sorted(accepted)
