"""Blob serving over real HTTP (uvicorn on a loopback port): Range and resume, ETag,
Content-Length, no compression, 416 for bad ranges, device access."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fleet_support import ADMIN, ENROLL, make_bundle

from fleet.app import create_app
from fleet.db.engine import session_scope
from fleet.rollout.assignments import set_assignment
from fleet.settings import Settings
from shared.bundle.keyring import Keyring


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about HTTP; the database side is tested on both elsewhere."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def live(settings: Settings) -> Iterator[tuple[str, Any]]:
    """The fleet app under uvicorn in a thread: (base URL, app)."""
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def stored(live: tuple[str, Any], keyring: Keyring, tmp_path: Path) -> tuple[httpx.Client, str, bytes]:
    base, _app = live
    data = bytes(range(256)) * 4099  # ~1 MiB, not a multiple of any chunk size
    bundle = make_bundle(tmp_path, keyring, model_bytes=data)
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    r = http.post("/api/v1/bundles", content=bundle.path.read_bytes())
    assert r.status_code == 201, r.text
    return http, hashlib.sha256(data).hexdigest(), data


def test_whole_blob_has_length_etag_and_no_compression(stored: tuple[httpx.Client, str, bytes]) -> None:
    http, sha, data = stored
    r = http.get(f"/api/v1/blobs/{sha}", headers={"Accept-Encoding": "gzip, br"})
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"{sha}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert "content-encoding" not in r.headers
    assert r.headers["content-type"] == "application/octet-stream"
    again = http.get(f"/api/v1/blobs/{sha}", headers={"If-None-Match": f'"{sha}"'})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=0-99", 0, 99), ("bytes=1000-", 1000, None), ("bytes=-10", -10, None),
     ("bytes=5-99999999", 5, None)],
)
def test_ranges_answer_206(
    stored: tuple[httpx.Client, str, bytes], header: str, first: int, last: int | None
) -> None:
    http, sha, data = stored
    r = http.get(f"/api/v1/blobs/{sha}", headers={"Range": header})
    assert r.status_code == 206
    want = data[first:] if last is None else data[first : last + 1]
    assert r.content == want
    start = first if first >= 0 else len(data) + first
    assert r.headers["content-range"] == f"bytes {start}-{start + len(want) - 1}/{len(data)}"
    assert r.headers["content-length"] == str(len(want))


@pytest.mark.parametrize("header", ["bytes=99999999-", "bytes=10-5", "bytes=-0", "bytes=abc", "pages=0-1"])
def test_bad_ranges_answer_416(stored: tuple[httpx.Client, str, bytes], header: str) -> None:
    http, sha, data = stored
    r = http.get(f"/api/v1/blobs/{sha}", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(data)}"
    assert r.json()["status_code"] == 416 and "Range" in r.json()["detail"]


def test_if_range_with_another_etag_sends_everything(stored: tuple[httpx.Client, str, bytes]) -> None:
    http, sha, data = stored
    r = http.get(f"/api/v1/blobs/{sha}", headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert r.status_code == 200 and r.content == data
    r = http.get(f"/api/v1/blobs/{sha}", headers={"Range": "bytes=10-", "If-Range": f'"{sha}"'})
    assert r.status_code == 206 and r.content == data[10:]


def test_resumed_download_after_a_cut(stored: tuple[httpx.Client, str, bytes]) -> None:
    """A client reads part of the stream, drops the connection, and resumes with Range."""
    http, sha, data = stored
    got = bytearray()
    with http.stream("GET", f"/api/v1/blobs/{sha}") as r:
        for chunk in r.iter_bytes(65536):
            got += chunk
            if len(got) > 300_000:
                break  # the link drops
    r = http.get(f"/api/v1/blobs/{sha}", headers={"Range": f"bytes={len(got)}-", "If-Range": f'"{sha}"'})
    assert r.status_code == 206
    got += r.content
    assert bytes(got) == data and hashlib.sha256(got).hexdigest() == sha


def test_device_reads_only_assigned_blobs(
    live: tuple[str, Any], stored: tuple[httpx.Client, str, bytes]
) -> None:
    base, app = live
    http, sha, data = stored
    anon = httpx.Client(base_url=base, timeout=10)
    enrolled = anon.post("/api/v1/devices/enroll", json={"device_id": "dev-1", "token": ENROLL})
    cred = enrolled.json()["credential"]
    device = {"Authorization": f"Bearer {cred}"}
    r = anon.get(f"/api/v1/blobs/{sha}", headers=device)
    assert r.status_code == 403 and "belongs to no bundle assigned" in r.json()["detail"]
    bundle_id = http.get("/api/v1/bundles").json()[0]["id"]
    with session_scope(app.state.ctx.engine) as session:
        set_assignment(session, "dev-1", "detector", bundle_id, None)
    r = anon.get(f"/api/v1/blobs/{sha}", headers={**device, "Range": "bytes=0-15"})
    assert r.status_code == 206 and r.content == data[:16]
    assert anon.get(f"/api/v1/blobs/{sha}").status_code == 401
