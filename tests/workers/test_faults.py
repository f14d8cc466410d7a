"""Dependencies failing under a running service (scripts/test, pass 2): Redis restarted, PostgreSQL
restarted, the index's disk full. Each test runs the web app under gunicorn or the in-process API with
real Celery workers, breaks one dependency of its own (a private Redis, a private PostgreSQL cluster, a
small tmpfs), and asserts what a client sees while it is down and that every accepted image ends
indexed afterwards, with no manual repair."""
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.authtoken.models import Token

from catalog import serving
from catalog.api.errors import DATABASE_UNAVAILABLE
from catalog.models import ProductImage
from ml.index_store import index_directory, read_manifest
from tests.conftest import REPO_ROOT
from tests.workers.live import (
    PrivatePostgres,
    PrivateRedis,
    crops,
    indexed_count,
    published_ids,
    wait_until,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("services_only")]

RETRY_LINE = "retry: Retry in"


@pytest.fixture
def private_redis(data_dir):
    redis = PrivateRedis(data_dir)
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def private_postgres():
    postgres = PrivatePostgres()
    try:
        postgres.start()
        postgres.create_database("visualsearch")
        yield postgres
    finally:
        postgres.destroy()


@pytest.fixture
def small_index_disk(data_dir):
    """The index directory on a 1 MiB tmpfs of its own, so that it fills up for real (ENOSPC)."""
    mount_point = data_dir / "index"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.fail(f"the full-disk test mounts a tmpfs and needs root: {mounted.stderr.strip()}")
    yield mount_point
    if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)  # a process still holds a file there


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses another byte; returns its path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    return filler


class Client:
    """A staff client of a served app, over HTTP."""

    def __init__(self, base: str, token: str):
        self.base = base
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def get(self, path: str) -> requests.Response:
        return self.session.get(self.base + path, timeout=30)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.session.post(self.base + path, timeout=30, **kwargs)

    def product(self, sku: str) -> int:
        response = self.post("/api/products/", json={"sku": sku, "title": sku})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def upload(self, product_id: int, data: bytes) -> requests.Response:
        return self.post(f"/api/products/{product_id}/images/", files={"image": ("photo.jpg", data, "image/jpeg")})

    def statuses(self, product_ids: list[int]) -> dict[int, str]:
        out = {}
        for pk in product_ids:
            response = self.get(f"/api/products/{pk}/")
            assert response.status_code == 200, response.text
            out.update({image["id"]: image["status"] for image in response.json()["images"]})
        return out


def upload_alternating(client: Client, products: list[int], images: list[bytes]) -> list[int]:
    accepted = []
    for i, data in enumerate(images):
        response = client.upload(products[i % len(products)], data)
        assert response.status_code == 201, response.text
        accepted.append(response.json()["id"])
    return accepted


def test_a_redis_restart_loses_queued_tasks_but_no_accepted_image(private_redis, workers, staff_user, photo):
    workers.env["CELERY_BROKER_URL"] = private_redis.url  # the app's and the workers' broker and cache
    client = Client(workers.serve(), Token.objects.create(user=staff_user).key)
    products = [client.product("RR-A"), client.product("RR-B")]
    images = crops(photo, 22)
    accepted = upload_alternating(client, products, images[:20])  # 20 embedding tasks queued in Redis

    worker = workers.start("w1")
    wait_until(lambda: indexed_count() >= 3, 90, "the first images indexed", workers)
    private_redis.stop()  # nothing on disk: the tasks still queued are gone
    assert indexed_count() < len(accepted), "the restart should find work still queued"

    # While Redis is down: uploads are refused with a clear 503 and store nothing; search keeps serving.
    refused = client.upload(products[0], images[20])
    assert refused.status_code == 503, refused.text
    assert "queue is unavailable" in refused.json()["error"] and refused.headers["Retry-After"]
    assert ProductImage.objects.count() == len(accepted)
    health = client.get("/api/health/")
    assert health.status_code == 503 and health.json()["checks"] == {"database": "ok", "queue": "unavailable"}
    found = client.post("/api/search/", json={"product": products[0], "k": 5})
    assert found.status_code == 200, found.text
    assert [hit["product"]["id"] for hit in found.json()["results"]] == [products[1]]

    private_redis.start()  # the same address, empty
    # No repair: the sweep queues again every image the lost tasks held.
    wait_until(lambda: indexed_count() == len(accepted), 60, "every accepted image indexed", workers)
    assert worker.poll() is None, "the worker should reconnect, not die"
    assert sorted(published_ids()) == sorted(accepted)
    assert client.get("/api/health/").status_code == 200

    # The app reconnected to the broker without a restart.
    late = client.upload(products[1], images[21])
    assert late.status_code == 201, late.text
    wait_until(lambda: indexed_count() == len(accepted) + 1, 30, "the upload after the restart indexed", workers)


def test_a_postgres_restart_gives_clear_503s_and_loses_no_accepted_image(private_postgres, workers, photo):
    workers.env["DATABASE_URL"] = private_postgres.url("visualsearch")
    env = {**workers.env, "DJANGO_SUPERUSER_PASSWORD": "faults-pass-123"}
    for command in (["migrate", "-v0"], ["createsuperuser", "--noinput", "--username", "ops", "--email", "ops@x.org"]):
        done = subprocess.run([sys.executable, "manage.py", *command], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    api = workers.serve()
    token = requests.post(f"{api}/api/auth/token/", json={"username": "ops", "password": "faults-pass-123"}, timeout=30)
    client = Client(api, token.json()["token"])
    products = [client.product("PG-A"), client.product("PG-B")]
    images = crops(photo, 18)
    accepted = upload_alternating(client, products, images[:16])

    def indexed() -> int:
        return list(client.statuses(products).values()).count("indexed")

    worker = workers.start("w1")
    wait_until(lambda: indexed() >= 3, 90, "the first images indexed", workers)
    private_postgres.stop()  # fast shutdown: every session ends, as in a restart

    # While PostgreSQL is down: every API request gets a 503 saying so, as JSON, not a 500.
    down = [
        client.get("/api/products/"),
        client.upload(products[0], images[16]),
        client.post("/api/search/", json={"product": products[0]}),
        requests.post(f"{api}/api/search/", json={"product": products[0]}, timeout=30),  # anonymous
    ]
    for response in down:
        assert response.status_code == 503, response.text
        assert response.json() == {"error": DATABASE_UNAVAILABLE} and response.headers["Retry-After"]
    health = client.get("/api/health/")
    assert health.status_code == 503 and health.json()["checks"] == {"database": "unavailable", "queue": "ok"}
    assert "database is unavailable" in health.json()["error"]

    private_postgres.start()
    assert client.get("/api/products/").status_code == 200  # the first request after it is back
    wait_until(lambda: indexed() == len(accepted), 60, "every accepted image indexed", workers)
    assert worker.poll() is None, "the worker should reconnect, not die"
    worker_log = (workers.data_dir / "worker-w1.log").read_text()
    assert any("_images[" in line and RETRY_LINE in line for line in worker_log.splitlines()), \
        "an embedding or indexing task should have been retried during the outage"
    statuses = client.statuses(products)
    assert sorted(statuses) == sorted(accepted)  # the upload refused while down stored nothing
    assert sorted(published_ids()) == sorted(accepted)

    # Restarted again with no request in between: the app's idle connections are checked, not used dead.
    private_postgres.stop()
    private_postgres.start()
    for _ in range(8):  # more requests than the app has threads, each holding a connection
        response = client.get("/api/products/")
        assert response.status_code == 200, response.text
    late = client.upload(products[1], images[17])
    assert late.status_code == 201, late.text
    wait_until(lambda: indexed() == len(accepted) + 1, 30, "the upload after the restart indexed", workers)


def test_a_full_index_disk_keeps_the_published_index_and_recovers_when_space_is_freed(
    small_index_disk, workers, staff, photo
):
    worker = workers.start("w1")
    product = staff.post("/api/products/", {"sku": "DF-1", "title": "full disk"}, format="json").json()
    images = crops(photo, 6)

    def upload(data: bytes) -> int:
        response = staff.post(f"/api/products/{product['id']}/images/",
                              {"image": SimpleUploadedFile("a.jpg", data)}, format="multipart")
        assert response.status_code == 201, response.content
        return response.json()["id"]

    first = [upload(data) for data in images[:3]]
    wait_until(lambda: indexed_count() == 3, 90, "the first images indexed", workers)
    directory = index_directory(small_index_disk, serving.active_index()["identity"])
    published = read_manifest(directory)

    filler = fill(small_index_disk)
    more = [upload(data) for data in images[3:]]  # media lives elsewhere: uploads are still accepted
    worker_log = workers.data_dir / "worker-w1.log"

    def publish_refused() -> bool:
        return any("index_images[" in line and RETRY_LINE in line and "No space left on device" in line
                   for line in worker_log.read_text().splitlines())

    wait_until(publish_refused, 60, "the index task to fail on the full disk and retry", workers)
    # The published version is untouched and still serves searches.
    assert read_manifest(directory) == published
    assert sorted(published_ids()) == sorted(first)
    found = staff.post("/api/search/", {"product": product["id"], "k": 5}, format="json")
    assert found.status_code == 200, found.content
    assert set(ProductImage.objects.filter(pk__in=more).values_list("status", flat=True)) <= {"pending", "processing"}

    filler.unlink()
    # No repair: the task's retries (or the sweep, once they are spent) publish the waiting images.
    wait_until(lambda: indexed_count() == 6, 90, "every image indexed once space is freed", workers)
    assert worker.poll() is None
    assert sorted(published_ids()) == sorted(first + more)
    assert read_manifest(directory)["version"] > published["version"]
    assert not list(directory.glob(".*.tmp")), "a failed write left a temporary file behind"
