"""Built-in synthetic chest-radiograph phantoms with template reports: the demo's and the tests' datasets.

- `render`: anatomy, findings drawn into the image, radiology-style reports, anatomy masks;
- `corpus`: the datasets written to disk (train/test, pretraining splits with a clean validation set, segmentation);
- `archive`: the archive-like corpus (patients with repeated studies, a dominant normal class, a rare tail).

    python -m chexficient.phantoms outputs/phantoms --num-train 2000 --num-test 400
"""

from .archive import write_archive_dataset
from .corpus import (
    PhantomSample,
    generate_phantoms,
    phantom_datasets,
    write_phantom_dataset,
    write_phantom_segmentation,
    write_pretraining_splits,
)
from .render import (
    PHANTOM_FINDINGS,
    PHANTOM_LABELS,
    PREVALENCE,
    SEGMENTATION_CLASSES,
    make_report,
    phantom_anatomy_masks,
    render_phantom,
    sample_anatomy,
    sample_labels,
)


__all__ = [
    "PHANTOM_FINDINGS",
    "PHANTOM_LABELS",
    "PREVALENCE",
    "SEGMENTATION_CLASSES",
    "PhantomSample",
    "generate_phantoms",
    "make_report",
    "phantom_anatomy_masks",
    "phantom_datasets",
    "render_phantom",
    "sample_anatomy",
    "sample_labels",
    "write_archive_dataset",
    "write_phantom_dataset",
    "write_phantom_segmentation",
    "write_pretraining_splits",
]
