"""Batched findings generation with LLaVA-Rad: greedy, 256 new tokens, left padding with an attention mask.

    python -m llava_rad.generate --model outputs/llava_rad/export --manifest test.csv --image_root MIMIC_JPG_DIR \
        --output predictions.jsonl
    python -m llava_rad.generate --model outputs/llava_rad/export --images a.png b.dcm --indication "Cough." \
        --output predictions.jsonl

`--model` is an exported folder (llava_rad/export.py) or a llava_rad/train.py output folder (LoRA merged on load).
Each JSONL row is {id, image, query, reference, prediction}. Unreadable images are skipped, logged, and listed in
`<output>.skipped.jsonl`. Images go through the CheXficient image processor (PNG/JPEG, 16-bit, DICOM).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer, HfArgumentParser, LlavaForConditionalGeneration

from chexficient.data.images import InputItem, make_image_loader
from chexficient.runtime import torch_dtype
from llava_rad.data import ReportExample, load_examples, prompt_ids
from llava_rad.model import IMAGE_PROCESSOR_FIELDS, RUN_INFO_FILENAME, build_processor

from image_processing_chexficient import CheXficientImageProcessor


logger = logging.getLogger(__name__)


def chexficient_image_processor(folder: str | os.PathLike) -> CheXficientImageProcessor:
    """A CheXficient image processor with the settings saved in `folder` (by either export processor)."""
    folder = Path(folder)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            if "crop_size" in data or "size" in data:
                return CheXficientImageProcessor(**{k: data[k] for k in IMAGE_PROCESSOR_FIELDS if k in data})
    raise FileNotFoundError(
        f"{folder}: no image processor settings (preprocessor_config.json / processor_config.json)."
    )


def load_for_generation(model_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) from an exported folder or a train.py output folder."""
    model_path = Path(model_path)
    if (model_path / RUN_INFO_FILENAME).is_file():
        from llava_rad.export import load_trained

        model, processor = load_trained(model_path, dtype=dtype, merge=True)
    elif (model_path / "config.json").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        processor = build_processor(
            tokenizer, chexficient_image_processor(model_path), model.config.vision_config.patch_size
        )
    else:
        raise FileNotFoundError(f"--model {model_path}: neither an exported model nor a llava_rad/train.py output.")
    return model.to(device).eval(), processor


@torch.no_grad()
def generate_reports(
    model: LlavaForConditionalGeneration,
    processor: Any,
    examples: Sequence[ReportExample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Greedy findings for `examples`; returns (records, skipped) where skipped lists unreadable images. Images are
    decoded in `num_workers` DataLoader processes (0: in this one)."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    image_seq_length = model.config.image_seq_length
    pad_id = tokenizer.pad_token_id
    device = model.device
    tower_dtype = model.model.vision_tower.dtype
    records, skipped = [], []
    loader = make_image_loader([InputItem(e.id, e.image) for e in examples], image_processor, batch_size, num_workers)
    bar = tqdm(total=len(examples), desc="generate", disable=not progress)
    for batch in loader:
        for index, error in batch.failed:
            logger.warning(f"skipping unreadable image: {error}")
            skipped.append({"id": examples[index].id, "image": examples[index].image, "error": error})
        bar.update(len(batch.indices) + len(batch.failed))
        if batch.pixel_values is None:
            continue
        chunk = [examples[index] for index in batch.indices]
        prompts = [prompt_ids(tokenizer, e.instruction, image_seq_length) for e in chunk]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=batch.pixel_values.to(device, tower_dtype),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        for example, text in zip(chunk, texts):
            records.append(
                {
                    "id": example.id,
                    "image": example.image,
                    "query": example.instruction,
                    "reference": example.findings,
                    "prediction": text.strip(),
                }
            )
    bar.close()
    return records, skipped


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "exported folder or llava_rad/train.py output folder"})
    output: str = field(metadata={"help": "JSONL to write"})
    manifest: str | None = field(default=None, metadata={"help": "LLaVA-Rad .json or findings .csv to run on"})
    images: list[str] | None = field(default=None, metadata={"help": "image files (instead of a manifest)"})
    indication: str | None = field(default=None, metadata={"help": "indication for --images"})
    image_root: str | None = field(default=None, metadata={"help": "folder the manifest's image paths start from"})
    rule_based_only: bool = field(default=False, metadata={"help": "JSON manifests: LLaVA-Rad's test subset"})
    batch_size: int = field(default=8, metadata={"help": "images per generate() call"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader processes decoding the images"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest generated report"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda when available)"})
    max_samples: int | None = field(default=None, metadata={"help": "only the first N examples"})

    def __post_init__(self):
        if (self.manifest is None) == (self.images is None):
            raise ValueError("give either --manifest or --images.")
        torch_dtype(self.dtype, "--dtype")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.manifest is not None:
        kwargs: dict[str, Any] = {"require_findings": False} if args.manifest.endswith(".csv") else {}
        if args.manifest.endswith(".json"):
            kwargs["rule_based_only"] = args.rule_based_only
        examples = load_examples(args.manifest, args.image_root, **kwargs)
    else:
        examples = [ReportExample(id=Path(p).stem, image=p, indication=args.indication) for p in args.images]
    examples = examples[: args.max_samples] if args.max_samples else examples
    model, processor = load_for_generation(args.model, torch_dtype(args.dtype), device)
    records, skipped = generate_reports(
        model,
        processor,
        examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_workers=args.num_workers,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in records))
    skipped_path = output.with_suffix(".skipped.jsonl")
    if skipped:
        skipped_path.write_text("".join(json.dumps(s) + "\n" for s in skipped))
        print(f"skipped {len(skipped)} unreadable images, listed in {skipped_path}")
    print(f"wrote {len(records)} reports to {output}")
    return {"records": records, "skipped": skipped}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
