"""The local inference API over real HTTP (TCP and Unix socket) with a real model."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.api.server import ApiServer

from .conftest import Bundles, Rig

X = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]


@pytest.fixture
def api(rig: Rig, tmp_path: Path) -> Iterator[tuple[Rig, ApiServer]]:
    server = ApiServer(rig.host, listen=("127.0.0.1", 0), unix_socket=str(tmp_path / "api.sock"),
                       max_body_bytes=4096)
    server.start()
    yield rig, server
    server.stop()


@pytest.fixture
def client(api: tuple[Rig, ApiServer]) -> Iterator[httpx.Client]:
    host, port = api[1].tcp_address  # type: ignore[misc]
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as c:
        yield c


def test_health_and_readiness_follow_the_model(api: tuple[Rig, ApiServer], client: httpx.Client,
                                               bundles: Bundles) -> None:
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"] == "no_model"
    r = client.post("/v1/models/clf/predict", json={"inputs": {"x": X}})
    assert r.status_code == 503 and r.json()["error"] == "no_model"
    api[0].installer.install_file(bundles.build(1))
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()["models"]
    assert models[0]["name"] == "clf" and models[0]["release"] == 1 and models[0]["version"] == "1.1"
    assert models[0]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]


@pytest.fixture
def ready(api: tuple[Rig, ApiServer], bundles: Bundles) -> Rig:
    api[0].installer.install_file(bundles.build(1))
    return api[0]


def test_predict_json_matches_the_runtime(ready: Rig, client: httpx.Client) -> None:
    r = client.post("/v1/models/clf/predict", json={"inputs": {"x": X}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "clf" and body["release"] == 1
    want = ready.predict(np.asarray(X, dtype=np.float32))["probs"]
    assert np.allclose(np.asarray(body["outputs"]["probs"]), want, atol=1e-6)
    assert r.headers["X-Edgefleet-Release"] == "1"


def test_predict_npz(ready: Rig, client: httpx.Client) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.asarray(X, dtype=np.float32))
    r = client.post("/v1/models/clf/predict", content=buf.getvalue(),
                    headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 200 and r.headers["X-Edgefleet-Release"] == "1"
    with np.load(io.BytesIO(r.content), allow_pickle=False) as out:
        assert out["probs"].shape == (2, 3) and out["probs"].dtype == np.float32


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"{nope", "application/json", 400, "bad_json"),
        (b'{"x": 1}', "application/json", 400, "bad_request"),
        (b'{"inputs": {"y": [[1,2,3,4]]}}', "application/json", 400, "input"),
        (b'{"inputs": {"x": [[1,2,3]]}}', "application/json", 400, "input"),
        (b'{"inputs": {"x": [1,2,3,4]}}', "application/json", 400, "input"),
        (b'{"inputs": {"x": [[1,2],[1]]}}', "application/json", 400, "input"),
        (b'{"inputs": {"x": [["a","b","c","d"]]}}', "application/json", 400, "input"),
        (b'{"inputs": {}}', "application/json", 400, "input"),
        (b"not a zip", "application/x-npz", 400, "bad_npz"),
        (b"x", "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_bad_requests_get_clear_4xx(ready: Rig, client: httpx.Client, body: bytes, ctype: str,
                                    status: int, code: str) -> None:
    r = client.post("/v1/models/clf/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_npz_with_wrong_dtype_is_400(ready: Rig, client: httpx.Client) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.asarray(X, dtype=np.float64))
    r = client.post("/v1/models/clf/predict", content=buf.getvalue(),
                    headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 400 and "float64" in r.json()["detail"]


def test_routes_and_lengths(ready: Rig, client: httpx.Client, api: tuple[Rig, ApiServer]) -> None:
    assert client.post("/v1/models/nope/predict", json={"inputs": {}}).json()["error"] == "unknown_model"
    assert client.get("/nope").status_code == 404
    assert client.get("/v1/models/clf/predict").status_code == 405
    r = client.post("/v1/models/clf/predict", content=b"x" * 5000)
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": {"x": [[1,2,3,4]]}}'

    r = client.post("/v1/models/clf/predict", content=chunks())
    assert r.status_code == 411 and r.json()["error"] == "length_required"
    # A raw request without Content-Length.
    host, port = api[1].tcp_address  # type: ignore[misc]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /v1/models/clf/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 411")
    assert client.post("/v1/models/clf/predict", json={"inputs": {"x": X}}).status_code == 200


def test_inference_error_is_500_and_counted(api: tuple[Rig, ApiServer], client: httpx.Client,
                                           bundles: Bundles) -> None:
    rig = api[0]
    rig.installer.install_file(bundles.build(1, variant="faulty"))
    ok = client.post("/v1/models/clf/predict", json={"inputs": {"x": X}})
    assert ok.status_code == 200
    r = client.post("/v1/models/clf/predict", json={"inputs": {"x": [[2.5, 0, 0, 0]]}})
    assert r.status_code == 500 and r.json()["error"] == "inference"
    snap = rig.host.get("clf").metrics.snapshot()  # type: ignore[union-attr]
    assert (snap.inferences, snap.errors) == (2, 1)
    assert snap.latency_p50_ms is not None


def test_unix_socket(ready: Rig, api: tuple[Rig, ApiServer]) -> None:
    transport = httpx.HTTPTransport(uds=str(api[1].unix_path))
    with httpx.Client(transport=transport, base_url="http://agent", timeout=10) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/models/clf/predict", json={"inputs": {"x": X}})
        assert r.status_code == 200 and r.json()["release"] == 1
        assert c.post("/v1/models/clf/predict", content=b"{").status_code == 400


def test_hot_swap_under_load_drops_nothing(ready: Rig, client: httpx.Client, bundles: Bundles) -> None:
    import threading

    results: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        host = str(client.base_url)
        with httpx.Client(base_url=host, timeout=10) as c:
            while not stop.is_set():
                r = c.post("/v1/models/clf/predict", json={"inputs": {"x": X}})
                results.append(r.status_code if r.status_code != 200 else r.json()["release"])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    ready.installer.install_file(bundles.build(2, seed=1))
    ready.installer.install_file(bundles.build(3, seed=2))
    n = len(results)
    deadline = time.monotonic() + 5
    while len(results) < n + 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert results and set(results) <= {1, 2, 3}, set(results)
    assert 3 in results
    assert client.post("/v1/models/clf/predict", json={"inputs": {"x": X}}).json()["release"] == 3
