"""A load test with hostile clients against a live `chexficient serve` (the tiny test model), with its default limits.

Phases, each while a prober sends a normal /embed (a 48x48 PNG) every 0.25 s and records its latency:

  burst      N concurrent large 16-bit PNGs (56 MP by default, under the 60 MP per-image budget): peak RSS while
             they run, RSS afterwards, their statuses (200, or 503 once one waited --queue-timeout for room in the
             in-flight pixel budget)
  slowloris  C connections dripping a request's headers a byte every 2 s: how long until the server cut them
             (header timeout), and how many it answered 408
  body drip  a few connections that send their headers, then drip the body: cut at the body timeout
  chunked    an endless chunked upload (no Content-Length) and a declared 1 GB one: time to the 413 and bytes the
             client had sent by then
  tokens     requests with a missing or wrong bearer token: 401s
  flood      many concurrent normal requests against --max-concurrency: 200s and 503s (with Retry-After)

With `--baseline-tree DIR` (a checkout of an earlier version, served without the options it lacks) the burst is run
against it first, for a before/after of the same machine. Prints and writes JSON (machine info included).

    python benchmarks/server_hostile.py --out benchmarks/results/server_hostile.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import psutil


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

from chexficient.runtime.machine import machine_info  # noqa: E402


KEY = "benchmark-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def client(url: str, timeout: float, headers: dict[str, str] | None = None) -> httpx.Client:
    """An HTTP client with TCP_NODELAY (without it, Nagle's algorithm and delayed ACKs add up to 200 ms to a small
    request sent in two writes, whatever the server does)."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=url, timeout=timeout, headers=headers, transport=transport)


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def large_png(megapixels: float) -> bytes:
    """A smooth 16-bit gradient of about `megapixels` MP (small to upload, large to decode)."""
    side = int((megapixels * 1e6) ** 0.5)
    rows = np.arange(side, dtype=np.uint32)[:, None]
    cols = np.arange(side, dtype=np.uint32)[None, :]
    return png_bytes(((rows * 7 + cols * 3) % 65536).astype(np.uint16))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`chexficient serve` in a subprocess (from `tree`), with its RSS sampled every 20 ms."""

    def __init__(self, tree: Path, model: Path, options: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(tree)}
        command = [sys.executable, "-m", "chexficient.cli", "serve", "--model", str(model), "--port", str(self.port)]
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [*command, "--log-level", "warning", *options], cwd=tree, env=env, stdout=self.log, stderr=self.log
        )
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log}")
            time.sleep(0.2)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.ps.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(0.02)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def peak_mb(self, start: float, end: float) -> float:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0) / 2**20

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Prober:
    """A normal client: one /embed of a small PNG every `period` seconds, latencies with their start times."""

    def __init__(self, url: str, image: bytes, headers: dict[str, str], period: float = 0.25):
        self.url, self.image, self.headers, self.period = url, image, headers, period
        self.results: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with client(self.url, 60, self.headers) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = http.post("/embed", files={"file": ("probe.png", self.image)}).status_code
                except httpx.HTTPError:
                    status = -1
                self.results.append((start, time.monotonic() - start, status))
                time.sleep(max(0.0, self.period - (time.monotonic() - start)))

    def window(self, start: float, end: float) -> dict[str, Any]:
        rows = [(latency, status) for t, latency, status in self.results if start <= t <= end]
        latencies = sorted(1000 * latency for latency, status in rows if status == 200)
        return {
            "requests": len(rows),
            "ok": len(latencies),
            "statuses": _count(status for _, status in rows),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
            "max_ms": round(latencies[-1], 1) if latencies else None,
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _count(statuses) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return dict(sorted(counts.items()))


def burst(server: Server, image: bytes, clients: int, headers: dict[str, str]) -> dict[str, Any]:
    before = server.rss_mb()
    results: list[tuple[int, float, str]] = []
    barrier = threading.Barrier(clients)

    def post(i: int) -> None:
        with client(server.url, 300, headers) as http:
            barrier.wait()
            start = time.monotonic()
            reply = http.post("/embed", files={"file": (f"large{i}.png", image)})
            results.append((reply.status_code, time.monotonic() - start, reply.headers.get("retry-after", "")))

    start = time.monotonic()
    threads = [threading.Thread(target=post, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.monotonic()
    time.sleep(3)  # let the server hand memory back
    return {
        "clients": clients,
        "upload_mb": round(len(image) / 2**20, 2),
        "statuses": _count(status for status, _, _ in results),
        "retry_after_on_503": sorted({ra for status, _, ra in results if status == 503}),
        "seconds": round(end - start, 2),
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(server.peak_mb(start, end + 0.1), 1),
        "rss_after_mb": round(server.rss_mb(), 1),
        "window": (start, end),
    }


def slowloris(url: str, connections: int, drip_every: float, limit_s: float) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    request = b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nX-Padding: "
    sockets = []
    for _ in range(connections):
        sock = socket.create_connection((host, int(port)))
        sock.setblocking(False)
        sockets.append(sock)
    start = time.monotonic()
    open_ = {sock.fileno(): sock for sock in sockets}
    cut_at: list[float] = []
    answered_408 = 0
    step = 0
    next_drip = start
    while open_ and time.monotonic() - start < limit_s:
        now = time.monotonic()
        if now >= next_drip:
            byte = request[step : step + 1] if step < len(request) else b"a"
            step += 1
            next_drip += drip_every
            for fd, sock in list(open_.items()):
                try:
                    sock.send(byte)
                except OSError:
                    cut_at.append(time.monotonic() - start)
                    del open_[fd]
        readable, _, _ = select.select(list(open_.values()), [], [], 0.05) if open_ else ([], [], [])
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 408"):
                answered_408 += 1
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            cut_at.append(time.monotonic() - start)
            open_.pop(sock.fileno(), None)
    end = time.monotonic()
    for sock in sockets:
        sock.close()
    return {
        "connections": connections,
        "drip_every_s": drip_every,
        "cut": len(cut_at),
        "still_open_after_s": {"seconds": round(end - start, 1), "open": len(open_)},
        "answered_408": answered_408,
        "cut_after_s_min": round(min(cut_at), 2) if cut_at else None,
        "cut_after_s_max": round(max(cut_at), 2) if cut_at else None,
        "window": (start, end),
    }


def body_drip(url: str, connections: int, limit_s: float) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /embed_text HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    ).encode()
    socks = [socket.create_connection((host, int(port)), timeout=limit_s) for _ in range(connections)]
    for sock in socks:
        sock.sendall(head)
    start = time.monotonic()
    statuses, cut_at = [], []
    open_ = list(socks)
    while open_ and time.monotonic() - start < limit_s:
        for sock in list(open_):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                data = sock.recv(65536)
                statuses.append(data[9:12].decode() if data.startswith(b"HTTP/1.1") else "closed")
                cut_at.append(time.monotonic() - start)
                open_.remove(sock)
                continue
            try:
                sock.send(b" ")
            except OSError:
                statuses.append("reset")
                cut_at.append(time.monotonic() - start)
                open_.remove(sock)
        time.sleep(1.0)
    for sock in socks:
        sock.close()
    return {
        "connections": connections,
        "statuses": _count(statuses),
        "still_open": len(open_),
        "cut_after_s_max": round(max(cut_at), 1) if cut_at else None,
    }


def chunked_uploads(url: str) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    boundary = "bench"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="endless.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    head = (
        f"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
    sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    sent = {"bytes": 0, "error": None}
    chunk = b"10000\r\n" + b"\x89" * 0x10000 + b"\r\n"

    def flood() -> None:
        try:
            while sent["bytes"] < 8 * 2**30:
                sock.sendall(chunk)
                sent["bytes"] += len(chunk)
        except OSError as error:
            sent["error"] = type(error).__name__

    start = time.monotonic()
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    answered = time.monotonic() - start
    sent_at_answer = sent["bytes"]
    sender.join(timeout=60)
    endless = {
        "status": int(data[9:12]) if data.startswith(b"HTTP/1.1") else None,
        "answered_after_s": round(answered, 3),
        "client_sent_mb_when_answered": round(sent_at_answer / 2**20, 1),
        "connection_cut_after_s": round(time.monotonic() - start, 2) if not sender.is_alive() else None,
        "client_sent_mb_total": round(sent["bytes"] / 2**20, 1),
        "client_error": sent["error"],
    }
    sock.close()

    sock = socket.create_connection((host, int(port)), timeout=60)
    start = time.monotonic()
    sock.sendall((head + "Content-Length: 1073741824\r\n\r\n").encode())
    data = sock.recv(65536)
    declared = {"status": int(data[9:12]) if data.startswith(b"HTTP/1.1") else None}
    declared["answered_after_s"] = round(time.monotonic() - start, 3)
    sock.close()
    return {"endless_chunked": endless, "declared_1gb": declared}


def bad_tokens(url: str, image: bytes, requests: int) -> dict[str, Any]:
    statuses, latencies = [], []
    variants = [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}, {"authorization": KEY}]
    with client(url, 30) as http:
        for i in range(requests):
            start = time.monotonic()
            reply = http.post("/embed", files={"file": ("x.png", image)}, headers=variants[i % len(variants)])
            latencies.append(1000 * (time.monotonic() - start))
            statuses.append(reply.status_code)
        health = http.get("/health").status_code
    return {
        "requests": requests,
        "statuses": _count(statuses),
        "p50_ms": round(statistics.median(latencies), 2),
        "health_without_key": health,
    }


def flood(url: str, image: bytes, clients: int, per_client: int) -> dict[str, Any]:
    statuses: list[int] = []
    retry_after: set[str] = set()
    barrier = threading.Barrier(clients)
    lock = threading.Lock()

    def run() -> None:
        with client(url, 120, AUTH) as http:
            barrier.wait()
            for _ in range(per_client):
                reply = http.post("/embed", files={"file": ("f.png", image)})
                with lock:
                    statuses.append(reply.status_code)
                    if reply.status_code == 503:
                        retry_after.add(reply.headers.get("retry-after", ""))

    start = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "clients": clients,
        "requests": clients * per_client,
        "statuses": _count(statuses),
        "retry_after_on_503": sorted(retry_after),
        "seconds": round(time.monotonic() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/server_hostile.json"))
    parser.add_argument("--megapixels", type=float, default=56.0, help="size of each large 16-bit PNG")
    parser.add_argument("--burst", type=int, default=8, help="concurrent large PNGs")
    parser.add_argument("--slowloris", type=int, default=200, help="connections dripping headers")
    parser.add_argument("--flood-clients", type=int, default=96)
    parser.add_argument("--max-concurrency", type=int, default=None, help="passed to serve (default: its own)")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=60.0)
    parser.add_argument("--baseline-tree", default=None, help="an earlier checkout: its server takes the burst too")
    parser.add_argument("--baseline-label", default=None, help="what the baseline tree is, for the JSON")
    args = parser.parse_args()

    from helpers import save_tiny_model

    results: dict[str, Any] = {"machine": machine_info(), "settings": vars(args).copy()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_tiny_model(work / "model")
        small = png_bytes((np.arange(48 * 48).reshape(48, 48) % 251).astype(np.uint8))
        started = time.monotonic()
        large = large_png(args.megapixels)
        print(
            f"large PNG: {len(large) / 2**20:.1f} MB for {args.megapixels:g} MP ({time.monotonic() - started:.1f} s)"
        )

        if args.baseline_tree:
            baseline = Server(Path(args.baseline_tree), work / "model", [], work / "baseline.log")
            try:
                one = burst(baseline, large, 1, {})
                many = burst(baseline, large, args.burst, {})
                for row in (one, many):
                    row.pop("window")
                results["baseline"] = {
                    "tree": args.baseline_label or args.baseline_tree,
                    "burst_1": one,
                    f"burst_{args.burst}": many,
                }
                print("baseline:", json.dumps(results["baseline"]))
            finally:
                baseline.stop()

        options = ["--api-key", KEY, "--header-timeout", str(args.header_timeout)]
        options += ["--body-timeout", str(args.body_timeout)]
        if args.max_concurrency:
            options += ["--max-concurrency", str(args.max_concurrency)]
        server = Server(ROOT, work / "model", options, work / "server.log")
        try:
            health = httpx.get(f"{server.url}/health").json()
            results["server"] = {
                "options": options[2:],
                "concurrency_limit": health["concurrency"]["limit"],
                "pixel_budget": health["pixel_budget"]["limit"],
                "rss_idle_mb": round(server.rss_mb(), 1),
            }
            prober = Prober(server.url, small, AUTH)
            time.sleep(1)  # the first requests warm up
            quiet = (time.monotonic(), time.monotonic() + 5)
            time.sleep(5)

            one = burst(server, large, 1, AUTH)
            many = burst(server, large, args.burst, AUTH)
            results["burst_1"] = one
            results[f"burst_{args.burst}"] = many
            print("burst:", json.dumps({k: v for k, v in many.items() if k != "window"}))

            drip = {}
            drip_thread = threading.Thread(
                target=lambda: drip.update(body_drip(server.url, 5, args.body_timeout + 30)), daemon=True
            )
            drip_thread.start()
            loris = slowloris(server.url, args.slowloris, 2.0, args.header_timeout + 30)
            results["slowloris"] = loris
            print("slowloris:", json.dumps({k: v for k, v in loris.items() if k != "window"}))
            results["chunked"] = chunked_uploads(server.url)
            print("chunked:", json.dumps(results["chunked"]))
            results["bad_tokens"] = bad_tokens(server.url, small, 200)
            print("tokens:", json.dumps(results["bad_tokens"]))
            flood_start = time.monotonic()
            results["flood"] = flood(server.url, small, args.flood_clients, 5)
            flood_end = time.monotonic()
            print("flood:", json.dumps(results["flood"]))
            drip_thread.join()
            results["body_drip"] = drip
            print("body drip:", json.dumps(drip))
            prober.stop()
            results["normal_request_latency"] = {
                "quiet": prober.window(*quiet),
                "during_burst": prober.window(*many["window"]),
                "during_slowloris": prober.window(*loris["window"]),
                "during_flood": prober.window(flood_start, flood_end),
            }
            results["server"]["rss_end_mb"] = round(server.rss_mb(), 1)
            results["server"]["final_health"] = httpx.get(f"{server.url}/health").json()
        finally:
            server.stop()
    for key in ("burst_1", f"burst_{args.burst}", "slowloris"):
        results[key].pop("window", None)
    print(json.dumps(results["normal_request_latency"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
