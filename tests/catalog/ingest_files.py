"""Manifests, archives and job requests for the ingest tests."""
import csv
import io
import zipfile

from django.core.files.uploadedfile import SimpleUploadedFile

HEADER = ["sku", "title", "image", "category", "price", "description"]


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def make_csv(rows: list[list[str]], header: list[str] = HEADER) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def post_job(client, manifest: bytes, archive: bytes | None = None, name: str = "products.csv"):
    body = {"manifest": SimpleUploadedFile(name, manifest)}
    if archive is not None:
        body["archive"] = SimpleUploadedFile("images.zip", archive)
    return client.post("/api/ingest-jobs/", body, format="multipart")


def run_job(client, manifest: bytes, archive: bytes | None = None, name: str = "products.csv") -> dict:
    response = post_job(client, manifest, archive, name)
    assert response.status_code == 202, response.content
    assert set(response.json()) == {"id", "status"}
    job = client.get(f"/api/ingest-jobs/{response.json()['id']}/")
    assert job.status_code == 200
    return job.json()
