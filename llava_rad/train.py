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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


if __package__ in (None, ""):  # `accelerate launch llava_rad/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutputWithPooling

from chexficient.checkpoints import checkpoint_record, find_checkpoint, save_checkpoint
from chexficient.presets import parse_with_presets
from chexficient.runtime import make_accelerator, torch_dtype
from llava_rad.data import LlavaRadCollator, LlavaRadDataset, load_examples
from llava_rad.features import FeatureStore, compute_feature_store, merge_feature_index, tower_fingerprint
from llava_rad.model import (
    DEFAULT_LANGUAGE_MODEL,
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
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STAGES = {
    "align": {"lr": 1e-3, "epochs": 1, "template": "plain"},
    "finetune": {"lr": 1e-4, "epochs": 3, "template": "v1"},
}


@dataclass
class ModelArguments:
    chexficient: str = field(metadata={"help": "saved CheXficient folder whose image encoder becomes the tower"})
    language_model: str = field(
        default=DEFAULT_LANGUAGE_MODEL, metadata={"help": "Llama-family causal LM (folder/name)"}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or name (default: the LM's)"})
    image_size: int | None = field(default=None, metadata={"help": "crop size (default: the CheXficient config's)"})
    projector_path: str | None = field(
        default=None, metadata={"help": "stage 2: the stage-1 folder (or its projector.safetensors) to start from"}
    )
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32, bfloat16 or float16"})
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute LM activations in backward"})

    def __post_init__(self):
        torch_dtype(self.dtype, "--dtype")


@dataclass
class DataArguments:
    train_data: str = field(metadata={"help": "LLaVA-Rad conversation .json or (image, findings, indication) .csv"})
    image_root: str | None = field(default=None, metadata={"help": "folder the image paths are relative to"})
    frontal_only: bool = field(default=True, metadata={"help": "JSON: keep AP/PA views only"})
    max_length: int = field(default=2048, metadata={"help": "longest tokenized sequence (image tokens included)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N examples"})
    features_dir: str | None = field(
        default=None, metadata={"help": "train from precomputed tower features stored here (computed if missing)"}
    )
    feature_dtype: str = field(default="bfloat16", metadata={"help": "dtype of stored features"})
    feature_batch_size: int = field(default=32, metadata={"help": "images per batch when computing features"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self):
        torch_dtype(self.feature_dtype, "--feature_dtype")


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (stage 2)"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (stage 2)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (stage 2)"})


@dataclass
class TrainArguments:
    stage: str = field(default="align", metadata={"help": "align (stage 1) or finetune (stage 2)"})
    output_dir: str = field(default="outputs/llava_rad/stage1", metadata={"help": "where the stage's output goes"})
    template: str | None = field(default=None, metadata={"help": "plain or v1 (default: plain for align, v1 else)"})
    num_epochs: int | None = field(default=None, metadata={"help": "default: 1 (align) or 3 (finetune)"})
    learning_rate: float | None = field(default=None, metadata={"help": "default: 1e-3 (align) or 1e-4 (finetune)"})
    per_device_batch_size: int = field(default=16, metadata={"help": "micro-batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warm-up share of the steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (Accelerate)"})
    cpu: bool = field(default=False, metadata={"help": "force the CPU"})
    seed: int = field(default=0, metadata={"help": "data order and initialisation"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N optimizer steps"})
    save_steps: int | None = field(default=None, metadata={"help": "Accelerate checkpoint every N steps"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    report_to: str = field(default="none", metadata={"help": "Accelerate tracker (tensorboard, wandb, none)"})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {list(STAGES)}, got {self.stage!r}.")
        defaults = STAGES[self.stage]
        self.template = self.template or defaults["template"]
        self.num_epochs = self.num_epochs or defaults["epochs"]
        self.learning_rate = self.learning_rate or defaults["lr"]


ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoraArguments, TrainArguments)


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LoraArguments, TrainArguments]:
    """Parse `argv`; `--config FILE.yaml` (or a preset name from llava_rad/configs) supplies defaults first."""
    return parse_with_presets(ARGUMENT_CLASSES, CONFIG_DIR, argv)


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, lora_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    accelerator = make_accelerator(
        cpu=train_args.cpu,
        mixed_precision=train_args.mixed_precision,
        output_dir=output_dir,
        report_to=train_args.report_to,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_args.seed),
    )
    set_seed(train_args.seed)
    output_dir.mkdir(parents=True, exist_ok=True)

    sources = LlavaRadSources(
        chexficient=model_args.chexficient,
        language_model=model_args.language_model,
        tokenizer=model_args.tokenizer,
        image_size=model_args.image_size,
    )
    with whole_model_init(accelerator):
        model, processor = build_llava_rad(
            sources, dtype=torch_dtype(model_args.dtype), attn_implementation=model_args.attn_implementation
        )
    image_seq_length = model.config.image_seq_length
    load_kwargs = {"frontal_only": data_args.frontal_only} if data_args.train_data.endswith(".json") else {}
    examples = load_examples(data_args.train_data, data_args.image_root, **load_kwargs)
    if data_args.max_train_samples:
        examples = examples[: data_args.max_train_samples]
    image_source: dict[str, Any] = {"image_processor": processor.image_processor}
    if data_args.features_dir:
        image_source = {"feature_store": prepare_features(model, examples, processor, data_args, accelerator)}
    dataset = LlavaRadDataset(
        examples,
        processor.tokenizer,
        image_seq_length,
        template=train_args.template,
        max_length=data_args.max_length,
        **image_source,
    )
    with whole_model_init(accelerator):
        model = setup_stage(model, model_args, lora_args, train_args.stage)
    module = LlavaRadForTraining(model)
    trainable = trainable_parameter_names(module)
    num_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    logger.info(f"stage {train_args.stage}: {num_trainable:,} trainable parameters in {len(trainable)} tensors")

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=train_args.per_device_batch_size,
        shuffle=True,
        collate_fn=LlavaRadCollator(processor.tokenizer.pad_token_id),
        num_workers=data_args.num_workers,
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

    global_step, start_epoch, skip_batches = 0, 0, 0
    if train_args.resume_from_checkpoint:
        checkpoint = find_checkpoint(train_args.resume_from_checkpoint, output_dir)
        global_step = int(checkpoint_record(checkpoint)["global_step"])
        accelerator.load_state(str(checkpoint))
        start_epoch, done = divmod(global_step, steps_per_epoch)
        skip_batches = done * train_args.gradient_accumulation_steps
        logger.info(f"resumed from {checkpoint} at step {global_step}")
    if accelerator.is_main_process:
        record = {
            "model": asdict(model_args),
            "data": asdict(data_args),
            "lora": asdict(lora_args),
            "train": asdict(train_args),
        }
        (output_dir / "arguments.json").write_text(json.dumps(record, indent=2))
    if accelerator.log_with:
        accelerator.init_trackers("llava_rad", config={k: v for k, v in asdict(train_args).items() if v is not None})

    module.train()
    accelerator.unwrap_model(module).tower.eval()  # frozen: no dropout / drop-path in the tower
    step_losses: list[torch.Tensor] = []  # this process's mean loss per optimizer step, kept on the device
    running, running_count, started = torch.zeros((), device=accelerator.device), 0, time.time()
    progress = tqdm(
        total=total_steps, initial=global_step, desc=f"{train_args.stage}", disable=not accelerator.is_main_process
    )
    for epoch in range(start_epoch, train_args.num_epochs):
        if global_step >= total_steps:
            break
        loader.set_epoch(epoch)  # the epoch's shuffle depends on (seed, epoch) only, so a resumed run sees it again
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for batch in epoch_loader:
            batch.pop("ids")
            with accelerator.accumulate(module):
                loss = module(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(module.parameters(), train_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running = running + loss.detach().float()  # no host sync per micro-batch
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            step_losses.append(running / running_count)
            running, running_count = torch.zeros_like(running), 0
            if global_step % train_args.logging_steps == 0 or global_step == 1:
                step_loss = float(accelerator.gather(step_losses[-1].reshape(1)).mean())  # mean over processes
                lr = scheduler.get_last_lr()[0]
                logger.info(f"epoch {epoch} step {global_step}/{total_steps} loss {step_loss:.4f} lr {lr:.2e}")
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=global_step)
            if train_args.save_steps and global_step % train_args.save_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, {"global_step": global_step})
            if global_step >= total_steps:
                break
    progress.close()
    # one gather for the whole run: [processes, steps] -> the mean over processes per step
    losses = accelerator.gather(torch.stack(step_losses)[None]).mean(0).tolist() if step_losses else []

    summary = {
        "stage": train_args.stage,
        "steps": global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "trainable_tensors": len(trainable),
        "trainable_parameters": num_trainable,
        "skipped_examples": dict(sorted(dataset.skipped.items())),
        "seconds": round(time.time() - started, 1),
    }
    save_stage_output(accelerator, module, processor, sources, train_args.stage, output_dir, {"summary": summary})
    if accelerator.is_main_process:
        (output_dir / "losses.json").write_text(json.dumps(losses))
        logger.info(f"done: {json.dumps(summary)}")
    accelerator.end_training()
    return {**summary, "losses": losses}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
