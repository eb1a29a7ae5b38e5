"""Archive scale on one machine: the embedding store, `curate --embeddings`, `index`, search, and sharded embedding.

A synthetic archive of `--rows` image-report pairs (default 1.2M, the paper's corpus) with MIMIC-length ids and paths
and a 512-d image and a 512-d report embedding each, clustered as a real archive is (findings and their wording),
goes through the commands a production team runs:

  (a) the store: write and streaming-read throughput;
  (b) `chexficient curate --embeddings`: wall time and peak RSS (its own process);
  (c) `chexficient index`: build time, peak RSS and size on disk for every index kind;
  (d) recall@10 of each kind against exact search, on 1,000 held-out queries;
  (e) query latency p50/p95 one at a time and batched queries/s, through the search engine the CLI uses and
      through the HTTP server (`serve --index`, a text query embedded by a model of the same width);
  (f) `chexficient embed` of phantoms on the tiny model: 1 process x 2 threads, 2 processes x 1 thread (torchrun)
      and Ray Data on this node, as ratios to the single process.

    python benchmarks/archive_scale.py                       # 1.2M rows, about 30-40 min on 2 cores
    python benchmarks/archive_scale.py --rows 10000000       # a bigger machine
    python benchmarks/archive_scale.py --rows 20000 --kinds flat,ivf_flat --out /tmp/small.json   # a smoke run

Writes `benchmarks/results/archive_scale.json` (top-level keys: rows, curate_seconds, curate_peak_rss_gb,
index_build_seconds, recall_at_10, query_p50_ms, queries_per_s, besides the details).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chexficient.inference.store import ShardWriter, iter_batches, write_manifest  # noqa: E402
from chexficient.runtime.machine import machine_info  # noqa: E402


DIM = 512
CLUSTERS = 96
QUERIES = 1000


# ----- the synthetic archive ---------------------------------------------------------------------------------------


def mimic_ids(begin: int, count: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """MIMIC-CXR-length ids (`p10000032-s50414267-<dicom uuid>`) and paths (`files/p10/p10000032/s.../<uuid>.jpg`)."""
    ids, paths = [], []
    words = rng.integers(0, 2**32, size=(count, 5), dtype=np.uint64)
    for offset in range(count):
        row = begin + offset
        patient, study = 10000000 + row // 3, 50000000 + row
        dicom = "-".join(f"{int(w):08x}" for w in words[offset])
        ids.append(f"p{patient}-s{study}-{dicom}")
        paths.append(f"files/p{patient // 1000000}/p{patient}/s{study}/{dicom}.jpg")
    return ids, paths


LATENT = 24  # a learnt embedding space has low intrinsic dimension: patients vary along a few directions


def clustered_pairs(count: int, rng: np.random.Generator, centres: np.ndarray, mixing: np.ndarray):
    """(image [n, 512], report [n, 512]) unit vectors: a finding's centre, patient-level variation in a 24-d subspace
    and a little isotropic noise; the report is a fixed linear view of the image plus wording noise (as a trained
    CLIP aligns them). Isotropic noise alone at 512-d would make every neighbour a random one."""
    cluster = rng.integers(0, len(centres), size=count)
    variation = rng.standard_normal((count, LATENT), dtype=np.float32) @ mixing[:LATENT]
    image = centres[cluster] + 0.6 * variation + (0.3 / DIM**0.5) * rng.standard_normal((count, DIM), dtype=np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    report = image @ mixing + (0.5 / DIM**0.5) * rng.standard_normal((count, DIM), dtype=np.float32)
    report /= np.linalg.norm(report, axis=1, keepdims=True)
    return image.astype(np.float32), report.astype(np.float32)


def write_archive(folder: Path, rows: int, seed: int, shard_rows: int = 50_000) -> dict[str, float]:
    """Write the archive as a store; the seconds spent in the store (not in making the numbers) are timed."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    mixing = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    writer = ShardWriter(folder, writer="archive", shard_rows=shard_rows)
    store_seconds = 0.0
    for begin in range(0, rows, shard_rows):
        count = min(shard_rows, rows - begin)
        ids, paths = mimic_ids(begin, count, rng)
        image, report = clustered_pairs(count, rng, centres, mixing)
        start = time.perf_counter()
        writer.append(ids, paths, image, texts=None, text_embeddings=report)
        store_seconds += time.perf_counter() - start
    start = time.perf_counter()
    writer.flush()
    write_manifest(folder, {"synthetic": True, "seed": seed, "clusters": CLUSTERS})
    store_seconds += time.perf_counter() - start
    queries, _ = clustered_pairs(QUERIES, np.random.default_rng(seed + 1), centres, mixing)
    np.save(folder.parent / "queries.npy", queries)
    size = sum(path.stat().st_size for path in folder.glob("part-*.parquet"))
    return {"write_seconds": store_seconds, "write_rows_per_s": rows / store_seconds, "store_gb": size / 1e9}


def read_throughput(folder: Path, rows: int) -> dict[str, float]:
    start = time.perf_counter()
    seen, checksum = 0, 0.0
    for batch in iter_batches(folder, ("id", "embedding", "text_embedding")):
        seen += len(batch["id"])
        checksum += float(batch["embedding"][:, 0].sum())
    seconds = time.perf_counter() - start
    assert seen == rows, (seen, rows)
    return {
        "read_seconds": seconds,
        "read_rows_per_s": rows / seconds,
        "read_gb_per_s": rows * 2 * DIM * 4 / seconds / 1e9,
    }


# ----- measured child processes ------------------------------------------------------------------------------------


RUN_ALONE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as stop:
    if stop.code not in (0, None):
        raise
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def run_alone(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """`python -m module args` in a fresh process: wall seconds and that process's own peak RSS."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN_ALONE, module, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    peak = next(line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return {"seconds": seconds, "peak_rss_gb": int(peak.split()[1]) / 1e6, "stdout": done.stdout}


# ----- the stages ----------------------------------------------------------------------------------------------------


def stage_curate(store: Path, work: Path) -> dict[str, float]:
    out = work / "curated"
    shutil.rmtree(out, ignore_errors=True)
    run = run_alone("chexficient.cli", "curate", "--embeddings", str(store), "--out", str(out), "--no-progress")
    report = json.loads((out / "report.json").read_text())
    return {
        "seconds": run["seconds"],
        "peak_rss_gb": run["peak_rss_gb"],
        "kept": report.get("kept"),
        "considered": report.get("considered"),
        "share_kept": report.get("share_kept"),
    }


def stage_index(store: Path, work: Path, kind: str, budget: str) -> dict[str, float]:
    out = work / f"index_{kind}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["index", str(store), "--out", str(out), "--kind", kind, "--memory-budget", budget, "--no-progress"]
    run = run_alone("chexficient.cli", *argv)
    record = json.loads((out / "index.json").read_text())
    size = sum(path.stat().st_size for path in out.iterdir() if path.is_file())
    return {"seconds": run["seconds"], "peak_rss_gb": run["peak_rss_gb"], "size_gb": size / 1e9, "record": record}


def stage_queries(index_dir: Path, exact_dir: Path, queries: np.ndarray) -> dict[str, float]:
    """Recall@10 against exact search, latency of single queries, queries/s in batches (the CLI's engine)."""
    from chexficient.inference.search import SearchEngine

    engine, exact = SearchEngine(index_dir), SearchEngine(exact_dir)
    truth = [[hit.id for hit in hits] for hits in exact.search_vectors(queries, 10)]
    found = [[hit.id for hit in hits] for hits in engine.search_vectors(queries, 10)]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
    latencies = []
    for query in queries[: 300 if engine.info().get("kind") != "flat" else 50]:
        start = time.perf_counter()
        engine.search_vectors(query[None], 10)
        latencies.append(1000 * (time.perf_counter() - start))
    start = time.perf_counter()
    for begin in range(0, len(queries), 250):
        engine.search_vectors(queries[begin : begin + 250], 10)
    batched = len(queries) / (time.perf_counter() - start)
    return {
        "recall_at_10": recall,
        "query_p50_ms": statistics.median(latencies),
        "query_p95_ms": float(np.percentile(latencies, 95)),
        "queries_per_s": batched,
    }


def stage_server(index_dir: Path, work: Path, queries: int = 200) -> dict[str, float]:
    """`chexficient serve --index`: text queries over HTTP, embedded by a random model of the index's width."""
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny_model

    model = work / "query_model"
    if not (model / "config.json").exists():
        save_tiny_model(model, projection_dim=DIM)
    port = 8765
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "chexficient.cli", "serve", "--model", str(model), "--index", str(index_dir),
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        for _ in range(600):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        texts = [
            f"There is a small {side} pleural effusion, case {i}." for i, side in zip(range(queries), "lr" * queries)
        ]
        latencies = []
        for text in texts:
            start = time.perf_counter()
            response = client.post("/search", data={"text": text, "k": "10"})
            response.raise_for_status()
            latencies.append(1000 * (time.perf_counter() - start))
        return {
            "http_query_p50_ms": statistics.median(latencies),
            "http_query_p95_ms": float(np.percentile(latencies, 95)),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def stage_embed(work: Path, images: int) -> dict[str, float]:
    """`chexficient embed` of phantoms with the tiny model: one process x 2 threads, torchrun 2 x 1, Ray local.

    Each way runs on `images` and on 4x as many; the marginal rate (extra images / extra seconds) is the throughput
    with start-up (interpreters, model loads, Ray's actors) taken out, which is what an archive-sized run sees."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_tiny_model

    from chexficient.inference.synthetic import phantom_images, write_png

    model, folder = work / "embed_model", work / "phantoms"
    if not (model / "config.json").exists():
        save_tiny_model(model)
    sizes = (images, 4 * images)
    if len(list(folder.glob("*.png"))) < sizes[1]:
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(phantom_images(sizes[1], image_size=256, seed=5)):
            write_png(folder / f"cxr{i:05d}.png", image)
    files = sorted(folder.glob("*.png"))
    for size in sizes:
        (work / f"phantoms_{size}.txt").write_text("\n".join(str(path) for path in files[:size]) + "\n")
    ways = {
        "one_process_two_threads": ([sys.executable, "-m", "chexficient.cli"], {"OMP_NUM_THREADS": "2"}, []),
        "torchrun_two_processes_one_thread": (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731", "-m",
             "chexficient.cli"],
            {"OMP_NUM_THREADS": "1"},
            [],
        ),
        "ray_local": ([sys.executable, "-m", "chexficient.cli"], {"OMP_NUM_THREADS": "1"}, ["--engine", "ray"]),
    }  # fmt: skip
    results = {}
    for name, (launcher, extra_env, options) in ways.items():
        entry = {}
        for size in sizes:
            out = work / f"embed_{name}_{size}"
            shutil.rmtree(out, ignore_errors=True)
            argv = ["embed", str(work / f"phantoms_{size}.txt"), "--model", str(model), "--out", str(out)]
            argv += ["--batch-size", "32", "--num-workers", "0", "--no-progress", *options]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra_env}
            start = time.perf_counter()
            done = subprocess.run([*launcher, *argv], env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{name} on {size} images failed:\n{done.stderr[-3000:]}")
            entry[f"wall_seconds_{size}"] = time.perf_counter() - start
        extra = entry[f"wall_seconds_{sizes[1]}"] - entry[f"wall_seconds_{sizes[0]}"]
        entry["marginal_images_per_s"] = (sizes[1] - sizes[0]) / extra
        results[name] = entry
    base = results["one_process_two_threads"]
    for entry in results.values():
        entry["marginal_ratio_to_one_process"] = entry["marginal_images_per_s"] / base["marginal_images_per_s"]
        entry["wall_ratio_to_one_process"] = base[f"wall_seconds_{sizes[1]}"] / entry[f"wall_seconds_{sizes[1]}"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_200_000)
    parser.add_argument("--work", default=str(ROOT / "outputs" / "archive_scale"), help="scratch folder (GBs)")
    parser.add_argument(
        "--kinds", default="auto,ivf_pq", help="index kinds to build besides flat, the exact reference (also: hnsw)"
    )
    parser.add_argument("--memory-budget", default="4GB", help="the index command's budget")
    parser.add_argument("--embed-images", type=int, default=5000, help="phantoms embedded (and 4x as many)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: curate,index,server,embed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "archive_scale.json"))
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep --out's results of the stages skipped now (same --rows); this run's command goes under `reruns`",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work) / f"rows_{args.rows}"
    store = work / "store"
    command = " ".join(sys.argv)
    results: dict = {"rows": args.rows, "dim": DIM, "machine": machine_info(), "command": command}
    if args.update and Path(args.out).is_file():
        earlier = json.loads(Path(args.out).read_text())
        if earlier.get("rows") != args.rows:
            raise SystemExit(f"--update: {args.out} holds {earlier.get('rows')} rows, this run {args.rows}")
        ran = sorted({"curate", "index", "server", "embed"} - skip)
        results = {**earlier, "reruns": [*earlier.get("reruns", []), {"stages": ran, "command": command}]}
    if not (store / "manifest.json").is_file():
        shutil.rmtree(store, ignore_errors=True)
        print(f"writing {args.rows} synthetic pairs to {store}", flush=True)
        results["store"] = write_archive(store, args.rows, args.seed)
    results["store"] = {**results.get("store", {}), **read_throughput(store, args.rows)}
    print(json.dumps(results["store"]), flush=True)
    queries = np.load(work / "queries.npy")

    if "curate" not in skip:
        results["curate"] = stage_curate(store, work)
        print("curate", json.dumps(results["curate"]), flush=True)
    if "index" not in skip:
        results["index"] = {}
        kinds = args.kinds.split(",")
        exact = work / "index_flat"
        if "flat" not in kinds:
            kinds.insert(0, "flat")
        for kind in ["flat", *[k for k in kinds if k != "flat"]]:
            entry = stage_index(store, work, kind, args.memory_budget)
            entry.update(stage_queries(work / f"index_{kind}", exact, queries))
            results["index"][kind] = entry
            print(kind, json.dumps({k: v for k, v in entry.items() if k != "record"}), flush=True)
        if "server" not in skip:
            chosen = work / "index_auto" if (work / "index_auto").is_dir() else exact
            results["server"] = stage_server(chosen, work)
            print("server", json.dumps(results["server"]), flush=True)
    if "embed" not in skip:
        results["embed"] = stage_embed(work, args.embed_images)
        print("embed", json.dumps(results["embed"]), flush=True)

    auto = results.get("index", {}).get("auto") or next(iter(results.get("index", {}).values()), {})
    results.update(
        curate_seconds=results.get("curate", {}).get("seconds"),
        curate_peak_rss_gb=results.get("curate", {}).get("peak_rss_gb"),
        index_kind=auto.get("record", {}).get("kind"),
        index_build_seconds=auto.get("seconds"),
        recall_at_10=auto.get("recall_at_10"),
        query_p50_ms=auto.get("query_p50_ms"),
        queries_per_s=auto.get("queries_per_s"),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
