"""Exact vs approximate index on clustered synthetic embeddings: build time, size, recall, latency.

    .venv/bin/python benchmarks/index_recall.py --n 100000 --dim 2048

The vectors imitate a catalog's CNN embeddings rather than uniform noise (benchmarks/_vectors.py).
Queries are new photos of catalog products.
Latency is one query at a time on one thread, as a web request runs it. Memory is the index's
file size (what a reader loads) and the growth of this process's resident memory while it was built.

    .venv/bin/python benchmarks/index_recall.py --n 1000000 --kinds ivf,flat --flat-latency-queries 50

At a million vectors the raw array alone is 8 GB, and the exact index holds another copy: the
machine needs about 18 GB free for the flat row.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._vectors import catalog_embeddings  # noqa: E402
from ml.index import VectorIndex  # noqa: E402
from ml.index_build import build_index, measure_recall  # noqa: E402
from ml.index_store import save_index  # noqa: E402


def resident_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def latency_ms(index: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None, :], k)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="catalog vectors (default 100000)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=500, help="queries for recall and latency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="ivf,flat", help="index kinds to build, in this order: ivf, scan, flat")
    parser.add_argument("--flat-latency-queries", type=int, default=500,
                        help="queries timed on the exact index (each scans every vector)")
    args = parser.parse_args()

    t = time.perf_counter()
    vectors, queries = catalog_embeddings(args.n, args.dim, n_queries=args.queries, seed=args.seed)
    ids = np.arange(args.n, dtype=np.int64) * 7 + 1000  # database-like, not positions
    print(f"data: {args.n} x {args.dim} clustered vectors, {args.queries} queries ({time.perf_counter() - t:.1f} s)")

    rows = []
    for kind in args.kinds.split(","):
        gc.collect()
        faiss.omp_set_num_threads(2)
        before_gb = resident_gb()
        t = time.perf_counter()
        # "scan": the approximate kind's codes searched exhaustively, what a base that misses its recall
        # target serves (ml/index_build.py).
        index = build_index(ids, vectors, "benchmark:0", kind="ivf" if kind == "scan" else kind)
        if kind == "scan":
            index.base.settings.exhaustive = True
        build_s = time.perf_counter() - t
        grown_gb = resident_gb() - before_gb
        with tempfile.TemporaryDirectory() as directory:
            files = save_index(index, directory)["base"]["files"].values()
            size_gb = sum(part["size"] for part in files) / 2**30
        faiss.omp_set_num_threads(1)
        recall = measure_recall(index, queries, 10, ids=ids, vectors=vectors)
        timed = queries if kind == "ivf" else queries[: args.flat_latency_queries]
        p50, p99 = latency_ms(index, timed)
        settings = f"{len(timed)} timed queries" if kind != "ivf" else (
            f"nprobe={index.base.settings.nprobe} refine={index.base.settings.refine_factor}x"
            f"{' exhaustive' if index.base.settings.exhaustive else ''}, {len(timed)} timed queries")
        rows.append((kind, build_s, size_gb, grown_gb, recall, p50, p99, settings))
        del index

    print(f"{'index':<6} {'build s':>8} {'file GB':>8} {'RSS +GB':>8} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8}  settings")
    for kind, build_s, size_gb, grown_gb, recall, p50, p99, settings in rows:
        print(f"{kind:<6} {build_s:8.1f} {size_gb:8.3f} {grown_gb:8.2f} {recall:9.3f} {p50:8.2f} {p99:8.2f}  {settings}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
