"""Publish a CheXficient or LLaVA-Rad model folder to the Hugging Face Hub, with a generated model card
(`scripts/push_to_hub.py` is the command).

    python scripts/push_to_hub.py --model outputs/demo/final --repo-id ORG/CheXficient-demo \\
        --eval-dir outputs/eval_demo --dry-run
    python scripts/push_to_hub.py --model outputs/demo/final --repo-id ORG/CheXficient-demo \\
        --eval-dir outputs/eval_demo --visibility public --space-id ORG/CheXficient-demo-space

Assembles the repository in `--output-dir` (default `outputs/hub/NAME`): safetensors weights, `config.json` with its
`auto_map`, the remote-code files, tokenizer, processor, `curated_subset.json`, the evaluation JSON under `eval/`, the
training run's arguments and summary under `training/`, and `README.md` (the model card). `--dry-run` stops there and
lists what would be uploaded; otherwise the folder goes up in one commit (`create_repo` + `upload_folder`). The token
comes from huggingface_hub's usual places (`HF_TOKEN`, `hf auth login`). `--space-id` also publishes `space/` as a
Gradio Space that serves this model.

Nothing is trusted that need not be: the repository (and the Space) is private unless `--visibility public`, and
`chexficient.hub.staging` decides what a staged folder may hold (remote code named by `auto_map`, no local paths).
The remote-code files and the Space come from this installation (package data in a wheel), never from a checkout.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers import HfArgumentParser

from .staging import (
    STAGING_MARKER,
    TOKEN_TABLES,
    LocalPaths,
    PublishError,
    check_no_local_paths,
    local_prefixes,
    read_json,
    remote_code_sources,
    space_source,
    staged_files,
)


if TYPE_CHECKING:
    from huggingface_hub import ModelCard


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
SPACE_LEFT_OUT = ("__pycache__", "*.pyc", "screenshot.py")  # not copied from space/ (screenshot.py is a dev tool)
REPLACED_FOLDERS = ["eval/*", "training/*"]
CURATED_IDS = ("ids", "indices")  # the curated subset's data: they must match the manifest, so they stay as recorded


@dataclass
class PushArguments:
    model: str = field(metadata={"help": "Model folder: a CheXficient folder or a LlavaForConditionalGeneration one."})
    repo_id: str = field(metadata={"help": "Target Hub repository, ORG/NAME."})
    visibility: Literal["private", "public"] = field(
        default="private",
        metadata={"help": "Visibility of the repository (and the Space) when it is created."},
    )
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


# ----- the model folder and the staging folder -----------------------------------------------------------------------


def model_type(model_dir: Path) -> str:
    """`chexficient` or `llava`, from the folder's config.json."""
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir}: no such model folder.")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PublishError(f"{model_dir}: no config.json; is this a saved model folder?")
    kind = read_json(config_path).get("model_type")
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


# ----- assembling ----------------------------------------------------------------------------------------------------


def _check_inputs(args: PushArguments, model_dir: Path) -> str:
    """The model kind, after the checks that need nothing written: weights present, eval folders exist."""
    kind = model_type(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        legacy = [p.name for p in model_dir.glob("*.bin")]
        hint = f" (found {', '.join(legacy)}; re-save with save_pretrained to get safetensors)" if legacy else ""
        raise PublishError(f"{model_dir}: no *.safetensors weights{hint}.")
    for folder in args.eval_dir:
        if not Path(folder).is_dir():
            raise PublishError(f"--eval-dir {folder}: no such folder.")
    return kind


def _stage_model_files(model_dir: Path, paths: LocalPaths, notes: list[str]) -> None:
    """Weights, configs, tokenizer and processor files, and the curated subset (its ids kept as recorded)."""
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or not (path.name in MODEL_FILES or path.suffix == ".safetensors"):
            continue
        if path.name == "curated_subset.json":
            paths.stage_json(path, path.name, notes, keep=CURATED_IDS)
        elif path.suffix == ".json" and path.name not in TOKEN_TABLES:
            paths.stage_json(path, path.name, notes, configs=True)
        else:
            shutil.copy2(path, paths.output_dir / path.name)


def _add_chexficient_auto_map(output_dir: Path, notes: list[str]) -> None:
    config = read_json(output_dir / "config.json")
    if not all(key in (config.get("auto_map") or {}) for key in CHEXFICIENT_AUTO_MAP):
        config["auto_map"] = {**CHEXFICIENT_AUTO_MAP, **(config.get("auto_map") or {})}
        (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        notes.append("config.json: auto_map added (AutoConfig, AutoModel)")


def _displayed_curation(
    model_dir: Path, args: PushArguments, run: dict[str, Any], paths: LocalPaths
) -> dict[str, Any] | None:
    """Curation statistics read from the model folder (its manifest is local), with the candidate list's path as
    the card may state it."""
    from .card import load_curation

    curation = load_curation(model_dir, args.num_candidates, run)
    return curation and {**curation, "source": paths.every_path(curation["source"])}


def _card(args: PushArguments, kind: str, run: dict[str, Any], paths: LocalPaths) -> tuple[ModelCard, list[dict]]:
    """The model card (and the per-class AUROC plot under eval/) and the evaluation results it reports."""
    from .card import CardOptions, chexficient_card, llava_card, load_report_results

    model_dir, output_dir = Path(args.model), paths.output_dir
    options = CardOptions(
        repo_id=args.repo_id,
        license=args.license,
        base_model=args.base_model,
        datasets=args.datasets,
        num_candidates=args.num_candidates,
        space_id=args.space_id,
        visibility=args.visibility,
    )
    if kind == "llava":
        results = [record for folder in args.eval_dir for record in load_report_results(folder)]
        return llava_card(output_dir, options, results), results
    from ..metrics.results import load_results, plot_per_class_auroc

    results = [record for folder in args.eval_dir for record in load_results(folder)]
    plot = plot_per_class_auroc(results, output_dir / "eval" / "per_class_auroc.png") if results else None
    shown_run = {name: paths.every_path(record) for name, record in run.items()}
    curation = _displayed_curation(model_dir, args, run, paths)
    plot_path = "eval/per_class_auroc.png" if plot else None
    return chexficient_card(output_dir, options, results, plot_path, shown_run, curation), results


def assemble(args: PushArguments, output_dir: Path) -> dict[str, Any]:
    """Write the repository folder; returns what went in (files, left-out files, card kind, notes)."""
    from .card import load_training_run

    model_dir = Path(args.model)
    kind = _check_inputs(args, model_dir)
    code = remote_code_sources(model_dir, kind)  # every auto_map reference checked before anything is written
    _prepare_output(output_dir, model_dir)
    run_dir = model_dir.resolve().parent  # train/pretrain.py writes final/ inside its run folder
    paths = LocalPaths(output_dir, run_dir, local_prefixes(model_dir, run_dir, *map(Path, args.eval_dir)))
    notes: list[str] = []
    _stage_model_files(model_dir, paths, notes)
    if kind == "chexficient":
        _add_chexficient_auto_map(output_dir, notes)
    for module, source in code.items():
        shutil.copy2(source, output_dir / module)
        if source.parent != model_dir:
            notes.append(f"{module}: added from the project (the folder lacked it)")
    staged = {p.name for p in output_dir.iterdir()}
    left_out = sorted(p.name + ("/" if p.is_dir() else "") for p in model_dir.iterdir() if p.name not in staged)

    run = load_training_run(model_dir) if kind == "chexficient" else {}
    for name, record in run.items():
        paths.stage_json(record, f"training/{name}.json", notes)
    card, results = _card(args, kind, run, paths)
    if args.eval_dir and not results:
        raise PublishError(f"--eval-dir {' '.join(args.eval_dir)}: no evaluation JSON for a {kind} model found there.")
    for record in results:
        source = Path(record["_path"])
        if (output_dir / "eval" / source.name).exists():
            raise PublishError(f"{source}: two evaluation files are named {source.name}; rename one.")
        paths.stage_json(source, f"eval/{source.name}", notes)
    card.save(output_dir / "README.md")
    check_no_local_paths(output_dir, paths.prefixes)
    return {
        "kind": kind,
        "files": staged_files(output_dir),
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
        space_source(),
        space_dir,
        ignore=shutil.ignore_patterns(*SPACE_LEFT_OUT),
        dirs_exist_ok=True,
    )
    card = SpaceCard.load(space_dir / "README.md")
    card.data.models = [args.repo_id]
    card.save(space_dir / "README.md")
    check_no_local_paths(space_dir, local_prefixes(Path(args.model)))
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
    private = args.visibility == "private"
    try:
        api.create_repo(args.repo_id, repo_type="model", private=private, exist_ok=True)
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
            api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
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


def parse_arguments(argv: list[str] | None = None) -> PushArguments:
    """The command line as PushArguments; PublishError for arguments it does not know (`--private` is now
    `--visibility`)."""
    parser = HfArgumentParser(PushArguments)
    args, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        hint = (
            "; the repository is private by default, --visibility public publishes it"
            if "--private" in unknown
            else ""
        )
        raise PublishError(f"unknown argument(s) {' '.join(unknown)}{hint}.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    output_dir = Path(args.output_dir or Path("outputs") / "hub" / args.repo_id.split("/")[-1])
    summary = assemble(args, output_dir)
    space_dir = assemble_space(args, output_dir) if args.space_id else None
    print(f"Assembled {output_dir} ({summary['kind']} model card, {summary['num_results']} evaluation results):")
    print(describe(output_dir, summary["files"]))
    for note in summary["notes"]:
        print(f"  note: {note}")
    if summary["left_out"]:
        print(f"  left out of {args.model}: {', '.join(summary['left_out'])}")
    target = f"https://huggingface.co/{args.repo_id}" + (f" (branch {args.revision})" if args.revision else "")
    space = f"https://huggingface.co/spaces/{args.space_id}"
    if args.dry_run:
        print(f"Dry run: would upload these files to {target} as a {args.visibility} model repository.")
        if space_dir is not None:
            print(f"Dry run: would upload {space_dir} to {space} as a {args.visibility} Space.")
        return {**summary, "output_dir": str(output_dir), "commit_urls": []}
    print(f"Uploading to {target} as a {args.visibility} model repository (an existing repository keeps its setting).")
    if space_dir is not None:
        print(f"Uploading {space_dir} to {space} as a {args.visibility} Space.")
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
