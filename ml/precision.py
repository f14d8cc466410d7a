"""Numeric precision and CPU threads: what "auto" means on each device, and how many threads to run.

Nothing here imports PyTorch at module level: the ONNX Runtime engines start without it.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

from ml.weights import WeightsError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")
# Precisions that run in ONNX Runtime on the CPU (the folded graph, and its int8 quantisation).
ONNX_PRECISIONS = ("fp32", "int8")
# What the catalog's evaluation may choose for "auto" on the CPU instead of fp32 (bf16 where it is native).
CPU_CANDIDATES = ("int8", "bf16")


class PrecisionUnavailableError(WeightsError):
    """The precision asked for cannot run here; ``str(e)`` says what to do about it."""


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def machine_kind() -> str:
    """What decides which precision is fast and how it rounds: the vector extensions, e.g. "avx512+vnni+bf16".

    A precision decision measured on one kind holds on every machine of that kind (docs/decisions.md).
    """
    flags = cpu_flags()
    parts = ["avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline"]
    parts += [name for name, flag in (("vnni", "avx512_vnni"), ("bf16", "avx512_bf16"), ("amx", "amx_int8"))
              if flag in flags]
    if "avx512_vnni" not in flags and "avx_vnni" in flags:
        parts.append("vnni")
    return "+".join(parts)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); otherwise bf16 is emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device_type: str, *, chosen: str | None = None) -> str:
    """What "auto" means on ``device_type`` ("cpu", "cuda").

    On the CPU, "auto" is what the catalog's own evaluation chose for these weights on this machine kind
    (``chosen``: int8 or bf16 only where it was faster and its search recall@1 and category top-1 were within
    half a point of fp32's, catalog/precision_choice.py), else fp32. On CUDA it is fp16 autocast, which runs on tensor
    cores and keeps fp32's neighbours (benchmarks/README.md).
    """
    if precision != "auto":
        if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
            log.warning("this CPU has no bf16 instructions: bf16 is emulated and slower than fp32")
        if precision == "int8" and device_type != "cpu":
            raise PrecisionUnavailableError("int8 runs in ONNX Runtime on the CPU; on CUDA choose fp16 or auto")
        return precision
    if device_type == "cuda":
        return "fp16"
    return chosen if chosen in CPU_CANDIDATES else "fp32"


@cache
def configure_cpu_threads() -> None:
    """One PyTorch intra-op thread per CPU this process may use (affinity and cgroup quota), unless set."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(available_cpus())


def cpu_threads() -> int:
    """Threads for one engine's operators: OMP_NUM_THREADS when set, else the CPUs this process may use."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available_cpus()


def available_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
