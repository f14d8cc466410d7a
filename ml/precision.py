"""Numeric precision and CPU threads: what "auto" means on each device, and how many threads to run."""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """What "auto" means: the fastest precision whose embeddings keep fp32's neighbours.

    The bar is ``ml.evaluation.AGREEMENT_BAR`` of top-10 neighbour overlap with fp32 on the same
    images. bf16 misses it (every activation is stored with 8 significant bits), so it stays an
    explicit choice; fp16 keeps 11 and passes, so "auto" is fp16 autocast on CUDA, where it runs on
    tensor cores, and fp32 on the CPU. The figures are in benchmarks/README.md and docs/preprocessing.md.
    """
    if precision != "auto":
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("this CPU has no bf16 instructions: bf16 is emulated and slower than fp32")
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


@cache
def configure_cpu_threads() -> None:
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
