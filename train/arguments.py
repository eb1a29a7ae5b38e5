"""Command-line arguments of `train/pretrain.py`, as `HfArgumentParser` dataclasses; YAML presets via `--config`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser


CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Architecture presets for `--model_config`; a path to a JSON file works too.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": {
        "vision_config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 8,
            "image_size": 64,
        },
        "text_config": {
            "vocab_size": 512,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
        },
        "projection_dim": 64,
        "logit_scale_init_value": 2.6593,  # log(1 / 0.07): CLIP's start for towers trained from scratch
    },
    "chexficient_vitb14_378": {},  # the released architecture (the config defaults)
}


@dataclass
class ModelArguments:
    model_config: str = field(
        default="tiny", metadata={"help": f"architecture preset ({', '.join(MODEL_PRESETS)}) or a config JSON path"}
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
        if self.model_config not in MODEL_PRESETS and not Path(self.model_config).is_file():
            raise ValueError(f"--model_config {self.model_config!r} is neither a preset nor a file.")
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
    phantom_num_train: int = field(default=1200, metadata={"help": "phantom training pairs"})
    phantom_num_eval: int = field(default=200, metadata={"help": "phantom validation images"})
    phantom_num_test: int = field(default=400, metadata={"help": "phantom test images"})
    phantom_image_size: int = field(default=128, metadata={"help": "side of the rendered phantoms"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes for decoding"})
    max_text_length: int = field(default=256, metadata={"help": "longest tokenized report"})


@dataclass
class CurationArguments:
    curation: bool = field(default=True, metadata={"help": "prototype-driven curation (False: plain CLIP)"})
    curation_mode: str = field(
        default="superbatch",
        metadata={
            "help": "superbatch: select within the gathered global batch (the reference); accumulate: "
            "embed a candidate pool without gradients in chunks, then step on the selection only"
        },
    )
    curation_epochs: int = field(
        default=1, metadata={"help": "leading epochs that curate; later ones reuse the subset"}
    )
    num_prototypes: int = field(default=6, metadata={"help": "K, the number of prototypes"})
    outlier_quantile: float = field(
        default=0.95, metadata={"help": "per-cluster distance quantile above which pairs are dropped"}
    )
    support_quantile: float = field(
        default=0.85, metadata={"help": "pairs between this and the outlier quantile are all kept"}
    )
    max_per_cluster: int = field(
        default=10, metadata={"help": "central pairs kept per cluster by farthest point sampling"}
    )
    sinkhorn_epsilon: float = field(default=0.5, metadata={"help": "Sinkhorn-Knopp entropy"})
    sinkhorn_iterations: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations"})
    ema_decay: float = field(default=0.9, metadata={"help": "prototype EMA decay"})
    warmup_samples: int = field(default=800, metadata={"help": "pairs embedded for the k-means initialisation"})
    candidate_pool_size: int = field(default=4096, metadata={"help": "accumulate mode: candidates per selection"})
    embedding_chunk_size: int = field(default=256, metadata={"help": "accumulate mode: no-grad embedding chunk"})
    expected_keep_ratio: float = field(
        default=0.227, metadata={"help": "estimate of the kept share, used for the LR horizon until curation ends"}
    )
    random_subset_ratio: float | None = field(
        default=None, metadata={"help": "baseline: train on a random subset of this share instead of curating"}
    )

    def __post_init__(self):
        if self.curation_mode not in ("superbatch", "accumulate"):
            raise ValueError(f"--curation_mode must be superbatch or accumulate, got {self.curation_mode!r}.")
        if not 0 < self.support_quantile < self.outlier_quantile <= 1:
            raise ValueError("need 0 < support_quantile < outlier_quantile <= 1.")
        if self.random_subset_ratio is not None and not 0 < self.random_subset_ratio <= 1:
            raise ValueError("--random_subset_ratio must lie in (0, 1].")


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
    trace_samples: bool = field(default=False, metadata={"help": "write every step's sample indices to samples.jsonl"})

    def __post_init__(self):
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CurationArguments, TrainArguments)


def parse_with_presets(
    argument_classes: tuple[type, ...], config_dir: str | Path, argv: list[str] | None = None
) -> tuple:
    """Parse `argv` into `argument_classes`; `--config FILE.yaml` (or a preset name in `config_dir`) supplies
    defaults first, which the command line overrides. A setting the file gives satisfies a required argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(argument_classes)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a YAML file or preset name.")
        config_path = Path(argv[position + 1])
        if not config_path.is_file():
            config_path = Path(config_dir) / f"{argv[position + 1].removesuffix('.yaml')}.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"--config {argv[position + 1]}: no such file or preset in {config_dir}.")
        del argv[position : position + 2]
        values = yaml.safe_load(config_path.read_text()) or {}
        known = {f for cls in argument_classes for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown settings {unknown}.")
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, CurationArguments, TrainArguments]:
    """Parse `argv`; `--config preset.yaml` (or a preset name from train/configs) supplies defaults first."""
    return parse_with_presets(ARGUMENT_CLASSES, CONFIG_DIR, argv)
