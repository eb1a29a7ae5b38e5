"""`chexficient embed --engine ray`: the same embedding store as `run_embed`, built across machines with Ray Data.

    driver                 the inputs (`discover_inputs`) less the ids already stored -> `ray.data.from_items`
    decode   CPU actors    `map_batches(_Decode)`, an autoscaling pool: our image loader and the model's image
                           processor (loaded once per actor); an unreadable file becomes a row whose `error` names it
                           (`DECODE_ERRORS`, the one error policy of `ImageDataset`), and the run goes on
    embed    GPU actors    `map_batches(_Embed, num_gpus=...)`, a fixed pool: one `InferenceEngine` per actor, one
                           actor per GPU; images and, with a text column, reports; it writes nothing, so a call
                           that Ray retries is harmless
    (no GPU)  CPU actors   without GPUs (`num_gpus_per_actor=0`) the two stages are one, `_DecodeAndEmbed`, one
                           actor per CPU: a separate decode pool would take CPUs from the embedding, and the
                           pixels would cross the object store for nothing
    write    small actors  `map_batches(_WriteShards, batch_size=shard_rows)`, no CPU reserved: each call writes its
                           rows as one complete shard and returns one summary row (shard, rows, the failures)
    driver                 the summaries -> `OUT/errors.csv`, `manifest.json`, the optional export; a `RunSummary`

Flush rule: a call is the only moment a Ray Data UDF is sure to run (actors get no reliable destructor), so every call
of the write stage leaves nothing buffered: one call, one complete shard (`ShardWriter`: temporary name, then an atomic
rename). Writing in the GPU actors would tie the shard size to the forward batch; the write stage gets shards of
`shard_rows` rows from the embeddings alone (a few KB a row, where the pixels are hundreds). A shard is named by a
digest of its ids (`part-ray<sha1>-00000.parquet`): unique (a run's ids are, and a resume drops the stored ones), and
a write that Ray retries (an actor lost after the rename) replaces the same file with the same rows instead of storing
them twice.

Exactly once on resume: the driver drops the ids already in the store before it builds the dataset, so a re-run, on
one machine or a hundred, embeds only the rest; a run killed at any moment keeps every shard it renamed.

The inputs are listed on the driver, as `run_embed` lists them, and handed to Ray in blocks of about a forward batch
(at most `MAX_INPUT_BLOCKS`): a few hundred bytes per input in the driver, fine up to tens of millions of images. The
model folder, the images and OUT must be paths that every node sees (a shared file system), and `chexficient[scale]`
must be installed on every node. Each run starts its actors afresh (each imports torch and loads the model, about
10-15 s on 2 busy cores), a cost that only matters for small runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.images import InputItem, decode_image, discover_inputs, preprocess_image
from .embed import RunSummary, check_store_path, write_errors
from .engine import InferenceEngine, load_processor, resolve_dtype
from .store import ERRORS_FILE, ShardWriter, export_embeddings, stored_dim, stored_ids, write_manifest


logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'chexficient[scale]'"
# the driver hands Ray the inputs in at most this many blocks (each at least a forward batch of rows)
MAX_INPUT_BLOCKS = 10_000
# forward batches per call of a CPU actor that decodes and embeds (Ray Data's per-call cost, spread over more rows)
CPU_BATCHES_PER_CALL = 16


def import_ray():
    """`ray` with Ray Data, or a RuntimeError that says what to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow, pandas)
    except ImportError as error:
        raise RuntimeError(f"--engine ray needs Ray Data ({error}); install it with: {INSTALL_HINT}") from error
    return ray


# ----- the stages --------------------------------------------------------------------------------------------------


class _Decode:
    """Decode stage (a CPU actor): the model's image processor, loaded once per actor, on each row's file.

    Returns the rows with `pixel_values` [n, 3, H, W] float32 and `error` ("" for a decoded image; else the message,
    which names the file, as `ImageDataset` reports it); a failed row carries zeros in place of pixels."""

    def __init__(self, model_dir: str):
        self.processor = load_processor(model_dir)[0]
        self._blank: np.ndarray | None = None

    def blank(self) -> np.ndarray:
        """Zeros the shape of a preprocessed image (measured on a grey probe once, when a whole batch failed)."""
        if self._blank is None:
            import PIL.Image

            probe = PIL.Image.new("L", (1024, 1024), 128)
            self._blank = np.zeros_like(np.asarray(preprocess_image(self.processor, probe, "probe"), np.float32))
        return self._blank

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels: list[np.ndarray | None] = []
        errors: list[str] = []
        for path in batch["path"].tolist():
            values, message = decode_image(self.processor, path, path)
            if message is not None and path not in message:
                message = f"{path}: {message}"
            pixels.append(values)
            errors.append(message or "")
        good = [values for values in pixels if values is not None]
        if good and self._blank is None:
            self._blank = np.zeros_like(good[0])
        blank = self._blank if self._blank is not None else self.blank()
        shapes = {values.shape for values in good} | {blank.shape}
        if len(shapes) > 1:
            raise ValueError(
                f"the image processor gives pixel values of several shapes {sorted(shapes)}; --engine ray needs one "
                "size (center crop on)."
            )
        return {
            **batch,
            "pixel_values": np.stack([blank if values is None else values for values in pixels]),
            "error": np.asarray(errors, dtype=object),
        }


class _Embed:
    """Embed stage (one actor per GPU, or a CPU actor): one `InferenceEngine`; embeddings of the decoded rows (and
    of their reports), zeros for the failed ones. It writes nothing, so a retried call is harmless."""

    def __init__(self, model_dir: str, device: str, dtype: str, compile: bool):
        self.engine = InferenceEngine.from_pretrained(model_dir, device, dtype, compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["error"] == "")
        width = self.engine.projection_dim
        result = {name: batch[name] for name in ("id", "path", "text", "error") if name in batch}
        result["embedding"] = np.zeros((len(batch["id"]), width), np.float32)
        if len(good):
            result["embedding"][good] = self.engine.embed_numpy(np.ascontiguousarray(batch["pixel_values"][good]))
        if "text" in batch:
            result["text_embedding"] = np.zeros((len(batch["id"]), width), np.float32)
            if len(good):
                result["text_embedding"][good] = self.engine.embed_texts(batch["text"][good].tolist())
        return result


class _DecodeAndEmbed:
    """Decode and embed in one CPU actor (clusters without GPUs): the two stages' work on a Ray batch of
    `CPU_BATCHES_PER_CALL` forward batches, one forward batch of pixels at a time (the pixels never leave the actor,
    so a larger Ray batch costs no memory and spreads Ray's per-call overhead over more rows)."""

    def __init__(self, model_dir: str, device: str, dtype: str, compile: bool, forward_batch: int):
        self.decode = _Decode(model_dir)
        self.embed = _Embed(model_dir, device, dtype, compile)
        self.forward_batch = forward_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        parts = [
            self.embed(
                self.decode({name: values[start : start + self.forward_batch] for name, values in batch.items()})
            )
            for start in range(0, rows, self.forward_batch)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def shard_writer_name(ids: Sequence[str]) -> str:
    """`ray<digest of the ids>`: unique per shard (a run's ids are), the same when Ray retries the write."""
    return "ray" + hashlib.sha1("\0".join(ids).encode()).hexdigest()[:20]


class _WriteShards:
    """Write stage (small actors, no CPU reserved): each call writes its rows as one complete shard and returns one
    summary row (shard name, rows, the failures as JSON). Nothing stays buffered between calls."""

    def __init__(self, out: str):
        self.out = Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        ids = batch["id"][ok].tolist()
        shard = ""
        if ids:
            writer = ShardWriter(self.out, writer=shard_writer_name(ids), shard_rows=len(ids))
            writer.append(
                ids,
                batch["path"][ok].tolist(),
                batch["embedding"][ok],
                texts=batch["text"][ok].tolist() if "text" in batch else None,
                text_embeddings=batch["text_embedding"][ok] if "text_embedding" in batch else None,
            )
            writer.flush()
            shard = writer.written[-1]
        failures = [[i, m] for i, m in zip(batch["id"][~ok].tolist(), batch["error"][~ok].tolist())]
        return {
            "shard": np.asarray([shard], dtype=object),
            "rows": np.asarray([len(ids)], dtype=np.int64),
            "failures": np.asarray([json.dumps(failures)], dtype=object),
        }


# ----- the driver --------------------------------------------------------------------------------------------------


def _input_rows(items: Sequence[InputItem], text_column: str | None) -> list[dict[str, str]]:
    """The inputs as rows for `ray.data.from_items` (id, path, and the report text with a text column)."""
    if text_column is None:
        return [{"id": item.id, "path": item.path} for item in items]
    return [{"id": item.id, "path": item.path, "text": item.text or ""} for item in items]


def _model_facts(model_dir: str | os.PathLike) -> tuple[int, int]:
    """(image size, embedding width) from the folder's config, without loading weights on the driver."""
    from configuration_chexficient import CheXficientConfig

    config = CheXficientConfig.from_pretrained(model_dir, local_files_only=True)
    return int(config.vision_config.image_size), int(config.projection_dim)


def run_embed_ray(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    address: str | None = None,
    num_gpus_per_actor: float | None = None,
    concurrency: int | None = None,
    decode_concurrency: int | None = None,
    batch_size: int = 32,
    text_column: str | None = None,
    shard_rows: int = 4096,
    dtype: str = "auto",
    device: str = "auto",
    compile: bool = False,
    export: str | os.PathLike | None = None,
    progress: bool = True,
) -> RunSummary:
    """Embed every input of `source` whose id is not in the store `out` yet, with Ray Data; the store, errors and
    summary are those of `run_embed`.

    `address`: the Ray cluster (`"auto"`, `"ray://head:10001"`); None starts a local Ray, or uses the one already
    initialised in this process. `num_gpus_per_actor`: GPUs per embedding actor (default 1 when the cluster has
    GPUs, else 0: CPU actors that decode and embed). `concurrency`: embedding actors (default: one per GPU, or one
    per CPU without GPUs). `decode_concurrency`: most decoding actors beside GPU actors (default: the cluster's CPUs
    less one per embedding actor).
    """
    ray = import_ray()
    start = time.perf_counter()
    out = check_store_path(out)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: no such folder.")
    model_dir = os.path.abspath(model_dir)
    image_size, width = _model_facts(model_dir)
    if text_column is not None and load_processor(model_dir)[1] is None:
        raise ValueError(f"--model {model_dir}: no tokenizer in the folder, so report texts cannot be embedded.")
    items = discover_inputs(source, text_column)
    done = stored_ids(out)
    held = stored_dim(out) if done else None
    if held is not None and held != width:
        raise ValueError(f"{out}: holds {held}-d embeddings but this model gives {width}-d; use another --out.")
    todo = [item for item in items if item.id not in done]
    by_id = {item.id: item for item in todo}

    failures: list[tuple[InputItem, str]] = []
    shards: list[str] = []
    embedded = 0
    gpus = num_gpus_per_actor or 0.0
    actors = concurrency or 1
    actor_device = device if device != "auto" else ("cuda" if gpus else "cpu")
    if todo:
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, **({"include_dashboard": False} if address is None else {}))
        try:
            resources = ray.cluster_resources()
            if num_gpus_per_actor is None:
                num_gpus_per_actor = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
            gpus = float(num_gpus_per_actor)
            if gpus > 0 and resources.get("GPU", 0) < gpus:
                raise ValueError(
                    f"the Ray cluster has {resources.get('GPU', 0):g} GPUs, an embedding actor asks for {gpus:g}; "
                    "use --gpus-per-actor 0 for CPU actors."
                )
            cpus = max(1, int(resources.get("CPU", 1)))
            actors = concurrency or (max(1, int(resources.get("GPU", 0) // gpus)) if gpus else cpus)
            decoders = decode_concurrency or max(1, int(resources.get("CPU", 1)) - actors)
            actor_device = device if device != "auto" else ("cuda" if gpus else "cpu")
            resolve_dtype(dtype, torch.device(actor_device))  # a wrong --dtype fails here, not in every actor
            summaries = _run_pipeline(
                ray,
                _input_rows(todo, text_column),
                out,
                model_dir,
                actors=actors,
                gpus=gpus,
                decoders=decoders,
                batch_size=batch_size,
                shard_rows=shard_rows,
                device=actor_device,
                dtype=dtype,
                compile=compile,
                progress=progress,
            )
        finally:
            if started:
                ray.shutdown()
        for summary in summaries:
            if summary["shard"]:
                shards.append(summary["shard"])
                embedded += int(summary["rows"])
            failures += [(by_id[i], message) for i, message in json.loads(summary["failures"])]
    order = {item.id: position for position, item in enumerate(todo)}
    failures.sort(key=lambda failure: order[failure[0].id])

    errors = write_errors(out / ERRORS_FILE, failures)
    model = {
        "model_dir": model_dir,
        "device": actor_device,
        "dtype": resolve_dtype(dtype, torch.device(actor_device)),
        "compiled": compile,
        "image_size": image_size,
        "projection_dim": width,
        "preprocess": "cpu",
        "text_column": text_column,
        "engine": "ray",
        "actors": actors,
        "gpus_per_actor": gpus,
    }
    total = write_manifest(out, model)["rows"]
    if export is not None:
        export_embeddings(out, export)
    return RunSummary(
        embedded,
        len(items) - len(todo),
        len(failures),
        total,
        time.perf_counter() - start,
        str(out),
        str(errors) if errors else None,
        sorted(shards),
    )


def _run_pipeline(
    ray: Any,
    rows: list[dict[str, str]],
    out: Path,
    model_dir: str,
    *,
    actors: int,
    gpus: float,
    decoders: int,
    batch_size: int,
    shard_rows: int,
    device: str,
    dtype: str,
    compile: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """Build and run the Ray Data pipeline; the write stage's summary rows."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = context.print_on_execution_start = progress
    try:
        rows_per_call = batch_size if gpus else batch_size * CPU_BATCHES_PER_CALL
        blocks = min(len(rows), max(1, len(rows) // rows_per_call), MAX_INPUT_BLOCKS)
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)  # blocks built here, in the object store
        if not gpus:  # CPU actors: each decodes and embeds its batches (one actor per CPU by default)
            dataset = dataset.map_batches(
                _DecodeAndEmbed,
                fn_constructor_args=(model_dir, device, dtype, compile, batch_size),
                batch_size=rows_per_call,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
            )
        else:
            dataset = dataset.map_batches(
                _Decode,
                fn_constructor_args=(model_dir,),
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders),  # autoscaling CPU actors
                num_cpus=1,
            ).map_batches(
                _Embed,
                fn_constructor_args=(model_dir, device, dtype, compile),
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool: one actor per GPU
                num_gpus=gpus,
                num_cpus=1,
            )
        dataset = dataset.map_batches(
            _WriteShards,
            fn_constructor_args=(str(out),),
            batch_size=shard_rows,  # one complete shard per call
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_cpus=0,  # a Parquet write: never waits behind the decode and embed actors for a CPU
        )
        return list(dataset.iter_rows())
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


__all__ = ["INSTALL_HINT", "import_ray", "run_embed_ray", "shard_writer_name"]
