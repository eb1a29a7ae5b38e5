"""CheXficient Space: upload a chest radiograph, see what the model sees, its zero-shot findings and the closest
reports of a small report bank, and (with a LLaVA-Rad model configured) a generated findings section.

    python space/app.py                                      # the demo model (outputs/demo/final) on 127.0.0.1:7860
    CHEXFICIENT_MODEL=org/CheXficient CHEXFICIENT_LLAVA_MODEL=org/CheXficient-LLaVA-Rad python space/app.py

Environment: CHEXFICIENT_MODEL (a model folder or Hub repo id), CHEXFICIENT_LLAVA_MODEL (a plain transformers
`LlavaForConditionalGeneration` folder or repo id; the report tab appears only when it is set),
CHEXFICIENT_REPORT_BANK (a CSV with a `report` column; default: report_bank.csv beside this file).

The app needs no project code: the model folder's own remote code decodes uploads (PNG, JPEG, 16-bit PNG, DICOM) and
preprocesses them, and the model's `zero_shot_classify` scores findings with the paper's protocol.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL.Image
import torch


HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "outputs/demo/final"
DEFAULT_REPORT_BANK = HERE / "report_bank.csv"
MAX_FINDINGS = 40
MAX_FINDING_CHARS = 80
PREVIEW_MIN_SIZE = 256
REPORT_PROMPT_FILE = "report_prompt.json"  # written by llava_rad/export.py: the instruction the model learnt
DISCLAIMER = (
    "**Research use only.** This demo is not a medical device and must not be used for diagnosis, triage or any "
    "clinical decision. Do not upload identifiable patient data."
)


def default_device() -> torch.device:
    """A GPU when the Space has one (models in their saved dtype there), else the CPU (float32)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class UploadError(ValueError):
    """An input the app cannot use; the message names the file and says why."""


def parse_findings(text: str | None) -> list[str]:
    """Findings from comma- or newline-separated text: stripped, de-duplicated in order, at most MAX_FINDINGS."""
    findings: list[str] = []
    for item in re.split(r"[,\n;]", text or ""):
        item = " ".join(item.split())
        if item and item.lower() not in (f.lower() for f in findings):
            findings.append(item)
    if not findings:
        raise UploadError("Enter at least one finding (comma- or newline-separated).")
    if len(findings) > MAX_FINDINGS:
        raise UploadError(f"At most {MAX_FINDINGS} findings at a time; got {len(findings)}.")
    too_long = [f for f in findings if len(f) > MAX_FINDING_CHARS]
    if too_long:
        raise UploadError(f"Finding {too_long[0][:40]!r}... is longer than {MAX_FINDING_CHARS} characters.")
    return findings


def load_report_bank(path: str | os.PathLike) -> list[str]:
    """Report texts from a CSV with a `report` column (other columns are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: report bank not found (CHEXFICIENT_REPORT_BANK).")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "report" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: the report bank needs a 'report' column; got {reader.fieldnames}.")
        reports = [row["report"].strip() for row in reader if (row.get("report") or "").strip()]
    if not reports:
        raise ValueError(f"{path}: the report bank is empty.")
    return reports


def resolve_model(value: str | os.PathLike | None, default: str | None = DEFAULT_MODEL) -> str | None:
    """A model location: an existing folder (also relative to the repository root), else a Hub repo id."""
    if value is None or str(value).strip() == "":
        if default is None:
            return None
        value = default
    value = os.fspath(value)
    for candidate in (Path(value), HERE.parent / value):
        if candidate.is_dir():
            return str(candidate)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not Path(value).is_absolute() and not value.startswith("."):
        return value  # a Hub repo id; from_pretrained downloads it (on a Space)
    raise FileNotFoundError(f"{value}: no such model folder; set CHEXFICIENT_MODEL to a model folder or Hub repo id.")


@dataclass
class Analysis:
    """What one upload gives: the preprocessed image, p(finding) per finding, and the closest bank reports."""

    preview: np.ndarray
    probabilities: dict[str, float]
    reports: list[tuple[float, str]]


class CheXficientSpace:
    """The CheXficient side of the app: decoding, zero-shot scoring and report-bank retrieval on one model."""

    def __init__(self, model: str | os.PathLike, report_bank: str | os.PathLike | None = None, top_k: int = 3):
        from transformers import AutoModel, AutoProcessor

        self.model_path = os.fspath(model)
        self.device = default_device()
        dtype = "auto" if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(self.model_path, trust_remote_code=True, dtype=dtype)
        self.model = self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(self.model_path, trust_remote_code=True)  # CheXficient's own
        self.reports = load_report_bank(report_bank or DEFAULT_REPORT_BANK)
        self.top_k = top_k
        self._report_embeds: torch.Tensor | None = None

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def default_findings(self) -> tuple[str, ...]:
        """The findings the model folder's own code names (the CheXpert 14 for CheXficient)."""
        return tuple(getattr(self.model, "zero_shot_default_labels", ()))

    def decode(self, path: str | os.PathLike) -> Any:
        """The decoded upload (8-bit PIL image or float array in [0, 1]); UploadError naming the file if unreadable."""
        name = Path(path).name
        try:
            return self.image_processor.load_image(os.fspath(path), name=name)
        except (ValueError, OSError, ImportError) as error:
            raise UploadError(_readable(error, name)) from error

    def pixel_values(self, path: str | os.PathLike) -> torch.Tensor:
        """Preprocessed upload [1, 3, H, W], through the model folder's own image processor."""
        name = Path(path).name
        try:
            array = self.image_processor.process_one(os.fspath(path), name=name)
        except (ValueError, OSError, ImportError) as error:
            raise UploadError(_readable(error, name)) from error
        return torch.from_numpy(array).unsqueeze(0)

    def preview(self, pixel_values: torch.Tensor) -> np.ndarray:
        """The model's input as an 8-bit RGB image (normalisation undone), enlarged for display if it is tiny."""
        mean = torch.tensor(self.image_processor.image_mean).view(-1, 1, 1)
        std = torch.tensor(self.image_processor.image_std).view(-1, 1, 1)
        image = (pixel_values[0] * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        array = image.permute(1, 2, 0).numpy()
        scale = -(-PREVIEW_MIN_SIZE // max(1, min(array.shape[:2])))
        if scale > 1:
            array = np.asarray(
                PIL.Image.fromarray(array).resize(
                    (array.shape[1] * scale, array.shape[0] * scale), PIL.Image.Resampling.NEAREST
                )
            )
        return array

    @torch.no_grad()
    def report_embeds(self) -> torch.Tensor:
        """Embeddings of the report bank [R, D], computed once."""
        if self._report_embeds is None:
            chunks = []
            for start in range(0, len(self.reports), 32):
                tokens = self.processor(text=self.reports[start : start + 32])
                tokens = {
                    k: v.to(self.device)
                    for k, v in tokens.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")
                }
                chunks.append(self.model.get_text_features(**tokens))
            self._report_embeds = torch.cat(chunks)
        return self._report_embeds

    @torch.no_grad()
    def analyse(self, path: str | os.PathLike, findings: list[str]) -> Analysis:
        """Zero-shot probabilities of `findings` and the `top_k` closest bank reports for one uploaded file."""
        pixel_values = self.pixel_values(path)
        image_embeds = self.model.get_image_features(pixel_values.to(self.device, self.model.dtype))  # [1, D]
        probs = self.model.zero_shot_classify(findings, self.processor.tokenizer, image_embeds=image_embeds)[0].cpu()
        similarity = (image_embeds @ self.report_embeds().t())[0].float().cpu()  # cosine: both are L2-normalised
        top = similarity.topk(min(self.top_k, len(self.reports)))
        return Analysis(
            preview=self.preview(pixel_values),
            probabilities={f: float(p) for f, p in zip(findings, probs.tolist())},
            reports=[(float(s), self.reports[i]) for s, i in zip(top.values.tolist(), top.indices.tolist())],
        )


class ReportGenerator:
    """A LLaVA-Rad model as a plain `LlavaForConditionalGeneration` with its processor; greedy findings generation."""

    def __init__(self, model: str | os.PathLike):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model_path = os.fspath(model)
        self.device = default_device()
        dtype = "auto" if self.device.type == "cuda" else torch.float32
        self.model = LlavaForConditionalGeneration.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(self.model_path)  # a stock LlavaProcessor: no remote code
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(
                f"{self.model_path}: the processor has no chat template; export with llava_rad/export.py."
            )
        self.instructions = read_report_prompt(self.model_path)

    def prompt(self, indication: str | None = None) -> str:
        """The instruction the model was trained with (from the folder), in the folder's chat template."""
        indication = " ".join((indication or "").split())
        key = "instruction_with_indication" if indication else "instruction"
        instruction = self.instructions[key].format(indication=indication)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, image: PIL.Image.Image, indication: str | None = None, max_new_tokens: int = 256) -> str:
        """The generated findings for one RGB image (greedy decoding)."""
        inputs = self.processor(images=image, text=self.prompt(indication), return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts the pixels only
        output = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


def read_report_prompt(model: str) -> dict[str, str]:
    """The instruction templates an exported LLaVA-Rad folder (or Hub repo) carries in `report_prompt.json`."""
    path = Path(model) / REPORT_PROMPT_FILE
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, REPORT_PROMPT_FILE))
        except Exception as error:  # not a Hub repo, offline, or no such file
            raise FileNotFoundError(f"{model}: no {REPORT_PROMPT_FILE}; export with llava_rad/export.py.") from error
    record = json.loads(path.read_text())
    missing = [k for k in ("instruction", "instruction_with_indication") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"{path}: missing {missing}.")
    return record


def to_rgb(decoded: Any) -> PIL.Image.Image:
    """An 8-bit RGB PIL image from a decoded upload (8-bit PIL, or float array [H, W, 1 or 3] in [0, 1])."""
    if isinstance(decoded, PIL.Image.Image):
        return decoded.convert("RGB")
    array = np.clip(np.asarray(decoded, dtype=np.float32), 0.0, 1.0)
    array = (array * 255.0).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array).convert("RGB")


def _readable(error: BaseException, name: str) -> str:
    """An error message that names the uploaded file (not the server's temporary path)."""
    message = str(error)
    return message if name in message else f"{name}: {message}"


def _plot_frame(probabilities: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"finding": list(probabilities), "probability": [round(p, 4) for p in probabilities.values()]})


def build_demo(
    model: str | os.PathLike | None = None,
    llava_model: str | os.PathLike | None = None,
    report_bank: str | os.PathLike | None = None,
) -> Any:
    """The Gradio app (not launched). Arguments default to CHEXFICIENT_MODEL, CHEXFICIENT_LLAVA_MODEL and
    CHEXFICIENT_REPORT_BANK; without a LLaVA model there is no report tab."""
    import gradio as gr

    model_path = resolve_model(model or os.environ.get("CHEXFICIENT_MODEL"))
    llava_path = resolve_model(llava_model or os.environ.get("CHEXFICIENT_LLAVA_MODEL"), default=None)
    space = CheXficientSpace(model_path, report_bank or os.environ.get("CHEXFICIENT_REPORT_BANK") or None)
    reporter = ReportGenerator(llava_path) if llava_path else None

    def classify(path: str | None, findings_text: str) -> tuple[Any, ...]:
        if not path:
            raise gr.Error("Upload a chest radiograph (PNG, JPEG or DICOM) first.")
        try:
            result = space.analyse(path, parse_findings(findings_text))
        except UploadError as error:
            raise gr.Error(str(error)) from error
        reports = pd.DataFrame(
            {"similarity": [round(s, 3) for s, _ in result.reports], "report": [r for _, r in result.reports]}
        )
        return result.preview, _plot_frame(result.probabilities), result.probabilities, reports

    def generate(path: str | None, indication: str, max_new_tokens: float) -> str:
        if not path:
            raise gr.Error("Upload a chest radiograph (PNG, JPEG or DICOM) first.")
        try:
            image = to_rgb(space.decode(path))
        except UploadError as error:
            raise gr.Error(str(error)) from error
        return reporter.generate(image, indication, int(max_new_tokens))

    with gr.Blocks(title="CheXficient") as demo:
        gr.Markdown(
            "# CheXficient\nZero-shot chest X-ray findings with a CLIP of a DINOv2 image encoder and a clinical "
            "BERT text encoder (Wang et al., [arXiv 2602.22843](https://arxiv.org/abs/2602.22843)). "
            f"Model: `{model_path}`" + (f"; reports: `{llava_path}`." if llava_path else ".") + f"\n\n{DISCLAIMER}"
        )
        with gr.Row():
            with gr.Column(scale=1):
                # No file_types filter: PACS exports often name DICOMs without a suffix (the decoder reads the
                # DICM magic), and anything unreadable gets an error naming the file.
                upload = gr.File(
                    label="Chest radiograph (PNG, JPEG or DICOM)",
                    type="filepath",
                    elem_id="upload",
                )
                preview = gr.Image(
                    label="Model input (after resize, crop and normalisation)",
                    type="numpy",
                    format="png",
                    interactive=False,
                    height=320,
                    elem_id="preview",
                )
            with gr.Column(scale=2):
                with gr.Tab("Zero-shot findings"):
                    findings = gr.Textbox(
                        value=", ".join(space.default_findings),
                        lines=3,
                        label="Findings to score (comma- or newline-separated; edit freely)",
                        elem_id="findings",
                    )
                    run = gr.Button("Score findings", variant="primary", elem_id="score")
                    plot = gr.BarPlot(
                        x="finding",
                        y="probability",
                        y_lim=[0, 1],
                        x_label_angle=-40,
                        sort="-y",
                        height=360,
                        label="p(finding): softmax of the image's cosine with '{finding}' vs 'no {finding}'",
                        elem_id="bars",
                    )
                    reports = gr.Dataframe(
                        headers=["similarity", "report"],
                        label="Closest reports in the report bank (cosine similarity)",
                        wrap=True,
                        column_widths=["12%", "88%"],
                        interactive=False,
                        elem_id="reports",
                    )
                    with gr.Accordion("Scores as JSON", open=False):
                        scores = gr.JSON(label="p(finding)", elem_id="scores")
                if reporter is not None:
                    with gr.Tab("Report generation"):
                        indication = gr.Textbox(label="Indication (optional)", elem_id="indication")
                        max_new_tokens = gr.Slider(16, 512, value=256, step=16, label="Maximum new tokens")
                        write = gr.Button("Generate findings", variant="primary", elem_id="generate")
                        report = gr.Textbox(label="Generated findings", lines=8, elem_id="report")
                        write.click(generate, [upload, indication, max_new_tokens], report, api_name="report")
        outputs = [preview, plot, scores, reports]
        run.click(classify, [upload, findings], outputs, api_name="classify")
        upload.upload(classify, [upload, findings], outputs, api_name=False)
        findings.submit(classify, [upload, findings], outputs, api_name=False)
        upload.clear(lambda: (None, None, None, None), None, outputs, api_name=False)
    return demo


def make_theme() -> Any:
    """Gradio's default theme with system fonts: nothing is fetched from font servers (offline hospitals, tests)."""
    import gradio as gr

    return gr.themes.Default(
        primary_hue="blue", font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def launch(demo: Any, **kwargs: Any) -> Any:
    """Queue (one job at a time: one model, one CPU) and launch; `kwargs` go to `Blocks.launch`."""
    return demo.queue(default_concurrency_limit=1).launch(theme=make_theme(), **kwargs)


def main() -> None:
    launch(build_demo())


if __name__ == "__main__":
    main()
