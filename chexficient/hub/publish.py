"""Publish a CheXficient or LLaVA-Rad model folder to the Hugging Face Hub, with a generated model card
(`scripts/push_to_hub.py` is the command).

    python scripts/push_to_hub.py --model outputs/demo/final --repo-id ORG/CheXficient-demo \\
        --eval-dir outputs/eval_demo --dry-run
    python scripts/push_to_hub.py --model outputs/demo/final --repo-id ORG/CheXficient-demo --eval-dir outputs/eval_demo \\
        --private --space-id ORG/CheXficient-demo-space

Assembles the repository in `--output-dir` (default `outputs/hub/NAME`): safetensors weights, `config.json` with its
`auto_map`, the remote-code files, tokenizer, processor, `curated_subset.json`, the evaluation JSON under `eval/`, the
training run's arguments and summary under `training/`, and `README.md` (the model card). `--dry-run` stops there and
lists what would be uploaded; otherwise the folder goes up in one commit (`create_repo` + `upload_folder`). The token
comes from huggingface_hub's usual places (`HF_TOKEN`, `hf auth login`). `--space-id` also publishes `space/` as a
Gradio Space that serves this model.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (outputs/ and space/ live there)
SPACE_DIR = PROJECT_ROOT / "space"
REMOTE_CODE_FILES = (
    "configuration_chexficient.py",
    "modeling_chexficient.py",
    "image_processing_chexficient.py",
    "processing_chexficient.py",
)
CHEXFICIENT_AUTO_MAP = {
    "AutoConfig": "configuration_chexficient.CheXficientConfig",
    "AutoModel": "modeling_chexficient.CheXficientModel",
}
# Top-level files of a model folder that belong in the Hub repository; anything else (optimizer state, logs,
# checkpoints, pickles) stays home and is listed as left out.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "curated_subset.json",
    "report_prompt.json",
)
AUTO_MAP_CONFIGS = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json")
SPACE_LEFT_OUT = ("__pycache__", "*.pyc", "screenshot.py")  # not copied from space/ (screenshot.py is a dev tool)
REPLACED_FOLDERS = ["eval/*", "training/*"]
STAGING_MARKER = ".push_to_hub_staging"  # marks a folder this script may empty again; never uploaded


class PublishError(RuntimeError):
    """A folder or setting that cannot be published; the message says which and why."""


@dataclass
class PushArguments:
    model: str = field(metadata={"help": "Model folder: a CheXficient folder or a LlavaForConditionalGeneration one."})
    repo_id: str = field(metadata={"help": "Target Hub repository, ORG/NAME."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (created if missing)."})
    dry_run: bool = field(default=False, metadata={"help": "Assemble the folder and list it; upload nothing."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to assemble (default outputs/hub/NAME)."})
    eval_dir: list[str] = field(
        default_factory=list, metadata={"help": "Folders of evaluation JSON (eval/ tasks or llava_rad/metrics.py)."}
    )
    commit_message: str | None = field(default=None, metadata={"help": "Commit title (a default names the model)."})
    license: str | None = field(default=None, metadata={"help": "Card license (default mit; llama2 for LLaVA)."})
    base_model: list[str] = field(default_factory=list, metadata={"help": "Hub ids of the base model(s)."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub ids of the training datasets."})
    num_candidates: int | None = field(
        default=None, metadata={"help": "Candidate pool size, when curated_subset.json does not record it."}
    )
    space_id: str | None = field(default=None, metadata={"help": "Also publish space/ as a Gradio Space, ORG/NAME."})

    def __post_init__(self) -> None:
        for name in ("repo_id", "space_id"):
            value = getattr(self, name)
            if value is not None and (value.count("/") != 1 or not all(value.split("/"))):
                raise PublishError(f"--{name.replace('_', '-')} {value!r}: expected ORG/NAME.")


# ----- assembling the repository folder ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PublishError(f"{path}: not readable JSON ({error}).") from error


def model_type(model_dir: Path) -> str:
    """`chexficient` or `llava`, from the folder's config.json."""
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir}: no such model folder.")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PublishError(f"{model_dir}: no config.json; is this a saved model folder?")
    kind = _read_json(config_path).get("model_type")
    if kind not in ("chexficient", "llava"):
        raise PublishError(f"{config_path}: model_type {kind!r}; push_to_hub publishes 'chexficient' and 'llava'.")
    return kind


def _prepare_output(output_dir: Path, model_dir: Path) -> None:
    """An empty staging folder; only a folder this script staged before is emptied."""
    resolved = output_dir.resolve()
    if resolved == model_dir.resolve() or resolved in model_dir.resolve().parents:
        raise PublishError(f"--output-dir {output_dir} would overwrite the model folder {model_dir}.")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / STAGING_MARKER).is_file():
            raise PublishError(
                f"{output_dir}: exists and is not an earlier staging folder of this script; not touching it."
            )
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STAGING_MARKER).write_text("staged by scripts/push_to_hub.py; safe to delete\n")


def _staged_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != STAGING_MARKER
    )


def _auto_map_modules(folder: Path) -> dict[str, set[str]]:
    """{module file: configs naming it} for every `auto_map` entry in the folder's configs."""
    modules: dict[str, set[str]] = {}
    for name in AUTO_MAP_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        config = _read_json(path)
        maps = [config.get("auto_map") or {}, (config.get("image_processor") or {}).get("auto_map") or {}]
        for auto_map in maps:
            for reference in auto_map.values():
                for item in reference if isinstance(reference, list) else [reference]:
                    if item:
                        modules.setdefault(item.split("--")[-1].rsplit(".", 1)[0] + ".py", set()).add(name)
    return modules


def assemble(args: PushArguments, output_dir: Path) -> dict[str, Any]:
    """Write the repository folder; returns what went in (files, left-out files, card kind, notes)."""
    from .card import CardOptions, chexficient_card, llava_card, load_report_results, load_training_run

    model_dir = Path(args.model)
    kind = model_type(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        legacy = [p.name for p in model_dir.glob("*.bin")]
        hint = f" (found {', '.join(legacy)}; re-save with save_pretrained to get safetensors)" if legacy else ""
        raise PublishError(f"{model_dir}: no *.safetensors weights{hint}.")
    for folder in args.eval_dir:
        if not Path(folder).is_dir():
            raise PublishError(f"--eval-dir {folder}: no such folder.")
    _prepare_output(output_dir, model_dir)
    notes: list[str] = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.name in MODEL_FILES or path.suffix == ".safetensors"):
            shutil.copy2(path, output_dir / path.name)

    if kind == "chexficient":
        config = _read_json(output_dir / "config.json")
        if not all(key in (config.get("auto_map") or {}) for key in CHEXFICIENT_AUTO_MAP):
            config["auto_map"] = {**CHEXFICIENT_AUTO_MAP, **(config.get("auto_map") or {})}
            (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            notes.append("config.json: auto_map added (AutoConfig, AutoModel)")
    # remote code: the modules the configs' auto_map names (and all four CheXficient files for a CheXficient model)
    named = _auto_map_modules(output_dir)
    required = set(named) | (set(REMOTE_CODE_FILES) if kind == "chexficient" else set())
    for module in sorted(required):
        if (model_dir / module).is_file():
            shutil.copy2(model_dir / module, output_dir / module)
        elif module in REMOTE_CODE_FILES and (PROJECT_ROOT / module).is_file():
            shutil.copy2(PROJECT_ROOT / module, output_dir / module)
            notes.append(f"{module}: added from the project (the folder lacked it)")
        else:
            named_by = ", ".join(sorted(named.get(module, {"auto_map"})))
            raise PublishError(
                f"{model_dir}: {named_by} refers to {module}, which is neither in the folder nor known."
            )
    staged = {p.name for p in output_dir.iterdir()}
    left_out = sorted(p.name + ("/" if p.is_dir() else "") for p in model_dir.iterdir() if p.name not in staged)

    run = load_training_run(model_dir) if kind == "chexficient" else {}
    if run:
        (output_dir / "training").mkdir()
        for name, record in run.items():
            (output_dir / "training" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")

    options = CardOptions(
        repo_id=args.repo_id,
        license=args.license,
        base_model=args.base_model,
        datasets=args.datasets,
        num_candidates=args.num_candidates,
        space_id=args.space_id,
    )
    if kind == "chexficient":
        from ..results import load_results, plot_per_class_auroc

        results = [record for folder in args.eval_dir for record in load_results(folder)]
        plot = plot_per_class_auroc(results, output_dir / "eval" / "per_class_auroc.png") if results else None
        card = chexficient_card(output_dir, options, results, "eval/per_class_auroc.png" if plot else None, run=run)
    else:
        results = [record for folder in args.eval_dir for record in load_report_results(folder)]
        card = llava_card(output_dir, options, results)
    if args.eval_dir and not results:
        raise PublishError(f"--eval-dir {' '.join(args.eval_dir)}: no evaluation JSON for a {kind} model found there.")
    for record in results:
        source = Path(record["_path"])
        target = output_dir / "eval" / source.name
        if target.exists():
            raise PublishError(f"{source}: two evaluation files are named {source.name}; rename one.")
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(source, target)
    card.save(output_dir / "README.md")
    return {
        "kind": kind,
        "files": _staged_files(output_dir),
        "left_out": left_out,
        "notes": notes,
        "num_results": len(results),
    }


def assemble_space(args: PushArguments, output_dir: Path) -> Path:
    """Copy space/ for a Space repository, its card pointing at the published model."""
    from huggingface_hub import SpaceCard

    space_dir = output_dir.with_name(output_dir.name + "-space")
    _prepare_output(space_dir, Path(args.model))
    shutil.copytree(
        SPACE_DIR,
        space_dir,
        ignore=shutil.ignore_patterns(*SPACE_LEFT_OUT),
        dirs_exist_ok=True,
    )
    card = SpaceCard.load(space_dir / "README.md")
    card.data.models = [args.repo_id]
    card.save(space_dir / "README.md")
    return space_dir


def describe(folder: Path, files: list[str]) -> str:
    sizes = [(name, (folder / name).stat().st_size) for name in files]
    width = max(len(name) for name, _ in sizes)
    lines = [f"  {name:<{width}}  {size / 1e6:10.3f} MB" for name, size in sizes]
    lines.append(f"  {len(sizes)} files, {sum(s for _, s in sizes) / 1e6:.3f} MB")
    return "\n".join(lines)


# ----- uploading -----------------------------------------------------------------------------------------------------


def require_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN, the token file of `hf auth login`, ...); PublishError if none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access "
            "(or use --dry-run to assemble the folder without uploading)."
        )
    return token


def upload(args: PushArguments, folder: Path, summary: dict[str, Any], space_dir: Path | None) -> list[str]:
    """create_repo + upload_folder (and the Space); returns the commit URLs."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=require_token())
    message = args.commit_message or f"Upload {summary['kind']} model ({len(summary['files'])} files)"
    description = "Assembled by scripts/push_to_hub.py from `{}`; {} evaluation result(s).".format(
        Path(args.model).name, summary["num_results"]
    )
    try:
        api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
        if args.revision and args.revision != "main":
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        urls = [
            api.upload_folder(
                repo_id=args.repo_id,
                folder_path=folder,
                revision=args.revision,
                commit_message=message,
                commit_description=description,
                ignore_patterns=[STAGING_MARKER],
                delete_patterns=REPLACED_FOLDERS,  # results and run records of an earlier upload go, not linger
            ).commit_url
        ]
        if space_dir is not None:
            api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
            urls.append(
                api.upload_folder(
                    repo_id=args.space_id,
                    repo_type="space",
                    folder_path=space_dir,
                    commit_message=f"Space for {args.repo_id}",
                    ignore_patterns=[STAGING_MARKER],
                ).commit_url
            )
            api.add_space_variable(args.space_id, "CHEXFICIENT_MODEL", args.repo_id)
    except OfflineModeIsEnabled as error:
        raise PublishError("HF_HUB_OFFLINE is set: unset it to upload, or use --dry-run.") from error
    except HfHubHTTPError as error:
        raise PublishError(f"the Hub refused the upload to {args.repo_id}: {error}") from error
    return urls


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    output_dir = Path(args.output_dir or PROJECT_ROOT / "outputs" / "hub" / args.repo_id.split("/")[-1])
    summary = assemble(args, output_dir)
    space_dir = assemble_space(args, output_dir) if args.space_id else None
    print(f"Assembled {output_dir} ({summary['kind']} model card, {summary['num_results']} evaluation results):")
    print(describe(output_dir, summary["files"]))
    for note in summary["notes"]:
        print(f"  note: {note}")
    if summary["left_out"]:
        print(f"  left out of {args.model}: {', '.join(summary['left_out'])}")
    target = f"https://huggingface.co/{args.repo_id}" + (f" (branch {args.revision})" if args.revision else "")
    visibility = "private" if args.private else "public"
    if args.dry_run:
        print(f"Dry run: would upload these files to {target} as a {visibility} model repository.")
        if space_dir is not None:
            print(f"Dry run: would upload {space_dir} to https://huggingface.co/spaces/{args.space_id}.")
        return {**summary, "output_dir": str(output_dir), "commit_urls": []}
    urls = upload(args, output_dir, summary, space_dir)
    for url in urls:
        print(f"Committed: {url}")
    return {**summary, "output_dir": str(output_dir), "commit_urls": urls}


def cli() -> None:
    try:
        main()
    except PublishError as error:
        sys.exit(f"push_to_hub: {error}")


if __name__ == "__main__":
    cli()
