"""CheXficient processor: the BERT tokenizer and the CheXficient image processor behind one call."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoTokenizer, BatchEncoding, ProcessorMixin


try:
    from .configuration_chexficient import CheXficientConfig
    from .image_processing_chexficient import CheXficientImageProcessor
except ImportError:  # imported as a top-level module from a checkout
    from configuration_chexficient import CheXficientConfig
    from image_processing_chexficient import CheXficientImageProcessor


class CheXficientProcessor(ProcessorMixin):
    r"""
    Tokenizes reports and preprocesses radiographs for [`CheXficientModel`].

    Text is tokenized as the released model was trained: truncation at `max_length` (256) tokens and right padding
    to the longest sequence, so that the model pools the final [SEP] token.

    Args:
        image_processor ([`CheXficientImageProcessor`]): the image pipeline.
        tokenizer ([`BertTokenizerFast`]): the Bio_ClinicalBERT tokenizer (lower-casing, as released).
        max_length (`int`, defaults to 256): longest tokenized report.
    """

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 256, **kwargs):
        self.max_length = max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchEncoding:
        """Tokenize `text` and/or preprocess `images`; returns input_ids, attention_mask, token_type_ids, pixel_values."""
        if text is None and images is None:
            raise ValueError("CheXficientProcessor needs `text`, `images` or both.")
        encoding: dict[str, Any] = {}
        if text is not None:
            self.tokenizer.padding_side = "right"
            encoding.update(
                self.tokenizer(
                    text,
                    padding=padding,
                    truncation=truncation,
                    max_length=max_length or self.max_length,
                    return_tensors=return_tensors,
                    **kwargs,
                )
            )
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchEncoding(data=encoding, tensor_type=return_tensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> CheXficientProcessor:
        """Load the image processor and tokenizer of a saved folder (or Hub repo) directly.

        Called on this class, no remote code has to be trusted: the image processor is this file's sibling and the
        tokenizer a transformers class. `AutoProcessor.from_pretrained(..., trust_remote_code=True)` ends up here too.
        """
        kwargs.pop("trust_remote_code", None)
        image_processor = CheXficientImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        # A config object stops AutoTokenizer from re-reading config.json as a generic config (a spurious warning).
        tokenizer = AutoTokenizer.from_pretrained(
            pretrained_model_name_or_path, trust_remote_code=False, **{"config": CheXficientConfig(), **kwargs}
        )
        max_length = 256
        config_path = os.path.join(os.fspath(pretrained_model_name_or_path), "processor_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as handle:
                max_length = json.load(handle).get("max_length", max_length)
        return cls(image_processor=image_processor, tokenizer=tokenizer, max_length=max_length)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


CheXficientProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CheXficientProcessor"]
