"""Run the real ``edgefleet`` command in subprocesses, plus a stub fleet API to talk to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def assert_clean_error(self, fragment: str, code: int = 1) -> None:
        """One ``edgefleet: error:`` line on stderr, no traceback, the given exit code."""
        assert self.code == code, (self.code, self.out, self.err)
        assert "Traceback" not in self.err and "Traceback" not in self.out, self.err
        lines = [line for line in self.err.splitlines() if line.startswith("edgefleet: error:")]
        assert len(lines) == 1, self.err
        assert fragment in lines[0], lines[0]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> Result:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["COLUMNS"] = "200"
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli.main", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli() -> Callable[..., Result]:
    return run_cli


def write_model(path: Path) -> None:
    """A tiny ONNX classifier: x float32 [batch, 4] -> probs float32 [batch, 3]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "cli_test_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


@dataclass
class Built:
    keys: Path
    model: Path
    bundle: Path
    build: Result


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Keys from ``edgefleet keys init`` and a bundle from ``edgefleet bundle build``."""
    root = tmp_path_factory.mktemp("cli")
    keys = root / "keys"
    result = run_cli("keys", "init", str(keys))
    assert result.code == 0, result.err
    model = root / "model.onnx"
    write_model(model)
    bundle = root / "detector.bundle"
    build = run_cli("bundle", "build", str(model), "--name", "detector", "--version", "1.0.0",
                    "--release", "7", "--keys", str(keys), "-o", str(bundle))
    assert build.code == 0, build.err
    return Built(keys, model, bundle, build)


# -- a stub of the fleet API, enough to drive the operator commands ----------------------


@dataclass
class StubFleet:
    url: str
    routes: dict[tuple[str, str], Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def route(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        """Answer ``method path`` with each of ``answers`` in turn, repeating the last."""
        self.routes[(method, path)] = list(answers)


@pytest.fixture
def stub_fleet() -> Iterator[StubFleet]:
    stub = StubFleet(url="")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            stub.requests.append({"method": self.command, "path": self.path,
                                  "headers": dict(self.headers), "body": body})
            answers = stub.routes.get((self.command, self.path)) or stub.routes.get(
                (self.command, self.path.split("?", 1)[0]))
            if not answers:
                status, payload = 404, {"status_code": 404, "detail": f"no route {self.path}"}
            else:
                status, payload = answers.pop(0) if len(answers) > 1 else answers[0]
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


def _flip_model_byte(src: Path, dest: Path, built: Built) -> None:
    """Copy a bundle with one byte of its model blob inverted (the tar stays well formed)."""
    from shared.bundle.archive import read_envelope
    from shared.bundle.trust import TrustRoot

    root = TrustRoot.load((built.keys / "root.json").read_bytes())
    model_sha = root.verify_manifest(read_envelope(src)).manifest.files["model"].sha256
    data = bytearray(src.read_bytes())
    with tarfile.open(src) as tar:
        member = tar.getmember(f"blobs/sha256/{model_sha}")
    data[member.offset_data + member.size // 2] ^= 0xFF
    dest.write_bytes(bytes(data))


@pytest.fixture
def flip_model_byte() -> Callable[[Path, Path, Built], None]:
    return _flip_model_byte
