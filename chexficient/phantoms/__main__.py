"""Write a phantom corpus to disk.

python -m chexficient.phantoms outputs/phantoms --num-train 2000 --num-test 400
python -m chexficient.phantoms outputs/phantom_seg --segmentation --num-train 160 --num-val 40 --num-test 80
python -m chexficient.phantoms outputs/archive --archive --num-train 6000 --num-test 1500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .archive import write_archive_dataset
from .corpus import write_phantom_dataset, write_phantom_segmentation
from .render import SEGMENTATION_CLASSES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m chexficient.phantoms",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size", type=int, default=None, help="Image side in pixels (default 256; 128 with --archive)."
    )
    parser.add_argument("--bit-depth", type=int, default=8, choices=(8, 16))
    parser.add_argument(
        "--segmentation",
        action="store_true",
        help="Write the lung/heart segmentation set instead (--num-train, --num-val and --num-test images).",
    )
    parser.add_argument(
        "--num-val",
        type=int,
        default=None,
        help="Validation images (default 40 with --segmentation, 0 with --archive).",
    )
    parser.add_argument(
        "--archive",
        action="store_true",
        help="Write the archive-like corpus instead (chexficient.phantoms.archive: patients with repeated studies, a "
        "dominant normal class, a long tail of rare findings, varied reports); --num-val adds a val split.",
    )
    args = parser.parse_args(argv)
    if args.archive:
        written = write_archive_dataset(
            args.output_dir,
            num_train=args.num_train,
            num_val=0 if args.num_val is None else args.num_val,
            num_test=args.num_test,
            seed=args.seed,
            image_size=128 if args.image_size is None else args.image_size,
        )
        meta = json.loads((Path(args.output_dir) / "archive.json").read_text())
        for split in ("train", "val", "test"):
            if split in meta:
                print(
                    f"{split}: {written[split]} ({meta[split]['studies']} studies, {meta[split]['patients']} patients)"
                )
                for label, share in meta[split]["shares"].items():
                    print(f"  {label:<18} {share:6.1%}")
        return
    image_size = 256 if args.image_size is None else args.image_size
    if args.segmentation:
        root = write_phantom_segmentation(
            args.output_dir,
            num_train=args.num_train,
            num_val=40 if args.num_val is None else args.num_val,
            num_test=args.num_test,
            seed=args.seed,
            image_size=image_size,
        )
        print(f"segmentation phantoms with {', '.join(SEGMENTATION_CLASSES)} masks: {root}")
        return
    written = write_phantom_dataset(
        args.output_dir,
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        image_size=image_size,
        bit_depth=args.bit_depth,
    )
    meta = json.loads((Path(args.output_dir) / "phantoms.json").read_text())
    for split in ("train", "test"):
        print(f"{split}: {written[split]}")
        for label, share in meta[f"{split}_prevalence"].items():
            print(f"  {label:<18} {share:6.1%}")


if __name__ == "__main__":
    main()
