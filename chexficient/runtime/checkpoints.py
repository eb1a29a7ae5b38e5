"""Accelerate checkpoints a killed run resumes from: one folder per optimizer step, a marker written last.

`save_checkpoint` writes `checkpoints/step-NNNNNNNN/` with `accelerator.save_state` on every process (model weights
as safetensors, optimizer and schedule loaded back with `torch.load(weights_only=True)`), lets the caller add its
own state as safetensors or JSON (`save_extra`), then the main process writes `checkpoint_complete.json` (the
caller's record of where the run is). Nothing of ours is pickled. A run killed mid-save leaves a folder without the
marker, which `find_checkpoint(..., "latest")` passes over. Used by train/pretrain.py and llava_rad/train.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


COMPLETE_MARKER = "checkpoint_complete.json"


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    record: dict[str, Any],
    limit: int | None = None,
    save_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save the state at `step` with `record` in its marker; keep the newest `limit` checkpoints (all when None).

    `save_extra(folder)` runs on the main process before the marker is written (state of the caller's own, e.g. the
    curator, as safetensors/JSON).
    """
    folder = Path(output_dir) / "checkpoints" / f"step-{step:08d}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if save_extra is not None:
            save_extra(folder)
        (folder / COMPLETE_MARKER).write_text(json.dumps(record))  # a kill mid-save leaves no marker
        if limit:
            for stale in sorted(folder.parent.glob("step-*"))[:-limit]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """The folder `--resume_from_checkpoint` names, or for "latest" the newest complete one under `output_dir`."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such folder.")
        return path
    checkpoints = sorted(
        p for p in (Path(output_dir) / "checkpoints").glob("step-*") if (p / COMPLETE_MARKER).exists()
    )
    if not checkpoints:
        raise FileNotFoundError(
            f"--resume_from_checkpoint latest: no complete checkpoint under {Path(output_dir) / 'checkpoints'}."
        )
    return checkpoints[-1]


def checkpoint_record(folder: Path) -> dict[str, Any]:
    """The record `save_checkpoint` wrote; an error naming the folder when it is incomplete."""
    path = Path(folder) / COMPLETE_MARKER
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {COMPLETE_MARKER}; the checkpoint is incomplete (killed mid-save?).")
    return json.loads(path.read_text())


__all__ = ["COMPLETE_MARKER", "checkpoint_record", "find_checkpoint", "save_checkpoint"]
