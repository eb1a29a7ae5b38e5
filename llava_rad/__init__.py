"""LLaVA-Rad report generation on the frozen CheXficient image encoder, as a stock transformers Llava model.

model.py builds the `LlavaForConditionalGeneration` and its `LlavaProcessor`; data.py reads and tokenizes the data;
features.py stores the frozen tower's features; train.py runs the two stages; export.py merges LoRA;
generate.py writes reports; metrics.py scores them.
"""
