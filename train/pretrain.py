"""Curated CLIP pretraining of CheXficient with Accelerate (1 CPU, 1 GPU, many GPUs, several nodes, DeepSpeed).

    accelerate launch train/pretrain.py                                  # tiny model on the built-in phantoms
    accelerate launch train/pretrain.py --config chexficient_vitb14_378 --train_manifest pairs.csv ...

Each step embeds a super-batch (the per-process batches of all processes, gathered), lets the prototype curator
keep the informative pairs, and takes a contrastive step on those. After the curation epochs, training continues on
the curated subset only. Checkpoints hold the model, optimizer, schedule, curator and data position, so a killed run
resumes where it stopped without repeating or losing samples.

The shape is open_clip's: `setup` builds a `RunContext` once, `train_one_epoch` runs one pass over the sampler,
`evaluate` scores zero-shot classification on a labelled manifest, `finish` exports the model.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


if __package__ in (None, ""):  # `accelerate launch train/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from chexficient.checkpoints import checkpoint_record, find_checkpoint, save_checkpoint
from chexficient.curation import (
    CuratingBatchSampler,
    CurationConfig,
    PrototypeCurator,
    concat_normalized,
    curate_super_batch,
    curated_clip_loss,
    gather_no_grad,
    gather_with_grad,
    warmup_indices,
)
from chexficient.manifests import read_manifest
from chexficient.metrics import load_metric
from chexficient.pairs import ImageReportCollator, ImageReportDataset, PairTable, load_pairs
from chexficient.presets import load_json_preset
from chexficient.runtime import make_accelerator, seed_worker
from chexficient.subset import curated_subset_record, write_curated_subset
from train.arguments import MODEL_CONFIG_DIR, DataArguments, ModelArguments, TrainArguments, parse_arguments
from train.optim import CurationAwareCosine, build_optimizer_and_schedule

from configuration_chexficient import CheXficientConfig
from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


logger = get_logger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


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
class StepResult:
    """What one optimizer step did: its loss, which candidates it saw and kept, and the kept pairs' features."""

    loss: torch.Tensor
    indices: torch.Tensor  # [N] dataset indices of the candidates (gathered over processes)
    valid: torch.Tensor  # [N] bool: the image decoded
    keep: torch.Tensor  # [N] bool: the pair entered the loss
    kept_features: torch.Tensor | None  # [M, 2D] for the prototype update while curating
    logit_scale: torch.Tensor


@dataclass
class RunContext:
    """Everything a run builds once and its phases share."""

    model_args: ModelArguments
    data_args: DataArguments
    curation: CurationConfig
    train_args: TrainArguments
    accelerator: Accelerator
    output_dir: Path
    pairs: PairTable
    tokenizer: Any
    image_processor: CheXficientImageProcessor
    dataset: ImageReportDataset
    collator: ImageReportCollator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: CurationAwareCosine
    sampler: CuratingBatchSampler
    curator: PrototypeCurator
    state: TrainState = field(default_factory=TrainState)
    loader: torch.utils.data.DataLoader | None = None
    counters: torch.Tensor | None = None  # on-device [unreadable images, pairs trained], folded into `state`
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    validation_set: ZeroShotEvalSet | None = None
    trace: IO[str] | None = None
    resumed_from: int | None = None  # the checkpoint step this process started from

    @property
    def curating_enabled(self) -> bool:
        return self.curation.curating

    @property
    def accumulate(self) -> bool:
        return self.curating_enabled and self.curation.curation_mode == "accumulate"

    @property
    def validates(self) -> bool:
        return bool(self.data_args.eval_manifest and self.data_args.eval_labels)


# ----- set-up ---------------------------------------------------------------------------------------------------------


def build_config(model_args: ModelArguments, curation: CurationConfig) -> CheXficientConfig:
    values = load_json_preset(model_args.model_config, MODEL_CONFIG_DIR)
    values["num_prototypes"] = curation.num_prototypes
    return CheXficientConfig(**values)


def prepare_phantoms(data_args: DataArguments, output_dir: Path, accelerator: Accelerator) -> None:
    """Render the built-in phantoms (main process first) and point the data arguments at them."""
    from chexficient.phantoms import PHANTOM_LABELS, write_pretraining_splits

    root = Path(data_args.phantom_dir or output_dir / "phantoms")
    if accelerator.is_main_process:  # the others wait, then read what it wrote
        write_pretraining_splits(
            root,
            num_train=data_args.phantom_num_train,
            num_val=data_args.phantom_num_eval,
            num_test=data_args.phantom_num_test,
            seed=data_args.phantom_seed,
            image_size=data_args.phantom_image_size,
        )
    accelerator.wait_for_everyone()
    data_args.train_manifest = str(root / "train_split.csv")
    data_args.eval_manifest = data_args.eval_manifest or str(root / "val_split.csv")
    data_args.test_manifest = data_args.test_manifest or str(root / "test.csv")
    data_args.image_root = str(root)
    if data_args.eval_labels is None:
        data_args.eval_labels = list(PHANTOM_LABELS)


def load_tokenizer(model_args: ModelArguments, pairs: PairTable, output_dir: Path, accelerator: Accelerator):
    from transformers import AutoTokenizer

    from train.tokenizer import build_report_tokenizer

    source = model_args.tokenizer or model_args.init_text_from or model_args.model_name_or_path
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    path = output_dir / "tokenizer"
    if accelerator.is_main_process and not (path / "tokenizer.json").exists():
        build_report_tokenizer(pairs.texts, vocab_size=model_args.tokenizer_vocab_size).save_pretrained(path)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(path)


def build_model(model_args: ModelArguments, config: CheXficientConfig) -> CheXficientModel:
    if model_args.model_name_or_path:
        model = CheXficientModel.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation
        )
    else:
        config._attn_implementation = model_args.attn_implementation
        model = CheXficientModel(config)
    if model_args.init_vision_from or model_args.init_text_from:
        from train.init_towers import load_pretrained_towers

        load_pretrained_towers(model, model_args.init_vision_from, model_args.init_text_from)
    mask_token = getattr(model.vision_model.embeddings, "mask_token", None)
    if mask_token is not None:  # only masked-image modelling uses it; DDP rejects parameters without gradients
        mask_token.requires_grad_(False)
    if model_args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable()
    return model


def make_train_loader(ctx: RunContext) -> torch.utils.data.DataLoader:
    """One loader for the whole run: the batch sampler is re-read (new epoch, new subset) at every `iter()`.

    Its own generator keeps iterator creation from drawing on the global RNG, so that a resumed run's dropout
    stream is the uninterrupted run's.
    """
    num_workers = ctx.data_args.num_workers
    return torch.utils.data.DataLoader(
        ctx.dataset,
        batch_sampler=ctx.sampler,
        collate_fn=ctx.collator,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(ctx.train_args.seed),
    )


def random_subset(pairs: PairTable, curation: CurationConfig, seed: int) -> torch.Tensor:
    """The random-subset baseline's indices: a share (`random_subset_ratio`) or a count (`random_subset_size`)."""
    generator = torch.Generator().manual_seed(seed + 104729)
    if curation.random_subset_size is not None:
        size = min(curation.random_subset_size, len(pairs))
    else:
        size = max(1, round(curation.random_subset_ratio * len(pairs)))
    return torch.randperm(len(pairs), generator=generator)[:size]


def estimated_total_steps(sampler: CuratingBatchSampler, curation: CurationConfig, train_args, num_pairs: int) -> int:
    """Optimizer steps of the run, with the curated subset's size estimated until curation has chosen it."""
    curation_steps = sampler.curation_epochs * sampler.steps_per_epoch(0)
    later_pool = round(curation.expected_keep_ratio * num_pairs) if curation.curating else sampler.curated_ids.numel()
    later_steps = sum(
        sampler.steps_per_epoch(e, pool_size=later_pool) for e in range(sampler.curation_epochs, train_args.num_epochs)
    )
    total = curation_steps + later_steps
    return min(total, train_args.max_steps) if train_args.max_steps else total


def setup(argv: list[str] | None = None) -> RunContext:
    """Parse the arguments and build everything the run needs; resume from a checkpoint when asked."""
    model_args, data_args, curation, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    accelerator = make_accelerator(
        cpu=train_args.cpu,
        mixed_precision=train_args.mixed_precision,
        output_dir=output_dir,
        report_to=train_args.report_to,
    )
    set_seed(train_args.seed)
    output_dir.mkdir(parents=True, exist_ok=True)

    if data_args.train_manifest is None:
        prepare_phantoms(data_args, output_dir, accelerator)
    pairs = load_pairs(
        data_args.train_manifest,
        image_root=data_args.image_root,
        image_column=data_args.image_column,
        id_column=data_args.id_column,
        text_columns=data_args.text_columns,
        label_columns=data_args.label_columns,
    )
    config = build_config(model_args, curation)
    tokenizer = load_tokenizer(model_args, pairs, output_dir, accelerator)
    model = build_model(model_args, config)
    config = model.config
    if config.text_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text tower only {config.text_config.vocab_size}."
        )
    image_size = config.vision_config.image_size
    image_processor = CheXficientImageProcessor(size={"shortest_edge": image_size})

    accumulate = curation.curating and curation.curation_mode == "accumulate"
    if accumulate and accelerator.num_processes > 1:
        raise ValueError(
            "--curation_mode accumulate is the single-process mode; use superbatch with several processes."
        )
    batch_size = curation.candidate_pool_size if accumulate else train_args.per_device_batch_size
    sampler = CuratingBatchSampler(
        num_samples=len(pairs),
        batch_size=batch_size,
        curated_batch_size=train_args.curated_batch_size or train_args.per_device_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        curation_epochs=curation.curation_epochs if curation.curating else 0,
        seed=train_args.seed,
    )
    if curation.random_subset:
        sampler.set_curated_ids(random_subset(pairs, curation, train_args.seed))
    elif not curation.curating:
        sampler.set_curated_ids(torch.arange(len(pairs)))
    if sampler.steps_per_epoch(0) == 0:
        raise ValueError(
            f"{len(pairs)} pairs make no full batch of {sampler.current_batch_size(0)} x "
            f"{accelerator.num_processes} processes: lower the batch size."
        )
    curator = PrototypeCurator(curation, num_samples=len(pairs)).to(accelerator.device)

    optimizer, scheduler, schedule = build_optimizer_and_schedule(
        model,
        learning_rate=train_args.learning_rate,
        min_learning_rate=train_args.min_learning_rate,
        weight_decay=train_args.weight_decay,
        estimated_total_steps=estimated_total_steps(sampler, curation, train_args, len(pairs)),
        warmup_steps=train_args.warmup_steps,
    )
    if accelerator.state.deepspeed_plugin is not None:  # the loader is not prepared, so DeepSpeed cannot infer it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ctx = RunContext(
        model_args=model_args,
        data_args=data_args,
        curation=curation,
        train_args=train_args,
        accelerator=accelerator,
        output_dir=output_dir,
        pairs=pairs,
        tokenizer=tokenizer,
        image_processor=image_processor,
        dataset=ImageReportDataset(pairs, image_processor),
        collator=ImageReportCollator(tokenizer, (image_size, image_size), data_args.max_text_length),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        schedule=schedule,
        sampler=sampler,
        curator=curator,
    )
    if train_args.resume_from_checkpoint:
        resume(ctx, find_checkpoint(train_args.resume_from_checkpoint, output_dir))
    if curation.curating:
        sampler.set_curated_ids(curator.curated_ids())
    ctx.counters = torch.zeros(2, dtype=torch.long, device=accelerator.device)
    return ctx


def resume(ctx: RunContext, checkpoint: Path) -> None:
    """Load model, optimizer and schedule (Accelerate: safetensors and weights-only loads), then our own state: the
    train state from the completion marker (JSON), the curator from safetensors."""
    record = checkpoint_record(checkpoint)
    ctx.accelerator.load_state(str(checkpoint))
    ctx.state.load_state_dict(record["state"])  # the schedule's horizon came back with the scheduler's state
    if ctx.curating_enabled:
        ctx.curator.load(checkpoint)
    ctx.resumed_from = ctx.state.global_step
    ctx.accelerator.print(
        f"resumed from {checkpoint} at step {ctx.state.global_step} (epoch {ctx.state.epoch}, "
        f"step {ctx.state.step_in_epoch} of the epoch)"
    )


def save(ctx: RunContext) -> None:
    """A complete checkpoint of the run at its current step."""
    fold_counters(ctx)
    record = {"state": ctx.state.state_dict()}
    save_checkpoint(
        ctx.accelerator,
        ctx.output_dir,
        ctx.state.global_step,
        record,
        ctx.train_args.save_total_limit,
        save_extra=ctx.curator.save if ctx.curating_enabled else None,
    )


# ----- curation ---------------------------------------------------------------------------------------------------------


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def embed(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_embeds, text_embeds, logit_scale) from one forward pass."""
    out = model(**model_inputs(batch))
    return out.image_embeds, out.text_embeds, out.logit_scale


def initialize_prototypes(ctx: RunContext) -> None:
    """k-means on a shuffled warm-up sample drawn from the whole training set (not one source, as the reference)."""
    accelerator, model = ctx.accelerator, ctx.model
    chosen = warmup_indices(
        len(ctx.pairs), ctx.curation.warmup_samples, ctx.train_args.seed, accelerator.num_processes
    )
    shard = chosen[accelerator.process_index :: accelerator.num_processes].tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ctx.dataset, shard),
        batch_size=max(ctx.train_args.per_device_batch_size, 1),
        collate_fn=ctx.collator,
        num_workers=0,
        generator=torch.Generator(),
    )
    images, texts, valids = [], [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, accelerator.device)
            image_embeds, text_embeds, _ = embed(model, batch)
            images.append(gather_no_grad(image_embeds.float()))
            texts.append(gather_no_grad(text_embeds.float()))
            valids.append(gather_no_grad(batch["valid"]))
    model.train()
    valid = torch.cat(valids)
    generator = torch.Generator().manual_seed(ctx.train_args.seed)
    ctx.curator.initialize(torch.cat(images)[valid], torch.cat(texts)[valid], generator=generator)
    logger.info(f"prototypes initialised by k-means on {int(valid.sum())} warm-up pairs")


def superbatch_step(ctx: RunContext, batch: dict[str, Any], curating: bool) -> StepResult:
    """Reference mode: forward the whole super-batch with gradients, select on the gathered embeddings."""
    image_embeds, text_embeds, logit_scale = embed(ctx.model, batch)
    all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    valid = gather_no_grad(batch["valid"])
    indices = gather_no_grad(batch["sample_index"])
    keep = valid
    if curating:
        seed, step = ctx.train_args.seed, ctx.state.global_step
        keep, _ = curate_super_batch(ctx.curator, all_images, all_texts, indices, valid, seed, step)
    loss = curated_clip_loss(all_images, all_texts, logit_scale, keep)
    kept = concat_normalized(all_images[keep].detach(), all_texts[keep].detach()) if curating else None
    return StepResult(loss, indices, valid, keep, kept, logit_scale.detach())


def accumulate_step(ctx: RunContext, batch: dict[str, Any], curating: bool) -> StepResult:
    """Single-process embedding accumulation: no-grad embeddings of the whole candidate pool in chunks, selection,
    then the gradient step on the selected pairs only (the paper's single-GPU mode)."""
    valid, indices = batch["valid"], batch["sample_index"]
    keep = valid
    chunk_size = ctx.curation.embedding_chunk_size
    if curating:
        images, texts = [], []
        with torch.no_grad():
            for begin in range(0, len(indices), chunk_size):
                chunk = {k: v[begin : begin + chunk_size] for k, v in model_inputs(batch).items()}
                image_embeds, text_embeds, _ = embed(ctx.model, chunk)
                images.append(image_embeds.float())
                texts.append(text_embeds.float())
        seed, step = ctx.train_args.seed, ctx.state.global_step
        keep, _ = curate_super_batch(ctx.curator, torch.cat(images), torch.cat(texts), indices, valid, seed, step)
    selected = {k: v[keep] for k, v in model_inputs(batch).items()}
    image_embeds, text_embeds, logit_scale = embed(ctx.model, selected)
    loss = curated_clip_loss(image_embeds, text_embeds, logit_scale)
    kept = concat_normalized(image_embeds.detach(), text_embeds.detach()) if curating else None
    return StepResult(loss, indices, valid, keep, kept, logit_scale.detach())


# ----- training -------------------------------------------------------------------------------------------------------


def fold_counters(ctx: RunContext) -> None:
    """Move the on-device step counters into the checkpointed state (one device sync)."""
    unreadable, trained = ctx.counters.tolist()
    ctx.state.unreadable_images += unreadable
    ctx.state.pairs_trained += trained
    ctx.counters.zero_()


def log_step(ctx: RunContext, result: StepResult, progress: tqdm) -> None:
    logs = {
        "loss": result.loss.detach().float().item(),
        "lr": ctx.scheduler.get_last_lr()[0],
        "kept_fraction": float(result.keep.float().mean()),
        "logit_scale": result.logit_scale.exp().item(),
    }
    if ctx.curating_enabled:
        logs["curated_pairs"] = int(ctx.curator.curated_ids().numel())
    ctx.accelerator.log(logs, step=ctx.state.global_step)
    progress.set_postfix(loss=f"{logs['loss']:.3f}", kept=f"{logs['kept_fraction']:.2f}")


def train_one_epoch(ctx: RunContext, epoch: int) -> bool:
    """One pass over the sampler's batches of `epoch` (from where a resumed run stopped); True when `max_steps` ends
    the run."""
    accelerator, state, train_args = ctx.accelerator, ctx.state, ctx.train_args
    ctx.sampler.set_epoch(epoch, state.step_in_epoch if epoch == state.epoch else 0)
    if epoch != state.epoch:
        state.step_in_epoch = 0
    state.epoch = epoch
    curating = ctx.curating_enabled and ctx.sampler.is_curating
    progress = tqdm(
        ctx.loader,
        total=len(ctx.sampler),
        disable=not accelerator.is_local_main_process,
        desc=f"epoch {epoch + 1}/{train_args.num_epochs}" + (" (curating)" if curating else ""),
    )
    step_fn = accumulate_step if ctx.accumulate else superbatch_step
    for batch in progress:
        batch = to_device(batch, accelerator.device)
        for sample_id, reason in batch["skipped"]:
            logger.warning(f"skipped unreadable image {sample_id}: {reason}")
        with accelerator.autocast():
            result = step_fn(ctx, batch, curating)
        accelerator.backward(result.loss)
        if train_args.max_grad_norm is not None:
            accelerator.clip_grad_norm_(ctx.model.parameters(), train_args.max_grad_norm)
        ctx.optimizer.step()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        if curating:
            ctx.curator.update_prototypes(result.kept_features)  # after the step, with pre-step features

        ctx.counters += torch.stack([(~result.valid).sum(), result.keep.sum()])  # synced only when logged or saved
        state.candidates_seen += result.indices.numel()
        state.global_step += 1
        state.step_in_epoch += 1
        if ctx.trace is not None:
            record = {
                "step": state.global_step,
                "epoch": epoch,
                "resumed_from": ctx.resumed_from,
                "indices": result.indices.tolist(),
                "kept": result.indices[result.keep].tolist(),
            }
            ctx.trace.write(json.dumps(record) + "\n")
            ctx.trace.flush()
        if state.global_step % train_args.logging_steps == 0:
            log_step(ctx, result, progress)
        if train_args.eval_steps and ctx.validates and state.global_step % train_args.eval_steps == 0:
            validate(ctx)
        if train_args.save_steps and state.global_step % train_args.save_steps == 0:
            save(ctx)
        if train_args.max_steps and state.global_step >= train_args.max_steps:
            return True
    return False


def end_curation(ctx: RunContext, epoch: int) -> None:
    """After the last curation epoch: train on the subset from now on, with the schedule's real horizon."""
    subset = ctx.curator.curated_ids()
    ctx.sampler.set_curated_ids(subset)
    batch = ctx.sampler.current_batch_size(epoch + 1)
    if batch < ctx.sampler.curated_batch_size:
        ctx.accelerator.print(
            f"warning: the curated subset ({subset.numel()} pairs) is smaller than one curated super-batch of "
            f"{ctx.sampler.curated_batch_size} x {ctx.accelerator.num_processes}; later epochs use batches of "
            f"{batch} per process."
        )
    remaining = sum(
        ctx.sampler.steps_per_epoch(e, pool_size=subset.numel()) for e in range(epoch + 1, ctx.train_args.num_epochs)
    )
    if ctx.train_args.max_steps:
        remaining = min(remaining, ctx.train_args.max_steps - ctx.state.global_step)
    ctx.schedule.finalize(ctx.state.global_step, remaining)
    ctx.accelerator.print(
        f"curation done: kept {subset.numel()} of {len(ctx.pairs)} pairs ({subset.numel() / len(ctx.pairs):.1%}); "
        f"{remaining} steps remain"
    )
    composition = subset_composition(ctx, subset)
    if composition:
        ctx.accelerator.print("  label shares (pool -> curated subset):")
        for label, (pool, kept) in composition.items():
            ctx.accelerator.print(f"    {label:<20} {pool:6.1%} -> {kept:6.1%}")


def subset_composition(ctx: RunContext, subset: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{label: (share in the pool, share in the subset)} for the label columns the training manifest has (of
    `--eval_labels`); empty when it has none."""
    labels, manifest = ctx.data_args.eval_labels or [], ctx.data_args.train_manifest
    if not labels or not isinstance(manifest, str):
        return {}
    frame = read_manifest(manifest)
    present = [label for label in labels if label in frame.columns]
    id_column = ctx.data_args.id_column
    if not present or id_column not in frame.columns:
        return {}
    rows = frame.set_index(frame[id_column].astype(str)).loc[ctx.pairs.ids]  # the pairs trained on, in order
    chosen = rows.iloc[subset.numpy()]
    return {label: (float((rows[label] == 1).mean()), float((chosen[label] == 1).mean())) for label in present}


# ----- evaluation -------------------------------------------------------------------------------------------------------


def build_eval_set(ctx: RunContext, manifest: str) -> ZeroShotEvalSet:
    """Read a labelled manifest (image column + one column per label) into a `ZeroShotEvalSet`."""
    data_args, labels = ctx.data_args, list(ctx.data_args.eval_labels)
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
        ImageReportDataset(pairs, ctx.image_processor),
        batch_size=64,
        collate_fn=ctx.collator,
        num_workers=0,
        generator=torch.Generator(),  # leaves the global RNG (dropout) untouched
    )
    return ZeroShotEvalSet(loader, frame[labels].to_numpy(dtype=float), labels)


@torch.no_grad()
def evaluate(ctx: RunContext, eval_set: ZeroShotEvalSet, prompts: str = "paper") -> dict[str, Any]:
    """Zero-shot macro AUROC on `eval_set` with the model's own `zero_shot_classify`, identical on every process
    (ZeRO-3 gathers parameters in each forward)."""
    model = ctx.accelerator.unwrap_model(ctx.model)
    was_training = model.training
    model.eval()
    scores, rows = [], []
    for batch in eval_set.loader:
        pixel_values = batch["pixel_values"].to(ctx.accelerator.device)
        valid = batch["valid"]
        image_embeds = model.get_image_features(pixel_values)
        probs = model.zero_shot_classify(eval_set.labels, ctx.tokenizer, image_embeds=image_embeds, prompts=prompts)
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


def validate(ctx: RunContext, **where: int) -> None:
    """Zero-shot AUROC on the held-out manifest, logged and kept for summary.json."""
    if ctx.validation_set is None:
        ctx.validation_set = build_eval_set(ctx, ctx.data_args.eval_manifest)
    result = evaluate(ctx, ctx.validation_set, ctx.train_args.eval_prompts)
    ctx.eval_history.append({"step": ctx.state.global_step, **where, **result})
    ctx.accelerator.log({"eval/macro_auroc": result["macro_auroc"]}, step=ctx.state.global_step)
    ctx.accelerator.print(
        f"step {ctx.state.global_step}: validation zero-shot macro AUROC {result['macro_auroc']:.4f} "
        f"({ctx.train_args.eval_prompts} prompts)"
    )


# ----- the run ----------------------------------------------------------------------------------------------------------


def write_arguments(ctx: RunContext) -> None:
    """The run's arguments as JSON beside its outputs (paths as given on the command line)."""
    if not ctx.accelerator.is_main_process:
        return
    groups = zip(("model", "data", "curation", "train"), (ctx.model_args, ctx.data_args, ctx.curation, ctx.train_args))
    (ctx.output_dir / "arguments.json").write_text(json.dumps({name: asdict(a) for name, a in groups}, indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ctx = setup(argv)
    accelerator, state, train_args = ctx.accelerator, ctx.state, ctx.train_args
    write_arguments(ctx)
    tracker_config = {
        "learning_rate": train_args.learning_rate,
        "num_epochs": train_args.num_epochs,
        "per_device_batch_size": train_args.per_device_batch_size,
        "curation": ctx.curating_enabled,
    }
    accelerator.init_trackers("pretrain", config=tracker_config)
    if ctx.curating_enabled and not ctx.curator.is_initialized:
        initialize_prototypes(ctx)
    ctx.loader = make_train_loader(ctx)
    if train_args.trace_samples and accelerator.is_main_process:
        ctx.trace = (ctx.output_dir / "samples.jsonl").open("a")

    start_time = time.time()
    ctx.model.train()
    for epoch in range(state.epoch, train_args.num_epochs):
        curating = ctx.curating_enabled and epoch < ctx.sampler.curation_epochs
        if train_one_epoch(ctx, epoch):
            break
        if curating and epoch + 1 == ctx.sampler.curation_epochs:
            end_curation(ctx, epoch)
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        if ctx.validates and not train_args.eval_steps:
            validate(ctx, epoch=epoch + 1)
        if train_args.save_steps is None and epoch + 1 < train_args.num_epochs:
            save(ctx)
    fold_counters(ctx)
    if ctx.trace is not None:
        ctx.trace.close()
    summary = finish(ctx, time.time() - start_time)
    accelerator.end_training()
    return summary


def finish(ctx: RunContext, seconds: float) -> dict[str, Any]:
    """Export the model with remote code and its processor, the curated subset, and the test-set result."""
    accelerator, state = ctx.accelerator, ctx.state
    final_dir = ctx.output_dir / "final"
    unwrapped = accelerator.unwrap_model(ctx.model)
    if ctx.curating_enabled and ctx.curator.is_initialized:
        prototypes = ctx.curator.prototypes.to(unwrapped.prototypes)
        if prototypes.shape != unwrapped.prototypes.shape:  # a warm start saved with another K
            unwrapped.register_buffer("prototypes", prototypes.clone(), persistent=True)
            unwrapped.config.num_prototypes = prototypes.shape[0]
        with torch.no_grad():
            unwrapped.prototypes.copy_(prototypes)
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {
        "steps": state.global_step,
        "epochs": state.epoch,
        "seconds": round(seconds, 1),
        "candidates_seen": state.candidates_seen,
        "pairs_trained": state.pairs_trained,
        "unreadable_images": state.unreadable_images,
        "skipped_empty_reports": len(ctx.pairs.skipped),
        "validation": ctx.eval_history,
    }
    subset_ids = ctx.curator.curated_ids() if ctx.curating_enabled else ctx.sampler.curated_ids
    state_dict = accelerator.get_state_dict(ctx.model)  # on every process: gathers ZeRO-3 shards
    if accelerator.is_main_process:
        unwrapped.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
        processor = CheXficientProcessor(image_processor=ctx.image_processor, tokenizer=ctx.tokenizer)
        processor.save_pretrained(final_dir)
        ctx.image_processor.save_pretrained(final_dir)
        indices = subset_ids.cpu().tolist()
        subset = curated_subset_record(
            indices, [ctx.pairs.ids[i] for i in indices], len(ctx.pairs), source=ctx.data_args.train_manifest
        )
        write_curated_subset(final_dir, subset)
        summary["curated_pairs"] = subset["num_curated"]
        summary["curated_ratio"] = subset["ratio"]
    if ctx.data_args.test_manifest and ctx.data_args.eval_labels:
        test_set = build_eval_set(ctx, ctx.data_args.test_manifest)
        summary["test"] = {prompts: evaluate(ctx, test_set, prompts) for prompts in ("paper", "report")}
        for prompts, test in summary["test"].items():
            accelerator.print(
                f"test zero-shot macro AUROC ({prompts} prompts): {test['macro_auroc']:.4f} on {test['num_images']} "
                "images"
            )
            for label, auroc in test["auroc"].items():
                accelerator.print(f"  {label:<20} {auroc:.3f}")
        skipped = summary["test"]["paper"]["skipped_classes"]
        if skipped:
            accelerator.print(f"  (no positives or no negatives, skipped: {', '.join(skipped)})")
    if accelerator.is_main_process:
        (ctx.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved the model to {final_dir}")
    return summary


if __name__ == "__main__":
    main()
