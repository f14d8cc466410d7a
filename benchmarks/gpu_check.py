"""Check and time the GPU worker's path on an NVIDIA GPU; report that it skipped anywhere else.

    .venv/bin/pip install -r requirements-gpu.txt   # faiss-gpu, on a GPU machine
    .venv/bin/python benchmarks/gpu_check.py [--n 512]

What it checks, each against the CPU or fp32 result of the same inputs:
  embedding   ResNet-50 (random weights) through ml.bulk.embed_sources on CUDA: "auto"
              precision (fp16 autocast), channels_last, pinned-memory batches; images/s next to
              fp32 on the same GPU, and the top-10 neighbour overlap of the two (bar: 0.98).
  decoding    torchvision.io.decode_jpeg on the GPU next to Pillow in threads, same JPEGs;
              the largest pixel difference between the two.
  index       an exact index of 100k x 2048 vectors searched by faiss-gpu next to the CPU:
              the same top-10, and the batch latency of both.
Exit status 0 when every check passed or when there is no GPU (it says so), 1 when a check failed.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import distinct_photos  # noqa: E402
from ml.bulk import embed_sources  # noqa: E402
from ml.embedder import load_embedder  # noqa: E402
from ml.evaluation import AGREEMENT_BAR, neighbour_overlap  # noqa: E402
from ml.index_build import build_index  # noqa: E402
from ml.index_store import load_index, save_index  # noqa: E402


def check_embedding(images: list[bytes]) -> bool:
    results = {}
    for precision in ("fp32", "auto"):
        embedder = load_embedder("resnet50", "random", device="cuda", precision=precision)
        embed_sources(embedder, images[: embedder.batch_size], read=bytes)  # warm-up: kernels, cuDNN plans
        torch.cuda.synchronize()
        results[embedder.precision] = embed_sources(embedder, images, read=bytes)
    reduced = next(name for name in results if name != "fp32")
    overlap = neighbour_overlap(results["fp32"].vectors, results[reduced].vectors)
    print(f"embedding, {len(images)} JPEGs, decoding included: fp32 {results['fp32'].images_per_s:.0f} images/s, "
          f"auto ({reduced}) {results[reduced].images_per_s:.0f} images/s; top-10 overlap {overlap:.4f}")
    return overlap >= AGREEMENT_BAR


def check_decoding(images: list[bytes]) -> bool:
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(image), dtype=torch.uint8) for image in images]
    decode_jpeg(encoded[:8], device="cuda", mode=ImageReadMode.RGB)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    on_gpu = decode_jpeg(encoded, device="cuda", mode=ImageReadMode.RGB)
    torch.cuda.synchronize()
    gpu_rate = len(images) / (time.perf_counter() - started)

    def pillow(image: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(image)) as opened:
            return np.asarray(opened.convert("RGB"))

    started = time.perf_counter()
    with ThreadPoolExecutor() as pool:
        on_cpu = list(pool.map(pillow, images))
    cpu_rate = len(images) / (time.perf_counter() - started)
    difference = max(
        int(np.abs(gpu.permute(1, 2, 0).cpu().numpy().astype(int) - cpu.astype(int)).max())
        for gpu, cpu in zip(on_gpu, on_cpu)
    )
    print(f"JPEG decoding: GPU {gpu_rate:.0f} images/s, Pillow in threads {cpu_rate:.0f} images/s; "
          f"largest pixel difference {difference} of 255")
    return difference <= 8  # IDCT implementations differ by a few levels, never more


def check_index(n: int = 100_000, dim: int = 2048, queries: int = 256) -> bool:
    try:
        import faiss

        gpus = faiss.get_num_gpus()
    except AttributeError:
        gpus = 0
    if gpus == 0:
        print("index: skipped, this faiss has no GPU support (pip install -r requirements-gpu.txt)")
        return True
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    with tempfile.TemporaryDirectory() as directory:
        save_index(build_index(ids, vectors, "gpu-check:0", kind="flat"), directory)
        on_cpu = load_index(directory, use_gpu=False)
        on_gpu = load_index(directory, use_gpu=True)
    sample = vectors[rng.choice(n, size=queries, replace=False)] + 0.1 * rng.standard_normal((queries, dim)).astype(
        np.float32)
    timings = {}
    found = {}
    for name, index in (("CPU", on_cpu), ("GPU", on_gpu)):
        index.search(sample[:8], 10)  # warm-up
        started = time.perf_counter()
        found[name] = index.search(sample, 10)[1]
        timings[name] = (time.perf_counter() - started) * 1000
    same = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["CPU"], found["GPU"])]))
    print(f"index, exact, {n} x {dim}, {queries} queries in one batch: CPU {timings['CPU']:.0f} ms, "
          f"faiss-gpu {timings['GPU']:.0f} ms on {gpus} GPU(s); same top-10 {same:.4f}")
    return same >= 0.999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="JPEG images for the embedding and decoding checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"skipped: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "run this on a GPU worker")
        return
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    images = list(distinct_photos(args.n, size=640))  # real-photo JPEGs
    outcomes = {"embedding": check_embedding(images), "decoding": check_decoding(images), "index": check_index()}
    failed = [name for name, passed in outcomes.items() if not passed]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
