"""Who may write: staff only, on every write the API has (listed from the URL configuration), and a session's
writes only with its CSRF token. A refused write changes nothing."""
import io
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from catalog import services
from catalog.models import CategorizerVersion, Category, IngestJob, Product, ProductImage
from tests.catalog.endpoints import PUBLIC_WRITES, api_operations

pytestmark = [pytest.mark.django_db(transaction=True, reset_sequences=True), pytest.mark.services]


@pytest.fixture
def catalog(photo):
    """Id 1 of every kind of object an API path names."""
    category = services.category_create(name="Food")
    product = services.product_create(sku="MUG-1", title="Mug", category=category)
    services.product_image_add(product=product, data=photo("coffee", size=(64, 64)), filename="mug.jpg", queue=False)


def state(media_root) -> dict:
    files = sorted(str(p.relative_to(media_root)) for p in media_root.rglob("*") if p.is_file())
    rows = {
        model.__name__: sorted(model.objects.values_list()) for model in
        (Category, Product, ProductImage, IngestJob, CategorizerVersion)
    }
    return {"rows": rows, "files": files}


def body(path: str, photo) -> tuple[dict, str]:
    """A body each write would accept from staff, so only who sends it decides the answer."""
    if path.endswith("/images/") or path == "/api/search/":
        return {"image": SimpleUploadedFile("cat.jpg", photo("chelsea"))}, "multipart"
    if path == "/api/ingest-jobs/":
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("cat.jpg", photo("chelsea"))
        return {
            "manifest": SimpleUploadedFile("products.csv", b"sku,title,image\nCAT-1,Cat,cat.jpg\n"),
            "archive": SimpleUploadedFile("photos.zip", archive.getvalue()),
        }, "multipart"
    fields = {"name": "Toys", "sku": "BALL-1", "title": "Ball", "threshold": 0.5, "username": "staff",
              "password": "staff-pass-123"}
    return fields, "json"


def send(client, method: str, path: str, photo, **extra):
    data, fmt = body(path, photo)
    return getattr(client, method.lower())(path, data, format=fmt, **extra)


def test_the_operation_list_covers_the_api():
    operations = api_operations(1)
    for expected in [("POST", "/api/products/1/images/"), ("POST", "/api/ingest-jobs/"), ("DELETE", "/api/images/1/"),
                     ("PATCH", "/api/categories/1/"), ("POST", "/api/categorizer/apply/")]:
        assert expected in operations
    assert PUBLIC_WRITES <= set(operations)


def test_every_write_is_refused_to_anonymous_and_non_staff_users(anon, shopper, catalog, photo, settings):
    before = state(settings.MEDIA_ROOT)
    for method, path in api_operations(1):
        if (method, path) in PUBLIC_WRITES:
            continue
        anonymous = send(anon, method, path, photo)
        assert anonymous.status_code == 401, (method, path, anonymous.content)
        assert anonymous.json()["error"], (method, path)
        non_staff = send(shopper, method, path, photo)
        assert non_staff.status_code == 403, (method, path, non_staff.content)
        assert "staff" in non_staff.json()["error"], (method, path)
    assert state(settings.MEDIA_ROOT) == before


def test_every_session_write_needs_the_csrf_token(staff_user, catalog, photo, settings, offline_model):
    from rest_framework.test import APIClient

    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="staff", password="staff-pass-123")
    before = state(settings.MEDIA_ROOT)
    for method, path in api_operations(1):
        refused = send(client, method, path, photo)
        assert refused.status_code == 403, (method, path, refused.content)
        assert "CSRF" in refused.json()["error"], (method, path)
    assert state(settings.MEDIA_ROOT) == before

    # The same uploads with the session's CSRF token are accepted: the token was all they lacked.
    client.get("/admin/")  # renders a form, which sets the CSRF cookie as a browser session would have it
    token = client.cookies["csrftoken"].value
    upload = send(client, "POST", "/api/products/1/images/", photo, HTTP_X_CSRFTOKEN=token)
    assert upload.status_code == 201, upload.content
    ingest = send(client, "POST", "/api/ingest-jobs/", photo, HTTP_X_CSRFTOKEN=token)
    assert ingest.status_code == 202, ingest.content
    search = send(client, "POST", "/api/search/", photo, HTTP_X_CSRFTOKEN=token)
    assert search.status_code == 200, search.content
