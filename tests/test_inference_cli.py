"""`chexficient embed` / `classify` on a tiny model: outputs equal direct model calls, bad files are reported, resume."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import save_tiny_model

from chexficient.cli import build_parser, kebab_case_flags, main, option_strings
from chexficient.data.images import discover_inputs
from chexficient.inference.classify import run_classify
from chexficient.inference.embed import run_embed
from chexficient.inference.engine import InferenceEngine
from chexficient.inference.store import read_embeddings, read_manifest, read_store, shard_paths, stored_ids
from chexficient.inference.synthetic import phantom_images, write_corrupt_files, write_dicom, write_png

from image_processing_chexficient import CheXficientImageProcessor
from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


LABELS = ["Pneumothorax", "Cardiomegaly", "No Finding"]


def write_inputs(folder: Path) -> tuple[list[Path], list[Path]]:
    """Four 8-bit PNGs (one in a subfolder), a 16-bit PNG, a DICOM, and three broken .png files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    good = []
    for i, image in enumerate(phantom_images(4, image_size=48)):
        good.append(write_png(folder / ("sub" if i == 3 else ".") / f"cxr{i}.png", image))
    wide = phantom_images(2, image_size=56, bit_depth=16, seed=1)
    good.append(write_png(folder / "high.png", wide[0]))
    good.append(write_dicom(folder / "study.dcm", wide[1]))
    buffer = io.BytesIO()
    PIL.Image.fromarray(phantom_images(1, image_size=48)[0]).save(buffer, format="PNG")
    bad = write_corrupt_files(folder / "broken", buffer.getvalue())
    (folder / "notes.txt").write_text("not an input: wrong suffix")
    return good, bad


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model_dir = root / "model"
    save_tiny_model(model_dir)
    good, bad = write_inputs(root / "images")
    return {"root": root, "model_dir": model_dir, "images": root / "images", "good": good, "bad": bad}


def direct_embeddings(model_dir: Path, paths: list[Path]) -> np.ndarray:
    model = CheXficientModel.from_pretrained(model_dir).eval()
    processor = CheXficientProcessor.from_pretrained(model_dir)
    pixels = torch.from_numpy(np.stack([processor.image_processor.process_one(p) for p in paths]))
    with torch.no_grad():
        return model.get_image_features(pixels).numpy()


def test_discover_inputs_folder_and_manifests(workspace, tmp_path):
    items = discover_inputs(workspace["images"])
    ids = [item.id for item in items]
    assert "sub/cxr3.png" in ids and "study.dcm" in ids and "broken/empty.png" in ids
    assert "notes.txt" not in ids and ids == sorted(ids)
    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path\na," + str(workspace["good"][0]) + "\nb,relative.png\n")
    assert [(i.id, Path(i.path).name) for i in discover_inputs(manifest)] == [("a", "cxr0.png"), ("b", "relative.png")]
    assert discover_inputs(manifest)[1].path == str(tmp_path / "relative.png")
    (tmp_path / "bad.csv").write_text("file_name\nx.png\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*path column"):
        discover_inputs(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="duplicate input id"):
        discover_inputs([workspace["good"][0], workspace["good"][0]])


@pytest.mark.parametrize("workers, export", [(2, None), (0, "emb.safetensors"), (0, "emb.parquet")])
def test_embed_matches_model_and_reports_bad_files(workspace, tmp_path, capsys, workers, export):
    out = tmp_path / "emb"
    argv = ["embed", str(workspace["images"]), "--model", str(workspace["model_dir"]), "--out", str(out)]
    options = ["--batch-size", "4", "--num-workers", str(workers), "--no-progress"]
    assert main([*argv, *options, *(["--export", str(tmp_path / export)] if export else [])]) == 0
    assert "embedded 6, skipped 0" in capsys.readouterr().out

    ids, paths, embeddings = read_embeddings(out)
    good = workspace["good"]
    expected_ids = {Path(p).relative_to(workspace["images"]).as_posix() for p in good}
    assert set(ids) == expected_ids and len(ids) == 6
    order = [paths.index(str(p)) for p in good]
    np.testing.assert_allclose(embeddings[order], direct_embeddings(workspace["model_dir"], good), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    manifest = read_manifest(out)
    assert manifest["rows"] == 6 and manifest["dim"] == 16 and sum(s["rows"] for s in manifest["shards"]) == 6
    assert manifest["model"]["model_dir"] == str(workspace["model_dir"])
    if export:
        exported_ids, _, exported = read_embeddings(tmp_path / export)
        assert exported_ids == ids and np.array_equal(exported, embeddings)

    with open(out / "errors.csv") as handle:
        errors = list(csv.DictReader(handle))
    assert sorted(Path(row["path"]).name for row in errors) == ["empty.png", "report.png", "truncated.png"]
    for row in errors:
        assert Path(row["path"]).name in row["message"]  # the message names the file

    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 0  # a re-run skips what is there, retries the rest
    assert "embedded 0, skipped 6" in capsys.readouterr().out
    assert read_embeddings(out)[0] == ids


def test_embed_with_report_texts_stores_each_rows_text_embedding(workspace, tmp_path):
    manifest = tmp_path / "pairs.csv"
    reports = ["Small left pleural effusion.", "The lungs are clear.", "Cardiomegaly. No pneumothorax."]
    rows = [f"p{i},{path},{text}" for i, (path, text) in enumerate(zip(workspace["good"], reports))]
    manifest.write_text("id,path,report\n" + "\n".join(rows) + "\n")
    engine = InferenceEngine.from_pretrained(workspace["model_dir"])
    run_embed(manifest, tmp_path / "emb", engine, batch_size=2, num_workers=0, progress=False, text_column="report")
    stored = read_store(tmp_path / "emb", ("id", "text", "embedding", "text_embedding"))
    assert stored["id"] == ["p0", "p1", "p2"] and stored["text"] == reports
    np.testing.assert_allclose(stored["text_embedding"], engine.embed_texts(reports), atol=1e-6)
    assert not np.allclose(stored["text_embedding"], stored["embedding"], atol=1e-2)
    with pytest.raises(ValueError, match=r"pairs\.csv.*no text column 'findings'"):
        run_embed(manifest, tmp_path / "other", engine, num_workers=0, progress=False, text_column="findings")


def test_embed_out_must_be_a_folder(workspace, tmp_path, capsys):
    argv = ["embed", str(workspace["good"][0]), "--model", str(workspace["model_dir"]), "--out"]
    assert main([*argv, str(tmp_path / "emb.parquet"), "--no-progress"]) == 2
    assert "folder of Parquet shards" in capsys.readouterr().err and not (tmp_path / "emb.parquet").exists()


def test_embed_resumes_after_new_files_and_after_a_crash(workspace, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in workspace["good"][:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    engine = InferenceEngine.from_pretrained(workspace["model_dir"])
    out = tmp_path / "emb"
    first = run_embed(folder, out, engine, batch_size=2, num_workers=0, progress=False)
    assert (first.embedded, first.skipped, first.failed) == (3, 0, 0)

    for path in workspace["good"][3:]:  # new files arrive; one run crashes after its first batch
        (folder / path.name).write_bytes(path.read_bytes())
    real_forward, calls = engine.embed_pixels, []

    def crashing_forward(pixel_values):
        calls.append(len(pixel_values))
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real_forward(pixel_values)

    engine.embed_pixels = crashing_forward
    shards_before = len(shard_paths(out))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_embed(folder, out, engine, batch_size=2, num_workers=0, progress=False, shard_rows=1)
    assert len(shard_paths(out)) == shards_before + 1 and len(stored_ids(out)) == 5  # the first batch survived
    engine.embed_pixels = real_forward

    resumed = run_embed(folder, out, engine, batch_size=2, num_workers=0, progress=False)
    assert (resumed.embedded, resumed.skipped, resumed.failed) == (1, 5, 0)
    assert resumed.total_rows == 6
    ids, paths, embeddings = read_embeddings(out)
    assert sorted(ids) == sorted(p.name for p in workspace["good"])
    order = [ids.index(p.name) for p in workspace["good"]]
    np.testing.assert_allclose(
        embeddings[order], direct_embeddings(workspace["model_dir"], workspace["good"]), atol=1e-5
    )

    again = run_embed(folder, out, engine, batch_size=2, num_workers=0, progress=False)
    assert (again.embedded, again.skipped) == (0, 6)


def test_csv_outputs_escape_spreadsheet_formulas(workspace, tmp_path):
    manifest = tmp_path / "hostile.csv"
    image = workspace["good"][0]
    manifest.write_text(f'id,path\n=HYPERLINK("http://x"),{image}\n@SUM(1),{tmp_path / "missing.png"}\n')
    engine = InferenceEngine.from_pretrained(workspace["model_dir"])
    out = tmp_path / "probs.csv"
    run_classify(manifest, out, engine, ["+Edema", "Cardiomegaly"], num_workers=0, progress=False)
    with open(out) as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "path", "'+Edema", "Cardiomegaly"]
    assert rows[1][0] == '\'=HYPERLINK("http://x")'
    with open(f"{out}.errors.csv") as handle:
        errors = list(csv.DictReader(handle))
    assert [row["id"] for row in errors] == ["'@SUM(1)"]
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_classify_matches_zero_shot_classify(workspace, tmp_path, capsys, suffix):
    out = tmp_path / f"probs{suffix}"
    argv = ["classify", str(workspace["images"]), "--model", str(workspace["model_dir"]), "--out", str(out)]
    assert main([*argv, "--labels", ",".join(LABELS), "--num-workers", "0", "--no-progress"]) == 0
    assert "classified 6, failed 3" in capsys.readouterr().out
    if suffix == ".csv":
        with open(out) as handle:
            rows = list(csv.DictReader(handle))
        got = {row["path"]: [float(row[label]) for label in LABELS] for row in rows}
    else:
        data = json.loads(out.read_text())
        assert data["labels"] == LABELS
        got = {r["path"]: [r["probabilities"][label] for label in LABELS] for r in data["results"]}
    model = CheXficientModel.from_pretrained(workspace["model_dir"]).eval()
    processor = CheXficientProcessor.from_pretrained(workspace["model_dir"])
    good = workspace["good"]
    pixels = torch.from_numpy(np.stack([processor.image_processor.process_one(p) for p in good]))
    expected = model.zero_shot_classify(LABELS, processor.tokenizer, pixel_values=pixels).numpy()
    np.testing.assert_allclose(np.array([got[str(p)] for p in good]), expected, atol=1e-5)
    assert Path(f"{out}.errors.csv").exists()


def test_int8_embeddings_agree_with_fp32(workspace):
    pixels = torch.from_numpy(
        np.stack([CheXficientImageProcessor(size={"shortest_edge": 28}).process_one(p) for p in workspace["good"]])
    )
    fp32 = InferenceEngine.from_pretrained(workspace["model_dir"], dtype="float32").embed_numpy(pixels)
    int8_engine = InferenceEngine.from_pretrained(workspace["model_dir"], dtype="int8")
    assert any("quantized" in type(m).__module__ for m in int8_engine.model.modules())
    int8 = int8_engine.embed_numpy(pixels)
    cosine = (fp32 * int8).sum(-1) / (np.linalg.norm(fp32, axis=-1) * np.linalg.norm(int8, axis=-1))
    assert cosine.min() > 0.99, cosine
    assert not np.allclose(fp32, int8, atol=1e-7)  # it really ran quantised


def test_cli_errors_are_clear(workspace, tmp_path, capsys):
    assert main(["embed", str(workspace["images"]), "--model", str(tmp_path / "nope"), "--out", "x.parquet"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    argv = [
        "classify",
        str(workspace["images"]),
        "--model",
        str(workspace["model_dir"]),
        "--out",
        str(tmp_path / "p.txt"),
    ]
    assert main([*argv, "--labels", "Pneumothorax"]) == 2
    assert "must end in .csv or .json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "--model", "m"])  # INPUT and --out missing: argparse usage error


def test_every_option_of_the_command_is_kebab_case_and_the_underscore_spelling_still_parses(capsys):
    parser = build_parser()
    known = option_strings(parser)
    assert {"--super-batch-size", "--num-prototypes", "--max-upload-mb", "--batch-size"} <= known
    assert [option for option in known if "_" in option] == []
    old = ["curate", "my_pairs.csv", "--num_prototypes=3", "--super_batch_size", "96", "--model", "m", "--out", "o"]
    argv = kebab_case_flags([*old, "--", "--not_a_flag"], known)
    assert argv == [
        "curate",
        "my_pairs.csv",
        "--num-prototypes=3",
        "--super-batch-size",
        "96",
        "--model",
        "m",
        "--out",
        "o",
        "--",
        "--not_a_flag",
    ]
    messages = capsys.readouterr().err
    assert "--num_prototypes is deprecated, use --num-prototypes" in messages
    assert "--super_batch_size is deprecated, use --super-batch-size" in messages
    args = parser.parse_args(argv[:-2])
    assert (args.num_prototypes, args.super_batch_size, args.manifest) == (3, 96, "my_pairs.csv")
    assert kebab_case_flags(["embed", "x", "--unknown_flag"], known) == ["embed", "x", "--unknown_flag"]
