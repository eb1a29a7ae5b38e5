"""Convert a reference CheXficient checkpoint (`{"model": state_dict, "subset": ids, ...}`) into a Hugging Face folder.

    python scripts/convert_original_checkpoint.py --checkpoint pytorch_model.pth --output chexficient-hf \
        [--config config.json] [--tokenizer path/to/Bio_ClinicalBERT]

The folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`: safetensors weights, config,
the remote-code files, the image processor (plus tokenizer and processor with `--tokenizer`) and the curated subset
ids as `curated_subset.json`.

The work is in `chexficient.hub.convert`; `--help` lists the options.
"""

from chexficient.hub.convert import main


if __name__ == "__main__":
    main()
