"""The service at catalog scale: a million images filled through the database, reindexed, then served.

    .venv/bin/python benchmarks/index_at_scale.py --n 1000000 --work /tmp/scale-sqlite
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/scale .venv/bin/python benchmarks/index_at_scale.py \
        --n 1000000 --work /tmp/scale-pg --skip-live

1. fill: ``--n`` images of n/3 products in 100 categories (prices 1.00 to 100.99), each with a clustered
   synthetic embedding (benchmarks/_vectors.py) under the identity of the offline model
   (EfficientNet-Lite0), which embeds the uploads and queries below: a catalog's database after embedding.
   Bulk inserts, outside any clock that matters.
2. ``manage.py reindex`` in a subprocess: seconds, peak memory (its own report), the index it built.
3. live (embedded mode: gunicorn with tasks in-process): 20 uploads of new real photos through the API,
   each timed until a search by the same photo answers it first (p50, p95); search latency unfiltered,
   with a category filter keeping 1 % of the catalog and with a price filter keeping 1 % (p50, p95 from
   the client); an ingest job of ``--ingest`` photos on this catalog and the same job on an empty catalog,
   in one run (images/s of each, and their ratio).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import build_upload, gunicorn, photo_variants  # noqa: E402
from benchmarks._vectors import CatalogPhotos  # noqa: E402

CATEGORIES = 100
DIM = 1280  # EfficientNet-Lite0


def environment(work: Path) -> dict:
    env = {**os.environ, "VISUALSEARCH_DATA_DIR": str(work / "data"), "DJANGO_SETTINGS_MODULE": "visualsearch.settings",
           "VISUALSEARCH_BACKBONE": "efficientnet_lite0", "VISUALSEARCH_WEIGHTS": "imagenet",
           "VISUALSEARCH_SEARCH_RATE": "100000/min", "VISUALSEARCH_UPLOAD_RATE": "100000/min"}
    if os.environ.get("DATABASE_URL"):
        env.setdefault("SECRET_KEY", "benchmark-only-secret-key-not-for-production")
        env.setdefault("VISUALSEARCH_SSL_REDIRECT", "0")
        env["VISUALSEARCH_TASKS_EAGER"] = "1"
    return env


def manage(env: dict, *args: str) -> str:
    done = subprocess.run([str(REPO / ".venv/bin/python"), "manage.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def fill(n: int) -> str:
    """The catalog's rows, bulk-inserted; returns the model identity the embeddings are filed under."""
    from django.db import connection, transaction

    from catalog import services
    from catalog.models import Category, Product, ProductImage, embedding_to_bytes
    from catalog.serving import get_embedder

    identity = get_embedder().identity.key
    parent = services.category_get_or_create_path(path="scale")
    categories = [Category.objects.get_or_create(name=f"Aisle {i}", slug=f"aisle-{i}", parent=parent)[0]
                  for i in range(CATEGORIES)]
    photos = CatalogPhotos(n, DIM)
    n_products = photos.n_products
    started = time.perf_counter()
    batch = 20_000
    for start in range(0, n_products, batch):
        with transaction.atomic():
            Product.objects.bulk_create([
                Product(sku=f"S-{i:07d}", title=f"Scale product {i}", price=f"{1 + i % 100}.{i % 97:02d}",
                        category=categories[i % CATEGORIES]) for i in range(start, min(n_products, start + batch))
            ], batch_size=5000)
    product_ids = np.array(Product.objects.filter(sku__startswith="S-").order_by("id").values_list("id", flat=True))
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch))
        vectors = photos.photos(rows % n_products)
        with transaction.atomic():
            ProductImage.objects.bulk_create([
                ProductImage(product_id=int(product_ids[r % n_products]), file=f"images/scale/{r}.jpg",
                             sha256=hashlib.sha256(str(r).encode()).hexdigest(), width=800, height=800,
                             status=ProductImage.Status.INDEXED, model_identity=identity,
                             embedding=embedding_to_bytes(v))
                for r, v in zip(rows.tolist(), vectors)
            ], batch_size=2000)
        if start % 100_000 == 0:
            print(f"  filled {start + len(rows)} images ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"fill: {n} images of {n_products} products in {time.perf_counter() - started:.0f} s "
          f"({connection.vendor})", flush=True)
    return identity


def upload_freshness(url: str, staff: str, photos: list[bytes], product_id: int) -> list[float]:
    import requests

    headers = {"Authorization": f"Token {staff}"}
    seconds = []
    for data in photos:
        started = time.perf_counter()
        response = requests.post(f"{url}/api/products/{product_id}/images/", headers=headers,
                                 files={"image": ("new.jpg", data, "image/jpeg")}, timeout=120)
        response.raise_for_status()
        image_id = response.json()["id"]
        while time.perf_counter() - started < 60:
            found = requests.post(f"{url}/api/search/", files={"image": ("q.jpg", data, "image/jpeg")},
                                  data={"k": "1"}, timeout=60).json()
            if found["results"] and found["results"][0]["image"] == image_id:
                break
            time.sleep(0.05)
        seconds.append(time.perf_counter() - started)
    return seconds


def search_latency(url: str, photos: list[bytes], **filters) -> list[float]:
    import requests

    seconds = []
    for data in photos:
        started = time.perf_counter()
        response = requests.post(f"{url}/api/search/", files={"image": ("q.jpg", data, "image/jpeg")},
                                 data={"k": "10", **{k: str(v) for k, v in filters.items()}}, timeout=60)
        seconds.append(time.perf_counter() - started)
        body = response.json()
        assert response.status_code == 200 and len(body["results"]) == 10, body
    return seconds


def ingest_seconds(url: str, staff: str, count: int) -> float:
    import requests

    manifest, archive, _ = build_upload(count, 800)
    headers = {"Authorization": f"Token {staff}"}
    started = time.perf_counter()
    response = requests.post(f"{url}/api/ingest-jobs/", headers=headers, timeout=3600,
                             files={"manifest": ("m.csv", manifest), "archive": ("a.zip", archive)})
    response.raise_for_status()
    job = response.json()["id"]
    while True:
        state = requests.get(f"{url}/api/ingest-jobs/{job}/", headers=headers, timeout=60).json()
        if state["status"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    assert state["succeeded"] == count, state
    return time.perf_counter() - started


def staff_token(env: dict) -> str:
    return manage(env, "shell", "-c", (
        "from django.contrib.auth import get_user_model; from rest_framework.authtoken.models import Token; "
        "u, _ = get_user_model().objects.get_or_create(username='bench', defaults={'is_staff': True}); "
        "print(Token.objects.get_or_create(user=u)[0].key)")).strip().splitlines()[-1]


def pct(values) -> str:
    return f"p50 {np.percentile(values, 50):.3f} s, p95 {np.percentile(values, 95):.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--ingest", type=int, default=300, help="photos in the ingest job (0: none)")
    parser.add_argument("--skip-fill", action="store_true", help="the database under --work is filled already")
    parser.add_argument("--skip-live", action="store_true", help="fill and reindex only")
    parser.add_argument("--port", type=int, default=8731)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="index-scale-"))
    env = environment(work)
    os.environ.update(env)
    manage(env, "prepare_data")
    manage(env, "migrate", "--noinput")
    import django

    django.setup()
    print(f"catalog at scale: n={args.n}, database {os.environ.get('DATABASE_URL') or 'SQLite (embedded)'}, "
          f"in {work}", flush=True)
    if not args.skip_fill:
        fill(args.n)

    started = time.perf_counter()
    report = manage(env, "reindex")
    print(f"reindex: {time.perf_counter() - started:.0f} s\n  " + "\n  ".join(
        line.split("\r")[-1] for line in report.strip().splitlines()[-4:]), flush=True)
    if args.skip_live:
        return

    from catalog.models import Category, Product

    staff = staff_token(env)
    product = Product.objects.filter(sku__startswith="S-").order_by("id").first()
    aisle = Category.objects.get(slug="aisle-7")
    uploads = photo_variants(20, seed=11)
    queries = photo_variants(30, seed=12)
    with gunicorn(env, args.port, workers=1, threads=4) as url:
        search_latency(url, queries[:3])  # warm: the model and the index loaded
        seen = upload_freshness(url, staff, uploads, product.pk)
        print(f"upload -> found by search: {pct(seen)} (20 uploads)", flush=True)
        plain = search_latency(url, queries)
        by_category = search_latency(url, queries, category=aisle.pk)
        by_price = search_latency(url, queries, min_price="1.00", max_price="1.99")
        print(f"search from the client, k=10: unfiltered {pct(plain)}; category keeping 1 % {pct(by_category)}; "
              f"price keeping 1 % {pct(by_price)}", flush=True)
        if args.ingest:
            full = ingest_seconds(url, staff, args.ingest)
    if args.ingest:
        empty = Path(tempfile.mkdtemp(prefix="index-scale-empty-"))
        empty_env = {**environment(empty)}
        if os.environ.get("DATABASE_URL"):
            empty_env["DATABASE_URL"] = os.environ["DATABASE_URL"] + "_empty"
        manage(empty_env, "prepare_data")
        manage(empty_env, "migrate", "--noinput")
        with gunicorn(empty_env, args.port + 1, workers=1, threads=4) as url:
            empty_staff = staff_token(empty_env)
            ingest_seconds(url, empty_staff, 1)  # the model loaded, as on the full catalog
            bare = ingest_seconds(url, empty_staff, args.ingest)
        print(f"ingest of {args.ingest} photos: {args.ingest / full:.1f} images/s on the {args.n}-image catalog, "
              f"{args.ingest / bare:.1f} on an empty one: {bare / full:.2f}x", flush=True)
    print(json.dumps({"n": args.n, "upload_seen_p95": float(np.percentile(seen, 95))}))


if __name__ == "__main__":
    main()
