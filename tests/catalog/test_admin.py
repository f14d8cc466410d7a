"""The admin as a catalog admin uses it."""
import pytest
from django.contrib.auth import get_user_model

from catalog import services

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("root", password="root-pass-123")
    client.force_login(user)
    return client


@pytest.fixture
def catalog(settings, tmp_path, photo):
    settings.MEDIA_ROOT = tmp_path / "media"
    fruit = services.category_get_or_create_path(path="food/fruit")
    apple = services.product_create(sku="APL-1", title="Red apple", category=fruit, price="1.00")
    services.product_create(sku="BAL-1", title="Blue ball")
    image, _ = services.product_image_add(product=apple, data=photo("coffee"), filename="apple.jpg")
    return apple, image


@pytest.mark.parametrize("model", ["category", "product", "productimage", "categoryprediction", "duplicatepair",
                                   "ingestjob"])
def test_every_model_has_an_admin(admin_client, model):
    assert admin_client.get(f"/admin/catalog/{model}/").status_code == 200


def test_product_page_shows_image_thumbnails(admin_client, catalog):
    apple, image = catalog
    page = admin_client.get(f"/admin/catalog/product/{apple.pk}/change/").content.decode()
    assert f'src="{image.file.url}"' in page
    listing = admin_client.get("/admin/catalog/product/").content.decode()
    assert f'src="{image.file.url}"' in listing


def test_product_list_filters_and_search(admin_client, catalog):
    apple, _ = catalog
    by_search = admin_client.get("/admin/catalog/product/", {"q": "BAL"}).content.decode()
    assert "Blue ball" in by_search and "Red apple" not in by_search
    by_category = admin_client.get("/admin/catalog/product/", {"category__id__exact": apple.category_id}).content.decode()
    assert "Red apple" in by_category and "Blue ball" not in by_category
    by_status = admin_client.get("/admin/catalog/product/", {"images__status": "pending"}).content.decode()
    assert "Red apple" in by_status and "Blue ball" not in by_status


def test_attributes_postgresql_cannot_store_are_refused_in_the_admin(admin_client, catalog, rf):
    from django.contrib import admin

    from catalog.models import Product

    apple, _ = catalog
    request = rf.post("/")
    request.user = get_user_model().objects.get(username="root")
    form_class = admin.site._registry[Product].get_form(request, apple)
    data = {"sku": apple.sku, "title": apple.title, "description": "", "price": "1.00", "currency": "USD",
            "category": apple.category_id, "is_active": "on"}

    refused = form_class(data={**data, "attributes": '{"colour": "re\\u0000d"}'}, instance=apple)
    accepted = form_class(data={**data, "attributes": '{"colour": "red"}'}, instance=apple)

    assert not refused.is_valid()
    assert "NUL" in " ".join(refused.errors["attributes"])
    assert accepted.is_valid(), accepted.errors
    apple.refresh_from_db()
    assert apple.attributes == {}


def test_failed_images_show_their_error_and_can_be_queued_again(admin_client, catalog, monkeypatch):
    from catalog import pipeline
    from catalog.models import ProductImage

    _, image = catalog
    ProductImage.objects.filter(pk=image.pk).update(status="failed", error="the decoder crashed on this file")
    listing = admin_client.get("/admin/catalog/productimage/").content.decode()
    assert "the decoder crashed on this file" in listing
    queued = []
    monkeypatch.setattr(pipeline, "images_queue_embedding", lambda image_ids: queued.append(image_ids) or 1)
    response = admin_client.post("/admin/catalog/productimage/", {"action": "retry", "_selected_action": [image.pk]},
                                 follow=True)
    assert "1 failed image queued again." in response.content.decode()
    assert queued == [[image.pk]] and ProductImage.objects.get(pk=image.pk).status == "pending"
