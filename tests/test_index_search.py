"""`chexficient index` / `search`: embed -> index -> search through the CLI, every index kind's recall against exact
search, the `auto` choice, memory-mapped reloading, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import save_tiny_model
from test_inference_cli import write_inputs

from chexficient.cli import main
from chexficient.inference.index import build_index, leave_one_out_recall
from chexficient.inference.index_plan import EXACT_MAX_BYTES, IndexOptions, estimate_bytes, parse_bytes, plan_index
from chexficient.inference.search import MAX_K, SearchEngine
from chexficient.inference.store import ShardWriter, write_manifest


faiss = pytest.importorskip("faiss")

DIM = 32
ROWS = 4000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, object]:
    """A tiny model, phantom images (8-bit, 16-bit PNG, DICOM, broken files) and their store, via `embed`."""
    root = tmp_path_factory.mktemp("index_search")
    torch.manual_seed(0)
    model_dir = root / "model"
    save_tiny_model(model_dir)
    good, bad = write_inputs(root / "images")
    store = root / "emb"
    argv = ["embed", str(root / "images"), "--model", str(model_dir), "--out", str(store)]
    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 0
    return {"root": root, "model_dir": model_dir, "images": root / "images", "good": good, "bad": bad, "store": store}


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> dict[str, object]:
    """A store of ROWS clustered unit vectors (40 clusters, 32-d) in 4 shards, and 200 held-out queries."""
    root = tmp_path_factory.mktemp("clustered")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        points = centres[rng.integers(0, len(centres), count)] + 0.25 * rng.standard_normal((count, DIM))
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)

    vectors, queries = draw(ROWS), draw(200)
    writer = ShardWriter(root / "store", writer="synthetic", shard_rows=1000)
    writer.append([f"row{i}" for i in range(ROWS)], [f"/archive/row{i}.png" for i in range(ROWS)], vectors)
    writer.flush()
    write_manifest(root / "store")
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    return {"root": root, "store": root / "store", "vectors": vectors, "queries": queries, "truth": truth}


def recall_at_10(found: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(ids) & {f"row{r}" for r in want}) / 10 for ids, want in zip(found, truth)]))


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""


# ----- end to end through the CLI ------------------------------------------------------------------------------


def test_embed_index_search_through_the_cli(workspace, capsys):
    index_dir = workspace["root"] / "index"
    argv = ["index", str(workspace["store"]), "--out", str(index_dir), "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert "as flat" in capsys.readouterr().out
    record = json.loads((index_dir / "index.json").read_text())
    assert (record["kind"], record["rows"], record["dim"], record["metric"]) == ("flat", 6, 16, "inner_product")
    assert record["choice"]["requested"] == "auto" and record["store"]["manifest"]["rows"] == 6
    assert record["faiss_version"] == faiss.__version__ and pq.read_table(index_dir / "ids.parquet").num_rows == 6

    # every stored image (8-bit PNGs, a 16-bit PNG, a DICOM) finds itself first, with cosine 1
    images = [str(path) for path in workspace["good"]]
    search = ["search", str(index_dir), "--model", str(workspace["model_dir"])]
    assert main([*search, "--image", *images, "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == images
    for path, line in zip(workspace["good"], lines):
        first = line["results"][0]
        assert first["id"] == Path(path).relative_to(workspace["images"]).as_posix() and first["path"] == str(path)
        assert first["score"] == pytest.approx(1.0, abs=1e-4) and first["rank"] == 1
        assert len(line["results"]) == 3 and line["results"][1]["score"] <= first["score"]

    # a text query (the model recorded in the store's manifest is the default) gives ranked results, as a table
    assert main(["search", str(index_dir), "--text", "small left pleural effusion", "-k", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "# small left pleural effusion" and len(table) == 2 + 4
    scores = [float(row.split()[1]) for row in table[2:]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    assert {row.split()[2] for row in table[2:]} <= {
        Path(p).relative_to(workspace["images"]).as_posix() for p in images
    }


def test_search_cli_errors_name_the_problem(workspace, capsys, tmp_path):
    index_dir = workspace["root"] / "index_errors"
    assert main(["index", str(workspace["store"]), "--out", str(index_dir), "--no-progress"]) == 0
    capsys.readouterr()
    search = ["search", str(index_dir), "--model", str(workspace["model_dir"])]
    for broken in workspace["bad"]:  # empty, text named .png, truncated PNG
        assert main([*search, "--image", str(broken)]) == 2
        assert broken.name in capsys.readouterr().err
    assert main([*search, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main([*search, "--text", "effusion", "-k", str(MAX_K + 1)]) == 2
    assert f"1 to {MAX_K}" in capsys.readouterr().err
    other = tmp_path / "narrow_model"
    save_tiny_model(other, projection_dim=8)
    assert main(["search", str(index_dir), "--model", str(other), "--text", "effusion"]) == 2
    err = capsys.readouterr().err
    assert "8 dimensions" in err and "16-d" in err
    assert main(["search", str(tmp_path), "--text", "effusion", "--model", str(workspace["model_dir"])]) == 2
    assert "not a CheXficient index" in capsys.readouterr().err
    assert main(["index", str(workspace["store"]), "--out", str(tmp_path / "i"), "--column", "path"]) == 2
    assert "give an embedding column" in capsys.readouterr().err
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "i")]) == 2
    assert "not an embedding store" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["index", str(workspace["store"]), "--out", str(tmp_path / "taken"), "--no-progress"]) == 2
    assert "not an index folder" in capsys.readouterr().err and (tmp_path / "taken" / "notes.txt").exists()
    with pytest.raises(SystemExit):
        main(["search", str(index_dir), "--image", "a.png", "--text", "both"])  # one kind of query at a time


# ----- every kind on a clustered store ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_each_kind_reaches_recall_and_reloads_memory_mapped(clustered, kind):
    """Recall@10 of 200 held-out queries against exact (numpy) search is >= 0.9 for every kind; the recorded
    parameters are those of the FAISS index on disk; a memory-mapped reload answers exactly as a full read."""
    out = clustered["root"] / f"index_{kind}"
    record = build_index(clustered["store"], out, IndexOptions(kind=kind, threads=1, progress=False, batch_rows=700))
    assert (record["kind"], record["rows"], record["dim"]) == (kind, ROWS, DIM)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["kind"] == kind and on_disk["factory"] == record["factory"]

    engine = SearchEngine(out, threads=1)
    assert engine.index.load_mode == "mmap" and str(out / "index.faiss") in mapped_files()
    hits = engine.search_vectors(clustered["queries"], 10)
    recall = recall_at_10([[hit.id for hit in row] for row in hits], clustered["truth"])
    assert recall >= 0.9, (kind, recall, record.get("self_check"))
    assert hits[0][0].path == f"/archive/{hits[0][0].id}.png" and hits[0][0].rank == 1

    index = faiss.read_index(str(out / "index.faiss"))
    if kind == "flat":
        assert record["self_check"] is None and isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    else:
        check = record["self_check"]
        assert check["recall_at_10"] >= 0.9 and check["queries"] == 256 and check["reached"]
    if kind in ("ivf_flat", "ivf_pq"):
        ivf = faiss.extract_index_ivf(index)
        assert ivf.nlist == record["nlist"] == min(int(4 * ROWS**0.5), ROWS // 39)
        assert 1 <= record["nprobe"] < record["nlist"] and engine.index.record["nprobe"] == record["nprobe"]
        assert faiss.extract_index_ivf(engine.index.index).nprobe == record["nprobe"]  # the tuned breadth is used
        assert record["training"]["sample_rows"] == ROWS and record["choice"]["requested"] == kind
    if kind == "ivf_pq":
        pq_index = faiss.downcast_index(ivf)
        assert isinstance(pq_index, faiss.IndexIVFPQFastScan) and (pq_index.pq.M, pq_index.pq.nbits) == (
            record["m"],
            record["nbits"],
        )
        assert (
            DIM % record["m"] == 0 and record["rerank"] == 8 and (out / "vectors.f32").stat().st_size == ROWS * DIM * 4
        )
        assert (out / "index.faiss").stat().st_size < ROWS * DIM * 4 / 2  # codes, not vectors
    else:
        assert not (out / "vectors.f32").exists()
    if kind == "hnsw":
        hnsw = faiss.downcast_index(index)
        assert isinstance(hnsw, faiss.IndexHNSWFlat) and record["hnsw_m"] == 32
        assert faiss.downcast_index(engine.index.index).hnsw.efSearch == record["ef_search"] >= 16

    in_memory = SearchEngine(out, mmap=False, threads=1)
    assert in_memory.index.load_mode == "read"
    again = in_memory.search_vectors(clustered["queries"], 10)
    assert [[(h.id, round(h.score, 5)) for h in row] for row in again] == [
        [(h.id, round(h.score, 5)) for h in row] for row in hits
    ]


def test_ivf_pq_without_rerank_scores_codes_and_with_rerank_scores_exactly(clustered):
    plain = clustered["root"] / "pq_plain"
    build_index(clustered["store"], plain, IndexOptions(kind="ivf_pq", rerank=0, threads=1, progress=False))
    reranked = SearchEngine(clustered["root"] / "index_ivf_pq", threads=1)
    query = clustered["queries"][:5]
    for row, hits in zip(query, reranked.search_vectors(query, 5)):
        exact = [float(clustered["vectors"][int(hit.id[3:])] @ row) for hit in hits]
        np.testing.assert_allclose([hit.score for hit in hits], exact, atol=1e-5)
    assert json.loads((plain / "index.json").read_text())["rerank"] == 0 and not (plain / "vectors.f32").exists()
    assert SearchEngine(plain, threads=1).search_vectors(query, 5)[0]  # PQ scores only, still answers


# ----- the auto rule ---------------------------------------------------------------------------------------------


def test_auto_picks_flat_when_small_and_ivf_pq_under_a_tiny_budget(clustered):
    small = build_index(clustered["store"], clustered["root"] / "auto", IndexOptions(threads=1, progress=False))
    assert small["kind"] == "flat" and small["choice"]["requested"] == "auto"
    assert "auto" in small["choice"]["reason"]

    tiny = "100KB"  # 4000 x 32 floats are 512 KB: only PQ codes fit
    assert estimate_bytes("ivf_flat", ROWS, DIM, 102) > parse_bytes(tiny)
    out = clustered["root"] / "auto_tiny"
    record = build_index(
        clustered["store"], out, IndexOptions(memory_budget=tiny, threads=1, progress=False, train_sample=3000)
    )
    assert record["kind"] == "ivf_pq" and record["choice"]["estimated_bytes"] <= parse_bytes(tiny)
    assert record["choice"]["memory_budget_bytes"] == 100_000 and record["training"]["sample_rows"] == 3000
    assert "budget" in record["choice"]["reason"] and record["factory"].startswith(f"IVF{record['nlist']},PQ")
    with pytest.raises(ValueError, match="memory-budget 1KB"):
        build_index(clustered["store"], clustered["root"] / "x", IndexOptions(memory_budget="1KB", progress=False))


def test_auto_plan_at_archive_scale():
    """1.2M x 512 (the paper's corpus): IVF-PQ with 4-bit fast-scan codes under the default 4 GB and under 1 GB;
    exact while the vectors take at most EXACT_MAX_BYTES."""
    plan = plan_index(1_200_000, 512, IndexOptions())
    assert plan.kind == "ivf_pq" and plan.nlist == int(4 * 1_200_000**0.5) and plan.factory.endswith("PQ256x4fs")
    assert plan.train_sample == 40 * plan.nlist and plan.rerank == 8
    pq_plan = plan_index(1_200_000, 512, IndexOptions(memory_budget="1GB"))
    assert pq_plan.kind == "ivf_pq" and pq_plan.m == 256 and pq_plan.nbits == 4 and pq_plan.estimated_bytes <= 1e9
    classic = plan_index(1_200_000, 512, IndexOptions(kind="ivf_pq", nbits=8))
    assert classic.factory.endswith("PQ128x8np") and classic.nbits == 8
    assert plan_index(1_200_000, 512, IndexOptions(memory_budget="150MB")).m < 256
    rows = EXACT_MAX_BYTES // (512 * 4)
    assert plan_index(rows, 512, IndexOptions()).kind == "flat"
    assert plan_index(rows + 1, 512, IndexOptions()).kind == "ivf_pq"
    assert plan_index(1_200_000, 512, IndexOptions(kind="ivf_flat")).factory == f"IVF{plan.nlist},Flat"
    assert plan_index(1000, 512, IndexOptions(kind="hnsw")).factory == "HNSW32,Flat"
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes(123) == 123
    with pytest.raises(ValueError, match="memory-budget"):
        parse_bytes("lots")


# ----- the engine and the builder's edges ------------------------------------------------------------------------


def test_search_vectors_edges_and_rebuild_in_place(clustered):
    out = clustered["root"] / "index_flat"
    if not out.exists():
        build_index(clustered["store"], out, IndexOptions(kind="flat", progress=False))
    engine = SearchEngine(out, threads=1)
    one = engine.search_vectors(clustered["queries"][0] * 3.0, 10)  # a single, unnormalised query: cosine scores
    assert len(one) == 1 and one[0][0].score <= 1.0 + 1e-5
    assert len(engine.search_vectors(clustered["queries"][:2], MAX_K)[0]) == MAX_K
    with pytest.raises(ValueError, match=f"\\[n, {DIM}\\]"):
        engine.search_vectors(np.ones((2, DIM + 1), np.float32), 5)
    with pytest.raises(ValueError, match="non-zero"):
        engine.search_vectors(np.zeros(DIM, np.float32), 5)
    with pytest.raises(ValueError, match="1 to"):
        engine.search_vectors(clustered["queries"][0], 0)
    with pytest.raises(ValueError, match="need a model"):
        engine.search_texts(["effusion"], 5)

    again = build_index(clustered["store"], out, IndexOptions(kind="ivf_flat", threads=1, progress=False))
    assert json.loads((out / "index.json").read_text())["kind"] == again["kind"] == "ivf_flat"
    assert not list(out.parent.glob(".tmp-*")) and not list(out.parent.glob(".old-*"))
    assert [h.id for h in engine.search_vectors(clustered["queries"][0], 3)[0]] == [h.id for h in one[0][:3]]


def test_leave_one_out_recall():
    truth = np.array([[7, 1, 2, 3]])
    assert leave_one_out_recall(np.array([[7, 1, 2, 9]]), truth, np.array([7]), 3) == pytest.approx(2 / 3)
    assert leave_one_out_recall(np.array([[1, 2, 3, -1]]), truth, np.array([7]), 3) == 1.0


def test_older_faiss_maps_only_ivf_lists_and_reads_the_rest(clustered, monkeypatch):
    """Without zero-copy mapping (FAISS < 1.11) IVF lists are still mapped (OnDiskInvertedLists); flat is read."""
    monkeypatch.delattr(faiss, "IO_FLAG_MMAP_IFC", raising=False)
    for kind, mode in (("ivf_flat", "mmap_invlists"), ("flat", "read")):
        out = clustered["root"] / f"index_{kind}"
        if not (out / "index.json").is_file() or json.loads((out / "index.json").read_text())["kind"] != kind:
            build_index(clustered["store"], out, IndexOptions(kind=kind, threads=1, progress=False))
        engine = SearchEngine(out, threads=1)
        assert engine.index.load_mode == mode
        full = SearchEngine(out, mmap=False, threads=1)
        query = clustered["queries"][:20]
        assert [[h.id for h in row] for row in engine.search_vectors(query, 10)] == [
            [h.id for h in row] for row in full.search_vectors(query, 10)
        ]
