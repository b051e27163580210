"""A fleet stand-in for chunked downloads: envelopes and blobs over real HTTP, with bounded
``Range: bytes=FIRST-LAST`` (206 + Content-Range, like fleet/api), byte counts per blob and
faults (ignore Range, corrupt or refuse chunks). Also a model with several large initializers
whose late layers a "fine-tune" changes. Used by tests/agent/test_chunks*.py and bench/bench_chunks.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Hit:
    sha: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class ChunkFaults:
    ignore_range: bool = False  # answer a Range request with 200 and the whole body
    corrupt_at: dict[int, int] = field(default_factory=dict)  # byte offset -> times to flip it
    fail_after_bytes: int | None = None  # body bytes served in all; then cut, and 503 to the rest
    on_request: Callable[[str, str | None], None] | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class ChunkFleet:
    def __init__(self) -> None:
        self.envelopes: dict[int, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.faults = ChunkFaults()
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self) -> None:
                parts = self.path.split("/")
                if self.path.startswith("/api/v1/bundles/"):
                    return self._send(200, fleet.envelopes[int(parts[4])])
                if self.path.startswith("/api/v1/blobs/") and parts[4] in fleet.blobs:
                    return self._blob(parts[4])
                return self._send(404, json.dumps({"status_code": 404}).encode())

            def _blob(self, sha: str) -> None:
                f = fleet.faults
                rng = self.headers.get("Range")
                if f.on_request is not None:
                    f.on_request(sha, rng)
                hit = Hit(sha, rng, 200)
                with fleet.lock:
                    fleet.hits.append(hit)
                    budget = None if f.fail_after_bytes is None else f.fail_after_bytes - sum(
                        h.sent for h in fleet.hits)
                if budget is not None and budget <= 0:
                    hit.status = 503
                    return self._send(503, b'{"status_code": 503}')
                data = fleet.blobs[sha]
                headers = {"Content-Type": "application/octet-stream"}
                body = data
                if rng and not f.ignore_range:
                    first_s, _, last_s = rng.removeprefix("bytes=").partition("-")
                    first = int(first_s)
                    last = min(int(last_s), len(data) - 1) if last_s else len(data) - 1
                    if first >= len(data):
                        hit.status = 416
                        return self._send(416, b"{}")
                    body = data[first:last + 1]
                    hit.status = 206
                    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                    with fleet.lock:
                        for at, times in list(f.corrupt_at.items()):
                            if times and first <= at <= last:
                                f.corrupt_at[at] = times - 1
                                k = at - first
                                body = body[:k] + bytes([body[k] ^ 0xFF]) + body[k + 1:]
                if budget is not None and budget < len(body):
                    hit.sent = budget
                    self.send_response(hit.status)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body[:budget])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                hit.sent = len(body)
                self._send(hit.status, body, headers)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> ChunkFleet:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def blob_url(self) -> str:
        return self.url + "/api/v1/blobs/{sha256}"

    def sent(self, sha: str | None = None) -> int:
        with self.lock:
            return sum(h.sent for h in self.hits if sha is None or h.sha == sha)

    def requests(self, sha: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.sha == sha]

    def chunks_fetched(self, sha: str, chunk_size: int, size: int) -> list[int]:
        """Chunk indices whose bytes a 206 or 200 to ``sha`` covered (with repeats)."""
        out = []
        for h in self.requests(sha):
            if h.status == 200:
                out.extend(range(-(-size // chunk_size)))
            elif h.status == 206 and h.range:
                first, _, last = h.range.removeprefix("bytes=").partition("-")
                out.extend(range(int(first) // chunk_size, min(int(last), size - 1) // chunk_size + 1))
        return out

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()


def layer_weights(layers: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32) for _ in range(layers)]


def fine_tune(weights: list[np.ndarray], changed: int, seed: int = 1) -> list[np.ndarray]:
    """The same model with the last ``changed`` layers' values nudged (shapes kept)."""
    rng = np.random.default_rng(seed)
    out = list(weights)
    for i in range(len(weights) - changed, len(weights)):
        out[i] = (weights[i] + 0.01 * rng.standard_normal(weights[i].shape)).astype(np.float32)
    return out


def write_layered_model(path: Path, weights: list[np.ndarray]) -> Path:
    """x[batch, dim] -> (MatMul W_i, Tanh) per layer -> Softmax: one large initializer per layer."""
    from onnx import TensorProto, helper, numpy_helper

    dim = weights[0].shape[0]
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]))
        prev = f"a{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes, "layered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgefleet-tests")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path
