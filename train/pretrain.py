"""Curated CLIP pretraining of CheXficient with Accelerate (1 CPU, 1 GPU, many GPUs, several nodes, DeepSpeed).

    accelerate launch train/pretrain.py                                  # tiny model on the built-in phantoms
    accelerate launch train/pretrain.py --config chexficient_vitb14_378 --train_manifest pairs.csv ...

Each step embeds a super-batch (the per-process batches of all processes, gathered), lets the prototype curator
keep the informative pairs, and takes a contrastive step on those. After the curation epochs, training continues on
the curated subset only. Checkpoints hold the model, optimizer, schedule, curator and data position, so a killed run
resumes where it stopped without repeating or losing samples.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


if __package__ in (None, ""):  # `accelerate launch train/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from eval.metrics import load_metric
from eval.zero_shot import zero_shot_probabilities
from train.arguments import MODEL_PRESETS, parse_arguments
from train.checkpoints import find_checkpoint, save_checkpoint
from train.curation import concat_normalized
from train.curator import CurationConfig, PrototypeCurator
from train.data import ImageReportCollator, ImageReportDataset, PairTable, load_pairs, read_manifest, seed_worker
from train.loss import curated_clip_loss, gather_no_grad, gather_with_grad
from train.optim import build_optimizer_and_schedule
from train.sampler import CuratingBatchSampler
from train.subset import curated_subset_record, write_curated_subset

from configuration_chexficient import CheXficientConfig
from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


logger = get_logger(__name__)


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint with `accelerator.register_for_checkpointing`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    candidates_seen: int = 0
    pairs_trained: int = 0
    unreadable_images: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


# ----- building blocks ----------------------------------------------------------------------------------------------


def build_config(model_args, curation_args) -> CheXficientConfig:
    if model_args.model_config in MODEL_PRESETS:
        values = dict(MODEL_PRESETS[model_args.model_config])
    else:
        values = json.loads(Path(model_args.model_config).read_text())
    values["num_prototypes"] = curation_args.num_prototypes
    return CheXficientConfig(**values)


def prepare_phantoms(data_args, output_dir: Path, accelerator: Accelerator) -> None:
    """Render the built-in phantoms (main process first) and point the data arguments at them."""
    from train.phantoms import write_phantom_dataset

    root = Path(data_args.phantom_dir or output_dir / "phantoms")
    with accelerator.main_process_first():
        written = write_phantom_dataset(
            root,
            num_train=data_args.phantom_num_train + data_args.phantom_num_eval,
            num_test=data_args.phantom_num_test,
            image_size=data_args.phantom_image_size,
        )
        split_validation(Path(written["train"]), data_args.phantom_num_eval)
    data_args.train_manifest = str(root / "train_split.csv")
    data_args.eval_manifest = data_args.eval_manifest or str(root / "val_split.csv")
    data_args.test_manifest = data_args.test_manifest or str(written["test"])
    data_args.image_root = str(root)
    if data_args.eval_labels is None:
        from train.phantoms import PHANTOM_LABELS

        data_args.eval_labels = list(PHANTOM_LABELS)


def split_validation(train_manifest: Path, num_eval: int) -> None:
    """Carve a held-out validation split (clean rows only) off the phantom training manifest."""
    frame = read_manifest(train_manifest)
    clean = frame.index[~frame["id"].isin(_flagged_phantom_ids(train_manifest.parent))]
    eval_rows = clean[-num_eval:]
    frame.loc[eval_rows].to_csv(train_manifest.parent / "val_split.csv", index=False)
    frame.drop(index=eval_rows).to_csv(train_manifest.parent / "train_split.csv", index=False)


def _flagged_phantom_ids(root: Path) -> set[str]:
    meta = json.loads((root / "phantoms.json").read_text()) if (root / "phantoms.json").exists() else {}
    flagged = set()
    for key in ("corrupt_ids", "mismatched_ids", "duplicate_ids"):
        flagged.update(meta.get(key, []))
    return flagged


def load_tokenizer(model_args, pairs: PairTable, output_dir: Path, accelerator: Accelerator):
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


def build_model(model_args, config: CheXficientConfig) -> CheXficientModel:
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
        model.gradient_checkpointing_enable()
    return model


def make_loader(dataset, sampler, collator, num_workers: int, seed: int):
    """One loader for the whole run: the batch sampler is re-read (new epoch, new subset) at every `iter()`.

    Its own generator keeps iterator creation from drawing on the global RNG, so that a resumed run's dropout
    stream is the uninterrupted run's.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values") if k in batch}


def embed(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_embeds, text_embeds, logit_scale) from one forward pass."""
    out = model(**model_inputs(batch))
    return out.image_embeds, out.text_embeds, out.logit_scale


# ----- curation -----------------------------------------------------------------------------------------------------


def initialize_prototypes(model, curator, pairs, dataset, collator, args, accelerator) -> None:
    """k-means on a shuffled warm-up sample drawn from the whole training set (not one source, as the reference)."""
    data_args, curation_args, train_args = args
    count = min(curation_args.warmup_samples, len(pairs))
    count -= count % accelerator.num_processes
    generator = torch.Generator().manual_seed(train_args.seed + 7919)
    chosen = torch.randperm(len(pairs), generator=generator)[:count]
    shard = chosen[accelerator.process_index :: accelerator.num_processes].tolist()
    batch_size = max(train_args.per_device_batch_size, 1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=batch_size,
        collate_fn=collator,
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
    curator.initialize(
        torch.cat(images)[valid], torch.cat(texts)[valid], generator=torch.Generator().manual_seed(train_args.seed)
    )
    logger.info(f"prototypes initialised by k-means on {int(valid.sum())} warm-up pairs")


def curation_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The same random stream on every process for a given step (FPS start points)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + step)
    return generator


def superbatch_step(model, batch, curator, curating: bool, seed: int, step: int, accelerator):
    """Reference mode: forward the whole super-batch with gradients, select on the gathered embeddings."""
    image_embeds, text_embeds, logit_scale = embed(model, batch)
    all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    valid = gather_no_grad(batch["valid"])
    indices = gather_no_grad(batch["sample_index"])
    keep = valid
    if curating:
        with torch.no_grad():
            selection = curator.select(
                all_images.detach().float(),
                all_texts.detach().float(),
                indices,
                valid=valid,
                generator=curation_generator(seed, step, accelerator.device),
            )
        keep = selection.keep & valid
    loss = curated_clip_loss(all_images, all_texts, logit_scale, keep)
    kept_features = concat_normalized(all_images[keep].detach(), all_texts[keep].detach()) if curating else None
    return loss, keep, indices, valid, kept_features, logit_scale.detach()


def accumulate_step(model, batch, curator, curating: bool, seed: int, step: int, chunk_size: int, accelerator):
    """Single-process embedding accumulation: no-grad embeddings of the whole candidate pool in chunks, selection,
    then the gradient step on the selected pairs only (the paper's single-GPU mode)."""
    valid, indices = batch["valid"], batch["sample_index"]
    keep = valid
    if curating:
        images, texts = [], []
        with torch.no_grad():
            for begin in range(0, len(indices), chunk_size):
                chunk = {k: v[begin : begin + chunk_size] for k, v in model_inputs(batch).items()}
                image_embeds, text_embeds, _ = embed(model, chunk)
                images.append(image_embeds.float())
                texts.append(text_embeds.float())
            selection = curator.select(
                torch.cat(images),
                torch.cat(texts),
                indices,
                valid=valid,
                generator=curation_generator(seed, step, accelerator.device),
            )
        keep = selection.keep & valid
    selected = {k: v[keep] for k, v in model_inputs(batch).items()}
    image_embeds, text_embeds, logit_scale = embed(model, selected)
    loss = curated_clip_loss(image_embeds, text_embeds, logit_scale)
    kept_features = concat_normalized(image_embeds.detach(), text_embeds.detach()) if curating else None
    return loss, keep, indices, valid, kept_features, logit_scale.detach()


# ----- evaluation and export ----------------------------------------------------------------------------------------


@dataclass
class ZeroShotEvalSet:
    """A labelled manifest read once: a loader over its images and its label matrix [N, C]."""

    loader: torch.utils.data.DataLoader
    targets: np.ndarray
    labels: list[str]


def build_eval_set(manifest: str, labels, tokenizer, image_processor, data_args) -> ZeroShotEvalSet:
    """Read a labelled manifest (image column + one column per label) into a `ZeroShotEvalSet`."""
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
    collator = ImageReportCollator(tokenizer, _crop_size(image_processor), data_args.max_text_length)
    loader = torch.utils.data.DataLoader(
        ImageReportDataset(pairs, image_processor),
        batch_size=64,
        collate_fn=collator,
        num_workers=0,
        generator=torch.Generator(),  # leaves the global RNG (dropout) untouched
    )
    return ZeroShotEvalSet(loader, frame[list(labels)].to_numpy(dtype=float), list(labels))


def evaluate_zero_shot(model, tokenizer, eval_set: ZeroShotEvalSet, accelerator) -> dict:
    """Zero-shot macro AUROC on `eval_set`, computed identically on every process."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    scores, rows = zero_shot_probabilities(unwrapped, tokenizer, eval_set.loader, eval_set.labels, accelerator.device)
    unwrapped.train(was_training)
    result = load_metric("multilabel_auc").compute(
        predictions=scores, references=eval_set.targets[rows], labels=eval_set.labels
    )
    result["num_images"] = int(len(rows))
    return result


def _crop_size(image_processor: CheXficientImageProcessor) -> tuple[int, int]:
    return image_processor.crop_size["height"], image_processor.crop_size["width"]


def fold_counters(state: TrainState, counters: torch.Tensor) -> None:
    """Move the on-device step counters into the checkpointed state (one device sync)."""
    unreadable, trained = counters.tolist()
    state.unreadable_images += unreadable
    state.pairs_trained += trained
    counters.zero_()


# ----- the run ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, curation_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and (train_args.cpu or not torch.cuda.is_available())
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []  # DeepSpeed defaults to NCCL
    accelerator = Accelerator(
        cpu=train_args.cpu,
        mixed_precision=train_args.mixed_precision,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=str(output_dir),
        kwargs_handlers=handlers,
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
    config = build_config(model_args, curation_args)
    tokenizer = load_tokenizer(model_args, pairs, output_dir, accelerator)
    model = build_model(model_args, config)
    config = model.config
    if config.text_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text tower only {config.text_config.vocab_size}."
        )
    image_size = config.vision_config.image_size
    image_processor = CheXficientImageProcessor(size={"shortest_edge": image_size})
    dataset = ImageReportDataset(pairs, image_processor)
    collator = ImageReportCollator(tokenizer, (image_size, image_size), data_args.max_text_length)

    curating_enabled = curation_args.curation and curation_args.random_subset_ratio is None
    accumulate = curating_enabled and curation_args.curation_mode == "accumulate"
    if accumulate and accelerator.num_processes > 1:
        raise ValueError(
            "--curation_mode accumulate is the single-process mode; use superbatch with several processes."
        )
    batch_size = curation_args.candidate_pool_size if accumulate else train_args.per_device_batch_size
    sampler = CuratingBatchSampler(
        num_samples=len(pairs),
        batch_size=batch_size,
        curated_batch_size=train_args.curated_batch_size or train_args.per_device_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        curation_epochs=curation_args.curation_epochs if curating_enabled else 0,
        seed=train_args.seed,
    )
    if curation_args.random_subset_ratio is not None:
        generator = torch.Generator().manual_seed(train_args.seed + 104729)
        size = max(1, round(curation_args.random_subset_ratio * len(pairs)))
        sampler.set_curated_ids(torch.randperm(len(pairs), generator=generator)[:size])
    elif not curating_enabled:
        sampler.set_curated_ids(torch.arange(len(pairs)))
    if sampler.steps_per_epoch(0) == 0:
        raise ValueError(
            f"{len(pairs)} pairs make no full super-batch of {batch_size} x {accelerator.num_processes}: lower the batch size."
        )

    curator = PrototypeCurator(
        CurationConfig(
            num_prototypes=curation_args.num_prototypes,
            outlier_quantile=curation_args.outlier_quantile,
            support_quantile=curation_args.support_quantile,
            max_per_cluster=curation_args.max_per_cluster,
            sinkhorn_epsilon=curation_args.sinkhorn_epsilon,
            sinkhorn_iterations=curation_args.sinkhorn_iterations,
            ema_decay=curation_args.ema_decay,
            warmup_samples=curation_args.warmup_samples,
        ),
        num_samples=len(pairs),
    ).to(accelerator.device)

    curation_steps = sampler.curation_epochs * sampler.steps_per_epoch(0)
    later_pool = (
        round(curation_args.expected_keep_ratio * len(pairs)) if curating_enabled else sampler.curated_ids.numel()
    )
    later_steps = sum(
        sampler.steps_per_epoch(e, pool_size=later_pool) for e in range(sampler.curation_epochs, train_args.num_epochs)
    )
    estimated_total = curation_steps + later_steps
    if train_args.max_steps:
        estimated_total = min(estimated_total, train_args.max_steps)
    optimizer, scheduler, schedule = build_optimizer_and_schedule(
        model,
        learning_rate=train_args.learning_rate,
        min_learning_rate=train_args.min_learning_rate,
        weight_decay=train_args.weight_decay,
        estimated_total_steps=estimated_total,
        warmup_steps=train_args.warmup_steps,
    )
    if accelerator.state.deepspeed_plugin is not None:  # the loader is not prepared, so DeepSpeed cannot infer it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(curator, state)

    if train_args.resume_from_checkpoint:
        checkpoint = find_checkpoint(train_args.resume_from_checkpoint, output_dir)
        accelerator.load_state(str(checkpoint))
        logger.info(
            f"resumed from {checkpoint} at epoch {state.epoch}, step {state.global_step}", main_process_only=True
        )
    if curation_args.random_subset_ratio is None and curating_enabled:
        sampler.set_curated_ids(curator.curated_ids())

    if accelerator.is_main_process:
        (output_dir / "arguments.json").write_text(
            json.dumps(
                {
                    cls: asdict(a)
                    for cls, a in zip(
                        ("model", "data", "curation", "train"), (model_args, data_args, curation_args, train_args)
                    )
                },
                indent=2,
            )
        )
    tracker_config = {
        "learning_rate": train_args.learning_rate,
        "num_epochs": train_args.num_epochs,
        "per_device_batch_size": train_args.per_device_batch_size,
        "curation": curating_enabled,
    }
    accelerator.init_trackers("pretrain", config=tracker_config)

    if curating_enabled and not curator.is_initialized:
        initialize_prototypes(
            model, curator, pairs, dataset, collator, (data_args, curation_args, train_args), accelerator
        )

    loader = make_loader(dataset, sampler, collator, data_args.num_workers, train_args.seed)
    trace = (
        (output_dir / "samples.jsonl").open("a") if train_args.trace_samples and accelerator.is_main_process else None
    )
    eval_history: list[dict[str, Any]] = []
    validation_sets: list[ZeroShotEvalSet] = []  # built at the first evaluation, reused after

    def validate(**where: int) -> None:
        """Zero-shot AUROC on the held-out manifest, logged and kept for summary.json."""
        if not validation_sets:
            validation_sets.append(
                build_eval_set(data_args.eval_manifest, data_args.eval_labels, tokenizer, image_processor, data_args)
            )
        result = evaluate_zero_shot(model, tokenizer, validation_sets[0], accelerator)
        eval_history.append({"step": state.global_step, **where, **result})
        accelerator.log({"eval/macro_auroc": result["macro_auroc"]}, step=state.global_step)
        accelerator.print(f"step {state.global_step}: validation zero-shot macro AUROC {result['macro_auroc']:.4f}")

    start_time = time.time()
    done = False
    counters = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # unreadable images, pairs trained
    model.train()
    for epoch in range(state.epoch, train_args.num_epochs):
        sampler.set_epoch(epoch, state.step_in_epoch if epoch == state.epoch else 0)
        if epoch != state.epoch:
            state.step_in_epoch = 0
        state.epoch = epoch
        curating = curating_enabled and sampler.is_curating
        progress = tqdm(
            loader,
            total=len(sampler),
            disable=not accelerator.is_local_main_process,
            desc=f"epoch {epoch + 1}/{train_args.num_epochs}" + (" (curating)" if curating else ""),
        )
        for batch in progress:
            batch = to_device(batch, accelerator.device)
            if batch["skipped"]:
                for sample_id, reason in batch["skipped"]:
                    logger.warning(f"skipped unreadable image {sample_id}: {reason}")
            with accelerator.autocast():
                if accumulate:
                    loss, keep, indices, valid, kept, out_scale = accumulate_step(
                        model,
                        batch,
                        curator,
                        curating,
                        train_args.seed,
                        state.global_step,
                        curation_args.embedding_chunk_size,
                        accelerator,
                    )
                else:
                    loss, keep, indices, valid, kept, out_scale = superbatch_step(
                        model, batch, curator, curating, train_args.seed, state.global_step, accelerator
                    )
            accelerator.backward(loss)
            if train_args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if curating:
                curator.update_prototypes(kept)  # after the step, with pre-step features, as the reference

            counters += torch.stack([(~valid).sum(), keep.sum()])  # synced only when logged or saved
            state.candidates_seen += indices.numel()
            state.global_step += 1
            state.step_in_epoch += 1
            if trace is not None:
                trace.write(
                    json.dumps(
                        {
                            "step": state.global_step,
                            "epoch": epoch,
                            "indices": indices.tolist(),
                            "kept": indices[keep].tolist(),
                        }
                    )
                    + "\n"
                )
                trace.flush()
            if state.global_step % train_args.logging_steps == 0:
                logs = {
                    "loss": loss.detach().float().item(),
                    "lr": scheduler.get_last_lr()[0],
                    "kept_fraction": float(keep.float().mean()),
                    "logit_scale": out_scale.exp().item(),
                }
                if curating_enabled:
                    logs["curated_pairs"] = int(curator.curated_ids().numel())
                accelerator.log(logs, step=state.global_step)
                progress.set_postfix(loss=f"{logs['loss']:.3f}", kept=f"{logs['kept_fraction']:.2f}")
            if (
                train_args.eval_steps
                and data_args.eval_manifest
                and data_args.eval_labels
                and state.global_step % train_args.eval_steps == 0
            ):
                validate()
            if train_args.save_steps and state.global_step % train_args.save_steps == 0:
                fold_counters(state, counters)
                save_checkpoint(
                    accelerator, output_dir, state.global_step, state.state_dict(), train_args.save_total_limit
                )
            if train_args.max_steps and state.global_step >= train_args.max_steps:
                done = True
                break
        if done:
            break
        # the epoch is over
        if curating and not (curating_enabled and epoch + 1 < sampler.curation_epochs):
            subset = curator.curated_ids()
            sampler.set_curated_ids(subset)
            remaining = sum(
                sampler.steps_per_epoch(e, pool_size=subset.numel()) for e in range(epoch + 1, train_args.num_epochs)
            )
            if train_args.max_steps:
                remaining = min(remaining, train_args.max_steps - state.global_step)
            schedule.finalize(state.global_step, remaining)
            accelerator.print(
                f"curation done: kept {subset.numel()} of {len(pairs)} pairs ({subset.numel() / len(pairs):.1%}); "
                f"{remaining} steps remain"
            )
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        if data_args.eval_manifest and data_args.eval_labels and not train_args.eval_steps:
            validate(epoch=epoch + 1)
        fold_counters(state, counters)
        if train_args.save_steps is None and epoch + 1 < train_args.num_epochs:
            save_checkpoint(
                accelerator, output_dir, state.global_step, state.state_dict(), train_args.save_total_limit
            )
    fold_counters(state, counters)
    if trace is not None:
        trace.close()

    summary = finish(
        model,
        tokenizer,
        image_processor,
        curator,
        pairs,
        state,
        eval_history,
        data_args,
        curating_enabled,
        sampler,
        accelerator,
        output_dir,
        time.time() - start_time,
    )
    accelerator.end_training()
    return summary


def finish(
    model,
    tokenizer,
    image_processor,
    curator,
    pairs,
    state,
    eval_history,
    data_args,
    curating_enabled,
    sampler,
    accelerator,
    output_dir: Path,
    seconds: float,
) -> dict[str, Any]:
    """Export the model with remote code and its processor, the curated subset, and the test-set result."""
    final_dir = output_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    if curating_enabled and curator.is_initialized:
        with torch.no_grad():
            unwrapped.prototypes.copy_(curator.prototypes.to(unwrapped.prototypes))
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {
        "steps": state.global_step,
        "epochs": state.epoch,
        "seconds": round(seconds, 1),
        "candidates_seen": state.candidates_seen,
        "pairs_trained": state.pairs_trained,
        "unreadable_images": state.unreadable_images,
        "skipped_empty_reports": len(pairs.skipped),
        "validation": eval_history,
    }
    subset_ids = curator.curated_ids() if curating_enabled else sampler.curated_ids
    state_dict = accelerator.get_state_dict(model)  # on every process: gathers ZeRO-3 shards
    if accelerator.is_main_process:
        unwrapped.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
        CheXficientProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(final_dir)
        image_processor.save_pretrained(final_dir)
        indices = subset_ids.cpu().tolist()
        subset = curated_subset_record(
            indices, [pairs.ids[i] for i in indices], len(pairs), source=data_args.train_manifest
        )
        write_curated_subset(final_dir, subset)
        summary["curated_pairs"] = subset["num_curated"]
        summary["curated_ratio"] = subset["ratio"]
    if data_args.test_manifest and data_args.eval_labels:
        test_set = build_eval_set(
            data_args.test_manifest, data_args.eval_labels, tokenizer, image_processor, data_args
        )
        test = evaluate_zero_shot(model, tokenizer, test_set, accelerator)
        summary["test"] = test
        accelerator.print(f"test zero-shot macro AUROC: {test['macro_auroc']:.4f} on {test['num_images']} images")
        for label, auroc in test["auroc"].items():
            accelerator.print(f"  {label:<20} {auroc:.3f}")
        if test["skipped_classes"]:
            accelerator.print(f"  (no positives or no negatives, skipped: {', '.join(test['skipped_classes'])})")
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved the model to {final_dir}")
    return summary


if __name__ == "__main__":
    main()
