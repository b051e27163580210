"""Operator tokens and scopes, device access to envelopes and blobs, rate limits: over
real HTTP (Litestar TestClient), on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_support import ENROLL, admin, bearer, enroll, make_bundle, upload
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.db.engine import session_scope
from fleet.rollout.assignments import set_assignment
from fleet.settings import Settings
from shared.bundle.keyring import Keyring

Client = TestClient[Any]


def make_token(client: Client, *scopes: str, name: str = "t") -> str:
    r = client.post("/api/v1/tokens", json={"scopes": list(scopes), "name": name}, headers=admin())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["scopes"] == [s for s in ("read", "deploy", "admin") if s in scopes]
    return str(body["token"])


def spec(bundle_id: int) -> dict[str, Any]:
    return {"name": "r", "bundle_id": bundle_id, "stages": [{"name": "all", "percent": 100}]}


def test_scopes_guard_each_kind_of_endpoint(client: Client, keyring: Keyring, tmp_path: Path) -> None:
    reader, deployer, admin_token = (
        make_token(client, "read"), make_token(client, "deploy"), make_token(client, "admin")
    )
    both = make_token(client, "read", "deploy")
    bundle = make_bundle(tmp_path, keyring, release=2)

    # read: look, never change
    assert client.get("/api/v1/bundles", headers=bearer(reader)).status_code == 200
    assert client.get("/api/v1/devices", headers=bearer(reader)).status_code == 200
    r = client.post("/api/v1/bundles", content=bundle.path.read_bytes(), headers=bearer(reader))
    assert r.status_code == 403
    detail = r.json()["detail"]
    assert "needs 'deploy'" in detail and "edgefleet token create --scope deploy" in detail

    # deploy: upload and operate rollouts, but not read lists nor manage tokens
    r = client.post("/api/v1/bundles", content=bundle.path.read_bytes(), headers=bearer(deployer))
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    assert client.get("/api/v1/bundles", headers=bearer(deployer)).status_code == 403
    assert client.post("/api/v1/rollouts", json=spec(bid), headers=bearer(reader)).status_code == 403
    created = client.post("/api/v1/rollouts", json=spec(bid), headers=bearer(both))
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/abort", headers=bearer(deployer)).status_code == 200
    assert client.get(f"/api/v1/rollouts/{rid}", headers=bearer(reader)).json()["state"] == "aborted"
    r = client.post("/api/v1/tokens", json={"scopes": ["read"]}, headers=bearer(both))
    assert r.status_code == 403 and "needs 'admin'" in r.json()["detail"]

    # admin implies every scope
    assert client.get("/api/v1/bundles", headers=bearer(admin_token)).status_code == 200
    assert client.get("/api/v1/tokens", headers=bearer(admin_token)).status_code == 200


def test_token_lifecycle_list_and_revoke(client: Client) -> None:
    token = make_token(client, "read", name="grafana")
    listed = client.get("/api/v1/tokens", headers=admin()).json()
    assert [(t["name"], t["scopes"], t["revoked_at"]) for t in listed] == [("grafana", ["read"], None)]
    assert all("token" not in t for t in listed), "secrets are shown once, at creation"
    assert client.get("/api/v1/devices", headers=bearer(token)).status_code == 200
    tid = listed[0]["id"]
    r = client.delete(f"/api/v1/tokens/{tid}", headers=admin())
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = client.get("/api/v1/devices", headers=bearer(token))
    assert r.status_code == 401
    assert "revoked" in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
    assert client.delete("/api/v1/tokens/999", headers=admin()).status_code == 404
    bad = client.post("/api/v1/tokens", json={"scopes": ["root"]}, headers=admin())
    assert bad.status_code == 400 and "unknown scope 'root'" in bad.json()["detail"]
    assert client.post("/api/v1/tokens", json={"scopes": []}, headers=admin()).status_code == 400


def test_denials_say_what_to_do(client: Client) -> None:
    r = client.get("/api/v1/devices")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    r = client.get("/api/v1/devices", headers=bearer("eft_nonsense"))
    assert r.status_code == 401 and "not valid" in r.json()["detail"]
    cred = enroll(client, "dev-a")
    r = client.get("/api/v1/devices", headers=bearer(cred))
    assert r.status_code == 403 and "device credential" in r.json()["detail"]
    r = client.get("/api/v1/devices/dev-a/desired", headers=admin())
    assert r.status_code == 403 and "device itself" in r.json()["detail"]


def test_devices_read_only_what_is_assigned_to_them(client: Client, keyring: Keyring, tmp_path: Path) -> None:
    mine = make_bundle(tmp_path / "a", keyring, name="detector", release=1)
    other = make_bundle(tmp_path / "b", keyring, name="ocr", release=1)
    mine_id = upload(client, mine.path).json()["id"]
    other_id = upload(client, other.path).json()["id"]
    a, b = enroll(client, "dev-a"), enroll(client, "dev-b")
    with session_scope(client.app.state.ctx.engine) as session:
        set_assignment(session, "dev-a", "detector", mine_id, None)

    desired = client.get("/api/v1/devices/dev-a/desired", headers=bearer(a)).json()
    assert [m["bundle_id"] for m in desired["models"]] == [mine_id]
    assert client.get(f"/api/v1/bundles/{mine_id}/envelope", headers=bearer(a)).content == mine.envelope
    for sha, path in mine.blobs.items():
        assert client.get(f"/api/v1/blobs/{sha}", headers=bearer(a)).content == path.read_bytes()

    r = client.get(f"/api/v1/bundles/{other_id}/envelope", headers=bearer(a))
    assert r.status_code == 403 and "not assigned to device dev-a" in r.json()["detail"]
    for sha in other.blobs:
        r = client.get(f"/api/v1/blobs/{sha}", headers=bearer(a))
        assert r.status_code == 403 and "/api/v1/devices/dev-a/desired" in r.json()["detail"]
    # dev-b has nothing assigned: nothing to read
    assert client.get(f"/api/v1/bundles/{mine_id}/envelope", headers=bearer(b)).status_code == 403
    assert client.get(f"/api/v1/blobs/{next(iter(mine.blobs))}", headers=bearer(b)).status_code == 403
    # operators with read see everything
    reader = make_token(client, "read")
    assert client.get(f"/api/v1/bundles/{other_id}/envelope", headers=bearer(reader)).status_code == 200


@pytest.fixture
def limited(settings: Settings) -> Any:
    s = replace(settings, enroll_rate_per_s=0.01, enroll_burst=2, public_rate_per_s=0.01, public_burst=3,
                device_rate_per_s=0.01, device_burst=4)
    with TestClient(create_app(s)) as c:
        yield c


def test_rate_limits_answer_429_with_retry_after(limited: Client) -> None:
    body = {"device_id": "dev-r", "token": ENROLL}
    codes = [limited.post("/api/v1/devices/enroll", json={**body, "device_id": f"dev-r{i}"}).status_code
             for i in range(2)]
    assert codes == [201, 201]
    r = limited.post("/api/v1/devices/enroll", json=body)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "too many enrollment requests" in r.json()["detail"] and "retry in" in r.json()["detail"]

    assert [limited.get("/healthz").status_code for _ in range(4)] == [200, 200, 200, 429]

    cred = limited.post("/api/v1/devices/enroll", json=body)  # still limited
    assert cred.status_code == 429
    # device endpoints: per credential; another credential has its own bucket
    codes = [limited.get("/api/v1/devices/x/desired", headers=bearer("one")).status_code for _ in range(5)]
    assert codes == [401, 401, 401, 401, 429]
    assert limited.get("/api/v1/devices/x/desired", headers=bearer("two")).status_code == 401
    # operator endpoints are not limited
    assert all(limited.get("/api/v1/bundles", headers=admin()).status_code == 200 for _ in range(10))


def test_token_bucket_refills() -> None:
    from fleet.api.limits import Limit, TokenBucket

    now = [0.0]
    bucket = TokenBucket(Limit(rate_per_s=2.0, burst=2), clock=lambda: now[0], max_keys=2)
    assert [bucket.take("a") for _ in range(2)] == [0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.take("a") == 0.0
    bucket.take("b")
    bucket.take("c")  # evicts the least recently seen key
    assert len(bucket._buckets) == 2


def test_token_cli_creates_lists_and_revokes(
    client: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleet_support import ADMIN

    import fleet.cli.tokens as tokens_cli
    from fleet.cli.client import FleetClient
    from fleet.cli.main import main

    class Transport(httpx.BaseTransport):  # the app, in process, as an httpx transport
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            return client._transport.handle_request(request)

    def fleet_client(_args: object) -> FleetClient:
        return FleetClient(str(client.base_url), ADMIN, transport=Transport())

    monkeypatch.setattr(tokens_cli, "_client", fleet_client)
    assert main(["token", "create", "--scope", "read,deploy", "--name", "ci"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("eft_")
    assert client.get("/api/v1/bundles", headers=bearer(token)).status_code == 200
    assert main(["token", "list"]) == 0
    assert "read,deploy" in capsys.readouterr().out
    assert main(["token", "revoke", "1"]) == 0
    assert client.get("/api/v1/bundles", headers=bearer(token)).status_code == 401
    assert main(["token", "create", "--scope", "root"]) == 1
    assert "read, deploy, admin" in capsys.readouterr().err
