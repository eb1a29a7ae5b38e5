"""CheXficient processor: the BERT tokenizer and the CheXficient image processor behind one call."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from transformers import AutoTokenizer, BatchEncoding, ProcessorMixin


# transformers < 5 copies only the direct relative imports of a local folder's entry file into its module cache, so
# this file names every sibling it needs, the image processor's decoding included.
try:
    from .configuration_chexficient import CheXficientConfig
    from .image_decoding_chexficient import load_image as load_image
    from .image_processing_chexficient import CheXficientImageProcessor
except ImportError:
    # a top-level module (a checkout, the wheel): imported by name, which transformers < 4.52's scanner of remote
    # code (a regex that keeps `except` bodies) would take for a package to install
    CheXficientConfig = importlib.import_module("configuration_chexficient").CheXficientConfig
    load_image = importlib.import_module("image_decoding_chexficient").load_image
    CheXficientImageProcessor = importlib.import_module("image_processing_chexficient").CheXficientImageProcessor


# Arguments of one load that transformers 5 keeps in a tokenizer's `init_kwargs` and would write to its config.
_LOADING_ARGUMENTS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "revision",
    "token",
    "trust_remote_code",
    "_commit_hash",
)


def load_tokenizer(source: str | os.PathLike, **kwargs) -> Any:
    """`AutoTokenizer.from_pretrained(source)` for the report tokenizer of a CheXficient folder (or any BERT tokenizer),
    without running or trusting any code of the folder.

    transformers 5's `AutoTokenizer` reads a folder's `config.json` first; a CheXficient config is custom code, so a
    plain call asks "Do you wish to run the custom code?" (and, declined, warns that a model of type `chexficient`
    instantiates a model of type ``). This file's config class stands in for it: the tokenizer class comes from
    `tokenizer_config.json`, a transformers class.
    """
    kwargs.pop("trust_remote_code", None)
    kwargs.setdefault("config", CheXficientConfig())
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)


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
        tokenizer = load_tokenizer(pretrained_model_name_or_path, **kwargs)
        max_length = 256
        config_path = os.path.join(os.fspath(pretrained_model_name_or_path), "processor_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as handle:
                max_length = json.load(handle).get("max_length", max_length)
        return cls(image_processor=image_processor, tokenizer=tokenizer, max_length=max_length)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """`ProcessorMixin.save_pretrained`, so that the folder loads on every supported transformers:

        - the image processor also in its own `preprocessor_config.json`, the file transformers < 4.57 reads (5.x nests
          it in `processor_config.json`);
        - the tokenizer without the arguments of the load that produced it (`local_files_only`, `is_local`, ...), which
          transformers 5 records and would replay on every later load.
        """
        for argument in _LOADING_ARGUMENTS:
            self.tokenizer.init_kwargs.pop(argument, None)
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        return [*files, *self.image_processor.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)]

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


CheXficientProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CheXficientProcessor", "load_tokenizer"]
