"""What machine a measurement ran on: CPU model and ISA flags, cores, GPU, library versions.

Every benchmark JSON records `machine_info()`, so that a number can be read against the hardware that produced it.
`cpu_has_native_bf16()` tells the inference engine whether bfloat16 matmuls have hardware support on this CPU
(AVX512-BF16 or AMX-BF16); without it, oneDNN emulates them and bf16 is usually slower than fp32.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


# The /proc/cpuinfo flags that matter for inference speed (VNNI: int8 dot products; BF16 / AMX: bfloat16 matmuls).
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "numpy", "onnxruntime", "safetensors")


@functools.lru_cache(maxsize=1)
def _cpuinfo_text() -> str:
    """/proc/cpuinfo, read once; empty where there is none (macOS)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; (None, {}) where there is none."""
    text = _cpuinfo_text()
    model, flags = None, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / ARM
            flags = frozenset(value.split())
        if model is not None and flags:
            break
    return model, flags


def cpu_flags() -> dict[str, bool]:
    """The ISA extensions that matter for inference speed, each True/False (all False where unknown)."""
    _, flags = _cpuinfo()
    return {flag: flag in flags for flag in ISA_FLAGS}


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 dot products in hardware (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    return flags["avx512_bf16"] or flags["amx_bf16"]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _physical_cores() -> int | None:
    """Physical cores from /proc/cpuinfo (core id per physical id); None where it cannot tell."""
    cores, physical = set(), "0"
    for line in _cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and compute capability of each visible CUDA device; None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": torch.cuda.get_device_name(index),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        )
    return {
        "count": len(devices),
        "devices": devices,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_supported": bool(torch.cuda.is_bf16_supported()),
    }


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on, as JSON-ready data."""
    model, _ = _cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    torch_threads = None
    if "torch" in sys.modules or _version("torch"):
        import torch

        torch_threads = torch.get_num_threads()
    gpu = gpu_info()
    return {
        "platform": platform.platform(),
        "cpu_model": model or platform.processor() or None,
        "cpu_flags": cpu_flags(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "cpus_available": affinity,
        "torch_threads": torch_threads,
        "gpu_model": gpu["devices"][0]["name"] if gpu else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def device_slug() -> str:
    """A short file-name-safe name of the accelerator this process uses: 'h100' for an NVIDIA H100 80GB HBM3, else
    the GPU's name lower-cased, or 'cpu'."""
    gpu = gpu_info()
    if not gpu:
        return "cpu"
    name = gpu["devices"][0]["name"].lower().replace("nvidia", "").strip()
    for family in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4", "b200", "rtx"):
        if family in name:
            return family
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "gpu"


__all__ = ["cpu_flags", "cpu_has_native_bf16", "device_slug", "gpu_info", "machine_info"]
