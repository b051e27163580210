"""The local API over real HTTP: .npy bodies, Accept, several models at once, 504, batching."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.api.server import ApiServer
from agent.runtime.batching import BatchPolicy
from agent.runtime.host import ModelHost
from shared.bundle.keyring import Keyring

from .conftest import Bundles
from .test_runtime_batching import gated, onnx_bundle
from .test_runtime_litert import make_installer, reference, tflite_bundle

X = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], dtype=np.float32)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype == object)
    return buf.getvalue()


class Served:
    def __init__(self, tmp_path: Path, keyring: Keyring, policy: BatchPolicy, timeout_s: float = 30.0):
        self.host = ModelHost(policy)
        self.installer = make_installer(tmp_path / "state", keyring, self.host)
        self.server = ApiServer(self.host, listen=("127.0.0.1", 0), unix_socket=str(tmp_path / "api.sock"),
                                request_timeout_s=timeout_s)
        self.server.start()
        host, port = self.server.tcp_address  # type: ignore[misc]
        self.url = f"http://{host}:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.host.close()


@pytest.fixture
def served(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> Iterator[Served]:
    s = Served(tmp_path, keyring, BatchPolicy(max_batch_size=8, max_queue_delay_s=0.002, workers=2), 5.0)
    s.installer.install_file(bundles.build(1))
    s.installer.install_file(tflite_bundle(bundles))
    yield s
    s.close()


def test_npy_request_and_reply(served: Served) -> None:
    r = served.client.post("/v1/models/tcl/predict", content=npy(X),
                           headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/x-npy" and r.headers["X-Edgefleet-Output"] == "probs"
    got = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert got.dtype == np.float32 and np.allclose(got, reference(X), atol=1e-5)
    # Accept picks the reply's format, whatever the request's.
    r = served.client.post("/v1/models/tcl/predict", content=npy(X),
                           headers={"Content-Type": "application/x-npy", "Accept": "application/json"})
    assert np.allclose(r.json()["outputs"]["probs"], reference(X), atol=1e-5)
    r = served.client.post("/v1/models/clf/predict", json={"inputs": {"x": X.tolist()}},
                           headers={"Accept": "application/x-npz"})
    with np.load(io.BytesIO(r.content), allow_pickle=False) as out:
        assert out["probs"].shape == (2, 3)
    r = served.client.post("/v1/models/clf/predict", json={"inputs": {"x": X.tolist()}},
                           headers={"Accept": "text/html"})
    assert r.status_code == 406 and r.json()["error"] == "not_acceptable"


def test_npy_of_several_inputs_or_outputs(served: Served, bundles: Bundles) -> None:
    served.installer.install_file(onnx_bundle(bundles, "pair"))
    r = served.client.post("/v1/models/pair/predict", content=npy(X),
                           headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 400 and r.json()["error"] == "input" and "['a', 'b']" in r.json()["detail"]
    buf = io.BytesIO()
    np.savez(buf, a=X, b=X)
    r = served.client.post("/v1/models/pair/predict", content=buf.getvalue(),
                           headers={"Content-Type": "application/x-npz", "Accept": "application/x-npy"})
    assert r.status_code == 406 and "2 outputs" in r.json()["detail"]


@pytest.mark.parametrize("body", [b"not npy", npy(X)[:-3], npy(X) + b"junk",
                                  npy(np.array([{"a": 1}], dtype=object))])
def test_bad_npy_is_400(served: Served, body: bytes) -> None:
    r = served.client.post("/v1/models/tcl/predict", content=body,
                           headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 400 and r.json()["error"] == "bad_npy", r.text
    assert served.client.get("/healthz").status_code == 200


def test_onnx_and_tflite_served_at_once(served: Served) -> None:
    models = {m["name"]: m for m in served.client.get("/v1/models").json()["models"]}
    assert models["clf"]["runtime"] == "onnxruntime" and models["tcl"]["runtime"] == "litert"
    assert models["clf"]["max_batch_rows"] == 8 and models["tcl"]["max_batch_rows"] == 8
    errors: list[str] = []

    def hammer(name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=served.url, timeout=10) as c:
            for _ in range(15):
                x = rng.random((int(rng.integers(1, 4)), 4), dtype=np.float32)
                r = c.post(f"/v1/models/{name}/predict", json={"inputs": {"x": x.tolist()}})
                if r.status_code != 200:
                    errors.append(r.text)
                elif name == "tcl" and not np.allclose(r.json()["outputs"]["probs"], reference(x), atol=1e-5):
                    errors.append("tcl: wrong result")

    threads = [threading.Thread(target=hammer, args=(n, i)) for i, n in enumerate(["clf", "tcl"] * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_request_timeout_is_504_json(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> None:
    s = Served(tmp_path, keyring, BatchPolicy(max_batch_size=1, workers=1), timeout_s=0.2)
    try:
        s.installer.install_file(bundles.build(1))
        session = gated(s.host, "clf")
        session.gate.clear()
        first = threading.Thread(target=s.client.post, args=("/v1/models/clf/predict",),
                                 kwargs={"json": {"inputs": {"x": X.tolist()}}})
        first.start()
        assert session.running.wait(5)
        with httpx.Client(base_url=s.url, timeout=10) as c:
            r = c.post("/v1/models/clf/predict", json={"inputs": {"x": X.tolist()}})
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert "request_timeout_s" in r.json()["detail"]
        session.gate.set()
        first.join(5)
        with httpx.Client(base_url=s.url, timeout=10) as c:
            assert c.post("/v1/models/clf/predict", json={"inputs": {"x": X.tolist()}}).status_code == 200
    finally:
        s.close()


def test_hot_swap_under_batching_drops_nothing(served: Served, bundles: Bundles) -> None:
    results: list[object] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=served.url, timeout=10) as c:
            while not stop.is_set():
                r = c.post("/v1/models/clf/predict", content=npy(X),
                           headers={"Content-Type": "application/x-npy"})
                results.append(int(r.headers["X-Edgefleet-Release"]) if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    served.installer.install_file(bundles.build(2, seed=1))
    served.installer.install_file(bundles.build(3, seed=2))
    n = len(results)
    deadline = time.monotonic() + 5
    while len(results) < n + 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert results and set(results) <= {1, 2, 3}, {r for r in results if not isinstance(r, int)}
    assert 3 in results
