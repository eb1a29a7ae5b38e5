"""Command-line arguments of `llava_rad/train.py`, as `HfArgumentParser` dataclasses; YAML presets via `--config`
(a file in llava_rad/configs named without its suffix, or any path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chexficient.runtime import torch_dtype
from chexficient.runtime.presets import parse_with_presets
from llava_rad.model import DEFAULT_LANGUAGE_MODEL


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


@dataclass
class LlavaRadArguments:
    """The parsed command line, one group per dataclass; `asdict` of it is the run's `arguments.json`."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    train: TrainArguments

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def parse_arguments(argv: list[str] | None = None) -> LlavaRadArguments:
    """Parse `argv`; `--config FILE.yaml` (or a preset name from llava_rad/configs) supplies defaults first."""
    return LlavaRadArguments(*parse_with_presets(ARGUMENT_CLASSES, CONFIG_DIR, argv))
