"""The saved folder on the transformers users have: the oldest supported 4.x, the newest 4.x and the newest 5.x.

Each runs the model card's snippets (`tests/compat/folder_user.py`) in an environment holding only torch, Pillow, NumPy
and that transformers release (prepared by `scripts/prepare_transformers_checks.py`, which `make setup` runs), and
must give the pinned release's embeddings, logits, zero-shot probabilities and pipeline scores to 1e-5. Loading must
never stop to ask: the plain tokenizer loads of 4.x and every load our own code makes run in a pseudo-terminal, where
transformers' "Do you wish to run the custom code?" would wait for an answer.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from helpers import run_without_project, tiny_config, tiny_tokenizer

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from prepare_transformers_checks import MATRIX_VERSIONS, matrix_python, matrix_site  # noqa: E402


USER_SCRIPT = ROOT / "tests" / "compat" / "folder_user.py"
TEXT_POSITIONS = 64  # the tiny text tower's max_position_embeddings
PROMPT = "Do you wish to run the custom code"
WRONG_TYPE_WARNING = "to instantiate a model of type"


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CheXficient folder saved by the pinned transformers, and a radiograph."""
    root = tmp_path_factory.mktemp("versions")
    folder = root / "model"
    CheXficientModel(tiny_config()).eval().save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = TEXT_POSITIONS
    CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tokenizer).save_pretrained(folder)
    image = root / "cxr.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((40, 32)) * 255).astype(np.uint8)).save(image)
    return folder, image


@pytest.fixture(scope="module")
def pinned(saved_folder, tmp_path_factory) -> dict:
    """What the snippets give on the pinned transformers, where this project cannot be imported."""
    folder, image = saved_folder
    work = tmp_path_factory.mktemp("pinned")
    output = work / "pinned.json"
    run_without_project(USER_SCRIPT.read_text(), folder, image, output, workdir=work)
    return json.loads(output.read_text())


def _matrix_environment(version: str, modules: Path) -> dict[str, str]:
    site = matrix_site(version)
    if not (matrix_python().exists() and (site / "ready").exists()):
        pytest.fail(
            f"transformers {version} is not prepared in {site}: run `make setup` (or "
            "`python scripts/prepare_transformers_checks.py --only matrix`)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(modules))
    return env


def run_in_terminal(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> str:
    """Run `command` with a pseudo-terminal as stdin, stdout and stderr (an interactive session) and return what it
    printed; fails as soon as transformers asks whether to run custom code, instead of waiting for its timeout."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    printed, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: the process has ended
                    break
                if not chunk:
                    break
                printed += chunk
                if PROMPT.encode() in printed:
                    pytest.fail(f"{' '.join(command)} stopped to ask:\n{printed.decode(errors='replace')[-2000:]}")
            elif process.poll() is not None:
                break
        else:
            pytest.fail(f"{' '.join(command)} still running after {timeout} s:\n{printed.decode(errors='replace')}")
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    text = printed.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    return text


def _max_difference(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.mark.parametrize("version", MATRIX_VERSIONS)
def test_the_folder_gives_the_pinned_results_on_each_supported_transformers(version, saved_folder, pinned, tmp_path):
    folder, image = saved_folder
    output = tmp_path / "out.json"
    env = _matrix_environment(version, tmp_path / "modules")
    command = [str(matrix_python()), "-s", "-P", str(USER_SCRIPT), str(folder), str(image), str(output)]
    printed = run_in_terminal(command, env, cwd=tmp_path)

    assert WRONG_TYPE_WARNING not in printed, printed[-3000:]
    got = json.loads(output.read_text())
    assert got["transformers"] == version  # the release under test, not the project's
    assert (got["model_class"], got["processor_class"]) == ("CheXficientModel", "CheXficientProcessor")
    assert got["tokenizer_ids"] == got["processor_ids"] == pinned["processor_ids"]
    assert got["model_max_length"] == TEXT_POSITIONS == pinned["model_max_length"]
    for key in ("image_embeds", "text_embeds", "logits_per_image", "zero_shot"):
        assert np.shape(got[key]) == np.shape(pinned[key]), key
        assert _max_difference(got[key], pinned[key]) <= 1e-5, (key, _max_difference(got[key], pinned[key]))
    assert sorted(got["pipeline"]) == sorted(pinned["pipeline"])
    labels = sorted(pinned["pipeline"])
    assert _max_difference([got["pipeline"][k] for k in labels], [pinned["pipeline"][k] for k in labels]) <= 1e-5


PLAIN_TOKENIZER = """
import sys
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
print("model_max_length", tokenizer.model_max_length)
"""


@pytest.mark.parametrize("version", [v for v in MATRIX_VERSIONS if v.startswith("4.")])
def test_a_plain_tokenizer_load_never_asks_on_transformers_4(version, saved_folder, tmp_path):
    folder, _ = saved_folder
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TOKENIZER)
    env = _matrix_environment(version, tmp_path / "modules")
    printed = run_in_terminal([str(matrix_python()), "-s", "-P", str(script), str(folder)], env, cwd=tmp_path)
    assert f"model_max_length {TEXT_POSITIONS}" in printed
    assert WRONG_TYPE_WARNING not in printed, printed


OUR_LOADS = """
import sys
from transformers import AutoTokenizer

from processing_chexficient import load_tokenizer
from train.pretrain import load_tokenizer as load_run_tokenizer
from train.arguments import ModelArguments

folder = sys.argv[1]
loaded = [
    load_tokenizer(folder),
    load_run_tokenizer(ModelArguments(model_name_or_path=folder), None, None, None),  # the demo's second stage
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True),  # the model card's snippet
]
print("model_max_length", sorted({tokenizer.model_max_length for tokenizer in loaded}))
"""


def test_our_tokenizer_loads_never_ask_on_the_pinned_transformers(saved_folder, tmp_path):
    """The demo's warm start, `load_tokenizer` and the model card's snippet, in a terminal on transformers 5."""
    folder, _ = saved_folder
    script = tmp_path / "ours.py"
    script.write_text(OUR_LOADS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"))
    printed = run_in_terminal([sys.executable, str(script), str(folder)], env, cwd=tmp_path)
    assert f"model_max_length [{TEXT_POSITIONS}]" in printed, printed[-3000:]
    assert WRONG_TYPE_WARNING not in printed, printed[-3000:]


def test_the_saved_tokenizer_config_holds_the_tower_limit_and_no_loading_arguments(tmp_path):
    """A tokenizer loaded with `local_files_only` (as the demo's is) saves clean, with the text tower's limit."""
    from processing_chexficient import load_tokenizer

    first = tmp_path / "first"
    tiny_tokenizer().save_pretrained(first)
    tokenizer = load_tokenizer(first, local_files_only=True)
    assert tokenizer.init_kwargs.get("local_files_only") is True  # what transformers 5 would write back
    tokenizer.model_max_length = TEXT_POSITIONS
    CheXficientProcessor(CheXficientImageProcessor(size={"shortest_edge": 28}), tokenizer).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == TEXT_POSITIONS
    assert not {"is_local", "local_files_only", "cache_dir", "revision", "token"} & set(saved), saved
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 28}


def _card_snippets(folder: Path, image: Path) -> list[str]:
    """The model card's Python snippets, pointed at `folder` and `image` instead of the Hub repository and cxr.png."""
    from chexficient.hub import card

    text = card.chexficient_card(folder, card.CardOptions(repo_id="owner/chexficient"), run={}).text
    for version in (*MATRIX_VERSIONS, "5.23.0"):  # the card names every release the tests below run
        assert version in text, version
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    assert len(blocks) == 3 and any("pipeline(" in b for b in blocks) and any("AutoTokenizer" in b for b in blocks)
    return [block.replace("owner/chexficient", str(folder)).replace("cxr.png", str(image)) for block in blocks]


@pytest.mark.parametrize("version", ["pinned", MATRIX_VERSIONS[0]])
def test_the_model_card_snippets_run_as_written(version, saved_folder, tmp_path):
    """AutoModel + AutoProcessor + zero-shot, the stock pipeline and AutoTokenizer, as the card prints them, on the
    pinned transformers and on the oldest supported one."""
    folder, image = saved_folder
    for number, snippet in enumerate(_card_snippets(folder, image)):
        if version == "pinned":
            done = run_without_project(snippet, workdir=tmp_path / f"snippet{number}")
            printed = done.stdout + done.stderr
        else:
            script = tmp_path / f"snippet{number}.py"
            script.write_text(snippet)
            env = _matrix_environment(version, tmp_path / "modules")
            printed = run_in_terminal([str(matrix_python()), "-s", "-P", str(script)], env, cwd=tmp_path)
        assert WRONG_TYPE_WARNING not in printed, printed[-3000:]
        assert "Traceback" not in printed, printed[-3000:]
