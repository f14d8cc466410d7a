"""End-to-end bulk ingest images/s through the API, next to the bare embedding images/s of the same model.

    .venv/bin/python benchmarks/ingest_throughput.py --n 2000

N distinct 800x800 JPEGs are made from scikit-image's real photos (astronaut, coffee, chelsea, rocket:
random crops, flips and colour shifts), zipped with a CSV manifest, and POSTed to /api/ingest-jobs/ as a
staff client would; the clock runs from the POST until GET /api/ingest-jobs/{id}/ says the job finished,
i.e. until every image is stored, embedded and searchable in the published index. A one-image job runs
first, outside the clock, so that a worker has loaded its model as this process has.

Mode: by default the embedded default (a fresh SQLite database and data directory in a temporary folder,
Celery tasks in-process), so the one "worker" is this process. With DATABASE_URL and CELERY_BROKER_URL
set (a migrated database; VISUALSEARCH_DATA_DIR shared with the worker) it measures through one worker
started as `celery -A visualsearch worker -c 1 -Q embed,index,default`.

The bare figure is `serving.get_embedder().embed` alone on the same images, decoded beforehand exactly
as the pipeline decodes them (outside the clock), in batches of EMBED_BATCH_SIZE; it is measured before
and after the ingest and averaged, so the load of a shared machine weighs on both figures alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import build_upload  # noqa: E402


def bare_embedding(model, images: list[bytes], batch_size: int) -> tuple[float, float]:
    """Images/s of model.embed alone, and its CPU seconds per image; decoding happens outside the clock,
    as the pipeline decodes."""
    from django.conf import settings

    from ml.images import decode_image

    seconds = cpu = 0.0
    for start in range(0, len(images), batch_size):
        decoded = [
            decode_image(data, allowed_formats=frozenset(settings.IMAGE_ALLOWED_FORMATS),
                         max_pixels=settings.IMAGE_MAX_PIXELS, min_side=model.min_side)[0]
            for data in images[start:start + batch_size]
        ]
        t, c = time.perf_counter(), time.process_time()
        model.embed(decoded)
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
    return len(images) / seconds, cpu / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    parser.add_argument("--size", type=int, default=800, help="side of each square JPEG (default 800)")
    args = parser.parse_args()

    embedded = not (os.environ.get("DATABASE_URL") or os.environ.get("CELERY_BROKER_URL"))
    if embedded:
        data_dir = tempfile.mkdtemp(prefix="ingest-bench-")
        os.environ["VISUALSEARCH_DATA_DIR"] = data_dir
        try:
            run(args, embedded)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    else:
        run(args, embedded)


def run(args: argparse.Namespace, embedded: bool) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "visualsearch.settings")
    import django
    import torch

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from catalog import serving

    if embedded:
        call_command("migrate", verbosity=0)
    t = time.perf_counter()
    manifest, archive, images = build_upload(args.n, args.size)
    print(f"data: {args.n} distinct {args.size}x{args.size} JPEGs, ZIP {len(archive) / 1e6:.1f} MB "
          f"({time.perf_counter() - t:.1f} s to make)")

    model = serving.get_embedder()
    model.embed([Image.new("RGB", (args.size, args.size))] * 2)  # warm up: first-call allocations
    print(f"model: {model.identity.key} on {model.device}, {model.precision}, torch threads "
          f"{torch.get_num_threads()}; batch {settings.EMBED_BATCH_SIZE}; "
          f"mode: {'embedded (tasks in-process)' if embedded else 'one worker via ' + settings.CELERY_BROKER_URL}")

    bare_before = bare_embedding(model, images, settings.EMBED_BATCH_SIZE)

    user, _ = get_user_model().objects.get_or_create(username="ingest-benchmark", defaults={"is_staff": True})
    client = APIClient()
    client.force_authenticate(user=user)

    def ingest(manifest: bytes, archive: bytes) -> dict:
        response = client.post("/api/ingest-jobs/", {"manifest": SimpleUploadedFile("bench.csv", manifest),
                                                     "archive": SimpleUploadedFile("bench.zip", archive)},
                               format="multipart")
        assert response.status_code == 202, response.content
        while True:
            body = client.get(f"/api/ingest-jobs/{response.json()['id']}/").json()
            if body["status"] not in ("queued", "running"):
                return body
            time.sleep(0.2)

    # One image first, outside the clock, so a worker has loaded its model as this process has.
    warm_up = ingest(f"sku,title,image\nWARM-UP-{time.time_ns()},warm-up,images/00000.jpg\n".encode(), archive)
    assert warm_up["status"] == "succeeded", warm_up

    t0, c0 = time.perf_counter(), time.process_time()
    body = ingest(manifest, archive)
    end_to_end = args.n / (time.perf_counter() - t0)
    end_to_end_cpu = (time.process_time() - c0) / args.n
    assert body["status"] == "succeeded" and body["succeeded"] == args.n, body

    bare_after = bare_embedding(model, images, settings.EMBED_BATCH_SIZE)
    bare = (bare_before[0] + bare_after[0]) / 2
    bare_cpu = (bare_before[1] + bare_after[1]) / 2
    print(f"bare embedding:         {bare:7.2f} images/s (before {bare_before[0]:.2f}, after {bare_after[0]:.2f})")
    print(f"end-to-end via the API: {end_to_end:7.2f} images/s (the job's own images_per_s: {body['images_per_s']})")
    print(f"ratio:                  {end_to_end / bare:7.1%} (target: at least 85 %)")
    if embedded:
        # On a machine others share, CPU seconds per image move less with their load than wall time does.
        print(f"CPU s per image:        bare {bare_cpu:.3f}, end-to-end {end_to_end_cpu:.3f}, "
              f"ratio {bare_cpu / end_to_end_cpu:.1%}")


if __name__ == "__main__":
    main()
