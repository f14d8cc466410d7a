"""What several benchmarks share: real-photo test images, an ingest upload, a seeded catalog, gunicorn."""
from __future__ import annotations

import contextlib
import io
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_variants(n: int, seed: int) -> list[bytes]:
    """n distinct JPEGs cut from scikit-image's photos: crops, flips, colour shifts."""
    from PIL import ImageOps
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut(), data.hubble_deep_field(),
               data.immunohistochemistry(), data.colorwheel(), data.retina()]
    out = []
    for i in range(n):
        img = Image.fromarray(sources[i % len(sources)][..., :3])
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 0.95)), int(h * rng.uniform(0.5, 0.95))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        shift = rng.integers(-25, 26, size=3)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype("uint8"))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def distinct_photos(n: int, size: int = 800, seed: int = 0):
    """n different size x size JPEGs from real photos: a random crop, a flip, a colour shift each."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()[..., :3]) for name in PHOTOS]
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        side = int(min(w, h) * rng.uniform(0.55, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        img = src.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        shift = rng.uniform(0.8, 1.2, size=3)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * shift, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        yield buf.getvalue()


def build_upload(n: int, size: int) -> tuple[bytes, bytes, list[bytes]]:
    """An ingest job's CSV manifest and ZIP of n distinct photos, and the photos themselves."""
    # Skus new to the catalog on every run: a rerun against a kept database must not find its images.
    run = time.strftime("%Y%m%d%H%M%S")
    zbuf, lines, images = io.BytesIO(), ["sku,title,image,category,price"], []
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress
        for i, data in enumerate(distinct_photos(n, size)):
            archive.writestr(f"images/{i:05d}.jpg", data)
            category, price = f"benchmark/{PHOTOS[i % len(PHOTOS)]}", f"{i % 90 + 9}.99"
            lines.append(f"BENCH-{run}-{i:05d},Benchmark photo {i},images/{i:05d}.jpg,{category},{price}")
            images.append(data)
    return ("\n".join(lines) + "\n").encode(), zbuf.getvalue(), images


def seed_catalog(n: int) -> None:
    """n products in 20 categories, one distinct photo each, embedded and indexed in this process.

    Needs Django set up with tasks in-process (the embedded default, or VISUALSEARCH_TASKS_EAGER=1).
    """
    from catalog import pipeline, services

    categories = [services.category_get_or_create_path(path=f"dept-{i}/shelf-{j}") for i in range(4) for j in range(5)]
    ids = []
    for i, data in enumerate(photo_variants(n, seed=1)):
        product = services.product_create(sku=f"P-{i:05d}", title=f"Product {i}", price=5 + i % 95,
                                          category=categories[i % len(categories)])
        ids.append(services.product_image_add(product=product, data=data, queue=False)[0].pk)
    for start in range(0, len(ids), 64):
        pipeline.images_embed(image_ids=ids[start:start + 64])  # in-process: indexes too


@contextlib.contextmanager
def gunicorn(env: dict, port: int, *, workers: int = 1, threads: int = 2, log=None) -> Iterator[str]:
    """The app under gunicorn on 127.0.0.1:port until the block ends; yields its base URL once it answers."""
    import requests

    server = subprocess.Popen(
        [str(REPO / ".venv/bin/gunicorn"), "visualsearch.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--threads", str(threads), "--timeout", "120", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                requests.get(f"{url}/api/health/", timeout=5)
                break
            except requests.RequestException:
                if server.poll() is not None:
                    raise RuntimeError(f"gunicorn exited with status {server.returncode}") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def embedded_catalog(work: Path) -> None:
    """A fresh embedded catalog under ``work`` in this process: SQLite, tasks in-process, the offline model
    (EfficientNet-Lite0, ImageNet weights); Django set up, the data directory prepared, migrated."""
    import os

    os.environ.update({"VISUALSEARCH_DATA_DIR": str(work / "data"), "DJANGO_SETTINGS_MODULE": "visualsearch.settings",
                       "VISUALSEARCH_BACKBONE": "efficientnet_lite0", "VISUALSEARCH_WEIGHTS": "imagenet",
                       "VISUALSEARCH_TASKS_EAGER": "1"})
    import django

    django.setup()
    from django.core.management import call_command

    call_command("prepare_data", stdout=io.StringIO())
    call_command("migrate", "--noinput", stdout=io.StringIO())


def machine() -> str:
    """The line each benchmark ends with: the CPU's model name and how many cores."""
    import os

    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    return f"machine: {cpu}, {os.cpu_count()} cores"
