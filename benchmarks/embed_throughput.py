"""Embedding throughput of ``python -m ml embed`` next to ONNX Runtime and plain torchvision, in one run.

    .venv/bin/python benchmarks/embed_throughput.py [--n 500] [--repeats 2]

Every side reads and decodes every file inside its timed loop, with the same thread count, and
runs ResNet-50 with random weights (throughput does not depend on the weights' values):
  ml embed           ml.bulk.embed_sources, the CLI's code path: decoding in threads overlapped
                     with batched inference, batch norms folded, uint8 batches normalised in one
                     step; fp32 (the default: the folded graph in ONNX Runtime) and bf16 (PyTorch,
                     channels_last), and fp32 in PyTorch for comparison.
  ONNX Runtime       torchvision's ResNet-50 exported to ONNX, CPUExecutionProvider with every graph
                     optimisation, the weights' transforms(), batches of the same size, decoding in
                     the same number of threads; fp32, and int8 (static, per-channel, calibrated on
                     32 of the images) for VNNI.
  plain torchvision  the textbook loop: Image.open, transforms(), one image per forward, fp32.
Agreement: the top-10 neighbours among the images themselves, each reduced-precision side against
its own fp32 side, averaged over the images. Random weights make nearly parallel vectors (see the
pairwise cosines printed), which makes neighbour order fragile, so bf16 is also checked with
EfficientNet-Lite0's real ImageNet weights.
Machine limit: the best large matrix product (BLAS or oneDNN) in fp32 and bf16 on the same threads,
divided by ResNet-50's 8.2 GFLOP per 224 x 224 image.
Images: the PNG stamps of tuxpaint-stamps-default when unpacked in /tmp/tuxpaint (see
benchmarks/preprocess_compare.py), else the files of ../shared/corpus/images that decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ml.backbones import RESNET50_WEIGHTS  # noqa: E402
from ml.bulk import embed_sources  # noqa: E402
from ml.embedder import load_embedder  # noqa: E402
from ml.evaluation import neighbour_overlap  # noqa: E402
from ml.images import ImageDecodeError, decode_image  # noqa: E402
from ml.precision import available_cpus  # noqa: E402

STAMPS = Path("/tmp/tuxpaint/usr/share/tuxpaint/stamps")
CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "images"
RESNET50_GFLOP = 8.2  # per 224 x 224 image: 4.1 G multiply-adds
CALIBRATION_IMAGES = 32


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


def ml_embed(files: list[Path], *, backbone: str = "resnet50", weights: str = "random", precision: str = "auto",
             engine: str = "auto", batch: int | None = None) -> tuple[float, np.ndarray, str, int]:
    embedder = load_embedder(backbone, weights, precision=precision, engine=engine)
    batch = batch or embedder.batch_size
    embed_sources(embedder, files[: 2 * batch], read=Path.read_bytes, batch_size=batch)  # warm-up, untimed
    result = embed_sources(embedder, files, read=Path.read_bytes, batch_size=batch)
    assert not result.failures, result.failures[:3]
    return result.images_per_s, result.vectors, f"{embedder.precision} {embedder.engine}", batch


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


# --- ONNX Runtime --------------------------------------------------------------------------------


def export_torchvision_resnet50(path: Path) -> None:
    """torchvision's ResNet-50 (random weights, pooled features out) as an ONNX graph at ``path``."""
    from torchvision.models import resnet50

    model = resnet50(weights=None).eval()
    model.fc = torch.nn.Identity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["pixels"],
                          output_names=["features"], dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                          dynamo=False)


def export_resnet50(directory: Path, calibration: list[Path]) -> dict[str, Path]:
    """torchvision's ResNet-50 (pooled features out) as ONNX fp32, and its int8 quantisation."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    fp32 = directory / "resnet50.onnx"
    export_torchvision_resnet50(fp32)
    prepared = directory / "resnet50-prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": onnx_pixels([path])} for path in calibration])

        def get_next(self):
            return next(self.batches, None)

    int8 = directory / "resnet50-int8.onnx"
    quantize_static(str(prepared), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"fp32": fp32, "int8": int8}


def onnx_pixels(paths: list[Path]) -> np.ndarray:
    transform = RESNET50_WEIGHTS.transforms()

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return transform(image.convert("RGB")).numpy()

    return np.stack([one(path) for path in paths])


def onnx_runtime(model: Path, files: list[Path], batch: int, threads: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def run(paths: list[Path]) -> np.ndarray:
        vectors = []
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for pixels in batches(pool.map(lambda path: onnx_pixels([path])[0], paths), batch):
                vectors.append(session.run(None, {"pixels": pixels})[0])
        return np.concatenate(vectors)

    run(files[: 2 * batch])  # warm-up, untimed
    started = time.perf_counter()
    vectors = run(files)
    return len(files) / (time.perf_counter() - started), normalized(vectors)


def batches(items: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


# --- agreement and the machine's limit -------------------------------------------------------------


def normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def pairwise_cosine(vectors: np.ndarray) -> tuple[float, float]:
    similarity = vectors @ vectors.T
    values = similarity[~np.eye(len(vectors), dtype=bool)]
    return float(values.mean()), float(values.std())


def peak_matmul_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """The best of two matrix products: torch.mm (BLAS) and a 1 x 1 convolution (oneDNN's GEMM).

    Both are (4096 x 1024) @ (1024 x 1024) products; which library is faster depends on the CPU
    (BLAS may not use AVX-512 on every vendor's cores), and the machine's limit is the faster one.
    """
    rows, inner, cols = 4096, 1024, 1024
    a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, cols).to(dtype)
    pixels = a.T.reshape(1, inner, 64, 64).contiguous(memory_format=torch.channels_last)
    kernel = b.T.reshape(cols, inner, 1, 1).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode():
        for product in (lambda: torch.mm(a, b), lambda: torch.nn.functional.conv2d(pixels, kernel)):
            product()
            for _ in range(repeats):
                started = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - started)
    return 2 * rows * inner * cols / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images per measurement")
    parser.add_argument("--batch", type=int, help="ml embed's --batch (default: the embedder's, 8 on CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times, keep each's best")
    args = parser.parse_args()

    files, source = benchmark_images(args.n)
    threads = torch.get_num_threads()
    rates: dict[str, list[float]] = {}
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as directory:
        onnx_models = export_resnet50(Path(directory), files[:CALIBRATION_IMAGES])
        for _ in range(args.repeats):
            rates.setdefault("plain torchvision fp32, batch 1", []).append(plain_torchvision(files))
            for precision, engine in (("fp32", "auto"), ("fp32", "torch"), ("bf16", "auto")):
                rate, vector_rows, path, batch = ml_embed(files, precision=precision, engine=engine, batch=args.batch)
                vectors[path] = vector_rows
                rates.setdefault(f"ml embed {path}, batch {batch}", []).append(rate)
            for name, model in onnx_models.items():
                rate, vectors[f"onnx {name}"] = onnx_runtime(model, files, batch, threads)
                rates.setdefault(f"ONNX Runtime {name}, batch {batch}", []).append(rate)
    default = load_embedder("resnet50", "random")
    default_path = f"{default.precision} {default.engine}"
    lite = {precision: ml_embed(files, backbone="efficientnet_lite0", weights="imagenet", precision=precision)[1]
            for precision in ("fp32", "bf16")}
    peaks = {name: peak_matmul_gflops(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    best = {name: max(values) for name, values in rates.items()}
    ours = best[f"ml embed {default_path}, batch {batch}"]
    plain = best["plain torchvision fp32, batch 1"]
    onnx_fp32 = best.get(f"ONNX Runtime fp32, batch {batch}")
    agreement = {
        "ml embed fp32, PyTorch vs ONNX Runtime engine": neighbour_overlap(vectors[default_path],
                                                                            vectors["fp32 torch"]),
        "ml embed bf16 vs fp32, ResNet-50 random weights": neighbour_overlap(vectors[default_path],
                                                                              vectors["bf16 torch"]),
        "ml embed bf16 vs fp32, EfficientNet-Lite0 ImageNet weights": neighbour_overlap(lite["fp32"], lite["bf16"]),
    }
    if onnx_models:
        agreement["ONNX Runtime int8 vs fp32, ResNet-50 random weights"] = neighbour_overlap(
            vectors["onnx fp32"], vectors["onnx int8"])
    cosine_mean, cosine_std = pairwise_cosine(vectors[default_path])

    print(f"{len(files)} images from {source}; ResNet-50, random weights, decoding included")
    print(f"torch {torch.__version__}, {threads} threads on {available_cpus()} CPUs, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes slow batch-1 loops most)")
    print(f"{'':40s}{'images/s':>10s}{'x plain':>9s}{'x ONNX fp32':>13s}")
    for name, rate in best.items():
        versus_onnx = f"{rate / onnx_fp32:13.2f}" if onnx_fp32 else ""
        print(f"{name:40s}{rate:10.1f}{rate / plain:9.2f}{versus_onnx}")
    print(f"ml embed's default: {default_path}")
    print("\ntop-10 neighbour agreement with fp32 (bar: 0.98)")
    for name, value in agreement.items():
        print(f"  {name}: {value:.4f}")
    print(f"  (random-weight ResNet-50 vectors are nearly parallel: pairwise cosine {cosine_mean:.4f} "
          f"+- {cosine_std:.4f})")
    print("\nmachine limit (best large matrix product on the same threads)")
    for name, gflops in peaks.items():
        limit = gflops / RESNET50_GFLOP
        mine = ours if name == default.precision else best[f"ml embed {name} torch, batch {batch}"]
        print(f"  {name}: {gflops:.0f} GFLOP/s = {limit:.1f} ResNet-50 images/s; "
              f"ml embed {name} reaches {mine / limit:.0%} of it")
    print(json.dumps({
        "images": len(files),
        "images_per_s": {name: round(rate, 2) for name, rate in best.items()},
        "default": default_path,
        "ratio_vs_plain": round(ours / plain, 2),
        "ratio_vs_onnx_fp32": round(ours / onnx_fp32, 2) if onnx_fp32 else None,
        "agreement": {name: round(value, 4) for name, value in agreement.items()},
        "peak_gflops": {name: round(value, 1) for name, value in peaks.items()},
        "load_average": round(os.getloadavg()[0], 2),
        "runs": {name: [round(x, 2) for x in values] for name, values in rates.items()},
    }))


if __name__ == "__main__":
    main()
