"""/api/search/ latency from a client, against a catalog of real-photo products served by gunicorn.

    .venv/bin/python benchmarks/search_latency.py [--products 1000] [--queries 200] [--backbone resnet50 --weights random]

Builds the catalog in a temporary data directory on the embedded default (SQLite), embeds it with the
chosen model (random ResNet-50 weights have the real weights' compute; the real file cannot be
downloaded here), starts gunicorn on 127.0.0.1, and times multipart photo searches one after another
from this process. Prints p50 and p95 in milliseconds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import gunicorn, photo_variants, seed_catalog  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="visualsearch-latency-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update({
        "VISUALSEARCH_DATA_DIR": str(data_dir), "VISUALSEARCH_BACKBONE": args.backbone,
        "VISUALSEARCH_WEIGHTS": args.weights, "VISUALSEARCH_SEARCH_RATE": "100000/min",
        "DJANGO_SETTINGS_MODULE": "visualsearch.settings",
    })
    os.environ.clear()
    os.environ.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)

    import django

    django.setup()
    import logging

    logging.disable(logging.INFO)
    started = time.perf_counter()
    seed_catalog(args.products)
    print(f"catalog: {args.products} products embedded and indexed in {time.perf_counter() - started:.0f} s "
          f"({args.backbone}, {args.weights} weights)", flush=True)

    import requests

    with gunicorn(env, args.port, workers=1, threads=2) as base:
        url = f"{base}/api/search/"
        queries = photo_variants(args.queries + 5, seed=2)
        session = requests.Session()
        for data in queries[:5]:  # warm-up: model load, first index read
            session.post(url, files={"image": ("q.jpg", data, "image/jpeg")}, timeout=120).raise_for_status()
        latencies, server_ms = [], []
        for data in queries[5:]:
            t0 = time.perf_counter()
            response = session.post(url, files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": 10}, timeout=60)
            latencies.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
            body = response.json()
            assert len(body["results"]) == 10
            server_ms.append(body["took_ms"])
    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"/api/search/ over {len(latencies)} photo queries, k=10, {args.products} products, "
          f"{args.backbone}, {os.cpu_count()} cores: p50 {p50:.0f} ms, p95 {p95:.0f} ms "
          f"(server-side took_ms p50 {statistics.median(server_ms):.0f})")
    print(json.dumps({"products": args.products, "queries": len(latencies), "backbone": args.backbone,
                      "p50_ms": round(p50, 1), "p95_ms": round(p95, 1)}))


if __name__ == "__main__":
    main()
