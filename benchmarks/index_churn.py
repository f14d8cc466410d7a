"""Index churn at scale: delta-segment updates side by side with full publishes, in one run.

    .venv/bin/python benchmarks/index_churn.py --n 1000000 --data real
    .venv/bin/python benchmarks/index_churn.py --n 1000000 --data hard

Starts from ``--n`` indexed 2048-d vectors (benchmarks/_vectors.py: real-like catalog photos, or hard
noisy clusters), served by four searching processes that follow the directory as the web processes do
(a manifest check every 0.5 s). Then, as the index worker does, it publishes 32-vector updates until
``--churn`` of the vectors were replaced or removed (and as many added), while compactions run in a
process of their own as the `compact` worker would. It prints:

- per 32-vector update: seconds and bytes written (p50, p95), for segments and for full publishes;
- how long a searching process takes to find an update (p50, p95), for both;
- the memory of the four searching processes together (sum of PSS) against one alone, for the same searches;
- recall@10 after the churn against exact search over the true vectors, and each compaction's time;
- the base the build chose (kind, codes, recall self-check, and why).

Vectors live in memory-mapped files under ``--work`` (about 9 GB at 1M x 2048-d).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._vectors import CatalogPhotos, NoisyClusters  # noqa: E402
from ml.evaluation import ExactNeighbours, knn_intersection  # noqa: E402
from ml.index import VectorIndex  # noqa: E402
from ml.index_build import build_base, compact  # noqa: E402
from ml.index_store import IndexReader, IndexWriter, read_manifest, save_index  # noqa: E402

IDENTITY = "benchmark:churn"
BATCH = 32
CHECK_INTERVAL = 0.5  # catalog/search.py READER_CHECK_SECONDS


# ----- searching processes -------------------------------------------------------------------


def reader_main(directory: str, vectors_path: str, fresh_path: str) -> None:
    """A searching process: answers JSON commands on stdin, one line each."""
    faiss.omp_set_num_threads(1)  # as a web request thread searches
    reader = IndexReader(directory, expected_identity=IDENTITY, check_interval=CHECK_INTERVAL)
    vectors = np.load(vectors_path, mmap_mode="r")
    fresh = np.load(fresh_path, mmap_mode="r")

    traffic_on = threading.Event()  # held until memory is measured, so that every process has served the same

    def traffic() -> None:  # shoppers' searches, as a web process serves them between the benchmark's
        traffic_on.wait()
        rng = np.random.default_rng(os.getpid())
        while True:
            row = int(rng.integers(len(vectors)))
            reader.current().search(np.asarray(vectors[row : row + 1]), 10)
            time.sleep(float(os.environ.get("CHURN_TRAFFIC_INTERVAL", "0.2")))

    threading.Thread(target=traffic, daemon=True).start()
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "warm":
            rng = np.random.default_rng(command["seed"])
            for row in rng.integers(len(vectors), size=command["searches"]):
                reader.current().search(np.asarray(vectors[row : row + 1]), 10)
            answer = {"ok": True}
        elif command["do"] == "traffic":
            traffic_on.set()
            answer = {"ok": True}
        elif command["do"] == "find":  # poll as a web process does, until the update is searchable
            query = np.asarray((fresh if command["fresh"] else vectors)[command["row"]][None, :])
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if reader.current().search(query, 1)[1][0, 0] == command["id"]:
                    break
                time.sleep(0.01)
            answer = {"seen_after": time.time() - command["published_at"]}
        elif command["do"] == "generation":
            answer = {"generation": reader.current().generation}
        elif command["do"] == "search":
            queries = np.load(command["queries"])
            answer = {"ids": reader.current().search(queries, 10)[1].tolist(), "version": reader.current().version}
        else:
            answer = {"error": command}
        print(json.dumps(answer), flush=True)


class Searcher:
    def __init__(self, directory: Path, vectors: Path, fresh: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--reader", str(directory), str(vectors), str(fresh)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        )

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def pss_mb(self) -> float:
        """Proportional set size: shared pages counted once over the processes that map them. The benchmark's
        own vector files (its queries come from them; a web process embeds its queries) are left out."""
        total, mapping = 0, ""
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                mapping = fields[5] if len(fields) > 5 else ""
            elif fields and fields[0] == "Pss:" and not mapping.endswith(("vectors.npy", "fresh.npy")):
                total += int(fields[1])
        return total / 1024

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----- compaction in a process of its own ---------------------------------------------------


def compaction_main(directory: str, dim: int, work: str, result: multiprocessing.Queue) -> None:
    """The `compact` worker: the true vectors are its source, as the database is the service's."""
    started = time.perf_counter()
    done = {}
    live = np.load(Path(work) / "live.npy")  # (id, source, row), ascending ids: the state at the snapshot
    stores = (np.load(Path(work) / "vectors.npy", mmap_mode="r"), np.load(Path(work) / "fresh.npy", mmap_mode="r"))

    def source():
        for start in range(0, len(live), 50_000):
            block = live[start : start + 50_000]
            vectors = np.empty((len(block), dim), np.float32)
            for which in (0, 1):
                mask = block[:, 1] == which
                rows = block[mask, 2]
                order = np.argsort(rows)
                picked = np.empty((len(rows), dim), np.float32)
                picked[order] = stores[which][rows[order]]  # memory-mapped rows read in ascending order
                vectors[mask] = picked
            yield block[:, 0], vectors

    def build(snapshot):
        result.put({"snapshot": True})
        base, done["how"] = compact(snapshot, source=source, source_against="exact search over the true vectors")
        return base

    manifest = IndexWriter(directory, IDENTITY, dim, exact_threshold=50_000).replace_base(build)
    result.put({"seconds": time.perf_counter() - started, "how": done["how"], "count": manifest["base"]["count"]})


# ----- the run ---------------------------------------------------------------------------------


def percentiles(values) -> str:
    return f"p50 {np.percentile(values, 50):.3f}, p95 {np.percentile(values, 95):.3f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--data", choices=("real", "hard"), default="real")
    parser.add_argument("--churn", type=float, default=0.10, help="share of the vectors replaced or removed")
    parser.add_argument("--full-publishes", type=int, default=3, help="full publishes timed for comparison")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--work", type=Path, default=None, help="where the vector files and the index go")
    parser.add_argument("--reader", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        return reader_main(*args.reader)

    work = Path(args.work or tempfile.mkdtemp(prefix="index-churn-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"index churn: n={args.n} dim={args.dim} data={args.data} churn={args.churn:.0%} in {work}", flush=True)
    print(f"cpu: {cpu_model()}; faiss {faiss.__version__}", flush=True)
    n, dim = args.n, args.dim
    changes = int(n * args.churn)
    generator = CatalogPhotos(n, dim) if args.data == "real" else NoisyClusters(n, dim)

    started = time.perf_counter()
    vectors_path, fresh_path = work / "vectors.npy", work / "fresh.npy"
    vectors = np.lib.format.open_memmap(vectors_path, "w+", np.float32, (n, dim))
    for start in range(0, n, 100_000):
        rows = np.arange(start, min(n, start + 100_000))
        generator.photos(rows % generator.n_products, out=vectors[start : start + len(rows)])
    fresh = np.lib.format.open_memmap(fresh_path, "w+", np.float32, (2 * changes + 1, dim))
    generator.photos(generator.rng.integers(generator.n_products, size=len(fresh)), out=fresh)
    queries = generator.photos(generator.rng.integers(generator.n_products, size=args.queries))
    vectors.flush(), fresh.flush()
    ids = np.arange(n, dtype=np.int64) * 3 + 1000  # database-like
    print(f"data: {time.perf_counter() - started:.0f} s", flush=True)

    directory = work / "index"
    started = time.perf_counter()

    def chunks():
        for start in range(0, n, 50_000):
            yield ids[start : start + 50_000], vectors[start : start + 50_000]

    base = build_base(chunks, count=n, dim=dim)
    build_s = time.perf_counter() - started
    save_index(VectorIndex(IDENTITY, dim, base=base), directory)
    del base
    manifest = read_manifest(directory)
    base_bytes = sum(f["size"] for f in manifest["base"]["files"].values())
    quality = manifest["base"]["quality"]
    print(f"build: {build_s:.0f} s, {manifest['base']['kind']}, base files {base_bytes / 2**30:.2f} GB; "
          f"recall@10 self-check {quality['recall_at_10']:.3f} (target {quality['target']}); {quality['note']}",
          flush=True)

    # Memory for the same traffic: one process serves 800 searches (seeds 0-3); then three more serve 200 each
    # (seeds 1-3), a subset of the same, so the four touch the same pages of the shared files as the one did and
    # the difference is what each process holds alone. (Had the one served only its own 200, the pages the
    # others read from the files would count as copies.)
    searchers = [Searcher(directory, vectors_path, fresh_path)]
    for seed in range(4):
        searchers[0].ask(do="warm", searches=200, seed=seed)
    one_mb = searchers[0].pss_mb()
    searchers += [Searcher(directory, vectors_path, fresh_path) for _ in range(3)]
    for seed, searcher in enumerate(searchers[1:], start=1):
        searcher.ask(do="warm", searches=200, seed=seed)
    four_mb = sum(s.pss_mb() for s in searchers)
    print(f"memory: one searching process {one_mb:.0f} MB (PSS) after 800 searches; four together "
          f"{four_mb:.0f} MB after the same 800 ({four_mb / one_mb:.2f}x one)", flush=True)
    for searcher in searchers:
        searcher.ask(do="traffic")

    # The live set: id -> (source, row), source 0 for the original vectors, 1 for fresh ones.
    live = {int(i): (0, r) for r, i in enumerate(ids)}
    writer = IndexWriter(directory, IDENTITY, dim)
    rng = np.random.default_rng(1)
    next_id, fresh_row = int(ids[-1]) + 3, 0
    update_s, update_bytes, seen_s, compactions = [], [], [], []
    spawn = multiprocessing.get_context("spawn")  # no fork of a process running OpenMP threads
    running, results = None, spawn.Queue()
    replaced_or_removed = 0
    update = 0
    churn_started = time.perf_counter()
    while replaced_or_removed < changes:
        if update % 50 == 0:
            pool = np.fromiter(live, dtype=np.int64, count=len(live))  # ids to replace or remove from
        picked = [int(i) for i in rng.choice(pool, size=BATCH, replace=False) if int(i) in live][: BATCH // 2 + BATCH // 4]
        replace_ids, remove_ids = picked[: BATCH // 2], picked[BATCH // 2 :]
        add_ids = list(range(next_id, next_id + BATCH // 4 * 3, 3))
        next_id += BATCH // 4 * 3
        changed = replace_ids + add_ids
        rows = list(range(fresh_row, fresh_row + len(changed)))
        fresh_row += len(changed)
        before = time.perf_counter()
        manifest = writer.apply(add_ids=np.array(changed), vectors=fresh[rows], remove_ids=np.array(remove_ids))
        published_at = time.time()
        update_s.append(time.perf_counter() - before)
        update_bytes.append(manifest["segments"][-1]["size"] + (directory / "manifest.json").stat().st_size)
        for i, row in zip(changed, rows):
            live[i] = (1, row)
        for i in remove_ids:
            live.pop(i, None)
        replaced_or_removed += len(replace_ids) + len(remove_ids)
        if update % 25 == 0:
            target = searchers[update // 25 % 4]
            seen_s.append(target.ask(do="find", id=changed[0], row=rows[0], fresh=True,
                                     published_at=published_at)["seen_after"])
        if running is not None and not running.is_alive():
            compactions.append(results.get())
            running = None
        if running is None and writer.index.needs_compaction:
            np.save(work / "live.npy", np.array([(i, *live[i]) for i in sorted(live)], dtype=np.int64))
            running = spawn.Process(target=compaction_main, args=(str(directory), dim, str(work), results))
            running.start()
            assert results.get(timeout=600) == {"snapshot": True}  # updates go on once it has its snapshot
        update += 1
    if running is not None:
        running.join()
        compactions.append(results.get())
    churn_s = time.perf_counter() - churn_started
    print(f"segment updates: {update} of {BATCH} vectors in {churn_s:.0f} s; seconds {percentiles(update_s)}; "
          f"bytes {percentiles(update_bytes)} (max {max(update_bytes) / 2**20:.2f} MB); "
          f"searchable after (s) {percentiles(seen_s)} over {len(seen_s)} checks", flush=True)
    for c in compactions:
        print(f"compaction: {c['seconds']:.0f} s, {c['count']} vectors: {c['how']}", flush=True)

    # Recall after the churn, against exact search over the true live vectors, once every searching
    # process has opened the last base.
    final = read_manifest(directory)["generation"]
    for searcher in searchers:
        while searcher.ask(do="generation")["generation"] != final:
            time.sleep(0.5)
    time.sleep(2 * CHECK_INTERVAL)
    queries_path = work / "queries.npy"
    np.save(queries_path, queries)
    found = np.array(searchers[0].ask(do="search", queries=str(queries_path))["ids"])
    live_ids = np.array(sorted(live), dtype=np.int64)
    exact = ExactNeighbours(queries, 10)
    for start in range(0, len(live_ids), 50_000):
        block = live_ids[start : start + 50_000]
        sources = [live[int(i)] for i in block]
        block_vectors = np.stack([(fresh if s else vectors)[r] for s, r in sources])
        exact.add(block_vectors, start)
    truth = exact.result()
    recall = knn_intersection(found, np.where(truth >= 0, live_ids[np.maximum(truth, 0)], -1))
    four_after = sum(s.pss_mb() for s in searchers)
    print(f"after churn: {len(live_ids)} vectors; recall@10 {recall:.3f} against exact search over the true "
          f"vectors ({args.queries} new photos); four searching processes {four_after:.0f} MB", flush=True)

    # Today's full publish, side by side: the whole index written again for a 32-vector update, as the
    # index worker did before segments (its copy held in memory, changed, then saved whole).
    full_s, full_bytes, full_seen = [], [], []
    full_dir = work / "full"
    index = writer.current()
    index = VectorIndex(IDENTITY, dim, base=compact(index)[0])  # in memory, as the old writer's copy was
    for publish in range(args.full_publishes):
        changed = list(range(next_id, next_id + 3 * BATCH, 3))
        next_id += 3 * BATCH
        rows = list(range(fresh_row, fresh_row + BATCH))
        fresh_row += BATCH
        index = VectorIndex(IDENTITY, dim, base=index.base)
        index.upsert(np.array(changed), fresh[rows])
        index = VectorIndex(IDENTITY, dim, base=compact(index)[0])  # the in-memory change, outside the clock
        before = time.perf_counter()
        manifest = save_index(index, full_dir, grace_seconds=0)
        published_at = time.time()
        full_s.append(time.perf_counter() - before)
        full_bytes.append(sum(f["size"] for f in manifest["base"]["files"].values()))
        if publish == 0:
            full_reader = Searcher(full_dir, vectors_path, fresh_path)
            full_reader.ask(do="warm", searches=10, seed=9)
        else:
            full_seen.append(full_reader.ask(do="find", id=changed[0], row=rows[0], fresh=True,
                                             published_at=published_at)["seen_after"])
    full_reader.close()
    print(f"full publishes (as before): {args.full_publishes} of {BATCH} vectors; seconds {percentiles(full_s)}; "
          f"bytes {percentiles(full_bytes)} ({np.mean(full_bytes) / 2**30:.2f} GB each); "
          f"searchable after (s) {percentiles(full_seen)}", flush=True)
    for searcher in searchers:
        searcher.close()
    print(json.dumps({
        "n": n, "dim": dim, "data": args.data, "build_s": round(build_s), "base_gb": round(base_bytes / 2**30, 2),
        "self_check_recall": quality["recall_at_10"], "note": quality["note"],
        "update_s_p50": float(np.percentile(update_s, 50)), "update_s_p95": float(np.percentile(update_s, 95)),
        "update_bytes_p95": float(np.percentile(update_bytes, 95)),
        "seen_s_p50": float(np.percentile(seen_s, 50)), "seen_s_p95": float(np.percentile(seen_s, 95)),
        "memory_one_mb": round(one_mb), "memory_four_mb": round(four_mb), "memory_ratio": round(four_mb / one_mb, 2),
        "recall_after_churn": recall, "compactions_s": [round(c["seconds"]) for c in compactions],
        "full_publish_s_p50": float(np.percentile(full_s, 50)), "full_publish_bytes": float(np.mean(full_bytes)),
        "full_seen_s": full_seen,
    }))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = next(f for f in Path("/proc/cpuinfo").read_text().splitlines() if f.startswith("flags"))
            simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f" {f}" in flags]
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()} ({', '.join(simd)})"
    return "unknown"


if __name__ == "__main__":
    main()
