"""POST /api/search/ as a shopper's client uses it: every input, option and error."""
import base64
import io
import os

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from catalog import search, services
from catalog.model_versions import serving_version
from catalog.models import Product, ProductImage
from ml import verify

pytestmark = pytest.mark.django_db(transaction=True)

PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "horse", "clock"]


@pytest.fixture(autouse=True)
def _offline_model(offline_model):
    pass


@pytest.fixture
def catalog(photo):
    """Six products, one per photo, in two categories; prices 10, 20, ... 60."""
    animals = services.category_get_or_create_path(path="prints/animals")
    things = services.category_get_or_create_path(path="prints/things")
    products = {}
    for i, name in enumerate(PHOTOS):
        category = animals if name in ("chelsea", "horse", "astronaut") else things
        product = services.product_create(sku=name.upper(), title=f"{name} print", price=10 * (i + 1), category=category)
        services.product_image_add(product=product, data=photo(name), filename=f"{name}.jpg")
        products[name] = product
    assert ProductImage.objects.filter(status="indexed").count() == len(PHOTOS)
    return products


def post_image(client, data: bytes, **options):
    return client.post("/api/search/", {"image": SimpleUploadedFile("q.jpg", data), **options}, format="multipart")


def crop(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    buf = io.BytesIO()
    img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_photo_of_a_product_finds_it_first(anon, catalog, photo):
    response = post_image(anon, crop(photo("coffee")))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["results"][0]["product"]["sku"] == "COFFEE"
    first = body["results"][0]
    assert set(first["product"]) >= {"id", "sku", "title", "price", "category", "image_url"}
    assert first["image"] == catalog["coffee"].images.get().pk
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert len(body["results"]) == 6 and len({r["product"]["id"] for r in body["results"]}) == 6
    assert body["labels"] and {"label", "score"} <= set(body["labels"][0])
    assert body["predicted_categories"][0]["category"]["name"] == "things"
    assert isinstance(body["took_ms"], int)


@pytest.mark.parametrize("fmt,extension,media_type", [("HEIF", "heic", "image/heif"), ("AVIF", "avif", "image/avif")])
def test_phone_formats_are_accepted_stored_as_themselves_and_searchable(anon, staff, catalog, photo, fmt, extension,
                                                                        media_type):
    """An iPhone's HEIC and an AVIF: uploaded through the same checks, stored, indexed, and found by a search."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo("coffee"))).save(buffer, format=fmt, quality=80)
    product = services.product_create(sku=f"PHONE-{fmt}", title="phone photo")
    upload = staff.post(f"/api/products/{product.pk}/images/",
                        {"image": SimpleUploadedFile(f"IMG_0001.{extension}", buffer.getvalue())}, format="multipart")
    assert upload.status_code == 201, upload.content
    image = ProductImage.objects.get(pk=upload.json()["id"])
    assert image.status == "indexed" and image.file.name.endswith(f".{extension}")
    served = anon.get(f"/media/{image.file.name}")
    assert served.status_code == 200 and served["Content-Type"] == media_type
    found = post_image(anon, buffer.getvalue()).json()["results"]
    assert found[0]["product"]["sku"] == f"PHONE-{fmt}"


def test_a_print_master_of_168_megapixels_is_accepted_indexed_and_found(anon, staff, catalog, photo):
    """A catalog's print-resolution PNG (10,500 x 16,000 pixels, about 1 MB) was refused by a 40 MP cap."""
    master = Image.open(io.BytesIO(photo("coffee"))).resize((10_500, 16_000), Image.NEAREST)
    buffer = io.BytesIO()
    master.save(buffer, format="PNG", compress_level=9)
    del master
    product = services.product_create(sku="MASTER-1", title="print master")
    upload = staff.post(f"/api/products/{product.pk}/images/",
                        {"image": SimpleUploadedFile("master.png", buffer.getvalue())}, format="multipart")
    assert upload.status_code == 201, upload.content
    image = ProductImage.objects.get(pk=upload.json()["id"])
    assert (image.status, image.width, image.height) == ("indexed", 10_500, 16_000)
    query = io.BytesIO()
    Image.open(io.BytesIO(photo("coffee"))).resize((300, 457)).save(query, format="JPEG")
    assert post_image(anon, query.getvalue()).json()["results"][0]["product"]["sku"] == "MASTER-1"  # its aspect


def test_the_query_image_is_not_stored(anon, catalog, photo, isolated_data):
    files_before = sorted(p for p in (isolated_data / "media").rglob("*") if p.is_file())
    count = ProductImage.objects.count()
    assert post_image(anon, crop(photo("rocket"))).status_code == 200
    assert ProductImage.objects.count() == count
    assert sorted(p for p in (isolated_data / "media").rglob("*") if p.is_file()) == files_before


def test_more_like_this_excludes_the_product_itself(anon, catalog):
    response = anon.post("/api/search/", {"product": catalog["chelsea"].pk, "k": 3}, format="json")
    assert response.status_code == 200
    skus = [r["product"]["sku"] for r in response.json()["results"]]
    assert len(skus) == 3 and "CHELSEA" not in skus


def test_one_result_per_product_with_its_best_image(anon, catalog, photo):
    services.product_image_add(product=catalog["coffee"], data=crop(photo("coffee")), filename="coffee2.jpg")
    body = post_image(anon, crop(photo("coffee"))).json()
    skus = [r["product"]["sku"] for r in body["results"]]
    assert skus.count("COFFEE") == 1 and skus[0] == "COFFEE"
    assert body["results"][0]["score"] > 0.99  # the identical second image is the one that matched


def test_k_and_filters_act_inside_the_search(anon, catalog, photo):
    query = crop(photo("coffee"))
    assert len(post_image(anon, query, k=2).json()["results"]) == 2
    animals = catalog["chelsea"].category
    in_animals = post_image(anon, query, k=3, category=animals.parent_id).json()["results"]
    assert len(in_animals) == 3  # the parent category includes its subcategories
    in_animals = post_image(anon, query, k=3, category=animals.pk).json()["results"]
    assert sorted(r["product"]["sku"] for r in in_animals) == ["ASTRONAUT", "CHELSEA", "HORSE"]
    # The three cheapest-but-one are far from coffee in the embedding space; k of them still come back.
    priced = post_image(anon, query, k=3, min_price="15", max_price="45").json()["results"]
    assert sorted(float(r["product"]["price"]) for r in priced) == [20.0, 30.0, 40.0]


def test_inactive_and_deleted_products_never_appear(anon, staff, catalog, photo):
    services.product_update(product=catalog["coffee"], is_active=False)
    assert staff.delete(f"/api/products/{catalog['rocket'].pk}/").status_code == 204
    skus = [r["product"]["sku"] for r in post_image(anon, crop(photo("coffee")), k=100).json()["results"]]
    assert "COFFEE" not in skus and "ROCKET" not in skus and len(skus) == 4


@pytest.mark.parametrize(
    ("body", "fmt", "expected"),
    [
        ({}, "json", "exactly one of"),
        ({"product": 1, "image_url": "https://example.com/a.jpg"}, "json", "exactly one of"),
        ({"product": 999999}, "json", "no product"),
        ({"product": 1, "k": 0}, "json", "k (how many results) must be at least 1"),
        ({"product": 1, "k": 101}, "json", "k (how many results) must be at most 100"),
        ({"product": 1, "k": "ten"}, "json", "k (how many results) must be a whole number"),
        ({"product": 1, "category": 999999}, "json", "no category with id 999999"),
        ({"product": 1, "min_price": "5", "max_price": "1"}, "json", "min_price"),
        ({"image_url": "ftp://example.com/a.jpg"}, "json", "http"),
        ({"image_url": "http://127.0.0.1:8000/media/x.jpg"}, "json", "not a public address"),
        ({"image_url": "http://169.254.169.254/latest/meta-data/"}, "json", "not a public address"),
        ({"image_url": "http://[::1]/x.png"}, "json", "not a public address"),
        ({"image_url": "http://localhost/x.png"}, "json", "not a public address"),
    ],
)
def test_bad_queries_are_readable_400s(anon, catalog, body, fmt, expected):
    response = anon.post("/api/search/", body, format=fmt)
    assert response.status_code == 400, response.content
    assert expected in response.json()["error"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (os.urandom(200_000), "not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    ],
)
def test_bad_images_are_readable_400s(anon, catalog, data, expected):
    response = post_image(anon, data)
    assert response.status_code == 400
    assert expected in response.json()["error"]


def test_truncated_and_bomb_images_are_400s(anon, catalog, photo):
    from tests.conftest import CORPUS_DIR

    assert post_image(anon, photo("chelsea")[:3000]).status_code == 400
    bomb = (CORPUS_DIR / "decompression_bomb.gif").read_bytes()
    response = post_image(anon, bomb)
    assert response.status_code == 400 and "too large" in response.json()["error"]


def test_too_large_upload_is_a_400(anon, catalog, settings, photo):
    settings.MAX_UPLOAD_BYTES = 50_000
    response = post_image(anon, photo("astronaut", fmt="PNG"))
    assert response.status_code == 400 and "limit" in response.json()["error"]


def test_search_by_url_fetches_safely(anon, catalog, image_server, settings):
    settings.FETCH_ALLOW_PRIVATE_ADDRESSES = True  # the test server lives on 127.0.0.1
    ok = anon.post("/api/search/", {"image_url": f"{image_server}/moved"}, format="json")
    assert ok.status_code == 200 and ok.json()["results"][0]["product"]["sku"] == "CHELSEA"
    missing = anon.post("/api/search/", {"image_url": f"{image_server}/nothing.jpg"}, format="json")
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]
    html = anon.post("/api/search/", {"image_url": f"{image_server}/page.html"}, format="json")
    assert html.status_code == 400 and "HTML" in html.json()["error"]
    settings.MAX_UPLOAD_BYTES = 100_000
    big = anon.post("/api/search/", {"image_url": f"{image_server}/big.jpg"}, format="json")
    assert big.status_code == 400 and "limit" in big.json()["error"]


def test_redirects_are_checked_again(anon, catalog, image_server, settings, monkeypatch):
    from catalog import remote

    # The test server is allowed, but the address it redirects to is checked on its own and refused.
    settings.FETCH_ALLOW_PRIVATE_ADDRESSES = False
    real_public = remote._public
    monkeypatch.setattr(remote, "_public", lambda address: str(address) == "127.0.0.1" or real_public(address))
    response = anon.post("/api/search/", {"image_url": f"{image_server}/to-metadata"}, format="json")
    assert response.status_code == 400 and "169.254.169.254" in response.json()["error"]


def test_search_before_anything_is_indexed_returns_no_results(anon, photo):
    response = post_image(anon, photo("chelsea"))
    assert response.status_code == 200
    assert response.json()["results"] == [] and response.json()["labels"]


def test_search_is_throttled_per_client(anon, catalog, monkeypatch):
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    cache.clear()
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"search": "2/min", "uploads": "120/min"})
    product = Product.objects.first().pk
    codes = [anon.post("/api/search/", {"product": product}, format="json").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    cache.clear()


# ----- same product, similar or weak; the region that matters; why it matched --------------------


def calibrate(**thresholds):
    """Thresholds on the served model's row, as its evaluation on the catalog would leave them."""
    version = serving_version()
    version.metrics = {**version.metrics, "calibration": {"same_product": 0.9, "weak": 0.3, **thresholds}}
    version.save(update_fields=["metrics"])
    search._calibrations.clear()


def test_each_result_says_same_product_similar_or_weak(anon, catalog, photo):
    before = post_image(anon, crop(photo("coffee"))).json()["results"]
    assert {hit["match"] for hit in before} == {"similar"}, "nothing is called the same product before calibration"
    calibrate(same_product=0.85, weak=0.35)
    results = post_image(anon, crop(photo("coffee"))).json()["results"]
    for hit in results:
        expected = "same_product" if hit["score"] >= 0.85 else "weak" if hit["score"] < 0.35 else "similar"
        assert hit["match"] == expected
    assert results[0]["match"] == "same_product" and results[0]["product"]["sku"] == "COFFEE"
    assert results[-1]["match"] == "weak"


def phone_photo(data: bytes, seed: int = 3) -> bytes:
    """The product photographed as the evaluation's shoppers do: turned, tilted, recoloured, compressed."""
    import numpy as np

    from ml.augment import shopper_photo

    shot, _ = shopper_photo(Image.open(io.BytesIO(data)), np.random.default_rng(seed), families=4)
    buffer = io.BytesIO()
    shot.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def calls_of(monkeypatch, check: str) -> list:
    """The calls search makes of one of ``ml.verify``'s checks, recorded (the check still runs)."""
    calls, real = [], getattr(verify, check)
    monkeypatch.setattr(search, check, lambda *args: calls.append(args) or real(*args))
    return calls


def test_a_first_result_whose_details_agree_with_the_photo_is_the_same_product(anon, catalog, photo, monkeypatch):
    """With a calibration whose scores are out of reach, only the geometric check can say "same_product"."""
    calibrate(same_product=None, margin=None, verified_points=12, weak=0.0)
    counted = calls_of(monkeypatch, "agreeing_points")
    results = post_image(anon, phone_photo(photo("coffee"))).json()["results"]
    assert results[0]["product"]["sku"] == "COFFEE" and results[0]["match"] == "same_product"
    assert {hit["match"] for hit in results[1:]} == {"similar"}
    assert len(counted) == 1, "only the first result is checked"
    # A product the catalog does not sell comes first as something similar, never as the same product.
    elsewhere = post_image(anon, phone_photo(photo("immunohistochemistry"))).json()["results"]
    assert elsewhere and elsewhere[0]["match"] == "similar"


def test_a_first_result_whose_image_aligns_with_the_photo_is_the_same_product(anon, catalog, photo, monkeypatch):
    """With scores out of reach and no local features asked for, the alignment of the result's image onto the
    photo says "same_product" for the product photographed, and not for a photo of something else."""
    calibrate(same_product=None, margin=None, verified_points=None, aligned_correlation=0.9, weak=0.0)
    aligned = calls_of(monkeypatch, "aligned_correlation")
    results = post_image(anon, phone_photo(photo("coffee"))).json()["results"]
    assert results[0]["product"]["sku"] == "COFFEE" and results[0]["match"] == "same_product"
    assert {hit["match"] for hit in results[1:]} == {"similar"}
    assert len(aligned) == 1, "only the first result is checked"
    elsewhere = post_image(anon, phone_photo(photo("immunohistochemistry"))).json()["results"]
    assert elsewhere and elsewhere[0]["match"] == "similar"


def test_a_sliver_of_a_photo_is_checked_without_an_error(anon, catalog, photo):
    calibrate(same_product=None, margin=None, verified_points=12, aligned_correlation=0.9, weak=0.0)
    for box in ("0,0,0.02,0.02", "0,0,1,0.02", "0.5,0,0.52,1"):  # the smallest boxes allowed
        response = post_image(anon, phone_photo(photo("coffee")), box=box)
        assert response.status_code == 200, (box, response.content)
        assert response.json()["results"], box


def test_a_first_result_whose_image_is_gone_is_labelled_by_its_score(anon, catalog, photo):
    calibrate(same_product=None, margin=None, verified_points=12, weak=0.0)
    from django.core.files.storage import default_storage

    default_storage.delete(catalog["coffee"].images.get().file.name)
    results = post_image(anon, phone_photo(photo("coffee"))).json()["results"]
    assert results[0]["product"]["sku"] == "COFFEE" and results[0]["match"] == "similar"


def side_by_side(photo, left: str, right: str) -> tuple[bytes, list[list[float]]]:
    scene = Image.new("RGB", (900, 380), (246, 245, 242))
    boxes, x = [], 30
    for name in (left, right):
        image = Image.open(io.BytesIO(photo(name)))
        image.thumbnail((400, 320))
        scene.paste(image, (x, 30))
        boxes.append([x / 900, 30 / 380, (x + image.width) / 900, (30 + image.height) / 380])
        x += image.width + 60
    buffer = io.BytesIO()
    scene.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue(), boxes


@pytest.mark.parametrize("as_json", [False, True])
def test_a_box_searches_that_region_only(anon, catalog, photo, as_json):
    scene, (coffee, rocket) = side_by_side(photo, "coffee", "rocket")
    if as_json:  # a photo only travels as multipart: the box as a list there is "x0,y0,x1,y1"
        response = post_image(anon, scene, box=",".join(map(str, rocket)))
    else:
        response = post_image(anon, scene, box=f"{coffee[0]},{coffee[1]},{coffee[2]},{coffee[3]}")
    assert response.status_code == 200, response.content
    assert response.json()["results"][0]["product"]["sku"] == ("ROCKET" if as_json else "COFFEE")
    objects = response.json()["objects"]
    assert len(objects) >= 2 and all(set(found) == {"box", "score"} for found in objects)


def test_a_box_in_json_is_a_list_and_bad_boxes_are_400s_naming_box(anon, catalog):
    product = catalog["coffee"].pk
    refused = anon.post("/api/search/", {"product": product, "box": [0, 0, 0.5, 0.5]}, format="json")
    assert refused.status_code == 400 and refused.json()["fields"]["box"] == [
        'a box is a region of a photo; "more like this" has none']
    for box in ([0, 0, 2, 1], "a,b,c,d", [0.5, 0.5, 0.5, 0.6], [0, 0, 1]):
        response = anon.post("/api/search/", {"product": product, "box": box}, format="json")
        assert response.status_code == 400 and isinstance(response.json()["fields"]["box"], list), box


def test_a_product_query_has_no_objects(anon, catalog):
    body = anon.post("/api/search/", {"product": catalog["coffee"].pk}, format="json").json()
    assert body["objects"] == [] and body["results"]


def test_explain_returns_where_query_and_match_agree(anon, catalog, photo):
    result = post_image(anon, crop(photo("rocket"))).json()["results"][0]
    response = anon.post("/api/search/explain/", {"image": SimpleUploadedFile("q.jpg", crop(photo("rocket"))),
                                                  "image_id": result["image"]}, format="multipart")
    assert response.status_code == 200, response.content
    body = response.json()
    for key in ("query_heatmap", "match_heatmap"):
        assert body[key].startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(body[key].split(",", 1)[1]))).format == "PNG"
    by_product = anon.post("/api/search/explain/", {"product": catalog["coffee"].pk, "image_id": result["image"]},
                           format="json")
    assert by_product.status_code == 200
    missing = anon.post("/api/search/explain/", {"product": catalog["coffee"].pk, "image_id": 999_999}, format="json")
    assert missing.status_code == 400 and missing.json()["fields"]["image"] == ["there is no catalog image 999999"]


def test_error_bodies_always_list_their_field_messages_and_name_no_field_in_the_sentence(anon, catalog, settings):
    response = anon.post("/api/search/", {"image_url": "http://127.0.0.1:1/x.jpg"}, format="json")
    assert response.status_code == 400
    body = response.json()
    assert isinstance(body["fields"]["image_url"], list) and not body["error"].startswith("image_url")
    page = anon.get("/api/products/?page_size=many")
    assert page.status_code == 400 and isinstance(page.json()["fields"]["page_size"], list)
    text = post_image(anon, b"just some text, not a photo")
    assert text.status_code == 400 and text.json()["error"].startswith("not an image")
    assert text.json()["fields"]["image"][0].startswith("not an image")


def test_likely_categories_under_one_percent_are_not_listed(anon, catalog, photo):
    predicted = post_image(anon, crop(photo("coffee"))).json()["predicted_categories"]
    assert predicted and all(p["score"] >= 0.005 for p in predicted)


def test_the_api_docs_are_served_by_the_service_itself(anon):
    page = anon.get("/api/docs/").content.decode()
    assert "cdn.jsdelivr.net" not in page and "unpkg.com" not in page and "@latest" not in page
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page


def test_concurrent_queries_batched_get_the_vectors_each_would_get_alone(settings):
    import threading

    import numpy as np

    from catalog import serving
    from tests.ml.photos import crops

    settings.QUERY_BATCH_WAIT_MS = 20
    model = serving.query_embedder()
    photos = crops(8, seed=3)
    alone = model.embed(photos, maps=True)
    got = {}

    def search_one(number: int) -> None:
        got[number] = serving.embed_query(model, [photos[number]], maps=True)

    threads = [threading.Thread(target=search_one, args=(n,)) for n in range(len(photos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    batcher = model.query_batcher
    assert batcher.images == len(photos) and batcher.batches < len(photos)
    for number in range(len(photos)):
        np.testing.assert_allclose(got[number].vectors[0], alone.vectors[number], atol=1e-4)
        assert got[number].labels[0][0][0] == alone.labels[number][0][0]
        assert got[number].maps.shape == alone.maps[number : number + 1].shape
