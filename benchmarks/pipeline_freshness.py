"""Pipeline figures with one real Celery worker on this machine's PostgreSQL and Redis.

Prints (1) the images/s of one worker embedding and indexing a batch of real-photo images, and
(2) freshness: the time from an image's embedding being stored to the image being found by a search
in another process (this one), which polls the published index like the web processes do.

    .venv/bin/python benchmarks/pipeline_freshness.py [--n 200] [--fresh 20] [--backbone resnet50 --weights random]

It creates (and drops) the database `visualsearch_bench` and uses Redis database 14.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def photos(n: int) -> list[bytes]:
    import numpy as np
    from PIL import Image, ImageOps
    from skimage import data

    sources = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut(), data.hubble_deep_field()]
    out = []
    for i in range(n):
        img = Image.fromarray(sources[i % len(sources)])
        w, h = img.size
        x, y = (i * 17) % (w // 4), (i * 11) % (h // 4)
        img = img.crop((x, y, x + w * 3 // 4, y + h * 3 // 4))
        if i % 2:
            img = ImageOps.mirror(img)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + (i % 7) * 3, 0, 255).astype("uint8"))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images in the throughput batch")
    parser.add_argument("--fresh", type=int, default=20, help="single uploads timed for freshness")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--weights", default="random", help="random: same compute as the real weights")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="visualsearch-bench-"))
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", "DROP DATABASE IF EXISTS visualsearch_bench"], check=True)
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", "CREATE DATABASE visualsearch_bench"], check=True)
    subprocess.run(["redis-cli", "-n", "14", "flushdb"], check=True, capture_output=True)
    env = {
        **os.environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/visualsearch_bench",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/14",
        "SECRET_KEY": "benchmark-only",
        "VISUALSEARCH_DATA_DIR": str(data_dir),
        "VISUALSEARCH_BACKBONE": args.backbone,
        "VISUALSEARCH_WEIGHTS": args.weights,
        "DJANGO_SETTINGS_MODULE": "visualsearch.settings",
    }
    os.environ.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)

    import django

    django.setup()
    from catalog import pipeline, search, services
    from catalog.models import ProductImage

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "visualsearch", "worker", "-Q", "embed,index,default", "-c", "1",
         "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        cwd=REPO, env=env, stdout=open(data_dir / "worker.log", "w"), stderr=subprocess.STDOUT,
    )

    def wait(predicate, timeout=600):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"worker stalled; see {data_dir / 'worker.log'}")
            time.sleep(0.02)

    try:
        images = photos(args.n + args.fresh + 1)
        warm = services.product_create(sku="WARM", title="warm-up")
        image, _ = services.product_image_add(product=warm, data=images[0])
        wait(lambda: ProductImage.objects.filter(pk=image.pk, status="indexed").exists())  # model loaded

        ids = []
        for i, data in enumerate(images[1:args.n + 1]):
            product = services.product_create(sku=f"B-{i}", title=f"batch {i}")
            ids.append(services.product_image_add(product=product, data=data, queue=False)[0].pk)
        started = time.perf_counter()
        pipeline.images_queue_embedding(image_ids=ids)
        wait(lambda: ProductImage.objects.filter(id__in=ids, status="indexed").count() == len(ids))
        throughput = len(ids) / (time.perf_counter() - started)

        reader = search.index_reader()
        delays = []
        for i, data in enumerate(images[args.n + 1:]):
            product = services.product_create(sku=f"F-{i}", title=f"fresh {i}")
            image, _ = services.product_image_add(product=product, data=data)
            wait(lambda: ProductImage.objects.filter(pk=image.pk, embedding__isnull=False).exists())
            stored = time.perf_counter()
            wait(lambda: reader.current().contains(image.pk))
            delays.append(time.perf_counter() - stored)
        delays.sort()
        result = {
            "backbone": args.backbone,
            "worker_images_per_s": round(throughput, 2),
            "batch_images": len(ids),
            "freshness_p50_s": round(delays[len(delays) // 2], 3),
            "freshness_max_s": round(delays[-1], 3),
            "freshness_samples": len(delays),
        }
        print(f"one worker ({args.backbone}, {args.weights} weights): {throughput:.1f} images/s "
              f"over {len(ids)} images (decode + embed + index)")
        print(f"freshness, embedding stored -> found by search in another process: "
              f"p50 {result['freshness_p50_s']} s, max {result['freshness_max_s']} s over {len(delays)} uploads")
        print(json.dumps(result))
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        from django.db import connections

        connections.close_all()
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", "DROP DATABASE IF EXISTS visualsearch_bench"])


if __name__ == "__main__":
    main()
