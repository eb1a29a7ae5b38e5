"""The FastAPI server on a real loopback socket: results equal direct model calls, micro-batching, bad uploads."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
import uvicorn
from test_inference_cli import LABELS, save_tiny_model, write_inputs

from chexficient.inference.engine import InferenceEngine
from chexficient.inference.server import create_app

from modeling_chexficient import CheXficientModel
from processing_chexficient import CheXficientProcessor


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
    model_dir = save_tiny_model(root / "model")
    good, bad = write_inputs(root / "images")
    model = CheXficientModel.from_pretrained(model_dir).eval()
    processor = CheXficientProcessor.from_pretrained(model_dir)
    pixels = torch.from_numpy(np.stack([processor.image_processor.process_one(p) for p in good]))
    with torch.no_grad():
        embeds = model.get_image_features(pixels).numpy()
        probs = model.zero_shot_classify(LABELS, processor.tokenizer, pixel_values=pixels).numpy()
    engine = InferenceEngine.from_pretrained(model_dir)
    return {"engine": engine, "good": good, "bad": bad, "embeds": embeds, "probs": probs}


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


def test_concurrent_requests_are_micro_batched(setup):
    app = create_app(setup["engine"], max_batch_size=8, max_wait_ms=500)
    clients = 8
    barrier = threading.Barrier(clients)
    results: dict[int, httpx.Response] = {}

    def call(i: int, url: str) -> None:
        path = setup["good"][i % len(setup["good"])]
        with httpx.Client(base_url=url, timeout=60) as client:
            barrier.wait()
            if i % 2:
                results[i] = client.post("/classify", files=upload(path), data={"labels": ",".join(LABELS)})
            else:
                results[i] = client.post("/embed", files=upload(path))

    before = setup["engine"].forward_calls
    with running(app) as url:
        threads = [threading.Thread(target=call, args=(i, url)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        batches = list(app.state.batcher.batch_sizes)
    forwards = setup["engine"].forward_calls - before
    assert sorted(results) == list(range(clients))
    for i, reply in results.items():
        assert reply.status_code == 200, reply.text
        row = i % len(setup["good"])
        if i % 2:
            got = [reply.json()["probabilities"][label] for label in LABELS]
            np.testing.assert_allclose(got, setup["probs"][row], atol=1e-5)
        else:
            np.testing.assert_allclose(reply.json()["embedding"], setup["embeds"][row], atol=1e-5)
    assert sum(batches) == clients and forwards == len(batches)
    assert forwards < clients and max(batches) > 1, batches  # one forward served several requests


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
