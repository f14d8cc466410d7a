"""Bulk ingest jobs on the embedded default: the API, the admin and the command, with tasks in-process."""
import io
import json
import socket
import stat
import zipfile
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.management import CommandError, call_command
from django.http import HttpResponse
from django.test import RequestFactory

from catalog import ingest
from catalog.middleware import RequestBodyLimitMiddleware
from catalog.models import Category, IngestJob, IngestRow, Product, ProductImage
from catalog.queue import QueueUnavailable
from tests.catalog.ingest_files import make_csv, make_zip, post_job, run_job
from workers import tasks

pytestmark = pytest.mark.django_db(transaction=True)

@pytest.fixture(autouse=True)
def _offline_model(offline_model):
    pass


@pytest.fixture
def images(photo):
    return {
        "img/cat.jpg": photo("chelsea"),
        "img/cat-small.jpg": photo("chelsea", size=(200, 150)),
        "img/coffee.jpg": photo("coffee"),
        "img/rocket.png": photo("rocket", fmt="PNG"),
    }


@pytest.fixture
def catalog_upload(images):
    manifest = make_csv([
        ["CAT-1", "Cat print", "img/cat.jpg", "prints/animals", "12.50", "A cat."],
        ["CAT-1", "Cat print", "img/cat-small.jpg", "prints/animals", "12.50", ""],
        ["COF-1", "Coffee cup", "img/coffee.jpg", "food/drinks", "3", ""],
        ["ROC-1", "Rocket", "img/rocket.png", "", "", ""],
    ])
    return manifest, make_zip(images)


def stored_files(isolated_data, folder: str = "ingest") -> list[str]:
    root = isolated_data / "media" / folder
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_manifest_and_its_archive_become_indexed_products(staff, catalog_upload, isolated_data):
    body = run_job(staff, *catalog_upload)
    assert body["status"] == "succeeded", body
    assert (body["total"], body["processed"], body["succeeded"], body["failed"]) == (4, 4, 4, 0)
    assert body["errors"] == []
    assert body["started_at"] and body["finished_at"] and body["images_per_s"] > 0

    cat = Product.objects.get(sku="CAT-1")
    assert cat.images.count() == 2  # two rows, one sku: one product with both images
    assert cat.price == Decimal("12.50") and cat.description == "A cat."
    assert cat.category.path == "prints/animals"
    assert Product.objects.get(sku="COF-1").category.path == "food/drinks"
    assert Product.objects.get(sku="ROC-1").category is None  # left for auto-categorization
    assert set(ProductImage.objects.values_list("status", flat=True)) == {"indexed"}
    assert stored_files(isolated_data) == [f"{body['id']}/images.zip", f"{body['id']}/manifest.csv"]


def test_the_same_manifest_twice_creates_no_duplicate(staff, catalog_upload):
    first = run_job(staff, *catalog_upload)
    products = sorted(Product.objects.values_list("id", "sku"))
    images = sorted(ProductImage.objects.values_list("id", "sha256"))
    second = run_job(staff, *catalog_upload)
    assert second["id"] != first["id"]
    assert second["status"] == "succeeded" and second["succeeded"] == 4
    # The figures say what happened: everything was new the first time, nothing the second.
    assert (first["images_new"], first["images_already"]) == (4, 0)
    assert (second["images_new"], second["images_already"]) == (0, 4)
    assert sorted(Product.objects.values_list("id", "sku")) == products
    assert sorted(ProductImage.objects.values_list("id", "sha256")) == images
    assert Category.objects.filter(slug="animals").count() == 1


def test_a_bad_row_fails_alone_with_a_readable_error(staff, images, settings, photo):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    settings.FETCH_ALLOW_PRIVATE_ADDRESSES = True
    manifest = make_csv([
        ["OK-1", "Fine", "img/cat.jpg", "", "5", ""],
        ["MISS-1", "Missing file", "img/nowhere.jpg", "", "", ""],
        ["NOISE-1", "Not an image", "img/noise.jpg", "misc/new", "", ""],
        ["PRICE-1", "Bad price", "img/coffee.jpg", "", "twelve", ""],
        ["URL-1", "Unreachable", f"http://127.0.0.1:{port}/a.jpg", "", "", ""],
        ["", "No sku", "img/coffee.jpg", "", "", ""],
        ["OK-2", "Fine too", "img/rocket.png", "misc/new", "", ""],
    ])
    archive = make_zip({**images, "img/noise.jpg": bytes(range(256)) * 40})
    body = run_job(staff, manifest, archive)

    assert body["status"] == "completed_with_errors"
    assert (body["total"], body["processed"], body["succeeded"], body["failed"]) == (7, 7, 2, 5)
    errors = {e["row"]: e for e in body["errors"]}
    assert sorted(errors) == [3, 4, 5, 6, 7]  # line numbers: the header is line 1
    assert errors[3] == {"row": 3, "sku": "MISS-1", "error": "image: img/nowhere.jpg is not in the archive"}
    assert errors[4]["sku"] == "NOISE-1" and errors[4]["error"].startswith("image: ")
    assert errors[5]["error"] == "price: 'twelve' is not a number"
    assert errors[6]["sku"] == "URL-1" and f"127.0.0.1:{port}" in errors[6]["error"]
    assert errors[7]["error"] == "sku: the sku is empty"
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["OK-1", "OK-2"]  # a failed row stores nothing
    assert Product.objects.get(sku="OK-2").category.path == "misc/new"  # made again after NOISE-1's rolled back


def test_images_given_by_url_are_fetched_safely(staff, image_server, settings):
    manifest = make_csv([
        ["WEB-1", "From the web", f"{image_server}/moved", "", "", ""],
        ["WEB-2", "Not found", f"{image_server}/nothing.jpg", "", "", ""],
        ["WEB-3", "A page", f"{image_server}/page.html", "", "", ""],
        ["WEB-4", "Not http", "ftp://example.com/a.jpg", "", "", ""],
    ])
    settings.FETCH_ALLOW_PRIVATE_ADDRESSES = True  # the test server lives on 127.0.0.1
    body = run_job(staff, manifest)
    errors = {e["sku"]: e["error"] for e in body["errors"]}
    assert body["succeeded"] == 1 and Product.objects.get(sku="WEB-1").images.get().status == "indexed"
    assert "HTTP 404" in errors["WEB-2"]
    assert errors["WEB-3"].startswith("image: ") and "WEB-3" not in Product.objects.values_list("sku", flat=True)
    assert "only http and https" in errors["WEB-4"]

    settings.FETCH_ALLOW_PRIVATE_ADDRESSES = False  # as deployed: 127.0.0.1 is not a public address
    body = run_job(staff, make_csv([["WEB-5", "Private", f"{image_server}/cat.jpg", "", "", ""]]))
    assert body["status"] == "completed_with_errors"
    assert "not a public address" in body["errors"][0]["error"]


def test_a_json_lines_manifest_works_like_csv(staff, images):
    lines = [
        {"sku": "J-1", "title": "Cat", "image": "img/cat.jpg", "category": "prints/animals", "price": 9.5},
        {"sku": "J-1", "title": "Cat", "image": "img/cat-small.jpg"},
        {"sku": "J-2", "title": "Coffee", "image": "img/coffee.jpg", "price": "x"},
    ]
    manifest = ("\n".join(json.dumps(line) for line in lines) + "\n[1, 2]\n").encode()
    body = run_job(staff, manifest, make_zip(images), name="products.jsonl")
    assert (body["total"], body["succeeded"], body["failed"]) == (4, 2, 2)
    assert [(e["row"], e["error"]) for e in body["errors"]] == [
        (3, "price: 'x' is not a number"), (4, "the line is not a JSON object"),
    ]
    product = Product.objects.get(sku="J-1")
    assert product.images.count() == 2 and product.price == Decimal("9.50") and product.category.name == "animals"


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (b"sku,title,picture\nA,a,a.jpg\n", "has no image column"),
        (b"name;price\nA;1\n", "has no sku, title, image columns"),
        (b"", "The submitted file is empty"),
        (b"sku,title,image\n", "no rows after its header"),
        ("sku,title,image\nA-1,Caf\u00e9,a.jpg\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 on line 2"),
        (b'{"sku": "A", "title": "a"}\n', "first line has no image column"),
        (b"{not json\n", "first line is not valid JSON"),
    ],
)
def test_an_unusable_manifest_is_a_400_and_stores_nothing(staff, manifest, expected, isolated_data):
    name = "m.jsonl" if manifest.startswith(b"{") else "m.csv"
    response = post_job(staff, manifest, name=name)
    assert response.status_code == 400
    assert expected in response.json()["error"]
    assert not IngestJob.objects.exists() and stored_files(isolated_data) == []


def test_a_utf8_manifest_with_a_byte_order_mark_is_read(staff, images):
    manifest = "\ufeffsku,title,image\nBOM-1,Caf\u00e9 print,img/coffee.jpg\n".encode()
    body = run_job(staff, manifest, make_zip(images))
    assert body["status"] == "succeeded" and Product.objects.get(sku="BOM-1").title == "Caf\u00e9 print"


def symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        link = zipfile.ZipInfo("img/link.jpg")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "expected"),
    [
        (lambda: make_zip({"../escape.jpg": b"x"}), "a path outside the archive"),
        (lambda: make_zip({"/etc/cron.d/x.jpg": b"x"}), "a path outside the archive"),
        (symlink_zip, "a symbolic link"),
        (lambda: make_zip({"img/bomb.bmp": bytes(20_000_000)}, zipfile.ZIP_DEFLATED), "the mark of a zip bomb"),
        (lambda: b"PK\x03\x04 this is not really a zip", "not a readable ZIP file"),
    ],
)
def test_an_unsafe_archive_is_a_400_and_stores_nothing(staff, archive, expected, isolated_data):
    response = post_job(staff, make_csv([["A-1", "a", "img/a.jpg", "", "", ""]]), archive())
    assert response.status_code == 400
    assert expected in response.json()["error"]
    assert not IngestJob.objects.exists() and not Product.objects.exists() and stored_files(isolated_data) == []


def test_archive_caps_on_file_count_and_total_size(staff, images, settings):
    manifest = make_csv([["A-1", "a", "img/cat.jpg", "", "", ""]])
    settings.INGEST_MAX_FILES = 3
    response = post_job(staff, manifest, make_zip(images))
    assert response.status_code == 400 and "holds 4 files, over the limit of 3" in response.json()["error"]
    settings.INGEST_MAX_FILES = 100
    settings.INGEST_MAX_ARCHIVE_BYTES = sum(len(data) for data in images.values()) - 1
    response = post_job(staff, manifest, make_zip(images))
    assert response.status_code == 400 and "expands to" in response.json()["error"]
    assert not IngestJob.objects.exists()


def test_an_image_over_the_size_cap_fails_only_its_row(staff, images, settings):
    settings.MAX_UPLOAD_BYTES = 200_000
    assert len(images["img/rocket.png"]) > 200_000 > len(images["img/cat.jpg"])
    manifest = make_csv([["BIG-1", "Big", "img/rocket.png", "", "", ""],
                         ["SMALL-1", "Small", "img/cat.jpg", "", "", ""]])
    body = run_job(staff, manifest, make_zip(images, zipfile.ZIP_DEFLATED))
    assert body["succeeded"] == 1
    assert body["errors"] == [
        {"row": 2, "sku": "BIG-1", "error": "image: img/rocket.png is over the 0.2 MB limit for an image"}
    ]


def test_a_path_without_an_archive_fails_its_row(staff):
    body = run_job(staff, make_csv([["A-1", "a", "img/a.jpg", "", "", ""]]))
    assert body["status"] == "completed_with_errors"
    assert "the job has no archive" in body["errors"][0]["error"]


def test_ingest_jobs_need_a_staff_account(anon, shopper, staff, catalog_upload):
    assert post_job(anon, *catalog_upload).status_code == 401
    assert post_job(shopper, *catalog_upload).status_code == 403
    job_id = run_job(staff, *catalog_upload)["id"]
    assert anon.get(f"/api/ingest-jobs/{job_id}/").status_code == 401
    assert shopper.get(f"/api/ingest-jobs/{job_id}/").status_code == 403
    assert staff.get("/api/ingest-jobs/999999/").status_code == 404


def test_rows_of_one_sku_that_disagree_on_the_product_fail_naming_the_earlier_line(staff, images):
    manifest = make_csv([
        ["MUG-1", "Blue mug", "img/cat.jpg", "kitchen/mugs", "12.50", ""],
        ["MUG-1", "Blue mug", "img/cat-small.jpg", "kitchen/mugs/", "12.5", ""],  # the same, written otherwise
        ["MUG-1", "Red mug", "img/coffee.jpg", "kitchen/mugs", "12.50", ""],
        ["MUG-1", "", "img/rocket.png", "", "9.99", ""],
    ])
    body = run_job(staff, manifest, make_zip(images))
    assert (body["succeeded"], body["failed"]) == (2, 2), body
    errors = {e["row"]: e["error"] for e in body["errors"]}
    assert errors[4] == ("title: line 2 gives this sku's title as 'Blue mug', this row as 'Red mug'; rows of one sku "
                         "must agree on the product")
    assert errors[5].startswith("price: line 2 gives this sku's price as '12.50', this row as '9.99'")
    product = Product.objects.get(sku="MUG-1")
    assert (product.title, product.price, product.images.count()) == ("Blue mug", Decimal("12.50"), 2)


def test_the_pace_leaves_out_the_start_and_says_how_long_the_start_took(staff, images):
    """A small job's images/s used to include the worker loading its model: 21 images in 12 s read 1.75/s."""
    import datetime

    from django.utils import timezone

    body = run_job(staff, make_csv([["P-1", "Cat", "img/cat.jpg", "", "", ""]]), make_zip(images))
    start = timezone.now()
    IngestJob.objects.filter(pk=body["id"]).update(
        started_at=start, first_image_at=start + datetime.timedelta(seconds=10),
        last_image_at=start + datetime.timedelta(seconds=12), finished_at=start + datetime.timedelta(seconds=12),
        images_new=21)
    job = staff.get(f"/api/ingest-jobs/{body['id']}/").json()
    assert (job["images_per_s"], job["seconds_to_first_image"]) == (10.0, 10.0)
    assert body["images_per_s"] > 0 and body["seconds_to_first_image"] >= 0  # the real run, one batch


def test_the_jobs_are_listed_for_staff_newest_first_by_status_with_their_manifest_names(anon, shopper, staff, images):
    good = run_job(staff, make_csv([["OK-1", "Cat", "img/cat.jpg", "", "", ""]]), make_zip(images), name="spring.csv")
    bad = run_job(staff, make_csv([["BAD-1", "Cat", "img/none.jpg", "", "", ""]]), make_zip(images), name="summer.csv")
    listed = staff.get("/api/ingest-jobs/")
    assert listed.status_code == 200, listed.content
    body = listed.json()
    assert body["count"] == 2 and [job["id"] for job in body["results"]] == [bad["id"], good["id"]]
    assert [job["manifest_name"] for job in body["results"]] == ["summer.csv", "spring.csv"]
    assert body["results"][0]["failed"] == 1 and body["results"][1]["succeeded"] == 1
    only = staff.get("/api/ingest-jobs/?status=succeeded").json()
    assert [job["id"] for job in only["results"]] == [good["id"]]
    paged = staff.get("/api/ingest-jobs/?page_size=1").json()
    assert len(paged["results"]) == 1 and paged["next"]
    refused = staff.get("/api/ingest-jobs/?status=done")
    assert refused.status_code == 400 and isinstance(refused.json()["fields"]["status"], list)
    assert anon.get("/api/ingest-jobs/").status_code == 401 and shopper.get("/api/ingest-jobs/").status_code == 403


def test_a_job_is_refused_with_503_when_the_queue_is_down(staff, catalog_upload, monkeypatch, isolated_data):
    def down():
        raise QueueUnavailable("ConnectionError")

    monkeypatch.setattr(ingest, "queue_check", down)
    response = post_job(staff, *catalog_upload)
    assert response.status_code == 503 and "queue is unavailable" in response.json()["error"]
    assert response["Retry-After"]
    assert not IngestJob.objects.exists() and stored_files(isolated_data) == []


def test_the_ingest_endpoint_takes_bodies_larger_than_an_image_upload(settings):
    middleware = RequestBodyLimitMiddleware(lambda request: HttpResponse("passed"))
    size = settings.MAX_REQUEST_BYTES + 1
    factory = RequestFactory()
    assert middleware(factory.post("/api/ingest-jobs/", CONTENT_LENGTH=str(size))).content == b"passed"
    assert middleware(factory.post("/api/products/1/images/", CONTENT_LENGTH=str(size))).status_code == 413


def test_a_chunk_delivered_again_redoes_no_row(images, settings, staff):
    """What a worker crash looks like to the database: some chunks done, one delivered a second time."""
    settings.INGEST_CHUNK_ROWS = 2
    rows = [[f"R-{i}", f"row {i}", name, "", "", ""] for i, name in enumerate(images)]
    job = ingest.ingest_job_create(manifest=ContentFile(make_csv(rows), name="m.csv"),
                                   archive=ContentFile(make_zip(images), name="a.zip"), start=False)
    chunks = ingest.ingest_job_start(job_id=job.pk, queue_chunks=False)
    assert chunks == [(2, 3), (4, 5)]
    # The start delivered again (its worker died before acknowledging it) queues the same rows, no more.
    assert ingest.ingest_job_start(job_id=job.pk, queue_chunks=False) == chunks
    assert IngestRow.objects.filter(job=job).count() == 4

    tasks.ingest_rows.apply(kwargs={"job_id": job.pk, "first": 2, "last": 3})
    progress = staff.get(f"/api/ingest-jobs/{job.pk}/").json()
    assert progress["status"] == "running" and (progress["processed"], progress["total"]) == (2, 4)
    before = dict(IngestRow.objects.filter(job=job, status="done").values_list("number", "updated_at"))
    assert sorted(before) == [2, 3]

    assert tasks.ingest_rows.apply(kwargs={"job_id": job.pk, "first": 2, "last": 3}).get() == {"done": 0, "failed": 0}
    tasks.ingest_rows.apply(kwargs={"job_id": job.pk, "first": 4, "last": 5})
    after = dict(IngestRow.objects.filter(job=job, status="done").values_list("number", "updated_at"))
    assert {n: after[n] for n in before} == before  # the finished rows were not touched again
    job.refresh_from_db()
    assert job.status == "succeeded" and job.succeeded == 4
    assert ProductImage.objects.count() == 4 and Product.objects.count() == 4


def test_the_sweep_revives_jobs_whose_messages_were_lost(images, settings):
    settings.INGEST_STALE_SECONDS = 60
    long_ago = "2000-01-01T00:00:00Z"
    upload = {"manifest": ContentFile(make_csv([["L-1", "a", "img/cat.jpg", "", "", ""]]), name="m.csv"),
              "archive": ContentFile(make_zip(images), name="a.zip")}
    never_started = ingest.ingest_job_create(**upload, start=False)
    stalled = ingest.ingest_job_create(**upload, start=False)
    ingest.ingest_job_start(job_id=stalled.pk, queue_chunks=False)  # running, but its chunk message is lost
    assert tasks.refresh_ingest_jobs.apply().get() == {"refreshed": 1, "requeued": 0}  # not stale yet
    IngestJob.objects.filter(pk=never_started.pk).update(updated_at=long_ago)
    IngestRow.objects.filter(job=stalled).update(updated_at=long_ago)

    tasks.refresh_ingest_jobs.apply()  # embedded: the queued work runs now
    for job in (never_started, stalled):
        job.refresh_from_db()
        assert job.status == "succeeded", job.pk
    assert Product.objects.get(sku="L-1").images.count() == 1


def test_a_chunk_whose_retries_are_spent_fails_its_rows_and_the_job_goes_on(images, monkeypatch):
    manifest = make_csv([["A-1", "a", "img/cat.jpg", "", "", ""]])
    job = ingest.ingest_job_create(manifest=ContentFile(manifest, name="m.csv"),
                                   archive=ContentFile(make_zip(images), name="a.zip"), start=False)
    ingest.ingest_job_start(job_id=job.pk, queue_chunks=False)
    monkeypatch.setattr(ingest, "_row_input", lambda *args: 1 / 0)
    tasks.ingest_rows.apply(kwargs={"job_id": job.pk, "first": 2, "last": 2})
    job.refresh_from_db()
    assert job.status == "completed_with_errors"
    assert ingest.ingest_job_errors(job=job) == [{"row": 2, "sku": "A-1", "error": "ingest failed: division by zero"}]


def test_the_command_shows_progress_and_a_summary(tmp_path, images):
    manifest = tmp_path / "products.csv"
    manifest.write_bytes(make_csv([
        ["CMD-1", "Cat", "img/cat.jpg", "prints", "1", ""],
        ["CMD-2", "Coffee", "img/coffee.jpg", "", "", ""],
        ["CMD-3", "Missing", "img/missing.jpg", "", "", ""],
    ]))
    archive = tmp_path / "images.zip"
    archive.write_bytes(make_zip(images))
    out = io.StringIO()
    call_command("ingest", str(manifest), "--archive", str(archive), stdout=out)
    text = out.getvalue()
    assert "[##############################] 100%  3/3 rows  2 ok  1 failed" in text
    assert "completed_with_errors: 3 rows, 2 succeeded, 1 failed; 2 new images, 0 already in the catalog; 2 of " \
           "the job's images indexed" in text
    assert "row 4 (CMD-3): image: img/missing.jpg is not in the archive" in text
    assert Product.objects.filter(sku__startswith="CMD-").count() == 2

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"sku,title\nA,a\n")
    with pytest.raises(CommandError, match="has no image column"):
        call_command("ingest", str(bad), stdout=io.StringIO())


def test_the_admin_shows_jobs_with_a_progress_bar(client, staff, images):
    manifest = make_csv([["ADM-1", "a", "img/cat.jpg", "", "", ""], ["ADM-2", "b", "img/x.jpg", "", "", ""]])
    body = run_job(staff, manifest, make_zip(images))
    client.force_login(get_user_model().objects.create_superuser("root", password="root-pass-123"))
    listing = client.get("/admin/catalog/ingestjob/").content.decode()
    assert 'class="ingest-progress" style="width:100%' in listing and "Completed With Errors" in listing
    page = client.get(f"/admin/catalog/ingestjob/{body['id']}/change/").content.decode()
    assert "row 3 (ADM-2): image: img/x.jpg is not in the archive" in page


def test_the_admin_uploads_a_manifest_and_its_archive_as_a_job(client, images):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client.force_login(get_user_model().objects.create_superuser("root", password="root-pass-123"))
    listing = client.get("/admin/catalog/ingestjob/").content.decode()
    assert 'href="/admin/catalog/ingestjob/add/"' in listing
    form = client.get("/admin/catalog/ingestjob/add/")
    assert form.status_code == 200 and 'id="ingest-upload"' in form.content.decode()
    manifest = make_csv([["FORM-1", "Cat", "img/cat.jpg", "prints", "5", ""]])
    done = client.post("/admin/catalog/ingestjob/add/", {
        "manifest": SimpleUploadedFile("autumn.csv", manifest), "archive": SimpleUploadedFile("a.zip", make_zip(images))},
        follow=True)
    job = IngestJob.objects.get()
    assert done.redirect_chain[-1][0] == f"/admin/catalog/ingestjob/{job.pk}/change/"
    assert f"Ingest job {job.pk} queued" in done.content.decode() and job.manifest_name == "autumn.csv"
    assert Product.objects.filter(sku="FORM-1").exists()  # tasks in-process here: the job ran
    refused = client.post("/admin/catalog/ingestjob/add/", {"manifest": SimpleUploadedFile("m.csv", b"name,price\na,1\n")})
    assert refused.status_code == 200 and "sku" in refused.content.decode() and IngestJob.objects.count() == 1
