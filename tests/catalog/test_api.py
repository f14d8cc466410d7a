"""Catalog API flows, as a client sees them. scripts/test runs this module twice: on SQLite, and on the
machine's real PostgreSQL and Redis (the `services` marker)."""
import os

import pytest
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import connection

from catalog.models import Category, Product, ProductImage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]


def make_category(client, name, parent=None):
    response = client.post("/api/categories/", {"name": name, "parent": parent}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def make_product(client, sku, **fields):
    response = client.post("/api/products/", {"sku": sku, "title": f"Product {sku}", **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_runs_on_the_configured_database():
    expected = "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "sqlite"
    assert connection.vendor == expected


def test_token_for_valid_credentials_only(anon, staff_user):
    ok = anon.post("/api/auth/token/", {"username": "staff", "password": "staff-pass-123"}, format="json")
    assert ok.status_code == 200
    assert len(ok.json()["token"]) == 40
    bad = anon.post("/api/auth/token/", {"username": "staff", "password": "wrong"}, format="json")
    assert bad.status_code == 400
    assert "Unable to log in" in bad.json()["error"]


def test_anonymous_and_non_staff_writes_are_refused(anon, shopper, staff, photo):
    product = make_product(staff, "SKU-1")
    writes = [
        ("post", "/api/categories/", {"name": "Food"}),
        ("post", "/api/products/", {"sku": "X", "title": "X"}),
        ("patch", f"/api/products/{product['id']}/", {"title": "changed"}),
        ("delete", f"/api/products/{product['id']}/", None),
    ]
    for method, url, body in writes:
        anonymous = getattr(anon, method)(url, body, format="json")
        assert anonymous.status_code == 401, (method, url)
        assert anonymous.json()["error"]
        non_staff = getattr(shopper, method)(url, body, format="json")
        assert non_staff.status_code == 403, (method, url)
        assert "staff" in non_staff.json()["error"]
    upload = anon.post(f"/api/products/{product['id']}/images/", {"image": _file(photo())}, format="multipart")
    assert upload.status_code == 401
    assert Product.objects.count() == 1 and Category.objects.count() == 0
    assert Product.objects.get().title == "Product SKU-1"
    # Reads stay public.
    assert anon.get("/api/products/").status_code == 200
    assert anon.get(f"/api/products/{product['id']}/").status_code == 200


def test_category_tree_crud(staff, anon):
    food = make_category(staff, "Food")
    fruit = make_category(staff, "Fruit", parent=food["id"])
    assert fruit == {"id": fruit["id"], "name": "Fruit", "slug": "fruit", "parent": food["id"], "path": "food/fruit"}
    assert [c["slug"] for c in anon.get("/api/categories/").json()] == ["food", "fruit"]

    renamed = staff.patch(f"/api/categories/{fruit['id']}/", {"name": "Fresh fruit"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["name"] == "Fresh fruit"

    cycle = staff.patch(f"/api/categories/{food['id']}/", {"parent": fruit["id"]}, format="json")
    assert cycle.status_code == 400
    assert "ancestor" in cycle.json()["error"]

    duplicate = staff.post("/api/categories/", {"name": "Other", "slug": "fruit", "parent": food["id"]}, format="json")
    assert duplicate.status_code == 400 and "already exists under 'food'" in duplicate.json()["error"]

    blocked = staff.delete(f"/api/categories/{food['id']}/")
    assert blocked.status_code == 400 and "holds 1 subcategory" in blocked.json()["error"]
    assert staff.delete(f"/api/categories/{fruit['id']}/").status_code == 204
    assert staff.delete(f"/api/categories/{food['id']}/").status_code == 204
    assert anon.get(f"/api/categories/{food['id']}/").status_code == 404


def test_a_name_is_unique_among_its_siblings_and_paths_stay_clean(staff):
    cards, prints = make_category(staff, "Cards"), make_category(staff, "Prints")
    in_cards = make_category(staff, "Animals", parent=cards["id"])
    in_prints = make_category(staff, "Animals", parent=prints["id"])
    assert (in_cards["path"], in_prints["path"]) == ("cards/animals", "prints/animals")  # never animals-2
    again = staff.post("/api/categories/", {"name": "animals", "parent": cards["id"]}, format="json")
    assert again.status_code == 400 and again.json()["error"] == "a category named 'animals' already exists under 'cards'"
    mugs = make_category(staff, "Mugs")
    assert staff.post("/api/categories/", {"name": "Mugs"}, format="json").status_code == 400
    moved = staff.patch(f"/api/categories/{in_prints['id']}/", {"parent": cards["id"]}, format="json")
    assert moved.status_code == 400 and "already exists under 'cards'" in moved.json()["error"]
    assert Category.objects.filter(name__iexact="mugs").count() == 1 and mugs["slug"] == "mugs"


def test_deleting_a_category_that_holds_products_needs_a_place_to_move_them(staff):
    kitchen = make_category(staff, "Kitchen")
    mugs = make_category(staff, "Mugs", parent=kitchen["id"])
    cups = make_category(staff, "Cups", parent=kitchen["id"])
    for sku in ("M-1", "M-2"):
        make_product(staff, sku, category=mugs["id"])
    refused = staff.delete(f"/api/categories/{mugs['id']}/")
    assert refused.status_code == 400 and "holds 2 products" in refused.json()["error"]
    assert Product.objects.filter(category_id=mugs["id"]).count() == 2
    for bad, expected in ((mugs["id"], "inside it"), (999999, "no category with id 999999"), ("x", "must be a category id")):
        response = staff.delete(f"/api/categories/{mugs['id']}/?move_to={bad}")
        assert response.status_code == 400 and expected in response.json()["error"], response.json()
    assert staff.delete(f"/api/categories/{mugs['id']}/?move_to={cups['id']}").status_code == 204
    assert set(Product.objects.values_list("category_id", flat=True)) == {cups["id"]}
    refused = staff.delete(f"/api/categories/{kitchen['id']}/")
    assert refused.status_code == 400 and "holds 1 subcategory" in refused.json()["error"]
    assert staff.delete(f"/api/categories/{kitchen['id']}/?move_to={cups['id']}").status_code == 400  # inside it


def test_product_crud_and_validation(staff, anon):
    food = make_category(staff, "Food")
    created = make_product(staff, "APL-1", price="1.50", category=food["id"], attributes={"colour": "red"})
    assert created["price"] == "1.50" and created["currency"] == "USD"
    assert created["category"] == food["id"] and created["category_path"] == "food"
    assert created["images"] == [] and created["suggestions"] == []

    dup = staff.post("/api/products/", {"sku": "APL-1", "title": "again"}, format="json")
    assert dup.status_code == 400 and "already exists" in dup.json()["error"]
    for bad in ({"sku": "B", "title": "b", "price": "abc"}, {"sku": "B", "title": "b", "price": "-1"},
                {"sku": "B", "title": "b", "category": 999999}, {"title": "no sku"},
                {"sku": "B", "title": "b", "attributes": [1, 2]}, {"sku": "B", "title": "b", "currency": "dollars"},
                {"sku": "B", "title": "b", "attributes": {"note": ["a\x00b"]}}):
        response = staff.post("/api/products/", bad, format="json")
        assert response.status_code == 400, bad
        assert response.json()["error"] and response.json()["fields"]
    assert Product.objects.count() == 1

    updated = staff.patch(f"/api/products/{created['id']}/", {"title": "Green apple", "category": None}, format="json")
    assert updated.status_code == 200
    assert updated.json()["title"] == "Green apple" and updated.json()["category"] is None
    assert staff.delete(f"/api/products/{created['id']}/").status_code == 204
    assert anon.get(f"/api/products/{created['id']}/").status_code == 404


def test_invalid_json_is_a_400(staff):
    response = staff.post("/api/products/", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


def test_product_list_paginates_and_filters(staff, anon):
    food = make_category(staff, "Food")
    fruit = make_category(staff, "Fruit", parent=food["id"])
    toys = make_category(staff, "Toys")
    make_product(staff, "APPLE-1", title="Red apple", category=fruit["id"])
    make_product(staff, "BREAD-1", title="Bread", category=food["id"])
    make_product(staff, "BALL-1", title="Ball", category=toys["id"])
    for i in range(22):
        make_product(staff, f"MISC-{i:02d}", title=f"Mystery {i}")

    page = anon.get("/api/products/").json()
    assert page["count"] == 25 and len(page["results"]) == 20 and page["next"] and page["previous"] is None
    assert len(anon.get(page["next"]).json()["results"]) == 5

    def skus(query):
        response = anon.get("/api/products/", query)
        assert response.status_code == 200
        return sorted(p["sku"] for p in response.json()["results"])

    assert skus({"category": food["id"]}) == ["APPLE-1", "BREAD-1"]  # subcategories included
    assert skus({"category": fruit["id"]}) == ["APPLE-1"]
    assert skus({"uncategorized": "true", "page_size": 100}) == [f"MISC-{i:02d}" for i in range(22)]
    assert skus({"q": "apple"}) == ["APPLE-1"]
    assert skus({"q": "ball-1"}) == ["BALL-1"]
    bad = anon.get("/api/products/", {"category": "fruit"})
    assert bad.status_code == 400 and "category" in bad.json()["error"]


def _file(data: bytes, name: str = "photo.jpg"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data)


def test_image_upload_list_and_delete(staff, anon, photo):
    product = make_product(staff, "CAT-1")
    data = photo("chelsea")
    response = staff.post(f"/api/products/{product['id']}/images/", {"image": _file(data)}, format="multipart")
    assert response.status_code == 201, response.content
    image = response.json()
    assert image["status"] == "pending"
    assert (image["width"], image["height"]) == (451, 300)
    assert anon.get(image["url"].replace("http://testserver", "")).status_code == 200

    again = staff.post(f"/api/products/{product['id']}/images/", {"image": _file(data, "copy.jpg")}, format="multipart")
    assert again.status_code == 200 and again.json()["id"] == image["id"]

    listed = anon.get(f"/api/products/{product['id']}/").json()["images"]
    # Embedded default: the in-process pipeline has indexed it by now; with a broker it waits for a worker.
    expected = "indexed" if settings.CELERY_TASK_ALWAYS_EAGER else "pending"
    assert [(i["id"], i["status"]) for i in listed] == [(image["id"], expected)]
    assert listed[0]["url"].endswith(".jpg")
    assert anon.get(f"/api/images/{image['id']}/").json()["sha256"] == image["sha256"]

    stored = ProductImage.objects.get().file.name
    assert default_storage.exists(stored)
    assert staff.delete(f"/api/images/{image['id']}/").status_code == 204
    assert not default_storage.exists(stored)
    assert anon.get(f"/api/images/{image['id']}/").status_code == 404


def test_random_bytes_upload_is_a_readable_400(staff, photo):
    product = make_product(staff, "RND-1")
    noise = os.urandom(10 * 1024 * 1024)
    response = staff.post(f"/api/products/{product['id']}/images/", {"image": _file(noise, "x.jpg")}, format="multipart")
    assert response.status_code == 400
    assert "not an image" in response.json()["error"]
    assert ProductImage.objects.count() == 0
    # The server keeps serving.
    ok = staff.post(f"/api/products/{product['id']}/images/", {"image": _file(photo())}, format="multipart")
    assert ok.status_code == 201


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "image"),
        ({"image": b""}, "empty"),
        ({"image": b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"}, "SVG is not accepted"),
        ({"image": b"\x89PNG\r\n\x1a\n<html><body>hi</body></html>"}, "image"),
    ],
)
def test_bad_uploads_are_refused(staff, body, expected):
    product = make_product(staff, "BAD-1")
    files = {key: _file(value, "bad.png") for key, value in body.items()}
    response = staff.post(f"/api/products/{product['id']}/images/", files, format="multipart")
    assert response.status_code == 400
    assert expected in response.json()["error"]
    assert ProductImage.objects.count() == 0


def test_upload_to_missing_product_is_a_404(staff, photo):
    response = staff.post("/api/products/999999/images/", {"image": _file(photo())}, format="multipart")
    assert response.status_code == 404
    assert response.json()["error"]


def test_schema_and_docs_are_served(anon):
    schema = anon.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ["/api/products/", "/api/products/{id}/images/", "/api/categories/", "/api/auth/token/"]:
        assert path in paths
    assert anon.get("/api/docs/").status_code == 200


def test_unknown_api_path_is_json_404(anon):
    response = anon.get("/api/nothing-here/")
    assert response.status_code == 404
    assert response.json()["error"].startswith("nothing at")


def test_session_writes_need_csrf(staff_user):
    from rest_framework.test import APIClient

    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="staff", password="staff-pass-123")
    refused = client.post("/api/categories/", {"name": "Food"}, format="json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    client.get("/admin/")  # renders a form, which sets the CSRF cookie as a browser session would have it
    token = client.cookies["csrftoken"].value
    accepted = client.post("/api/categories/", {"name": "Food"}, format="json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 201


def test_uploads_are_throttled_per_client(staff, photo, monkeypatch):
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    cache.clear()
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"uploads": "2/min"})
    product = make_product(staff, "THR-1")
    codes = [
        staff.post(f"/api/products/{product['id']}/images/", {"image": _file(photo(size=(64 + i, 64)))},
                   format="multipart").status_code
        for i in range(3)
    ]
    assert codes == [201, 201, 429]
    cache.clear()


def test_cache_backend_matches_configuration():
    from django.core.cache import caches

    cache = caches["default"]
    redis_configured = os.environ.get("CELERY_BROKER_URL", "").startswith("redis")
    assert type(cache).__name__ == ("RedisCache" if redis_configured else "LocMemCache")
    cache.set("visualsearch-test-key", "value", 5)
    assert cache.get("visualsearch-test-key") == "value"
