"""A user's session with a saved CheXficient folder, on whatever transformers is installed: the model card's snippets.

Run by `tests/test_transformers_versions.py` in environments holding only torch, Pillow and one transformers release
(never this project). Writes what it computed as JSON to the path given, for comparison with the pinned release.
Arguments: FOLDER IMAGE OUTPUT.
"""

import json
import sys

import torch
import transformers
from transformers import AutoModel, AutoProcessor, AutoTokenizer, pipeline


LABELS = ["pneumothorax", "pleural effusion", "normal"]
REPORTS = ["no pleural effusion", "small right pneumothorax"]

folder, image, output = sys.argv[1:4]

model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
inputs = processor(text=REPORTS, images=[image, image])
with torch.no_grad():
    outputs = model(**inputs)
    image_embeds = model.get_image_features(inputs["pixel_values"])
    text_embeds = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    zero_shot = model.zero_shot_classify(["Pneumothorax", "No Finding"], tokenizer, image_embeds=image_embeds)

classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
scores = classifier(image, candidate_labels=LABELS, hypothesis_template="{}")

with open(output, "w") as handle:
    json.dump(
        {
            "transformers": transformers.__version__,
            "model_class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "tokenizer_ids": tokenizer(REPORTS)["input_ids"],
            "processor_ids": inputs["input_ids"].tolist(),
            "model_max_length": tokenizer.model_max_length,
            "image_embeds": image_embeds.tolist(),
            "text_embeds": text_embeds.tolist(),
            "logits_per_image": outputs.logits_per_image.tolist(),
            "zero_shot": zero_shot.tolist(),
            "pipeline": {item["label"]: item["score"] for item in scores},
        },
        handle,
    )
