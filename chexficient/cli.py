"""The `chexficient` command: embed, classify, curate, serve, export-onnx. Everything runs from a local model folder.

Every option is spelled in kebab case (`--super-batch-size`); the underscore spelling of earlier releases is
accepted with a deprecation message."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .inference.engine import ENGINE_DTYPES, ENGINE_PREPROCESS


DESCRIPTION = """Fast CheXficient inference from a local model folder (nothing is downloaded).

  chexficient embed    INPUT --model DIR --out emb/              embeddings into Parquet shards (resumable)
  chexficient classify INPUT --model DIR --labels "A,B" --out p.csv   zero-shot probabilities (csv or json)
  chexficient curate   PAIRS --model DIR --out DIR              curate an archive of image-report pairs
  chexficient index    EMB_DIR --out INDEX [--memory-budget 4GB]  FAISS index of a store (exact, IVF, PQ, HNSW)
  chexficient search   INDEX (--image FILE | --text "...") -k 10  nearest stored images of an image or a report
  chexficient serve    --model DIR [--port 8000]                  HTTP API with micro-batching
  chexficient export-onnx --model DIR --out model.onnx [--int8]   ONNX image embedder, checked against PyTorch

INPUT is a folder (searched recursively for .png/.jpg/.jpeg/.dcm/.dicom), a .csv manifest (a `path` column,
optional `id`), a .txt manifest (one path a line) or image files. Unreadable images are reported (embed:
OUT/errors.csv; classify: OUT.errors.csv) and skipped. Under torchrun, `embed` shards its inputs over the processes."""


ENCODING_HELP = (
    "text encoding of a .csv/.txt/.jsonl manifest (default utf-8, a byte-order mark skipped; e.g. latin-1, cp1252): "
    "a manifest that is not in it stops the run before anything is written, naming the file and the line"
)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _positive_seconds(value: str) -> float:
    number = float(value)
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {value}")
    return number


def _serve_limit_options(serve: argparse.ArgumentParser) -> None:
    """`serve`'s limits on the server as a whole and its API key (chexficient.inference.server)."""
    from .inference.server_limits import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_HEADER_TIMEOUT_S,
        DEFAULT_IDLE_TIMEOUT_S,
        DEFAULT_QUEUE_TIMEOUT_S,
    )

    serve.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health (401 otherwise); the environment "
        "variable CHEXFICIENT_API_KEY does the same and keeps the key out of the process list",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a --host beyond loopback without an API key (refused otherwise)",
    )
    serve.add_argument(
        "--max-concurrency",
        type=_positive,
        default=None,
        help="requests processed at once, counted once their body is in; more get 503 + Retry-After "
        "(default: twice the CPUs or twice --max-batch-size, whichever is more)",
    )
    serve.add_argument(
        "--max-inflight-pixels",
        type=_positive,
        default=None,
        help="pixels being decoded at once across requests; a decode waits for room, then gets 503 + Retry-After "
        "(default: twice the model's max_image_pixels, 120000000 for 60 MP)",
    )
    serve.add_argument(
        "--queue-timeout",
        type=_positive_seconds,
        default=DEFAULT_QUEUE_TIMEOUT_S,
        help="seconds a decode waits for room in --max-inflight-pixels before its 503 (default %(default)s)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive_seconds,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds for a request's line and headers, from its first byte; then 408 (default %(default)s)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive_seconds,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds for a request's body, from its headers; then 408 (default %(default)s)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_positive_seconds,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="seconds an idle keep-alive connection stays open (default %(default)s)",
    )


def _runtime_options(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    parser.add_argument("--model", required=True, help="local model folder (weights, config, processor, tokenizer)")
    parser.add_argument(
        "--batch-size", type=_positive, default=batch_size, help="images per forward (default %(default)s)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader processes decoding images; 0 decodes in the main process (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=ENGINE_DTYPES,
        help="auto: bfloat16 on CUDA, float32 on CPU; int8: dynamic quantisation of the linear layers (CPU only)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the image tower (slow first batch)")
    parser.add_argument(
        "--preprocess",
        default="cpu",
        choices=ENGINE_PREPROCESS,
        help="cpu: resize/crop/normalise in the DataLoader workers; gpu: the workers only decode (uint8/16-bit) "
        "and the device preprocesses same-size groups in batches (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


TRAINING_ONLY = {
    "curation",
    "curation_mode",
    "curation_epochs",
    "candidate_pool_size",
    "embedding_chunk_size",
    "expected_keep_ratio",
    "random_subset_ratio",
    "random_subset_size",
}


def _curation_options() -> argparse.ArgumentParser:
    """The curation settings as kebab-case options: the fields of `CurationConfig`, the dataclass the curator reads
    (typed as `HfArgumentParser` types them; the training-run fields are accepted, not shown)."""
    from transformers import HfArgumentParser

    from .curation import CurationConfig

    parser = argparse.ArgumentParser(add_help=False)
    for action in HfArgumentParser(CurationConfig, add_help=False)._actions:
        flag = f"--{action.option_strings[0].lstrip('-').replace('_', '-')}"
        shown = argparse.SUPPRESS if action.dest in TRAINING_ONLY else action.help
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # --no-curation
            store = "store_true" if isinstance(action, argparse._StoreTrueAction) else "store_false"
            parser.add_argument(flag, dest=action.dest, action=store, help=shown)
            continue
        parser.add_argument(
            flag,
            dest=action.dest,
            type=action.type,
            nargs=action.nargs,
            const=action.const,
            default=action.default,
            choices=action.choices,
            metavar=action.metavar,
            help=shown,
        )
    return parser


def _curation_config(args: argparse.Namespace):
    from dataclasses import fields

    from .curation import CurationConfig

    return CurationConfig(**{f.name: getattr(args, f.name) for f in fields(CurationConfig)})


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and of its subcommands."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                found |= option_strings(subparser)
    return found


def kebab_case_flags(argv: Sequence[str], known: set[str]) -> list[str]:
    """`argv` with the old underscore spelling of an option (`--super_batch_size`, `--num_prototypes=3`) rewritten
    to the one spelling of every `chexficient` command (`--super-batch-size`), each with a deprecation message."""
    rewritten = []
    for position, token in enumerate(argv):
        if token == "--":
            return rewritten + list(argv[position:])
        flag, equals, value = token.partition("=")
        kebab = flag.replace("_", "-")
        if flag.startswith("--") and kebab != flag and kebab in known and flag not in known:
            print(
                f"chexficient: {flag} is deprecated, use {kebab} (the underscore spelling goes away in 0.4).",
                file=sys.stderr,
            )
            token = kebab + equals + value
        rewritten.append(token)
    return rewritten


# ----- index and search ------------------------------------------------------------------------------------------


def _index_search_commands(commands: argparse._SubParsersAction) -> None:
    """The `index` and `search` subcommands (chexficient.inference.index / .search)."""
    from .inference.index_plan import INDEX_KINDS

    index = commands.add_parser("index", help="build a FAISS index of an embedding store (index.json records it)")
    index.add_argument("store", metavar="EMB_DIR", help="a store written by `chexficient embed`")
    index.add_argument("--out", required=True, help="index folder: index.faiss, ids.parquet, index.json")
    index.add_argument(
        "--kind",
        default="auto",
        choices=INDEX_KINDS,
        help="auto: exact (flat) up to 64 MB of vectors, else IVF-PQ (fast-scan codes, exact re-ranking)",
    )
    index.add_argument("--memory-budget", default="4GB", help="memory the index may take (default %(default)s)")
    index.add_argument("--column", default="embedding", help="embedding or text_embedding (default %(default)s)")
    index.add_argument("--nlist", type=_positive, default=None, help="IVF lists (default 4 sqrt(rows))")
    index.add_argument("--nprobe", type=_positive, default=None, help="IVF lists searched (default: tuned)")
    index.add_argument("--pq-m", type=_positive, default=None, help="PQ sub-quantizers (default: the budget's)")
    index.add_argument("--pq-nbits", type=_positive, default=None, help="bits per PQ code (default 4: fast-scan)")
    index.add_argument("--opq", action="store_true", help="IVF-PQ: learn an OPQ rotation first (slower build)")
    index.add_argument(
        "--rerank", type=int, default=None, help="IVF-PQ: re-score k x RERANK candidates exactly (default 8; 0: off)"
    )
    index.add_argument("--hnsw-m", type=_positive, default=32, help="HNSW links per node (default %(default)s)")
    index.add_argument("--ef-search", type=_positive, default=None, help="HNSW search breadth (default: tuned)")
    index.add_argument(
        "--train-sample", type=_positive, default=None, help="rows to train IVF on (default max(40 nlist, 100k))"
    )
    index.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@10 the tuning aims at (default %(default)s)"
    )
    index.add_argument("--seed", type=int, default=0, help="training sample and self-check queries")
    index.add_argument("--threads", type=_positive, default=None, help="FAISS threads (default: all CPUs)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")

    search = commands.add_parser("search", help="nearest stored images (or reports) of image or text queries")
    search.add_argument("index", metavar="INDEX", help="an index folder written by `chexficient index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", nargs="+", metavar="FILE", help="image queries (PNG, JPEG, DICOM)")
    query.add_argument("--text", action="append", metavar="TEXT", help="a report-style text query (repeatable)")
    search.add_argument(
        "--model", default=None, help="model folder (default: the one recorded in the store's manifest)"
    )
    search.add_argument("-k", type=_positive, default=10, help="results per query, at most 1000 (default 10)")
    search.add_argument("--json", action="store_true", help="JSON lines: one object per query")
    search.add_argument("--nprobe", type=_positive, default=None, help="IVF lists to search (default: the tuned)")
    search.add_argument("--ef-search", type=_positive, default=None, help="HNSW breadth (default: the tuned)")
    search.add_argument("--no-mmap", action="store_true", help="read the index into memory instead of mapping it")
    search.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    search.add_argument("--dtype", default="auto", choices=ENGINE_DTYPES, help="as for embed")


def _query_model(index_dir: str, model: str | None) -> str:
    """--model, or the model folder recorded in the indexed store's manifest."""
    if model is not None:
        return model
    from .inference.faiss_index import read_record

    recorded = ((read_record(index_dir).get("store") or {}).get("manifest") or {}).get("model") or {}
    if recorded.get("model_dir") and os.path.isdir(recorded["model_dir"]):
        return recorded["model_dir"]
    raise ValueError(f"{index_dir}: its store records no model folder that exists here; give --model DIR.")


def _run_index_search(args: argparse.Namespace) -> int:
    if args.command == "index":
        from .inference.faiss_index import index_summary
        from .inference.index import build_index
        from .inference.index_plan import IndexOptions

        options = IndexOptions(
            kind=args.kind,
            memory_budget=args.memory_budget,
            column=args.column,
            nlist=args.nlist,
            nprobe=args.nprobe,
            m=args.pq_m,
            nbits=args.pq_nbits,
            opq=args.opq,
            rerank=args.rerank,
            hnsw_m=args.hnsw_m,
            ef_search=args.ef_search,
            train_sample=args.train_sample,
            target_recall=args.target_recall,
            seed=args.seed,
            threads=args.threads,
            progress=not args.no_progress,
        )
        record = build_index(args.store, args.out, options)
        print(f"{index_summary(record)} -> {args.out}")
        return 0
    from .inference.search import SearchEngine, check_k, format_hits

    k = check_k(args.k)
    engine = SearchEngine(
        args.index,
        _query_model(args.index, args.model),
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        mmap=not args.no_mmap,
        device=args.device,
        dtype=args.dtype,
    )
    queries = args.image if args.image else args.text
    results = engine.search_images(args.image, k) if args.image else engine.search_texts(args.text, k)
    for query, hits in zip(queries, results):
        if args.json:
            kind = "image" if args.image else "text"
            print(json.dumps({"query": query, "kind": kind, "results": [hit.to_dict() for hit in hits]}))
        else:
            print(format_hits(query, hits))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chexficient", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed images (and reports) into a store of Parquet shards (resumable)")
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, .csv/.txt manifest, or image files")
    embed.add_argument(
        "--out", required=True, help="store folder (Parquet shards + manifest.json); re-runs embed only new ids"
    )
    embed.add_argument(
        "--text-column", default=None, help="also embed each row's report from this column of a .csv manifest"
    )
    embed.add_argument("--encoding", default="utf-8", help=ENCODING_HELP)
    embed.add_argument(
        "--export", default=None, help="also write one .parquet or .safetensors file at the end (sets that fit)"
    )
    embed.add_argument(
        "--shard-rows", type=_positive, default=4096, help="rows per shard (what a kill can lose; default %(default)s)"
    )
    embed.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine (or the processes of torchrun); ray: a Ray cluster through Ray Data, CPU actors "
        "decoding and one actor per GPU embedding (pip install 'chexficient[scale]'; default %(default)s)",
    )
    embed.add_argument(
        "--ray-address", default=None, help="--engine ray: the cluster (auto, ray://head:10001); default a local Ray"
    )
    embed.add_argument(
        "--num-actors",
        type=_positive,
        default=None,
        help="--engine ray: embedding actors (default one per GPU; without GPUs one per CPU, each decoding too)",
    )
    embed.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="--engine ray: GPUs per embedding actor (default 1 when the cluster has GPUs; 0: CPU actors that also decode)",
    )
    embed.add_argument(
        "--decode-actors",
        type=_positive,
        default=None,
        help="--engine ray with GPUs: most CPU actors decoding images (default the cluster's CPUs less one per GPU actor)",
    )
    _runtime_options(embed)

    classify = commands.add_parser("classify", help="zero-shot probabilities per image")
    classify.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, .csv/.txt manifest, or image files")
    classify.add_argument("--labels", required=True, help='comma-separated findings, e.g. "Pneumothorax,Cardiomegaly"')
    classify.add_argument("--out", required=True, help="output .csv (id, path, one column per label) or .json")
    classify.add_argument("--encoding", default="utf-8", help=ENCODING_HELP)
    _runtime_options(classify)

    curate = commands.add_parser(
        "curate",
        help="curate image-report pairs with the trainer's curator, no training: an archive with a model, or a store "
        "of embeddings (--embeddings)",
        parents=[_curation_options()],
        conflict_handler="resolve",
    )
    curate.add_argument(
        "manifest", metavar="PAIRS", nargs="?", default=None, help="CSV/JSONL/parquet manifest of image-report pairs"
    )
    curate.add_argument(
        "--model", default=None, help="a trained CheXficient folder (weights, processor, tokenizer); with PAIRS"
    )
    curate.add_argument(
        "--embeddings",
        default=None,
        metavar="EMB_DIR",
        help="curate this store of image and report embeddings (`chexficient embed ... --text-column COLUMN`) "
        "instead of PAIRS: streamed, no model",
    )
    curate.add_argument("--out", required=True, help="output folder: subset manifest, curated_subset.json, report")
    curate.add_argument(
        "--shuffle",
        action="store_true",
        help="--embeddings: walk the store's row groups, and rows within a window, in a seeded random order "
        "(default: the store's order)",
    )
    curate.add_argument(
        "--knn-sample-rows",
        type=_positive,
        default=10_000,
        help="the report's neighbour statistic and figures use at most this many rows of each set (default "
        "%(default)s)",
    )
    curate.add_argument("--image-root", default=None, help="folder the manifest's image paths start from")
    curate.add_argument("--encoding", default="utf-8", help=ENCODING_HELP)
    curate.add_argument(
        "--super-batch-size", type=_positive, default=480, help="pairs per curation decision (default %(default)s)"
    )
    curate.add_argument("--seed", type=int, default=0, help="order of the super-batches and FPS starts")
    curate.add_argument("--label-columns", nargs="*", default=None, help="label columns (default: 0/1 columns)")
    curate.add_argument("--batch-size", type=_positive, default=64, help="pairs per embedding forward")
    curate.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images")
    curate.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    curate.add_argument("--no-progress", action="store_true", help="no progress bar")

    _index_search_commands(commands)

    serve = commands.add_parser("serve", help="HTTP API: GET /health, POST /embed, POST /classify")
    serve.add_argument("--model", required=True, help="local model folder")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    serve.add_argument(
        "--max-upload-mb", type=float, default=32.0, help="larger uploads get 413 (default %(default)s)"
    )
    serve.add_argument(
        "--max-batch-size", type=_positive, default=16, help="requests per forward (default %(default)s)"
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a batch waits for more requests (default %(default)s)",
    )
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    serve.add_argument("--dtype", default="auto", choices=ENGINE_DTYPES, help="as for embed")
    serve.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    serve.add_argument("--log-level", default="info", help="uvicorn log level")
    serve.add_argument("--index", default=None, help="an index folder: adds POST /search (image or text queries)")
    serve.add_argument("--nprobe", type=_positive, default=None, help="with --index: IVF lists to search")
    _serve_limit_options(serve)

    export = commands.add_parser("export-onnx", help="ONNX image embedder, checked against PyTorch with onnxruntime")
    export.add_argument("--model", required=True, help="local model folder")
    export.add_argument("--out", required=True, help="output .onnx file")
    export.add_argument("--int8", action="store_true", help="also write OUT.int8.onnx (onnxruntime dynamic int8)")
    export.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch.onnx exporter")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    export.add_argument(
        "--min-cosine",
        type=float,
        default=0.999,
        help="fail when ONNX vs PyTorch cosine is lower (default %(default)s)",
    )
    return parser


def _source(inputs: list[str]) -> str | list[str]:
    return inputs[0] if len(inputs) == 1 else inputs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `chexficient` console command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(kebab_case_flags(sys.argv[1:] if argv is None else argv, option_strings(parser)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never reach for the Hub
    try:
        if args.command == "embed" and args.engine == "ray":
            from .inference.ray_embed import run_embed_ray

            if args.preprocess != "cpu":
                raise ValueError("--engine ray preprocesses in its CPU decode actors; leave --preprocess at cpu.")
            if args.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
                raise ValueError(
                    "--engine ray reads manifests as UTF-8; leave out --encoding (or re-save it as UTF-8)."
                )
            summary = run_embed_ray(
                _source(args.inputs),
                args.out,
                args.model,
                address=args.ray_address,
                num_gpus_per_actor=args.gpus_per_actor,
                concurrency=args.num_actors,
                decode_concurrency=args.decode_actors,
                batch_size=args.batch_size,
                text_column=args.text_column,
                shard_rows=args.shard_rows,
                dtype=args.dtype,
                device=args.device,
                compile=args.compile,
                export=args.export,
                progress=not args.no_progress,
            )
            print(summary.line())
            return 0
        if args.command == "embed":
            ray_options = (args.ray_address, args.num_actors, args.gpus_per_actor, args.decode_actors)
            if any(option is not None for option in ray_options):
                raise ValueError("--ray-address, --num-actors, --gpus-per-actor, --decode-actors: need --engine ray.")
        if args.command in ("embed", "classify"):
            from .inference.engine import InferenceEngine

            engine = InferenceEngine.from_pretrained(
                args.model, args.device, args.dtype, args.compile, preprocess=args.preprocess
            )
            if args.command == "embed":
                from .inference.embed import run_embed

                summary = run_embed(
                    _source(args.inputs),
                    args.out,
                    engine,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    progress=not args.no_progress,
                    shard_rows=args.shard_rows,
                    text_column=args.text_column,
                    export=args.export,
                    encoding=args.encoding,
                )
            else:
                from .inference.classify import run_classify

                summary = run_classify(
                    _source(args.inputs),
                    args.out,
                    engine,
                    args.labels,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    progress=not args.no_progress,
                    encoding=args.encoding,
                )
            print(summary.line())
            return 0
        if args.command == "curate":
            from .inference.curate import CurateOptions, curate_archive
            from .inference.curate_store import curate_store

            if args.embeddings is not None and (args.manifest is not None or args.model is not None):
                raise ValueError(
                    "give PAIRS --model DIR (embed and curate an archive) or --embeddings EMB_DIR (curate a store "
                    "of embeddings, no model), not both."
                )
            if args.embeddings is None and args.manifest is None and args.model is None:
                raise ValueError(
                    "nothing to curate: give PAIRS --model DIR (embed and curate an archive) or --embeddings EMB_DIR "
                    "(curate a store written by `chexficient embed ... --text-column COLUMN`)."
                )
            if args.embeddings is None and args.model is None:
                raise ValueError("PAIRS needs --model DIR (or curate a store of embeddings: --embeddings EMB_DIR).")
            if args.embeddings is None and args.manifest is None:
                raise ValueError("--model needs PAIRS, the manifest of image-report pairs to embed and curate.")
            options = CurateOptions(
                super_batch_size=args.super_batch_size,
                seed=args.seed,
                image_root=args.image_root,
                label_columns=args.label_columns,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=args.device,
                progress=not args.no_progress,
                knn_sample_rows=args.knn_sample_rows,
                shuffle=args.shuffle,
                encoding=args.encoding,
            )
            if args.embeddings is not None:
                report = curate_store(args.embeddings, args.out, _curation_config(args), options)
            else:
                report = curate_archive(args.manifest, args.model, args.out, _curation_config(args), options)
            line = (
                f"kept {report['kept']} of {report['considered']} pairs ({report['share_kept']:.1%}) -> "
                f"{Path(args.out) / report['subset_manifest']}; report in {Path(args.out) / 'report.md'}"
            )
            if report.get("unreadable"):
                line += f"; {report['unreadable']} unreadable images in {Path(args.out) / report['errors_file']}"
            print(line)
            return 0
        if args.command in ("index", "search"):
            return _run_index_search(args)
        if args.command == "serve":
            from .inference.server import serve

            serve(
                args.model,
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                max_upload_mb=args.max_upload_mb,
                max_batch_size=args.max_batch_size,
                max_wait_ms=args.max_wait_ms,
                device=args.device,
                dtype=args.dtype,
                compile=args.compile,
                index=args.index,
                nprobe=args.nprobe,
                api_key=args.api_key or os.environ.get("CHEXFICIENT_API_KEY") or None,
                insecure_no_auth=args.insecure_no_auth,
                max_concurrency=args.max_concurrency,
                max_inflight_pixels=args.max_inflight_pixels,
                queue_timeout=args.queue_timeout,
                header_timeout=args.header_timeout,
                body_timeout=args.body_timeout,
                idle_timeout=args.idle_timeout,
            )
            return 0
        from .inference.onnx_export import export_onnx

        report = export_onnx(
            args.model, args.out, int8=args.int8, exporter=args.exporter, opset=args.opset, min_cosine=args.min_cosine
        )
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"chexficient {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
