"""Helpers for the fleet tests: tiny signed bundles and HTTP shortcuts."""

from __future__ import annotations

import hashlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.settings import Settings
from shared.bundle.archive import write_bundle
from shared.bundle.keyring import Keyring, sign_manifest
from shared.bundle.manifest import SCHEMA, FileRef, Manifest, Quantization, TensorSpec, Tolerance
from shared.timeutil import format_ts, in_days, utcnow

ADMIN = "admin-" + "x" * 20
ENROLL = "enroll-" + "y" * 20


@dataclass
class BundleFile:
    path: Path
    manifest: Manifest
    envelope: bytes
    blobs: dict[str, Path]


def make_bundle(
    out_dir: Path,
    keyring: Keyring,
    *,
    name: str = "detector",
    release: int = 1,
    version: str = "1.0.0",
    model_bytes: bytes | None = None,
    signing_keys: list[Any] | None = None,
) -> BundleFile:
    """A signed single-file bundle with tiny fake files (the fleet never runs the model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, FileRef] = {}
    blobs: dict[str, Path] = {}
    contents = {
        "model": model_bytes if model_bytes is not None else f"onnx {name} r{release}".encode(),
        "golden": b"npz golden " + name.encode(),
    }
    for role, data in contents.items():
        sha = hashlib.sha256(data).hexdigest()
        path = out_dir / f"{sha}.bin"
        path.write_bytes(data)
        files[role] = FileRef(sha256=sha, size=len(data), media_type="application/octet-stream")
        blobs[sha] = path
    manifest = Manifest(
        schema=SCHEMA,
        name=name,
        release=release,
        version=version,
        created=format_ts(utcnow()),
        expires=in_days(30),
        runtime="onnxruntime",
        quantization=Quantization(mode="none"),
        min_agent_version="0.1.0",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 2])],
        files=files,
        golden_tolerance=Tolerance(atol=1e-4, rtol=1e-3),
    )
    envelope = sign_manifest(manifest, signing_keys or keyring.signing_keys)
    path = out_dir / f"{name}-r{release}-{secrets.token_hex(3)}.bundle"
    write_bundle(path, envelope, blobs)
    return BundleFile(path, manifest, envelope, blobs)


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def enroll(client: TestClient[Any], device_id: str, **labels: str) -> str:
    body = {"device_id": device_id, "token": ENROLL, "labels": labels}
    r = client.post("/api/v1/devices/enroll", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["credential"])


def upload(client: TestClient[Any], path: Path) -> Any:
    return client.post(
        "/api/v1/bundles",
        content=path.read_bytes(),
        headers={**admin(), "Content-Type": "application/octet-stream"},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_fleet(settings: Settings) -> Iterator[str]:
    """The fleet app under uvicorn on a loopback port (real HTTP, for clients in other threads)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
