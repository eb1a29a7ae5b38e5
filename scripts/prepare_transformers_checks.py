"""Prepare, once and online, what the Hugging Face contract tests need offline (`make setup` runs it).

1. transformers' own common model tests: the source distribution of the installed transformers holds `tests/`
   (`test_modeling_common.py`, `test_configuration_common.py`, ...) but not the folders those files import beside
   them (`exporters/`, `generation/`, `utils/`). They are unpacked into `.cache/transformers-tests/<version>/` as the
   package `transformers_tests`, with the three missing modules written as stand-ins that declare what CheXficient
   has none of: no `generate` (an empty `GenerationTesterMixin`, which the common tests require a non-generative
   model's tester not to inherit), no `torch.export` tests of their own (an empty `ExportTesterMixin`), and the
   common config arguments (our own list of `PretrainedConfig` keywords; composite configs skip that check).
2. The version matrix: a base virtual environment with only torch (the CPU wheel), Pillow and NumPy in
   `.cache/transformers-matrix/base`, and each tested transformers release with its own dependencies in
   `.cache/transformers-matrix/transformers-<version>`, put on `PYTHONPATH` over the base by the tests. Nothing of
   this project is installed there.

Usage: python scripts/prepare_transformers_checks.py [--only tests|matrix]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import venv
from pathlib import Path

import transformers


ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
TESTS_CACHE = CACHE / "transformers-tests"
MATRIX_CACHE = CACHE / "transformers-matrix"
# The oldest release the folder's remote code supports, the newest 4.x and the newest 5.x (the pinned release, 5.23,
# is the project's own environment and the reference the others are compared with).
MATRIX_VERSIONS = ("4.46.3", "4.57.6", "5.25.0")
COMMON_TEST_FILES = ("test_modeling_common.py", "test_configuration_common.py")
STAND_INS = {
    "exporters/test_export.py": '''"""Stand-in: the source distribution lacks tests/exporters; CheXficient has no export tests of its own here."""


class ExportTesterMixin:
    pass
''',
    "generation/test_utils.py": '''"""Stand-in: the source distribution lacks tests/generation; CheXficient's models do not generate."""


class GenerationTesterMixin:
    pass
''',
    "utils/test_configuration_utils.py": '''"""Stand-in: the source distribution lacks tests/utils; common `PretrainedConfig` keyword arguments."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "id2label": {0: "absent", 1: "present"},
    "label2id": {"absent": 0, "present": 1},
    "problem_type": "multi_label_classification",
}
''',
}


def pip(python: Path | str, *arguments: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *arguments], check=True)


def common_tests_folder(version: str = transformers.__version__) -> Path:
    """Where `prepare_common_tests` unpacks the common tests of transformers `version` (the package's parent)."""
    return TESTS_CACHE / version


def prepare_common_tests(version: str = transformers.__version__) -> Path:
    folder = common_tests_folder(version)
    package = folder / "transformers_tests"
    if (package / "__init__.py").exists():
        return folder
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + ["--disable-pip-version-check", f"transformers=={version}", "-d", download],
            check=True,
        )
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        with tarfile.open(archive) as sdist:
            for name in COMMON_TEST_FILES:
                member = sdist.getmember(f"transformers-{version}/tests/{name}")
                target = package / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(sdist.extractfile(member).read())
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    (package / "__init__.py").write_text(f'"""transformers {version}: common tests from its source distribution."""\n')
    print(f"transformers {version} common tests: {folder}")
    return folder


def matrix_python() -> Path:
    return MATRIX_CACHE / "base" / "bin" / "python"


def matrix_site(version: str) -> Path:
    return MATRIX_CACHE / f"transformers-{version}"


def prepare_matrix(versions: tuple[str, ...] = MATRIX_VERSIONS) -> None:
    base = MATRIX_CACHE / "base"
    ready = base / "ready"
    if not ready.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(base)
        pip(matrix_python(), "-c", str(ROOT / ".ci" / "constraints.txt"), "torch==2.13.0", "pillow", "numpy")
        ready.touch()
    for version in versions:
        site = matrix_site(version)
        if (site / "ready").exists():
            continue
        pip(matrix_python(), "--upgrade", "--target", str(site), f"transformers=={version}")
        (site / "ready").touch()
        print(f"transformers {version}: {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("tests", "matrix"), help="prepare one of the two (default: both)")
    args = parser.parse_args()
    if args.only in (None, "tests"):
        prepare_common_tests()
    if args.only in (None, "matrix"):
        prepare_matrix()


if __name__ == "__main__":
    main()
