"""The `chexficient` command: embed, classify, serve, export-onnx. Everything runs from a local model folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .inference.engine import ENGINE_DTYPES


DESCRIPTION = """Fast CheXficient inference from a local model folder (nothing is downloaded).

  chexficient embed    INPUT --model DIR --out emb.parquet       embeddings (resumable; parquet or safetensors)
  chexficient classify INPUT --model DIR --labels "A,B" --out p.csv   zero-shot probabilities (csv or json)
  chexficient serve    --model DIR [--port 8000]                  HTTP API with micro-batching
  chexficient export-onnx --model DIR --out model.onnx [--int8]   ONNX image embedder, checked against PyTorch

INPUT is a folder (searched recursively for .png/.jpg/.jpeg/.dcm/.dicom), a .csv manifest (a `path` column,
optional `id`), a .txt manifest (one path a line) or image files. Unreadable images are reported in OUT.errors.csv
and skipped."""


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chexficient", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed images into a parquet or safetensors file (resumable)")
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, .csv/.txt manifest, or image files")
    embed.add_argument("--out", required=True, help="output file (.parquet or .safetensors); re-runs append new ids")
    embed.add_argument(
        "--format", choices=("parquet", "safetensors"), default=None, help="default: from --out's suffix, else parquet"
    )
    _runtime_options(embed)

    classify = commands.add_parser("classify", help="zero-shot probabilities per image")
    classify.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, .csv/.txt manifest, or image files")
    classify.add_argument("--labels", required=True, help='comma-separated findings, e.g. "Pneumothorax,Cardiomegaly"')
    classify.add_argument("--out", required=True, help="output .csv (id, path, one column per label) or .json")
    _runtime_options(classify)

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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never reach for the Hub
    try:
        if args.command in ("embed", "classify"):
            from .inference.engine import InferenceEngine

            engine = InferenceEngine.from_pretrained(args.model, args.device, args.dtype, args.compile)
            if args.command == "embed":
                from .inference.embed import run_embed

                summary = run_embed(
                    _source(args.inputs),
                    args.out,
                    engine,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    fmt=args.format,
                    progress=not args.no_progress,
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
                )
            print(summary.line())
            return 0
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
