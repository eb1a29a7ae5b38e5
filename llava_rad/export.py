"""Export a trained LLaVA-Rad stage as a folder that plain transformers loads (no remote code, no LLaVA fork).

    python -m llava_rad.export --checkpoint outputs/llava_rad/stage2 --output outputs/llava_rad/export --dtype bfloat16

    from transformers import LlavaForConditionalGeneration, pipeline
    model = LlavaForConditionalGeneration.from_pretrained("outputs/llava_rad/export")
    pipe = pipeline("image-text-to-text", model="outputs/llava_rad/export")

Stage 2's LoRA is merged into the language model (`merge_and_unload`) and its trained projector replaces the
untrained one; `--merge false` instead saves the assembled base model and the adapter in `adapter/`
(`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(OUT), OUT + "/adapter")` gives the merged
export's logits; tests/test_llava_rad_zero3.py checks it). The base holds the LM without LoRA and the trained projector
(PEFT's `unload` keeps the adapter's copy), so it also runs on its own, without the LoRA.

The processor keeps the CheXficient preprocessing. `--image_processor stock` (the default) saves it as transformers'
`LlavaImageProcessorPil` with the same settings (shortest edge, bicubic, centre crop, OpenAI-CLIP mean/std), so that
`AutoProcessor` and `pipeline` need no remote code. It matches CheXficient's processor on 8-bit images except that
its centre crop rounds half-pixel offsets down (one row/column of shift for some aspect ratios) and it does not
read DICOM or keep 16-bit depth. `--image_processor chexficient` saves CheXficient's own processor (exact, DICOM and
16-bit), which `AutoProcessor` then loads with `trust_remote_code=True`. llava_rad/generate.py always uses the
CheXficient processor, whatever the folder holds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import HfArgumentParser, LlavaForConditionalGeneration, LlavaProcessor

from chexficient.runtime import torch_dtype
from llava_rad.model import IMAGE_PROCESSOR_FIELDS, LlavaRadSources, build_llava_rad, load_projector
from llava_rad.prompt import save_prompt


def load_trained(
    checkpoint: str | os.PathLike, *, dtype: torch.dtype = torch.float32, merge: bool = True
) -> tuple[Any, LlavaProcessor]:
    """The model of a llava_rad/train.py output folder: stage 1 with its projector, stage 2 with LoRA merged (or a
    PeftModel when `merge` is False), and its processor (CheXficient image processor)."""
    sources, info = LlavaRadSources.load(checkpoint)
    model, processor = build_llava_rad(sources, dtype=dtype)
    stage = info.get("stage")
    if stage == "align":
        load_projector(model, checkpoint)
    elif stage == "finetune":
        from peft import PeftModel

        adapter = Path(checkpoint) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: no adapter_config.json; did stage 2 finish?")
        model = PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    else:
        raise ValueError(f"{checkpoint}/llava_rad.json: unknown stage {stage!r}.")
    model.eval()
    return model, processor


def stock_image_processor(image_processor: Any) -> Any:
    """transformers' PIL-backed Llava image processor with the CheXficient processor's settings."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    settings = {name: getattr(image_processor, name) for name in IMAGE_PROCESSOR_FIELDS}
    for name, copy in (("size", dict), ("crop_size", dict), ("image_mean", list), ("image_std", list)):
        settings[name] = copy(settings[name])
    return LlavaImageProcessorPil(**settings, do_convert_rgb=True, do_pad=False)


def export(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    merge: bool = True,
    image_processor: str = "stock",
) -> Path:
    """Write the exported model, processor and generation config to `output`; returns the folder."""
    if image_processor not in ("stock", "chexficient"):
        raise ValueError(f"--image_processor must be stock or chexficient, got {image_processor!r}.")
    output = Path(output)
    model, processor = load_trained(checkpoint, dtype=dtype, merge=merge)
    if image_processor == "stock":
        processor = LlavaProcessor(
            image_processor=stock_image_processor(processor.image_processor),
            tokenizer=processor.tokenizer,
            patch_size=processor.patch_size,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
            num_additional_image_tokens=processor.num_additional_image_tokens,
        )
    if merge or isinstance(model, LlavaForConditionalGeneration):
        model.config.use_cache = True
        model.save_pretrained(output)
    else:
        base = model.get_base_model()
        base.config.use_cache = True
        model.save_pretrained(output / "adapter")
        model.unload().save_pretrained(output)  # the base without LoRA layers
    processor.save_pretrained(output)
    save_prompt(output)  # the instruction, for clients that build prompts from the folder alone (the Space)
    return output


@dataclass
class ExportArguments:
    checkpoint: str = field(metadata={"help": "llava_rad/train.py output folder (stage 2, or stage 1)"})
    output: str = field(metadata={"help": "folder to write"})
    merge: bool = field(default=True, metadata={"help": "merge LoRA into the LM (False: base + adapter/)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    image_processor: str = field(default="stock", metadata={"help": "stock (no remote code) or chexficient"})


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    folder = export(
        args.checkpoint,
        args.output,
        dtype=torch_dtype(args.dtype),
        merge=args.merge,
        image_processor=args.image_processor,
    )
    print(f"exported to {folder}: LlavaForConditionalGeneration.from_pretrained({str(folder)!r})")
    return folder


if __name__ == "__main__":
    main()
