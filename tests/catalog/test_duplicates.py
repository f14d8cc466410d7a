"""Near-duplicates across products: found when indexed, listed for staff, merged or dismissed, and warned of
in an ingest job's report."""
import csv
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from PIL import Image, ImageEnhance

from catalog import services
from catalog.duplicates import duplicate_dismiss, duplicate_merge
from catalog.models import DuplicatePair, Product, ProductImage
from tests.catalog.ingest_files import make_csv, make_zip, run_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _offline_model(offline_model):
    pass


def altered(data: bytes) -> bytes:
    """A supplier's copy of a photo: smaller, a little cropped, colours shifted, re-compressed."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    image = image.resize((w * 3 // 5, h * 3 // 5)).crop((w // 50, h // 50, w * 3 // 5 - w // 50, h * 3 // 5 - h // 50))
    image = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.1)).enhance(0.8)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=60)
    return out.getvalue()


def add(sku: str, data: bytes):
    product = services.product_create(sku=sku, title=sku.title())
    image, _ = services.product_image_add(product=product, data=data, filename=f"{sku}.jpg")
    return product, image


def groups(client) -> list[list[str]]:
    response = client.get("/api/duplicates/")
    assert response.status_code == 200, response.content
    return [[image["product"]["sku"] for image in group["images"]] for group in response.json()]


def test_a_copy_under_another_product_is_found_and_unrelated_photos_are_not(staff, anon, shopper, photo):
    add("COFFEE", photo("coffee"))
    add("CAT", photo("chelsea"))
    add("ROCKET", photo("rocket"))
    add("COFFEE-COPY", altered(photo("coffee")))
    add("ASTRONAUT", photo("astronaut"))
    body = staff.get("/api/duplicates/").json()
    assert [[image["product"]["sku"] for image in group["images"]] for group in body] == [["COFFEE", "COFFEE-COPY"]]
    assert 0.78 <= body[0]["score"] < 1.0 and set(body[0]["images"][0]["product"]) == {"id", "sku", "title"}
    assert anon.get("/api/duplicates/").status_code == 401 and shopper.get("/api/duplicates/").status_code == 403


def test_a_much_smaller_copy_is_found_by_its_perceptual_hash(staff, photo, settings):
    """A thumbnail of a small product photo drifts in the embedding (it is upsampled before the network sees
    it) below the score that pairs on its own (set above the pair's, so that only the hash can pair them);
    the two images' perceptual hashes still agree, so it is paired, and unrelated photos are not."""
    settings.DUPLICATE_SCORE = 0.9
    add("COFFEE", photo("coffee", size=(128, 85)))
    add("CAT", photo("chelsea"))
    add("ROCKET", photo("rocket", size=(128, 85)))
    thumbnail = Image.open(io.BytesIO(photo("coffee", size=(128, 85)))).resize((51, 34))
    out = io.BytesIO()
    thumbnail.save(out, format="JPEG", quality=60)
    add("COFFEE-THUMB", out.getvalue())
    assert groups(staff) == [["COFFEE", "COFFEE-THUMB"]]
    pair = DuplicatePair.objects.get()
    assert pair.score < 0.9 and pair.hash_distance <= 10, (pair.score, pair.hash_distance)


def test_images_embedded_before_hashes_were_taken_get_them_from_hash_images(photo):
    _, coffee = add("COFFEE", photo("coffee"))
    _, cat = add("CAT", photo("chelsea"))
    taken = dict(ProductImage.objects.values_list("id", "phash"))
    assert None not in taken.values(), "embedding takes the hash"
    ProductImage.objects.update(phash=None)  # as a catalog embedded before this release
    out = io.StringIO()
    call_command("hash_images", stdout=out)
    assert "2 images hashed; 0 could not be read" in out.getvalue()
    assert dict(ProductImage.objects.values_list("id", "phash")) == taken
    call_command("hash_images", stdout=out)  # nothing left to do
    assert "0 images hashed" in out.getvalue().splitlines()[-1]


def test_not_duplicates_is_remembered_even_when_the_images_are_indexed_again(staff, photo):
    add("COFFEE", photo("coffee"))
    _, copy = add("COFFEE-COPY", altered(photo("coffee")))
    duplicate_dismiss(pair=DuplicatePair.objects.get())
    assert groups(staff) == []
    from catalog.indexing import index_apply

    index_apply(add_ids=[copy.pk], remove_ids=[])  # indexed again (a re-embedding, a redelivered task)
    assert groups(staff) == [] and DuplicatePair.objects.get().status == "not_duplicates"


def test_merging_moves_the_images_and_deactivates_the_other_product(staff, anon, photo):
    original, _ = add("COFFEE", photo("coffee"))
    copy_product, _ = add("COFFEE-COPY", altered(photo("coffee")))
    services.product_image_add(product=copy_product, data=photo("rocket"), filename="side.jpg")
    duplicate_merge(pair=DuplicatePair.objects.get(), keep=original)
    assert original.images.count() == 3 and not Product.objects.get(pk=copy_product.pk).is_active
    assert groups(staff) == []
    found = anon.post("/api/search/", {"image": SimpleUploadedFile("q.jpg", photo("rocket"))}, format="multipart")
    assert [hit["product"]["sku"] for hit in found.json()["results"]] == ["COFFEE"]


def test_an_ingest_row_whose_image_copies_another_products_is_warned_not_failed(staff, photo):
    add("COFFEE", photo("coffee"))
    manifest = make_csv([["NEW-1", "New mug", "img/copy.jpg", "", "", ""], ["NEW-2", "Cat", "img/cat.jpg", "", "", ""]])
    body = run_job(staff, manifest, make_zip({"img/copy.jpg": altered(photo("coffee")), "img/cat.jpg": photo("chelsea")}))
    assert body["status"] == "succeeded" and body["succeeded"] == 2
    text = b"".join(staff.get(f"/api/ingest-jobs/{body['id']}/report.csv").streaming_content).decode()
    header, *rows = list(csv.reader(io.StringIO(text[1:])))
    warnings = {row[header.index("sku")]: row[header.index("warning")] for row in rows}
    assert warnings["NEW-1"].startswith("looks like image ") and "of product COFFEE" in warnings["NEW-1"]
    assert warnings["NEW-2"] == ""
