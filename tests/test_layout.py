"""The shape of the project, enforced: who may import whom (read from the AST), and what `pip install .` installs."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
ROOT_MODULES = {
    "configuration_chexficient",
    "modeling_chexficient",
    "image_processing_chexficient",
    "processing_chexficient",
}
PROGRAMS = {"train", "eval", "llava_rad"}
OURS = {"chexficient", "scripts", "space", *PROGRAMS, *ROOT_MODULES}


def owner(path: Path, root: Path) -> str:
    """The unit a file belongs to: a root module's name, or its top-level folder."""
    relative = path.relative_to(root)
    return relative.stem if len(relative.parts) == 1 else relative.parts[0]


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in the file, relative imports resolved, at any depth of the AST."""
    found = []
    package = path.relative_to(root).parent.parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module.split(".")[0]))
            elif len(package) >= node.level:  # a relative import inside a package: its top-level folder
                found.append((node.lineno, (package[: len(package) - node.level + 1] or (node.module or "",))[0]))
            else:  # a relative import of a root file (`from .configuration_chexficient import ...`)
                found.append((node.lineno, (node.module or "").split(".")[0]))
    return found


def allowed(unit: str) -> set[str]:
    """What a unit may import of ours: the dependency direction root files <- chexficient <- programs/scripts."""
    if unit in ROOT_MODULES:
        return set(ROOT_MODULES)
    if unit == "chexficient":
        return {"chexficient", *ROOT_MODULES}
    if unit in PROGRAMS:
        return {unit, "chexficient", *ROOT_MODULES}
    if unit == "scripts":
        return {"chexficient", *ROOT_MODULES}
    if unit == "space":
        return {"space"}  # the Space runs on the Hub without project code
    return set(OURS)  # tests and benchmarks may use anything


def violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        if any(part.startswith(".") or part in ("build", "outputs") for part in path.relative_to(root).parts):
            continue
        unit = owner(path, root)
        for line, module in imported_modules(path, root):
            if module in OURS and module not in allowed(unit):
                problems.append(f"{path.relative_to(root)}:{line}: {unit} imports {module}")
    return problems


def test_programs_import_only_the_library_and_root_files_import_nothing_of_ours():
    assert violations(ROOT) == []


def test_the_rule_catches_sideways_and_upward_imports(tmp_path):
    files = {
        "train/pretrain.py": "from eval.zero_shot import main\n",
        "eval/report.py": "def f():\n    from llava_rad import train\n",
        "chexficient/images.py": "import train.optim\n",
        "modeling_chexficient.py": "from chexficient.labels import LABELS\n",
        "space/app.py": "from modeling_chexficient import CheXficientModel\n",
        "chexficient/curation/curator.py": "from ..runtime import DTYPES\nfrom .functions import select_samples\n",
        "llava_rad/train.py": "from chexficient.presets import parse_with_presets\nfrom llava_rad.model import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert found == [
        "chexficient/images.py:1: chexficient imports train",
        "eval/report.py:2: eval imports llava_rad",
        "modeling_chexficient.py:1: modeling_chexficient imports chexficient",
        "space/app.py:1: space imports modeling_chexficient",
        "train/pretrain.py:1: train imports eval",
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"  # a copy of what the build reads: the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, cwd=folder)
    return next(folder.glob("chexficient-*.whl"))


def test_pip_install_installs_only_the_library_and_the_root_modules(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"chexficient", *(f"{module}.py" for module in ROOT_MODULES)}
    assert "chexficient/metrics/multilabel_auc/multilabel_auc.py" in names  # evaluate modules ship as data
    assert any(name.startswith("chexficient/hub/templates/") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "chexficient = chexficient.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
