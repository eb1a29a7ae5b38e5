"""The shape of the project, enforced: who may import whom (read from the AST), and what `pip install .` installs."""

from __future__ import annotations

import ast
import importlib
import json
import os
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
    "image_decoding_chexficient",
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


# The library's rooms, and the rooms each may import (besides itself). The order is the floors: a room imports only
# rooms below it; `curation` is pure and imports nothing else of the library.
LIBRARY_ROOMS: dict[str, set[str]] = {
    "curation": set(),
    "runtime": set(),
    "metrics": set(),
    "data": {"runtime"},
    "phantoms": {"data"},
    "inference": {"curation", "data", "phantoms", "runtime"},
    "hub": {"data", "metrics", "runtime"},
}
LIBRARY_TOP = {"__init__", "cli", "moved_modules"}  # the package's face and the command: above every room


def library_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module in chexficient/ (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted((root / "chexficient").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def library_imports(path: Path, root: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module of the library) of every import in a library file, at any depth, relative ones resolved; a
    `from X import name` that names a submodule counts as importing that submodule."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name in known]


def room_of(module: str) -> str:
    """The room of a library module: its folder under chexficient/, or its own name for a top-level file."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def room_violations(root: Path) -> list[str]:
    """Imports between the library's rooms that the floors forbid."""
    modules = library_modules(root)
    problems = []
    for name, path in modules.items():
        room = room_of(name)
        if room in LIBRARY_TOP:
            continue
        if room not in LIBRARY_ROOMS:
            problems.append(f"{path.relative_to(root)}: {room} is not a room of the library (LIBRARY_ROOMS)")
            continue
        for line, target in library_imports(path, root, set(modules)):
            other = room_of(target)
            if other != room and other != "__init__" and other not in LIBRARY_ROOMS[room]:
                problems.append(f"{path.relative_to(root)}:{line}: {room} imports {other} ({target})")
            if other == "__init__" and target != "chexficient" or target == "chexficient" and room != "__init__":
                problems.append(f"{path.relative_to(root)}:{line}: {room} imports the top of the library ({target})")
    return problems


def import_circles(root: Path) -> list[list[str]]:
    """Sets of library modules that import each other in a loop (strongly connected components of 2+ modules),
    a package's `__init__` excluded: importing a submodule runs it, but it only hands names on."""
    modules = library_modules(root)
    graph = {
        name: {target for _, target in library_imports(path, root, set(modules)) if target != name}
        for name, path in modules.items()
    }
    faces = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph = {name: targets - faces for name, targets in graph.items() if name not in faces}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_library_rooms_import_only_the_rooms_below_them():
    assert room_violations(ROOT) == []


def test_no_import_circle_in_the_library():
    assert import_circles(ROOT) == []


def test_the_room_rules_catch_a_circle_an_upward_import_and_an_impure_curator(tmp_path):
    files = {
        "chexficient/__init__.py": "from .curation import Curator\n",
        "chexficient/curation/__init__.py": "",
        "chexficient/curation/curator.py": "def f():\n    from ..runtime.devices import DTYPES\n",
        "chexficient/runtime/__init__.py": "",
        "chexficient/runtime/devices.py": "DTYPES = {}\n",
        "chexficient/data/__init__.py": "",
        "chexficient/data/pairs.py": "from ..phantoms.render import report\nfrom .manifests import read\n",
        "chexficient/data/manifests.py": "from chexficient.data import pairs\n",
        "chexficient/phantoms/__init__.py": "",
        "chexficient/phantoms/render.py": "from ..data.manifests import read\n",
        "chexficient/inference/__init__.py": "",
        "chexficient/inference/embed.py": "from ..data.pairs import x\nfrom ..runtime import DTYPES\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert room_violations(tmp_path) == [
        "chexficient/curation/curator.py:2: curation imports runtime (chexficient.runtime.devices)",
        "chexficient/data/pairs.py:1: data imports phantoms (chexficient.phantoms.render)",
    ]
    circle = ["chexficient.data.manifests", "chexficient.data.pairs", "chexficient.phantoms.render"]
    assert import_circles(tmp_path) == [circle]


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("chexficient.curation.archive", "chexficient.inference.curate", "curate_archive"),
        ("chexficient.phantom_archive", "chexficient.phantoms.archive", "write_archive_dataset"),
        ("chexficient.images", "chexficient.data.images", "discover_inputs"),
        ("chexficient.presets", "chexficient.runtime.presets", "parse_with_presets"),
    ],
)
def test_old_import_paths_warn_and_give_the_moved_module(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"`{old}` moved to `{new}`"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and hasattr(module, name)
    assert module.__spec__.name == new  # the import machinery's spec of the alias does not replace the module's


def test_python_m_chexficient_phantoms_still_writes_a_corpus(tmp_path):
    command = [sys.executable, "-m", "chexficient.phantoms", str(tmp_path), "--num-train", "4", "--num-test", "2"]
    done = subprocess.run([*command, "--image-size", "32"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 4 and (tmp_path / "test.csv").is_file()


def test_the_rule_catches_sideways_and_upward_imports(tmp_path):
    files = {
        "train/pretrain.py": "from eval.zero_shot import main\n",
        "eval/report.py": "def f():\n    from llava_rad import train\n",
        "chexficient/images.py": "import train.optim\n",
        "modeling_chexficient.py": "from chexficient.data.labels import LABELS\n",
        "space/app.py": "from modeling_chexficient import CheXficientModel\n",
        "chexficient/curation/curator.py": "from ..runtime import DTYPES\nfrom .functions import select_samples\n",
        "llava_rad/train.py": "from chexficient.runtime.presets import parse_with_presets\nfrom llava_rad.model import x\n",
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
    assert {f"chexficient/hub/space/{name}" for name in ("app.py", "README.md", "requirements.txt")} <= set(names)


PUBLISH_FROM_WHEEL = """
import json, sys
from pathlib import Path
import chexficient, modeling_chexficient
from chexficient.hub.publish import main

site = Path(sys.argv[1]).resolve()
where = [Path(chexficient.__file__).resolve(), Path(modeling_chexficient.__file__).resolve()]
assert all(site in path.parents for path in where), where  # the wheel's files, not the checkout's
summary = main(["--model", "model", "--repo-id", "org/tiny", "--dry-run", "--output-dir", "hub/tiny",
                "--space-id", "org/tiny-space"])
print(json.dumps(summary["files"]))
"""


def test_publish_dry_run_from_a_wheel_installed_in_a_clean_virtualenv(wheel, tmp_path):
    """`pip install` of the wheel (not editable) into a new virtualenv, outside the checkout: the remote-code files
    and the Space come from the installation's package data."""
    from helpers import save_tiny_model

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    # The dependencies (torch, transformers, huggingface_hub) from this environment as plain path entries: the .pth
    # files there, the editable install of the checkout among them, are not run.
    (site / "dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    save_tiny_model(tmp_path / "model")
    for module in ROOT_MODULES:
        (tmp_path / "model" / f"{module}.py").unlink(missing_ok=True)  # the installation must supply them
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", PUBLISH_FROM_WHEEL, str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    staged = tmp_path / "hub" / "tiny"
    assert {f"{module}.py" for module in ROOT_MODULES} <= set(json.loads(done.stdout.splitlines()[-1]))
    for module in ROOT_MODULES:
        assert (staged / f"{module}.py").read_bytes() == (ROOT / f"{module}.py").read_bytes()
    space = tmp_path / "hub" / "tiny-space"
    assert (space / "app.py").read_bytes() == (ROOT / "space" / "app.py").read_bytes()
    assert "org/tiny" in (space / "README.md").read_text() and not (space / "screenshot.py").exists()
