"""Publishing: the dry-run folder loads through the Auto classes in a clean process, its card parses and states the
folder's facts, and the upload sends what it should through huggingface_hub's real HTTP code (transport stubbed)."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import save_tiny_model
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http
from safetensors.torch import load_file

from chexficient.data.subsets import curated_subset_record, write_curated_subset
from chexficient.hub import publish as push_to_hub
from chexficient.hub.publish import PublishError
from chexficient.metrics.results import format_ci, load_results, model_index_entries
from llava_rad.prompt import save_prompt


ROOT = Path(__file__).resolve().parent.parent
EVAL_JSON = ROOT / "docs" / "results" / "eval_demo"
LLAVA_WORDS = (
    "<unk> <s> </s> <image> a chat between curious user and an artificial intelligence assistant . the gives helpful "
    "detailed polite answers to user's questions user: assistant: provide description of findings in radiology image "
    "given following indication: lungs are clear heart size is normal no pleural effusion pneumothorax"
).split()
LLAVA_CHAT_TEMPLATE = (
    "{{- 'A chat between a curious user and an artificial intelligence assistant. ' -}}"
    "{%- for message in messages -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{{- ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# A user's machine: the project is not importable, only torch, transformers and the downloaded folder.
CLEAN_PROCESS = textwrap.dedent(
    """
    import importlib.abc, sys
    PROJECT = {"configuration_chexficient", "modeling_chexficient", "image_processing_chexficient",
               "image_decoding_chexficient", "processing_chexficient", "chexficient", "train", "eval", "scripts", "inference", "space", "llava_rad"}

    class HideProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in PROJECT:
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, HideProject())
    import torch
    from safetensors.torch import save_file

    snippet, out = open(sys.argv[1]).read(), sys.argv[2]
    namespace = {}
    exec(compile(snippet, "model card snippet", "exec"), namespace)
    tensors = {}
    for name, value in namespace.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, dict) or hasattr(value, "data") and isinstance(value.data, dict):  # outputs, batches
            tensors.update({f"{name}.{k}": v for k, v in dict(value).items() if isinstance(v, torch.Tensor)})
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, out)
    """
)


def card_snippet(card_text: str, repo_id: str, folder: Path) -> str:
    """The card's first Python block with the repo id pointing at the local folder."""
    block = re.search(r"```python\n(.*?)```", card_text, re.S)
    assert block, "the card has no Python usage snippet"
    return block.group(1).replace(f'"{repo_id}"', repr(str(folder)))


def run_clean(snippet: str, workdir: Path) -> dict[str, torch.Tensor]:
    """Run a snippet in a fresh interpreter where the project cannot be imported; its tensors come back."""
    (workdir / "snippet.py").write_text(snippet)
    (workdir / "clean.py").write_text(CLEAN_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    done = subprocess.run(
        [sys.executable, "clean.py", "snippet.py", "out.safetensors"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(workdir / "out.safetensors")


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 36)) -> Path:
    pixels = (np.random.default_rng(seed).random(size) * 255).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A pretraining output folder as train/pretrain.py leaves it: final/ (model + curated subset), arguments, summary,
    a candidate manifest with a source column, and leftovers that must not be published."""
    run = tmp_path_factory.mktemp("run")
    final = run / "final"
    save_tiny_model(final)
    manifest = run / "pairs.csv"
    rows = [
        {"id": f"pair-{i:03d}", "path": f"img/{i}.png", "source": "mimic" if i < 12 else "padchest"} for i in range(20)
    ]
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "path", "source"])
        writer.writeheader()
        writer.writerows(rows)
    indices = [0, 3, 5, 12, 15, 19]
    write_curated_subset(
        final, curated_subset_record(indices, [rows[i]["id"] for i in indices], len(rows), source=str(manifest))
    )
    (run / "arguments.json").write_text(
        json.dumps({"train": {"num_epochs": 3, "learning_rate": 0.001, "per_device_batch_size": 20}, "data": {}})
    )
    (run / "summary.json").write_text(json.dumps({"steps": 9, "pairs_trained": 46, "seconds": 1.5}))
    (final / "optimizer.pt").write_bytes(b"not for the hub")
    (final / "checkpoints").mkdir()
    return final


def test_dry_run_folder_loads_in_a_clean_process_and_its_card_parses(trained_run, tmp_path):
    out, repo_id = tmp_path / "staged", "test-org/tiny-chexficient"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/push_to_hub.py",
            "--model",
            str(trained_run),
            "--repo-id",
            repo_id,
            "--eval-dir",
            str(EVAL_JSON),
            "--dry-run",
            "--output-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Dry run: would upload these files to https://huggingface.co/test-org/tiny-chexficient as a private model "
        "repository." in done.stdout
    )
    assert "left out of" in done.stdout and "optimizer.pt" in done.stdout and "checkpoints/" in done.stdout

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {push_to_hub.STAGING_MARKER}
    assert files == {
        "README.md",
        "config.json",
        "model.safetensors",
        "curated_subset.json",
        "configuration_chexficient.py",
        "modeling_chexficient.py",
        "image_decoding_chexficient.py",
        "image_processing_chexficient.py",
        "processing_chexficient.py",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "training/arguments.json",
        "training/summary.json",
        "eval/per_class_auroc.png",
        "eval/zero_shot_phantom.json",
        "eval/retrieval_phantom.json",
        "eval/linear_probe_phantom.json",
        "eval/segmentation_phantom_segmentation.json",
    }
    for name in files:
        assert name in done.stdout  # the listing names every file
    assert (
        json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"]
        == "modeling_chexficient.CheXficientModel"
    )

    # the card parses and states the folder's facts
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification" and "custom_code" in card.data.tags
    results = load_results(EVAL_JSON)
    entries = model_index_entries(results)
    assert len(card.data.eval_results) == len(entries) == 12
    by_name = {(r.dataset_name, r.metric_name): r for r in card.data.eval_results}
    zero_shot = json.loads((EVAL_JSON / "zero_shot_phantom.json").read_text())
    macro = by_name[("phantom", "macro_auroc")]
    assert macro.metric_value == round(zero_shot["metrics"]["macro_auroc"]["value"], 4)
    assert macro.task_type == "zero-shot-image-classification" and macro.dataset_split == "test"
    text = card.text
    for expected in (
        "| candidate pairs | 20 |",
        "| curated pairs | 6 (30.0%) |",
        "| mimic | 12 | 3 | 25.0% |",
        "| padchest | 8 | 3 | 37.5% |",
        "| optimizer steps | 9 |",
        format_ci(zero_shot["metrics"]["macro_auroc"]),  # the table of the eval JSON, with its CI
        "![Per-class zero-shot AUROC](eval/per_class_auroc.png)",
        "## Out-of-scope use",
        "not a medical device",
        "## Limitations",
        "Reduced configuration",
        "synthetic phantoms",
        "## License",
        "arXiv:2602.22843",
        "chexficient classify",
        "hf download test-org/tiny-chexficient",
        "This repository was published as **private**",
    ):
        assert expected in text, expected

    # the card's own usage snippet runs against the folder where the project is not installed, and agrees with it
    work = tmp_path / "user"
    work.mkdir()
    write_png(work / "cxr.png")
    tensors = run_clean(card_snippet(text, repo_id, out), work)
    from modeling_chexficient import CheXficientModel
    from processing_chexficient import CheXficientProcessor

    model = CheXficientModel.from_pretrained(trained_run).eval()
    processor = CheXficientProcessor.from_pretrained(trained_run)
    inputs = processor(
        images=[work / "cxr.png"], text=["No acute cardiopulmonary process.", "Small right pleural effusion."]
    )
    findings = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "No Finding"]
    with torch.no_grad():
        expected = model(**inputs)
        probs = model.zero_shot_classify(findings, processor.tokenizer, pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(tensors["inputs.pixel_values"], inputs["pixel_values"])
    torch.testing.assert_close(tensors["out.image_embeds"], expected.image_embeds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tensors["out.logits_per_image"], expected.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tensors["probs"], probs, atol=1e-6, rtol=1e-5)


def test_converter_folder_gets_auto_map_and_code_and_an_honest_share(tmp_path):
    folder = tmp_path / "converted"
    save_tiny_model(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_chexficient.py").unlink()
    (folder / "curated_subset.json").write_text(
        json.dumps({"num_ids": 3, "source": "pytorch_model.pth", "ids": [4, 8, 9]})
    )

    summary = push_to_hub.main(
        ["--model", str(folder), "--repo-id", "o/converted", "--dry-run", "--output-dir", str(tmp_path / "a")]
    )
    staged = Path(summary["output_dir"])
    assert json.loads((staged / "config.json").read_text())["auto_map"] == push_to_hub.CHEXFICIENT_AUTO_MAP
    assert (staged / "modeling_chexficient.py").read_text() == (ROOT / "modeling_chexficient.py").read_text()
    assert any("modeling_chexficient.py: added from the project" in note for note in summary["notes"])
    text = ModelCard.load(staged / "README.md").text
    assert "| curated pairs | 3 |" in text and "not recorded (share unknown)" in text
    assert "No evaluation results were bundled" in text

    summary = push_to_hub.main(
        [
            "--model",
            str(folder),
            "--repo-id",
            "o/converted",
            "--dry-run",
            "--output-dir",
            str(tmp_path / "a"),  # staging again into the same folder replaces it
            "--num-candidates",
            "12",
            "--license",
            "apache-2.0",
            "--base-model",
            "facebook/dinov2-base",
        ]
    )
    card = ModelCard.load(Path(summary["output_dir"]) / "README.md")
    assert "| curated pairs | 3 (25.0%) |" in card.text and "| candidate pairs | 12 |" in card.text
    assert card.data.license == "apache-2.0" and card.data.base_model == ["facebook/dinov2-base"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_card_counts_curated_pairs_per_source_with_the_ids_pretraining_reads(tmp_path, suffix):
    import pandas as pd

    rows = [(7, "mimic"), (8, "mimic"), (9, "chexpert"), (10, "nih"), (11, "chexpert")]
    frame = pd.DataFrame(
        [(i, f"{i}.png", "Clear lungs.", source) for i, source in rows], columns=["id", "path", "report", "source"]
    )
    manifest = tmp_path / f"candidates{suffix}"
    if suffix == ".csv":
        frame.to_csv(manifest, index=False)
    else:
        frame.to_parquet(manifest)
    folder = tmp_path / "model"
    save_tiny_model(folder)
    # pretraining records the ids as text, as chexficient.data.pairs reads them from the manifest
    write_curated_subset(
        folder, curated_subset_record([0, 2, 4], ids=["7", "9", "11"], num_candidates=5, source=str(manifest))
    )

    summary = push_to_hub.main(
        ["--model", str(folder), "--repo-id", "o/sources", "--dry-run", "--output-dir", str(tmp_path / "staged")]
    )
    text = ModelCard.load(Path(summary["output_dir"]) / "README.md").text
    assert "| chexpert | 2 | 2 | 100.0% |" in text
    assert "| mimic | 2 | 1 | 50.0% |" in text
    assert "| nih | 1 | 0 | 0.0% |" in text
    assert "| curated pairs | 3 (60.0%) |" in text


def test_bad_folders_and_arguments_are_clear_errors(tmp_path, trained_run):
    def fails(argv, *expected):
        with pytest.raises(PublishError) as info:
            push_to_hub.main([*argv, "--dry-run", "--output-dir", str(tmp_path / "out")])
        for text in expected:
            assert text in str(info.value), (text, str(info.value))

    fails(["--model", str(tmp_path / "nowhere"), "--repo-id", "o/n"], "nowhere", "no such model folder")
    (tmp_path / "empty").mkdir()
    fails(["--model", str(tmp_path / "empty"), "--repo-id", "o/n"], "empty", "no config.json")
    bin_only = tmp_path / "bin_only"
    shutil.copytree(trained_run, bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    fails(["--model", str(bin_only), "--repo-id", "o/n"], "bin_only", "no *.safetensors", "pytorch_model.bin")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fails(["--model", str(other), "--repo-id", "o/n"], "model_type 'bert'")
    fails(["--model", str(trained_run), "--repo-id", "no-namespace"], "--repo-id 'no-namespace'", "ORG/NAME")
    fails(["--model", str(trained_run), "--repo-id", "o/n", "--eval-dir", str(tmp_path / "no_eval")], "no_eval")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(PublishError, match="is not an earlier staging folder of this script; not touching it"):
        push_to_hub.main(["--model", str(trained_run), "--repo-id", "o/n", "--dry-run", "--output-dir", str(busy)])
    assert (busy / "notes.txt").read_text() == "mine"
    for target in (trained_run, trained_run.parent):
        with pytest.raises(PublishError, match="would overwrite the model folder"):
            push_to_hub.main(
                ["--model", str(trained_run), "--repo-id", "o/n", "--dry-run", "--output-dir", str(target)]
            )
    assert (trained_run / "model.safetensors").is_file()


def _model_with_auto_map(folder: Path, config_name: str, key: str, reference) -> Path:
    save_tiny_model(folder)
    config = json.loads((folder / config_name).read_text())
    config.setdefault("auto_map", {})[key] = reference
    (folder / config_name).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("config_name", "key", "reference"),
    [
        ("config.json", "AutoModel", "../../pwn.X"),  # a path up and out of the model folder
        ("config.json", "AutoModel", "ABSOLUTE/pwn.X"),  # an absolute path (ABSOLUTE: this test's tmp_path)
        ("config.json", "AutoModel", "pkg.pwn.X"),  # a dotted package: module pkg/pwn
        ("config.json", "AutoModel", "org/repo--../../pwn.X"),  # the repo-- prefix does not launder a path
        ("tokenizer_config.json", "AutoTokenizer", [None, "../../pwn.X"]),  # [slow, fast] lists are checked too
    ],
)
def test_auto_map_names_only_module_files_of_the_model_folder(tmp_path, config_name, key, reference):
    reference = json.loads(json.dumps(reference).replace("ABSOLUTE", str(tmp_path / "evil")))
    model = _model_with_auto_map(tmp_path / "src" / "x" / "model", config_name, key, reference)
    planted = [tmp_path / "src" / "pwn.py", tmp_path / "evil" / "pwn.py", model / "pkg" / "pwn.py"]
    for path in planted:  # every file the bad reference could point at exists
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("raise SystemExit('pwned')\n")
    staged = tmp_path / "out" / "y" / "staged"
    with pytest.raises(PublishError) as info:
        push_to_hub.main(["--model", str(model), "--repo-id", "o/n", "--dry-run", "--output-dir", str(staged)])
    bad = reference[-1] if isinstance(reference, list) else reference
    assert str(model / config_name) in str(info.value) and repr(bad) in str(info.value)
    assert sorted(tmp_path.rglob("pwn.py")) == sorted(planted)  # nothing copied anywhere, above staging or not
    assert not staged.exists()  # checked before anything was written


def test_auto_map_repo_prefix_is_ignored_and_links_out_of_the_folder_are_refused(tmp_path):
    reference = "someone/CheXficient--modeling_chexficient.CheXficientModel"
    model = _model_with_auto_map(tmp_path / "model", "config.json", "AutoModel", reference)
    summary = push_to_hub.main(
        ["--model", str(model), "--repo-id", "o/n", "--dry-run", "--output-dir", str(tmp_path / "staged")]
    )
    staged = Path(summary["output_dir"])
    assert (staged / "modeling_chexficient.py").read_bytes() == (model / "modeling_chexficient.py").read_bytes()

    outside = tmp_path / "elsewhere.py"
    outside.write_text("# not part of the model folder\n")
    (model / "modeling_chexficient.py").unlink()
    (model / "modeling_chexficient.py").symlink_to(outside)
    with pytest.raises(PublishError, match="links outside the model folder"):
        push_to_hub.main(["--model", str(model), "--repo-id", "o/n", "--dry-run", "--output-dir", str(staged)])


def test_staged_files_hold_no_absolute_paths_of_this_machine(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    final = run / "final"
    save_tiny_model(final)
    (data / "Bio_ClinicalBERT").mkdir(parents=True)
    config = json.loads((final / "config.json").read_text())
    config["text_config"]["_name_or_path"] = str(data / "Bio_ClinicalBERT")  # a tower initialised from a local copy
    (final / "config.json").write_text(json.dumps(config))
    manifest = run / "pairs.csv"
    manifest.write_text("id,path,source\na,0.png,mimic\nb,1.png,nih\nc,2.png,mimic\nd,3.png,nih\n")
    write_curated_subset(final, curated_subset_record([0, 2], ["a", "c"], 4, source=str(manifest)))
    arguments = {
        "model": {"model_name_or_path": None, "init_text_from": str(data / "Bio_ClinicalBERT")},
        "data": {"train_manifest": str(manifest), "image_root": str(data / "images"), "id_column": "id"},
        "train": {
            "output_dir": str(run),
            "num_epochs": 1,
            "deepspeed": f"--config {tmp_path}/configs/zero2.json",
            "logging_dir": str(Path.home() / "logs"),
            "resume_from": str(Path.cwd() / "outputs" / "pretrain" / "checkpoint-9"),
        },
    }
    (run / "arguments.json").write_text(json.dumps(arguments))
    (run / "summary.json").write_text(json.dumps({"steps": 2, "final_model": str(final), "by_path": {str(run): 1}}))
    evals = tmp_path / "eval"
    evals.mkdir()
    zero_shot = json.loads((EVAL_JSON / "zero_shot_phantom.json").read_text())
    zero_shot.update(model=str(final), manifest=str(data / "test.csv"))
    (evals / "zero_shot_phantom.json").write_text(json.dumps(zero_shot))
    shutil.copy(EVAL_JSON / "retrieval_phantom.json", evals)  # no local path: copied byte for byte

    summary = push_to_hub.main(
        ["--model", str(final), "--repo-id", "o/n", "--eval-dir", str(evals), "--dry-run"]
        + ["--output-dir", str(tmp_path / "staged")]
    )
    staged = Path(summary["output_dir"])
    forbidden = {str(tmp_path), str(Path.home()), str(Path.cwd()), str(ROOT)}
    for name, content in _staged_files(staged).items():
        text = content.decode("utf-8", errors="replace")
        assert not [path for path in forbidden if path in text], name

    # what the paths became: relative to the run folder when inside it, else the file name
    args = json.loads((staged / "training" / "arguments.json").read_text())
    assert args["data"] == {"train_manifest": "pairs.csv", "image_root": "images", "id_column": "id"}
    assert args["model"]["init_text_from"] == "Bio_ClinicalBERT" and args["train"]["output_dir"] == "."
    assert args["train"]["deepspeed"] == "--config zero2.json" and args["train"]["logging_dir"] == "logs"
    assert json.loads((staged / "training" / "summary.json").read_text())["by_path"] == {".": 1}
    subset = json.loads((staged / "curated_subset.json").read_text())
    assert subset["source"] == "pairs.csv" and subset["ids"] == ["a", "c"] and subset["indices"] == [0, 2]
    evaluated = json.loads((staged / "eval" / "zero_shot_phantom.json").read_text())
    assert evaluated["model"] == "final" and evaluated["manifest"] == "test.csv"
    assert evaluated["metrics"] == zero_shot["metrics"]
    assert (staged / "eval" / "retrieval_phantom.json").read_bytes() == (evals / "retrieval_phantom.json").read_bytes()
    assert json.loads((staged / "config.json").read_text())["text_config"]["_name_or_path"] == "Bio_ClinicalBERT"
    assert any(note.startswith("training/arguments.json: 7 local path(s)") for note in summary["notes"])
    # the card still counts per source (the manifest is read where it is) but names it by its run-relative path
    text = ModelCard.load(staged / "README.md").text
    assert "| candidate list | `pairs.csv` |" in text and "| mimic | 2 | 2 | 100.0% |" in text

    # a file the rewriting does not understand, holding a local path, stops the upload
    (final / "chat_template.jinja").write_text(f"{{# trained in {run} #}}")
    with pytest.raises(PublishError, match="chat_template.jinja: holds the local path"):
        push_to_hub.main(["--model", str(final), "--repo-id", "o/n", "--dry-run", "--output-dir", str(staged)])


# ----- the upload, with huggingface_hub's HTTP transport stubbed ---------------------------------------------------


class FakeHub:
    """Answers huggingface_hub's requests like the Hub would and records them. `lfs` decides the upload mode."""

    def __init__(self, lfs_suffixes: tuple[str, ...] = (), remote_files: tuple[str, ...] = ()):
        self.lfs_suffixes = lfs_suffixes
        self.remote_files = remote_files
        self.requests: list[httpx2.Request] = []
        self.commits: dict[str, list[dict]] = {}
        self.lfs_uploads: dict[str, bytes] = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        self.requests.append(request)
        path = request.url.path
        if request.method == "GET" and "/tree/" in path:
            return httpx2.Response(
                200, json=[{"type": "file", "path": f, "oid": "1" * 40, "size": 1} for f in self.remote_files]
            )
        if request.method == "GET":
            return httpx2.Response(404, json={"error": "not stubbed"})  # registry look-ups are best-effort
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == "/api/repos/create":
            payload = json.loads(body)
            return httpx2.Response(
                200, json={"url": f"https://huggingface.co/{payload['organization']}/{payload['name']}"}
            )
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = ["lfs" if f["path"].endswith(self.lfs_suffixes) else "regular" for f in files]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": m, "shouldIgnore": False} for f, m in zip(files, modes)
                    ]
                },
            )
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            actions = [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"https://lfs.test/{o['oid']}"}}}
                for o in objects
            ]
            return httpx2.Response(200, json={"transfer": "basic", "objects": actions})
        if request.url.host == "lfs.test":
            self.lfs_uploads[path.strip("/")] = body
            return httpx2.Response(200)
        if "/commit/" in path:
            repo = path.split("/commit/")[0].removeprefix("/api/")
            self.commits[repo] = [json.loads(line) for line in body.decode().splitlines()]
            return httpx2.Response(
                200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/0123", "commitOid": "0" * 40}
            )
        if "/branch/" in path or path.endswith("/variables"):
            return httpx2.Response(200, json={})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests if r.method != "GET"]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Route huggingface_hub's HTTP client through a FakeHub; a token in HF_TOKEN; offline mode off."""
    hubs: list[FakeHub] = []

    def install(**kwargs) -> FakeHub:
        hub = FakeHub(**kwargs)
        hubs.append(hub)
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
        return hub

    monkeypatch.setenv("HF_TOKEN", "hf_test_write_token")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield install
    _http.set_client_factory(_http.default_client_factory)


def _staged_files(folder: Path) -> dict[str, bytes]:
    """The staged files that make the repository (the staging marker is never uploaded)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert files.pop(push_to_hub.STAGING_MARKER)
    return files


def test_upload_commits_every_staged_file_with_the_commit_message(fake_hub, trained_run, tmp_path):
    hub = fake_hub(remote_files=("README.md", "eval/old_task.json", "training/summary.json", "notes/keep.md"))
    summary = push_to_hub.main(
        [
            "--model",
            str(trained_run),
            "--repo-id",
            "test-org/tiny",
            "--eval-dir",
            str(EVAL_JSON),
            "--commit-message",
            "Publish the tiny model",
            "--output-dir",
            str(tmp_path / "staged"),
            "--space-id",
            "test-org/tiny-demo",
        ]
    )
    calls = hub.calls()
    assert calls[0] == ("POST", "/api/repos/create")
    creates = [json.loads(r.content) for r in hub.requests if r.url.path == "/api/repos/create"]
    # private unless asked otherwise: the model repository and the Space
    assert creates[0] == {"name": "tiny", "organization": "test-org", "type": "model", "visibility": "private"}
    assert creates[1]["visibility"] == "private"
    assert ("POST", "/api/models/test-org/tiny/commit/main") in calls
    assert all(r.headers["authorization"] == "Bearer hf_test_write_token" for r in hub.requests if r.method == "POST")

    header, *operations = hub.commits["models/test-org/tiny"]
    assert header == {
        "key": "header",
        "value": {"summary": "Publish the tiny model", "description": header["value"]["description"]},
    }
    assert "4 evaluation result(s)" in header["value"]["description"]
    sent = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations if op["key"] == "file"}
    assert sent == _staged_files(Path(summary["output_dir"]))  # every file, byte for byte, nothing else
    # a stale result of an earlier upload is deleted; files outside eval/ and training/ are left alone
    assert [op["value"]["path"] for op in operations if op["key"] == "deletedFile"] == ["eval/old_task.json"]
    assert summary["commit_urls"][0] == "https://huggingface.co/models/test-org/tiny/commit/0123"

    # the Space: a gradio Space repository, the app files, and the model it serves
    assert creates[1]["type"] == "space" and creates[1]["sdk"] == "gradio" and creates[1]["name"] == "tiny-demo"
    space_files = {op["value"]["path"]: op for op in hub.commits["spaces/test-org/tiny-demo"][1:]}
    assert {"app.py", "requirements.txt", "README.md", "report_bank.csv"} <= set(space_files)
    assert "screenshot.py" not in space_files and push_to_hub.STAGING_MARKER not in space_files
    space_readme = base64.b64decode(space_files["README.md"]["value"]["content"]).decode()
    assert "sdk: gradio" in space_readme and "- test-org/tiny" in space_readme
    variable = next(r for r in hub.requests if r.url.path.endswith("/variables"))
    assert json.loads(variable.content) == {"key": "CHEXFICIENT_MODEL", "value": "test-org/tiny"}


def test_upload_sends_weights_through_lfs(fake_hub, trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the LFS protocol over HTTP, not hf_xet's own client
    hub = fake_hub(lfs_suffixes=(".safetensors", ".png"))
    summary = push_to_hub.main(
        [
            "--model",
            str(trained_run),
            "--repo-id",
            "test-org/tiny",
            "--revision",
            "v1",
            "--eval-dir",
            str(EVAL_JSON),
            "--output-dir",
            str(tmp_path / "staged"),
        ]
    )
    staged = _staged_files(Path(summary["output_dir"]))
    assert ("POST", "/api/models/test-org/tiny/branch/v1") in hub.calls()
    _, *operations = hub.commits["models/test-org/tiny"]
    lfs = {op["value"]["path"]: op["value"] for op in operations if op["key"] == "lfsFile"}
    assert set(lfs) == {"model.safetensors", "eval/per_class_auroc.png"}
    for name, entry in lfs.items():
        digest = hashlib.sha256(staged[name]).hexdigest()
        assert entry["algo"] == "sha256" and entry["oid"] == digest and entry["size"] == len(staged[name])
        assert hub.lfs_uploads[digest] == staged[name]
    regular = {op["value"]["path"] for op in operations if op["key"] == "file"}
    assert regular | set(lfs) == set(staged)
    assert len(staged) == 20  # the five remote-code files and preprocessor_config.json (for 4.x) among them
    assert hub.commits["models/test-org/tiny"][0]["value"]["summary"] == "Upload chexficient model (20 files)"


def test_missing_token_is_a_clear_error_and_nothing_is_sent(fake_hub, trained_run, tmp_path, monkeypatch):
    hub = fake_hub()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_tokens"))
    with pytest.raises(PublishError, match=r"no Hugging Face token found: run `hf auth login` or set HF_TOKEN"):
        push_to_hub.main(["--model", str(trained_run), "--repo-id", "o/n", "--output-dir", str(tmp_path / "s")])
    assert hub.requests == []
    done = subprocess.run(
        [sys.executable, "scripts/push_to_hub.py", "--model", str(tmp_path / "missing"), "--repo-id", "o/n"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "push_to_hub:" in done.stderr and "missing: no such model folder" in done.stderr


def test_visibility_is_private_unless_public_is_asked_for(fake_hub, trained_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    asked = []
    create_repo = HfApi.create_repo

    def recording_create_repo(self, repo_id, **kwargs):
        asked.append((repo_id, kwargs["repo_type"], kwargs["private"]))
        return create_repo(self, repo_id, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", recording_create_repo)
    argv = ["--model", str(trained_run), "--repo-id", "test-org/tiny", "--output-dir", str(tmp_path / "staged")]
    for flags, visibility in (([], "private"), (["--visibility", "public"], "public")):
        hub = fake_hub()
        asked.clear()
        summary = push_to_hub.main([*argv, *flags, "--space-id", "test-org/tiny-demo"])
        private = visibility == "private"
        assert asked == [("test-org/tiny", "model", private), ("test-org/tiny-demo", "space", private)]
        creates = [json.loads(r.content) for r in hub.requests if r.url.path == "/api/repos/create"]
        assert [create["visibility"] for create in creates] == [visibility, visibility]
        out = capsys.readouterr().out
        assert f"Uploading to https://huggingface.co/test-org/tiny as a {visibility} model repository" in out
        assert f"as a {visibility} Space" in out
        card = ModelCard.load(Path(summary["output_dir"]) / "README.md").text
        assert f"This repository was published as **{visibility}**" in card

    push_to_hub.main([*argv, "--visibility", "public", "--dry-run"])
    assert (
        "would upload these files to https://huggingface.co/test-org/tiny as a public model" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):  # argparse: invalid choice
        push_to_hub.main([*argv, "--visibility", "protected", "--dry-run"])
    with pytest.raises(PublishError, match="unknown argument.*--private.*private by default, --visibility public"):
        push_to_hub.main([*argv, "--private", "--dry-run"])


# ----- LLaVA-Rad ---------------------------------------------------------------------------------------------------


def save_tiny_llava(folder: Path) -> Path:
    """A tiny random LlavaForConditionalGeneration (Dinov2 tower at 28 px, Llama) with a stock processor and a
    Vicuna-style chat template, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        Dinov2Config,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {word: i for i, word in enumerate(dict.fromkeys(LLAVA_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vision = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        image_seq_length=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    import transformers.utils.logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # CLIPImageProcessor falls back to its PIL backend without torchvision
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    hf_logging.set_verbosity(verbosity)
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    save_prompt(folder)  # what llava_rad/export.py writes: the instruction clients build prompts from
    return folder


def test_llava_dry_run_card_and_clean_process_generation(tmp_path):
    folder = save_tiny_llava(tmp_path / "llava")
    metrics = tmp_path / "llava_eval"
    metrics.mkdir()
    (metrics / "mimic_test.metrics.json").write_text(
        json.dumps(
            {
                "metrics": {
                    "bleu4": {"value": 12.5, "median": 12.4, "ci_low": 11.0, "ci_high": 14.0},
                    "rougeL": {"value": 0.29, "median": 0.29, "ci_low": 0.27, "ci_high": 0.31},
                },
                "num_reports": 2461,
                "num_resamples": 500,
                "not_run": ["radgraph"],
            }
        )
    )
    repo_id = "test-org/tiny-llava-rad"
    summary = push_to_hub.main(
        [
            "--model",
            str(folder),
            "--repo-id",
            repo_id,
            "--eval-dir",
            str(metrics),
            "--dry-run",
            "--output-dir",
            str(tmp_path / "staged"),
            "--base-model",
            "lmsys/vicuna-7b-v1.5",
        ]
    )
    staged = Path(summary["output_dir"])
    assert summary["kind"] == "llava" and not any(name.endswith(".py") for name in summary["files"])
    assert {"config.json", "model.safetensors", "chat_template.jinja", "processor_config.json"} <= set(
        summary["files"]
    )
    card = ModelCard.load(staged / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.license == "llama2"
    assert card.data.base_model == ["lmsys/vicuna-7b-v1.5"]
    assert {(r.metric_name, r.metric_value, r.task_type) for r in card.data.eval_results} == {
        ("bleu4", 12.5, "image-to-text"),
        ("rougeL", 0.29, "image-to-text"),
    }
    for expected in (
        "| bleu4 | 12.500 | 11.000–14.000 |",
        "Not run: radgraph.",
        "(2461 reports)",
        "LoRA",
        "not a medical device",
        "10.1038/s41467-025-58344-x",
        "4 tokens per image",
        "Reduced configuration",
        "`dinov2`",
    ):
        assert expected in card.text, expected

    work = tmp_path / "user"
    work.mkdir()
    write_png(work / "cxr.png")
    tensors = run_clean(card_snippet(card.text, repo_id, staged), work)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Provide a description of the findings in the radiology image."},
            ],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nProvide a description of the findings in the radiology image. ASSISTANT:")
    inputs = processor(images=PIL.Image.open(work / "cxr.png").convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=256, do_sample=False)
    assert torch.equal(tensors["output"], expected)
