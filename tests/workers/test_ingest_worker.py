"""An ingest job through real Celery workers on PostgreSQL and Redis (scripts/test, pass 2): a worker
killed in the middle of a chunk, and the job resumed by another without redoing a finished row."""
import io
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from catalog.models import IngestJob, IngestRow, Product, ProductImage
from tests.workers.live import crops, published_ids, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("services_only")]

ROWS = 240
CHUNK_ROWS = 120


def upload(photo) -> tuple[bytes, bytes]:
    """A manifest of ROWS products and a ZIP of their distinct 800x800 photos."""
    buf = io.BytesIO()
    lines = ["sku,title,image,category,price"]
    with zipfile.ZipFile(buf, "w") as archive:
        for i, data in enumerate(crops(photo, ROWS)):
            big = io.BytesIO()
            Image.open(io.BytesIO(data)).resize((800, 800)).save(big, format="JPEG", quality=90)
            archive.writestr(f"photos/{i:04d}.jpg", big.getvalue())
            lines.append(f"W-{i:04d},Photo {i},photos/{i:04d}.jpg,prints/crops,{i}.99")
    return ("\n".join(lines) + "\n").encode(), buf.getvalue()


def test_a_job_survives_a_worker_killed_mid_chunk_and_redoes_no_row(workers, staff, photo):
    workers.env["VISUALSEARCH_INGEST_CHUNK_ROWS"] = str(CHUNK_ROWS)
    manifest, archive = upload(photo)
    response = staff.post("/api/ingest-jobs/", {"manifest": SimpleUploadedFile("m.csv", manifest),
                                                "archive": SimpleUploadedFile("a.zip", archive)}, format="multipart")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    job_id = response.json()["id"]

    def done_rows() -> int:
        return IngestRow.objects.filter(job_id=job_id, status="done").count()

    first = workers.start("w1")
    wait_until(lambda: done_rows() >= 20, 120, "the first rows stored", workers)
    workers.kill(first)  # SIGKILL inside the first chunk: its message was never acknowledged
    finished = dict(IngestRow.objects.filter(job_id=job_id, status="done").values_list("number", "updated_at"))
    assert 20 <= len(finished) < CHUNK_ROWS, "the kill should land inside the first chunk"
    assert IngestJob.objects.get(pk=job_id).status == "running"

    workers.start("w2")
    seen = []

    def job_finished() -> bool:
        body = staff.get(f"/api/ingest-jobs/{job_id}/").json()
        seen.append((body["status"], body["processed"]))
        return body["status"] not in ("queued", "running")

    wait_until(job_finished, 300, f"ingest job {job_id} to finish", workers)

    body = staff.get(f"/api/ingest-jobs/{job_id}/").json()
    assert body["status"] == "succeeded", body
    assert (body["total"], body["processed"], body["succeeded"], body["failed"]) == (ROWS, ROWS, ROWS, 0)
    assert body["images_per_s"] > 0 and body["finished_at"] >= body["started_at"]
    assert body["seconds_to_first_image"] > 0  # the worker loading its model, reported apart from the pace
    assert any(status == "running" and 0 < processed < ROWS for status, processed in seen)  # progress showed

    after = dict(IngestRow.objects.filter(job_id=job_id, number__in=list(finished)).values_list("number", "updated_at"))
    assert after == finished  # rows finished before the crash were not done again
    assert Product.objects.count() == ROWS and ProductImage.objects.count() == ROWS
    assert set(ProductImage.objects.values_list("status", flat=True)) == {"indexed"}
    published = published_ids()
    assert len(published) == ROWS and set(published) == set(ProductImage.objects.values_list("id", flat=True))

    # The same manifest again, through the same worker: nothing new, and it still succeeds.
    response = staff.post("/api/ingest-jobs/", {"manifest": SimpleUploadedFile("m.csv", manifest),
                                                "archive": SimpleUploadedFile("a.zip", archive)}, format="multipart")
    again = response.json()["id"]
    wait_until(lambda: staff.get(f"/api/ingest-jobs/{again}/").json()["status"] == "succeeded", 120,
               "the second job", workers)
    assert Product.objects.count() == ROWS and ProductImage.objects.count() == ROWS
