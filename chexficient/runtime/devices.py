"""Device, dtype and Accelerator set-up shared by every program: one vocabulary, one place."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


# The project's one dtype vocabulary (torch's own names), used by every --dtype option.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, option: str = "--dtype") -> torch.dtype:
    """The torch dtype for one of `DTYPES`; a ValueError naming the option otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{option} must be one of {list(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None) picks CUDA when it is available, else the CPU; anything else goes to `torch.device`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_distributed_cpu(cpu: bool) -> bool:
    """True in a multi-process launch that runs on CPUs (gloo, never NCCL; DeepSpeed defaults to NCCL)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (cpu or not torch.cuda.is_available())


def make_accelerator(
    *,
    cpu: bool = False,
    mixed_precision: str = "no",
    output_dir: str | os.PathLike | None = None,
    report_to: str = "none",
    **kwargs: Any,
):
    """An `Accelerator` for a training program: gloo on CPU launches, the tracker named by `report_to` ("none": off).

    Extra keyword arguments (gradient accumulation, data-loader configuration) go to `Accelerator` unchanged.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {mixed_precision!r}.")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if is_distributed_cpu(cpu) else []
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_dir=None if output_dir is None else os.fspath(output_dir),
        kwargs_handlers=handlers,
        **kwargs,
    )


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


__all__ = ["DTYPES", "is_distributed_cpu", "make_accelerator", "resolve_device", "seed_worker", "torch_dtype"]
