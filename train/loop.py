"""The training loop of `train/pretrain.py`: what a run is made of, its two step modes, `train_one_epoch`, the end of
curation, zero-shot validation, and checkpoint save/resume.

`train/pretrain.py` builds a `Run` once (set-up) and exports the model at the end; everything between lives here, as
open_clip's `train.py` holds the loop its `main.py` sets up. This module never imports `train.pretrain`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from chexficient.curation import (
    CuratingBatchSampler,
    PrototypeCurator,
    concat_normalized,
    curate_super_batch,
    curated_clip_loss,
    gather_no_grad,
    gather_with_grad,
)
from chexficient.data.manifests import read_manifest
from chexficient.data.pairs import ImageReportCollator, ImageReportDataset, PairTable
from chexficient.metrics import load_metric
from chexficient.runtime.checkpoints import checkpoint_record, save_checkpoint
from train.arguments import DataArguments, RunArguments
from train.optim import CurationAwareCosine

from image_processing_chexficient import CheXficientImageProcessor


logger = get_logger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


# ----- what a run is made of ------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where the run is: written as JSON into every checkpoint's completion marker."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    candidates_seen: int = 0
    pairs_trained: int = 0
    unreadable_images: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in asdict(self):
            setattr(self, key, int(state[key]))


@dataclass
class ZeroShotEvalSet:
    """A labelled manifest read once: a loader over its images and its label matrix [N, C]."""

    loader: torch.utils.data.DataLoader
    targets: np.ndarray
    labels: list[str]


@dataclass
class TrainingData:
    """The training pairs and what turns them into batches; the validation set once it has been read."""

    pairs: PairTable
    tokenizer: Any
    image_processor: CheXficientImageProcessor
    dataset: ImageReportDataset
    collator: ImageReportCollator
    sampler: CuratingBatchSampler
    loader: torch.utils.data.DataLoader | None = None  # made by `main`, after the prototypes are initialised
    validation_set: ZeroShotEvalSet | None = None


@dataclass
class RunRecord:
    """What the run keeps besides its checkpointed `TrainState`."""

    counters: torch.Tensor  # on-device [unreadable images, pairs trained], folded into the state when logged or saved
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # validation results, for summary.json
    trace: IO[str] | None = None  # samples.jsonl with `--trace_samples`
    resumed_from: int | None = None  # the checkpoint step this process started from


@dataclass
class Run:
    """One pretraining run: its fixed arguments, its data, what training updates (the prepared model, optimizer and
    scheduler, the schedule's horizon, the curator), and where it is."""

    args: RunArguments
    data: TrainingData
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: CurationAwareCosine
    curator: PrototypeCurator
    state: TrainState
    record: RunRecord


@dataclass
class StepResult:
    """What one optimizer step did: its loss, which candidates it saw and kept, and the kept pairs' features."""

    loss: torch.Tensor
    indices: torch.Tensor  # [N] dataset indices of the candidates (gathered over processes)
    valid: torch.Tensor  # [N] bool: the image decoded
    keep: torch.Tensor  # [N] bool: the pair entered the loss
    kept_features: torch.Tensor | None  # [M, 2D] for the prototype update while curating
    logit_scale: torch.Tensor


# ----- the two step modes ---------------------------------------------------------------------------------------------


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def embed(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_embeds, text_embeds, logit_scale) from one forward pass."""
    out = model(**model_inputs(batch))
    return out.image_embeds, out.text_embeds, out.logit_scale


def superbatch_step(
    model: torch.nn.Module, batch: dict[str, Any], curator: PrototypeCurator | None, seed: int, step: int
) -> StepResult:
    """Reference mode: forward the whole super-batch with gradients, select on the gathered embeddings (when a
    curator is given)."""
    image_embeds, text_embeds, logit_scale = embed(model, batch)
    all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    valid = gather_no_grad(batch["valid"])
    indices = gather_no_grad(batch["sample_index"])
    keep = valid
    if curator is not None:
        keep, _ = curate_super_batch(curator, all_images, all_texts, indices, valid, seed, step)
    loss = curated_clip_loss(all_images, all_texts, logit_scale, keep)
    kept = concat_normalized(all_images[keep].detach(), all_texts[keep].detach()) if curator is not None else None
    return StepResult(loss, indices, valid, keep, kept, logit_scale.detach())


def accumulate_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    curator: PrototypeCurator | None,
    seed: int,
    step: int,
    chunk_size: int,
) -> StepResult:
    """Single-process embedding accumulation: no-grad embeddings of the whole candidate pool in chunks, selection,
    then the gradient step on the selected pairs only (the paper's single-GPU mode)."""
    valid, indices = batch["valid"], batch["sample_index"]
    keep = valid
    if curator is not None:
        images, texts = [], []
        with torch.no_grad():
            for begin in range(0, len(indices), chunk_size):
                chunk = {k: v[begin : begin + chunk_size] for k, v in model_inputs(batch).items()}
                image_embeds, text_embeds, _ = embed(model, chunk)
                images.append(image_embeds.float())
                texts.append(text_embeds.float())
        keep, _ = curate_super_batch(curator, torch.cat(images), torch.cat(texts), indices, valid, seed, step)
    selected = {k: v[keep] for k, v in model_inputs(batch).items()}
    image_embeds, text_embeds, logit_scale = embed(model, selected)
    loss = curated_clip_loss(image_embeds, text_embeds, logit_scale)
    kept = concat_normalized(image_embeds.detach(), text_embeds.detach()) if curator is not None else None
    return StepResult(loss, indices, valid, keep, kept, logit_scale.detach())


def training_step(run: Run, batch: dict[str, Any], curating: bool) -> StepResult:
    """The forward pass and loss of one step in the run's mode."""
    curator = run.curator if curating else None
    seed, step = run.args.train.seed, run.state.global_step
    if run.args.accumulate:
        return accumulate_step(run.model, batch, curator, seed, step, run.args.curation.embedding_chunk_size)
    return superbatch_step(run.model, batch, curator, seed, step)


# ----- training -------------------------------------------------------------------------------------------------------


def fold_counters(run: Run) -> None:
    """Move the on-device step counters into the checkpointed state (one device sync)."""
    unreadable, trained = run.record.counters.tolist()
    run.state.unreadable_images += unreadable
    run.state.pairs_trained += trained
    run.record.counters.zero_()


def log_step(run: Run, result: StepResult, progress: tqdm) -> None:
    logs = {
        "loss": result.loss.detach().float().item(),
        "lr": run.scheduler.get_last_lr()[0],
        "kept_fraction": float(result.keep.float().mean()),
        "logit_scale": result.logit_scale.exp().item(),
    }
    if run.args.curating:
        logs["curated_pairs"] = int(run.curator.curated_ids().numel())
    run.accelerator.log(logs, step=run.state.global_step)
    progress.set_postfix(loss=f"{logs['loss']:.3f}", kept=f"{logs['kept_fraction']:.2f}")


def trace_step(
    trace: IO[str], result: StepResult, state: TrainState, resumed_from: int | None, learning_rate: float
) -> None:
    """One line of samples.jsonl: the step's candidates, the ones it kept, its loss and learning rate."""
    record = {
        "step": state.global_step,
        "epoch": state.epoch,
        "resumed_from": resumed_from,
        "indices": result.indices.tolist(),
        "kept": result.indices[result.keep].tolist(),
        "loss": result.loss.detach().float().item(),
        "lr": learning_rate,
    }
    trace.write(json.dumps(record) + "\n")
    trace.flush()


def train_one_epoch(run: Run, epoch: int) -> bool:
    """One pass over the sampler's batches of `epoch` (from where a resumed run stopped); True when `max_steps` ends
    the run."""
    accelerator, state, train_args, sampler = run.accelerator, run.state, run.args.train, run.data.sampler
    sampler.set_epoch(epoch, state.step_in_epoch if epoch == state.epoch else 0)
    if epoch != state.epoch:
        state.step_in_epoch = 0
    state.epoch = epoch
    curating = run.args.curating and sampler.is_curating
    progress = tqdm(
        run.data.loader,
        total=len(sampler),
        disable=not accelerator.is_local_main_process,
        desc=f"epoch {epoch + 1}/{train_args.num_epochs}" + (" (curating)" if curating else ""),
    )
    for batch in progress:
        batch = to_device(batch, accelerator.device)
        for sample_id, reason in batch["skipped"]:
            logger.warning(f"skipped unreadable image {sample_id}: {reason}")
        with accelerator.autocast():
            result = training_step(run, batch, curating)
        accelerator.backward(result.loss)
        if train_args.max_grad_norm is not None:
            accelerator.clip_grad_norm_(run.model.parameters(), train_args.max_grad_norm)
        learning_rate = run.scheduler.get_last_lr()[0]  # the rate this step uses
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if curating:
            run.curator.update_prototypes(result.kept_features)  # after the step, with pre-step features

        run.record.counters += torch.stack([(~result.valid).sum(), result.keep.sum()])  # synced when logged or saved
        state.candidates_seen += result.indices.numel()
        state.global_step += 1
        state.step_in_epoch += 1
        if run.record.trace is not None:
            trace_step(run.record.trace, result, state, run.record.resumed_from, learning_rate)
        if state.global_step % train_args.logging_steps == 0:
            log_step(run, result, progress)
        if train_args.eval_steps and run.args.validates and state.global_step % train_args.eval_steps == 0:
            validate(run)
        if train_args.save_steps and state.global_step % train_args.save_steps == 0:
            save(run)
        if train_args.max_steps and state.global_step >= train_args.max_steps:
            return True
    return False


def end_curation(run: Run, epoch: int) -> None:
    """After the last curation epoch: train on the subset from now on, with the schedule's real horizon."""
    sampler, accelerator, pairs = run.data.sampler, run.accelerator, run.data.pairs
    subset = run.curator.curated_ids()
    sampler.set_curated_ids(subset)
    batch = sampler.current_batch_size(epoch + 1)
    if batch < sampler.curated_batch_size:
        accelerator.print(
            f"warning: the curated subset ({subset.numel()} pairs) is smaller than one curated super-batch of "
            f"{sampler.curated_batch_size} x {accelerator.num_processes}; later epochs use batches of "
            f"{batch} per process."
        )
    num_epochs, max_steps = run.args.train.num_epochs, run.args.train.max_steps
    remaining = sum(sampler.steps_per_epoch(e, pool_size=subset.numel()) for e in range(epoch + 1, num_epochs))
    if max_steps:
        remaining = min(remaining, max_steps - run.state.global_step)
    run.schedule.finalize(run.state.global_step, remaining)
    accelerator.print(
        f"curation done: kept {subset.numel()} of {len(pairs)} pairs ({subset.numel() / len(pairs):.1%}); "
        f"{remaining} steps remain"
    )
    composition = subset_composition(run.args.data, pairs, subset)
    if composition:
        accelerator.print("  label shares (pool -> curated subset):")
        for label, (pool, kept) in composition.items():
            accelerator.print(f"    {label:<20} {pool:6.1%} -> {kept:6.1%}")


def subset_composition(
    data_args: DataArguments, pairs: PairTable, subset: torch.Tensor
) -> dict[str, tuple[float, float]]:
    """{label: (share in the pool, share in the subset)} for the label columns the training manifest has (of
    `--eval_labels`); empty when it has none."""
    labels, manifest = data_args.eval_labels or [], data_args.train_manifest
    if not labels or not isinstance(manifest, str):
        return {}
    frame = read_manifest(manifest)
    present = [label for label in labels if label in frame.columns]
    id_column = data_args.id_column
    if not present or id_column not in frame.columns:
        return {}
    rows = frame.set_index(frame[id_column].astype(str)).loc[pairs.ids]  # the pairs trained on, in order
    chosen = rows.iloc[subset.numpy()]
    return {label: (float((rows[label] == 1).mean()), float((chosen[label] == 1).mean())) for label in present}


# ----- evaluation -----------------------------------------------------------------------------------------------------


def build_eval_set(data_args: DataArguments, data: TrainingData, manifest: str) -> ZeroShotEvalSet:
    """Read a labelled manifest (image column + one column per `--eval_labels` label) into a `ZeroShotEvalSet`."""
    labels = list(data_args.eval_labels)
    frame = read_manifest(manifest)
    missing = [c for c in [data_args.image_column, *labels] if c not in frame.columns]
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {missing}.")
    root = Path(data_args.image_root) if data_args.image_root else Path(manifest).parent
    ids = (
        frame[data_args.id_column].astype(str).tolist()
        if data_args.id_column in frame
        else list(map(str, frame.index))
    )
    pairs = PairTable(ids=ids, images=[str(root / p) for p in frame[data_args.image_column]], texts=[""] * len(frame))
    loader = torch.utils.data.DataLoader(
        ImageReportDataset(pairs, data.image_processor),
        batch_size=64,
        collate_fn=data.collator,
        num_workers=0,
        generator=torch.Generator(),  # leaves the global RNG (dropout) untouched
    )
    return ZeroShotEvalSet(loader, frame[labels].to_numpy(dtype=float), labels)


@torch.no_grad()
def evaluate(run: Run, eval_set: ZeroShotEvalSet, prompts: str = "paper") -> dict[str, Any]:
    """Zero-shot macro AUROC on `eval_set` with the model's own `zero_shot_classify`, identical on every process
    (ZeRO-3 gathers parameters in each forward)."""
    model = run.accelerator.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    scores, rows = [], []
    for batch in eval_set.loader:
        pixel_values = batch["pixel_values"].to(run.accelerator.device)
        valid = batch["valid"]
        image_embeds = model.get_image_features(pixel_values)
        probs = model.zero_shot_classify(
            eval_set.labels, run.data.tokenizer, image_embeds=image_embeds, prompts=prompts
        )
        scores.append(probs[valid.to(probs.device)].float().cpu())
        rows.append(batch["sample_index"][valid])
    model.train(was_training)
    rows = torch.cat(rows).numpy()
    result = load_metric("multilabel_auc").compute(
        predictions=torch.cat(scores).numpy(), references=eval_set.targets[rows], labels=eval_set.labels
    )
    result["num_images"] = int(len(rows))
    result["prompts"] = prompts
    return result


def validate(run: Run, **where: int) -> None:
    """Zero-shot AUROC on the held-out manifest, logged and kept for summary.json."""
    if run.data.validation_set is None:
        run.data.validation_set = build_eval_set(run.args.data, run.data, run.args.data.eval_manifest)
    prompts, step = run.args.train.eval_prompts, run.state.global_step
    result = evaluate(run, run.data.validation_set, prompts)
    run.record.eval_history.append({"step": step, **where, **result})
    run.accelerator.log({"eval/macro_auroc": result["macro_auroc"]}, step=step)
    run.accelerator.print(
        f"step {step}: validation zero-shot macro AUROC {result['macro_auroc']:.4f} ({prompts} prompts)"
    )


# ----- save / resume --------------------------------------------------------------------------------------------------


def save(run: Run) -> None:
    """A complete checkpoint of the run at its current step."""
    fold_counters(run)
    save_checkpoint(
        run.accelerator,
        run.args.output_dir,
        run.state.global_step,
        {"state": run.state.state_dict()},
        run.args.train.save_total_limit,
        save_extra=run.curator.save if run.args.curating else None,
    )


def resume(run: Run, checkpoint: Path) -> None:
    """Load model, optimizer and schedule (Accelerate: safetensors and weights-only loads), then our own state: the
    train state from the completion marker (JSON), the curator from safetensors."""
    record = checkpoint_record(checkpoint)
    run.accelerator.load_state(str(checkpoint))
    run.state.load_state_dict(record["state"])  # the schedule's horizon came back with the scheduler's state
    if run.args.curating:
        run.curator.load(checkpoint)
    run.record.resumed_from = run.state.global_step
    run.accelerator.print(
        f"resumed from {checkpoint} at step {run.state.global_step} (epoch {run.state.epoch}, "
        f"step {run.state.step_in_epoch} of the epoch)"
    )
