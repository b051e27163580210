"""FleetClient: requests it sends and how every failure becomes a named, one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from fleet.cli.client import (
    FleetClient,
    FleetError,
    FleetHTTPError,
    FleetUnreachableError,
    default_token,
)


def _client(handler) -> FleetClient:  # type: ignore[no-untyped-def]
    return FleetClient("http://fleet.test", "tok", transport=httpx.MockTransport(handler))


def test_sends_bearer_token_and_decodes_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[{"id": "edge-01"}])

    with _client(handler) as client:
        assert client.list_devices() == [{"id": "edge-01"}]
    assert seen[0].headers["Authorization"] == "Bearer tok"
    assert seen[0].url.path == "/api/v1/devices"


def test_lists_accept_wrapped_shapes() -> None:
    with _client(lambda r: httpx.Response(200, json={"items": [{"id": 1}]})) as client:
        assert client.list_bundles() == [{"id": 1}]
    with _client(lambda r: httpx.Response(200, json={"rollouts": [{"id": 2}]})) as client:
        assert client.list_rollouts() == [{"id": 2}]
    with _client(lambda r: httpx.Response(200, json={"what": 1})) as client, \
            pytest.raises(FleetError, match="unexpected list format"):
        client.list_rollouts()


def test_http_error_shows_the_servers_detail() -> None:
    body = {"status_code": 409, "detail": "release 7 of detector exists with another digest"}
    with _client(lambda r: httpx.Response(409, json=body)) as client, \
            pytest.raises(FleetHTTPError) as info:
        client.create_rollout({"name": "x"})
    err = info.value
    assert err.status_code == 409
    assert err.detail == "release 7 of detector exists with another digest"
    assert str(err) == ("POST /api/v1/rollouts failed with HTTP 409: "
                        "release 7 of detector exists with another digest")


def test_http_401_hints_at_the_token() -> None:
    with _client(lambda r: httpx.Response(401, json={"detail": "missing token"})) as client, \
            pytest.raises(FleetHTTPError, match=r"HTTP 401: missing token; pass --token or set EDGEFLEET"):
        client.list_devices()


def test_http_error_without_json_body() -> None:
    with _client(lambda r: httpx.Response(502, text="Bad Gateway from proxy")) as client, \
            pytest.raises(FleetHTTPError, match="HTTP 502: Bad Gateway from proxy"):
        client.get_rollout(3)


def test_non_json_success_is_an_error() -> None:
    with _client(lambda r: httpx.Response(200, text="<html>")) as client, \
            pytest.raises(FleetError, match="the fleet answered non-JSON"):
        client.get_rollout(3)


def test_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    with _client(handler) as client, pytest.raises(
        FleetUnreachableError, match=r"cannot reach the fleet at http://fleet\.test: is `edgefleet serve`"
    ):
        client.health()


def test_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with _client(handler) as client, pytest.raises(FleetUnreachableError, match="did not answer GET"):
        client.list_bundles()


def test_real_refused_connection() -> None:
    with FleetClient("http://127.0.0.1:9", timeout=5) as client, \
            pytest.raises(FleetUnreachableError, match=r"cannot reach the fleet at http://127\.0\.0\.1:9"):
        client.list_devices()


def test_upload_streams_with_content_length(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # a little over 2 MiB: three chunks
    path = tmp_path / "b.bundle"
    path.write_bytes(data)
    got: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        got["body"] = request.read()
        got["headers"] = request.headers
        return httpx.Response(201, json={"id": 4, "name": "detector", "release": 7})

    progress: list[int] = []
    with _client(handler) as client:
        info = client.upload_bundle(path, progress=progress.append)
    assert info == {"id": 4, "name": "detector", "release": 7}
    assert got["body"] == data
    headers = got["headers"]
    assert isinstance(headers, httpx.Headers)
    assert headers["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in headers
    assert headers["Content-Type"] == "application/octet-stream"
    assert sum(progress) == len(data) and len(progress) == 3


@pytest.mark.parametrize("action", ["start", "pause", "resume", "abort", "rollback"])
def test_rollout_actions(action: str) -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(f"{request.method} {request.url.path}")
        return httpx.Response(200, json={"id": 3, "state": "running"})

    with _client(handler) as client:
        assert client.rollout_action(3, action)["state"] == "running"
    assert paths == [f"POST /api/v1/rollouts/3/{action}"]


def test_unknown_rollout_action() -> None:
    with _client(lambda r: httpx.Response(200, json={})) as client, \
            pytest.raises(ValueError, match="unknown rollout action 'explode'"):
        client.rollout_action(3, "explode")


def test_create_rollout_posts_json() -> None:
    bodies: list[object] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.read()))
        return httpx.Response(201, json={"id": 1})

    with _client(handler) as client:
        client.create_rollout({"name": "r", "bundle_id": 3})
    assert bodies == [{"name": "r", "bundle_id": 3}]


def test_default_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_TOKEN", raising=False)
    monkeypatch.delenv("EDGEFLEET_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_token() is None
    (tmp_path / "fleet-data").mkdir()
    (tmp_path / "fleet-data" / "admin.token").write_text("from-file\n")
    assert default_token() == "from-file"
    monkeypatch.setenv("EDGEFLEET_TOKEN", "from-env")
    assert default_token() == "from-env"
