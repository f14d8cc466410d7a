"""What /media/ serves: uploaded images as the image type they are, with no way to have a file read as a page."""
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from catalog import services

pytestmark = pytest.mark.django_db(transaction=True)

SVG = b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'></svg>"
HTML = b"<html><body><script>alert(document.cookie)</script></body></html>"


@pytest.fixture
def product():
    return services.product_create(sku="MUG-1", title="Mug")


def fetch(client, url: str):
    return client.get(url.replace("http://testserver", ""))


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_an_uploaded_image_is_served_as_its_real_type(staff, anon, product, photo, offline_model, fmt, content_type):
    data = photo("chelsea", fmt=fmt, size=(64, 48))
    # The name a client gives says nothing: the stored name comes from the decoded format.
    upload = staff.post(f"/api/products/{product.pk}/images/", {"image": SimpleUploadedFile("page.html", data)},
                        format="multipart")
    assert upload.status_code == 201, upload.content
    response = fetch(anon, upload.json()["url"])
    assert response.status_code == 200
    assert response["Content-Type"] == content_type
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response["Content-Security-Policy"]
    assert b"".join(response.streaming_content) == data


@pytest.mark.parametrize("name", ["images/ab/page.html", "images/ab/drawing.svg", "images/ab/page.htm",
                                  "images/ab/noextension", "images/ab/photo.JPG.html"])
def test_no_stored_file_is_served_as_a_page_or_svg(anon, name):
    stored = default_storage.save(name, ContentFile(SVG if "svg" in name else HTML))
    response = anon.get(f"/media/{stored}")
    assert response.status_code == 404  # the site's own "not found" page, never the file
    assert b"alert(" not in response.content


def test_ingest_uploads_are_downloads_for_staff_only(staff, anon, admin_client):
    response = staff.post("/api/ingest-jobs/", {
        "manifest": SimpleUploadedFile("page.html", b"sku,title,image\nCAT-1,Cat,photos/cat.jpg\n"),
    }, format="multipart")
    assert response.status_code == 202, response.content
    folder = f"ingest/{response.json()['id']}"
    names = default_storage.listdir(folder)[1]
    assert names
    for name in names:
        url = f"/media/{folder}/{name}"
        assert anon.get(url).status_code == 404
        assert staff.get(url).status_code == 404  # a token is for the API, not for files
        download = admin_client.get(url)  # the admin links a job's manifest
        assert download.status_code == 200
        assert download["Content-Type"] == "application/octet-stream"
        assert download["Content-Disposition"] == "attachment"
        assert "sandbox" in download["Content-Security-Policy"]


@pytest.mark.parametrize("path", ["images/../ingest/1/photo.jpg", "images/%2e%2e/ingest/1/photo.jpg"])
def test_a_path_out_of_the_images_folder_is_not_served(anon, path):
    default_storage.save("ingest/1/photo.jpg", ContentFile(b"\xff\xd8\xff"))
    assert anon.get(f"/media/{path}").status_code == 404
