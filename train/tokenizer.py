"""A small BERT WordPiece tokenizer trained on report text, for models trained from scratch (the demo, tests).

The released model uses Bio_ClinicalBERT's tokenizer; pass its local folder with `--tokenizer` for real runs.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_report_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1) -> BertTokenizerFast:
    """Train a lower-casing WordPiece vocabulary on `texts` and wrap it as a `BertTokenizerFast`."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    wordpiece.train_from_iterator(texts, trainer)
    return BertTokenizerFast(vocab=wordpiece.get_vocab(), do_lower_case=True)
