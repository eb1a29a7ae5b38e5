"""Model cards for the Hub: CheXficient (CLIP) and LLaVA-Rad (report generation) folders, rendered with
huggingface_hub's `ModelCard.from_template` from the Jinja templates in `templates/`.

Python computes the values (counts, tables, booleans) from the folder being published and the files beside it:
`config.json` (architecture), the safetensors headers (parameter count), `curated_subset.json` (curation statistics),
the training run's `arguments.json` and `summary.json` (one folder up, as train/pretrain.py writes them) and the
evaluation JSON of `eval/` (tables and model-index metadata) or of llava_rad/metrics.py. The prose, headings and
conditional sections live in the templates. `chexficient.hub.publish` calls these functions.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from configuration_chexficient import RELEASED_VISION_CONFIG


TEMPLATES = Path(__file__).resolve().parent / "templates"
CHEXFICIENT_TEMPLATE = TEMPLATES / "chexficient_card.md"
LLAVA_RAD_TEMPLATE = TEMPLATES / "llava_rad_card.md"
PAPER_URL = "https://arxiv.org/abs/2602.22843"
CHEXFICIENT_CITATION = """@article{wang2026chexficient,
  title   = {A data- and compute-efficient chest X-ray foundation model beyond aggressive scaling},
  author  = {Wang and others},
  journal = {arXiv preprint arXiv:2602.22843},
  year    = {2026}
}"""
LLAVA_RAD_CITATION = """@article{zambranochaves2025llavarad,
  title   = {A clinically accessible small multimodal radiology model and evaluation metric for chest X-ray findings},
  author  = {Zambrano Chaves, Juan Manuel and others},
  journal = {Nature Communications},
  year    = {2025},
  doi     = {10.1038/s41467-025-58344-x}
}"""
VICUNA_7B_HIDDEN_SIZE = 4096  # the language model of the published LLaVA-Rad
SOURCE_COLUMNS = ("source", "dataset", "data_source")
REPORT_METRIC_TYPES = {
    "bleu1": "bleu",
    "bleu4": "bleu",
    "rougeL": "rouge",
    "bertscore_f1": "bertscore",
    "radgraph_f1": "f1",
}
TAGS = ["chest-x-ray", "radiology", "medical-imaging"]
Visibility = Literal["private", "public"]


@dataclass
class CardOptions:
    """What the folder cannot tell: where it is published and under which terms."""

    repo_id: str
    license: str | None = None
    base_model: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    num_candidates: int | None = None  # size of the candidate pool when curated_subset.json lacks it
    space_id: str | None = None
    visibility: Visibility = "private"  # what the card says the repository was published as

    @property
    def model_name(self) -> str:
        return self.repo_id.split("/")[-1]


# ----- reading the folder --------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; ValueError naming the file when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error}).") from error


def count_parameters(folder: str | os.PathLike) -> int:
    """Number of values stored in the folder's safetensors files (read from the headers, nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as handle:
            for key in handle.keys():
                count = 1
                for size in handle.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def per_source_counts(
    manifest: str | os.PathLike | None, ids: Sequence[Any], id_column: str = "id"
) -> dict[str, dict[str, int]] | None:
    """{source: {"candidates", "curated"}} from a candidate manifest with a source column; None when unknown.

    The manifest is read and its ids formed as pretraining reads them (`chexficient.data.pairs`: the id column as text, else the
    row number), so they match the ids in `curated_subset.json`.
    """
    from chexficient.data.manifests import read_manifest

    if not manifest or not Path(manifest).is_file():
        return None
    try:
        frame = read_manifest(manifest)
    except ValueError:  # a format pretraining does not read either
        return None
    column = next((c for c in SOURCE_COLUMNS if c in frame.columns), None)
    if column is None:
        return None
    keys = frame[id_column] if id_column in frame.columns else range(len(frame))
    source_of = {str(key): str(source) for key, source in zip(keys, frame[column])}
    candidates = Counter(source_of.values())
    curated = Counter(source_of[str(i)] for i in ids if str(i) in source_of)
    return {name: {"candidates": candidates[name], "curated": curated[name]} for name in sorted(candidates)}


def load_training_run(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The training run's `arguments.json` and `summary.json` when the model sits in train/pretrain.py's `final/`."""
    run: dict[str, Any] = {}
    parent = Path(model_dir).resolve().parent
    for name in ("arguments", "summary"):
        path = parent / f"{name}.json"
        if path.is_file():
            run[name] = read_json(path)
    return run


def load_curation(
    model_dir: str | os.PathLike, num_candidates: int | None = None, run: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Curation statistics from `curated_subset.json` (pretraining's or the converter's record), or None."""
    from chexficient.data.subsets import read_curated_subset

    path = Path(model_dir) / "curated_subset.json"
    if not path.is_file():
        return None
    record = read_curated_subset(path)
    num_curated = int(record.get("num_curated") or len(record["ids"]))
    candidates = record.get("num_candidates") or num_candidates
    source = record.get("source") or record.get("manifest")
    data_args = (run or {}).get("arguments", {}).get("data", {})
    by_source = record.get("per_source") or per_source_counts(
        source, record["ids"], data_args.get("id_column") or "id"
    )
    return {
        "num_curated": num_curated,
        "num_candidates": int(candidates) if candidates else None,
        "ratio": num_curated / int(candidates) if candidates else None,
        "source": source,
        "per_source": by_source,
    }


# ----- evaluation ----------------------------------------------------------------------------------------------------


def clip_eval_results(results: Sequence[dict[str, Any]]) -> list[EvalResult]:
    """model-index entries for eval/ task results (zero-shot, retrieval, linear probe, segmentation)."""
    from chexficient.metrics.results import model_index_entries

    split_of = {(r["task"], r["dataset"]): r.get("split") for r in results}
    tasks = {"zero-shot-image-classification": "zero_shot", "image-text-retrieval": "retrieval"}
    tasks |= {"image-classification": "linear_probe", "image-segmentation": "segmentation"}
    names = {
        "zero-shot-image-classification": "Zero-shot classification",
        "image-text-retrieval": "Image-report retrieval",
        "image-classification": "Linear probe",
        "image-segmentation": "Segmentation",
    }
    return [
        EvalResult(
            task_type=entry["task_type"],
            task_name=names[entry["task_type"]],
            dataset_type=entry["dataset"],
            dataset_name=entry["dataset"],
            dataset_split=split_of.get((tasks[entry["task_type"]], entry["dataset"])),
            metric_type=entry["metric_type"],
            metric_name=entry["metric_name"],
            metric_value=round(entry["value"], 4),
        )
        for entry in model_index_entries(results)
    ]


def load_report_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Report-generation results (llava_rad/metrics.py JSON: `metrics` {name: {value, ci_low, ...}}, `num_reports`)."""
    results = []
    for path in sorted(Path(folder).rglob("*.json")):
        record = read_json(path)
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict) and "num_reports" in record:
            record = dict(record, _path=str(path))
            record.setdefault("dataset", path.stem.removesuffix(".metrics"))
            results.append(record)
    return results


def _metric_value(entry: Any) -> float:
    return float(entry["value"] if isinstance(entry, Mapping) else entry)


def report_eval_results(results: Sequence[dict[str, Any]]) -> list[EvalResult]:
    """model-index entries for report-generation metrics."""
    return [
        EvalResult(
            task_type="image-to-text",
            task_name="Radiology report generation (findings)",
            dataset_type=record["dataset"],
            dataset_name=record["dataset"],
            metric_type=REPORT_METRIC_TYPES.get(name, "f1" if "f1" in name.lower() else name),
            metric_name=name,
            metric_value=round(_metric_value(entry), 4),
        )
        for record in results
        for name, entry in record["metrics"].items()
    ]


def report_tables(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table per report-generation result: dataset, report count, (metric, value, CI) rows, metrics not run."""
    tables = []
    for record in results:
        rows = []
        for name, entry in record["metrics"].items():
            ci = (
                f"{entry['ci_low']:.3f}–{entry['ci_high']:.3f}"
                if isinstance(entry, Mapping) and "ci_low" in entry
                else ""
            )
            rows.append((name, f"{_metric_value(entry):.3f}", ci))
        tables.append(
            {
                "dataset": record["dataset"],
                "num_reports": record["num_reports"],
                "rows": rows,
                "not_run": list(record.get("not_run") or []),
            }
        )
    return tables


# ----- template values -----------------------------------------------------------------------------------------------


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count:,}"


def _common_values(model_dir: Path, options: CardOptions, license_id: str, citation: str) -> dict[str, Any]:
    """What both cards state: names, links, visibility, license, parameter count, citation."""
    return {
        "model_name": options.model_name,
        "repo_id": options.repo_id,
        "space_id": options.space_id,
        "visibility": options.visibility,
        "paper_url": PAPER_URL,
        "license": license_id,
        "parameters": _millions(count_parameters(model_dir)),
        "released": RELEASED_VISION_CONFIG,
        "citation": citation,
    }


def is_released_architecture(vision: Mapping[str, Any]) -> bool:
    """Whether an image tower config has the released CheXficient architecture (dropout rates aside); a field the
    config leaves out takes the released value, as `CheXficientConfig` does."""
    return all(vision.get(key, value) == value for key, value in RELEASED_VISION_CONFIG.items() if "drop" not in key)


def _image_processor_config(model_dir: Path) -> dict[str, Any]:
    if (model_dir / "preprocessor_config.json").is_file():
        return read_json(model_dir / "preprocessor_config.json")
    if (model_dir / "processor_config.json").is_file():
        return read_json(model_dir / "processor_config.json").get("image_processor", {})
    return {}


def _chexficient_architecture(model_dir: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The model-details values: tower configs, token grid, projection, prototypes, preprocessing sizes."""
    vision, text = config["vision_config"], config["text_config"]
    preprocessor = _image_processor_config(model_dir)
    return {
        "vision": vision,
        "text": text,
        "vocab_size": f"{text['vocab_size']:,}",
        "grid": vision["image_size"] // vision["patch_size"],
        "projection_dim": config["projection_dim"],
        "num_prototypes": config.get("num_prototypes", 6),
        "resize": preprocessor.get("size", {}).get("shortest_edge", vision["image_size"]),
        "crop": preprocessor.get("crop_size", {}).get("height", vision["image_size"]),
        "reduced": not is_released_architecture(vision),
    }


def _curation_values(curation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Curation statistics as the card prints them (thousands separators, shares in percent)."""
    if curation is None:
        return None
    per_source = [
        (
            name,
            f"{c['candidates']:,}",
            f"{c['curated']:,}",
            f"{c['curated'] / c['candidates'] if c['candidates'] else 0.0:.1%}",
        )
        for name, c in (curation["per_source"] or {}).items()
    ]
    return {
        "num_curated": f"{curation['num_curated']:,}",
        "num_candidates": f"{curation['num_candidates']:,}" if curation["num_candidates"] else None,
        "share": f"{curation['ratio']:.1%}" if curation["ratio"] is not None else None,
        "source": curation["source"],
        "per_source": per_source,
    }


def training_run_rows(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows from the run's `arguments.json` and `summary.json`; fields they lack are left out."""
    arguments, summary = run.get("arguments", {}), run.get("summary", {})
    train, cur = arguments.get("train", {}), arguments.get("curation", {})
    rows = [
        ("epochs", train.get("num_epochs", summary.get("epochs"))),
        ("optimizer steps", summary.get("steps")),
        ("pairs trained (compute)", f"{summary['pairs_trained']:,}" if "pairs_trained" in summary else None),
        ("super-batch per process", train.get("per_device_batch_size")),
        ("batch on the curated subset", train.get("curated_batch_size")),
        ("learning rate", train.get("learning_rate")),
        ("curation mode / epochs", f"{cur['curation_mode']} / {cur['curation_epochs']}" if cur else None),
        ("mixed precision", train.get("mixed_precision")),
        ("wall time", f"{summary['seconds']:.0f} s" if "seconds" in summary else None),
    ]
    return [(label, str(value)) for label, value in rows if value is not None]


def _trained_on_phantoms(curation: Mapping[str, Any] | None, results: Sequence[dict[str, Any]]) -> bool:
    return any("phantom" in str(r.get("dataset", "")) for r in results) or (
        curation is not None and "phantom" in str(curation.get("source") or "")
    )


# ----- the cards -----------------------------------------------------------------------------------------------------


def chexficient_card(
    model_dir: str | os.PathLike,
    options: CardOptions,
    results: Sequence[dict[str, Any]] = (),
    plot: str | None = None,
    run: Mapping[str, Any] | None = None,
    curation: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of a CheXficient folder; `results` are eval/ records (`chexficient.metrics.results.load_results`),
    `plot` the repo-relative path of the per-class AUROC figure, `run` the training run and `curation` the
    `load_curation` statistics (both default to what is read from and beside the folder)."""
    from chexficient.metrics.results import results_markdown

    model_dir = Path(model_dir)
    run = load_training_run(model_dir) if run is None else run
    curation = load_curation(model_dir, options.num_candidates, run) if curation is None else curation
    license_id = options.license or "mit"
    data = ModelCardData(
        model_name=options.model_name,
        license=license_id,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=["chexficient", "clip", "custom_code", *TAGS],
        base_model=options.base_model or None,
        datasets=options.datasets or None,
        eval_results=clip_eval_results(results) or None,
    )
    results_table = results_markdown(results, plot).replace("## Results", "", 1).strip() if results else ""
    return ModelCard.from_template(
        data,
        template_path=str(CHEXFICIENT_TEMPLATE),
        **_common_values(model_dir, options, license_id, CHEXFICIENT_CITATION),
        **_chexficient_architecture(model_dir, read_json(model_dir / "config.json")),
        curation=_curation_values(curation),
        run_rows=training_run_rows(run),
        results_table=results_table,
        phantom=_trained_on_phantoms(curation, results),
    )


def _llava_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model-details values of a LlavaConfig; a field the config lacks shows as `?`."""

    def fields(sub: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
        return {name: sub.get(name, "?") for name in names}

    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    return {
        "vision": fields(vision, ("model_type", "num_hidden_layers", "hidden_size", "patch_size", "image_size")),
        "text": fields(text, ("model_type", "num_hidden_layers", "hidden_size")),
        "vocab_size": f"{text.get('vocab_size', 0):,}",
        "feature_layer": config.get("vision_feature_layer", -2),
        "feature_select": config.get("vision_feature_select_strategy", "default"),
        "image_seq_length": config.get("image_seq_length", "?"),
        "projector_act": config.get("projector_hidden_act", "gelu").upper(),
        "reduced": vision.get("hidden_size") != RELEASED_VISION_CONFIG["hidden_size"]
        or text.get("hidden_size") != VICUNA_7B_HIDDEN_SIZE,
    }


def llava_card(
    model_dir: str | os.PathLike, options: CardOptions, results: Sequence[dict[str, Any]] = ()
) -> ModelCard:
    """The model card of a LLaVA-Rad folder (a plain `LlavaForConditionalGeneration`); `results` from
    `load_report_results`."""
    model_dir = Path(model_dir)
    license_id = options.license or "llama2"
    data = ModelCardData(
        model_name=options.model_name,
        license=license_id,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["llava", "llava-rad", "report-generation", "chexficient", *TAGS],
        base_model=options.base_model or None,
        datasets=options.datasets or None,
        eval_results=report_eval_results(results) or None,
    )
    return ModelCard.from_template(
        data,
        template_path=str(LLAVA_RAD_TEMPLATE),
        **_common_values(model_dir, options, license_id, f"{LLAVA_RAD_CITATION}\n\n{CHEXFICIENT_CITATION}"),
        **_llava_architecture(read_json(model_dir / "config.json")),
        results=report_tables(results),
    )


__all__ = [
    "CardOptions",
    "chexficient_card",
    "clip_eval_results",
    "count_parameters",
    "is_released_architecture",
    "llava_card",
    "load_curation",
    "load_report_results",
    "load_training_run",
    "per_source_counts",
    "report_eval_results",
    "report_tables",
    "training_run_rows",
]
