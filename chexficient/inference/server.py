"""`chexficient serve`: a FastAPI app that embeds and zero-shot classifies uploaded radiographs.

Concurrent requests are micro-batched: a single worker task takes the first queued image, waits up to `max_wait_ms`
for more (at most `max_batch_size`), runs one forward in a thread and answers every request of the batch. Uploads
are decoded in a thread pool, bounded by `max_upload_mb` (413), and bad input gets a JSON 4xx without harming the
server: 400 for empty, corrupt or truncated images, 413 for uploads over `max_upload_mb` or images over the
processor's pixel budget (`max_image_pixels`, 60 MP by default), 415 for files that are not PNG/JPEG/DICOM, 422 for
missing fields or labels (at most `MAX_LABELS` labels of at most `MAX_LABEL_CHARS` characters each).

Label sets are tokenised and embedded in the request's own thread (not in the batching thread, where every queued
request would wait for it) and kept in the model's LRU prompt cache (`CheXficientModel.zero_shot_cache_size`).

With an index (`serve --index INDEX`, `chexficient.inference.search.SearchEngine`), `/search` answers image queries
(embedded in the micro-batches, like `/embed`, with the same upload limits and errors) and text queries; without
one it answers 404 saying how to load one. `k` is 1..`MAX_K` (422 otherwise). `/embed_text` takes at most
`MAX_TEXTS` texts of at most `MAX_TEXT_CHARS` characters (413 over either, 400 for an empty or non-string text).

    GET  /health                                                   (+ "index": kind, rows, ... with --index)
    POST /embed       multipart: file=<image>                       -> {"filename", "dim", "embedding"}
    POST /classify    multipart: file=<image>, labels="A,B" (form or ?labels=)  -> {"filename", "probabilities"}
    POST /search      multipart file=<image> or form/JSON text="...", k=10 (or ?k=)  -> {"query", "k", "results"}
    POST /embed_text  JSON {"texts": ["...", ...]}                  -> {"dim", "embeddings"}
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from .engine import InferenceEngine, parse_labels


logger = logging.getLogger(__name__)

MAX_LABELS = 64
MAX_LABEL_CHARS = 100
MAX_TEXTS = 64  # texts per /embed_text request
MAX_TEXT_CHARS = 4096  # characters per text (the tokenizer keeps the first 256 tokens anyway)
IMAGE_FIELD = "a PNG, JPEG or DICOM radiograph"
LABELS_FIELD = "comma-separated findings, e.g. 'Pneumothorax,Cardiomegaly' (or the `labels` query parameter)"


def sniff_image(data: bytes) -> str | None:
    """ "png", "jpeg" or "dicom" from the leading bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


# ----- micro-batching ------------------------------------------------------------------------------------------


@dataclass
class _Request:
    pixel_values: np.ndarray
    labels: tuple[str, ...] | None
    text_embeds: torch.Tensor | None  # [C, 2, D] prompt embeddings of `labels`
    future: asyncio.Future


@dataclass
class MicroBatcher:
    """Collects queued requests into batches of at most `max_batch_size`, waiting at most `max_wait_ms`."""

    engine: InferenceEngine
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    batch_sizes: list[int] = field(default_factory=list)
    _queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="chexficient-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(
        self, pixel_values: np.ndarray, labels: tuple[str, ...] | None = None, text_embeds: torch.Tensor | None = None
    ) -> dict[str, np.ndarray]:
        """Queue one preprocessed image; resolves to {"embedding": [D]} (+ "probabilities": [C] for `labels`, whose
        prompt embeddings `text_embeds` [C, 2, D] the caller computed)."""
        if (labels is None) != (text_embeds is None):
            raise ValueError("pass both `labels` and their `text_embeds`, or neither.")
        if self._queue is None:
            raise RuntimeError("the micro-batcher is not running (the app's lifespan did not start).")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(pixel_values, labels, text_embeds, future))
        return await future

    async def _collect(self) -> list[_Request]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_ms / 1000.0
        while len(batch) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [request for request in batch if not request.future.done()]  # skip cancelled clients

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self._compute, batch)
            except Exception as error:  # a failed forward fails its requests, never the worker
                logger.exception("forward of a batch of %d failed", len(batch))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            for request, result in zip(batch, results):
                if not request.future.done():
                    request.future.set_result(result)

    def _compute(self, batch: list[_Request]) -> list[dict[str, np.ndarray]]:
        pixels = torch.from_numpy(np.stack([request.pixel_values for request in batch]))
        embeds = self.engine.embed_pixels(pixels)  # one forward for the whole batch
        results = [{"embedding": row} for row in embeds.cpu().numpy()]
        groups: dict[tuple[str, ...], list[int]] = {}  # requests with the same label set are scored together
        for index, request in enumerate(batch):
            if request.labels is not None:
                groups.setdefault(request.labels, []).append(index)
        for indices in groups.values():
            text_embeds = batch[indices[0]].text_embeds
            probs = self.engine.classify_embeds(embeds[indices], text_embeds=text_embeds)
            for index, row in zip(indices, probs):
                results[index]["probabilities"] = row
        return results


# ----- upload size limit ---------------------------------------------------------------------------------------


class UploadLimitMiddleware:
    """ASGI middleware answering 413 when a request body exceeds `max_bytes`, declared or streamed (chunked).

    A streamed body that grows past the limit is cut off (the app sees a client disconnect) and whatever the app
    then answers is replaced by the 413.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Callable[[dict], Awaitable[None]]) -> None:
        body = json.dumps({"detail": f"upload too large: the limit is {self.max_bytes / 2**20:g} MB."}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            await self._reject(send)
            return
        received = 0
        too_large = False
        started = False

        async def limited_receive() -> dict:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    if message.get("more_body", False):
                        await self._drain(receive)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if too_large:
                return  # the app's own answer to the cut-off body is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:  # a real failure: let the server's error handling see it
                raise
        if too_large and not started:
            await self._reject(send)

    async def _drain(self, receive: Callable[[], Awaitable[dict]], cap: int = 256 * 2**20) -> None:
        """Read and drop the rest of the body (up to `cap`), so that the client sees the 413 and not a reset."""
        seen = 0
        while seen < cap:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


# ----- the app -------------------------------------------------------------------------------------------------


def create_app(
    model: str | os.PathLike | InferenceEngine,
    *,
    max_upload_mb: float = 32.0,
    max_batch_size: int = 16,
    max_wait_ms: float = 10.0,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    index: str | os.PathLike | Any = None,
    nprobe: int | None = None,
) -> Any:
    """The FastAPI app for a model folder or an already loaded `InferenceEngine`, and optionally an index folder
    (or a loaded `SearchEngine`) for `/search`.

    `app.state.engine`, `app.state.batcher` (whose `batch_sizes` lists every forward's batch size) and
    `app.state.search` (None without an index) are exposed.
    """
    if max_batch_size < 1 or max_wait_ms < 0 or max_upload_mb <= 0:
        raise ValueError("max_batch_size must be >= 1, max_wait_ms >= 0 and max_upload_mb > 0.")
    engine = (
        model if isinstance(model, InferenceEngine) else InferenceEngine.from_pretrained(model, device, dtype, compile)
    )
    batcher = MicroBatcher(engine, max_batch_size, max_wait_ms)
    max_bytes = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="CheXficient", summary="Chest X-ray embeddings and zero-shot findings.", lifespan=lifespan)
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.search = _search_engine(index, engine, nprobe)

    async def decode(file: UploadFile) -> np.ndarray:
        data = await file.read(max_bytes + 1)
        name = file.filename or "upload"
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: upload too large; the limit is {max_upload_mb:g} MB.")
        if not data:
            raise HTTPException(400, f"{name}: empty upload (0 bytes).")
        if sniff_image(data) is None:
            raise HTTPException(415, f"{name}: not a PNG, JPEG or DICOM image.")
        try:
            return await run_in_threadpool(engine.image_processor.process_one, data, name)
        except (ValueError, OSError) as error:
            too_large = any(cls.__name__ == "ImageTooLargeError" for cls in type(error).__mro__)  # pixel budget
            raise HTTPException(413 if too_large else 400, str(error)) from error

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info = engine.info
        return {
            "status": "ok",
            "device": info.device,
            "dtype": info.dtype,
            "compiled": info.compiled,
            "image_size": info.image_size,
            "projection_dim": info.projection_dim,
            "zero_shot": engine.tokenizer is not None,
            "batches": len(batcher.batch_sizes),
            "requests": sum(batcher.batch_sizes),
            "index": app.state.search.info() if app.state.search is not None else None,
        }

    @app.post("/embed")
    async def embed(file: Annotated[UploadFile, File(description=IMAGE_FIELD)]) -> dict[str, Any]:
        pixels = await decode(file)
        result = await batcher.submit(pixels)
        return {
            "filename": file.filename,
            "dim": int(result["embedding"].shape[0]),
            "embedding": result["embedding"].tolist(),
        }

    @app.post("/classify")
    async def classify(
        request: Request,
        file: Annotated[UploadFile, File(description=IMAGE_FIELD)],
        labels: Annotated[str | None, Form(description=LABELS_FIELD)] = None,
    ) -> dict[str, Any]:
        raw = labels if labels is not None else request.query_params.get("labels")
        if engine.tokenizer is None:
            raise HTTPException(422, "this model folder has no tokenizer, so /classify is unavailable.")
        try:
            label_list = parse_labels(raw or "")
        except ValueError as error:
            raise HTTPException(422, str(error)) from error
        if len(label_list) > MAX_LABELS:
            raise HTTPException(422, f"labels: at most {MAX_LABELS} findings per request, got {len(label_list)}.")
        too_long = [label for label in label_list if len(label) > MAX_LABEL_CHARS]
        if too_long:
            raise HTTPException(
                422,
                f"labels: each finding has at most {MAX_LABEL_CHARS} characters; {too_long[0][:40]!r}... has "
                f"{len(too_long[0])}.",
            )
        pixels = await decode(file)
        text_embeds = await run_in_threadpool(engine.label_embeds, label_list)  # not in the batching thread
        result = await batcher.submit(pixels, tuple(label_list), text_embeds)
        probs = {label: float(p) for label, p in zip(label_list, result["probabilities"])}
        return {"filename": file.filename, "probabilities": probs}

    _add_search_routes(app, decode, max_bytes)
    app.add_middleware(UploadLimitMiddleware, max_bytes=max_bytes + 64 * 1024)  # room for the multipart framing
    return app


# ----- search and text embedding -------------------------------------------------------------------------------


def _search_engine(index: Any, engine: InferenceEngine, nprobe: int | None) -> Any:
    """A `SearchEngine` over `index` (a folder or a loaded one) that embeds queries with `engine`; None without."""
    if index is None:
        return None
    from .search import SearchEngine

    if isinstance(index, SearchEngine):
        return index
    return SearchEngine(index, engine=engine, nprobe=nprobe)


async def _json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    body = await request.body()
    if len(body) > max_bytes:
        raise HTTPException(413, f"request body too large; the limit is {max_bytes / 2**20:g} MB.")
    try:
        payload = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTTPException(400, f"the body is not valid JSON ({error}).") from error
    if not isinstance(payload, dict):
        raise HTTPException(400, 'the JSON body must be an object, e.g. {"text": "...", "k": 10}.')
    return payload


def _check_text(text: Any, field_name: str = "text") -> str:
    if not isinstance(text, str):
        raise HTTPException(400, f"{field_name}: must be a string, got {type(text).__name__}.")
    if not text.strip():
        raise HTTPException(400, f"{field_name}: empty text query.")
    if len(text) > MAX_TEXT_CHARS:
        raise HTTPException(413, f"{field_name}: at most {MAX_TEXT_CHARS} characters, got {len(text)}.")
    return text


def _check_k(raw: Any) -> int:
    from .search import MAX_K, check_k

    if raw is None:
        return 10
    try:
        return check_k(int(raw) if isinstance(raw, str) and raw.strip().lstrip("-").isdigit() else raw)
    except ValueError as error:
        raise HTTPException(422, f"k must be an integer from 1 to {MAX_K}, got {str(raw)[:40]!r}.") from error


def _add_search_routes(app: Any, decode: Callable[[Any], Awaitable[np.ndarray]], max_bytes: int) -> None:
    """POST /search and POST /embed_text on `app` (its engine, batcher and search engine from `app.state`)."""
    from starlette.datastructures import UploadFile as StarletteUpload

    engine, batcher = app.state.engine, app.state.batcher

    def need_tokenizer(route: str) -> None:
        if engine.tokenizer is None:
            raise HTTPException(422, f"this model folder has no tokenizer, so {route} takes no text.")

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        searcher = app.state.search
        if searcher is None:
            raise HTTPException(404, "no index loaded: start the server with `chexficient serve --index INDEX`.")
        content_type = request.headers.get("content-type", "")
        raw_k = request.query_params.get("k")
        if content_type.startswith("application/json"):
            payload = await _json_object(request, max_bytes)
            return await answer(searcher, None, payload.get("text"), _check_k(payload.get("k", raw_k)))
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise HTTPException(
                422, "give an image upload (multipart field `file`) or a text query (form or JSON field `text`)."
            )
        async with request.form(max_files=1, max_fields=16) as form:
            upload, text, raw_k = form.get("file"), form.get("text"), form.get("k", raw_k)
            if upload is not None and not isinstance(upload, StarletteUpload):
                raise HTTPException(422, "file: must be an uploaded image (multipart/form-data).")
            return await answer(searcher, upload, text, _check_k(raw_k))

    async def answer(searcher: Any, upload: Any, text: Any, k: int) -> dict[str, Any]:
        if upload is not None and text is not None:
            raise HTTPException(422, "give an image (`file`) or a `text` query, not both.")
        if upload is None and text is None:
            raise HTTPException(
                422, "give an image upload (multipart field `file`) or a text query (form or JSON field `text`)."
            )
        if upload is not None:
            pixels = await decode(upload)
            embedding = (await batcher.submit(pixels))["embedding"]
            query: dict[str, Any] = {"kind": "image", "filename": upload.filename}
        else:
            need_tokenizer("/search")
            text = _check_text(text)
            embedding = (await run_in_threadpool(engine.embed_texts, [text]))[0]
            query = {"kind": "text", "text": text}
        hits = (await run_in_threadpool(searcher.search_vectors, embedding, k))[0]
        return {"query": query, "k": k, "results": [hit.to_dict() for hit in hits]}

    @app.post("/embed_text")
    async def embed_text(request: Request) -> dict[str, Any]:
        need_tokenizer("/embed_text")
        texts = (await _json_object(request, max_bytes)).get("texts")
        if not isinstance(texts, list) or not texts:
            raise HTTPException(400, 'texts: give a non-empty JSON list of strings, e.g. {"texts": ["..."]}.')
        if len(texts) > MAX_TEXTS:
            raise HTTPException(413, f"texts: at most {MAX_TEXTS} per request, got {len(texts)}.")
        texts = [_check_text(text, f"texts[{i}]") for i, text in enumerate(texts)]
        embeddings = await run_in_threadpool(engine.embed_texts, texts)
        return {"dim": int(embeddings.shape[1]), "embeddings": embeddings.tolist()}


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs: Any) -> None:
    """Run the app with uvicorn (one process: the model is loaded once and requests are micro-batched)."""
    import uvicorn

    uvicorn.run(create_app(model_dir, **kwargs), host=host, port=port, log_level=log_level)


__all__ = [
    "MAX_LABELS",
    "MAX_LABEL_CHARS",
    "MAX_TEXTS",
    "MAX_TEXT_CHARS",
    "MicroBatcher",
    "UploadLimitMiddleware",
    "create_app",
    "serve",
    "sniff_image",
]
