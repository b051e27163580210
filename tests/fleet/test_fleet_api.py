"""The fleet HTTP API over real HTTP (Litestar TestClient), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

from fleet_support import ADMIN, admin, bearer, enroll, make_bundle, upload
from fleet_support import ENROLL as ENROLL_TOKEN
from litestar.testing import TestClient

from shared.bundle.archive import write_bundle
from shared.bundle.keyring import Keyring
from shared.bundle.keys import generate

Client = TestClient[Any]


def test_healthz_and_openapi(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    schema = client.get("/schema/openapi.json").json()
    assert "/api/v1/rollouts/{rollout_id}/start" in schema["paths"]


def test_upload_good_bundle_is_idempotent_and_served(
    client: Client, keyring: Keyring, tmp_path: Path
) -> None:
    b = make_bundle(tmp_path, keyring, release=3)
    r = upload(client, b.path)
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["name"], info["release"], info["version"]) == ("detector", 3, "1.0.0")
    again = upload(client, b.path)
    assert again.status_code == 200 and again.json()["id"] == info["id"]
    assert [x["id"] for x in client.get("/api/v1/bundles", headers=admin()).json()] == [info["id"]]
    assert client.get(f"/api/v1/bundles/{info['id']}", headers=admin()).json()["digest"] == info["digest"]
    env = client.get(f"/api/v1/bundles/{info['id']}/envelope", headers=admin())
    assert env.status_code == 200 and env.content == b.envelope
    sha, path = next(iter(b.blobs.items()))
    blob = client.get(f"/api/v1/blobs/{sha}", headers=admin())
    assert blob.status_code == 200 and blob.content == path.read_bytes()
    assert blob.headers["content-type"] == "application/octet-stream"


def test_same_release_other_digest_conflicts(client: Client, keyring: Keyring, tmp_path: Path) -> None:
    assert upload(client, make_bundle(tmp_path / "a", keyring, release=4).path).status_code == 201
    other = make_bundle(tmp_path / "b", keyring, release=4, model_bytes=b"another model")
    r = upload(client, other.path)
    assert r.status_code == 409
    assert "release 4 already exists" in r.json()["detail"]


def test_bad_bundles_are_refused_with_reasons(client: Client, keyring: Keyring, tmp_path: Path) -> None:
    good = make_bundle(tmp_path / "good", keyring, release=5)

    # a blob whose bytes differ from the manifest (same size)
    sha, path = next(iter(good.blobs.items()))
    tampered_blob = tmp_path / "tampered.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    tampered_blob.write_bytes(bytes(data))
    tampered = tmp_path / "tampered.bundle"
    write_bundle(tampered, good.envelope, {**good.blobs, sha: tampered_blob})
    r = upload(client, tampered)
    assert r.status_code == 400
    assert "does not match the manifest" in r.json()["detail"], r.json()

    # signed by a key the root does not delegate
    rogue = make_bundle(tmp_path / "rogue", keyring, release=6, signing_keys=[generate()])
    r = upload(client, rogue.path)
    assert r.status_code == 400
    assert "not signed by a threshold" in r.json()["detail"]
    assert r.json()["code"] == "signature"

    # garbage bytes
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(b"\x00garbage" * 300)
    r = upload(client, garbage)
    assert r.status_code == 400
    assert "bundle" in r.json()["detail"]

    # an extra member the manifest does not list
    extra = tmp_path / "extra.bundle"
    with tarfile.open(extra, "w") as tar:
        tar.add(good.path, arcname="manifest.dsse.json")
    r = upload(client, extra)
    assert r.status_code == 400

    # empty body, missing or wrong token
    assert client.post("/api/v1/bundles", content=b"", headers=admin()).status_code == 400
    assert client.post("/api/v1/bundles", content=good.path.read_bytes()).status_code == 401
    assert client.post("/api/v1/bundles", content=b"x", headers=bearer("nope")).status_code == 401
    # nothing of the refused uploads is stored
    assert client.get("/api/v1/bundles", headers=admin()).json() == []


def test_enroll_and_device_auth(client: Client, keyring: Keyring, tmp_path: Path) -> None:
    bad = client.post("/api/v1/devices/enroll", json={"device_id": "d1", "token": "wrong", "labels": {}})
    assert bad.status_code == 401 and bad.json() == {
        "status_code": 401,
        "detail": "the enrollment token is not valid",
    }
    r = client.post("/api/v1/devices/enroll", json={"device_id": "bad/id", "token": "x" * 3})
    assert r.status_code == 400  # the id is checked before the token
    for reserved in ("edgefleet-fleet", "edgefleet-reader", "EdgeFleet-x"):  # the broker's accounts
        body = {"device_id": reserved, "token": ENROLL_TOKEN, "labels": {}}
        r = client.post("/api/v1/devices/enroll", json=body)
        assert r.status_code == 400 and "reserved" in r.text, r.text
    cred = enroll(client, "d1", site="lab")
    other = enroll(client, "d2", site="lab")
    assert cred != other
    desired = client.get("/api/v1/devices/d1/desired", headers=bearer(cred))
    assert desired.status_code == 200
    assert desired.json()["models"] == [] and desired.json()["generation"] == 0
    assert client.get("/api/v1/devices/d1/desired").status_code == 401
    assert client.get("/api/v1/devices/d1/desired", headers=bearer("forged")).status_code == 401
    assert client.get("/api/v1/devices/d1/desired", headers=bearer(other)).status_code == 403
    assert client.get("/api/v1/devices", headers=bearer(cred)).status_code == 403
    assert client.get("/api/v1/devices", headers=bearer("nope")).status_code == 401
    # the enrollment token alone does not re-enroll a known id (tests/fleet/test_device_identity.py)
    r = client.post("/api/v1/devices/enroll", json={"device_id": "d1", "token": ENROLL_TOKEN})
    assert r.status_code == 403 and "already enrolled" in r.json()["detail"]
    # with its credential as proof, re-enrolling rotates it (the old one overlaps for a while)
    r = client.post("/api/v1/devices/enroll", json={"device_id": "d1", "token": ENROLL_TOKEN},
                    headers=bearer(cred))
    assert r.status_code == 201
    rotated = r.json()["credential"]
    assert client.get("/api/v1/devices/d1/desired", headers=bearer(rotated)).status_code == 200
    devices = client.get("/api/v1/devices", headers=admin()).json()
    assert [d["device_id"] for d in devices] == ["d1", "d2"]
    assert devices[0]["labels"] == {"site": "lab"}
    missing = client.get("/api/v1/devices/nope", headers=admin())
    assert missing.status_code == 404 and "not enrolled" in missing.json()["detail"]
    # malformed body: a JSON error, no stack trace
    r = client.post("/api/v1/devices/enroll", json={"device_id": "d3", "token": "t", "labels": {"a": 1}})
    assert r.status_code == 400 and set(r.json()) == {"status_code", "detail"}
    # invalid device id with a valid token
    from fleet_support import ENROLL

    r = client.post("/api/v1/devices/enroll", json={"device_id": "bad/id", "token": ENROLL})
    assert r.status_code == 400 and "device id" in r.json()["detail"]


def test_unknown_ids_are_404(client: Client) -> None:
    for path in (
        "/api/v1/bundles/99",
        "/api/v1/rollouts/99",
        "/api/v1/bundles/99/envelope",
        "/api/v1/blobs/" + "a" * 64,
    ):
        r = client.get(path, headers=admin())
        assert r.status_code == 404, path
        assert "99" in r.json()["detail"] or "not stored" in r.json()["detail"]
    assert client.post("/api/v1/rollouts/99/start", headers=admin()).status_code == 404
    assert client.get("/api/v1/blobs/not-a-hash", headers=admin()).status_code == 400


def spec(bundle_id: int, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "detector to lab",
        "bundle_id": bundle_id,
        "selector": {"site": "lab"},
        "stages": [
            {"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1, "bake_seconds": 0},
            {"name": "all", "percent": 100, "bake_seconds": 0},
        ],
        "gates": {"max_error_rate": 0.05, "min_inferences": 10, "max_install_failures": 0},
        "on_gate_failure": "rollback",
    }
    base.update(over)
    return base


def test_rollout_create_validate_conflict_and_desired(
    client: Client, keyring: Keyring, tmp_path: Path
) -> None:
    creds = {
        d: enroll(client, d, site="lab", ring="canary" if d == "c1" else "main") for d in ("c1", "m1", "m2")
    }
    enroll(client, "far", site="home", ring="canary")
    bid = upload(client, make_bundle(tmp_path, keyring, release=1).path).json()["id"]

    bad = client.post(
        "/api/v1/rollouts", json=spec(bid, stages=[{"name": "a", "percent": 0}]), headers=admin()
    )
    assert bad.status_code == 400 and bad.json()["detail"].startswith("stages[0].percent")
    assert client.post("/api/v1/rollouts", json=spec(999), headers=admin()).status_code == 404
    assert client.post("/api/v1/rollouts", json=spec(bid)).status_code == 401

    r = client.post("/api/v1/rollouts", json=spec(bid), headers=admin())
    assert r.status_code == 201, r.text
    ro = r.json()
    assert ro["state"] == "created" and ro["release"] == 1 and ro["model"] == "detector"
    assert ro["stages"][0]["devices"] == ["c1"]
    assert ro["stages"][1]["devices"] == ["m1", "m2"]
    assert [s["state"] for s in ro["stages"]] == ["pending", "pending"]

    started = client.post(f"/api/v1/rollouts/{ro['id']}/start", headers=admin())
    assert started.status_code == 200, started.text
    assert started.json()["state"] == "running"
    assert started.json()["stages"][0]["state"] == "active"
    assert client.post(f"/api/v1/rollouts/{ro['id']}/start", headers=admin()).status_code == 409

    d = client.get("/api/v1/devices/c1/desired", headers=bearer(creds["c1"])).json()
    assert d["generation"] == 1
    (m,) = d["models"]
    assert (m["name"], m["release"], m["bundle_id"]) == ("detector", 1, bid)
    assert m["envelope_url"].endswith(f"/api/v1/bundles/{bid}/envelope")
    assert m["blob_url"].endswith("/api/v1/blobs/{sha256}")
    # the device can fetch what it was told to
    path = m["envelope_url"].split("testserver.local")[-1]
    assert client.get(path, headers=bearer(creds["c1"])).status_code == 200
    assert client.get("/api/v1/devices/m1/desired", headers=bearer(creds["m1"])).json()["models"] == []

    # another rollout over the same devices (any model) is refused while this one runs
    other = upload(client, make_bundle(tmp_path / "o", keyring, name="ocr", release=1).path).json()["id"]
    clash = client.post("/api/v1/rollouts", json=spec(other), headers=admin())
    assert clash.status_code == 409 and "already in another active rollout" in clash.json()["detail"]
    # a rollout of devices outside it is fine
    ok = client.post("/api/v1/rollouts", json=spec(other, selector={"site": "home"}), headers=admin())
    assert ok.status_code == 201

    assert client.post(f"/api/v1/rollouts/{ro['id']}/pause", headers=admin()).json()["state"] == "paused"
    assert client.post(f"/api/v1/rollouts/{ro['id']}/resume", headers=admin()).json()["state"] == "running"
    aborted = client.post(f"/api/v1/rollouts/{ro['id']}/abort", headers=admin()).json()
    assert aborted["state"] == "aborted"
    assert [e["kind"] for e in aborted["events"]] == [
        "created",
        "started",
        "stage_started",
        "paused",
        "resumed",
        "aborted",
    ]
    listed = client.get("/api/v1/rollouts", headers=admin()).json()
    assert [x["id"] for x in listed] == [ok.json()["id"], ro["id"]]
    assert client.post("/api/v1/rollouts", json=spec(other), headers=admin()).status_code == 201
    assert (
        client.post(
            "/api/v1/rollouts", content=b"{not json", headers={**admin(), "Content-Type": "application/json"}
        ).status_code
        == 400
    )


def test_operator_token_is_required(client: Client) -> None:
    r = client.get("/api/v1/rollouts")
    assert r.status_code == 401 and set(r.json()) == {"status_code", "detail"}
    assert client.get("/api/v1/rollouts", headers={"Authorization": f"Basic {ADMIN}"}).status_code == 401


def test_blob_digest_in_path_matches_content(client: Client, keyring: Keyring, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, keyring, release=9)
    upload(client, b.path)
    for sha in b.blobs:
        body = client.get(f"/api/v1/blobs/{sha}", headers=admin()).content
        assert hashlib.sha256(body).hexdigest() == sha
