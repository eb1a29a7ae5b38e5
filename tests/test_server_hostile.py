"""The server as a whole under hostile clients, on real loopback sockets: internal errors, the concurrency limit, the
in-flight pixel budget, slow and endless requests, oversized bodies, the API key, and memory handed back."""

from __future__ import annotations

import asyncio
import io
import json
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import PIL.Image
import pytest
import torch
from helpers import save_tiny_model
from test_inference_cli import write_inputs
from test_inference_server import running

import chexficient.inference.server as server_module
from chexficient.cli import main
from chexficient.inference.engine import InferenceEngine
from chexficient.inference.server import create_app, decode_cost, header_size, is_loopback, release_memory


KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("hostile_server")
    torch.manual_seed(0)
    save_tiny_model(root / "model")
    good, bad = write_inputs(root / "images")
    return {"engine": InferenceEngine.from_pretrained(root / "model"), "good": good, "bad": bad, "root": root}


# ----- a raw HTTP/1.1 client: one socket, so that "the same connection" is certain --------------------------------


def request_bytes(method: str, path: str, **kwargs) -> bytes:
    """The bytes of an HTTP/1.1 request built by httpx (files=, data=, json=, content=, headers=)."""
    request = httpx.Request(method, f"http://127.0.0.1{path}", **kwargs)
    body = request.read()
    target = request.url.raw_path.decode()
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in request.headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    def __init__(self, url: str, timeout: float = 30.0):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection (buffered: {self.buffer[:200]!r})")
        self.buffer += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {key.strip().lower(): value.strip() for key, value in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, method: str, path: str, **kwargs) -> tuple[int, dict[str, str], bytes]:
        self.send(request_bytes(method, path, **kwargs))
        return self.response()

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes this connection (EOF or reset) within `seconds`, reading whatever comes."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if readable:
                try:
                    if not self.sock.recv(65536):
                        return True
                except OSError:
                    return True
        return False


def upload(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


def detail(body: bytes) -> str:
    return json.loads(body)["detail"]


# ----- errors ----------------------------------------------------------------------------------------------------


def test_an_internal_error_is_a_json_500_and_the_keep_alive_connection_survives_it(setup, monkeypatch):
    """A decoder failing in a way nobody planned for (here a RuntimeError, then a MemoryError) must neither break
    the connection nor the server: before, the 500 came with the connection closed under the client."""
    processor = setup["engine"].image_processor
    original = processor.process_one

    def process_one(source, name=None):
        if name == "boom.png":
            raise RuntimeError("decoder state broke")
        if name == "oom.png":
            raise MemoryError()
        return original(source, name)

    monkeypatch.setattr(processor, "process_one", process_one)
    good = setup["good"][0]
    app = create_app(setup["engine"], max_batch_size=2, max_wait_ms=1)
    with running(app) as url:
        connection = Connection(url)
        try:
            status, headers, body = connection.call("POST", "/embed", files=upload(good, "boom.png"))
            assert status == 500 and "RuntimeError" in detail(body), body
            assert headers.get("connection") != "close"
            status, _, body = connection.call("POST", "/embed", files=upload(good))  # the same socket
            assert status == 200 and json.loads(body)["dim"] == 16
            status, _, body = connection.call("POST", "/classify", files=upload(good, "oom.png"), data={"labels": "A"})
            assert status == 413 and "oom.png" in detail(body) and "memory" in detail(body)
            status, _, body = connection.call("POST", "/embed", files=upload(setup["bad"][1]))  # not an image
            assert status == 415
            assert connection.call("POST", "/embed", files=upload(good))[0] == 200
        finally:
            connection.close()


# ----- the concurrency limit and the pixel budget -----------------------------------------------------------------


class Gate:
    """Replaces the processor's `process_one`: images named `slow*` wait until `release` is set; every decode is
    counted (how many ran at once, at most)."""

    def __init__(self, processor, hold: float = 0.0):
        self.original = processor.process_one
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    def __call__(self, source, name=None):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            if name and name.startswith("slow"):
                self.entered.set()
                assert self.release.wait(30)
            time.sleep(self.hold)
            return self.original(source, name)
        finally:
            with self.lock:
                self.active -= 1


def _post_in_thread(url: str, path: Path, name: str, results: dict) -> threading.Thread:
    def post() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            results[name] = client.post("/embed", files=upload(path, name))

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def test_beyond_max_concurrency_requests_get_503_with_retry_after_on_a_connection_that_stays_usable(
    setup, monkeypatch
):
    gate = Gate(setup["engine"].image_processor)
    monkeypatch.setattr(setup["engine"].image_processor, "process_one", gate)
    good = setup["good"][0]
    app = create_app(setup["engine"], max_concurrency=1, max_batch_size=1, max_wait_ms=0)
    results: dict[str, httpx.Response] = {}
    with running(app) as url:
        thread = _post_in_thread(url, good, "slow.png", results)
        assert gate.entered.wait(30)
        connection = Connection(url)
        try:
            status, headers, body = connection.call("POST", "/embed", files=upload(good))
            assert status == 503 and headers["retry-after"] == "1" and "max_concurrency" in detail(body)
            assert headers.get("connection") != "close"  # its body was read: the connection is kept
            status, _, body = connection.call("GET", "/health")  # not counted: always answered
            assert status == 200 and json.loads(body)["concurrency"]["refused"] == 1
            gate.release.set()
            thread.join(30)
            assert results["slow.png"].status_code == 200
            assert connection.call("POST", "/embed", files=upload(good))[0] == 200
        finally:
            gate.release.set()
            connection.close()


def test_the_inflight_pixel_budget_serialises_decodes_and_answers_503_after_the_queue_timeout(setup, monkeypatch):
    """48x48 images (2304 px each) under a budget of 3000 px: decodes run one at a time however many requests
    come at once; a decode that cannot get room within queue_timeout gets 503 + Retry-After."""
    good = setup["good"][0]
    assert decode_cost(good.read_bytes(), setup["engine"].image_processor, 10**9) == 48 * 48
    gate = Gate(setup["engine"].image_processor, hold=0.1)
    monkeypatch.setattr(setup["engine"].image_processor, "process_one", gate)
    app = create_app(setup["engine"], max_inflight_pixels=3000, max_concurrency=16, max_batch_size=4, max_wait_ms=1)
    results: dict[str, httpx.Response] = {}
    with running(app) as url:
        threads = [_post_in_thread(url, good, f"image{i}.png", results) for i in range(6)]
        for thread in threads:
            thread.join(60)
        assert sorted(results) == [f"image{i}.png" for i in range(6)]
        assert all(reply.status_code == 200 for reply in results.values())
        budget = app.state.pixel_budget
        assert gate.most == 1 and budget.peak == 48 * 48 and budget.waited >= 1 and budget.in_flight == 0

    gate.most = 0
    app = create_app(setup["engine"], max_inflight_pixels=3000, queue_timeout=0.5, max_batch_size=1, max_wait_ms=0)
    with running(app) as url:
        slow = _post_in_thread(url, good, "slow.png", results)
        assert gate.entered.wait(30)
        connection = Connection(url)
        try:
            started = time.monotonic()
            status, headers, body = connection.call("POST", "/embed", files=upload(good, "waits.png"))
            assert status == 503 and headers["retry-after"] == "1", body
            assert "waits.png" in detail(body) and "pixel budget" in detail(body)
            assert time.monotonic() - started < 20
            gate.release.set()
            slow.join(30)
            assert results["slow.png"].status_code == 200
            assert connection.call("POST", "/embed", files=upload(good))[0] == 200  # the same connection
        finally:
            gate.release.set()
            connection.close()
    assert gate.most == 1


def test_decode_cost_reads_png_and_jpeg_headers_and_charges_the_resize_of_thin_images(setup):
    processor = setup["engine"].image_processor  # resizes to a short side of 28 px, 60 MP per image
    png = setup["good"][0].read_bytes()
    assert header_size(png) == (48, 48)
    jpeg = io.BytesIO()
    PIL.Image.new("L", (40, 30)).save(jpeg, "JPEG")
    assert header_size(jpeg.getvalue()) == (40, 30)
    thin = png[:16] + (1).to_bytes(4, "big") + (20_000).to_bytes(4, "big") + png[24:]  # a 1 x 20000 header
    assert decode_cost(thin, processor, 10**9) == 28 * 28 * 20_000  # what the resize would allocate
    assert decode_cost(setup["good"][-1].read_bytes(), processor, 10**9) == processor.max_image_pixels  # DICOM
    assert decode_cost(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, processor, 10**9) == processor.max_image_pixels


# ----- slow clients and oversized bodies --------------------------------------------------------------------------


def test_slowloris_connections_are_cut_and_others_are_served_meanwhile(setup):
    """40 connections dripping a request's headers a byte at a time, one dripping its body, one sending nothing and
    one idle after a request: each is closed once its deadline passes (header 1 s, body 1.5 s, idle 1 s; before,
    they stayed open), and a normal request is answered during the attack."""
    app = create_app(
        setup["engine"], header_timeout=1, body_timeout=1.5, idle_timeout=1, max_batch_size=2, max_wait_ms=1
    )
    with running(app) as url:
        drippers = [Connection(url) for _ in range(40)]
        silent, idle = Connection(url), Connection(url)
        body_drip = Connection(url)
        try:
            assert idle.call("GET", "/health")[0] == 200
            body_drip.send(b"POST /embed_text HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
            body_drip.send(b"content-length: 1000\r\n\r\n{")
            request = b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n"
            started = time.monotonic()
            open_ = {id(c): c for c in drippers}
            replies: list[bytes] = []
            normal = None
            for step in range(200):
                for connection in list(open_.values()):
                    try:
                        connection.send(request[step % len(request) : step % len(request) + 1])
                    except OSError:
                        del open_[id(connection)]
                        continue
                    readable, _, _ = select.select([connection.sock], [], [], 0)
                    if readable:
                        try:
                            replies.append(connection.sock.recv(65536))
                        except OSError:
                            pass
                        del open_[id(connection)]
                try:
                    body_drip.send(b" ")
                except OSError:
                    pass
                if normal is None:
                    with httpx.Client(base_url=url, timeout=10) as client:
                        normal = client.post("/embed", files=upload(setup["good"][0]))
                        normal_seconds = time.monotonic() - started
                if not open_ or time.monotonic() - started > 8:
                    break
                time.sleep(0.2)
            cut_after = time.monotonic() - started
            assert not open_, f"{len(open_)} dripping connections still open after {cut_after:.1f} s"
            assert cut_after < 8
            assert any(reply.startswith(b"HTTP/1.1 408") for reply in replies), replies[:3]
            assert normal is not None and normal.status_code == 200 and normal_seconds < 8
            status, headers, body = body_drip.response()
            assert status == 408 and headers["connection"] == "close" and "body" in detail(body)
            assert silent.closed_within(5)
            assert idle.closed_within(5)
        finally:
            for connection in [*drippers, silent, idle, body_drip]:
                connection.close()


def test_oversized_bodies_get_413_at_once_not_after_reading_them(setup):
    """A declared Content-Length over the limit and a chunked body that passes it are answered 413 at once, with
    `Connection: close` (before, the server went on reading: up to 256 MB, here it waited for the rest forever);
    an endless chunked upload is cut off."""
    app = create_app(setup["engine"], max_upload_mb=0.05, max_batch_size=2, max_wait_ms=1)
    boundary = "hostile"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    multipart = f"content-type: multipart/form-data; boundary={boundary}\r\n"
    with running(app) as url:
        declared = Connection(url, timeout=15)
        chunked = Connection(url, timeout=15)
        endless = Connection(url, timeout=15)
        try:
            declared.send(f"POST /embed HTTP/1.1\r\nhost: x\r\n{multipart}content-length: 50000000\r\n\r\n".encode())
            status, headers, body = declared.response()
            assert status == 413 and headers["connection"] == "close" and "too large" in detail(body)
            assert declared.closed_within(10)

            chunked.send(f"POST /embed HTTP/1.1\r\nhost: x\r\n{multipart}transfer-encoding: chunked\r\n\r\n".encode())
            data = part + b"\x00" * 200_000  # over the limit (0.05 MB + 64 KB of framing), then nothing more
            chunked.send(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            status, headers, body = chunked.response()
            assert status == 413 and headers["connection"] == "close" and "too large" in detail(body)
            assert chunked.closed_within(10)

            endless.send(f"POST /embed HTTP/1.1\r\nhost: x\r\n{multipart}transfer-encoding: chunked\r\n\r\n".encode())
            endless.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")  # a file part that never ends
            sent = {"bytes": 0}

            def flood() -> None:
                chunk = b"10000\r\n" + b"\x00" * 0x10000 + b"\r\n"
                try:
                    while sent["bytes"] < 2**31:
                        endless.sock.sendall(chunk)
                        sent["bytes"] += len(chunk)
                except OSError:
                    pass

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            status, headers, body = endless.response()
            assert status == 413 and headers["connection"] == "close"
            sender.join(15)
            assert not sender.is_alive(), f"the endless upload was not cut off ({sent['bytes']} bytes sent)"
        finally:
            for connection in (declared, chunked, endless):
                connection.close()
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/embed", files=upload(setup["good"][0])).status_code == 200


# ----- the API key ------------------------------------------------------------------------------------------------


def test_an_api_key_guards_every_route_but_health_compared_in_constant_time(setup, monkeypatch):
    compared = []
    original = server_module.hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(server_module.hmac, "compare_digest", compare_digest)
    app = create_app(setup["engine"], api_key=KEY, max_batch_size=2, max_wait_ms=1)
    good = setup["good"][0]
    with running(app) as url:
        connection = Connection(url)
        try:
            status, _, body = connection.call("GET", "/health")
            assert status == 200 and json.loads(body)["auth"] is True
            status, headers, body = connection.call("POST", "/embed", files=upload(good))
            assert status == 401 and headers["www-authenticate"].startswith("Bearer") and "API key" in detail(body)
            assert headers.get("connection") != "close"  # a small body is read: the connection stays usable
            for value in ("Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
                status, headers, _ = connection.call(
                    "POST", "/embed", files=upload(good), headers={"authorization": value}
                )
                assert status == 401 and "Bearer" in headers["www-authenticate"], value
            assert 'error="invalid_token"' in headers["www-authenticate"]
            for path in ("/embed_text", "/search", "/openapi.json", "/docs"):
                method = "GET" if path in ("/openapi.json", "/docs") else "POST"
                assert connection.call(method, path, json={"texts": ["x"]})[0] == 401, path
            compared.clear()
            status, _, body = connection.call(
                "POST", "/embed", files=upload(good), headers={"authorization": f"Bearer {KEY}"}
            )
            assert status == 200 and json.loads(body)["dim"] == 16
            assert compared == [(KEY.encode(), KEY.encode())]
            status, _, _ = connection.call(
                "POST", "/embed_text", json={"texts": ["effusion"]}, headers={"authorization": f"bearer {KEY}"}
            )
            assert status == 200
        finally:
            connection.close()
        with httpx.Client(base_url=url, timeout=30) as client:  # a large unauthorised upload: refused, not read
            reply = client.post("/embed", files={"file": ("big.png", b"\x89PNG" + b"\x00" * 2_000_000)})
            assert reply.status_code == 401


def test_serve_refuses_to_listen_beyond_loopback_without_a_key(setup, monkeypatch, capsys):
    calls: list[dict] = []

    def fake_create_app(model, **kwargs):
        calls.append(kwargs)
        return object()

    class FakeServer:
        def __init__(self, config):
            self.config = config

        def run(self):
            pass

    import uvicorn

    monkeypatch.setattr(server_module, "create_app", fake_create_app)
    monkeypatch.setattr(server_module, "server_config", lambda app, **kwargs: kwargs)
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.delenv("CHEXFICIENT_API_KEY", raising=False)
    model = str(setup["root"] / "model")

    assert main(["serve", "--model", model, "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert "without an API key" in error and "--api-key" in error and "--insecure-no-auth" in error
    assert calls == []  # refused before the model is loaded

    assert main(["serve", "--model", model, "--host", "0.0.0.0", "--api-key", KEY]) == 0
    assert calls[-1]["api_key"] == KEY
    monkeypatch.setenv("CHEXFICIENT_API_KEY", "from-the-environment")
    assert main(["serve", "--model", model, "--host", "::"]) == 0
    assert calls[-1]["api_key"] == "from-the-environment"
    monkeypatch.delenv("CHEXFICIENT_API_KEY")
    assert main(["serve", "--model", model, "--host", "0.0.0.0", "--insecure-no-auth"]) == 0
    assert calls[-1]["api_key"] is None
    assert main(["serve", "--model", model, "--max-concurrency", "3", "--header-timeout", "2.5"]) == 0  # loopback
    assert calls[-1]["api_key"] is None and calls[-1]["max_concurrency"] == 3 and calls[-1]["header_timeout"] == 2.5

    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "192.168.1.10", "example.org", "10.0.0.1"):
        assert not is_loopback(host), host


# ----- memory ----------------------------------------------------------------------------------------------------


def test_memory_is_handed_back_once_a_burst_of_large_decodes_is_over(setup, monkeypatch):
    released = threading.Event()
    monkeypatch.setattr(server_module, "TRIM_AFTER_PIXELS", 2 * 48 * 48)  # "large": two of the test's images
    monkeypatch.setattr(server_module, "release_memory", released.set)
    app = create_app(setup["engine"], max_batch_size=2, max_wait_ms=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/embed", files=upload(setup["good"][0])).status_code == 200
        assert not released.wait(0.5)  # one small image: no trim
        results: dict[str, httpx.Response] = {}
        threads = [_post_in_thread(url, setup["good"][i], f"burst{i}.png", results) for i in range(3)]
        for thread in threads:
            thread.join(30)
        assert released.wait(10)
    release_memory()  # the real one runs (glibc: malloc_trim found and called)


def test_pixel_budget_lets_small_decodes_past_a_large_waiter_and_never_leaks():
    async def scenario() -> None:
        budget = server_module.PixelBudget(100, timeout=5)
        order: list[str] = []

        async def decode(name: str, pixels: int, hold: asyncio.Event) -> None:
            async with budget.reserve(pixels):
                order.append(name)
                await hold.wait()

        holds = {name: asyncio.Event() for name in ("big", "large", "small", "gone")}
        tasks = {"big": asyncio.create_task(decode("big", 80, holds["big"]))}
        await asyncio.sleep(0)
        for name, pixels in (("large", 50), ("gone", 30), ("small", 10)):
            tasks[name] = asyncio.create_task(decode(name, pixels, holds[name]))
            await asyncio.sleep(0)
        assert order == ["big", "small"] and budget.in_flight == 90  # "small" fits beside "big"; "large" waits
        tasks["gone"].cancel()  # a client gone while waiting
        await asyncio.sleep(0)
        for name in ("big", "small"):
            holds[name].set()
        await asyncio.sleep(0.01)
        assert order == ["big", "small", "large"] and budget.in_flight == 50
        holds["large"].set()
        await asyncio.gather(tasks["big"], tasks["small"], tasks["large"])
        assert budget.in_flight == 0 and budget.peak == 90

        budget = server_module.PixelBudget(100, timeout=0.05)
        async with budget.reserve(60):
            for pixels in (60, 500):
                with pytest.raises(server_module.PixelBudgetTimeout):
                    async with budget.reserve(pixels):
                        pass
        async with budget.reserve(500):  # larger than the whole budget: admitted alone
            assert budget.in_flight == 500
        assert budget.in_flight == 0 and budget.refused == 2

    asyncio.run(scenario())


def test_a_decode_keeps_its_pixels_reserved_until_its_thread_ends_even_if_the_request_is_cancelled():
    async def scenario() -> None:
        budget = server_module.PixelBudget(100, timeout=5)
        release = threading.Event()

        async def request() -> None:
            async with budget.reserve(80):
                await server_module._to_thread_to_the_end(release.wait, 30)

        task = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done() and budget.in_flight == 80  # the thread still decodes: its pixels stay counted
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.in_flight == 0

    asyncio.run(scenario())
