"""A tiny, offline LLaVA-Rad setup for demos and tests: a random tiny CheXficient, a tiny Llama with a byte-level
BPE tokenizer trained on the reports, and phantom radiographs with findings and indications.

    python -m llava_rad.demo --output_dir outputs/llava_rad_demo
    accelerate launch --cpu --num_processes 1 llava_rad/train.py --config demo_stage1
    accelerate launch --cpu --num_processes 1 llava_rad/train.py --config demo_stage2
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llava_rad.data import ReportExample, write_examples_csv
from llava_rad.prompt import INSTRUCTION, INSTRUCTION_WITH_INDICATION, VICUNA_V1_SYSTEM


DEMO_INDICATIONS = ("Shortness of breath.", "Fever and cough.", "Chest pain.", "Line placement.", None)


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama's special tokens (<unk>, <s>, </s>) that prepends <s>, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [VICUNA_V1_SYSTEM, INSTRUCTION, INSTRUCTION_WITH_INDICATION, "USER: ASSISTANT:", *texts]
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def save_tiny_language_model(
    folder: str | os.PathLike,
    texts: Iterable[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 400,
    train_steps: int = 200,
    learning_rate: float = 3e-3,
) -> LlamaForCausalLM:
    """Save a tiny `LlamaForCausalLM` (hidden 32, 2 layers) and its tokenizer to `folder`.

    Like Vicuna knows English, the tiny LM is first trained for `train_steps` on `texts` (each ending in </s>), so
    that the LLaVA stages have a language model to align images to; a random LM with a frozen head cannot be
    steered away from a near-uniform output.
    """
    texts = list(texts)
    tokenizer = build_tiny_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if train_steps:
        pretrain_language_model(model, tokenizer, texts, train_steps, learning_rate)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def pretrain_language_model(model, tokenizer, texts: list[str], steps: int, learning_rate: float) -> list[float]:
    """Full-parameter causal-LM training on `texts` in batches of 16; returns the losses."""
    encoded = tokenizer([t + tokenizer.eos_token for t in texts], padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randperm(len(texts), generator=generator)[:16]
        loss = model(
            input_ids=encoded["input_ids"][rows], attention_mask=encoded["attention_mask"][rows], labels=labels[rows]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def save_tiny_chexficient(folder: str | os.PathLike, image_size: int = 56, hidden_size: int = 32) -> None:
    """Save a random tiny CheXficient (patch 14) with its processor; a stand-in for the released checkpoint."""
    from configuration_chexficient import CheXficientConfig
    from image_processing_chexficient import CheXficientImageProcessor
    from modeling_chexficient import CheXficientModel

    config = CheXficientConfig(
        vision_config={
            "hidden_size": hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "mlp_ratio": 2,
            "image_size": image_size,
            "patch_size": 14,
        },
        text_config={
            "vocab_size": 64,
            "hidden_size": hidden_size,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
        },
        projection_dim=16,
        num_prototypes=3,
    )
    CheXficientModel(config).eval().save_pretrained(folder)
    CheXficientImageProcessor(size={"shortest_edge": image_size}).save_pretrained(folder)


def phantom_examples(root: Path, num_train: int, num_test: int, image_size: int, seed: int = 0):
    """Phantom (train, test) examples with findings and a random indication (or none)."""
    from chexficient.phantoms import write_phantom_dataset

    written = write_phantom_dataset(root, num_train=num_train, num_test=num_test, seed=seed, image_size=image_size)
    import pandas as pd

    rng = np.random.default_rng(seed)
    splits = []
    for split in ("train", "test"):
        frame = pd.read_csv(written[split])
        examples = []
        for row in frame.to_dict("records"):
            indication = DEMO_INDICATIONS[int(rng.integers(len(DEMO_INDICATIONS)))]
            examples.append(ReportExample(row["id"], row["path"], row["findings"], indication))
        splits.append(examples)
    return splits


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/llava_rad_demo", metadata={"help": "where the demo parts go"})
    num_train: int = field(default=64, metadata={"help": "phantom training images"})
    num_test: int = field(default=16, metadata={"help": "phantom test images"})
    image_size: int = field(default=56, metadata={"help": "tower input size (multiple of 14)"})
    phantom_size: int = field(default=64, metadata={"help": "side of the rendered phantoms"})
    chexficient: str | None = field(
        default=None, metadata={"help": "use this CheXficient instead of a random tiny one"}
    )
    seed: int = field(default=0, metadata={"help": "seed"})


def main(argv: list[str] | None = None) -> dict[str, str]:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    torch.manual_seed(args.seed)
    root = Path(args.output_dir)
    train_examples, test_examples = phantom_examples(
        root / "phantoms", args.num_train, args.num_test, args.phantom_size
    )
    write_examples_csv(train_examples, root / "train.csv")
    write_examples_csv(test_examples, root / "test.csv")
    chexficient = args.chexficient or str(root / "chexficient")
    if args.chexficient is None:
        save_tiny_chexficient(chexficient, args.image_size)
    save_tiny_language_model(root / "llama", [e.findings for e in train_examples])
    paths = {
        "chexficient": chexficient,
        "language_model": str(root / "llama"),
        "train": str(root / "train.csv"),
        "test": str(root / "test.csv"),
        "image_root": str(root / "phantoms"),
    }
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return paths


if __name__ == "__main__":
    main()
