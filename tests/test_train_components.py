"""Loss, optimizer groups, schedule, data loading and tower initialisation of train/."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TINY_WORDS

from chexficient.curation.loss import curated_clip_loss, gather_with_grad
from chexficient.data.manifests import report_text
from chexficient.data.pairs import ImageReportCollator, ImageReportDataset, load_pairs
from train.init_towers import load_pretrained_towers, resize_position_embeddings
from train.optim import CurationAwareCosine, build_optimizer_and_schedule, parameter_groups
from train.tokenizer import build_report_tokenizer

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel


# ----- loss ---------------------------------------------------------------------------------------------------------


def test_curated_loss_equals_model_loss_on_one_process(config):
    model = CheXficientModel(config).eval()
    input_ids = torch.randint(5, 64, (4, 6))
    pixel_values = torch.randn(4, 3, 28, 28)
    out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    loss = curated_clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
    torch.testing.assert_close(loss, out.loss)
    keep = torch.tensor([True, False, True, True])
    subset = model(input_ids=input_ids[keep], pixel_values=pixel_values[keep], return_loss=True).loss
    torch.testing.assert_close(curated_clip_loss(out.image_embeds, out.text_embeds, out.logit_scale, keep), subset)


def _gathered_gradient(rank: int, world_size: int, port: int, features, targets, queue) -> None:
    """Rank `rank` of the gathered-loss step; rank 0 sends the averaged gradients back as plain lists (a tensor on
    a queue is shared memory that dies with its process, which may exit before the parent reads it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    features, targets = torch.tensor(features), torch.tensor(targets)
    torch.manual_seed(0)
    layer = torch.nn.Linear(features.shape[1], 8)
    local = slice(rank * 3, (rank + 1) * 3)
    image = gather_with_grad(F.normalize(layer(features[local]), dim=-1))
    text = gather_with_grad(F.normalize(targets[local], dim=-1))
    curated_clip_loss(image, text, torch.tensor([math.log(10.0)])).backward()
    for p in layer.parameters():  # what DDP does: average over ranks
        dist.all_reduce(p.grad)
        p.grad /= world_size
    if rank == 0:
        queue.put([p.grad.tolist() for p in layer.parameters()])
    dist.destroy_process_group()


def test_gathered_loss_gives_the_single_process_gradient():
    torch.manual_seed(1)
    features, targets = torch.randn(6, 5), torch.randn(6, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_gathered_gradient, args=(r, 2, port, features.tolist(), targets.tolist(), queue))
        for r in range(2)
    ]
    for p in processes:
        p.start()
    distributed = [torch.tensor(g) for g in queue.get(timeout=120)]
    for p in processes:
        p.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 8)
    loss = curated_clip_loss(
        F.normalize(layer(features), dim=-1), F.normalize(targets, dim=-1), torch.tensor([math.log(10.0)])
    )
    loss.backward()
    for expected, got in zip((layer.weight.grad, layer.bias.grad), distributed, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_accumulate_step_takes_its_gradient_step_on_the_selection_only(config, tokenizer):
    """Accumulate mode (the paper's single-GPU mode): no-grad embeddings of the whole pool in chunks, then one
    forward with gradients of the selected pairs only, whose loss and gradients are those of the selection alone."""
    from chexficient.curation import CurationConfig, PrototypeCurator
    from train.loop import accumulate_step

    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    model = CheXficientModel(config)
    texts = [" ".join(TINY_WORDS[(i * 7 + j * 3) % len(TINY_WORDS)] for j in range(5)) for i in range(40)]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["pixel_values"] = torch.randn(40, 3, 28, 28)
    batch["valid"] = torch.arange(40) % 9 != 4  # unreadable images never enter the step
    batch["sample_index"] = torch.arange(100, 140)
    curator = PrototypeCurator(CurationConfig(num_prototypes=3, max_per_cluster=2), num_samples=200)
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    curator.initialize(out.image_embeds, out.text_embeds, generator=torch.Generator().manual_seed(0))

    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((torch.is_grad_enabled(), len(kwargs["pixel_values"]))),
        with_kwargs=True,
    )
    result = accumulate_step(model, batch, curator, seed=0, step=0, chunk_size=16)
    keep = result.keep
    assert 0 < keep.sum() < batch["valid"].sum() and not (keep & ~batch["valid"]).any()
    assert [size for grad, size in calls if not grad] == [16, 16, 8]  # the pool, embedded in chunks
    assert [size for grad, size in calls if grad] == [int(keep.sum())]  # the step: the selection only
    assert torch.equal(curator.curated_ids(), batch["sample_index"][keep])
    assert result.kept_features.shape == (int(keep.sum()), 2 * config.projection_dim)
    result.loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    selected = model(**{k: batch[k][keep] for k in ("input_ids", "attention_mask", "pixel_values")})
    expected = curated_clip_loss(selected.image_embeds, selected.text_embeds, selected.logit_scale)
    torch.testing.assert_close(result.loss, expected)
    expected.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, msg=name)


# ----- optimizer and schedule ---------------------------------------------------------------------------------------


def test_weight_decay_exclusions(config):
    model = CheXficientModel(config)
    decay, no_decay = parameter_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {
        "logit_scale",
        "vision_model.embeddings.position_embeddings",
        "vision_model.embeddings.cls_token",
    } <= no_decay_names
    assert "visual_projection.weight" in decay_names and "text_projection.weight" in decay_names
    assert not any(n.endswith(".bias") for n in decay_names)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0


def test_cosine_schedule_is_continuous_when_the_horizon_is_fixed():
    schedule = CurationAwareCosine(estimated_total_steps=100, min_ratio=0.1)
    assert schedule(0) == pytest.approx(1.0)
    before = schedule(20)
    schedule.finalize(step=20, remaining_steps=10)  # curation kept far fewer pairs than estimated
    assert schedule(20) == pytest.approx(before)
    values = [schedule(s) for s in range(20, 31)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # still decreasing
    assert schedule(30) == pytest.approx(0.1) and schedule(40) == pytest.approx(0.1)  # ends at min_lr, no rebound
    warm = CurationAwareCosine(estimated_total_steps=10, warmup_steps=4)
    assert [round(warm(s), 2) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_schedule_state_survives_lambdalr_checkpointing(config):
    model = CheXficientModel(config)
    optimizer, scheduler, schedule = build_optimizer_and_schedule(
        model, learning_rate=1e-3, min_learning_rate=1e-4, weight_decay=0.0, estimated_total_steps=50
    )
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    schedule.finalize(5, 7)
    state = scheduler.state_dict()
    _, scheduler2, schedule2 = build_optimizer_and_schedule(
        model, learning_rate=1e-3, min_learning_rate=1e-4, weight_decay=0.0, estimated_total_steps=50
    )
    scheduler2.load_state_dict(state)
    assert schedule2.finalized_at == 5 and schedule2.remaining_steps == 7
    assert schedule2(9) == pytest.approx(schedule(9))


# ----- data -----------------------------------------------------------------------------------------------------------


def _write_manifest(tmp_path, rows, header="id,path,findings,impression"):
    lines = [header] + [",".join(row) for row in rows]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_pairs_skip_empty_reports_and_corrupt_images(tmp_path, tokenizer):
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        PIL.Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)).save(
            tmp_path / "img" / f"{name}.png"
        )
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    manifest = _write_manifest(
        tmp_path,
        [
            ("a", "img/a.png", "Small left effusion.", "Effusion."),
            ("b", "img/b.png", "", ""),
            ("c", "img/c.png", "Lungs are clear.", ""),
            ("d", "img/bad.png", "Heart size is normal.", "No acute process."),
        ],
    )
    pairs = load_pairs(manifest)
    assert pairs.ids == ["a", "c", "d"] and pairs.skipped == [("b", "empty report")]
    assert pairs.texts[0] == "Small left effusion. Effusion."
    dataset = ImageReportDataset(pairs, CheXficientImageProcessor(size={"shortest_edge": 28}))
    batch = ImageReportCollator(tokenizer, (28, 28))([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    assert batch["valid"].tolist() == [True, True, False]
    assert batch["skipped"][0][0] == "d" and "not a recognised image" in batch["skipped"][0][1]
    assert batch["input_ids"].shape[0] == 3 and batch["sample_index"].tolist() == [0, 1, 2]


def test_manifest_errors_name_the_column_and_file(tmp_path):
    manifest = _write_manifest(tmp_path, [("a", "x.png", "text")], header="id,path,report_text")
    with pytest.raises(ValueError, match="no report text column") as info:
        load_pairs(manifest)
    assert "pairs.csv" in str(info.value)
    with pytest.raises(ValueError, match="missing image column 'image'"):
        load_pairs(manifest, image_column="image")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_pairs(tmp_path / "nope.csv")


def test_report_text_joins_findings_and_impression():
    assert report_text("Line one.\nLine two.", float("nan")) == "Line one. Line two."
    assert report_text(None, "Impression.") == "Impression."


def test_report_tokenizer_trains_offline():
    tokenizer = build_report_tokenizer(["No pleural effusion.", "Moderate cardiomegaly."] * 5, vocab_size=80)
    ids = tokenizer("No pleural effusion.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids


# ----- tower initialisation -------------------------------------------------------------------------------------------


def test_towers_start_from_local_pretrained_weights(tmp_path, config):
    from transformers import BertModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    vision_values = config.vision_config.to_dict()
    vision_values.update(image_size=56, num_register_tokens=4)  # pretrained at a larger grid, with registers
    for key in ("model_type", "transformers_version"):
        vision_values.pop(key, None)
    registers = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**vision_values))
    registers.save_pretrained(tmp_path / "dinov2")
    bert = BertModel(config.text_config, add_pooling_layer=True)
    bert.save_pretrained(tmp_path / "bert")
    model = CheXficientModel(config)
    load_pretrained_towers(model, str(tmp_path / "dinov2"), str(tmp_path / "bert"))
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight
    )
    torch.testing.assert_close(model.vision_model.layernorm.weight, registers.layernorm.weight)
    torch.testing.assert_close(model.vision_model.embeddings.cls_token, registers.embeddings.cls_token)
    assert model.vision_model.embeddings.position_embeddings.shape == (1, 1 + 4, 32)


def test_position_embedding_resize_keeps_cls_and_smooth_grids():
    grid = torch.linspace(0, 1, 16).view(1, 4, 4, 1).expand(1, 4, 4, 2).reshape(1, 16, 2)
    embeds = torch.cat([torch.full((1, 1, 2), 7.0), grid], dim=1)
    resized = resize_position_embeddings(embeds, 2)
    assert resized.shape == (1, 5, 2) and torch.equal(resized[:, 0], embeds[:, 0])
    assert resize_position_embeddings(embeds, 4) is embeds


def test_datasets_source_and_label_only_pseudo_reports(tmp_path, tokenizer):
    import datasets

    images = [PIL.Image.fromarray(np.full((40, 30), v, dtype=np.uint8)) for v in (10, 120, 240)]
    table = datasets.Dataset.from_dict(
        {
            "image": images,
            "id": ["p1", "p2", "p3"],
            "Cardiomegaly": [1.0, 0.0, None],
            "Edema": [0.0, -1.0, 1.0],
        }
    )
    table.save_to_disk(tmp_path / "arrow")
    mapped = datasets.load_from_disk(tmp_path / "arrow")  # memory-mapped Arrow, decoded one row at a time
    pairs = load_pairs(mapped, image_column="image", label_columns=["Cardiomegaly", "Edema"])
    assert pairs.ids == ["p1", "p2", "p3"] and pairs.images == [0, 1, 2]
    assert "cardiomegaly" in pairs.texts[0].lower() and "edema" in pairs.texts[0].lower()
    assert "cardiomegaly" not in pairs.texts[2].lower()  # missing label: no sentence
    assert pairs.texts == load_pairs(mapped, image_column="image", label_columns=["Cardiomegaly", "Edema"]).texts
    dataset = ImageReportDataset(pairs, CheXficientImageProcessor(size={"shortest_edge": 28}))
    batch = ImageReportCollator(tokenizer, (28, 28))([dataset[i] for i in range(3)])
    assert batch["valid"].all() and batch["pixel_values"].shape == (3, 3, 28, 28)
    assert batch["pixel_values"][0].mean() < batch["pixel_values"][2].mean()  # the images came through in order
    with pytest.raises(ValueError, match="missing label column"):
        load_pairs(mapped, image_column="image", label_columns=["Pneumothorax"])
