"""agent.client.AgentClient against a real API server (TCP and Unix socket)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.api.server import ApiServer
from agent.client import AgentClient, AgentError, AgentUnavailableError
from agent.runtime.batching import BatchPolicy

from .conftest import Bundles, Rig, free_port
from .test_runtime_batching import onnx_bundle

X = np.random.default_rng(0).random((3, 4), dtype=np.float32)


@pytest.fixture
def server(rig: Rig, tmp_path: Path) -> Iterator[ApiServer]:
    rig.host.policy = BatchPolicy(max_batch_size=4, workers=1)
    s = ApiServer(rig.host, listen=("127.0.0.1", 0), unix_socket=str(tmp_path / "a.sock"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(params=["tcp", "unix"])
def client(request: pytest.FixtureRequest, server: ApiServer) -> Iterator[AgentClient]:
    if request.param == "tcp":
        host, port = server.tcp_address  # type: ignore[misc]
        c = AgentClient(url=f"http://{host}:{port}")
    else:
        c = AgentClient(unix_socket=str(server.unix_path))
    with c:
        yield c


def test_ready_models_predict(client: AgentClient, rig: Rig, bundles: Bundles) -> None:
    assert client.ready() is False
    with pytest.raises(AgentError) as info:
        client.predict("clf", {"x": X})
    assert (info.value.status, info.value.code) == (503, "no_model")
    rig.installer.install_file(bundles.build(1))
    assert client.ready() is True
    (model,) = client.models()
    assert model["name"] == "clf" and model["release"] == 1 and model["max_batch_rows"] == 4
    want = rig.predict(X)["probs"]
    binary = client.predict("clf", {"x": X})
    assert client.last_release == 1
    assert binary["probs"].dtype == np.float32 and np.array_equal(binary["probs"], want)
    as_json = client.predict("clf", {"x": X}, binary=False)
    assert as_json["probs"].dtype == np.float32 and np.allclose(as_json["probs"], want, atol=1e-6)


def test_errors_carry_the_server_code(client: AgentClient, rig: Rig, bundles: Bundles) -> None:
    rig.installer.install_file(bundles.build(1))
    rig.installer.install_file(onnx_bundle(bundles, "pair"))
    with pytest.raises(AgentError) as info:
        client.predict("nope", {"x": X})
    assert (info.value.status, info.value.code) == (404, "unknown_model")
    with pytest.raises(AgentError) as info:
        client.predict("clf", {"x": X.astype(np.float64)})
    assert info.value.code == "input" and "float64" in info.value.detail
    with pytest.raises(AgentError, match="400 input"):
        client.predict("clf", {"y": X}, binary=False)
    out = client.predict("pair", {"a": X, "b": X}, binary=False)
    assert set(out) == {"sum", "diff"} and np.allclose(out["sum"], 2 * X)


def test_unreachable_agent() -> None:
    with AgentClient(url=f"http://127.0.0.1:{free_port()}", timeout=2) as c, \
            pytest.raises(AgentUnavailableError) as info:
        c.ready()
    assert info.value.code == "unavailable" and "cannot reach the agent" in str(info.value)
    with AgentClient(unix_socket="/nonexistent/agent.sock") as c, pytest.raises(AgentUnavailableError):
        c.models()
    with pytest.raises(ValueError):
        AgentClient(url="http://x", unix_socket="/y")
