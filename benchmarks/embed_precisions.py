"""Whole-process speed of `python -m ml embed` in each precision next to ONNX Runtime fp32 on torchvision's
export, and the time to the first embedded image of the CLI and of a worker, before and after, in one run.

    .venv/bin/python benchmarks/embed_precisions.py [--n 200] [--repeats 2] [--before 4755ecc]

Every figure is a whole process timed from outside (interpreter start to exit), on --n distinct 800 x 800
JPEG photos cut from scikit-image's, decoding included, with ResNet-50 and random weights (the compute of the
real weights, whose file cannot be downloaded here) and a fresh TORCH_HOME:
  ONNX Runtime fp32   a lean script: torchvision's ResNet-50 exported to ONNX (untimed, beforehand), Pillow
                      decoding and torchvision's eval transform in numpy in as many threads as cores, batches
                      of 8, no PyTorch imported
  ml embed P          `python -m ml embed DIR --backbone resnet50 --weights random --precision P`, its graphs
                      already cached (the first, cold runs are reported apart: they export, and int8 calibrates)
  first image         the same commands on one photo: the CLI, and a worker's first embedding (Django set up,
                      the tasks imported, get_embedder().embed) of this checkout and of --before's, each with
                      its graph cached. --before is checked out into a temporary git worktree.
Runs alternate, --repeats times; the median of each is kept. Prints the CPU's flags that decide the speed.
"""
from __future__ import annotations

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

from benchmarks._common import distinct_photos, machine  # noqa: E402
from benchmarks.embed_throughput import export_torchvision_resnet50  # noqa: E402

PRECISIONS = ("fp32", "int8", "bf16")
BASELINE = r'''
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
import onnxruntime as ort
from PIL import Image
model, folder, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
mean = np.array([0.485, 0.456, 0.406], np.float32)
std = np.array([0.229, 0.224, 0.225], np.float32)
def pixels(path):  # torchvision's ResNet-50 IMAGENET1K_V2 eval transform: resize 232 bilinear, centre crop 224
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        scale = 232 / min(w, h)
        image = image.resize((max(232, int(w * scale)), max(232, int(h * scale))), Image.Resampling.BILINEAR)
        left, top = int(round((image.width - 224) / 2)), int(round((image.height - 224) / 2))
        array = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255
    return ((array - mean) / std).transpose(2, 0, 1)
files, batch, done = sorted(folder.glob("*.jpg")), [], 0
with ThreadPoolExecutor(threads) as pool:
    for item in pool.map(pixels, files):
        batch.append(item)
        if len(batch) == 8:
            session.run(None, {"pixels": np.stack(batch)}); done += len(batch); batch = []
if batch:
    session.run(None, {"pixels": np.stack(batch)}); done += len(batch)
print(done)
'''
WORKER = r'''
import sys
import django
django.setup()
import workers.tasks  # what a worker imports before its first task
from PIL import Image
from catalog.serving import get_embedder
model = get_embedder()
model.embed([Image.open(sys.argv[1]).convert("RGB")])
print(model.precision, getattr(model, "engine", "?"), "torch" in sys.modules)
'''


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def cpu_flags() -> str:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return " ".join(flag for flag in wanted if flag in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="photos (default 200)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before", default="4755ecc", help="the commit to compare the start-up with")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="visualsearch-precisions-"))
    photos, one = work / "photos", work / "one"
    photos.mkdir()
    one.mkdir()
    for number, data in enumerate(distinct_photos(args.n, 800)):
        (photos / f"{number:04d}.jpg").write_bytes(data)
    (one / "first.jpg").write_bytes((photos / "0000.jpg").read_bytes())
    before = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                   capture_output=True)
    threads = os.cpu_count() or 1
    env = {**os.environ, "TORCH_HOME": str(work / "torch")}
    env.pop("OMP_NUM_THREADS", None)
    worker_env = {**env, "DJANGO_SETTINGS_MODULE": "visualsearch.settings", "VISUALSEARCH_DATA_DIR": str(work / "data"),
                  "VISUALSEARCH_BACKBONE": "resnet50", "VISUALSEARCH_WEIGHTS": "random", "VISUALSEARCH_TASKS_EAGER": "1"}
    for name in ("DATABASE_URL", "CELERY_BROKER_URL"):
        worker_env.pop(name, None)
    python = sys.executable

    def ml_embed(folder: Path, precision: str, cwd: Path = REPO) -> list[str]:
        return [python, "-m", "ml", "embed", str(folder), "--out", str(work / f"{precision}.npy"),
                "--backbone", "resnet50", "--weights", "random", "--precision", precision]

    try:
        export_torchvision_resnet50(work / "torchvision.onnx")
        cold = {}
        for precision in PRECISIONS:  # exports the graph; int8 calibrates on the photos
            cold[precision] = timed(ml_embed(photos, precision), env, REPO)[0]
        timed(ml_embed(one, "fp32"), env, before)  # the older code's own graph, cached
        (work / "data").mkdir()
        subprocess.run([python, "manage.py", "migrate", "-v0"], env=worker_env, cwd=REPO, check=True)
        timed([python, "-c", WORKER, str(one / "first.jpg")], worker_env, before)

        runs: dict[str, list[float]] = {}
        notes: dict[str, str] = {}
        for _ in range(args.repeats):
            seconds, _ = timed([python, "-c", BASELINE, str(work / "torchvision.onnx"), str(photos), str(threads)],
                               env, REPO)
            runs.setdefault("ONNX Runtime fp32 (torchvision export)", []).append(seconds)
            for precision in PRECISIONS:
                seconds, summary = timed(ml_embed(photos, precision), env, REPO)
                runs.setdefault(f"ml embed --precision {precision}", []).append(seconds)
                notes[f"ml embed --precision {precision}"] = json.loads(summary)["engine"]
            for label, cwd in (("before", before), ("after", REPO)):
                runs.setdefault(f"CLI first image, {label}", []).append(timed(ml_embed(one, "fp32"), env, cwd)[0])
                seconds, said = timed([python, "-c", WORKER, str(one / "first.jpg")], worker_env, cwd)
                runs.setdefault(f"worker first image, {label}", []).append(seconds)
                notes[f"worker first image, {label}"] = f"precision engine torch-imported: {said}"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)

    median = {name: statistics.median(values) for name, values in runs.items()}
    baseline = median["ONNX Runtime fp32 (torchvision export)"]
    print(f"{args.n} distinct 800x800 JPEG photos, ResNet-50 (random weights), decoding included, whole processes; "
          f"{threads} threads; median of {args.repeats}")
    print(f"CPU flags: {cpu_flags()}")
    print(f"{'':46s}{'seconds':>9s}{'images/s':>10s}{'x ONNX fp32':>13s}")
    for name, seconds in median.items():
        if "first image" in name:
            continue
        print(f"{name:46s}{seconds:9.2f}{args.n / seconds:10.1f}{baseline / seconds:13.2f}  {notes.get(name, '')}")
    print("\nfirst run of each precision on a fresh cache (exporting; int8 also calibrating on 32 of the photos):")
    for precision, seconds in cold.items():
        print(f"  {precision}: {seconds:.1f} s")
    print(f"\ntime to the first embedded image (one photo, whole process), before = {args.before}:")
    for name in ("CLI first image", "worker first image"):
        b, a = median[f"{name}, before"], median[f"{name}, after"]
        print(f"  {name}: before {b:.2f} s, after {a:.2f} s ({b / a:.1f}x faster)  "
              f"{notes.get(name + ', after', '')}")
    print(machine())
    print(json.dumps({"seconds": {k: round(v, 3) for k, v in median.items()},
                      "x_onnx_fp32": {k: round(baseline / v, 2) for k, v in median.items() if "first" not in k},
                      "cold_seconds": {k: round(v, 2) for k, v in cold.items()},
                      "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
