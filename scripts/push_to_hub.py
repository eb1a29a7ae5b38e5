"""Publish a CheXficient or LLaVA-Rad model folder to the Hugging Face Hub, with a generated model card.

    python scripts/push_to_hub.py --model outputs/demo/final --repo-id ORG/CheXficient-demo \\
        --eval-dir outputs/eval_demo --dry-run

The work is in `chexficient.hub.publish`; `--help` lists the options.
"""

from chexficient.hub.publish import cli


if __name__ == "__main__":
    cli()
