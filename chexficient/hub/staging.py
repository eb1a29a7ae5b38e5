"""What a staged Hub repository may hold: the remote-code modules a config's `auto_map` names (plain module names of
files in the model folder, or the CheXficient files this installation ships) and no absolute path of this machine
(records are rewritten relative to the run folder or to their file name; a staged text file that still holds one
stops the upload)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any


INSTALL_ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages for an installed wheel
SPACE_PACKAGE = "chexficient.hub.space"  # the project's space/, shipped in the wheel as package data (setup.py)
REMOTE_CODE_FILES = (
    "configuration_chexficient.py",
    "modeling_chexficient.py",
    "image_decoding_chexficient.py",
    "image_processing_chexficient.py",
    "processing_chexficient.py",
)
AUTO_MAP_CONFIGS = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json")
STAGING_MARKER = ".push_to_hub_staging"  # marks a folder this script may empty again; never uploaded
# An auto_map reference is `[repo--]module.Class`; module and class must be plain names (no path, no package).
PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# An absolute path inside a string (POSIX `/a/b` or Windows `C:\\a`), not part of a URL, a word or a tag like `</s>`.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/<>\\-])(?:/(?=[^\s/])|[A-Za-z]:[\\/])[^\s\"'<>|,;()\[\]{}]*")
WINDOWS_PATH = re.compile(r"[A-Za-z]:[\\/]")
TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".jinja", ".csv", ".yaml", ".yml", ".cfg", ".toml")
TOKEN_TABLES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt")  # tokens like `/root`, not paths


class PublishError(RuntimeError):
    """A folder or setting that cannot be published; the message says which and why."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PublishError(f"{path}: not readable JSON ({error}).") from error


def staged_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != STAGING_MARKER
    )


# ----- remote code: what a config's auto_map names -------------------------------------------------------------------


def _auto_map_references(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """(auto class, reference) for every `auto_map` entry of a config (and of its nested image processor)."""
    maps = [config.get("auto_map") or {}, (config.get("image_processor") or {}).get("auto_map") or {}]
    return [
        (key, item)
        for auto_map in maps
        for key, reference in auto_map.items()
        for item in (reference if isinstance(reference, list) else [reference])
        if item is not None
    ]


def _module_file(reference: Any, config_path: Path, key: str) -> str:
    """`module.py` for an auto_map reference `[repo--]module.Class`; PublishError for a path, a package or junk."""
    parts = reference.split("--") if isinstance(reference, str) else []
    module, _, class_name = parts[-1].rpartition(".") if 0 < len(parts) <= 2 else ("", "", "")
    if not (PLAIN_NAME.fullmatch(module) and PLAIN_NAME.fullmatch(class_name)):
        raise PublishError(
            f"{config_path}: auto_map {key} refers to {reference!r}; only `module.Class` with a plain module name "
            "(a file beside config.json, no path or package) is published."
        )
    return module + ".py"


def auto_map_modules(folder: Path) -> dict[str, set[str]]:
    """{module file: configs naming it} for every `auto_map` entry in the folder's configs, each one validated."""
    modules: dict[str, set[str]] = {}
    for name in AUTO_MAP_CONFIGS:
        path = folder / name
        if path.is_file():
            for key, reference in _auto_map_references(read_json(path)):
                modules.setdefault(_module_file(reference, path, key), set()).add(name)
    return modules


def installed_remote_code(module: str) -> Path | None:
    """Where this installation keeps one of `REMOTE_CODE_FILES` (a top-level module of the wheel, or the checkout's
    file in a source tree), or None."""
    spec = importlib.util.find_spec(module.removesuffix(".py")) if module in REMOTE_CODE_FILES else None
    return Path(spec.origin) if spec is not None and spec.origin and Path(spec.origin).is_file() else None


def space_source() -> Path:
    """The Space's files: package data in an installed wheel, the checkout's `space/` in a source tree (an editable
    install maps only the library's own folder)."""
    spec = importlib.util.find_spec(SPACE_PACKAGE)
    folders = [Path(location) for location in (spec.submodule_search_locations or [])] if spec else []
    for folder in [*folders, INSTALL_ROOT / "space"]:
        if (folder / "app.py").is_file() and (folder / "README.md").is_file():
            return folder
    raise PublishError(f"this installation has no Space files ({SPACE_PACKAGE}); reinstall chexficient.")


def remote_code_sources(model_dir: Path, kind: str) -> dict[str, Path]:
    """{module file: where to copy it from}: the model folder, else this installation for the CheXficient files."""
    named = auto_map_modules(model_dir)
    required = set(named) | (set(REMOTE_CODE_FILES) if kind == "chexficient" else set())
    folder = model_dir.resolve()
    sources = {}
    for module in sorted(required):
        candidate = model_dir / module
        if candidate.is_file():
            if candidate.resolve().parent != folder:
                raise PublishError(f"{candidate}: links outside the model folder; not publishing it as remote code.")
            sources[module] = candidate
        elif installed_remote_code(module) is not None:
            sources[module] = installed_remote_code(module)
        else:
            named_by = ", ".join(sorted(named.get(module, {"auto_map"})))
            raise PublishError(
                f"{model_dir}: {named_by} refers to {module}, which is neither in the folder nor known."
            )
    return sources


# ----- local paths: what an upload must not reveal -------------------------------------------------------------------


def local_prefixes(*folders: Path) -> tuple[str, ...]:
    """Absolute paths of this machine that no staged file may contain: the given folders, the working and home
    directories and this installation's folder, as given and resolved, longest first (the root alone is not one)."""
    found = set()
    for folder in (*folders, Path.cwd(), Path.home(), INSTALL_ROOT):
        for path in (Path(os.path.abspath(folder)), Path(folder).resolve()):
            if len(path.parts) >= 2:
                found.add(str(path))
    return tuple(sorted(found, key=len, reverse=True))


def localized(path_text: str, run_dir: Path) -> str:
    """An absolute path as an upload states it: relative to the run folder when inside it, else its file name."""
    if WINDOWS_PATH.match(path_text):
        return PureWindowsPath(path_text).name or path_text
    path = PurePosixPath(os.path.normpath(path_text))
    for base in (PurePosixPath(os.path.abspath(run_dir)), PurePosixPath(run_dir.resolve())):
        if path == base or base in path.parents:
            return path.relative_to(base).as_posix()
    return path.name or path_text


def _scrub(value: Any, rewrite: Callable[[str], str], keep: Collection[str] = ()) -> Any:
    """Parsed JSON with `rewrite` applied to every string (keys too), except the values of top-level `keep` keys."""
    if isinstance(value, dict):
        return {_scrub(k, rewrite): v if k in keep else _scrub(v, rewrite) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(item, rewrite) for item in value]
    return rewrite(value) if isinstance(value, str) else value


class LocalPaths:
    """Stages JSON with the absolute paths of this machine rewritten (`localized`), and counts what it rewrote."""

    def __init__(self, output_dir: Path, run_dir: Path, prefixes: tuple[str, ...]):
        self.output_dir, self.run_dir, self.prefixes = output_dir, run_dir, prefixes
        self.count = 0

    def _local(self, path_text: str) -> str:
        new = localized(path_text, self.run_dir)
        self.count += new != path_text
        return new

    def _is_local(self, text: str) -> bool:
        if "\n" in text or not (text.startswith("/") or WINDOWS_PATH.match(text)):
            return False
        try:
            return text.startswith(self.prefixes) or Path(text).exists()
        except OSError:  # a name too long for this file system is no path here
            return False

    def every_path(self, value: Any, keep: Collection[str] = ()) -> Any:
        """Every absolute path in every string, also inside longer text (run records, eval JSON, the subset)."""
        return _scrub(value, lambda text: ABSOLUTE_PATH.sub(lambda m: self._local(m.group(0)), text), keep)

    def local_values(self, value: Any) -> Any:
        """Only strings that are, whole, an absolute path of this machine (configs: chat templates and tokens stay)."""
        return _scrub(value, lambda text: self._local(text) if self._is_local(text) else text)

    def stage_json(
        self,
        source: Path | dict[str, Any],
        name: str,
        notes: list[str],
        configs: bool = False,
        keep: Collection[str] = (),
    ) -> None:
        """Write `name` in the staging folder from a JSON file or record; an untouched file is copied byte for byte."""
        record = read_json(source) if isinstance(source, Path) else source
        before = self.count
        cleaned = self.local_values(record) if configs else self.every_path(record, keep)
        target = self.output_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path) and self.count == before:
            shutil.copy2(source, target)
            return
        target.write_text(json.dumps(cleaned, indent=2) + "\n")
        if self.count > before:
            notes.append(
                f"{name}: {self.count - before} local path(s) made relative to the run folder or cut to the file name"
            )


def check_no_local_paths(folder: Path, prefixes: tuple[str, ...]) -> None:
    """PublishError when a staged text file (token tables aside) still holds an absolute path of this machine."""
    patterns = {prefix: re.compile(re.escape(prefix) + r"(?![\w.-])") for prefix in prefixes}
    for name in staged_files(folder):
        if name.endswith(TEXT_SUFFIXES) and Path(name).name not in TOKEN_TABLES:
            text = (folder / name).read_text(encoding="utf-8", errors="replace")
            for prefix, pattern in patterns.items():
                if pattern.search(text):
                    raise PublishError(
                        f"{folder / name}: holds the local path {prefix}; remove it from the source of that file "
                        "before publishing (nothing was uploaded)."
                    )
