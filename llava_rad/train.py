"""LLaVA-Rad's two training stages on the frozen CheXficient encoder, with Accelerate (DeepSpeed ZeRO-2/3) and PEFT.

    # stage 1, alignment: the projector only, plain template, lr 1e-3, 1 epoch
    accelerate launch --config_file llava_rad/configs/accelerate_zero2.yaml llava_rad/train.py \
        --config stage1_align_7b --chexficient CHEXFICIENT_DIR --train_data train.csv --image_root MIMIC_JPG_DIR
    # stage 2, fine-tuning: LoRA r 64 / alpha 128 on the LM + the full projector, Vicuna v1 template, lr 1e-4, 3 epochs
    accelerate launch --config_file llava_rad/configs/accelerate_zero2.yaml llava_rad/train.py \
        --config stage2_finetune_7b --chexficient CHEXFICIENT_DIR --projector_path outputs/llava_rad/stage1 ...

Stage 1 writes `projector.safetensors`; stage 2 writes the PEFT adapter (LoRA + the projector as a module to save)
under `adapter/`. Both write `llava_rad.json` (where the tower and LM came from) and the processor; export with
`python -m llava_rad.export`. Under DeepSpeed ZeRO-3 (`--config_file llava_rad/configs/accelerate_zero3.yaml`) the
trained tensors are gathered from their partitions before saving, so the outputs are the same full tensors.
`--features_dir` encodes the images once with the frozen tower and trains from the stored features.
The arguments are the dataclasses of llava_rad/arguments.py; `--config NAME` reads a preset of llava_rad/configs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


if __package__ in (None, ""):  # `accelerate launch llava_rad/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutputWithPooling

from chexficient.runtime import make_accelerator, torch_dtype
from chexficient.runtime.checkpoints import checkpoint_record, find_checkpoint, save_checkpoint
from llava_rad.arguments import LlavaRadArguments, LoraArguments, ModelArguments, parse_arguments
from llava_rad.data import LlavaRadCollator, LlavaRadDataset, load_examples
from llava_rad.features import FeatureStore, compute_feature_store, merge_feature_index, tower_fingerprint
from llava_rad.model import (
    PROJECTOR_FILENAME,
    LlavaRadSources,
    apply_lora,
    build_llava_rad,
    freeze_for_alignment,
    gather_trainable_state,
    is_partitioned,
    load_projector,
    projector,
    save_projector,
)


logger = get_logger(__name__)  # inside main(), where Accelerate is initialised
library_logger = logging.getLogger(__name__)


class LlavaRadForTraining(nn.Module):
    """One forward for both image sources: `pixel_values` through the live tower, or stored `image_features`
    through the projector only (handed to Llava as precomputed encoder outputs). Returns the LM loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def tower(self) -> nn.Module:
        return next(m for n, m in self.model.named_modules() if n.endswith("vision_tower"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> Any:
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of `pixel_values` or `image_features`.")
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if pixel_values is not None:
            return self.model(**inputs, pixel_values=pixel_values.to(next(self.tower.parameters()).dtype))
        mlp = projector(self.model)
        projected = mlp(image_features.to(next(mlp.parameters()).dtype))  # [B, N, hidden]
        encoded = BaseModelOutputWithPooling(pooler_output=list(projected))
        return self.model(**inputs, mm_encoder_outputs={"image": encoded})


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def setup_stage(model: nn.Module, model_args: ModelArguments, lora_args: LoraArguments, stage: str) -> nn.Module:
    """Freeze for stage 1, or load the stage-1 projector and add LoRA for stage 2; gradient checkpointing."""
    if model_args.gradient_checkpointing:  # non-reentrant: no input-grad hook needed with frozen embeddings
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if stage == "align":
        freeze_for_alignment(model)
        return model
    if model_args.projector_path:
        load_projector(model, model_args.projector_path)
    else:
        library_logger.warning("stage 2 without --projector_path: the projector starts untrained")
    return apply_lora(model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout)


@contextlib.contextmanager
def whole_model_init(accelerator):
    """Build the model whole on every process, also under ZeRO-3, where Accelerate registers its DeepSpeed config with
    transformers and `from_pretrained` would create the model already partitioned (`zero.Init`), which the
    meta-device assembly of `assemble_llava` cannot take. DeepSpeed partitions the model when it is prepared.

    (Accelerate's `zero3_init_context_manager(enable=False)` re-registers the config, so it is switched off here
    directly and registered again afterwards.)"""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # transformers sees the ZeRO-3 config again


def prepare_features(model, examples, processor, data_args, accelerator) -> FeatureStore:
    """Open the feature store, computing it first (each process its slice) when it has no index yet."""
    folder = Path(data_args.features_dir)
    fingerprint = tower_fingerprint(model)  # hashes every tower weight: once per run
    if not (folder / "index.json").is_file():
        model.to(accelerator.device)
        compute_feature_store(
            model,
            examples,
            processor.image_processor,
            folder,
            batch_size=data_args.feature_batch_size,
            dtype=torch_dtype(data_args.feature_dtype),
            num_workers=data_args.num_workers,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            device=accelerator.device,
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            merge_feature_index(folder, accelerator.num_processes, fingerprint)
        accelerator.wait_for_everyone()
    store = FeatureStore(folder)
    store.check(fingerprint)
    return store


def save_stage_output(accelerator, module, processor, sources, stage, output_dir: Path, record: dict) -> None:
    """Stage 1: projector.safetensors. Stage 2: the PEFT adapter (LoRA + projector) in adapter/, and the projector.

    Every process gathers the trained tensors first (a collective under DeepSpeed ZeRO-3, where each process holds
    only a shard of each; a plain copy otherwise), so the files always hold the full tensors; the main process
    writes them.
    """
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(module).model
    partitioned = sum(is_partitioned(p) for p in model.parameters() if p.requires_grad)
    trained = gather_trainable_state(model)  # on every process: ZeRO-3 all-gathers the partitions
    if not accelerator.is_main_process:
        return
    if partitioned:
        library_logger.info(f"gathered {partitioned} trained tensors from their ZeRO-3 partitions before saving")
    save_projector(model, output_dir / PROJECTOR_FILENAME, state_dict=trained)
    if stage == "finetune":
        model.save_pretrained(output_dir / "adapter", state_dict=trained)
    processor.save_pretrained(output_dir / "processor")
    sources.save(output_dir, stage=stage, **record)


# ----- the steps of main() ------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """The training loop's objects, prepared by Accelerate, and where the run stands (in optimizer steps)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total_steps: int
    global_step: int = 0
    start_epoch: int = 0
    skip_batches: int = 0  # micro-batches of `start_epoch` already trained on (a resumed run)


def set_up(args: LlavaRadArguments) -> Accelerator:
    """The Accelerator (mixed precision, accumulation, a seeded sampler), the global seed and the output folder."""
    accelerator = make_accelerator(
        cpu=args.train.cpu,
        mixed_precision=args.train.mixed_precision,
        output_dir=args.output_dir,
        report_to=args.train.report_to,
        gradient_accumulation_steps=args.train.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.train.seed),
    )
    set_seed(args.train.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def build_model(args: LlavaRadArguments, accelerator: Accelerator) -> tuple[nn.Module, Any, LlavaRadSources]:
    """The Llava model (CheXficient tower + projector + LM), its processor, and where its parts came from."""
    sources = LlavaRadSources(
        chexficient=args.model.chexficient,
        language_model=args.model.language_model,
        tokenizer=args.model.tokenizer,
        image_size=args.model.image_size,
    )
    with whole_model_init(accelerator):
        model, processor = build_llava_rad(
            sources, dtype=torch_dtype(args.model.dtype), attn_implementation=args.model.attn_implementation
        )
    return model, processor, sources


def build_dataset(
    args: LlavaRadArguments, model: nn.Module, processor: Any, accelerator: Accelerator
) -> LlavaRadDataset:
    """The tokenized training examples; images go through the image processor, or come from the feature store."""
    data_args = args.data
    load_kwargs = {"frontal_only": data_args.frontal_only} if data_args.train_data.endswith(".json") else {}
    examples = load_examples(data_args.train_data, data_args.image_root, **load_kwargs)
    if data_args.max_train_samples:
        examples = examples[: data_args.max_train_samples]
    image_source: dict[str, Any] = {"image_processor": processor.image_processor}
    if data_args.features_dir:
        image_source = {"feature_store": prepare_features(model, examples, processor, data_args, accelerator)}
    return LlavaRadDataset(
        examples,
        processor.tokenizer,
        model.config.image_seq_length,
        template=args.train.template,
        max_length=data_args.max_length,
        **image_source,
    )


def prepare_stage_model(
    args: LlavaRadArguments, model: nn.Module, accelerator: Accelerator
) -> tuple[LlavaRadForTraining, dict[str, int]]:
    """The stage's trainable model (`setup_stage`) in the training wrapper, and how much of it trains (counted
    before ZeRO-3 partitions it)."""
    with whole_model_init(accelerator):
        model = setup_stage(model, args.model, args.lora, args.train.stage)
    module = LlavaRadForTraining(model)
    trainable = {
        "trainable_tensors": len(trainable_parameter_names(module)),
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }
    logger.info(
        f"stage {args.train.stage}: {trainable['trainable_parameters']:,} trainable parameters"
        f" in {trainable['trainable_tensors']} tensors"
    )
    return module, trainable


def prepare_training(
    args: LlavaRadArguments, module: nn.Module, dataset: LlavaRadDataset, pad_token_id: int, accelerator: Accelerator
) -> TrainingRun:
    """Loader, AdamW on the trainable parameters and the cosine schedule, prepared by Accelerate."""
    train_args = args.train
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=train_args.per_device_batch_size,
        shuffle=True,
        collate_fn=LlavaRadCollator(pad_token_id),
        num_workers=args.data.num_workers,
        generator=torch.Generator().manual_seed(train_args.seed),
        drop_last=False,
    )
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=train_args.learning_rate,
        weight_decay=train_args.weight_decay,
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(loader) / accelerator.num_processes) / train_args.gradient_accumulation_steps
    )
    total_steps = steps_per_epoch * train_args.num_epochs
    if train_args.max_steps:
        total_steps = min(total_steps, train_args.max_steps)
    warmup_steps = math.ceil(train_args.warmup_ratio * total_steps)
    # Accelerate steps a prepared scheduler once per process per optimizer step, so its horizon is in those units.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, warmup_steps * accelerator.num_processes, total_steps * accelerator.num_processes
    )
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    return TrainingRun(module, optimizer, loader, scheduler, steps_per_epoch, total_steps)


def resume(run: TrainingRun, args: LlavaRadArguments, accelerator: Accelerator) -> None:
    """With --resume_from_checkpoint: load the Accelerate state and move `run` to the checkpoint's step."""
    if not args.train.resume_from_checkpoint:
        return
    checkpoint = find_checkpoint(args.train.resume_from_checkpoint, args.output_dir)
    run.global_step = int(checkpoint_record(checkpoint)["global_step"])
    accelerator.load_state(str(checkpoint))
    run.start_epoch, done = divmod(run.global_step, run.steps_per_epoch)
    run.skip_batches = done * args.train.gradient_accumulation_steps
    logger.info(f"resumed from {checkpoint} at step {run.global_step}")


def record_arguments(args: LlavaRadArguments, accelerator: Accelerator) -> None:
    """`arguments.json` in the output folder, and the tracker's run config."""
    if accelerator.is_main_process:
        (args.output_dir / "arguments.json").write_text(json.dumps(asdict(args), indent=2))
    if accelerator.log_with:
        accelerator.init_trackers("llava_rad", config={k: v for k, v in asdict(args.train).items() if v is not None})


def train_loop(run: TrainingRun, args: LlavaRadArguments, accelerator: Accelerator) -> list[float]:
    """Train until `run.total_steps` optimizer steps; returns the loss of every step (mean over processes)."""
    train_args, module = args.train, run.module
    module.train()
    accelerator.unwrap_model(module).tower.eval()  # frozen: no dropout / drop-path in the tower
    step_losses: list[torch.Tensor] = []  # this process's mean loss per optimizer step, kept on the device
    running, running_count = torch.zeros((), device=accelerator.device), 0
    progress = tqdm(
        total=run.total_steps, initial=run.global_step, desc=train_args.stage, disable=not accelerator.is_main_process
    )
    for epoch in range(run.start_epoch, train_args.num_epochs):
        if run.global_step >= run.total_steps:
            break
        run.loader.set_epoch(epoch)  # the epoch's shuffle depends on (seed, epoch) only: a resumed run sees it again
        epoch_loader = accelerator.skip_first_batches(run.loader, run.skip_batches) if run.skip_batches else run.loader
        run.skip_batches = 0
        for batch in epoch_loader:
            batch.pop("ids")
            with accelerator.accumulate(module):
                loss = module(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(module.parameters(), train_args.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            running = running + loss.detach().float()  # no host sync per micro-batch
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            run.global_step += 1
            progress.update(1)
            step_losses.append(running / running_count)
            running, running_count = torch.zeros_like(running), 0
            if run.global_step % train_args.logging_steps == 0 or run.global_step == 1:
                step_loss = float(accelerator.gather(step_losses[-1].reshape(1)).mean())  # mean over processes
                lr = run.scheduler.get_last_lr()[0]
                logger.info(f"epoch {epoch} step {run.global_step}/{run.total_steps} loss {step_loss:.4f} lr {lr:.2e}")
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=run.global_step)
            if train_args.save_steps and run.global_step % train_args.save_steps == 0:
                save_checkpoint(accelerator, args.output_dir, run.global_step, {"global_step": run.global_step})
            if run.global_step >= run.total_steps:
                break
    progress.close()
    # one gather for the whole run: [processes, steps] -> the mean over processes per step
    return accelerator.gather(torch.stack(step_losses)[None]).mean(0).tolist() if step_losses else []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """One stage: set-up, the model and the data, the stage's trainable part, the training loop, the outputs."""
    args = parse_arguments(argv)
    accelerator = set_up(args)
    model, processor, sources = build_model(args, accelerator)
    dataset = build_dataset(args, model, processor, accelerator)
    module, trainable = prepare_stage_model(args, model, accelerator)
    run = prepare_training(args, module, dataset, processor.tokenizer.pad_token_id, accelerator)
    resume(run, args, accelerator)
    record_arguments(args, accelerator)

    started = time.time()
    losses = train_loop(run, args, accelerator)
    summary = {
        "stage": args.train.stage,
        "steps": run.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        **trainable,
        "skipped_examples": dict(sorted(dataset.skipped.items())),
        "seconds": round(time.time() - started, 1),
    }
    save_stage_output(
        accelerator, run.module, processor, sources, args.train.stage, args.output_dir, {"summary": summary}
    )
    if accelerator.is_main_process:
        (args.output_dir / "losses.json").write_text(json.dumps(losses))
        logger.info(f"done: {json.dumps(summary)}")
    accelerator.end_training()
    return {**summary, "losses": losses}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
