"""Aggregate evaluation JSON into the model card's results section, a per-class AUROC plot and model-index entries.

    python -m eval.report outputs/eval --out outputs/eval/RESULTS.md

Reads every `zero_shot_*.json`, `retrieval_*.json`, `linear_probe_*.json` and `segmentation_*.json` the task CLIs
wrote under the folder, writes one markdown section with a table per task and `per_class_auroc.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chexficient.metrics.results import load_results, model_index_entries, plot_per_class_auroc, results_markdown


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="Folder holding the task CLIs' JSON results.")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: FOLDER/RESULTS.md).")
    args = parser.parse_args(argv)
    results = load_results(args.folder)
    if not results:
        raise SystemExit(f"{args.folder}: no evaluation results (zero_shot_*.json, retrieval_*.json, ...) found.")
    out = Path(args.out or Path(args.folder) / "RESULTS.md")
    plot = plot_per_class_auroc(results, out.parent / "per_class_auroc.png")
    markdown = results_markdown(results, plot.name if plot else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    (out.parent / "model_index.json").write_text(json.dumps(model_index_entries(results), indent=2))
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
