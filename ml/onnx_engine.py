"""The CPU engines: each weights' folded graph exported to ONNX once, its int8 quantisation, run by ONNX Runtime.

A cached graph comes with a manifest (the model identity, eval preset and ImageNet categories) and the
classifier's weights, so a later load needs neither PyTorch nor the model: ``cached_graph`` finds them by
the weights' identity. Only ``export_graph`` imports PyTorch.

int8 is ONNX Runtime's static quantisation (QDQ, per-channel int8 weights, uint8 activations), calibrated
on images of the catalog it will embed; the first convolution and the classifier stay fp32
(docs/decisions.md). Its quality is judged on the catalog's own evaluation, never assumed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from ml.files import atomic_write
from ml.precision import cpu_threads
from ml.preprocessing import EvalPreset
from ml.weights import torch_home

log = logging.getLogger(__name__)

# Activation ranges from the 99.99th percentile rather than the extremes: on the tuxpaint stamps (EfficientNet-Lite0)
# the closest to fp32's vectors of the settings tried (docs/decisions.md).
CALIBRATION_PERCENTILE = 99.99
GRAPH_FORMAT = 2  # bumped when what a cached graph holds changes, so older caches are exported again


def onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401  optional: without it every precision runs in PyTorch
    except ImportError:
        return False
    return True


def onnx_cache_dir() -> Path:
    """Where exported graphs are kept: beside PyTorch's own cache (``TORCH_HOME``)."""
    return torch_home() / "visualsearch-onnx"


def graph_stem(backbone: str, weights_key: str) -> str:
    """The cache name of a weights' graphs. ``weights_key`` is the weights file's sha256, or "random" (seeded,
    and so the same for one PyTorch version)."""
    key = weights_key[:16] if weights_key != "random" else "random"
    return f"{backbone}-{key}-torch{metadata.version('torch')}-g{GRAPH_FORMAT}"


@dataclass(frozen=True)
class CachedGraph:
    """A weights' exported graphs and what an embedder needs besides them."""

    stem: str
    manifest: dict

    @property
    def directory(self) -> Path:
        return onnx_cache_dir()

    def path(self, precision: str) -> Path:
        return self.directory / f"{self.stem}.{precision}.onnx"

    def has(self, precision: str) -> bool:
        return self.path(precision).is_file()

    @property
    def preset(self) -> EvalPreset:
        p = self.manifest["preset"]
        return EvalPreset(resize_size=p["resize_size"], crop_size=p["crop_size"],
                          resample=Image.Resampling(p["resample"]), mean=tuple(p["mean"]), std=tuple(p["std"]))

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.manifest["categories"])

    def class_weights(self) -> np.ndarray:
        return np.load(self.directory / f"{self.stem}.classifier.npy")


def cached_graph(stem: str) -> CachedGraph | None:
    """The cached graphs under ``stem``, or None when the fp32 graph was never exported on this machine."""
    try:
        manifest = json.loads((onnx_cache_dir() / f"{stem}.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    graph = CachedGraph(stem, manifest)
    return graph if graph.has("fp32") else None


def export_graph(model, stem: str, *, identity: dict, preset: EvalPreset, categories, class_weights) -> CachedGraph:
    """Export ``model`` (pixels -> pooled, logits, maps) as the fp32 graph, with its manifest."""
    import torch

    directory = onnx_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    graph = CachedGraph(stem, {
        "identity": identity,
        "preset": {"resize_size": preset.resize_size, "crop_size": preset.crop_size, "resample": int(preset.resample),
                   "mean": list(preset.mean), "std": list(preset.std)},
        "categories": list(categories),
    })
    with _partial(graph.path("fp32")) as partial, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            model, (torch.zeros(1, 3, preset.crop_size, preset.crop_size),), str(partial),
            input_names=["pixels"], output_names=["pooled", "logits", "maps"],
            dynamic_axes={"pixels": {0: "n"}, "pooled": {0: "n"}, "logits": {0: "n"}, "maps": {0: "n"}}, dynamo=False,
        )
    atomic_write(directory / f"{stem}.classifier.npy", lambda f: np.save(f, np.asarray(class_weights, np.float32)))
    # The manifest last: a graph is found only once everything it needs is there.
    atomic_write(directory / f"{stem}.json", lambda f: f.write(json.dumps(graph.manifest).encode()))
    return graph


def quantize_int8(graph: CachedGraph, calibration: Iterable[np.ndarray]) -> Path:
    """Quantise the fp32 graph to int8, calibrated on ``calibration`` (normalised float32 batches)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[np.ndarray]):
            self.batches = batches

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    with tempfile.TemporaryDirectory(dir=graph.directory) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(graph.path("fp32")), str(prepared), skip_symbolic_shape=True)
        keep_fp32 = _first_and_last_layers(prepared)
        with _partial(graph.path("int8")) as partial:
            quantize_static(str(prepared), str(partial), Reader(iter(calibration)), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=keep_fp32,
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE})
    return graph.path("int8")


def _first_and_last_layers(path: Path) -> list[str]:
    """The first convolution (it sees raw pixels) and the classifier: what stays fp32 in the int8 graph."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    first = next(node.name for node in nodes if node.op_type == "Conv")
    last = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")][-1:]
    return [first, *last]


def open_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _partial:
    """A temporary name beside ``path`` that becomes ``path`` on success: other processes see all or nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def __enter__(self) -> Path:
        return self.temporary

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.temporary.replace(self.path)
        else:
            self.temporary.unlink(missing_ok=True)
