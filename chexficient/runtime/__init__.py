"""Where a program runs: machine facts (`machine`), device/dtype/Accelerator set-up (`devices`, re-exported here),
argument presets (`presets`) and resumable checkpoints (`checkpoints`)."""

from .devices import DTYPES, is_distributed_cpu, make_accelerator, resolve_device, seed_worker, torch_dtype


__all__ = ["DTYPES", "is_distributed_cpu", "make_accelerator", "resolve_device", "seed_worker", "torch_dtype"]
