"""One preset mechanism for every program: a preset is a file in the program's `configs/` folder, named without its
suffix, or any path. Run presets are YAML (`--config`), architecture presets JSON (`--model_config`).

    parse_with_presets((ModelArguments, TrainArguments), "train/configs", ["--config", "demo_tiny", "--seed", "1"])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def resolve_preset(name: str, folder: str | Path, suffix: str, option: str = "--config") -> Path:
    """The file `name` stands for: an existing path, else `folder/name{suffix}`; FileNotFoundError naming both."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = Path(folder) / f"{name.removesuffix(suffix)}{suffix}"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in Path(folder).glob(f"*{suffix}"))
    raise FileNotFoundError(f"{option} {name}: no such file, nor a preset in {folder} (presets: {available}).")


def load_json_preset(name: str, folder: str | Path, option: str = "--model_config") -> dict[str, Any]:
    """A JSON preset (e.g. a model architecture) as a dict."""
    path = resolve_preset(name, folder, ".json", option)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{option} {path}: not valid JSON ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"{option} {path}: expected a JSON object.")
    return values


def parse_with_presets(
    argument_classes: tuple[type, ...], config_dir: str | Path, argv: list[str] | None = None
) -> tuple:
    """Parse `argv` into `argument_classes` (HfArgumentParser dataclasses).

    `--config NAME_OR_YAML` (a preset in `config_dir` or a path) supplies defaults first, which the command line
    overrides; a setting the file gives satisfies a required argument. Unknown settings in the file are an error.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(argument_classes)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a YAML file or preset name.")
        config_path = resolve_preset(argv[position + 1], config_dir, ".yaml")
        del argv[position : position + 2]
        values = yaml.safe_load(config_path.read_text()) or {}
        known = {f for cls in argument_classes for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown settings {unknown}.")
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


__all__ = ["load_json_preset", "parse_with_presets", "resolve_preset"]
