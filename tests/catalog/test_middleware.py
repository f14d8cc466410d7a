"""The request body limit (catalog/middleware.py), through the whole stack: an oversized or chunked body is
refused with a readable JSON error before anything reads it, and nothing is stored."""
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from catalog import services
from catalog.models import IngestJob, ProductImage
from tests.catalog.endpoints import api_operations

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)

UPLOADS = [("POST", "/api/products/1/images/"), ("POST", "/api/search/"), ("POST", "/api/ingest-jobs/")]


class UnreadableBody(io.RawIOBase):
    """A request body that fails the test as soon as anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer):
        raise AssertionError("the request body was read")


@pytest.fixture
def product():
    return services.product_create(sku="MUG-1", title="Mug")


def body_writes() -> list[tuple[str, str]]:
    return api_operations(1, methods=("post", "put", "patch"))


def test_the_upload_endpoints_are_among_the_writes_checked():
    assert set(UPLOADS) <= set(body_writes())


def test_a_body_over_the_cap_is_a_413_and_is_never_read(staff, product, settings):
    for method, path in body_writes():
        limit = settings.MAX_REQUEST_BYTES_BY_PATH.get(path, settings.MAX_REQUEST_BYTES)
        response = staff.generic(
            method, path, content_type="multipart/form-data; boundary=x",
            CONTENT_LENGTH=str(limit + 1), **{"wsgi.input": UnreadableBody()},
        )
        assert response.status_code == 413, (method, path, response.content)
        assert response["Content-Type"] == "application/json"
        assert "over the" in response.json()["error"] and "MB limit" in response.json()["error"], (method, path)


def test_a_chunked_body_is_refused_unread(staff, product):
    for method, path in body_writes():
        response = staff.generic(
            method, path, content_type="multipart/form-data; boundary=x",
            HTTP_TRANSFER_ENCODING="chunked", **{"wsgi.input": UnreadableBody()},
        )
        assert response.status_code == 411, (method, path, response.content)
        assert "Content-Length" in response.json()["error"], (method, path)


def test_real_uploads_over_the_cap_store_nothing(staff, anon, product, photo, settings, offline_model):
    image = photo("chelsea")
    settings.MAX_REQUEST_BYTES = len(image) // 2
    settings.MAX_REQUEST_BYTES_BY_PATH = {"/api/ingest-jobs/": len(image) // 2}

    upload = staff.post("/api/products/1/images/", {"image": SimpleUploadedFile("cat.jpg", image)}, format="multipart")
    assert upload.status_code == 413 and "limit" in upload.json()["error"]
    search = anon.post("/api/search/", {"image": SimpleUploadedFile("cat.jpg", image)}, format="multipart")
    assert search.status_code == 413 and "limit" in search.json()["error"]
    ingest = staff.post("/api/ingest-jobs/", {
        "manifest": SimpleUploadedFile("products.csv", b"sku,title,image\nCAT-1,Cat,cat.jpg\n"),
        "archive": SimpleUploadedFile("photos.zip", image),
    }, format="multipart")
    assert ingest.status_code == 413 and "limit" in ingest.json()["error"]
    assert ProductImage.objects.count() == 0 and IngestJob.objects.count() == 0
    assert not any(p.is_file() for p in settings.MEDIA_ROOT.rglob("*"))

    # Under the cap, the same upload goes through.
    settings.MAX_REQUEST_BYTES = 2 * len(image)
    accepted = staff.post("/api/products/1/images/", {"image": SimpleUploadedFile("cat.jpg", image)},
                          format="multipart")
    assert accepted.status_code == 201, accepted.content
