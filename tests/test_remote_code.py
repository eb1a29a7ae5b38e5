"""A saved folder loads through the Auto classes in a fresh process where this project is not importable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from helpers import run_without_project
from safetensors.torch import load_file

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


ROOT = Path(__file__).resolve().parent.parent
# Beyond the hidden project names: no editable-install finder and no checkout on sys.path, so that a root file the
# saved folder lacks cannot be found anywhere else (each name is tried, and must fail).
WITHOUT_CHECKOUT = """
    import importlib
    import os

    checkout = os.path.realpath(sys.argv[-1])
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p and os.path.realpath(p or ".") != checkout]
    sys.path_importer_cache.clear()
    for name in ("chexficient", "image_decoding_chexficient", "image_processing_chexficient", "modeling_chexficient"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        sys.exit(f"{name} is importable from the checkout: the test would prove nothing")
"""
LOAD_WITH_AUTO_CLASSES = """
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor

    folder, image_path, without_decoding = sys.argv[1], sys.argv[2], sys.argv[4]
    try:
        AutoImageProcessor.from_pretrained(without_decoding, trust_remote_code=True)
    except (ImportError, OSError):
        pass
    else:
        sys.exit("a folder without image_decoding_chexficient.py loaded: the decoding came from elsewhere")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "CheXficientModel", type(model)
    assert type(image_processor).__name__ == "CheXficientImageProcessor", type(image_processor)
    assert type(processor).__name__ == "CheXficientProcessor", type(processor)
    decoding = sys.modules[type(image_processor).__module__].load_image.__module__
    assert decoding.startswith("transformers_modules.") and decoding.endswith(".image_decoding_chexficient"), decoding
    assert os.path.realpath(sys.modules[decoding].__file__).startswith(os.path.realpath(os.environ["HF_MODULES_CACHE"]))
    assert "image_decoding_chexficient" not in sys.modules
    inputs = processor(text=["no pleural effusion", "small right pneumothorax"], images=[image_path, image_path])
    alone = image_processor(image_path)["pixel_values"]
    assert torch.equal(alone[0], inputs["pixel_values"][0])
    with torch.no_grad():
        out = model(**inputs)
        probs = model.zero_shot_classify(["Pneumothorax", "No Finding"], processor.tokenizer, image_embeds=out.image_embeds)
    save_file(
        {"logits": out.logits_per_image.contiguous(), "pixel_values": inputs["pixel_values"].contiguous(),
         "input_ids": inputs["input_ids"].contiguous(), "probs": probs.contiguous()},
        sys.argv[3],
    )
"""
ZERO_SHOT_PIPELINE = """
    import json
    from transformers import pipeline

    folder, image_path = sys.argv[1], sys.argv[2]
    classify = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    assert type(classify.model).__name__ == "CheXficientModel", type(classify.model)
    result = classify(image_path, candidate_labels=["pneumothorax", "pleural effusion", "normal"], hypothesis_template="{}")
    with open(sys.argv[3], "w") as handle:
        json.dump(result, handle)
"""


def _saved_folder(tmp_path, config, tokenizer):
    import PIL.Image

    folder = tmp_path / "model"
    model = CheXficientModel(config).eval()
    processor = CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_path = tmp_path / "cxr.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((40, 32)) * 255).astype(np.uint8)).save(image_path)
    return model, processor, folder, image_path


def test_auto_classes_load_in_a_clean_process(tmp_path, config, tokenizer):
    model, processor, folder, image_path = _saved_folder(tmp_path, config, tokenizer)
    code = {path.name for path in folder.glob("*.py")}
    assert code == {
        "configuration_chexficient.py",
        "modeling_chexficient.py",
        "image_processing_chexficient.py",
        "image_decoding_chexficient.py",
        "processing_chexficient.py",
    }
    assert (folder / "image_decoding_chexficient.py").read_bytes() == (
        ROOT / "image_decoding_chexficient.py"
    ).read_bytes()
    without_decoding = tmp_path / "without_decoding"
    shutil.copytree(folder, without_decoding)
    (without_decoding / "image_decoding_chexficient.py").unlink()
    output = tmp_path / "out.safetensors"
    run_without_project(
        WITHOUT_CHECKOUT + LOAD_WITH_AUTO_CLASSES,
        folder,
        image_path,
        output,
        without_decoding,
        ROOT,
        workdir=tmp_path / "elsewhere",
    )

    remote = load_file(output)
    inputs = processor(text=["no pleural effusion", "small right pneumothorax"], images=[image_path, image_path])
    torch.testing.assert_close(remote["pixel_values"], inputs["pixel_values"])
    torch.testing.assert_close(remote["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        out = model(**inputs)
        probs = model.zero_shot_classify(["Pneumothorax", "No Finding"], tokenizer, image_embeds=out.image_embeds)
    torch.testing.assert_close(remote["logits"], out.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote["probs"], probs, atol=1e-6, rtol=1e-6)


def test_processor_pads_right_and_truncates(tokenizer):
    processor = CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tokenizer, max_length=6)
    batch = processor(text=["no pneumothorax", "the heart size is normal and the lungs are clear"])
    assert batch["input_ids"].shape == (2, 6)  # truncated at max_length, padded to the longest
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]  # right padding: [CLS] no pneumothorax [SEP]
    assert batch["input_ids"][1, -1].item() == tokenizer.sep_token_id  # truncation keeps the final [SEP]


def test_processor_class_loads_a_folder_without_trusting_remote_code(tmp_path, tokenizer):
    CheXficientProcessor(
        CheXficientImageProcessor(size={"shortest_edge": 28}), tokenizer, max_length=100
    ).save_pretrained(tmp_path)
    loaded = CheXficientProcessor.from_pretrained(tmp_path)  # stdin is closed: a trust prompt would fail the test
    assert type(loaded.image_processor) is CheXficientImageProcessor
    assert loaded.image_processor.size == {"shortest_edge": 28} and loaded.max_length == 100
    assert loaded(text=["no pneumothorax"])["input_ids"].tolist() == tokenizer(["no pneumothorax"])["input_ids"]


def test_stock_zero_shot_pipeline_in_a_clean_process(tmp_path, config, tokenizer):
    model, processor, folder, image_path = _saved_folder(tmp_path, config, tokenizer)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForZeroShotImageClassification"]
    output = tmp_path / "pipeline.json"
    done = run_without_project(ZERO_SHOT_PIPELINE, folder, image_path, output, workdir=tmp_path / "elsewhere")
    assert "not supported for zero-shot-image-classification" not in done.stderr
    result = json.loads(output.read_text())
    labels = ["pneumothorax", "pleural effusion", "normal"]
    # the pipeline's protocol: a softmax over the candidate labels of the scaled image-text logits (8-bit RGB input)
    rgb = PIL.Image.open(image_path).convert("RGB")
    inputs = processor(text=labels, images=[rgb])
    with torch.no_grad():
        expected = model(**inputs).logits_per_image[0].softmax(dim=-1)
    got = {item["label"]: item["score"] for item in result}
    assert [item["label"] for item in result] == [labels[i] for i in expected.argsort(descending=True)]
    torch.testing.assert_close(torch.tensor([got[label] for label in labels]), expected, atol=1e-5, rtol=1e-4)


def test_zero_shot_pipeline_takes_a_model_object(config, tokenizer):
    from transformers import pipeline
    from transformers.pipelines import base
    from transformers.testing_utils import CaptureLogger

    model = CheXficientModel(config).eval()
    image_processor = CheXficientImageProcessor(size={"shortest_edge": 28})
    with CaptureLogger(base.logger) as captured:
        classify = pipeline(
            "zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=image_processor
        )
    assert "not supported" not in captured.out
    image = PIL.Image.fromarray((np.random.default_rng(0).random((40, 32)) * 255).astype(np.uint8)).convert("RGB")
    result = classify(image, candidate_labels=["pneumothorax", "normal"], hypothesis_template="{}")
    inputs = CheXficientProcessor(image_processor, tokenizer)(text=["pneumothorax", "normal"], images=[image])
    with torch.no_grad():
        expected = model(**inputs).logits_per_image[0].softmax(dim=-1)
    got = {item["label"]: item["score"] for item in result}
    torch.testing.assert_close(torch.tensor([got["pneumothorax"], got["normal"]]), expected, atol=1e-5, rtol=1e-4)
