"""LLaVA-Rad on CheXficient with a tiny Dinov2 tower (28 px, patch 14: 4 image tokens) and a tiny Llama, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import llava_train_args, save_tiny_model
from transformers import LlavaForConditionalGeneration

from llava_rad import train as train_script
from llava_rad.data import (
    IGNORE_INDEX,
    LlavaRadCollator,
    LlavaRadDataset,
    NoAnswerError,
    ReportExample,
    load_findings_csv,
    load_llava_rad_json,
    prepare_mimic_findings,
    tokenize_example,
    write_examples_csv,
)
from llava_rad.demo import save_tiny_language_model
from llava_rad.model import LlavaRadSources, build_llava_rad, num_image_tokens, vision_features
from llava_rad.prompt import IMAGE_TOKEN, INSTRUCTION, build_instruction, conversation_text


FINDINGS = [
    "The heart is enlarged. No pleural effusion.",
    "The lungs are clear. No pneumothorax.",
    "There is a small left pleural effusion.",
    "A nodule in the right upper lung. No edema.",
]
INDICATIONS = ["Shortness of breath.", None, "Fever and cough after a long trip abroad.", "Chest pain."]


def phantom_image(seed: int, size: int = 40) -> np.ndarray:
    """A smooth random grayscale image (uint8)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((5, 5))
    image = PIL.Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(image)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A tiny CheXficient, a tiny Llama with its tokenizer, and a 4-example overfit set (+ one unreadable image)."""
    root = tmp_path_factory.mktemp("llava_rad")
    torch.manual_seed(0)
    save_tiny_model(root / "chexficient")
    save_tiny_language_model(root / "llama", FINDINGS, vocab_size=320, train_steps=200)
    images = root / "images"
    images.mkdir()
    examples = []
    for i, (findings, indication) in enumerate(zip(FINDINGS, INDICATIONS)):
        PIL.Image.fromarray(phantom_image(i)).save(images / f"{i}.png")
        examples.append(ReportExample(f"s{i}", f"images/{i}.png", findings, indication))
    write_examples_csv(examples, root / "train.csv")
    (images / "broken.png").write_bytes(b"not an image")
    write_examples_csv([*examples, ReportExample("bad", "images/broken.png", "No edema.")], root / "with_bad.csv")
    return {"root": root, "chexficient": root / "chexficient", "llama": root / "llama", "train": root / "train.csv"}


def sources(parts) -> LlavaRadSources:
    return LlavaRadSources(chexficient=str(parts["chexficient"]), language_model=str(parts["llama"]))


def train_args(parts, output: Path, stage: str, **overrides) -> list[str]:
    options = {"per_device_batch_size": 4, "num_workers": 0, "logging_steps": 100, "cpu": True, "seed": 0}
    return llava_train_args(parts, output, stage, **{**options, **overrides})


def batch_of(dataset, size: int = 4) -> dict:
    batch = LlavaRadCollator(dataset.tokenizer.pad_token_id)([dataset[i] for i in range(size)])
    batch.pop("ids")
    return batch


# ----- model -------------------------------------------------------------------------------------------------------


def test_build_copies_the_encoder_exactly_and_matches_llava_rad_features(parts):
    from modeling_chexficient import CheXficientModel

    chexficient = CheXficientModel.from_pretrained(parts["chexficient"])
    model, processor = build_llava_rad(sources(parts))
    expected, got = chexficient.vision_model.state_dict(), model.model.vision_tower.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    config = model.config
    assert config.vision_config.model_type == "dinov2"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_seq_length == 4 and config.projector_hidden_act == "gelu"
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (32, 32)

    # LLaVA-Rad's path: block 11 of 12 (hidden_states[-2]) without the final LayerNorm, CLS dropped, mlp2x_gelu
    pixel_values = processor.image_processor([phantom_image(0), phantom_image(1)])["pixel_values"]
    hidden = chexficient.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(vision_features(model, pixel_values), hidden)
    projected = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(hidden)))
    image_features = torch.cat(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    torch.testing.assert_close(image_features, projected.flatten(0, 1))

    # the processor expands <image> to the 4 patch tokens
    encoded = processor(
        images=PIL.Image.fromarray(phantom_image(0)), text=f"{IMAGE_TOKEN}\nfindings", return_tensors="pt"
    )
    assert int((encoded["input_ids"] == config.image_token_id).sum()) == 4


def test_released_sizes_give_729_tokens_and_a_768_4096_4096_projector():
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from configuration_chexficient import RELEASED_VISION_CONFIG
    from image_processing_chexficient import CheXficientImageProcessor

    vision = Dinov2Config(**RELEASED_VISION_CONFIG)
    assert num_image_tokens(CheXficientImageProcessor(), vision.patch_size) == 729
    with torch.device("meta"):
        hidden = Dinov2Model(vision)(torch.zeros(1, 3, 378, 378), output_hidden_states=True).hidden_states
        config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008))
        projector = LlavaMultiModalProjector(config)
    assert len(hidden) == 13 and hidden[-2].shape == (1, 1 + 729, 768)
    assert projector.linear_1.weight.shape == (4096, 768) and projector.linear_2.weight.shape == (4096, 4096)


def test_chat_template_is_the_training_prompt(parts):
    _, processor = build_llava_rad(sources(parts))
    instruction = build_instruction("Cough.\nFever.")
    assert instruction.endswith("given the following indication: Cough. Fever.")
    prompt, answer = conversation_text(instruction, "No effusion.")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    rendered = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert rendered == prompt
    assert prompt.startswith("A chat between a curious user") and prompt.endswith(
        f"USER: {IMAGE_TOKEN}\n{instruction} ASSISTANT:"
    )
    assistant = {"role": "assistant", "content": [{"type": "text", "text": "No effusion."}]}
    assert processor.apply_chat_template([user, assistant], tokenize=False) == prompt + answer


# ----- data --------------------------------------------------------------------------------------------------------


def test_labels_cover_only_the_answer(parts):
    _, processor = build_llava_rad(sources(parts))
    tokenizer = processor.tokenizer
    for template, expected in (("v1", "No pleural effusion.</s>"), ("plain", "No pleural effusion.\n")):
        item = tokenize_example(tokenizer, INSTRUCTION, "No pleural effusion.", 4, template)
        ids, labels = item["input_ids"], item["labels"]
        assert int((ids == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum()) == 4
        assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
        answer = tokenizer.decode(ids[labels != IGNORE_INDEX])
        assert answer.strip() == expected.strip() or answer == expected
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[-len(labels[labels != IGNORE_INDEX]) :])
        prompt_only = tokenizer.decode(ids[labels == IGNORE_INDEX], skip_special_tokens=True)
        assert "pleural" not in prompt_only
    short = tokenize_example(tokenizer, INSTRUCTION, "No pleural effusion.", 4, "plain", max_length=7)
    assert short["input_ids"].numel() == 7
    with pytest.raises(ValueError, match="image tokens"):
        tokenize_example(tokenizer, INSTRUCTION, "x", 4, "plain", max_length=3)


def test_truncation_that_leaves_no_answer_is_skipped_not_trained_on(parts):
    _, processor = build_llava_rad(sources(parts))
    tokenizer = processor.tokenizer
    full = tokenize_example(tokenizer, INSTRUCTION, "No pleural effusion.", 4, "v1")
    prompt_length = int((full["labels"] == IGNORE_INDEX).sum())  # everything before the first answer token
    with pytest.raises(NoAnswerError, match="no answer token"):
        tokenize_example(tokenizer, INSTRUCTION, "No pleural effusion.", 4, "v1", max_length=prompt_length)
    one = tokenize_example(tokenizer, INSTRUCTION, "No pleural effusion.", 4, "v1", max_length=prompt_length + 1)
    assert int((one["labels"] != IGNORE_INDEX).sum()) == 1
    long_indication = "cough " * 40  # pushes this example's answer past max_length
    examples = [
        ReportExample("long", "a.png", "No pleural effusion.", indication=long_indication),
        ReportExample("short", "b.png", "No pleural effusion."),
    ]
    store = {"long": torch.zeros(4, 8), "short": torch.ones(4, 8)}  # a feature store is a mapping id -> features
    dataset = LlavaRadDataset(examples, tokenizer, 4, feature_store=store, template="v1", max_length=prompt_length + 3)
    item = dataset[0]
    assert item["id"] == "short" and torch.equal(item["image_features"], store["short"])
    assert list(dataset.skipped) == ["long"] and "no answer token" in dataset.skipped["long"]
    assert int((item["labels"] != IGNORE_INDEX).sum()) > 0


def test_llava_rad_json_is_prepared_like_llava_rad(tmp_path):
    entries = [
        {"id": "a", "image": "mimic/p10/x.jpg", "view": "PA", "reason": "Cough.\nFever", "generate_method": "gpt4",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "No effusion."}]},
        {"id": "b", "image": "mimic/p10/y.jpg", "view": "LATERAL", "generate_method": "rule-based",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "No effusion."}]},
        {"id": "c", "image": "mimic/p10/z.jpg", "view": "AP", "generate_method": "rule-based",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": None}]},
        {"id": "d", "image": "mimic/p11/w.jpg", "view": "AP", "generate_method": "rule-based",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Clear lungs."}]},
    ]  # fmt: skip
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(entries))
    examples = load_llava_rad_json(path, "/data/mimic-cxr-jpg")
    assert [e.id for e in examples] == ["a", "d"]  # lateral and no-findings entries dropped
    assert examples[0].image == "/data/mimic-cxr-jpg/p10/x.jpg"
    assert examples[0].instruction.endswith("indication: Cough. Fever") and examples[1].instruction == INSTRUCTION
    assert [e.id for e in load_llava_rad_json(path, rule_based_only=True)] == ["d"]
    path.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(ValueError, match=r"chat.json entry 0: missing field 'image'"):
        load_llava_rad_json(path)
    (tmp_path / "bad.csv").write_text("path,report\na.png,x\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing findings column 'findings'"):
        load_findings_csv(tmp_path / "bad.csv")


def test_mimic_findings_keep_frontal_views_with_findings(tmp_path):
    (tmp_path / "meta.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd1,10000032,50414267,PA\nd2,10000032,50414267,LATERAL\n"
        "d3,11000011,51111111,AP\nd4,12000012,52222222,AP\n"
    )
    (tmp_path / "sections.csv").write_text(
        'study,impression,findings\ns50414267,ok,"Heart size normal.\nNo effusion."\ns51111111,ok,\n'
        "s52222222,ok,Lungs clear.\n"
    )
    (tmp_path / "split.csv").write_text("dicom_id,split\nd1,test\nd2,test\nd3,test\nd4,train\n")
    examples = prepare_mimic_findings(
        tmp_path / "meta.csv", tmp_path / "sections.csv", split_csv=tmp_path / "split.csv", split="test"
    )
    assert [(e.image, e.findings) for e in examples] == [
        ("files/p10/p10000032/s50414267/d1.jpg", "Heart size normal. No effusion.")
    ]


# ----- training ----------------------------------------------------------------------------------------------------


def grads_after_one_step(parts, stage: str) -> tuple[set[str], set[str]]:
    """(parameters that received a gradient, parameters meant to train) after one backward."""
    model, processor = build_llava_rad(sources(parts))
    examples = load_findings_csv(parts["train"], parts["root"])
    dataset = LlavaRadDataset(examples, processor.tokenizer, 4, image_processor=processor.image_processor)
    lora = train_script.LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model_args = train_script.ModelArguments(chexficient="x", gradient_checkpointing=True)
    module = train_script.LlavaRadForTraining(train_script.setup_stage(model, model_args, lora, stage))
    module(**batch_of(dataset)).loss.backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return with_grad, set(train_script.trainable_parameter_names(module))


def test_stage1_gradients_reach_the_projector_only(parts):
    with_grad, trainable = grads_after_one_step(parts, "align")
    assert with_grad == trainable
    assert trainable == {
        f"model.model.multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")
    }


def test_stage2_gradients_reach_lora_on_the_lm_and_the_projector_only(parts):
    with_grad, trainable = grads_after_one_step(parts, "finetune")
    assert with_grad <= trainable and len(with_grad) >= len(trainable) // 2  # lora_B starts at 0: A gets no grad
    lora = {n for n in trainable if ".lora_" in n}
    projector = trainable - lora
    assert all("language_model.layers" in n for n in lora)
    modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(lora) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
    assert projector and all("multi_modal_projector.modules_to_save" in n for n in projector)
    assert not any("vision_tower" in n or "embed_tokens" in n or "lm_head" in n for n in with_grad)


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory) -> dict:
    """Stage 1 then stage 2 (from stored features) on the 4-example overfit set."""
    out = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    stage1 = train_script.main(
        train_args(parts, out / "stage1", "align", num_epochs=25, learning_rate=3e-2, warmup_ratio=0.0)
    )
    stage2 = train_script.main(
        train_args(
            parts,
            out / "stage2",
            "finetune",
            train_data=parts["root"] / "with_bad.csv",
            projector_path=out / "stage1",
            features_dir=out / "features",
            feature_dtype="float32",
            num_epochs=40,
            learning_rate=1e-2,
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            gradient_checkpointing=True,
        )
    )
    return {"stage1": stage1, "stage2": stage2, "out": out}


def test_both_stages_run_and_the_loss_falls(trained):
    stage1, stage2, out = trained["stage1"], trained["stage2"], trained["out"]
    assert stage1["steps"] == 25 and stage2["steps"] == 40
    assert np.mean(stage1["losses"][-3:]) < 0.8 * np.mean(stage1["losses"][:3])
    assert np.mean(stage2["losses"][-3:]) < 0.5 * np.mean(stage2["losses"][:3])
    assert (out / "stage1" / "projector.safetensors").is_file()
    assert (out / "stage2" / "adapter" / "adapter_model.safetensors").is_file()
    index = json.loads((out / "features" / "index.json").read_text())
    assert index["skipped"] == ["bad"] and len(index["shards"]) == 4  # the unreadable image is reported


def test_a_killed_stage_resumes_from_its_last_complete_checkpoint(parts, tmp_path):
    from safetensors.torch import load_file

    from chexficient.runtime.checkpoints import COMPLETE_MARKER

    common = {"num_epochs": 3, "per_device_batch_size": 2, "learning_rate": 3e-2, "warmup_ratio": 0.0}  # 6 steps
    straight = train_script.main(train_args(parts, tmp_path / "straight", "align", **common))
    run = tmp_path / "killed"
    train_script.main(train_args(parts, run, "align", save_steps=1, **common))
    # what a kill during the save of step 4 leaves: complete checkpoints up to step 3, step 4 without its marker
    checkpoints = run / "checkpoints"
    for step in (5, 6):
        shutil.rmtree(checkpoints / f"step-{step:08d}")
    (checkpoints / f"step-{4:08d}" / COMPLETE_MARKER).unlink()
    (run / "projector.safetensors").unlink()

    resumed = train_script.main(train_args(parts, run, "align", resume_from_checkpoint="latest", **common))
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 3  # steps 4-6, from the middle of epoch 2
    np.testing.assert_allclose(resumed["losses"], straight["losses"][3:], rtol=1e-5)
    expected = load_file(tmp_path / "straight" / "projector.safetensors")
    for name, tensor in load_file(run / "projector.safetensors").items():
        torch.testing.assert_close(tensor, expected[name])


def test_stored_features_give_the_live_tower_loss(parts, tmp_path):
    from llava_rad.features import FeatureStore, compute_feature_store, merge_feature_index, tower_fingerprint

    model, processor = build_llava_rad(sources(parts))
    examples = load_findings_csv(parts["train"], parts["root"])
    compute_feature_store(model, examples, processor.image_processor, tmp_path, batch_size=3, dtype=torch.float32)
    store = merge_feature_index(tmp_path, 1, tower_fingerprint(model))
    kwargs = {"template": "v1"}
    live = LlavaRadDataset(examples, processor.tokenizer, 4, image_processor=processor.image_processor, **kwargs)
    cached = LlavaRadDataset(examples, processor.tokenizer, 4, feature_store=FeatureStore(tmp_path), **kwargs)
    lora = train_script.LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model_args = train_script.ModelArguments(chexficient="x")
    module = train_script.LlavaRadForTraining(train_script.setup_stage(model, model_args, lora, "finetune")).eval()
    live_batch, cached_batch = batch_of(live), batch_of(cached)
    assert "pixel_values" in live_batch and "image_features" in cached_batch
    live_loss, cached_loss = module(**live_batch).loss, module(**cached_batch).loss
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-6, atol=1e-6)
    assert float(live_loss.detach()) > 0
    other, _ = build_llava_rad(sources(parts))
    torch.nn.init.zeros_(other.model.vision_tower.layernorm.weight)
    with pytest.raises(ValueError, match="another tower"):
        store.check(tower_fingerprint(other))


# ----- generation and export ---------------------------------------------------------------------------------------


def test_batched_left_padded_generation_matches_single_samples(parts):
    from llava_rad.generate import generate_reports

    model, processor = build_llava_rad(sources(parts))
    torch.nn.init.normal_(model.model.multi_modal_projector.linear_2.weight, std=1.0)  # make the image matter
    with torch.no_grad():  # a loud pad embedding: any attention to padding would change the text
        model.get_input_embeddings().weight[processor.tokenizer.pad_token_id].normal_(std=10.0)
    model.eval()
    examples = load_findings_csv(parts["root"] / "with_bad.csv", parts["root"])
    batched, skipped = generate_reports(model, processor, examples, batch_size=5, max_new_tokens=12, progress=False)
    single = [
        generate_reports(model, processor, [e], batch_size=1, max_new_tokens=12, progress=False)[0] for e in examples
    ]
    assert [s["id"] for s in skipped] == ["bad"] and "broken.png" in skipped[0]["error"]
    assert [r["prediction"] for r in batched] == [r[0]["prediction"] for r in single if r]
    assert len({len(r["query"]) for r in batched}) > 1  # prompts of different lengths were padded
    assert len({r["prediction"] for r in batched}) > 1


def test_export_loads_with_plain_transformers_and_runs_in_a_pipeline(parts, trained, tmp_path):
    from transformers import AutoProcessor, pipeline

    from llava_rad.export import export, load_trained
    from llava_rad.generate import generate_reports
    from llava_rad.generate import main as generate_main

    stage2 = trained["out"] / "stage2"
    folder = export(stage2, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert not list(folder.glob("*.py"))  # no remote code
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    merged, processor = load_trained(stage2)
    peft_model, _ = load_trained(stage2, merge=False)
    examples = load_findings_csv(parts["train"], parts["root"])
    batch = batch_of(LlavaRadDataset(examples, processor.tokenizer, 4, image_processor=processor.image_processor))
    batch.pop("labels")
    with torch.no_grad():
        reference = peft_model(**batch).logits
        torch.testing.assert_close(model(**batch).logits, reference, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in model.named_parameters())

    # generation from the exported folder = from the training output; it reproduces the overfit findings
    out = tmp_path / "preds.jsonl"
    args = ["--model", str(folder), "--manifest", str(parts["train"]), "--image_root", str(parts["root"])]
    generate_main([*args, "--output", str(out), "--max_new_tokens", "24", "--batch_size", "4"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    direct, _ = generate_reports(merged, processor, examples, max_new_tokens=24, progress=False)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in direct]
    assert sum(r["prediction"] == r["reference"] for r in rows) >= 2  # the overfit findings come back

    # the stock processor: no remote code, same pixels as CheXficient's for a square 8-bit image
    stock = AutoProcessor.from_pretrained(folder)
    image = PIL.Image.fromarray(phantom_image(0))
    np.testing.assert_allclose(
        np.asarray(stock.image_processor(image)["pixel_values"][0]),
        processor.image_processor(image)["pixel_values"][0].numpy(),
        atol=1e-5,
    )
    pipe = pipeline("image-text-to-text", model=str(folder))
    image = PIL.Image.fromarray(phantom_image(1))  # example s1, whose instruction has no indication
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": INSTRUCTION}]}
    ]
    result = pipe(text=messages, max_new_tokens=24, do_sample=False, return_full_text=False)
    assert rows[1]["query"] == INSTRUCTION and result[0]["generated_text"].strip() == rows[1]["prediction"]


# ----- metrics -----------------------------------------------------------------------------------------------------


def test_lexical_metrics_match_sacrebleu_and_rouge_score_with_a_bootstrap():
    import sacrebleu
    from rouge_score import rouge_scorer

    from chexficient.metrics import load_metric
    from llava_rad.metrics import METRIC_MODULES_DIR, evaluate_reports

    predictions = ["no pleural effusion .", "the heart is enlarged .", "small left effusion .", "lungs are clear ."]
    references = ["no pleural effusion .", "the heart is normal in size .", "small right effusion .", "clear lungs ."]
    module = load_metric("report_lexical", folder=METRIC_MODULES_DIR).compute(
        predictions=predictions, references=references
    )
    bleu4 = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = 100 * np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
    assert module["bleu4"] == pytest.approx(bleu4) and module["rougeL"] == pytest.approx(rouge)
    result = evaluate_reports(predictions, references, num_resamples=50, progress=False)["metrics"]
    assert result["bleu4"]["value"] == pytest.approx(bleu4) and result["rougeL"]["value"] == pytest.approx(rouge)
    for entry in result.values():
        assert entry["ci_low"] <= entry["median"] <= entry["ci_high"]
    assert result["bleu1"]["value"] > result["bleu4"]["value"]


def test_chexbert_bertscore_and_radgraph_need_local_files(tmp_path):
    from helpers import tiny_tokenizer
    from transformers import BertConfig, BertModel

    from llava_rad.metric_modules.chexbert_f1.chexbert_f1 import CheXbertLabeler, chexbert_f1_from_labels
    from llava_rad.metrics import evaluate_reports

    predictions, references = ["no pleural effusion", "heart enlarged"], ["no pleural effusion", "the lungs are clear"]
    bert = tmp_path / "bert"
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    BertModel(config).save_pretrained(bert)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(bert)
    labeler = CheXbertLabeler(config)
    torch.save(
        {"model_state_dict": {f"module.{k}": v for k, v in labeler.state_dict().items()}}, tmp_path / "chexbert.pth"
    )

    result = evaluate_reports(
        predictions,
        references,
        chexbert_checkpoint=tmp_path / "chexbert.pth",
        chexbert_bert=bert,
        bertscore_model=bert,
        bertscore_num_layers=1,
        num_resamples=20,
        progress=False,
    )
    assert {"f1_14_micro", "f1_5_macro", "f1_14_micro_plus", "bertscore_f1"} <= result["metrics"].keys()
    assert result["not_run"] == ["radgraph"]
    labels = CheXbertLabeler.from_checkpoint(tmp_path / "chexbert.pth", bert).label(predictions, tokenizer)
    assert labels.shape == (2, 14)

    # F1 from labels: class indices 1 positive, 3 uncertain
    predicted, reference = np.zeros((2, 14), dtype=int), np.zeros((2, 14), dtype=int)
    predicted[0, 1], reference[0, 1] = 1, 1  # Cardiomegaly found in both
    predicted[1, 9], reference[1, 4] = 1, 3  # effusion is a false positive; edema uncertain in the reference
    f1 = chexbert_f1_from_labels(predicted, reference)
    assert f1["f1_5_micro"] == pytest.approx(100 * 2 * 1 / (2 * 1 + 1))  # tp 1, fp 1, fn 0
    assert f1["f1_5_micro_plus"] == pytest.approx(100 * 2 * 1 / (2 * 1 + 1 + 1))  # the uncertain edema is missed

    with pytest.raises(ValueError, match="missing --chexbert_bert"):
        evaluate_reports(predictions, references, chexbert_checkpoint=tmp_path / "chexbert.pth")
    with pytest.raises(FileNotFoundError, match="CheXbert checkpoint .*nothing.pth does not exist"):
        evaluate_reports(predictions, references, chexbert_checkpoint=tmp_path / "nothing.pth", chexbert_bert=bert)
    with pytest.raises(FileNotFoundError, match=r"RadGraph model .*radgraph is missing config.json"):
        evaluate_reports(predictions, references, radgraph_model=tmp_path)
    with pytest.raises(FileNotFoundError, match="BERTScore model folder"):
        evaluate_reports(predictions, references, bertscore_model=tmp_path / "none", bertscore_num_layers=1)
    with pytest.raises(ValueError, match="--bertscore_num_layers"):
        evaluate_reports(predictions, references, bertscore_model=bert)
