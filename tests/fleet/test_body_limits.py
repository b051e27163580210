"""JSON bodies at the fleet's HTTP boundary (issue 16): every operation of the OpenAPI
document, over real HTTP, answers a deeply nested or huge JSON body with a 4xx (400 / 413),
never a 500; a body declared binary but nested past the decoder's recursion is a 400 too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.api.body_limits import BINARY_ROUTES, JsonTooDeep, check_json_depth
from fleet.settings import Settings
from shared.bundle.keyring import Keyring

from .fleet_support import ADMIN, ENROLL, make_bundle, serve_fleet

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECTS = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


def nested(depth: int) -> bytes:
    return b'{"labels": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_depth_is_counted_exactly_and_strings_do_not_count() -> None:
    check_json_depth(b"[" * 32 + b"]" * 32, 32)
    with pytest.raises(JsonTooDeep):
        check_json_depth(b"[" * 33 + b"]" * 33, 32)
    check_json_depth(b'{"a": [1, {"b": "[[[[[[[[{{{{{{{{"}], "c": "\\"[[[["}', 3)
    with pytest.raises(JsonTooDeep):
        check_json_depth(b'{"a": [1, {"b": ["x"]}]}', 3)
    check_json_depth(b"[}" * 40, 2)  # malformed: the decoder's 400, not a depth refusal
    check_json_depth(b"", 1)
    check_json_depth(b"{[{[]}]}", 4)  # alternating kinds: one level per pass
    with pytest.raises(JsonTooDeep):
        check_json_depth(b"{[{[]}]}", 3)


def test_a_bundle_upload_is_never_read_as_json(fleet: str, keyring: Keyring, tmp_path: Path) -> None:
    """curl --data-binary declares x-www-form-urlencoded: the upload route is a file route."""
    bundle = make_bundle(tmp_path, keyring, release=2).path
    r = httpx.post(f"{fleet}/api/v1/bundles", content=bundle.read_bytes(), timeout=30, headers={
        "Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 201, r.text


@pytest.fixture
def fleet(settings: Settings) -> Iterator[str]:
    with serve_fleet(settings) as url:
        yield url


def _operations(client: httpx.Client) -> list[tuple[str, str, bool]]:
    """(method, concrete path, takes JSON) of every operation in the OpenAPI document."""
    doc = client.get("/schema/openapi.json").json()
    ops = []
    for path, item in doc["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            content = op.get("requestBody", {}).get("content", {})
            ops.append((method.upper(), concrete, "application/json" in content))
    return ops


def test_every_operation_refuses_deep_and_huge_json(fleet: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=fleet, timeout=30) as client:
        ops = _operations(client)
        json_ops = [op for op in ops if op[2]]
        assert len(json_ops) >= 6, ops  # enroll, labels, rollouts, tokens, ... all found
        failures: list[Any] = []
        json_headers = {**headers, "Content-Type": "application/json"}
        for method, path, _ in ops:
            if (method, path) in BINARY_ROUTES:  # a file whatever its type: the handler's own 400
                r = client.request(method, path, content=DEEP, headers=json_headers)
                if r.status_code != 400:
                    failures.append((method, path, "deep JSON as a bundle", r.status_code, r.text[:200]))
                continue
            if method == "GET":  # no body is read on a GET; it must not break either
                r = client.request(method, path, content=DEEP, headers=json_headers)
                if r.status_code >= 500:
                    failures.append((method, path, "GET with a deep body", r.status_code, r.text[:200]))
                continue
            for what, body, ctype, want in (
                ("deep arrays", DEEP, "application/json", (400,)),
                ("deep objects", DEEP_OBJECTS, "application/json", (400,)),
                ("33 levels", nested(33), "application/json", (400,)),
                ("deep, as text/plain", DEEP, "text/plain", (400,)),
                ("deep, no content type", DEEP, None, (400,)),
                ("2 MiB", b'{"labels": "' + b"x" * (2 << 20) + b'"}', "application/json", (413,)),
                # Declared binary: not read by the middleware; never a 500 (a JSON route: 400).
                ("deep, as octet-stream", DEEP, "application/octet-stream", None),
            ):
                h = dict(headers)
                if ctype:
                    h["Content-Type"] = ctype
                r = client.request(method, path, content=body, headers=h)
                ok = r.status_code in want if want else r.status_code < 500
                if not ok:
                    failures.append((method, path, what, r.status_code, r.text[:200]))
                elif r.status_code in (400, 413) and want:
                    doc = r.json()
                    assert doc["status_code"] == r.status_code and doc["detail"], doc
            # A huge body sent without a Content-Length (chunked): refused once past the bound.
            def chunks() -> Iterator[bytes]:
                yield b'{"labels": "'
                for _ in range(40):
                    yield b"x" * 65536
                yield b'"}'

            r = client.request(method, path, content=chunks(), headers=json_headers)
            if r.status_code != 413:
                failures.append((method, path, "2.5 MiB chunked", r.status_code, r.text[:200]))
        assert not failures, "\n".join(map(str, failures))
        # Within the bounds, JSON still reaches the handlers unchanged.
        r = client.post("/api/v1/devices/enroll", json={"device_id": "dev-1", "token": ENROLL,
                                                        "labels": {"ring": "canary"}})
        assert r.status_code == 201, r.text
        r = client.put("/api/v1/devices/dev-1/labels", content=nested(32), headers=json_headers)
        assert r.status_code == 400 and "json_max_depth" not in r.text  # the handler's own 400
