"""The converter against an independent re-implementation of the reference model's forward pass."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from transformers import BertConfig, BertModel

from chexficient.hub.convert import build_model, convert_state_dict, load_reference_checkpoint

from modeling_chexficient import CheXficientModel


ROOT = Path(__file__).resolve().parent.parent
SUBSET = {3, 17, 42, 99}


def reference_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the reference code's key layout (fused qkv, ls gamma, BERT with pooler, buffers)."""
    gen = torch.Generator().manual_seed(seed)
    vision, text = config.vision_config, config.text_config
    hidden, mlp = vision.hidden_size, vision.hidden_size * vision.mlp_ratio
    grid = (vision.image_size // vision.patch_size) ** 2

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    sd = {
        "image_encoder.model.cls_token": rand(1, 1, hidden),
        "image_encoder.model.pos_embed": rand(1, grid + 1, hidden),
        "image_encoder.model.mask_token": torch.zeros(1, hidden),
        "image_encoder.model.patch_embed.proj.weight": rand(
            hidden, 3, vision.patch_size, vision.patch_size, scale=0.05
        ),
        "image_encoder.model.patch_embed.proj.bias": rand(hidden),
        "image_encoder.model.norm.weight": 1 + rand(hidden),
        "image_encoder.model.norm.bias": rand(hidden),
    }
    for i in range(vision.num_hidden_layers):
        block = f"image_encoder.model.blocks.{i}."
        sd.update(
            {
                block + "norm1.weight": 1 + rand(hidden),
                block + "norm1.bias": rand(hidden),
                block + "attn.qkv.weight": rand(3 * hidden, hidden),
                block + "attn.qkv.bias": rand(3 * hidden),
                block + "attn.proj.weight": rand(hidden, hidden),
                block + "attn.proj.bias": rand(hidden),
                block + "ls1.gamma": rand(hidden, scale=0.5),
                block + "norm2.weight": 1 + rand(hidden),
                block + "norm2.bias": rand(hidden),
                block + "mlp.fc1.weight": rand(mlp, hidden),
                block + "mlp.fc1.bias": rand(mlp),
                block + "mlp.fc2.weight": rand(hidden, mlp),
                block + "mlp.fc2.bias": rand(hidden),
                block + "ls2.gamma": rand(hidden, scale=0.5),
            }
        )
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(**text.to_dict()), add_pooling_layer=True)  # the reference keeps the pooler
    sd.update({"text_encoder.model." + k: v for k, v in bert.state_dict().items() if not k.endswith("_ids")})
    projection = config.projection_dim
    sd.update(
        {
            "image_projection.projection.weight": rand(projection, hidden),
            "image_projection.projection.bias": rand(projection),
            "text_projection.projection.weight": rand(projection, text.hidden_size),
            "text_projection.projection.bias": rand(projection),
            "logit_scale": torch.tensor(4.2),
            "prototypes": F.normalize(rand(config.num_prototypes, 2 * projection), dim=-1),
            # training-only bookkeeping with shapes that change during training
            "prototype_usage": rand(config.num_prototypes),
            "step_count": torch.tensor([7]),
            "batch_prototype_updates": rand(config.num_prototypes, 2 * projection),
            "batch_update_weight_stats": rand(11, 2),
            "pending_ema_features": rand(11, 2 * projection),
            "pending_ema_similarities": rand(11, config.num_prototypes),
        }
    )
    return sd


def reference_image_embeds(sd: dict[str, torch.Tensor], config, pixel_values: torch.Tensor) -> torch.Tensor:
    """The reference DINOv2 ViT forward, written from its definition (fused qkv, layerscale, pre-norm)."""
    vision = config.vision_config
    heads, eps = vision.num_attention_heads, vision.layer_norm_eps
    p = "image_encoder.model."
    x = F.conv2d(
        pixel_values, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=vision.patch_size
    )
    x = x.flatten(2).transpose(1, 2)  # [B, N, C]
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    batch, tokens, channels = x.shape
    for i in range(vision.num_hidden_layers):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (channels,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (channels // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        x = x + sd[b + "ls1.gamma"] * F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (channels,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        h = F.linear(
            F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        x = x + sd[b + "ls2.gamma"] * h
    cls = F.layer_norm(x, (channels,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)[:, 0]
    projected = F.linear(cls, sd["image_projection.projection.weight"], sd["image_projection.projection.bias"])
    return F.normalize(projected, dim=-1)


def reference_text_embeds(sd, config, input_ids, attention_mask) -> torch.Tensor:
    """The reference text path: BertModel last_hidden_state at attention_mask.sum(-1) - 1, then the linear head."""
    bert = BertModel(BertConfig(**config.text_config.to_dict()), add_pooling_layer=True).eval()
    bert.load_state_dict(
        {k[len("text_encoder.model.") :]: v for k, v in sd.items() if k.startswith("text_encoder.")}, strict=False
    )
    hidden = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    eos = hidden[torch.arange(hidden.shape[0]), attention_mask.sum(-1) - 1]
    projected = F.linear(eos, sd["text_projection.projection.weight"], sd["text_projection.projection.bias"])
    return F.normalize(projected, dim=-1)


def _save_reference_checkpoint(path: Path, sd: dict[str, torch.Tensor], **extra) -> None:
    torch.save({"model": sd, "subset": set(SUBSET), "epoch": 3, **extra}, path)


def test_converted_model_reproduces_reference_embeddings(tmp_path):
    config = tiny_config()
    sd = reference_state_dict(config)
    pixel_values = torch.randn(3, 3, 28, 28)
    input_ids = torch.randint(5, 64, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = 0

    model = build_model(sd, config)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values), reference_image_embeds(sd, config, pixel_values), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            model.get_text_features(input_ids, attention_mask),
            reference_text_embeds(sd, config, input_ids, attention_mask),
            atol=1e-5,
            rtol=0,
        )
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(4.2)
    torch.testing.assert_close(model.prototypes, sd["prototypes"])


def test_cli_writes_a_loadable_folder_with_subset(tmp_path, tokenizer):
    config = tiny_config()
    sd = reference_state_dict(config)
    checkpoint = tmp_path / "pytorch_model.pth"
    _save_reference_checkpoint(checkpoint, sd, best_acc=np.float64(0.81))  # numpy scalar: allowlisted
    config_json = tmp_path / "arch.json"
    values = config.to_dict()
    config_json.write_text(
        json.dumps({k: values[k] for k in ("vision_config", "text_config", "projection_dim", "num_prototypes")})
    )
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    output = tmp_path / "hf"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_original_checkpoint.py"),
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(output),
            "--config",
            str(config_json),
            "--tokenizer",
            str(tokenizer_dir),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_chexficient.py",
        "configuration_chexficient.py",
        "image_decoding_chexficient.py",
        "image_processing_chexficient.py",
        "processing_chexficient.py",
        "tokenizer.json",
        "curated_subset.json",
    ):
        assert (output / name).exists(), name
    subset = json.loads((output / "curated_subset.json").read_text())
    assert subset["ids"] == sorted(SUBSET) and subset["num_curated"] == len(SUBSET)
    reloaded = CheXficientModel.from_pretrained(output).eval()
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.get_image_features(pixel_values),
            reference_image_embeds(sd, config, pixel_values),
            atol=1e-5,
            rtol=0,
        )


def test_unsafe_pickle_needs_explicit_trust(tmp_path):
    config = tiny_config()
    checkpoint = tmp_path / "ckpt.pth"
    # the reference pickles its whole Config object; a Namespace stands in for it
    _save_reference_checkpoint(checkpoint, reference_state_dict(config), args=argparse.Namespace(lr=5e-5))
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_reference_checkpoint(checkpoint)
    assert "model" in load_reference_checkpoint(checkpoint, trust_pickle=True)


def test_missing_unknown_and_mismatched_keys_are_refused():
    config = tiny_config()
    sd = reference_state_dict(config)
    missing = {k: v for k, v in sd.items() if "blocks.1.mlp.fc2.weight" not in k}
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        build_model(missing, config)
    with pytest.raises(ValueError, match="unknown keys"):
        convert_state_dict({**sd, "image_encoder.model.head.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="register tokens"):
        convert_state_dict({**sd, "image_encoder.model.register_tokens": torch.zeros(1, 4, 32)})
    with pytest.raises(ValueError, match="shape mismatches"):
        build_model(sd, tiny_config(projection_dim=8))


def test_ddp_prefix_and_dropped_buffers():
    config = tiny_config()
    sd = {"module." + k: v for k, v in reference_state_dict(config).items()}
    converted = convert_state_dict(sd)
    assert "prototypes" in converted and not any("pending_ema" in k or "pooler" in k for k in converted)
    build_model(sd, config)  # loads strictly


@pytest.mark.parametrize("prefix", ["", "model."])
def test_authors_hub_layout_converts_from_safetensors(tmp_path, tokenizer, prefix):
    """The authors' Hub repo: model.safetensors in the reference module's key names (possibly under a wrapper
    prefix, possibly sharded), their own config and remote code, and the tokenizer files; no pickle is read."""
    from safetensors.torch import save_file

    from chexficient.hub.convert import convert

    config = tiny_config()
    sd = {prefix + k: v.contiguous() for k, v in reference_state_dict(config).items()}
    sd[prefix + "logit_scale"] = sd[prefix + "logit_scale"].reshape(())  # 0-dim, as the reference module holds it
    hub = tmp_path / "StanfordAIMI--CheXficient"
    hub.mkdir()
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    if prefix:  # one layout sharded, one not
        for name, shard_keys in shards.items():
            save_file({k: sd[k] for k in shard_keys}, str(hub / name))
        weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
        (hub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(sd, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"model_type": "chexficient_clip", "auto_map": {}}))
    (hub / "modeling_theirs.py").write_text("raise RuntimeError('never imported by the converter')\n")
    tokenizer.save_pretrained(hub)
    config_json = tmp_path / "arch.json"
    values = config.to_dict()
    config_json.write_text(
        json.dumps({k: values[k] for k in ("vision_config", "text_config", "projection_dim", "num_prototypes")})
    )
    real_load = torch.load

    def no_pickle(*args, **kwargs):
        raise AssertionError("the safetensors layout must not unpickle anything")

    torch.load = no_pickle
    try:
        convert(hub, tmp_path / "hf", config=config_json)
    finally:
        torch.load = real_load
    output = tmp_path / "hf"
    assert (output / "tokenizer.json").exists() and (output / "modeling_chexficient.py").exists()
    reloaded = CheXficientModel.from_pretrained(output).eval()
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.get_image_features(pixel_values),
            reference_image_embeds(sd_unprefixed(sd, prefix), config, pixel_values),
            atol=1e-5,
            rtol=0,
        )
    assert reloaded.logit_scale.shape == (1,)


def sd_unprefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items()}


def test_hub_layout_refuses_unknown_and_partly_wrapped_keys(tmp_path):
    from safetensors.torch import save_file

    from chexficient.hub.convert import convert

    config = tiny_config()
    sd = {k: v.contiguous() for k, v in reference_state_dict(config).items()}
    save_file({**sd, "image_encoder.model.head.weight": torch.zeros(2)}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(ValueError, match="unknown keys"):
        convert(tmp_path / "unknown.safetensors", tmp_path / "out1")
    partly = {("wrapper." + k if k.startswith("text") else k): v for k, v in sd.items()}
    save_file(partly, str(tmp_path / "partly.safetensors"))
    with pytest.raises(ValueError, match="unknown keys"):
        convert(tmp_path / "partly.safetensors", tmp_path / "out2")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert(tmp_path, tmp_path / "out3")
