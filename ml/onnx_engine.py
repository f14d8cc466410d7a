"""The fp32 CPU engine: the folded graph exported to ONNX once per machine and run by ONNX Runtime."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def onnx_session(model: nn.Module, name: str):
    """An ONNX Runtime session running ``model`` (pixels -> pooled, logits, maps), or None without onnxruntime.

    The exported graph is kept in ``onnx_cache_dir()`` under ``name`` (the weights' identity) and the
    torch version, so only the first load on a machine pays for the export (seconds).
    """
    try:
        import onnxruntime  # optional: without it fp32 runs in PyTorch
    except ImportError:
        log.warning("onnxruntime is not installed: fp32 embedding runs in PyTorch, which is slower")
        return None
    path = onnx_cache_dir() / f"{name}-torch{torch.__version__}.onnx"
    try:
        if not path.is_file():
            _export_onnx(model, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # export or session failures of every kind: PyTorch still runs the model
        log.warning("fp32 embedding runs in PyTorch, which is slower: ONNX Runtime could not load it (%s)", e)
        return None


def _export_onnx(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            model, (torch.zeros(1, 3, 224, 224),), str(partial),
            input_names=["pixels"], output_names=["pooled", "logits", "maps"],
            dynamic_axes={"pixels": {0: "n"}, "pooled": {0: "n"}, "logits": {0: "n"}, "maps": {0: "n"}}, dynamo=False,
        )
    partial.replace(path)  # other processes see the whole file or none


def onnx_cache_dir() -> Path:
    """Where exported ONNX graphs are kept: beside torch's own cache (``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()).parent / "visualsearch-onnx"
