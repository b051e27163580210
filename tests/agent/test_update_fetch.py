"""Resumable blob downloads against a real HTTP server that misbehaves on purpose.

``RangeFleet`` is also the fleet stand-in of the power-cut test (tests/agent/test_powercut.py):
it speaks the device side of the fleet API (enroll, desired state, envelopes, blobs) and
serves ``Range: bytes=N-`` with 206 + Content-Range, which the real fleet does not do yet.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import DownloadError
from agent.update.blobs import BlobStore
from agent.update.fetch import DownloadPolicy, Fetcher, RateMeter, Retryable, backoff_delay
from shared.bundle.envelope import Envelope
from shared.bundle.manifest import FileRef, parse_manifest, payload_digest
from shared.errors import HashMismatchError, LengthMismatchError

from .conftest import read_bundle


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class Faults:
    """What the blob endpoint does wrong; ``cut_after`` and ``status`` are queues (one per request)."""

    cut_after: list[int] = field(default_factory=list)  # close the connection after N body bytes
    status: list[int] = field(default_factory=list)  # answer these statuses first
    ignore_range: bool = False  # answer 200 with the full body to a Range request
    bad_content_range: bool = False  # answer 206 with a Content-Range starting at 0
    gzip: bool = False  # Content-Encoding: gzip
    trickle: tuple[int, float] | None = None  # (bytes, seconds) per write
    extra: bytes = b""  # bytes appended past the real blob
    rate_bps: float | None = None  # throttle every blob body
    on_blob: Callable[[str], None] | None = None  # called before a blob body is sent


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (killed agents, cut tests) are expected here


class RangeFleet:
    """Enrollment, desired state, envelopes and Range-capable blobs over real HTTP."""

    def __init__(self) -> None:
        self.token = "enroll-me"
        self.credentials: dict[str, str] = {}
        self.envelopes: dict[int, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.desired: list[dict[str, Any]] = []
        self.faults = Faults()
        self.served: list[Served] = []
        self.lock = threading.Lock()
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, ctype: str = "application/json",
                       headers: dict[str, str] | None = None) -> Served:
                rec = Served(self.path, self.headers.get("Range"), status)
                with fleet.lock:
                    fleet.served.append(rec)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                return rec

            def _json(self, status: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self._reply(status, body)
                self.wfile.write(body)

            def _authed(self) -> bool:
                auth = self.headers.get("Authorization")
                return auth in {f"Bearer {c}" for c in fleet.credentials.values()}

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/v1/devices/enroll" or body.get("token") != fleet.token:
                    return self._json(401, {"status_code": 401, "detail": "bad token"})
                cred = f"cred-{time.monotonic_ns()}"
                fleet.credentials[body["device_id"]] = cred
                self._json(201, {"device_id": body["device_id"], "credential": cred, "mqtt_url": None})

            def do_GET(self) -> None:
                parts = self.path.split("/")
                if not self._authed():
                    return self._json(401, {"status_code": 401, "detail": "credential"})
                if self.path.endswith("/desired"):
                    return self._json(200, {"device_id": parts[4], "generation": 1,
                                            "server_time": time.time(), "models": fleet.desired})
                if self.path.startswith("/api/v1/bundles/"):
                    body = fleet.envelopes[int(parts[4])]
                    self._reply(200, body)
                    self.wfile.write(body)
                    return None
                if self.path.startswith("/api/v1/blobs/") and parts[4] in fleet.blobs:
                    return self._blob(parts[4])
                return self._json(404, {"status_code": 404, "detail": "no such thing"})

            def _blob(self, sha: str) -> None:
                f = fleet.faults
                if f.on_blob is not None:
                    f.on_blob(sha)
                if f.status:
                    return self._json(f.status.pop(0), {"status_code": 503, "detail": "busy"})
                data = fleet.blobs[sha] + f.extra
                start, status, headers = 0, 200, {}
                rng = self.headers.get("Range")
                if rng and not f.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        return self._json(416, {"status_code": 416, "detail": "range"})
                    status = 206
                    first = 0 if f.bad_content_range else start
                    headers["Content-Range"] = f"bytes {first}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                if f.gzip:
                    body = gzip.compress(body)
                    headers["Content-Encoding"] = "gzip"
                rec = self._reply(status, body, "application/octet-stream", headers)
                cut = f.cut_after.pop(0) if f.cut_after else None
                step = f.trickle[0] if f.trickle else 64 * 1024
                try:
                    for i in range(0, len(body), step):
                        chunk = body[i:i + step]
                        if cut is not None and rec.sent + len(chunk) >= cut:
                            self.wfile.write(chunk[: cut - rec.sent])
                            rec.sent = cut
                            self.wfile.flush()
                            self.connection.shutdown(socket.SHUT_RDWR)
                            self.close_connection = True
                            return None
                        self.wfile.write(chunk)
                        rec.sent += len(chunk)
                        if f.trickle:
                            time.sleep(f.trickle[1])
                        elif f.rate_bps:
                            time.sleep(len(chunk) / f.rate_bps)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return None

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def publish(self, bundle_id: int, bundle: Path) -> dict[str, Any]:
        """Serve a bundle file; return its desired-state entry."""
        env, blobs = read_bundle(bundle)
        self.envelopes[bundle_id] = env
        self.blobs.update(blobs)
        e = Envelope.from_json(env)
        digest = payload_digest(e.payload)
        m = parse_manifest(e.payload)
        return {"name": m.name, "release": m.release, "digest": digest, "bundle_id": bundle_id,
                "envelope_url": f"/api/v1/bundles/{bundle_id}/envelope", "blob_url": "/api/v1/blobs/{sha256}"}

    def blob_requests(self, sha: str) -> list[Served]:
        with self.lock:
            return [s for s in self.served if s.path.endswith(sha)]

    def start(self) -> RangeFleet:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def running_fleet() -> Iterator[RangeFleet]:
    """A started RangeFleet that knows device credential "t" (a fixture body for other modules)."""
    f = RangeFleet().start()
    f.credentials["dev-1"] = "t"
    yield f
    f.stop()


@pytest.fixture
def range_fleet() -> Iterator[RangeFleet]:
    yield from running_fleet()


BLOB = bytes(range(256)) * 4096  # 1 MiB
REF = FileRef(sha256=hashlib.sha256(BLOB).hexdigest(), size=len(BLOB), media_type="application/octet-stream")
FAST = DownloadPolicy(attempts=4, backoff_base_s=0.01, backoff_max_s=0.05, stall_window_s=2.0,
                      min_rate_bps=1024.0)


def fetcher(policy: DownloadPolicy = FAST) -> Fetcher:
    return Fetcher(httpx.Client(), lambda: {"Authorization": "Bearer t"}, policy=policy)


@pytest.fixture
def store(tmp_path: Path, range_fleet: RangeFleet) -> BlobStore:
    range_fleet.blobs[REF.sha256] = BLOB
    return BlobStore(tmp_path / "state")


def url(fleet: RangeFleet) -> str:
    return f"{fleet.url}/api/v1/blobs/{REF.sha256}"


def placed(store: BlobStore) -> bool:
    return store.path(REF.sha256).read_bytes() == BLOB and not any(store.staging_dir.iterdir())


def test_cut_mid_body_resumes_with_range(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.cut_after = [300_000, 400_000]  # bytes of each response
    f = fetcher()
    f.fetch_blob(url(range_fleet), REF, store)
    assert placed(store)
    reqs = range_fleet.blob_requests(REF.sha256)
    assert [(r.range, r.status) for r in reqs] == [
        (None, 200), ("bytes=300000-", 206), ("bytes=700000-", 206)]
    assert sum(r.sent for r in reqs) == len(BLOB), "no byte is fetched twice"
    assert len(f.delays) == 2 and all(0 <= d <= FAST.backoff_max_s for d in f.delays)


def test_partial_kept_by_an_earlier_process_is_resumed_with_its_hash_recomputed(
    range_fleet: RangeFleet, store: BlobStore
) -> None:
    store.ensure_dirs()
    store.staging_path(REF.sha256).write_bytes(BLOB[:123_457])
    fetcher().fetch_blob(url(range_fleet), REF, store)
    assert placed(store)
    assert [r.range for r in range_fleet.blob_requests(REF.sha256)] == ["bytes=123457-"]


def test_damaged_partial_is_retried_from_zero(range_fleet: RangeFleet, store: BlobStore) -> None:
    store.ensure_dirs()
    store.staging_path(REF.sha256).write_bytes(b"\0" * 1000)  # e.g. a torn tail after a power cut
    fetcher().fetch_blob(url(range_fleet), REF, store)
    assert placed(store)
    assert [(r.range, r.status) for r in range_fleet.blob_requests(REF.sha256)] == [
        ("bytes=1000-", 206), (None, 200)]


def test_complete_partial_is_placed_without_a_request(range_fleet: RangeFleet, store: BlobStore) -> None:
    store.ensure_dirs()
    store.staging_path(REF.sha256).write_bytes(BLOB)
    fetcher().fetch_blob(url(range_fleet), REF, store)
    assert placed(store) and range_fleet.blob_requests(REF.sha256) == []


def test_server_ignoring_range_restarts_from_zero(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.cut_after = [500_000]
    range_fleet.faults.ignore_range = True
    fetcher().fetch_blob(url(range_fleet), REF, store)
    assert placed(store)
    assert [(r.range, r.status) for r in range_fleet.blob_requests(REF.sha256)] == [
        (None, 200), ("bytes=500000-", 200)]


def test_wrong_content_range_drops_the_partial(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.cut_after = [500_000]
    range_fleet.faults.bad_content_range = True
    fetcher().fetch_blob(url(range_fleet), REF, store)
    assert placed(store)
    assert [(r.range, r.status) for r in range_fleet.blob_requests(REF.sha256)] == [
        (None, 200), ("bytes=500000-", 206), (None, 200)]


def test_trickle_is_cut_by_the_stall_window_and_the_partial_kept(
    range_fleet: RangeFleet, store: BlobStore
) -> None:
    range_fleet.faults.trickle = (64, 0.05)  # ~1.3 KB/s, under a 20 KB/s minimum
    policy = DownloadPolicy(attempts=2, backoff_base_s=0.01, backoff_max_s=0.01, stall_window_s=0.5,
                            min_rate_bps=20_000)
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="stalled") as err:
        fetcher(policy).fetch_blob(url(range_fleet), REF, store)
    assert time.monotonic() - t0 < 5
    assert "after 2 attempts" in str(err.value)
    kept = store.partial_size(REF.sha256)
    assert 0 < kept < len(BLOB)
    assert range_fleet.blob_requests(REF.sha256)[1].range is not None  # the retry resumed
    # The link recovers: the next pass resumes the kept bytes.
    range_fleet.faults.trickle = None
    fetcher().fetch_blob(url(range_fleet), REF, store)
    assert placed(store)
    assert range_fleet.blob_requests(REF.sha256)[-1].range == f"bytes={kept}-"


def test_silent_server_hits_the_read_timeout(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.trickle = (1, 2.0)
    policy = DownloadPolicy(attempts=1, stall_window_s=0.3, min_rate_bps=0)
    with pytest.raises(DownloadError, match="after 1 attempts"):
        fetcher(policy).fetch_blob(url(range_fleet), REF, store)


def test_content_encoding_is_refused_without_retry(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.gzip = True
    with pytest.raises(DownloadError, match="Content-Encoding 'gzip'"):
        fetcher().fetch_blob(url(range_fleet), REF, store)
    assert len(range_fleet.blob_requests(REF.sha256)) == 1
    assert not store.path(REF.sha256).exists()


def test_server_errors_are_retried_with_backoff(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.status = [503, 502]
    f = fetcher()
    f.fetch_blob(url(range_fleet), REF, store)
    assert placed(store) and len(f.delays) == 2


def test_not_found_is_not_retried(range_fleet: RangeFleet, store: BlobStore) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetcher().fetch_blob(f"{range_fleet.url}/api/v1/blobs/{'0' * 64}", REF, store)
    assert len(range_fleet.served) == 1


def test_too_many_bytes_is_a_length_refusal(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.faults.extra = b"more"
    with pytest.raises(LengthMismatchError):
        fetcher().fetch_blob(url(range_fleet), REF, store)
    assert store.partial_size(REF.sha256) == 0 and not store.path(REF.sha256).exists()


def test_wrong_bytes_from_zero_is_a_hash_refusal(range_fleet: RangeFleet, store: BlobStore) -> None:
    range_fleet.blobs[REF.sha256] = BLOB[:-1] + b"\x00"
    with pytest.raises(HashMismatchError):
        fetcher().fetch_blob(url(range_fleet), REF, store)
    assert store.partial_size(REF.sha256) == 0


def test_backoff_is_full_jitter_and_bounded() -> None:
    p = DownloadPolicy(backoff_base_s=1.0, backoff_max_s=30.0)
    assert [backoff_delay(n, p, lambda: 1.0) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(3, p, lambda: 0.0) == 0.0
    assert backoff_delay(10_000, p, lambda: 0.5) == 15.0


def test_rate_meter_judges_whole_windows() -> None:
    now = [0.0]
    meter = RateMeter(DownloadPolicy(stall_window_s=10, min_rate_bps=100), clock=lambda: now[0])
    meter.add(500, "x")  # half a window in: not judged yet
    now[0] = 10.0
    meter.add(500, "x")  # 1000 bytes in 10 s: exactly the minimum
    now[0] = 20.0
    with pytest.raises(Retryable, match=r"stalled: 999 bytes in 10\.0 s"):
        meter.add(999, "x")


def write_padded_classifier(path: Path, *, seed: int, pad_bytes: int) -> Path:
    """The demo classifier with an unused random initializer: a model blob big enough for
    a kill or a full disk to land mid-download (onnxruntime drops the initializer)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from fleet.demo.models import write_classifier

    write_classifier(path, seed=seed)
    model = onnx.load(str(path))
    pad = np.random.default_rng(seed).integers(0, 255, size=pad_bytes, dtype=np.uint8)
    model.graph.initializer.append(numpy_helper.from_array(pad, "unused_padding"))
    path.write_bytes(model.SerializeToString())
    return path
