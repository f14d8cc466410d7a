"""A bounded load test on 127.0.0.1: concurrent clients searching while an ingest job runs.

    .venv/bin/python benchmarks/load_test.py [--clients 50] [--seconds 60] [--ingest 1000] [--products 1000]
                                             [--batching on|off|compare]

The production layout on one machine: gunicorn (--server-workers x --server-threads) and one Celery worker
with beat (-c 1, every queue) on PostgreSQL and Redis. A catalog of --products real-photo products is
embedded first; then an ingest job of --ingest distinct 800x800 JPEGs is POSTed to /api/ingest-jobs/ and,
while it runs, --clients threads send multipart photo searches (k=10) one after another for --seconds.
Afterwards it waits for the job to finish and prints the searches (requests, errors: every non-2xx, with
429s counted apart, and requests that got no answer), their p50/p95/p99 latency and throughput, and the
job's outcome. The exit status is 1 if any search failed or any ingest row did not succeed.

--batching compare (the default) runs the searching twice against the same catalog, the server started
first without query batching (VISUALSEARCH_QUERY_BATCH_WAIT_MS=0: one forward pass per request) and then
with it (--batch-wait-ms), and prints both side by side; the ingest job runs in the first phase
only, so use --ingest 0 for a comparison of searching alone.

It creates the database named by --database (default `visualsearch_load` on 127.0.0.1:5432; dropped
first and afterwards) and empties the Redis database of --redis (default 13) before and after. ResNet-50 with random weights by
default: the same compute as the real weights, whose file cannot be downloaded here.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import build_upload, gunicorn, machine, photo_variants, seed_catalog  # noqa: E402

# One address sends every search here, and the search throttle counts per address.
SEARCH_RATE = "1000000/min"


@dataclass
class Searches:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    no_answer: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_ms: float, status: int | None, problem: str = "") -> None:
        with self.lock:
            if status is None:
                self.no_answer[problem] += 1
            else:
                self.statuses[status] += 1
                if 200 <= status < 300:
                    self.latencies_ms.append(latency_ms)
            if (status is None or not 200 <= status < 300) and len(self.first_errors) < 5:
                self.first_errors.append(f"{status or 'no answer'}: {problem[:200]}")

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.no_answer.values())

    @property
    def errors(self) -> int:
        return self.requests - sum(n for status, n in self.statuses.items() if 200 <= status < 300)


def search_client(url: str, queries: list[bytes], offset: int, deadline: float, timeout: float,
                  results: Searches) -> None:
    import requests

    session = requests.Session()
    i = offset
    while time.monotonic() < deadline:
        data = queries[i % len(queries)]
        i += 1
        started = time.perf_counter()
        try:
            response = session.post(url, files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": 10},
                                    timeout=timeout)
        except requests.RequestException as exc:
            results.record((time.perf_counter() - started) * 1000, None, type(exc).__name__)
            continue
        latency = (time.perf_counter() - started) * 1000
        ok = response.status_code == 200 and len(response.json().get("results", [])) > 0
        if response.status_code == 200 and not ok:
            results.record(latency, None, "200 without results")
        else:
            results.record(latency, response.status_code, "" if ok else response.text)


def drop_database(url: str, *, create: bool = False) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent searching clients (default 50)")
    parser.add_argument("--seconds", type=float, default=60, help="how long they search (default 60)")
    parser.add_argument("--ingest", type=int, default=1000, help="images in the ingest job (default 1000)")
    parser.add_argument("--ingest-size", type=int, default=800, help="side of each ingested JPEG (default 800)")
    parser.add_argument("--ingest-timeout", type=float, default=3600, help="most seconds to wait for the job")
    parser.add_argument("--products", type=int, default=1000, help="catalog size before the test (default 1000)")
    parser.add_argument("--backbone", default=os.environ.get("VISUALSEARCH_BACKBONE", "resnet50"))
    parser.add_argument("--weights", default=os.environ.get("VISUALSEARCH_WEIGHTS", "random"))
    parser.add_argument("--server-workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    parser.add_argument("--server-threads", type=int, default=8, help="threads per gunicorn worker (default 8)")
    parser.add_argument("--request-timeout", type=float, default=60, help="a search unanswered this long fails")
    parser.add_argument("--search-rate", default=SEARCH_RATE,
                        help=f"the server's VISUALSEARCH_SEARCH_RATE (default {SEARCH_RATE})")
    parser.add_argument("--batching", choices=("compare", "on", "off"), default="compare",
                        help="embed concurrent searches together (on), one by one (off), or both in turn (compare)")
    parser.add_argument("--batch-wait-ms", type=int, default=3, help="the batch's gathering time when on (default 3)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/visualsearch_load")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="visualsearch-load-"))
    drop_database(args.database, create=True)
    import redis

    redis.Redis.from_url(args.redis).flushdb()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VISUALSEARCH_TASKS_EAGER")}
    env.update({
        "DATABASE_URL": args.database, "CELERY_BROKER_URL": args.redis, "SECRET_KEY": secrets.token_urlsafe(50),
        "VISUALSEARCH_SSL_REDIRECT": "0", "VISUALSEARCH_DATA_DIR": str(data_dir),
        "VISUALSEARCH_BACKBONE": args.backbone, "VISUALSEARCH_WEIGHTS": args.weights,
        "VISUALSEARCH_SEARCH_RATE": args.search_rate, "VISUALSEARCH_LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "visualsearch.settings",
    })
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)

    # This process seeds the catalog with tasks in-process; the server and the worker get the plain env.
    os.environ.clear()
    os.environ.update({**env, "VISUALSEARCH_TASKS_EAGER": "1"})
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    started = time.perf_counter()
    seed_catalog(args.products)
    print(f"catalog: {args.products} products embedded and indexed in {time.perf_counter() - started:.0f} s "
          f"({args.backbone}, {args.weights} weights)", flush=True)
    user = get_user_model().objects.create_user("load-test", is_staff=True)
    token = Token.objects.create(user=user).key
    manifest, archive, _ = build_upload(args.ingest, args.ingest_size)
    queries = photo_variants(200, seed=2)
    print(f"ingest upload: {args.ingest} distinct {args.ingest_size}x{args.ingest_size} JPEGs, "
          f"ZIP {len(archive) / 1e6:.1f} MB", flush=True)

    worker_log = open(data_dir / "worker.log", "w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "visualsearch", "worker", "-B", "-Q", "embed,index,default",
         "-c", "1", "-n", "load@%h", "--loglevel", "WARNING", "-s", str(data_dir / "beat")],
        cwd=REPO, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    status = 1
    phases = {"compare": ("off", "on"), "on": ("on",), "off": ("off",)}[args.batching]
    outcomes = {}
    try:
        for number, phase in enumerate(phases):
            phase_env = {**env, "VISUALSEARCH_QUERY_BATCH_WAIT_MS": "0" if phase == "off" else str(args.batch_wait_ms)}
            print(f"\n--- query batching {phase} ---", flush=True)
            with gunicorn(phase_env, args.port, workers=args.server_workers, threads=args.server_threads,
                          log=open(data_dir / f"web-{phase}.log", "w")) as base:
                outcomes[phase] = run(args, base, token, manifest, archive, queries, ingest=number == 0)
        status = max(code for code, _ in outcomes.values())
        if len(outcomes) == 2:
            off, on = outcomes["off"][1], outcomes["on"][1]
            print(f"\nquery batching, {args.clients} clients: searches/s {off['searches_per_s']} -> "
                  f"{on['searches_per_s']} ({on['searches_per_s'] / off['searches_per_s']:.2f}x), p95 "
                  f"{off['p95_ms']:.0f} -> {on['p95_ms']:.0f} ms, p50 {off['p50_ms']:.0f} -> {on['p50_ms']:.0f} ms")
        print(machine())
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        from django.db import connections

        connections.close_all()
        drop_database(args.database)
        redis.Redis.from_url(args.redis).flushdb()
        if status:
            print(f"FAILED: the server's and the worker's logs are in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return status


def run(args, base: str, token: str, manifest: bytes, archive: bytes, queries: list[bytes], *,
        ingest: bool = True) -> tuple[int, dict]:
    import requests

    staff = requests.Session()
    staff.headers["Authorization"] = f"Token {token}"

    def post_job(manifest: bytes) -> int:
        response = staff.post(f"{base}/api/ingest-jobs/", files={"manifest": ("load.csv", manifest, "text/csv"),
                                                                 "archive": ("load.zip", archive, "application/zip")},
                              timeout=600)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait_job(job_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = staff.get(f"{base}/api/ingest-jobs/{job_id}/", timeout=60).json()
            if body["status"] not in ("queued", "running") or time.monotonic() > deadline:
                return body
            time.sleep(1)

    ingest = ingest and args.ingest > 0
    # Warm-up, outside the clock: the worker loads its model (a one-row job), each server process its own.
    if ingest:
        first_row = manifest.decode().splitlines()[1].split(",", 1)[1]
        warm_up = wait_job(post_job(f"sku,title,image,category,price\nWARM-UP,{first_row}\n".encode()), 600)
        assert warm_up["status"] == "succeeded", warm_up
    for data in queries[: 4 * args.server_workers]:
        requests.post(f"{base}/api/search/", files={"image": ("q.jpg", data, "image/jpeg")}, timeout=120).raise_for_status()

    ingest_started = time.monotonic()
    job_id = post_job(manifest) if ingest else None
    results = Searches()
    search_started = time.monotonic()
    deadline = search_started + args.seconds
    clients = [
        threading.Thread(target=search_client, daemon=True,
                         args=(f"{base}/api/search/", queries, i * 7, deadline, args.request_timeout, results))
        for i in range(args.clients)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    search_seconds = time.monotonic() - search_started
    if ingest:
        during = staff.get(f"{base}/api/ingest-jobs/{job_id}/", timeout=60).json()
        job = wait_job(job_id, args.ingest_timeout)
        ingest_seconds = (time.monotonic() - ingest_started) if job["status"] not in ("queued", "running") else None

    lat = np.array(results.latencies_ms) if results.latencies_ms else np.array([np.nan])
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    throttled = results.statuses.get(429, 0)
    other = results.errors - throttled - sum(results.no_answer.values())
    print(f"\n{args.clients} clients x {search_seconds:.0f} s of POST /api/search/ (photo, k=10), "
          f"{args.products}-product catalog, {f'while ingesting {args.ingest} images' if ingest else 'no ingest'}; "
          f"{args.backbone} "
          f"({args.weights} weights); gunicorn {args.server_workers} workers x {args.server_threads} threads, "
          f"one Celery worker; {os.cpu_count()} cores")
    print(f"search throttle set to {args.search_rate} for this test (VISUALSEARCH_SEARCH_RATE; default 600/min "
          f"per client): every client here shares the address 127.0.0.1, so the default would refuse most searches")
    no_answer = sum(results.no_answer.values())
    print(f"requests: {results.requests}  errors: {results.errors} (429: {throttled}, other non-2xx: {other}, "
          f"no answer: {no_answer}{' ' + str(dict(results.no_answer)) if no_answer else ''})")
    for line in results.first_errors:
        print(f"  e.g. {line}")
    print(f"latency ms (answered 2xx): p50 {p50:.0f}, p95 {p95:.0f}, p99 {p99:.0f}, max {np.nanmax(lat):.0f}")
    print(f"throughput: {results.requests / search_seconds:.1f} searches/s")
    figures = {
        "clients": args.clients, "seconds": round(search_seconds, 1), "requests": results.requests,
        "errors": results.errors, "status_429": throttled, "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1),
        "searches_per_s": round(results.requests / search_seconds, 2),
    }
    failed = bool(results.errors)
    if ingest:
        finished = f"in {ingest_seconds:.0f} s ({args.ingest / ingest_seconds:.1f} images/s)" if ingest_seconds else \
            f"not finished after {args.ingest_timeout:.0f} s"
        print(f"ingest job {job_id}: {job['status']}, {job['total']} rows: {job['succeeded']} done, "
              f"{job['failed']} failed, {finished}; {during['processed']} rows processed when the searching stopped")
        for error in job["errors"][:5]:
            print(f"  row {error['row']} ({error['sku']}): {error['error']}")
        figures.update({"ingest_status": job["status"], "ingest_done": job["succeeded"],
                        "ingest_failed": job["failed"], "ingest_s": round(ingest_seconds, 1) if ingest_seconds else None})
        failed = failed or job["status"] != "succeeded" or job["succeeded"] != args.ingest
    print(json.dumps(figures))
    return int(failed), figures


if __name__ == "__main__":
    sys.exit(main())
