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

The server bounds itself as a whole, not only per request (`ServerLimits`; the `chexficient serve` options in
brackets):
- Concurrency: at most `max_concurrency` requests are processed at once [--max-concurrency; twice the CPUs or
  twice `max_batch_size`, whichever is more: 32 with the default batch of 16 on up to 16 CPUs]. A request counts from the moment its body has been read in full, so uploads still arriving (bounded by
  the body timeout) never take the slots of requests ready to run; beyond the limit: 503 with `Retry-After: 1`.
- Pixels in flight: decodes running at once hold at most `max_inflight_pixels` pixels between them
  [--max-inflight-pixels; twice the processor's `max_image_pixels`, 120 M by default]. Each decode reserves its
  image's pixels (decoded or resized, whichever is more) from a PNG's or JPEG's header, or the per-image budget for
  a DICOM, and waits for room (oldest first among those that fit: a small image does not queue behind a large one);
  after `queue_timeout` seconds [--queue-timeout, 10] it gets 503 with `Retry-After: 1`. An image larger than the
  whole budget is decoded alone.
- Timeouts, which a client dripping a byte at a time cannot extend: a request's line and headers must arrive within
  `header_timeout` seconds [--header-timeout, 10] of its first byte (of the connection, for its first request), its
  body within `body_timeout` seconds [--body-timeout, 60] of its headers; 408 and the connection closed otherwise.
  An idle keep-alive connection is closed after `idle_timeout` seconds [--idle-timeout, 30].
- A body over `max_upload_mb`, declared or chunked, gets its 413 as soon as the limit is passed.
- Errors: every error answer is JSON, and an unexpected exception is a 500 (logged with its traceback), not a broken
  connection. After an error the keep-alive connection stays usable when the request's body was read in full;
  otherwise the answer says `Connection: close`, and the server discards what the client still sends for up to
  `LINGER_S` seconds before closing (so that the client reads the answer, not a connection reset).
- Memory: whenever nothing is being decoded and `TRIM_AFTER_PIXELS` (16 M) pixels or more were decoded since the
  last time, the garbage collector and glibc's `malloc_trim` (in a thread) return the freed memory to the system.
- A bearer token [--api-key, or the `CHEXFICIENT_API_KEY` environment variable]: every route but /health then needs
  `Authorization: Bearer <key>` (compared in constant time), 401 with `WWW-Authenticate: Bearer` otherwise. `serve`
  refuses to bind beyond loopback without a key unless told `insecure_no_auth` [--insecure-no-auth].
The timeouts and the lingering close belong to the connection: `serve` and `server_config` (uvicorn with
`GuardedH11Protocol`) apply them; the rest is in the app `create_app` returns.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import hmac
import ipaddress
import json
import logging
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from .engine import InferenceEngine, parse_labels
from .server_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_QUEUE_TIMEOUT_S,
)


logger = logging.getLogger(__name__)

MAX_LABELS = 64
MAX_LABEL_CHARS = 100
MAX_TEXTS = 64  # texts per /embed_text request
MAX_TEXT_CHARS = 4096  # characters per text (the tokenizer keeps the first 256 tokens anyway)
IMAGE_FIELD = "a PNG, JPEG or DICOM radiograph"
LABELS_FIELD = "comma-separated findings, e.g. 'Pneumothorax,Cardiomegaly' (or the `labels` query parameter)"

API_KEY_ENV = "CHEXFICIENT_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # answered without the API key, and not counted against max_concurrency
DEFAULT_INFLIGHT_PIXELS = 120_000_000  # when the processor has no per-image budget
RETRY_AFTER_S = 1
LINGER_S = 2.0  # a connection closed while the client is still sending discards what arrives for this long...
LINGER_BYTES = 64 * 2**20  # ...or up to this many bytes
DRAIN_BYTES = 64 * 1024  # a refused request's declared body up to this size is read, to keep the connection
TRIM_AFTER_PIXELS = 16_000_000  # pixels decoded since the budget was last idle that trigger `release_memory`


def sniff_image(data: bytes) -> str | None:
    """ "png", "jpeg" or "dicom" from the leading bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


_JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's first frame header (the ones their decoders use); None for
    anything else (DICOM) or a header not found in the first MB."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if not data.startswith(b"\xff\xd8"):
        return None
    position, end = 2, min(len(data), 2**20)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in _JPEG_FRAME_MARKERS:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def decode_cost(data: bytes, processor: Any, fallback: int) -> int:
    """Pixels a decode of `data` reserves from the in-flight budget: the decoded image's or the resized one's,
    whichever is more, from the header; the processor's per-image budget (`max_image_pixels`, else `fallback`) when
    the header says nothing (DICOM), and never more than that budget (a larger image is refused from its header)."""
    cap = getattr(processor, "max_image_pixels", None) or fallback
    size = header_size(data)
    if size is None or min(size) <= 0:
        return cap
    width, height = size
    pixels = width * height
    shortest = (getattr(processor, "size", None) or {}).get("shortest_edge")
    if getattr(processor, "do_resize", False) and shortest:
        short, long = min(width, height), max(width, height)
        pixels = max(pixels, shortest * int(shortest * long / short))
    return max(1, min(pixels, cap))


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> None:
    """Collect garbage (exceptions' tracebacks can hold a decode's arrays) and hand the C heap's free pages back to
    the system (glibc keeps them in its per-thread arenas otherwise, and RSS stays at the burst's peak)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool = False) -> None:
    """Refuse (ValueError) to serve beyond loopback without an API key, unless `insecure_no_auth`."""
    if api_key or insecure_no_auth or is_loopback(host):
        return
    raise ValueError(
        f"refusing to listen on {host!r} without an API key: anyone who can reach it could use /embed and /classify. "
        f"Give --api-key KEY (or set {API_KEY_ENV}), bind 127.0.0.1, or pass --insecure-no-auth to serve "
        "without a key on purpose."
    )


# ----- limits on the server as a whole -------------------------------------------------------------------------


def default_max_concurrency(max_batch_size: int = 16) -> int:
    """Twice the CPUs this process may use or twice `max_batch_size` (so that micro-batches can fill while the next
    images decode), whichever is more."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2 * cpus, 2 * max_batch_size)


@dataclass(frozen=True)
class ServerLimits:
    """What the server as a whole allows (see the module's docstring); times in seconds."""

    max_concurrency: int
    max_inflight_pixels: int
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_inflight_pixels < 1:
            raise ValueError("max_concurrency and max_inflight_pixels must be >= 1.")
        for name in ("queue_timeout", "header_timeout", "body_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}.")


class PixelBudgetTimeout(Exception):
    """A decode waited `queue_timeout` seconds for room in the in-flight pixel budget."""


class PixelBudget:
    """The pixels of the decodes running at once, at most `limit`: `reserve(pixels)` waits until they fit, at most
    `timeout` seconds (`PixelBudgetTimeout`). Whenever room frees, the waiters that fit are let in, oldest first: a
    small image does not queue behind a large one that does not fit yet. An image larger than the whole budget runs
    alone. Whenever the budget empties, `on_idle(pixels)` is called with the pixels reserved since it last returned
    True. Used from one event loop."""

    def __init__(self, limit: int, timeout: float, on_idle: Callable[[int], bool] | None = None):
        self.limit, self.timeout, self.on_idle = limit, timeout, on_idle
        self.in_flight = 0
        self.peak = 0  # most pixels in flight at once
        self.waited = 0  # reservations that had to wait
        self.refused = 0  # reservations that timed out
        self._since_reset = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def _fits(self, pixels: int) -> bool:
        return self.in_flight == 0 or self.in_flight + pixels <= self.limit

    def _admit(self, pixels: int) -> None:
        self.in_flight += pixels
        self.peak = max(self.peak, self.in_flight)
        self._since_reset += pixels

    def _wake(self) -> None:
        waiting = []
        for pixels, future in self._waiters:
            if future.done():
                continue
            if self._fits(pixels):
                self._admit(pixels)
                future.set_result(True)
            else:
                waiting.append((pixels, future))
        self._waiters = waiting

    def _release(self, pixels: int) -> None:
        self.in_flight -= pixels
        self._wake()
        if self.in_flight == 0 and not self._waiters and self.on_idle is not None and self.on_idle(self._since_reset):
            self._since_reset = 0

    async def _wait(self, pixels: int) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = (pixels, future)
        self._waiters.append(entry)
        self.waited += 1

        def expire() -> None:
            if not future.done():
                self._waiters.remove(entry)
                future.set_result(False)

        timer = loop.call_later(self.timeout, expire)
        try:
            admitted = await future
        except asyncio.CancelledError:  # the client went away while waiting
            if future.done() and not future.cancelled() and future.result():
                self._release(pixels)
            elif entry in self._waiters:
                self._waiters.remove(entry)
            raise
        finally:
            timer.cancel()
        if not admitted:
            self.refused += 1
            raise PixelBudgetTimeout(
                f"no room for {pixels / 1e6:.1f} MP in the in-flight pixel budget of {self.limit / 1e6:.1f} MP "
                f"within {self.timeout:g} s."
            )

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        if self._fits(pixels):
            self._admit(pixels)
        else:
            await self._wait(pixels)
        try:
            yield
        finally:
            self._release(pixels)

    def info(self) -> dict[str, int]:
        return {"limit": self.limit, "in_flight": self.in_flight, "peak": self.peak, "waiting": len(self._waiters)}


@dataclass
class Concurrency:
    """Requests being processed (counted from the end of their body), at most `limit`; `refused` got 503."""

    limit: int | None
    active: int = 0
    peak: int = 0
    refused: int = 0

    def acquire(self) -> bool:
        if self.limit is not None and self.active >= self.limit:
            self.refused += 1
            return False
        self.active += 1
        self.peak = max(self.peak, self.active)
        return True

    def release(self) -> None:
        self.active -= 1


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


# ----- the guard: API key, upload limit, concurrency, internal errors --------------------------------------------


class _Exchange:
    """One request as the guard sees it: whether its body has been read in full, whether an answer has started, and
    whether the guard answered it (then the app's own output is dropped)."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], has_body: bool):
        self.send = send
        self.body_done = not has_body
        self.started = False
        self.answered = False

    async def answer(self, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """A JSON error, saying `Connection: close` unless the request's body was read in full."""
        self.answered = True
        if self.started:
            return
        self.started = True
        body = json.dumps({"detail": detail}).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
        if not self.body_done:
            head.append((b"connection", b"close"))
        await self.send({"type": "http.response.start", "status": status, "headers": head})
        await self.send({"type": "http.response.body", "body": body})

    async def drain(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Read and drop the body (only called for a small declared one)."""
        while not self.body_done:
            message = await receive()
            if message["type"] != "http.request":
                return
            if not message.get("more_body", False):
                self.body_done = True


class GuardMiddleware:
    """ASGI middleware in front of the app: the API key (401), the upload limit (413, declared or streamed), the
    concurrency limit (503 + Retry-After) and internal errors (500), each answered as JSON.

    A request whose body is still arriving when it is answered (an oversized or chunked one, or one the app answered
    early) is answered with `Connection: close`; after any other answer the keep-alive connection stays usable.
    """

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        max_bytes: int,
        api_key: str | None = None,
        concurrency: Concurrency | None = None,
        open_paths: frozenset[str] = OPEN_PATHS,
        on_memory_error: Callable[[], Any] | None = None,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.api_key = api_key.encode() if api_key else None
        self.concurrency = concurrency if concurrency is not None else Concurrency(None)
        self.open_paths = open_paths
        self.on_memory_error = on_memory_error

    def _auth_problem(self, value: bytes | None) -> tuple[str, bytes] | None:
        """None for `Authorization: Bearer <the key>`, else (detail, WWW-Authenticate value)."""
        if value is None:
            return "missing API key: send `Authorization: Bearer <key>`.", b'Bearer realm="chexficient"'
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key or b""):
            return None
        return "invalid API key.", b'Bearer realm="chexficient", error="invalid_token"'

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        declared_bytes = int(declared) if declared.isdigit() else None
        exchange = _Exchange(send, b"transfer-encoding" in headers or bool(declared_bytes))
        open_path = scope["path"] in self.open_paths
        if self.api_key is not None and not open_path:
            problem = self._auth_problem(headers.get(b"authorization"))
            if problem is not None:
                if declared_bytes is not None and declared_bytes <= DRAIN_BYTES:
                    await exchange.drain(receive)
                await exchange.answer(401, problem[0], ((b"www-authenticate", problem[1]),))
                return
        too_large = f"upload too large: the limit is {self.max_bytes / 2**20:g} MB."
        if declared_bytes is not None and declared_bytes > self.max_bytes:
            await exchange.answer(413, too_large)
            return
        received = 0
        counted = False

        async def guarded_receive() -> dict:
            nonlocal received, counted
            if exchange.answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a streamed (chunked) body: cut it off here, not after reading it
                await exchange.answer(413, too_large)
                return {"type": "http.disconnect"}
            if not message.get("more_body", False):
                exchange.body_done = True
                if not open_path and not counted:
                    if not self.concurrency.acquire():
                        limit = self.concurrency.limit
                        await exchange.answer(
                            503,
                            f"server busy: {limit} requests are being processed (max_concurrency); retry shortly.",
                            ((b"retry-after", str(RETRY_AFTER_S).encode()),),
                        )
                        return {"type": "http.disconnect"}
                    counted = True
            return message

        async def guarded_send(message: dict) -> None:
            if exchange.answered:
                return  # the app's answer to a request the guard answered (its body cut off) is dropped
            if message["type"] == "http.response.start":
                exchange.started = True
                if not exchange.body_done:  # answered before its body arrived: do not read the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception as error:
            if exchange.answered:
                return  # the app failing on a body the guard cut off
            if exchange.started:
                raise  # too late for an answer: the server closes the connection
            logger.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if isinstance(error, MemoryError) and self.on_memory_error is not None:
                self.on_memory_error()
            await exchange.answer(500, f"internal server error ({type(error).__name__}); see the server log.")
        finally:
            if counted:
                self.concurrency.release()


UploadLimitMiddleware = GuardMiddleware  # its former name (upload limit only)


# ----- the connection: header, body and idle timeouts, lingering close -------------------------------------------


class _LingeringTransport:
    """The connection's transport as uvicorn sees it, but `close()` goes through the protocol, which half-closes
    and drains a connection whose client may still be sending (`GuardedH11Protocol._close`)."""

    def __init__(self, transport: asyncio.Transport, protocol: Any):
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def pause_reading(self) -> None:
        if not self._closing:
            self._transport.pause_reading()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._protocol._close()


def _raw_408(detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(limits: ServerLimits) -> type:
    """uvicorn's h11 protocol with `limits`' header and body deadlines (absolute: trickling bytes does not extend
    them) and a lingering close. The idle keep-alive timeout is uvicorn's own `timeout_keep_alive`."""
    import h11
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._raw = transport
            self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
            self.flow = FlowControl(self.transport)  # type: ignore[arg-type]
            self._phase: tuple[str, Any] | None = None
            self._deadline: asyncio.TimerHandle | None = None
            self._linger: asyncio.TimerHandle | None = None
            self._lingering = False
            self._discarded = 0
            self._lost = False
            self._set_deadline(("header", None), limits.header_timeout)  # the first request counts from here

        def data_received(self, data: bytes) -> None:
            if self._lingering:  # closing: what still arrives is dropped
                self._discarded += len(data)
                if self._discarded > LINGER_BYTES:
                    self._raw.close()
                return
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True
            self._cancel_deadline()
            if self._linger is not None:
                self._linger.cancel()
            super().connection_lost(exc)

        # deadlines

        def _set_deadline(self, phase: tuple[str, Any], seconds: float) -> None:
            if phase == self._phase:
                return  # a deadline runs from the start of its phase, however the bytes trickle in
            self._cancel_deadline()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired, phase[0])

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, None

        def _update(self) -> None:
            if self.transport.is_closing():
                self._cancel_deadline()
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                self._set_deadline(("body", self.cycle), limits.body_timeout)
            elif state is h11.IDLE and self.conn.trailing_data[0]:
                phase = self._phase if self._phase is not None and self._phase[0] == "header" else ("header", 1)
                self._set_deadline(phase, limits.header_timeout)
            elif state is not h11.IDLE or self._phase is None or self._phase[0] != "header":
                self._cancel_deadline()  # being answered, or idle between requests (uvicorn's keep-alive timer)

        def _expired(self, phase: str) -> None:
            self._deadline, self._phase = None, None
            if self.transport.is_closing():
                return
            if phase == "header":
                if self.conn.trailing_data[0]:
                    self._raw.write(_raw_408(f"request headers not complete within {limits.header_timeout:g} s."))
                logger.info(
                    "closed a connection from %s: no complete request within %gs", self.client, limits.header_timeout
                )
            else:
                cycle = self.cycle
                if cycle is not None and not cycle.response_started:
                    self._raw.write(_raw_408(f"request body not complete within {limits.body_timeout:g} s."))
                    cycle.response_started = True
                if cycle is not None:
                    cycle.disconnected = True  # the app sees the client gone; its answer is dropped
                    cycle.message_event.set()
                logger.info(
                    "closed a connection from %s: body not complete within %gs", self.client, limits.body_timeout
                )
            self.transport.close()

        # closing

        def _peer_may_send(self) -> bool:
            state = self.conn.their_state
            return (
                state is h11.SEND_BODY
                or state is h11.ERROR
                or (state is h11.IDLE and bool(self.conn.trailing_data[0]))
            )

        def _close(self) -> None:
            """Close, or while the client may still be sending (a body not read, headers not complete): send FIN
            after the answer, drop what arrives for up to LINGER_S seconds, then close (a close with unread data
            resets the connection, and the client may lose the answer)."""
            raw = self._raw
            self._cancel_deadline()
            if self._lost or raw.is_closing() or not self._peer_may_send() or not raw.can_write_eof():
                raw.close()
                return
            try:
                raw.write_eof()
                raw.resume_reading()
            except (OSError, RuntimeError, NotImplementedError):
                raw.close()
                return
            self._lingering = True
            self._linger = self.loop.call_later(LINGER_S, raw.close)

    return GuardedH11Protocol


# ----- the app -------------------------------------------------------------------------------------------------


async def _to_thread_to_the_end(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in the thread pool; if the caller is cancelled, wait for the thread to finish anyway before
    re-raising (a thread cannot be stopped, and its memory stays allocated until it ends)."""
    future = asyncio.ensure_future(run_in_threadpool(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved: nobody is left to see it
        raise


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
    api_key: str | None = None,
    max_concurrency: int | None = None,
    max_inflight_pixels: int | None = None,
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
) -> Any:
    """The FastAPI app for a model folder or an already loaded `InferenceEngine`, and optionally an index folder
    (or a loaded `SearchEngine`) for `/search`.

    `api_key` (None: no key) guards every route but /health. `max_concurrency` defaults to
    `default_max_concurrency()`, `max_inflight_pixels` to twice the processor's `max_image_pixels`; the timeouts
    (seconds) are applied by the connection (`server_config`, `serve`), and kept in `app.state.limits`.

    `app.state.engine`, `app.state.batcher` (whose `batch_sizes` lists every forward's batch size),
    `app.state.search` (None without an index), `app.state.limits` (`ServerLimits`), `app.state.concurrency`
    (`Concurrency`) and `app.state.pixel_budget` (`PixelBudget`) are exposed.
    """
    if max_batch_size < 1 or max_wait_ms < 0 or max_upload_mb <= 0:
        raise ValueError("max_batch_size must be >= 1, max_wait_ms >= 0 and max_upload_mb > 0.")
    engine = (
        model if isinstance(model, InferenceEngine) else InferenceEngine.from_pretrained(model, device, dtype, compile)
    )
    if max_inflight_pixels is None:
        per_image = getattr(engine.image_processor, "max_image_pixels", None)
        max_inflight_pixels = 2 * per_image if per_image else DEFAULT_INFLIGHT_PIXELS
    limits = ServerLimits(
        max_concurrency if max_concurrency is not None else default_max_concurrency(max_batch_size),
        int(max_inflight_pixels),
        queue_timeout,
        header_timeout,
        body_timeout,
        idle_timeout,
    )
    batcher = MicroBatcher(engine, max_batch_size, max_wait_ms)
    max_bytes = int(max_upload_mb * 2**20)
    concurrency = Concurrency(limits.max_concurrency)
    trimming: set[asyncio.Future] = set()

    def trim_soon(decoded: int | None = None) -> bool:
        """Give memory back (in a thread, one trim at a time) once `TRIM_AFTER_PIXELS` were decoded since the last
        time, or now (None: after a MemoryError); whether a trim started."""
        if (decoded is not None and decoded < TRIM_AFTER_PIXELS) or trimming:
            return False
        future = asyncio.get_running_loop().run_in_executor(None, release_memory)
        trimming.add(future)
        future.add_done_callback(trimming.discard)
        return True

    budget = PixelBudget(limits.max_inflight_pixels, limits.queue_timeout, on_idle=trim_soon)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="CheXficient", summary="Chest X-ray embeddings and zero-shot findings.", lifespan=lifespan)
    app.state.engine = engine
    app.state.batcher = batcher
    app.state.search = _search_engine(index, engine, nprobe)
    app.state.limits = limits
    app.state.concurrency = concurrency
    app.state.pixel_budget = budget

    async def decode(file: UploadFile) -> np.ndarray:
        data = await file.read(max_bytes + 1)
        name = file.filename or "upload"
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: upload too large; the limit is {max_upload_mb:g} MB.")
        if not data:
            raise HTTPException(400, f"{name}: empty upload (0 bytes).")
        if sniff_image(data) is None:
            raise HTTPException(415, f"{name}: not a PNG, JPEG or DICOM image.")
        cost = decode_cost(data, engine.image_processor, limits.max_inflight_pixels)
        try:
            async with budget.reserve(cost):  # held until the decode's thread is done, even if the client left
                return await _to_thread_to_the_end(engine.image_processor.process_one, data, name)
        except PixelBudgetTimeout as error:
            raise HTTPException(503, f"{name}: server busy: {error}", {"Retry-After": str(RETRY_AFTER_S)}) from error
        except MemoryError as error:
            trim_soon()
            raise HTTPException(413, f"{name}: ran out of memory decoding this image.") from error
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
            "auth": bool(api_key),
            "concurrency": {"limit": concurrency.limit, "active": concurrency.active, "refused": concurrency.refused},
            "pixel_budget": budget.info(),
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
    app.add_middleware(
        GuardMiddleware,
        max_bytes=max_bytes + 64 * 1024,  # room for the multipart framing
        api_key=api_key or None,
        concurrency=concurrency,
        on_memory_error=trim_soon,
    )
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


def server_config(app: Any, **kwargs: Any) -> Any:
    """A `uvicorn.Config` for `app` (from `create_app`) whose connections keep `app.state.limits`' header, body and
    idle timeouts and close lingering (`guarded_protocol`); `kwargs` go to `uvicorn.Config` (host, port, log_level)."""
    import uvicorn

    limits: ServerLimits = app.state.limits
    return uvicorn.Config(
        app, http=guarded_protocol(limits), timeout_keep_alive=limits.idle_timeout, lifespan="on", **kwargs
    )


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    api_key: str | None = None,
    insecure_no_auth: bool = False,
    **kwargs: Any,
) -> None:
    """Run the app with uvicorn (one process: the model is loaded once and requests are micro-batched). Binding
    beyond loopback without `api_key` is refused (ValueError, before the model is loaded) unless
    `insecure_no_auth`."""
    import uvicorn

    check_exposure(host, api_key, insecure_no_auth)
    if not api_key and not is_loopback(host):
        logger.warning(
            "serving on %s without an API key (--insecure-no-auth): anyone who can reach it may use it", host
        )
    app = create_app(model_dir, api_key=api_key, **kwargs)
    uvicorn.Server(server_config(app, host=host, port=port, log_level=log_level)).run()


__all__ = [
    "API_KEY_ENV",
    "MAX_LABEL_CHARS",
    "MAX_LABELS",
    "MAX_TEXT_CHARS",
    "MAX_TEXTS",
    "check_exposure",
    "Concurrency",
    "create_app",
    "decode_cost",
    "default_max_concurrency",
    "guarded_protocol",
    "GuardMiddleware",
    "header_size",
    "is_loopback",
    "MicroBatcher",
    "PixelBudget",
    "PixelBudgetTimeout",
    "release_memory",
    "serve",
    "server_config",
    "ServerLimits",
    "sniff_image",
    "UploadLimitMiddleware",
]
