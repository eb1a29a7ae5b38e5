"""The FastAPI server on a real loopback socket: results equal direct model calls, micro-batching, bad uploads."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
import uvicorn
from helpers import save_tiny_model
from test_image_hostile import crafted_png, png_chunk
from test_inference_cli import LABELS, write_inputs

from chexficient.inference.engine import InferenceEngine
from chexficient.inference.server import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    create_app,
    server_config,
)

from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` as `chexficient serve` does (uvicorn with the server's connection limits) in a thread on a free
    loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("server")
    model_dir = root / "model"
    torch.manual_seed(0)
    save_tiny_model(model_dir)
    good, bad = write_inputs(root / "images")
    model = CheXficientModel.from_pretrained(model_dir).eval()
    processor = CheXficientProcessor.from_pretrained(model_dir)
    pixels = torch.from_numpy(np.stack([processor.image_processor.process_one(p) for p in good]))
    with torch.no_grad():
        embeds = model.get_image_features(pixels).numpy()
        probs = model.zero_shot_classify(LABELS, processor.tokenizer, pixel_values=pixels).numpy()
    engine = InferenceEngine.from_pretrained(model_dir)
    return {"engine": engine, "good": good, "bad": bad, "embeds": embeds, "probs": probs, "model_dir": model_dir}


def upload(path: Path) -> dict:
    return {"file": (path.name, path.read_bytes(), "application/octet-stream")}


def test_embed_and_classify_match_direct_calls(setup):
    app = create_app(setup["engine"], max_batch_size=4, max_wait_ms=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["projection_dim"] == 16 and health["zero_shot"]
        for i, path in enumerate(setup["good"]):  # 8-bit PNGs, a 16-bit PNG and a DICOM
            reply = client.post("/embed", files=upload(path))
            assert reply.status_code == 200, reply.text
            assert reply.json()["filename"] == path.name and reply.json()["dim"] == 16
            np.testing.assert_allclose(reply.json()["embedding"], setup["embeds"][i], atol=1e-5)
        form = client.post("/classify", files=upload(setup["good"][0]), data={"labels": ",".join(LABELS)})
        query = client.post("/classify", files=upload(setup["good"][1]), params={"labels": ",".join(LABELS)})
        for reply, row in ((form, setup["probs"][0]), (query, setup["probs"][1])):
            assert reply.status_code == 200, reply.text
            probabilities = reply.json()["probabilities"]
            assert list(probabilities) == LABELS
            np.testing.assert_allclose([probabilities[label] for label in LABELS], row, atol=1e-5)


def test_concurrent_requests_are_micro_batched_and_grouped_by_label_set(setup):
    """Eight clients at once, three kinds of request (embed, classify with LABELS, classify with another label
    set): the batch closes when it is full (the wait is far longer than the clients need), so it is one forward,
    and each classify request gets its own label set's probabilities."""
    other = ["Cardiomegaly", "Pleural Effusion"]
    model = CheXficientModel.from_pretrained(setup["model_dir"]).eval()
    tokenizer = CheXficientProcessor.from_pretrained(setup["model_dir"]).tokenizer
    with torch.no_grad():
        other_probs = model.zero_shot_classify(other, tokenizer, image_embeds=torch.from_numpy(setup["embeds"]))
    clients = 8
    app = create_app(setup["engine"], max_batch_size=clients, max_wait_ms=60_000)
    barrier = threading.Barrier(clients)
    results: dict[int, httpx.Response] = {}

    def call(i: int, url: str) -> None:
        path = setup["good"][i % len(setup["good"])]
        with httpx.Client(base_url=url, timeout=120) as client:
            barrier.wait()
            if i % 3 == 0:
                results[i] = client.post("/embed", files=upload(path))
            else:
                labels = LABELS if i % 3 == 1 else other
                results[i] = client.post("/classify", files=upload(path), data={"labels": ",".join(labels)})

    before = setup["engine"].forward_calls
    with running(app) as url:
        threads = [threading.Thread(target=call, args=(i, url)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        batches = list(app.state.batcher.batch_sizes)
    assert sorted(results) == list(range(clients))
    for i, reply in results.items():
        assert reply.status_code == 200, reply.text
        row = i % len(setup["good"])
        if i % 3 == 0:
            np.testing.assert_allclose(reply.json()["embedding"], setup["embeds"][row], atol=1e-5)
            continue
        labels, expected = (LABELS, setup["probs"][row]) if i % 3 == 1 else (other, other_probs[row].numpy())
        assert list(reply.json()["probabilities"]) == labels
        np.testing.assert_allclose([reply.json()["probabilities"][k] for k in labels], expected, atol=1e-5)
    assert batches == [clients] and setup["engine"].forward_calls - before == 1  # one forward served all eight


def test_label_limits_answer_422(setup):
    app = create_app(setup["engine"], max_batch_size=2, max_wait_ms=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        many = ",".join(f"finding {i}" for i in range(MAX_LABELS + 1))
        reply = client.post("/classify", files=upload(setup["good"][0]), data={"labels": many})
        assert reply.status_code == 422 and f"at most {MAX_LABELS} findings" in reply.json()["detail"]
        long = "x" * (MAX_LABEL_CHARS + 1)
        reply = client.post("/classify", files=upload(setup["good"][0]), data={"labels": f"Edema,{long}"})
        assert reply.status_code == 422 and f"at most {MAX_LABEL_CHARS} characters" in reply.json()["detail"]
        at_limit = ",".join(f"f{i}" for i in range(MAX_LABELS))
        assert client.post("/classify", files=upload(setup["good"][0]), data={"labels": at_limit}).status_code == 200


def test_bad_uploads_get_clear_4xx_and_the_server_stays_up(setup):
    app = create_app(setup["engine"], max_upload_mb=0.05, max_batch_size=2, max_wait_ms=1)
    empty, text, truncated = setup["bad"]
    big = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 0.05 * 2**20 + 64 * 1024
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        reply = client.post("/embed", files={"file": ("big.png", big.getvalue(), "image/png")})
        assert reply.status_code == 413 and "too large" in reply.json()["detail"]
        boundary = "chexficient-test"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + big.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        chunks = (body[i : i + 16384] for i in range(0, len(body), 16384))  # no Content-Length: chunked upload
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        reply = client.post("/embed", content=chunks, headers=headers)
        assert reply.status_code == 413 and "too large" in reply.json()["detail"]
        reply = client.post("/embed", files=upload(text))
        assert reply.status_code == 415 and "report.png" in reply.json()["detail"]
        reply = client.post("/embed", files=upload(empty))
        assert reply.status_code == 400 and "empty" in reply.json()["detail"]
        reply = client.post("/embed", files=upload(truncated))
        assert reply.status_code == 400 and "truncated.png" in reply.json()["detail"]
        assert client.post("/embed").status_code == 422  # no file at all
        reply = client.post("/classify", files=upload(setup["good"][0]), data={"labels": " , "})
        assert reply.status_code == 422 and "labels" in reply.json()["detail"]
        assert client.post("/classify", files=upload(setup["good"][0])).status_code == 422  # no labels
        assert client.get("/health").status_code == 200
        reply = client.post("/embed", files=upload(setup["good"][0]))
        assert reply.status_code == 200
        np.testing.assert_allclose(reply.json()["embedding"], setup["embeds"][0], atol=1e-5)


def _streamed_png(width: int, height: int) -> bytes:
    """A real, complete 8-bit PNG of zeros (every row present), compressed row by row: small to send, huge to decode."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def _memory_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def test_bombs_and_truncated_images_get_4xx_with_bounded_memory_on_a_live_server(setup, tmp_path):
    """`chexficient serve` in its own process: decompression bombs and over-budget headers are refused from the
    header (413), a truncated image is an error (400), the keep-alive connection stays usable, and the server's peak
    RSS grows by a bounded amount (it grew by ~2.8 GB for one of these before the pixel budget)."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "chexficient.cli", "serve", "--model", str(setup["model_dir"]), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-3000:]
                time.sleep(0.2)
            assert client.post("/embed", files=upload(setup["good"][0])).status_code == 200  # warm
            baseline = _memory_kb(server.pid)
            hostile = {
                "header_100000x100000.png": (crafted_png(100_000, 100_000), 413, "100000x100000"),
                "real_20000x20000.png": (_streamed_png(20_000, 20_000), 413, "20000x20000"),
                "one_row_16bit_13000.png": (crafted_png(13_000, 13_000, bit_depth=16, rows_of_data=1), 413, "13000"),
                "one_row_9000.png": (crafted_png(9_000, 9_000, rows_of_data=1), 413, "9000x9000"),
                "one_row_16bit_4000.png": (crafted_png(4_000, 4_000, bit_depth=16, rows_of_data=1), 400, "4000"),
            }
            for name, (data, status, size) in hostile.items():
                assert len(data) < 2**20, name  # small uploads: the upload limit is not what refuses them
                reply = client.post("/classify", files={"file": (name, data, "image/png")}, data={"labels": "Edema"})
                assert reply.status_code == status, (name, reply.text)
                assert name in reply.json()["detail"] and size in reply.json()["detail"], reply.text
            peak = _memory_kb(server.pid)["VmHWM"]
            assert client.get("/health").status_code == 200  # the same keep-alive connection still works
            reply = client.post("/embed", files=upload(setup["good"][0]))
            assert reply.status_code == 200
            np.testing.assert_allclose(reply.json()["embedding"], setup["embeds"][0], atol=1e-5)
        grown_mb = (peak - baseline["VmRSS"]) / 1024
        print(f"server RSS {baseline['VmRSS'] / 1024:.0f} MB, peak after hostile uploads {peak / 1024:.0f} MB")
        assert grown_mb < 400, f"peak RSS grew by {grown_mb:.0f} MB"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- /search and /embed_text ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(setup, tmp_path_factory) -> Path:
    """The good images embedded by the server's engine into a store, and its (exact) index."""
    from chexficient.inference.embed import run_embed
    from chexficient.inference.index import build_index
    from chexficient.inference.index_plan import IndexOptions

    root = tmp_path_factory.mktemp("server_index")
    run_embed(setup["good"], root / "emb", setup["engine"], batch_size=4, num_workers=0, progress=False)
    build_index(root / "emb", root / "index", IndexOptions(threads=1, progress=False))
    return root / "index"


def direct_text_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    model = CheXficientModel.from_pretrained(model_dir).eval()
    tokens = CheXficientProcessor.from_pretrained(model_dir).tokenizer(
        texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        return model.get_text_features(**tokens).numpy()


def test_search_and_embed_text_on_a_live_server(setup, indexed):
    app = create_app(setup["engine"], index=indexed, max_batch_size=4, max_wait_ms=1)
    texts = ["small left pleural effusion", "no acute process"]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["index"]["kind"] == "flat" and health["index"]["rows"] == len(setup["good"])
        assert health["index"]["load_mode"] == "mmap"
        before = list(app.state.batcher.batch_sizes)
        for path in setup["good"]:  # 8-bit PNGs, a 16-bit PNG, a DICOM: each finds itself first
            reply = client.post("/search", files=upload(path), params={"k": "3"})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["query"] == {"kind": "image", "filename": path.name} and body["k"] == 3
            assert body["results"][0]["path"] == str(path) and len(body["results"]) == 3
            assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(app.state.batcher.batch_sizes) > len(before)  # image queries go through the micro-batcher

        expected = direct_text_embeddings(setup["model_dir"], texts)
        truth = np.argsort(-(expected[0] @ setup["embeds"].T))
        form = client.post("/search", data={"text": texts[0], "k": "4"})
        as_json = client.post("/search", json={"text": texts[0], "k": 4})
        for reply in (form, as_json):
            assert reply.status_code == 200, reply.text
            results = reply.json()["results"]
            assert [r["path"] for r in results] == [str(setup["good"][i]) for i in truth[:4]]
            np.testing.assert_allclose(
                [r["score"] for r in results], (expected[0] @ setup["embeds"].T)[truth[:4]], atol=1e-5
            )
        reply = client.post("/embed_text", json={"texts": texts})
        assert reply.status_code == 200 and reply.json()["dim"] == 16
        np.testing.assert_allclose(reply.json()["embeddings"], expected, atol=1e-5)


def test_hostile_search_and_embed_text_requests_get_4xx_and_the_server_stays_up(setup, indexed):
    app = create_app(setup["engine"], index=indexed, max_upload_mb=0.05, max_batch_size=2, max_wait_ms=1)
    empty, text, truncated = setup["bad"]
    big = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)).save(big, "PNG")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        reply = client.post("/search", files={"file": ("big.png", big.getvalue(), "image/png")})
        assert reply.status_code == 413 and "too large" in reply.json()["detail"]
        reply = client.post("/search", files=upload(text))  # a text file named .png
        assert reply.status_code == 415 and "report.png" in reply.json()["detail"]
        reply = client.post("/search", files=upload(truncated))
        assert reply.status_code == 400 and "truncated.png" in reply.json()["detail"]
        reply = client.post("/search", files=upload(empty))
        assert reply.status_code == 400 and "empty" in reply.json()["detail"]
        for k in ("0", "-3", "1001", "100000000000000000000", "ten", "2.5"):
            reply = client.post("/search", data={"text": "effusion", "k": k})
            assert reply.status_code == 422 and "k must be an integer from 1 to 1000" in reply.json()["detail"], k
        assert client.post("/search", json={"text": "effusion", "k": True}).status_code == 422
        assert client.post("/search", files=upload(setup["good"][0]), params={"k": "0"}).status_code == 422
        for blank in ("", "   "):
            reply = client.post("/search", data={"text": blank})
            assert reply.status_code == 400 and "empty text" in reply.json()["detail"]
        assert client.post("/search", json={"text": 42}).status_code == 400
        reply = client.post("/search", json={"text": "x" * (MAX_TEXT_CHARS + 1)})
        assert reply.status_code == 413 and f"at most {MAX_TEXT_CHARS} characters" in reply.json()["detail"]
        reply = client.post("/search", files=upload(setup["good"][0]), data={"text": "effusion"})
        assert reply.status_code == 422 and "not both" in reply.json()["detail"]
        assert client.post("/search").status_code == 422  # neither an image nor a text
        assert client.post("/search", data={"k": "5"}).status_code == 422
        reply = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "JSON" in reply.json()["detail"]

        reply = client.post("/embed_text", json={"texts": ["effusion"] * (MAX_TEXTS + 1)})
        assert reply.status_code == 413 and f"at most {MAX_TEXTS}" in reply.json()["detail"]
        for bad in ({"texts": []}, {"texts": "effusion"}, {"texts": ["ok", ""]}, {"texts": ["ok", 3]}, {}, []):
            reply = client.post("/embed_text", json=bad)
            assert reply.status_code == 400, (bad, reply.text)
        reply = client.post("/embed_text", json={"texts": ["x" * (MAX_TEXT_CHARS + 1)]})
        assert reply.status_code == 413 and "texts[0]" in reply.json()["detail"]
        huge = {"texts": ["effusion " * 1000] * 10}  # ~90 KB of JSON: over the 0.05 MB upload limit
        assert client.post("/embed_text", json=huge).status_code == 413

        assert client.get("/health").status_code == 200
        reply = client.post("/search", files=upload(setup["good"][1]), data={"k": "2"})
        assert reply.status_code == 200 and reply.json()["results"][0]["path"] == str(setup["good"][1])
        assert client.post("/search", json={"text": "no acute process", "k": 2}).status_code == 200
        assert client.post("/embed_text", json={"texts": ["effusion"] * MAX_TEXTS}).status_code == 200


def test_search_without_an_index_is_a_clear_404_and_a_narrow_model_is_refused(setup, indexed, tmp_path):
    app = create_app(setup["engine"], max_batch_size=2, max_wait_ms=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["index"] is None
        reply = client.post("/search", data={"text": "effusion"})
        assert reply.status_code == 404 and "--index" in reply.json()["detail"]
        assert client.post("/embed_text", json={"texts": ["effusion"]}).status_code == 200  # needs no index
    save_tiny_model(tmp_path / "narrow", projection_dim=8)
    with pytest.raises(ValueError, match="8 dimensions"):
        create_app(tmp_path / "narrow", index=indexed)
