"""Model cards for the Hub: CheXficient (CLIP) and LLaVA-Rad (report generation) folders, built with huggingface_hub's
`ModelCard` and `ModelCardData`.

Everything a card states comes from the folder being published or from files written beside it: `config.json`
(architecture), the safetensors headers (parameter count), `curated_subset.json` (curation statistics), the training
run's `arguments.json` and `summary.json` (one folder up, as train/pretrain.py writes them) and the evaluation JSON of
`eval/` (tables and model-index metadata) or of llava_rad/metrics.py. scripts/push_to_hub.py calls these functions.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


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
# The released CheXficient image tower; a card for any other size says so.
RELEASED_VISION = {"hidden_size": 768, "num_hidden_layers": 12, "patch_size": 14, "image_size": 378}
SOURCE_COLUMNS = ("source", "dataset", "data_source")
REPORT_METRIC_TYPES = {
    "bleu1": "bleu",
    "bleu4": "bleu",
    "rougeL": "rouge",
    "bertscore_f1": "bertscore",
    "radgraph_f1": "f1",
}
TAGS = ["chest-x-ray", "radiology", "medical-imaging"]


@dataclass
class CardOptions:
    """What the folder cannot tell: where it is published and under which terms."""

    repo_id: str
    license: str | None = None
    base_model: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    num_candidates: int | None = None  # size of the candidate pool when curated_subset.json lacks it
    space_id: str | None = None

    @property
    def model_name(self) -> str:
        return self.repo_id.split("/")[-1]


# ----- reading the folder ---------------------------------------------------------------------------------------------


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

    The manifest is read and its ids formed as pretraining reads them (`train.data`: the id column as text, else the
    row number), so they match the ids in `curated_subset.json`.
    """
    from chexficient.manifests import read_manifest

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
    from chexficient.subset import read_curated_subset

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


# ----- evaluation -----------------------------------------------------------------------------------------------------


def clip_eval_results(results: Sequence[dict[str, Any]]) -> list[EvalResult]:
    """model-index entries for eval/ task results (zero-shot, retrieval, linear probe, segmentation)."""
    from chexficient.results import model_index_entries

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


def report_results_markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = ["## Results", ""]
    for record in results:
        lines += [f"### {record['dataset']} ({record['num_reports']} reports)", ""]
        lines += ["| metric | value | 95% bootstrap CI |", "|---|---|---|"]
        for name, entry in record["metrics"].items():
            ci = ""
            if isinstance(entry, Mapping) and "ci_low" in entry:
                ci = f"{entry['ci_low']:.3f}–{entry['ci_high']:.3f}"
            lines.append(f"| {name} | {_metric_value(entry):.3f} | {ci} |")
        if record.get("not_run"):
            lines.append(f"\nNot run: {', '.join(record['not_run'])}.")
        lines.append("")
    return "\n".join(lines)


# ----- shared prose ---------------------------------------------------------------------------------------------------


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count:,}"


CLIP_RESEARCH_USE = (
    "Research on chest radiograph representation learning: embeddings for retrieval, clustering and data curation, "
    "zero-shot and linear-probe classification benchmarks, and frozen features for segmentation or report generation."
)
REPORT_RESEARCH_USE = (
    "Research on radiology report generation: benchmarking, error analysis, and studies of how image encoders and "
    "curated pretraining change generated reports."
)


def _intended_use(research_use: str) -> str:
    return f"""## Intended use

- {research_use}
- Method development and reproducibility studies against the published results.

## Out-of-scope use

- **Any clinical use.** This model is not a medical device, has not been validated prospectively or cleared by any
  regulator, and must not inform diagnosis, triage, treatment or any other decision about a patient.
- Screening or alerting without a qualified reader, and use on populations or images unlike the training data
  (paediatric studies, lateral views, other modalities, photographs of films) without a local validation study.
- Inferring protected attributes (age, sex, race, insurance status) from radiographs."""


def _license_section(license_id: str) -> str:
    return (
        f"## License\n\nThe weights and code in this repository are released under `{license_id}`. Models trained on "
        "MIMIC-CXR, CheXpert and other credentialed datasets may carry their data-use terms (for example PhysioNet's "
        "credentialed health data licence); check them before redistribution or commercial use."
    )


# ----- CheXficient -----------------------------------------------------------------------------------------------------


def _is_released_size(vision: Mapping[str, Any]) -> bool:
    return all(vision.get(k) == v for k, v in RELEASED_VISION.items())


def _chexficient_details(model_dir: Path, config: Mapping[str, Any]) -> str:
    vision, text = config["vision_config"], config["text_config"]
    grid = vision["image_size"] // vision["patch_size"]
    preprocessor: dict[str, Any] = {}
    if (model_dir / "preprocessor_config.json").is_file():
        preprocessor = read_json(model_dir / "preprocessor_config.json")
    elif (model_dir / "processor_config.json").is_file():
        preprocessor = read_json(model_dir / "processor_config.json").get("image_processor", {})
    size = preprocessor.get("size", {}).get("shortest_edge", vision["image_size"])
    crop = preprocessor.get("crop_size", {}).get("height", vision["image_size"])
    rows = [
        (
            "image encoder",
            f"DINOv2 ViT (`Dinov2Model`): {vision['num_hidden_layers']} layers, width {vision['hidden_size']}, "
            f"{vision['num_attention_heads']} heads, patch {vision['patch_size']}, {vision['image_size']} px input "
            f"({grid * grid + 1} tokens: CLS + {grid}×{grid} patches, no registers); the CLS token after the final "
            "LayerNorm feeds the projection",
        ),
        (
            "text encoder",
            f"BERT (`BertModel`): {text['num_hidden_layers']} layers, width {text['hidden_size']}, vocabulary "
            f"{text['vocab_size']:,}, up to {text['max_position_embeddings']} positions; pooled at the last "
            "non-padding token ([SEP])",
        ),
        (
            "joint space",
            f"linear projections (with bias) to {config['projection_dim']} dimensions, L2-normalised; learnable "
            "temperature",
        ),
        (
            "curation prototypes",
            f"{config.get('num_prototypes', 6)} prototypes over the concatenated image–text space",
        ),
        ("parameters", f"{_millions(count_parameters(model_dir))} (values stored in safetensors)"),
        (
            "preprocessing",
            f"shortest edge to {size} (bicubic), centre crop {crop}, OpenAI-CLIP mean/std; PNG, JPEG, 16-bit PNG and "
            "DICOM (modality and VOI LUT, MONOCHROME1 inverted) are decoded by the bundled image processor",
        ),
        (
            "code",
            "`trust_remote_code=True`: configuration, model, image processor and processor files ship with the "
            "weights; needs `transformers>=5`, `torch`, `numpy`, `Pillow` (and `pydicom` for DICOM)",
        ),
    ]
    note = ""
    if not _is_released_size(vision):
        note = (
            "\n\n> **Reduced configuration.** This checkpoint is smaller than the released CheXficient (ViT-B/14 at "
            f"378 px, Bio_ClinicalBERT, 512-d): image tower width {vision['hidden_size']} at {vision['image_size']} px. "
            "It exercises the same code, not the paper's accuracy."
        )
    return "## Model details\n\n" + _table(rows) + note


def _curation_section(curation: Mapping[str, Any] | None, run: Mapping[str, Any]) -> str:
    lines = [
        "## Training data and curation",
        "",
        "Pretraining is contrastive (symmetric InfoNCE) on chest radiograph–report pairs, with a prototype-driven "
        "curator choosing the pairs worth training on. During the curation epoch(s) each super-batch of pairs is "
        "assigned to its nearest prototype in the joint image–text space; per prototype the farthest 5% are dropped as "
        "likely noise, the next 10% (the informative tail) are kept, and a few central pairs are kept by "
        "farthest-point sampling. Prototypes follow an exponential moving average of the kept pairs under a "
        "Sinkhorn-Knopp assignment. Training then continues on the curated subset only. The published CheXficient "
        "kept 22.7% of 1,235,004 pairs from 13 public chest X-ray datasets.",
        "",
    ]
    if curation is None:
        lines.append("This upload carries no `curated_subset.json`, so its curation statistics are unknown.")
        return "\n".join(lines)
    share = f" ({curation['ratio']:.1%})" if curation["ratio"] is not None else ""
    rows = [("curated pairs", f"{curation['num_curated']:,}{share}")]
    if curation["num_candidates"]:
        rows.insert(0, ("candidate pairs", f"{curation['num_candidates']:,}"))
    else:
        rows.append(("candidate pairs", "not recorded (share unknown)"))
    if curation["source"]:
        rows.append(("candidate list", f"`{curation['source']}`"))
    lines += [_table(rows), ""]
    if curation["per_source"]:
        lines += ["| source | candidates | curated | share |", "|---|---|---|---|"]
        for name, counts in curation["per_source"].items():
            ratio = counts["curated"] / counts["candidates"] if counts["candidates"] else 0.0
            lines.append(f"| {name} | {counts['candidates']:,} | {counts['curated']:,} | {ratio:.1%} |")
        lines.append("")
    else:
        lines += ["Per-source counts are not known for this subset (the candidate list has no source column).", ""]
    lines.append(
        "`curated_subset.json` lists the curated ids (`ids`, and `indices` into the candidate list when recorded), so "
        "the subset can be reused or audited."
    )
    arguments, summary = run.get("arguments", {}), run.get("summary", {})
    if arguments or summary:
        train, cur = arguments.get("train", {}), arguments.get("curation", {})
        run_rows = [
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
        lines += ["", "Training run (from the run's `arguments.json` and `summary.json`, in `training/`):", ""]
        lines.append(_table([(k, str(v)) for k, v in run_rows if v is not None]))
    return "\n".join(lines)


def _chexficient_usage(repo_id: str) -> str:
    return f"""## How to use

```python
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

# images: PNG, JPEG, 16-bit PNG or DICOM paths, PIL images or arrays; texts: report sentences
inputs = processor(images=["cxr.png"], text=["No acute cardiopulmonary process.", "Small right pleural effusion."])
with torch.no_grad():
    out = model(**inputs)
print(out.image_embeds.shape, out.logits_per_image)  # L2-normalised embeddings, scaled cosine similarities

# zero-shot findings, the paper's protocol: "{{finding}}" vs "no {{finding}}", softmax over the two cosines
findings = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "No Finding"]
probs = model.zero_shot_classify(findings, processor.tokenizer, pixel_values=inputs["pixel_values"])
print(dict(zip(findings, probs[0].tolist())))
```

From the command line, with the CheXficient project installed (`pip install -e ".[inference]"` in its repository):

```bash
hf download {repo_id} --local-dir chexficient-model
chexficient classify scans/ --model chexficient-model --labels "Cardiomegaly,Pleural Effusion,Pneumothorax" --out probs.csv
chexficient embed scans/ --model chexficient-model --out embeddings.parquet
chexficient serve --model chexficient-model --port 8000
```

Folders (searched for PNG, JPEG and DICOM), CSV manifests and file lists are accepted; unreadable files are listed
in `OUT.errors.csv` and skipped."""


def _chexficient_limitations(curation: Mapping[str, Any] | None, results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "## Limitations",
        "",
        "- Zero-shot probabilities are not calibrated: they are a softmax over two raw cosine similarities (no "
        "temperature), so values sit close to 0.5. Use them to rank images (AUROC) and pick thresholds on local "
        "validation data.",
        "- Results depend on the prompt wording; the paper's bare `{finding}` / `no {finding}` pair is used here.",
        "- The public training datasets come from a limited number of hospitals and countries, and labels mined from "
        "reports are noisy. Performance can drop under other scanners, protocols, populations and image processing, "
        "and may differ between patient subgroups.",
        "- The curated subset is chosen by the model's own embeddings; findings that are rare in the candidate pool "
        "may be under- or over-represented.",
    ]
    phantom = any("phantom" in str(r.get("dataset", "")) for r in results) or (
        curation is not None and "phantom" in str(curation.get("source") or "")
    )
    if phantom:
        lines.append(
            "- **This checkpoint was trained and evaluated on synthetic phantoms** (procedurally drawn radiographs with "
            "templated reports). Its numbers show the pipeline working end to end and say nothing about real "
            "radiographs."
        )
    return "\n".join(lines)


def chexficient_card(
    model_dir: str | os.PathLike,
    options: CardOptions,
    results: Sequence[dict[str, Any]] = (),
    plot: str | None = None,
    run: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The model card of a CheXficient folder; `results` are eval/ records (`eval.report.load_results`), `plot` the
    repo-relative path of the per-class AUROC figure, `run` the training run (default: read beside the folder)."""
    from chexficient.results import results_markdown

    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    run = load_training_run(model_dir) if run is None else run
    curation = load_curation(model_dir, options.num_candidates, run)
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
    description = (
        f"# {options.model_name}\n\n"
        f"A CheXficient chest X-ray foundation model ([Wang et al., arXiv 2602.22843]({PAPER_URL})): a CLIP that pairs "
        "a DINOv2 vision transformer with a clinical BERT text encoder, pretrained on radiograph–report pairs while a "
        "prototype-driven curator picked the pairs worth learning from. It maps radiographs and report text into one "
        "embedding space, which gives zero-shot classification of findings, image–report retrieval, and frozen "
        "features for linear probes, segmentation decoders and report generation (LLaVA-Rad)."
    )
    if options.space_id:
        description += f"\n\nTry it in the [demo Space](https://huggingface.co/spaces/{options.space_id})."
    evaluation = (
        "## Evaluation\n\nComputed with the CheXficient project's `eval/` (zero-shot: the paper's prompt pair and "
        "softmax; retrieval over distinct report texts; linear probe on frozen features; U-Net on frozen layers). "
        "95% CIs are percentile bootstraps over test images, or mean ± 1.96·SE over seeds for the linear probe. The "
        "raw JSON is in `eval/`.\n\n" + results_markdown(results, plot).replace("## Results", "", 1).strip()
        if results
        else "## Evaluation\n\nNo evaluation results were bundled with this upload."
    )
    sections = [
        description,
        _chexficient_details(model_dir, config),
        _curation_section(curation, run),
        evaluation,
        _chexficient_usage(options.repo_id),
        _intended_use(CLIP_RESEARCH_USE),
        _chexficient_limitations(curation, results),
        _license_section(license_id),
        f"## Citation\n\n```bibtex\n{CHEXFICIENT_CITATION}\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


# ----- LLaVA-Rad --------------------------------------------------------------------------------------------------------


def _llava_details(model_dir: Path, config: Mapping[str, Any]) -> str:
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    rows = [
        (
            "vision tower",
            f"`{vision.get('model_type', '?')}`: {vision.get('num_hidden_layers', '?')} layers, width "
            f"{vision.get('hidden_size', '?')}, patch {vision.get('patch_size', '?')}, {vision.get('image_size', '?')} px "
            "input; frozen during training (the CheXficient image encoder)",
        ),
        (
            "image features",
            f"hidden states of layer {config.get('vision_feature_layer', -2)} "
            f"({config.get('vision_feature_select_strategy', 'default')} selection: patch tokens, CLS dropped), "
            f"{config.get('image_seq_length', '?')} tokens per image",
        ),
        (
            "projector",
            f"two-layer MLP with {config.get('projector_hidden_act', 'gelu').upper()} "
            f"({vision.get('hidden_size', '?')} → {text.get('hidden_size', '?')} → {text.get('hidden_size', '?')})",
        ),
        (
            "language model",
            f"`{text.get('model_type', '?')}`: {text.get('num_hidden_layers', '?')} layers, width "
            f"{text.get('hidden_size', '?')}, vocabulary {text.get('vocab_size', 0):,}",
        ),
        ("parameters", f"{_millions(count_parameters(model_dir))} (values stored in safetensors)"),
        (
            "code",
            "stock `transformers` `LlavaForConditionalGeneration` and `AutoProcessor` (the processor may use "
            "CheXficient's image processor through `trust_remote_code=True`)",
        ),
    ]
    note = ""
    if vision.get("hidden_size") != 768 or text.get("hidden_size") != 4096:
        note = (
            "\n\n> **Reduced configuration.** This checkpoint is smaller than LLaVA-Rad on the released CheXficient "
            "encoder (ViT-B/14 at 378 px, Vicuna-7B): it exercises the same code, not the published quality."
        )
    return "## Model details\n\n" + _table(rows) + note


def _llava_usage(repo_id: str) -> str:
    return f"""## How to use

```python
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{repo_id}", dtype=torch.float32).eval()  # bf16 + device_map="auto" on a GPU
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

instruction = "Provide a description of the findings in the radiology image."
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": instruction}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("cxr.png").convert("RGB"), text=prompt, return_tensors="pt").to(model.device)
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With an indication, ask: "Provide a description of the findings in the radiology image given the following
indication: {{indication}}", as LLaVA-Rad was trained."""


def llava_card(
    model_dir: str | os.PathLike, options: CardOptions, results: Sequence[dict[str, Any]] = ()
) -> ModelCard:
    """The model card of a LLaVA-Rad folder (a plain `LlavaForConditionalGeneration`); `results` from
    `load_report_results`."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
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
    description = (
        f"# {options.model_name}\n\n"
        "A radiology report generator in the LLaVA-Rad design (Zambrano Chaves et al., Nature Communications 2025) "
        f"built on the frozen CheXficient image encoder ([Wang et al., arXiv 2602.22843]({PAPER_URL})): the encoder's "
        "patch features pass through a small MLP projector into a Vicuna-style language model, which writes the "
        "findings section of a chest X-ray report for one frontal radiograph, optionally given the indication."
    )
    if options.space_id:
        description += f"\n\nTry it in the [demo Space](https://huggingface.co/spaces/{options.space_id})."
    training = (
        "## Training\n\nLLaVA-Rad's recipe, which the CheXficient project's `llava_rad/train.py` follows, has two "
        "stages: (1) alignment, where only the projector is trained on radiograph–findings pairs (plain template); "
        "(2) fine-tuning, where LoRA adapters on every attention and MLP projection of the language model (rank 64, "
        "alpha 128, dropout 0.05) and the full projector are trained with the Vicuna v1 conversation template and the "
        "loss on the answer only. The vision encoder stays frozen throughout. LLaVA-Rad trained on MIMIC-CXR findings "
        "of frontal (AP/PA) views. `llava_rad/export.py` merges a stage-2 LoRA into the language model, so the folder "
        "loads without PEFT; the folder itself does not record which stages this checkpoint went through."
    )
    evaluation = (
        "## Evaluation\n\nComputed with the CheXficient project's `llava_rad/metrics.py` on generated findings "
        "(greedy decoding); CIs are percentile bootstraps over reports.\n\n"
        + report_results_markdown(results).replace("## Results", "", 1).strip()
        if results
        else "## Evaluation\n\nNo evaluation results were bundled with this upload."
    )
    limitations = (
        "## Limitations\n\n"
        "- Generated reports can state findings that are not in the image, miss findings that are, and misplace "
        "laterality or severity; lexical metrics (BLEU, ROUGE) reward wording, not clinical correctness.\n"
        "- It writes findings for a single frontal view, without prior studies, lateral views or the full clinical "
        "context a radiologist uses.\n"
        "- The language model inherits the biases of its pretraining text and of the training reports (one "
        "institution's reporting style for MIMIC-CXR).\n"
        "- Weights trained on MIMIC-CXR fall under PhysioNet's credentialed data-use agreement."
    )
    sections = [
        description,
        _llava_details(model_dir, config),
        training,
        evaluation,
        _llava_usage(options.repo_id),
        _intended_use(REPORT_RESEARCH_USE),
        limitations,
        _license_section(license_id),
        f"## Citation\n\n```bibtex\n{LLAVA_RAD_CITATION}\n\n{CHEXFICIENT_CITATION}\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


__all__ = [
    "CardOptions",
    "chexficient_card",
    "clip_eval_results",
    "count_parameters",
    "llava_card",
    "load_curation",
    "load_report_results",
    "load_training_run",
    "per_source_counts",
    "report_eval_results",
]
