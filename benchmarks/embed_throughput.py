"""Embedding throughput of ``python -m ml embed`` next to plain torchvision, in one run.

    .venv/bin/python benchmarks/embed_throughput.py [--n 200] [--batch N] [--repeats 2]

Both sides read and decode every file inside the timed loop and run ResNet-50 with random
weights (the figures do not depend on the weights' values):
  ml embed   ml.embedder.embed_sources, the CLI's code path: decoding in threads overlapped with
             batched inference, channels_last, uint8 batches normalised on the device.
  torchvision  the textbook loop: Image.open, the weights' transforms(), one image per forward, fp32.
Images: the PNG stamps of tuxpaint-stamps-default when unpacked in /tmp/tuxpaint (see
benchmarks/preprocess_compare.py), else the files of ../shared/corpus/images that decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ml.embedder import RESNET50_WEIGHTS, available_cpus, embed_sources, load_embedder  # noqa: E402
from ml.images import ImageDecodeError, decode_image  # noqa: E402

STAMPS = Path("/tmp/tuxpaint/usr/share/tuxpaint/stamps")
CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "images"


def benchmark_images(n: int) -> tuple[list[Path], str]:
    stamps = sorted(STAMPS.rglob("*.png"))
    if len(stamps) >= n:
        return stamps[:: len(stamps) // n][:n], f"tuxpaint stamps ({STAMPS})"
    decodable = []
    for path in sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []:
        try:
            decode_image(path.read_bytes())
        except (ImageDecodeError, OSError):
            continue
        decodable.append(path)
    if not decodable:
        sys.exit(f"no images: unpack tuxpaint-stamps-default into /tmp/tuxpaint or provide {CORPUS}")
    return (decodable * (n // len(decodable) + 1))[:n], f"decodable files of {CORPUS}"


def ml_embed(files: list[Path], batch: int | None) -> tuple[float, str, int]:
    embedder = load_embedder("resnet50", "random")
    batch = batch or embedder.batch_size
    embed_sources(embedder, files[:batch], read=Path.read_bytes, batch_size=batch)  # warm-up, untimed
    result = embed_sources(embedder, files, read=Path.read_bytes, batch_size=batch)
    assert not result.failures, result.failures[:3]
    return result.images_per_s, embedder.precision, batch


def plain_torchvision(files: list[Path]) -> float:
    from torchvision.models import resnet50

    model = resnet50(weights=None).eval()
    transform = RESNET50_WEIGHTS.transforms()

    def embed_one(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return model(transform(image.convert("RGB")).unsqueeze(0))

    with torch.inference_mode():
        for path in files[:2]:  # warm-up, untimed
            embed_one(path)
        started = time.perf_counter()
        for path in files:
            embed_one(path)
    return len(files) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="images per measurement")
    parser.add_argument("--batch", type=int, help="ml embed's --batch (default: the embedder's, 8 on CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two this many times, keep each's best")
    args = parser.parse_args()

    files, source = benchmark_images(args.n)
    ours, plain = [], []
    for _ in range(args.repeats):
        plain.append(plain_torchvision(files))
        rate, precision, batch = ml_embed(files, args.batch)
        ours.append(rate)
    best_ours, best_plain = max(ours), max(plain)

    print(f"{len(files)} images from {source}; ResNet-50, random weights, decoding included")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {available_cpus()} CPUs, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, CUDA {torch.cuda.is_available()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes slow batch-1 loops most)")
    print(f"{'':34s}{'images/s':>10s}")
    print(f"{'plain torchvision fp32, batch 1':34s}{best_plain:10.1f}")
    print(f"{f'ml embed ({precision}, batch {batch})':34s}{best_ours:10.1f}")
    print(f"ratio ml embed / plain: {best_ours / best_plain:.2f}x")
    print(json.dumps({
        "images": len(files),
        "plain_images_per_s": round(best_plain, 2),
        "ml_embed_images_per_s": round(best_ours, 2),
        "ratio": round(best_ours / best_plain, 2),
        "precision": precision,
        "batch": batch,
        "load_average": round(os.getloadavg()[0], 2),
        "runs": {"plain": [round(x, 2) for x in plain], "ml_embed": [round(x, 2) for x in ours]},
    }))


if __name__ == "__main__":
    main()
