"""Curated CLIP pretraining of CheXficient with Accelerate (1 CPU, 1 GPU, many GPUs, several nodes, DeepSpeed).

    accelerate launch train/pretrain.py                                  # tiny model on the built-in phantoms
    accelerate launch train/pretrain.py --config chexficient_vitb14_378 --train_manifest pairs.csv ...

Each step embeds a super-batch (the per-process batches of all processes, gathered), lets the prototype curator
keep the informative pairs, and takes a contrastive step on those. After the curation epochs, training continues on
the curated subset only. Checkpoints hold the model, optimizer, schedule, curator and data position, so a killed run
resumes where it stopped without repeating or losing samples.

The shape is open_clip's: this file sets the run up (`setup` builds a `Run` once), runs the epochs (`main`) and
exports the model (`finish`); the steps, `train_one_epoch`, validation and save/resume are in `train/loop.py`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch


if __package__ in (None, ""):  # `accelerate launch train/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from chexficient.curation import CuratingBatchSampler, CurationConfig, PrototypeCurator, gather_no_grad, warmup_indices
from chexficient.data.pairs import ImageReportCollator, ImageReportDataset, PairTable, load_pairs
from chexficient.data.subsets import curated_subset_record, write_curated_subset
from chexficient.runtime import make_accelerator, seed_worker
from chexficient.runtime.checkpoints import find_checkpoint
from chexficient.runtime.presets import load_json_preset
from train.arguments import MODEL_CONFIG_DIR, DataArguments, ModelArguments, RunArguments, parse_arguments
from train.loop import (
    Run,
    RunRecord,
    TrainingData,
    TrainState,
    build_eval_set,
    embed,
    end_curation,
    evaluate,
    fold_counters,
    resume,
    save,
    to_device,
    train_one_epoch,
    validate,
)
from train.optim import build_optimizer_and_schedule

from configuration_chexficient import CheXficientConfig
from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


logger = get_logger(__name__)


# ----- builders -------------------------------------------------------------------------------------------------------


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


def load_tokenizer(
    model_args: ModelArguments, pairs: PairTable, output_dir: Path, accelerator: Accelerator
) -> PreTrainedTokenizerBase:
    """`--tokenizer`, the text tower's or the warm start's; else one trained on the reports (main process first).
    Never asks to trust a folder's code (`load_tokenizer`)."""
    from train.tokenizer import build_report_tokenizer

    from processing_chexficient import load_tokenizer

    source = model_args.tokenizer or model_args.init_text_from or model_args.model_name_or_path
    if source is not None:
        return load_tokenizer(source)
    path = output_dir / "tokenizer"
    if accelerator.is_main_process and not (path / "tokenizer.json").exists():
        build_report_tokenizer(pairs.texts, vocab_size=model_args.tokenizer_vocab_size).save_pretrained(path)
    accelerator.wait_for_everyone()
    return load_tokenizer(path)


def build_model(model_args: ModelArguments, curation: CurationConfig) -> CheXficientModel:
    """A fresh model from the `--model_config` preset, or the warm start `--model_name_or_path`.

    The curation's `num_prototypes` enters the model here and only here: a fresh model is built with it, and a
    curating run from a warm start saved with another K gets an empty buffer of K rows (k-means fills the curator's;
    `finish` copies them in). A warm start that does not curate keeps its own prototypes untouched.
    """
    if model_args.model_name_or_path:
        model = CheXficientModel.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation
        )
        if curation.curating and model.config.num_prototypes != curation.num_prototypes:
            logger.info(
                f"the warm start holds {model.config.num_prototypes} prototypes; this run curates with "
                f"{curation.num_prototypes}"
            )
            model.config.num_prototypes = curation.num_prototypes
            empty = model.prototypes.new_zeros(curation.num_prototypes, model.config.prototype_dim)
            model.register_buffer("prototypes", empty, persistent=True)
    else:
        values = load_json_preset(model_args.model_config, MODEL_CONFIG_DIR)
        config = CheXficientConfig(**{**values, "num_prototypes": curation.num_prototypes})
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


def build_sampler(args: RunArguments, num_pairs: int, accelerator: Accelerator) -> CuratingBatchSampler:
    """The batch sampler: candidate batches while curating, then the curated (or random, or whole) pool."""
    curation, train_args = args.curation, args.train
    if args.accumulate and accelerator.num_processes > 1:
        raise ValueError(
            "--curation_mode accumulate is the single-process mode; use superbatch with several processes."
        )
    sampler = CuratingBatchSampler(
        num_samples=num_pairs,
        batch_size=curation.candidate_pool_size if args.accumulate else train_args.per_device_batch_size,
        curated_batch_size=train_args.curated_batch_size or train_args.per_device_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        curation_epochs=curation.curation_epochs if curation.curating else 0,
        seed=train_args.seed,
    )
    if curation.random_subset:
        sampler.set_curated_ids(random_subset(num_pairs, curation, train_args.seed))
    elif not curation.curating:
        sampler.set_curated_ids(torch.arange(num_pairs))
    if sampler.steps_per_epoch(0) == 0:
        raise ValueError(
            f"{num_pairs} pairs make no full batch of {sampler.current_batch_size(0)} x "
            f"{accelerator.num_processes} processes: lower the batch size."
        )
    return sampler


def random_subset(num_pairs: int, curation: CurationConfig, seed: int) -> torch.Tensor:
    """The random-subset baseline's indices: a share (`random_subset_ratio`) or a count (`random_subset_size`)."""
    generator = torch.Generator().manual_seed(seed + 104729)
    if curation.random_subset_size is not None:
        size = min(curation.random_subset_size, num_pairs)
    else:
        size = max(1, round(curation.random_subset_ratio * num_pairs))
    return torch.randperm(num_pairs, generator=generator)[:size]


def estimated_total_steps(sampler: CuratingBatchSampler, args: RunArguments, num_pairs: int) -> int:
    """Optimizer steps of the run, with the curated subset's size estimated until curation has chosen it."""
    curation, train_args = args.curation, args.train
    curation_steps = sampler.curation_epochs * sampler.steps_per_epoch(0)
    later_pool = round(curation.expected_keep_ratio * num_pairs) if curation.curating else sampler.curated_ids.numel()
    later_steps = sum(
        sampler.steps_per_epoch(e, pool_size=later_pool) for e in range(sampler.curation_epochs, train_args.num_epochs)
    )
    total = curation_steps + later_steps
    return min(total, train_args.max_steps) if train_args.max_steps else total


def make_train_loader(data: TrainingData, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    """One loader for the whole run: the batch sampler is re-read (new epoch, new subset) at every `iter()`.

    Its own generator keeps iterator creation from drawing on the global RNG, so that a resumed run's dropout
    stream is the uninterrupted run's.
    """
    return torch.utils.data.DataLoader(
        data.dataset,
        batch_sampler=data.sampler,
        collate_fn=data.collator,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


# ----- set-up ---------------------------------------------------------------------------------------------------------


def setup(argv: list[str] | None = None) -> Run:
    """Parse the arguments and build everything the run needs; resume from a checkpoint when asked."""
    args = parse_arguments(argv)
    model_args, data_args, curation, train_args = args.model, args.data, args.curation, args.train
    output_dir = args.output_dir
    accelerator = make_accelerator(
        cpu=train_args.cpu,
        mixed_precision=train_args.mixed_precision,
        output_dir=output_dir,
        report_to=train_args.report_to,
        # one scheduler step per optimizer step: Accelerate would otherwise step a prepared scheduler once per
        # process, for loaders it splits across processes; this one is a global super-batch stream, whose steps
        # are the same on any number of processes
        step_scheduler_with_optimizer=False,
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
    tokenizer = load_tokenizer(model_args, pairs, output_dir, accelerator)
    model = build_model(model_args, curation)
    config = model.config
    if config.text_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text tower only {config.text_config.vocab_size}."
        )
    image_size = config.vision_config.image_size
    image_processor = CheXficientImageProcessor(size={"shortest_edge": image_size})
    sampler = build_sampler(args, len(pairs), accelerator)
    curator = PrototypeCurator(curation, num_samples=len(pairs)).to(accelerator.device)

    optimizer, scheduler, schedule = build_optimizer_and_schedule(
        model,
        learning_rate=train_args.learning_rate,
        min_learning_rate=train_args.min_learning_rate,
        weight_decay=train_args.weight_decay,
        estimated_total_steps=estimated_total_steps(sampler, args, len(pairs)),
        warmup_steps=train_args.warmup_steps,
    )
    if accelerator.state.deepspeed_plugin is not None:
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = sampler.batch_size  # the loader is not prepared
        if deepspeed_config.get("gradient_clipping") == "auto":  # Accelerate would fill in 1.0: clip as asked
            deepspeed_config["gradient_clipping"] = train_args.max_grad_norm or 0.0  # 0: off, like DDP's default
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    data = TrainingData(
        pairs=pairs,
        tokenizer=tokenizer,
        image_processor=image_processor,
        dataset=ImageReportDataset(pairs, image_processor),
        collator=ImageReportCollator(tokenizer, (image_size, image_size), data_args.max_text_length),
        sampler=sampler,
    )
    run = Run(
        args=args,
        data=data,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        schedule=schedule,
        curator=curator,
        state=TrainState(),
        record=RunRecord(counters=torch.zeros(2, dtype=torch.long, device=accelerator.device)),
    )
    if train_args.resume_from_checkpoint:
        resume(run, find_checkpoint(train_args.resume_from_checkpoint, output_dir))
    if curation.curating:
        sampler.set_curated_ids(curator.curated_ids())
    return run


def initialize_prototypes(run: Run) -> None:
    """k-means on a shuffled warm-up sample drawn from the whole training set (not one source, as the reference)."""
    accelerator, model, seed = run.accelerator, run.model, run.args.train.seed
    chosen = warmup_indices(len(run.data.pairs), run.args.curation.warmup_samples, seed, accelerator.num_processes)
    shard = chosen[accelerator.process_index :: accelerator.num_processes].tolist()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(run.data.dataset, shard),
        batch_size=max(run.args.train.per_device_batch_size, 1),
        collate_fn=run.data.collator,
        num_workers=0,
        generator=torch.Generator(),
    )
    positions = torch.arange(accelerator.process_index, len(chosen), accelerator.num_processes)  # in `chosen`
    images, texts, valids, gathered_positions = [], [], [], []
    model.eval()
    with torch.no_grad():
        for start, batch in zip(range(0, len(shard), loader.batch_size), loader):
            batch = to_device(batch, accelerator.device)
            image_embeds, text_embeds, _ = embed(model, batch)
            images.append(gather_no_grad(image_embeds.float()))
            texts.append(gather_no_grad(text_embeds.float()))
            valids.append(gather_no_grad(batch["valid"]))
            rows = positions[start : start + len(batch["valid"])].to(accelerator.device)
            gathered_positions.append(gather_no_grad(rows))
    model.train()
    # back into the order of `chosen`, so that k-means sees the same sequence on any number of processes (its
    # seeding picks points by position): the same seed gives the same prototypes, hence the same subset
    order = torch.cat(gathered_positions).argsort()
    valid = torch.cat(valids)[order]
    generator = torch.Generator().manual_seed(seed)
    run.curator.initialize(torch.cat(images)[order][valid], torch.cat(texts)[order][valid], generator=generator)
    logger.info(f"prototypes initialised by k-means on {int(valid.sum())} warm-up pairs")


# ----- the run --------------------------------------------------------------------------------------------------------


def write_arguments(args: RunArguments, accelerator: Accelerator) -> None:
    """The run's arguments as JSON beside its outputs (paths as given on the command line)."""
    if accelerator.is_main_process:
        (args.output_dir / "arguments.json").write_text(json.dumps(asdict(args), indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    run = setup(argv)
    accelerator, state, train_args = run.accelerator, run.state, run.args.train
    write_arguments(run.args, accelerator)
    tracker_config = {
        "learning_rate": train_args.learning_rate,
        "num_epochs": train_args.num_epochs,
        "per_device_batch_size": train_args.per_device_batch_size,
        "curation": run.args.curating,
    }
    accelerator.init_trackers("pretrain", config=tracker_config)
    if run.args.curating and not run.curator.is_initialized:
        initialize_prototypes(run)
    run.data.loader = make_train_loader(run.data, run.args.data.num_workers, train_args.seed)
    if train_args.trace_samples and accelerator.is_main_process:
        run.record.trace = (run.args.output_dir / "samples.jsonl").open("a")

    start_time = time.time()
    run.model.train()
    for epoch in range(state.epoch, train_args.num_epochs):
        curating = run.args.curating and epoch < run.data.sampler.curation_epochs
        if train_one_epoch(run, epoch):
            break
        if curating and epoch + 1 == run.data.sampler.curation_epochs:
            end_curation(run, epoch)
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        if run.args.validates and not train_args.eval_steps:
            validate(run, epoch=epoch + 1)
        if train_args.save_steps is None and epoch + 1 < train_args.num_epochs:
            save(run)
    fold_counters(run)
    if run.record.trace is not None:
        run.record.trace.close()
    summary = finish(run, time.time() - start_time)
    accelerator.end_training()
    return summary


def export_prototypes(run: Run, model: CheXficientModel) -> None:
    """Copy the curator's prototypes into the model, whose buffer `build_model` shaped from the same config."""
    if not (run.args.curating and run.curator.is_initialized):
        return
    prototypes = run.curator.prototypes
    if prototypes.shape != model.prototypes.shape:
        raise RuntimeError(
            f"the curator holds {tuple(prototypes.shape)} prototypes but the model a buffer of "
            f"{tuple(model.prototypes.shape)} (config num_prototypes={model.config.num_prototypes}): a checkpoint "
            "of another --num_prototypes was resumed?"
        )
    with torch.no_grad():
        model.prototypes.copy_(prototypes.to(model.prototypes))


def finish(run: Run, seconds: float) -> dict[str, Any]:
    """Export the model with remote code and its processor, the curated subset, and the test-set result."""
    accelerator, state, data, data_args = run.accelerator, run.state, run.data, run.args.data
    final_dir = run.args.output_dir / "final"
    unwrapped = accelerator.unwrap_model(run.model)
    export_prototypes(run, unwrapped)
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {
        "steps": state.global_step,
        "epochs": state.epoch,
        "seconds": round(seconds, 1),
        "candidates_seen": state.candidates_seen,
        "pairs_trained": state.pairs_trained,
        "unreadable_images": state.unreadable_images,
        "skipped_empty_reports": len(data.pairs.skipped),
        "validation": run.record.eval_history,
    }
    subset_ids = run.curator.curated_ids() if run.args.curating else data.sampler.curated_ids
    state_dict = accelerator.get_state_dict(run.model)  # on every process: gathers ZeRO-3 shards
    if accelerator.is_main_process:
        unwrapped.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
        # a plain tokenizer of the folder truncates where the text tower's positions end
        data.tokenizer.model_max_length = unwrapped.config.text_config.max_position_embeddings
        processor = CheXficientProcessor(image_processor=data.image_processor, tokenizer=data.tokenizer)
        processor.save_pretrained(final_dir)  # preprocessor_config.json too
        indices = subset_ids.cpu().tolist()
        subset = curated_subset_record(
            indices, [data.pairs.ids[i] for i in indices], len(data.pairs), source=data_args.train_manifest
        )
        write_curated_subset(final_dir, subset)
        summary["curated_pairs"] = subset["num_curated"]
        summary["curated_ratio"] = subset["ratio"]
    if data_args.test_manifest and data_args.eval_labels:
        summary["test"] = score_test_set(run, data_args.test_manifest)
    if accelerator.is_main_process:
        (run.args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved the model to {final_dir}")
    return summary


def score_test_set(run: Run, manifest: str) -> dict[str, dict[str, Any]]:
    """Zero-shot AUROC on the test manifest with both prompt sets, printed per label."""
    test_set = build_eval_set(run.args.data, run.data, manifest)
    results = {prompts: evaluate(run, test_set, prompts) for prompts in ("paper", "report")}
    for prompts, result in results.items():
        run.accelerator.print(
            f"test zero-shot macro AUROC ({prompts} prompts): {result['macro_auroc']:.4f} on {result['num_images']} "
            "images"
        )
        for label, auroc in result["auroc"].items():
            run.accelerator.print(f"  {label:<20} {auroc:.3f}")
    skipped = results["paper"]["skipped_classes"]
    if skipped:
        run.accelerator.print(f"  (no positives or no negatives, skipped: {', '.join(skipped)})")
    return results


if __name__ == "__main__":
    main()
