"""Exact vs approximate index on clustered synthetic embeddings: build time, size, recall, latency.

    .venv/bin/python benchmarks/index_recall.py --n 100000 --dim 2048

The vectors imitate a catalog's CNN embeddings rather than uniform noise: categories,
products within them and several photos of each product, drawn in a latent space whose
variance decays like a power law (as CNN feature spectra do), mapped into ``dim`` with a
shared positive offset (post-ReLU features all point roughly one way), plus a little
isotropic noise so the vectors are full rank. Queries are new photos of catalog products.
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

from ml.index import FLAT, VectorIndex  # noqa: E402
from ml.index_build import build_index, measure_recall  # noqa: E402
from ml.index_store import save_index  # noqa: E402


def catalog_embeddings(
    n: int,
    dim: int,
    *,
    n_queries: int = 0,
    images_per_product: int = 3,
    products_per_category: int = 50,
    latent_dim: int = 384,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` catalog vectors and ``n_queries`` query vectors (new photos of random products)."""
    rng = np.random.default_rng(seed)
    n_products = max(1, n // images_per_product)
    n_categories = max(1, n_products // products_per_category)
    spectrum = np.sqrt(1.0 / np.arange(1, latent_dim + 1)).astype(np.float32)
    projection = (rng.standard_normal((latent_dim, dim)) / np.sqrt(dim)).astype(np.float32)
    offset = np.abs(rng.standard_normal(dim)).astype(np.float32) * 0.6 / np.sqrt(dim)

    def latent(rows: int, scale: float) -> np.ndarray:
        return rng.standard_normal((rows, latent_dim)).astype(np.float32) * spectrum * scale

    categories = latent(n_categories, 1.0)
    products = categories[rng.integers(n_categories, size=n_products)] + latent(n_products, 0.6)

    def photos(product_rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(product_rows), dim), dtype=np.float32)
        for start in range(0, len(product_rows), 20_000):
            rows = product_rows[start : start + 20_000]
            z = products[rows] + latent(len(rows), 0.25)
            noise = rng.standard_normal((len(rows), dim)).astype(np.float32) * (0.15 / np.sqrt(dim))
            block = z @ projection + offset + noise
            out[start : start + len(rows)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    vectors = photos(np.arange(n) % n_products)
    queries = photos(rng.integers(n_products, size=n_queries))
    return vectors, queries


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
    parser.add_argument("--kinds", default="ivf,flat", help="index kinds to build, in this order")
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
        index = build_index(ids, vectors, "benchmark:0", kind=kind)
        build_s = time.perf_counter() - t
        grown_gb = resident_gb() - before_gb
        with tempfile.TemporaryDirectory() as directory:
            size_gb = save_index(index, directory)["size"] / 2**30
        faiss.omp_set_num_threads(1)
        recall = measure_recall(index, queries, 10, ids=ids, vectors=vectors)
        timed = queries if kind != FLAT else queries[: args.flat_latency_queries]
        p50, p99 = latency_ms(index, timed)
        settings = f"{len(timed)} timed queries" if kind == FLAT else (
            f"nprobe={index.nprobe} refine={index.refine_factor}x, {len(timed)} timed queries")
        rows.append((kind, build_s, size_gb, grown_gb, recall, p50, p99, settings))
        del index

    print(f"{'index':<6} {'build s':>8} {'file GB':>8} {'RSS +GB':>8} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8}  settings")
    for kind, build_s, size_gb, grown_gb, recall, p50, p99, settings in rows:
        print(f"{kind:<6} {build_s:8.1f} {size_gb:8.3f} {grown_gb:8.2f} {recall:9.3f} {p50:8.2f} {p99:8.2f}  {settings}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
