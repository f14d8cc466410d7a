"""Catalog auto-categorization as an admin uses it: train, read the metrics, suggestions, apply, review, check.

A small real-photo catalog (crops and flips of scikit-image's photos, one photo per category) goes through
the real pipeline: offline EfficientNet-Lite0 with its ImageNet weights, tasks in-process.
"""
import io
import re

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from PIL import Image

from catalog import categorizer, category_heads, pipeline, services
from catalog import suggestions as suggestions_service
from catalog.models import CategorizerVersion, CategoryPrediction, Product, ProductImage
from tests.conftest import photo_bytes

pytestmark = pytest.mark.django_db(transaction=True)

CATEGORIES = {"animals/cats": "chelsea", "drinks": "coffee", "vehicles/rockets": "rocket", "people": "astronaut"}
PRODUCTS_PER_CATEGORY = 3


@pytest.fixture(autouse=True)
def _offline_model(offline_model, isolated_data):
    pass


def variant(name: str, n: int) -> bytes:
    """A different photo of the same kind of product: a crop of the photo, mirrored every other time."""
    image = Image.open(io.BytesIO(photo_bytes(name)))
    rng = np.random.default_rng(n)
    width, height = image.size
    share = 0.72 + 0.2 * rng.random()
    w, h = int(width * share), int(height * share)
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image = image.crop((left, top, left + w, top + h))
    if n % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_product(sku: str, data: bytes, category=None, *, batch: list | None = None) -> Product:
    """A product with one image, embedded and indexed now, or queued with the `batch` (one forward pass)."""
    product = services.product_create(sku=sku, title=sku, price="10.00", category=category)
    image, _ = services.product_image_add(product=product, data=data, filename=f"{sku}.jpg", queue=batch is None)
    if batch is not None:
        batch.append(image.pk)
        return product
    image.refresh_from_db()
    assert image.status == "indexed", image.error
    return product


@pytest.fixture
def catalog():
    """Categorized products of four categories, one mislabelled, and three uncategorized ones."""
    categories = {path: services.category_get_or_create_path(path=path) for path in CATEGORIES}
    batch = []
    for path, name in CATEGORIES.items():
        for n in range(PRODUCTS_PER_CATEGORY):
            add_product(f"{name}-{n}", variant(name, n), categories[path], batch=batch)
    mislabelled = add_product("coffee-as-cat", variant("coffee", 10), categories["animals/cats"], batch=batch)
    unknown = {name: add_product(f"new-{name}", variant(name, 20), batch=batch) for name in ("chelsea", "coffee", "rocket")}
    pipeline.images_queue_embedding(image_ids=batch)
    assert set(ProductImage.objects.values_list("status", flat=True)) == {"indexed"}
    return {"categories": categories, "mislabelled": mislabelled, "unknown": unknown}


@pytest.fixture
def trained(catalog, staff):
    response = staff.post("/api/categorizer/train/")
    assert response.status_code == 202, response.json()
    assert response.json()["status"] == "ready", response.json()  # tasks run in-process
    return catalog


def suggestions(client, product) -> list[dict]:
    return client.get(f"/api/products/{product.pk}/").json()["suggestions"]


def test_training_reports_held_out_metrics(trained, anon):
    body = anon.get("/api/categorizer/").json()
    assert body["status"] == "ready" and body["error"] == ""
    assert re.fullmatch(r"[0-9a-f]{16}", body["version"])
    assert body["trained_at"] and body["model_identity"].startswith("efficientnet_lite0:")
    images = len(CATEGORIES) * PRODUCTS_PER_CATEGORY + 1
    assert body["n_train"] + body["n_test"] == images and body["n_test"] >= len(CATEGORIES)
    metrics = body["metrics"]
    assert 0.6 <= metrics["top1"] <= metrics["top5"] == 1.0  # four categories: the top 5 holds them all
    assert set(metrics["per_category"]) == set(CATEGORIES)
    for path, values in metrics["per_category"].items():
        assert values["support"] >= 1, path
        assert 0 <= values["recall"] <= 1
        assert values["precision"] is None or 0 <= values["precision"] <= 1
    assert sum(v["support"] for v in metrics["per_category"].values()) == body["n_test"]
    thresholds = metrics["thresholds"]
    assert [row["threshold"] for row in thresholds] == sorted(row["threshold"] for row in thresholds)
    assert all(a["coverage"] >= b["coverage"] for a, b in zip(thresholds, thresholds[1:]))


def test_status_before_any_training_is_untrained(anon, db):
    body = anon.get("/api/categorizer/").json()
    assert body["status"] == "untrained"
    assert body["version"] is None and body["metrics"] is None


def test_uncategorized_products_get_suggestions_best_first(trained, anon):
    expected = {"chelsea": "animals/cats", "coffee": "drinks", "rocket": "vehicles/rockets"}
    for name, product in trained["unknown"].items():
        shown = suggestions(anon, product)
        assert 1 <= len(shown) <= suggestions_service.SUGGESTIONS_PER_PRODUCT
        assert [s["score"] for s in shown] == sorted((s["score"] for s in shown), reverse=True)
        assert shown[0]["category"]["path"] == expected[name]
        assert shown[0]["status"] == "suggested" and shown[0]["score"] > 0.5
    categorized = Product.objects.get(sku="chelsea-0")
    assert suggestions(anon, categorized) == []


def test_a_new_upload_of_an_uncategorized_product_gets_suggestions(trained, anon):
    product = add_product("late-rocket", variant("rocket", 30))
    shown = suggestions(anon, product)
    assert shown and shown[0]["category"]["path"] == "vehicles/rockets"
    assert shown[0]["head_version"] == anon.get("/api/categorizer/").json()["version"]

    categorized = add_product("late-cat", variant("chelsea", 31), trained["categories"]["animals/cats"])
    assert suggestions(anon, categorized) == []


def test_apply_assigns_exactly_the_suggestions_above_the_threshold(trained, staff):
    top = {p.pk: suggestions(staff, p)[0] for p in trained["unknown"].values()}
    lowest = min(s["score"] for s in top.values())
    threshold = round(lowest + 1e-4, 4)
    above = {pk for pk, s in top.items() if s["score"] >= threshold}
    assert 0 < len(above) < len(top)

    response = staff.post("/api/categorizer/apply/", {"threshold": threshold}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json() == {"changed": len(above)}
    for pk, suggestion in top.items():
        product = Product.objects.get(pk=pk)
        if pk in above:
            assert product.category_id == suggestion["category"]["id"]
            assert CategoryPrediction.objects.get(product=product, status="accepted").category_id == product.category_id
            assert suggestions(staff, product) == []
        else:
            assert product.category_id is None and suggestions(staff, product)
    assert staff.post("/api/categorizer/apply/", {"threshold": threshold}, format="json").json() == {"changed": 0}


def test_apply_refuses_a_threshold_outside_zero_to_one(trained, staff):
    response = staff.post("/api/categorizer/apply/", {"threshold": 1.5}, format="json")
    assert response.status_code == 400 and "threshold" in response.json()["error"]
    assert not Product.objects.filter(sku__startswith="new-", category__isnull=False).exists()


def test_training_and_applying_need_a_staff_account(catalog, anon, shopper):
    for client, code in ((anon, 401), (shopper, 403)):
        assert client.post("/api/categorizer/train/").status_code == code
        assert client.post("/api/categorizer/apply/", {"threshold": 0.5}, format="json").status_code == code
    assert not CategorizerVersion.objects.exists()
    assert anon.get("/api/categorizer/").status_code == 200


def test_too_few_categorized_products_is_a_readable_400(staff, anon):
    cats = services.category_get_or_create_path(path="animals/cats")
    add_product("cat-1", variant("chelsea", 1), cats)
    add_product("cat-2", variant("chelsea", 2), cats)
    add_product("coffee-1", variant("coffee", 1), services.category_get_or_create_path(path="drinks"))

    response = staff.post("/api/categorizer/train/")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "at least 2 categories" in error and "animals/cats: 2" in error and "drinks: 1" in error
    assert not CategorizerVersion.objects.exists()
    assert anon.get("/api/categorizer/").json()["status"] == "untrained"
    with pytest.raises(CommandError, match="at least 2 categories"):
        call_command("train_categorizer")


def test_a_training_that_finds_too_few_products_ends_failed_with_the_reason(trained, anon):
    Product.objects.filter(sku__startswith="coffee-").update(is_active=False)
    Product.objects.filter(sku__startswith=("rocket-")).update(is_active=False)
    Product.objects.filter(sku__startswith=("astronaut-")).update(is_active=False)
    version = CategorizerVersion.objects.create(model_identity=anon.get("/api/categorizer/").json()["model_identity"])
    result = categorizer.categorizer_train(version_id=version.pk)
    assert result["status"] == "failed"
    body = anon.get("/api/categorizer/").json()
    assert body["status"] == "failed" and "at least 2 categories" in body["error"]
    assert body["version"] is not None and body["metrics"]["top1"] is not None  # the previous head still serves


def test_a_training_that_crashes_ends_failed_and_a_new_one_can_start(catalog, staff, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(categorizer, "train_category_head", crash)
    assert staff.post("/api/categorizer/train/").json()["status"] == "failed"
    body = staff.get("/api/categorizer/").json()
    assert body["status"] == "failed" and "out of memory" in body["error"] and body["version"] is None

    monkeypatch.undo()
    assert staff.post("/api/categorizer/train/").json()["status"] == "ready"
    assert staff.get("/api/categorizer/").json()["status"] == "ready"


def test_the_management_command_trains(catalog, capsys):
    call_command("train_categorizer")
    out = capsys.readouterr().out
    assert "ready" in out and "top-1" in out
    assert CategorizerVersion.objects.get().status == "ready"


def test_search_predicts_categories_with_the_head(trained, anon):
    product = Product.objects.get(sku="rocket-0")
    response = anon.post("/api/search/", {"product": product.pk}, format="json")
    assert response.status_code == 200, response.json()
    predicted = response.json()["predicted_categories"]
    assert predicted[0]["category"]["path"] == "vehicles/rockets"
    vector = np.mean([image.vector() for image in product.images.all()], axis=0)
    head = category_heads.current_head(identity=product.images.first().model_identity)
    expected = head.predict_one(vector / np.linalg.norm(vector), k=3).choices
    assert [p["score"] for p in predicted] == [round(score, 4) for _, score in expected]


# ----- the admin ---------------------------------------------------------------------------------

@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("root", password="root-pass-123")
    client.force_login(user)
    return client


def test_review_queue_shows_thumbnails_and_accepts_and_rejects_in_bulk(trained, admin_client, anon):
    page = admin_client.get("/admin/catalog/categoryprediction/", {"status__exact": "suggested"}).content.decode()
    for product in trained["unknown"].values():
        assert f'src="{product.images.first().file.url}"' in page

    cat, coffee = trained["unknown"]["chelsea"], trained["unknown"]["coffee"]
    best_cat = CategoryPrediction.objects.filter(product=cat, status="suggested").order_by("-score").first()
    coffee_suggestions = list(CategoryPrediction.objects.filter(product=coffee, status="suggested"))
    response = admin_client.post("/admin/catalog/categoryprediction/", {
        "action": "accept", "_selected_action": [best_cat.pk],
    }, follow=True)
    assert "1 product got the suggested category" in response.content.decode()
    cat.refresh_from_db()
    assert cat.category.path == "animals/cats"
    assert suggestions(anon, cat) == []

    admin_client.post("/admin/catalog/categoryprediction/", {
        "action": "reject", "_selected_action": [p.pk for p in coffee_suggestions],
    })
    assert suggestions(anon, coffee) == []
    coffee.refresh_from_db()
    assert coffee.category is None
    # A rejected category is not suggested again for that product.
    suggestions_service.suggestions_refresh()
    rejected = {p.category_id for p in coffee_suggestions}
    assert {s["category"]["id"] for s in suggestions(anon, coffee)}.isdisjoint(rejected)


def test_integrity_filter_surfaces_the_mislabelled_product(trained, admin_client):
    found = categorizer.products_with_unlikely_category()
    assert trained["mislabelled"].pk in found
    assert len(found) <= 2, found  # crops of one photo per category: the rest look right
    page = admin_client.get("/admin/catalog/product/", {"unlikely_category": "yes"}).content.decode()
    assert "coffee-as-cat" in page
    assert "rocket-0" not in page
    assert "rocket-0" in admin_client.get("/admin/catalog/product/").content.decode()


def test_a_head_too_weak_to_judge_says_so_instead_of_flagging_noise(trained, admin_client):
    """On a tiny catalog a weak head flagged 37 of 50 products; now the check says it cannot judge."""
    CategorizerVersion.objects.filter(status="ready").update(metrics={"top1": 0.35, "top5": 0.8})
    assert categorizer.products_with_unlikely_category() == {}
    page = admin_client.get("/admin/catalog/product/").content.decode()
    assert "Not judged: the category head learnt from" in page and "right for 35% of held-out products" in page
    listed = admin_client.get("/admin/catalog/product/", {"unlikely_category": "not-judged"}).content.decode()
    assert "coffee-as-cat" not in listed


def test_evaluate_writes_an_html_report_with_plots_that_the_admin_links_to(trained, admin_client, capsys):
    call_command("evaluate_categorizer")
    out = capsys.readouterr().out
    version = CategorizerVersion.objects.get(status="ready")
    version.refresh_from_db()
    report = categorizer.settings.REPORTS_DIR / version.report_file
    assert str(report) in out and report.is_file()
    html = report.read_text()
    for plot in ("confusion.png", "per_category.png", "thresholds.png"):
        assert f'src="{plot}"' in html
        assert (report.parent / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coffee-as-cat" in html  # the integrity check's list

    url = f"/admin/catalog/categorizerversion/{version.pk}/report/"
    assert f'href="{url}"' in admin_client.get("/admin/catalog/categoryprediction/").content.decode()
    assert f'href="{url}"' in admin_client.get("/admin/catalog/categorizerversion/").content.decode()
    page = admin_client.get(url)
    assert page.status_code == 200 and b"Confusion matrix" in b"".join(page.streaming_content)
    plot = admin_client.get(url + "confusion.png")
    assert plot.status_code == 200 and plot["Content-Type"] == "image/png"
    assert admin_client.get(url + "secret_key").status_code == 404  # only the report's own files
    admin_client.logout()
    assert admin_client.get(url).status_code == 302  # to the admin login
