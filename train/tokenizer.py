"""A small BERT WordPiece tokenizer built from report text, for models trained from scratch (the demo, tests).

The vocabulary is built deterministically (the same texts always give the same ids, unlike the `tokenizers`
trainer): special tokens, every character seen (alone and as a "##" continuation, so no word is unknown), then the
most frequent words, ties broken alphabetically. The released model uses Bio_ClinicalBERT's tokenizer; pass its
local folder with `--tokenizer` for real runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import normalizers, pre_tokenizers
from transformers import BertTokenizerFast


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_report_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> BertTokenizerFast:
    """A lower-casing WordPiece `BertTokenizerFast` whose vocabulary covers the most frequent words of `texts`."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({c for word in words for c in word})
    vocab = list(SPECIAL_TOKENS) + characters + [f"##{c}" for c in characters]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} special and character tokens.")
    known = set(vocab)
    frequent = sorted((w for w in words if w not in known), key=lambda w: (-words[w], w))
    vocab += frequent[: vocab_size - len(vocab)]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
