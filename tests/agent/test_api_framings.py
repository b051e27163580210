"""Every framing of the local API over real HTTP (TCP and Unix socket): raw tensors, .npy,
.npz and JSON round trips with int64/uint8/bool/float16/float32 tensors, through the raw
protocol and through AgentClient, and clear 400s for malformed framing."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

from agent.api.codecs import _name_safe, quote_name, tensor_header, tensor_layout
from agent.api.errors import ApiError
from agent.api.server import ApiServer
from agent.client import AgentClient, AgentError
from agent.runtime.batching import BatchPolicy
from fleet.bundles.build import build_bundle

from ..waiting import wait_for
from .conftest import Bundles, Rig

TENSORS = "application/x-edgefleet-tensors"
# name -> (ONNX type, NumPy dtype, trailing shape)
KINDS = {
    "i": (TensorProto.INT64, np.int64, [3]),
    "u": (TensorProto.UINT8, np.uint8, [2, 2]),
    "b": (TensorProto.BOOL, np.bool_, [2]),
    "h": (TensorProto.FLOAT16, np.float16, [4]),
}


def mixed_bundle(bundles: Bundles) -> Path:
    """``mixed``: inputs i (int64), u (uint8), b (bool), h (float16), each [batch, ...];
    outputs i2 = i + i, u1 = u (identity), nb = not b, h2 = h * h."""
    out = bundles.directory / "mixed.bundle"
    if out.exists():
        return out
    nodes = [helper.make_node("Add", ["i", "i"], ["i2"]), helper.make_node("Identity", ["u"], ["u1"]),
             helper.make_node("Not", ["b"], ["nb"]), helper.make_node("Mul", ["h", "h"], ["h2"])]
    ins = [helper.make_tensor_value_info(k, t, ["batch", *s]) for k, (t, _, s) in KINDS.items()]
    outs = [helper.make_tensor_value_info(o, KINDS[k][0], ["batch", *KINDS[k][2]])
            for k, o in zip(KINDS, ("i2", "u1", "nb", "h2"), strict=True)]
    model = helper.make_model(helper.make_graph(nodes, "mixed", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = bundles.directory / "mixed.onnx"
    path.write_bytes(model.SerializeToString())
    build_bundle(path, name="mixed", version="1", release=1, keyring=bundles.keyring, out=out,
                 golden_inputs=inputs(2))
    return out


def inputs(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "i": rng.integers(-2**40, 2**40, (rows, 3), dtype=np.int64),
        "u": rng.integers(0, 256, (rows, 2, 2), dtype=np.uint8),
        "b": rng.random((rows, 2)) > 0.5,
        "h": rng.random((rows, 4)).astype(np.float16),
    }


def expected(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"i2": x["i"] * 2, "u1": x["u"], "nb": ~x["b"], "h2": x["h"] * x["h"]}


@pytest.fixture
def server(rig: Rig, tmp_path: Path, bundles: Bundles) -> Iterator[ApiServer]:
    rig.host.policy = BatchPolicy(max_batch_size=1, workers=1)
    rig.installer.install_file(mixed_bundle(bundles))
    rig.installer.install_file(bundles.build(1))  # clf: x [batch, 4] float32 -> probs
    s = ApiServer(rig.host, listen=("127.0.0.1", 0), unix_socket=str(tmp_path / "a.sock"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(params=["tcp", "unix"])
def http(request: pytest.FixtureRequest, server: ApiServer) -> Iterator[httpx.Client]:
    if request.param == "tcp":
        host, port = server.tcp_address  # type: ignore[misc]
        c = httpx.Client(base_url=f"http://{host}:{port}", timeout=10)
    else:
        c = httpx.Client(transport=httpx.HTTPTransport(uds=str(server.unix_path)), base_url="http://agent",
                         timeout=10)
    with c:
        yield c


@pytest.fixture(params=["tcp", "unix"])
def client(request: pytest.FixtureRequest, server: ApiServer) -> Iterator[AgentClient]:
    if request.param == "tcp":
        host, port = server.tcp_address  # type: ignore[misc]
        c = AgentClient(url=f"http://{host}:{port}", timeout=10)
    else:
        c = AgentClient(unix_socket=str(server.unix_path), timeout=10)
    with c:
        yield c


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, got[k].shape)
        assert np.array_equal(got[k], v), k


def tensors_body(arrays: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    return (b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values()),
            {"Content-Type": TENSORS, "X-Edgefleet-Tensors": tensor_header(arrays)})


def read_tensors(r: httpx.Response) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, dtype, shape, nbytes in tensor_layout(r.headers["X-Edgefleet-Tensors"]):
        out[name] = np.frombuffer(r.content, dtype, nbytes // dtype.itemsize, offset).reshape(shape)
        offset += nbytes
    assert offset == len(r.content)
    return out


@pytest.mark.parametrize("framing", ["tensors", "npz", "json", None])
def test_client_round_trip_of_every_dtype(client: AgentClient, framing: str | None) -> None:
    for rows in (1, 3):
        x = inputs(rows)
        check(client.predict("mixed", x, framing=framing), expected(x))
    assert client.last_release == 1


def test_client_npy_and_float32(client: AgentClient, rig: Rig) -> None:
    x = np.random.default_rng(1).random((2, 4), dtype=np.float32)
    want = rig.predict(x)["probs"]
    for framing in ("npy", "tensors", "npz"):
        got = client.predict("clf", {"x": x}, framing=framing)
        assert got["probs"].dtype == np.float32 and np.array_equal(got["probs"], want), framing
    got["probs"][0, 0] = 1.0  # the outputs are the caller's to change
    with pytest.raises(ValueError, match="framing 'xml'"):
        client.predict("clf", {"x": x}, framing="xml")


def test_client_keeps_one_connection_and_survives_its_close(client: AgentClient, server: ApiServer) -> None:
    x = {"x": np.ones((1, 4), np.float32)}
    client.predict("clf", x)
    open_before = server.connections.open_connections
    for _ in range(5):
        client.predict("clf", x)
    assert server.connections.open_connections == open_before
    for conn in client._idle:  # as the agent's idle timeout would
        conn.sock.shutdown(2)
    assert client.predict("clf", x)["probs"].shape == (1, 3)


def test_raw_tensors_over_http(http: httpx.Client) -> None:
    x = inputs(2)
    body, headers = tensors_body(x)
    r = http.post("/v1/models/mixed/predict", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == TENSORS and r.headers["X-Edgefleet-Release"] == "1"
    check(read_tensors(r), expected(x))
    # Accept picks another framing for the reply, and any framing may ask for raw tensors.
    r = http.post("/v1/models/mixed/predict", content=body,
                  headers={**headers, "Accept": "application/x-npz"})
    with np.load(io.BytesIO(r.content)) as npz:
        check({k: npz[k] for k in npz.files}, expected(x))
    r = http.post("/v1/models/mixed/predict", headers={"Accept": TENSORS},
                  json={"inputs": {k: v.tolist() for k, v in x.items()}})
    check(read_tensors(r), expected(x))


def test_scalar_and_odd_names_in_the_header() -> None:
    arrays = {"x": np.zeros((), np.int64), "in put;=%1": np.zeros((0, 2), np.float32), "é": np.ones(1, bool)}
    header = tensor_header(arrays)
    assert header.startswith("x=int64[]; in%20put%3B%3D%251=float32[0,2]; %C3%A9=bool[1]")
    layout = tensor_layout(header)
    assert [(n, str(d), s, b) for n, d, s, b in layout] == [
        ("x", "int64", (), 8), ("in put;=%1", "float32", (0, 2), 0), ("é", "bool", (1,), 1)]
    assert quote_name("input.1") == "input.1" and quote_name("images:0") == "images:0"
    with pytest.raises(ValueError, match="cannot travel"):
        tensor_header({"s": np.array(["a"])})
    with pytest.raises(ApiError):
        tensor_layout("x=float32[1]; x=float32[1]")


def test_names_are_quoted_as_the_first_spelling_of_the_safe_set_did() -> None:
    # agent.api.codecs spells its safe set as ASCII ranges (cheaper to compile at every start)
    first = re.compile(r"[^\s=;%\x00-\x1f\x7f-\U0010ffff]+")
    differ = [c for c in map(chr, range(0x110000))
              if bool(first.fullmatch(c)) != bool(_name_safe().fullmatch(c))]
    assert differ == []


X4 = np.ones((1, 4), np.float32).tobytes()


@pytest.mark.parametrize(("body", "header", "detail"), [
    (X4, None, "needs a X-Edgefleet-Tensors header"),
    (X4, "x=float32(1,4)", "is not 'name=dtype[d0,d1,...]'"),
    (X4, "x=complex64[1,2]", "has dtype 'complex64'"),
    (X4, "x=float32[1,,4]", "sizes separated by commas"),
    (X4[:-1], "x=float32[1,4]", "declares 16 bytes of tensors, the body holds 15"),
    (X4 + b"\0", "x=float32[1,4]", "declares 16 bytes of tensors, the body holds 17"),
    (X4, "x=float32[1,4]; y=float32[0]; x=int8[0]", "declared twice"),
    (b"\x02", "b=bool[1]", "bytes other than 0 and 1"),
    (X4, "x=float32[" + ",".join(["1"] * 33) + "]", "at most 32"),
])
def test_malformed_tensors_are_400(http: httpx.Client, body: bytes, header: str | None, detail: str) -> None:
    headers = {"Content-Type": TENSORS}
    if header is not None:
        headers["X-Edgefleet-Tensors"] = header
    r = http.post("/v1/models/clf/predict", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "bad_tensors", r.text
    assert detail in r.json()["detail"]
    assert http.get("/healthz").status_code == 200


def test_tensors_that_do_not_fit_the_signature_are_400_input(http: httpx.Client) -> None:
    for arrays, detail in (({"x": np.ones((1, 4), np.float64)}, "dtype float64"),
                           ({"y": np.ones((1, 4), np.float32)}, "missing ['x']"),
                           ({"x": np.ones((1, 3), np.float32)}, "axis 1 has size 3")):
        body, headers = tensors_body(arrays)
        r = http.post("/v1/models/clf/predict", content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"] == "input", r.text
        assert detail in r.json()["detail"]


def test_client_reports_refusals_with_the_server_code(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        client.predict("mixed", {**inputs(1), "i": np.ones((1, 3), np.int32)})
    assert (info.value.status, info.value.code) == (400, "input") and "int32" in info.value.detail
    with pytest.raises(ValueError, match="npy carries one array"):
        client.predict("mixed", inputs(1), framing="npy")
    with pytest.raises(AgentError) as info:
        client.predict("mixed", {"i": inputs(1)["i"]}, framing="npy")
    assert info.value.code == "input" and "send application/x-edgefleet-tensors" in info.value.detail


def test_unknown_media_type_names_the_framings(http: httpx.Client) -> None:
    r = http.post("/v1/models/clf/predict", content=b"x", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415 and TENSORS in r.json()["detail"]


def test_back_to_back_and_closed_while_the_worker_lingers(server: ApiServer) -> None:
    """A worker waits briefly for the connection's next request: back-to-back requests are
    served on it, a head split across packets still completes, and a client that closes
    meanwhile is closed on the agent's side too."""
    body, headers = tensors_body({"x": np.ones((1, 4), np.float32)})
    head = ("POST /v1/models/clf/predict HTTP/1.1\r\nHost: a\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(server.unix_path))
    reader = sock.makefile("rb")
    for i in range(3):
        if i == 1:  # the head in two writes
            sock.sendall(head[:20])
            sock.sendall(head[20:] + body)
        else:
            sock.sendall(head + body)
        assert reader.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        assert len(reader.read(length)) == 12
    reader.close()
    sock.close()
    wait_for(lambda: server.connections.open_connections == 0, 10, "the agent to close the connection")
