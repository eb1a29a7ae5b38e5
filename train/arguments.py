"""Command-line arguments of `train/pretrain.py`, as `HfArgumentParser` dataclasses; YAML presets via `--config`.

The curation settings are the library's `CurationConfig`, the same dataclass the curator reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chexficient.curation import CurationConfig
from chexficient.runtime.presets import parse_with_presets, resolve_preset

from modeling_chexficient import ZERO_SHOT_PROMPTS


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"  # architecture presets for --model_config (JSON)


@dataclass
class ModelArguments:
    model_config: str = field(
        default="tiny",
        metadata={
            "help": "architecture: a preset in train/configs/models (tiny, chexficient_vitb14_378) or a JSON path"
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "start from a saved CheXficient folder instead of a fresh model"}
    )
    init_vision_from: str | None = field(
        default=None, metadata={"help": "DINOv2 weights to start the image tower from (local folder or Hub name)"}
    )
    init_text_from: str | None = field(
        default=None, metadata={"help": "BERT weights to start the text tower from (local folder or Hub name)"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer folder or name; default: init_text_from, else one trained on the reports"},
    )
    tokenizer_vocab_size: int = field(default=512, metadata={"help": "vocabulary of a tokenizer trained here"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})

    def __post_init__(self):
        resolve_preset(self.model_config, MODEL_CONFIG_DIR, ".json", "--model_config")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(f"--attn_implementation {self.attn_implementation!r} is not supported.")


@dataclass
class DataArguments:
    train_manifest: str | None = field(
        default=None, metadata={"help": "CSV/JSONL/parquet of image-report pairs; default: the built-in phantoms"}
    )
    image_root: str | None = field(default=None, metadata={"help": "folder the manifest's image paths start from"})
    image_column: str = field(default="path", metadata={"help": "manifest column holding the image path"})
    id_column: str = field(default="id", metadata={"help": "manifest column holding a stable sample id"})
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "report columns (default: findings + impression, or report, or text)"}
    )
    label_columns: list[str] | None = field(
        default=None, metadata={"help": "label columns to turn into template pseudo-reports (label-only data)"}
    )
    eval_manifest: str | None = field(
        default=None, metadata={"help": "held-out labelled set for periodic zero-shot evaluation (never the test set)"}
    )
    eval_labels: list[str] | None = field(
        default=None, metadata={"help": "label columns scored by periodic zero-shot evaluation"}
    )
    test_manifest: str | None = field(default=None, metadata={"help": "labelled test set scored once at the end"})
    phantom_dir: str | None = field(
        default=None, metadata={"help": "where the phantoms go (default: OUTPUT/phantoms)"}
    )
    phantom_seed: int = field(default=0, metadata={"help": "seed of the phantoms (another seed: other patients)"})
    phantom_num_train: int = field(default=1200, metadata={"help": "phantom training pairs"})
    phantom_num_eval: int = field(default=200, metadata={"help": "phantom validation images"})
    phantom_num_test: int = field(default=400, metadata={"help": "phantom test images"})
    phantom_image_size: int = field(default=128, metadata={"help": "side of the rendered phantoms"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes for decoding"})
    max_text_length: int = field(default=256, metadata={"help": "longest tokenized report"})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/pretrain", metadata={"help": "checkpoints, logs and the final model"})
    num_epochs: int = field(default=4, metadata={"help": "epochs over the data (curation epochs included)"})
    per_device_batch_size: int = field(default=120, metadata={"help": "per-process batch (super-batch = x processes)"})
    curated_batch_size: int | None = field(default=None, metadata={"help": "per-process batch after curation"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak AdamW learning rate"})
    min_learning_rate: float = field(default=5e-6, metadata={"help": "end of the cosine"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay on weight matrices"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "gradient clipping (None: off)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (Accelerate)"})
    cpu: bool = field(default=False, metadata={"help": "force CPU (gloo) even where a GPU exists"})
    seed: int = field(default=0, metadata={"help": "seed of data order, initialisation and curation"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    eval_steps: int | None = field(
        default=None, metadata={"help": "zero-shot evaluation every N steps (and at epoch ends)"}
    )
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps (and at epoch ends)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint folder, or 'latest' for the newest under output_dir"}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker (tensorboard, wandb, none)"})
    eval_prompts: str = field(
        default="paper",
        metadata={
            "help": "zero-shot prompts of periodic validation: paper ('{c}' / 'no {c}') or report (an ensemble)"
        },
    )
    trace_samples: bool = field(
        default=False, metadata={"help": "write every step's sample indices, loss and learning rate to samples.jsonl"}
    )

    def __post_init__(self):
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if self.eval_prompts not in ZERO_SHOT_PROMPTS:
            raise ValueError(f"--eval_prompts must be one of {sorted(ZERO_SHOT_PROMPTS)}, got {self.eval_prompts!r}.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CurationConfig, TrainArguments)


@dataclass
class RunArguments:
    """The parsed command line, one group per dataclass; `asdict` of it is the run's `arguments.json`."""

    model: ModelArguments
    data: DataArguments
    curation: CurationConfig
    train: TrainArguments

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)

    @property
    def curating(self) -> bool:
        """The run curates (curation on, no random-subset baseline)."""
        return self.curation.curating

    @property
    def accumulate(self) -> bool:
        """The run curates in the single-process embedding-accumulation mode."""
        return self.curating and self.curation.curation_mode == "accumulate"

    @property
    def validates(self) -> bool:
        """A held-out labelled manifest is scored during training."""
        return bool(self.data.eval_manifest and self.data.eval_labels)


def parse_arguments(argv: list[str] | None = None) -> RunArguments:
    """Parse `argv`; `--config preset.yaml` (or a preset name from train/configs) supplies defaults first."""
    return RunArguments(*parse_with_presets(ARGUMENT_CLASSES, CONFIG_DIR, argv))
