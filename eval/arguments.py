"""The command-line arguments every evaluation task shares; each task's `HfArgumentParser` dataclass extends
`EvalArguments` with only its own fields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalArguments:
    """The model, the dataset, where the results go, the device and the bootstrap."""

    model: str = field(
        metadata={
            "help": "CheXficient folder (save_pretrained / converter output); linear_probe and segmentation also "
            "take any HF image encoder folder."
        }
    )
    dataset: str = field(
        metadata={
            "help": "Dataset adapter (eval/datasets/). Classification (zero_shot, linear_probe): chexpert, mimic, "
            "nih, vindr_cxr, vindr_pcxr, siim_ptx, pneumonia2017, tbx11k, phantom. Retrieval: chexpert_5x200, "
            "mimic, phantom. Segmentation: jsrt, siim_ptx, vindr_ribcxr, phantom_segmentation."
        }
    )
    root: str = field(metadata={"help": "Root folder of the dataset in its official layout."})
    out_dir: str = field(default="outputs/eval", metadata={"help": "Where the JSON and markdown go."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers decoding images."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    num_resamples: int = field(default=500, metadata={"help": "Bootstrap resamples for the CIs."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Bootstrap seed; segmentation: also the decoder's initialisation and batch order; linear_probe: "
            "the validation share split off the training split (its runs and their bootstraps follow --seeds)."
        },
    )
