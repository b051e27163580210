"""Device identity over the real fleet API (SQLite and PostgreSQL): re-enrollment needs proof,
enrollment tokens (expiry, uses, revocation), relabel / revoke / delete / rotate / approve,
ids and labels that could collide with MQTT topics or paths refused with 400.
The broker effects (Mosquitto) are in test_device_identity_broker.py."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from agent.fleet_client import FleetClient
from fleet.api.enrollment import (
    Admission,
    DeviceRevoked,
    EnrollmentTokenRefused,
    Proof,
    ReenrollmentNeedsProof,
    admit,
    check_enrollment_token,
)
from fleet.db.models import Device, EnrollmentToken

from .fleet_support import ENROLL, admin, bearer, enroll

Client = TestClient[Any]
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _enroll(client: Client, device_id: str, token: str = ENROLL, credential: str | None = None,
            **labels: str) -> Any:
    body = {"device_id": device_id, "token": token, "labels": labels}
    return client.post("/api/v1/devices/enroll", json=body, headers=bearer(credential) if credential else {})


def _device(client: Client, device_id: str) -> dict[str, Any]:
    r = client.get(f"/api/v1/devices/{device_id}", headers=admin())
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# -- the pure decisions ------------------------------------------------------------------


def test_admission_rules() -> None:
    dev = Device(id="d1", credential_hash="c" * 64)
    assert admit(None, None, NOW) == (Admission.NEW, Proof.NONE)
    assert admit(dev, "c" * 64, NOW) == (Admission.REENROLL, Proof.CREDENTIAL)
    with pytest.raises(ReenrollmentNeedsProof, match="already enrolled"):
        admit(dev, None, NOW)
    with pytest.raises(ReenrollmentNeedsProof):
        admit(dev, "x" * 64, NOW)
    # the previous credential proves it within the overlap, not after
    dev.previous_credential_hash, dev.previous_credential_until = "p" * 64, NOW + timedelta(seconds=1)
    assert admit(dev, "p" * 64, NOW)[1] is Proof.CREDENTIAL
    with pytest.raises(ReenrollmentNeedsProof):
        admit(dev, "p" * 64, NOW + timedelta(seconds=2))
    # an approval admits without proof until it runs out
    dev.reenroll_approved_until = NOW + timedelta(minutes=5)
    assert admit(dev, None, NOW) == (Admission.REENROLL, Proof.APPROVAL)
    with pytest.raises(ReenrollmentNeedsProof):
        admit(dev, None, NOW + timedelta(minutes=6))
    # the device secret made before its first enrollment proves it too, a wrong one does not
    dev.device_secret_hash = "s" * 64
    assert admit(dev, None, NOW + timedelta(minutes=6), "s" * 64)[1] is Proof.SECRET
    with pytest.raises(ReenrollmentNeedsProof):
        admit(dev, None, NOW + timedelta(minutes=6), "t" * 64)
    # a revoked device: its credential proves nothing; only an approval brings it back
    dev.revoked_at, dev.reenroll_approved_until = NOW, None
    with pytest.raises(DeviceRevoked, match="edgefleet device approve d1"):
        admit(dev, "c" * 64, NOW)
    with pytest.raises(DeviceRevoked):
        admit(dev, None, NOW, "s" * 64)
    dev.reenroll_approved_until = NOW + timedelta(minutes=5)
    assert admit(dev, None, NOW)[1] is Proof.APPROVAL


def test_enrollment_token_rules() -> None:
    with pytest.raises(EnrollmentTokenRefused, match="not valid"):
        check_enrollment_token(None, NOW)
    row = EnrollmentToken(id=3, name="line-1", token_hash="h", expires_at=NOW, max_uses=2, uses=1)
    with pytest.raises(EnrollmentTokenRefused, match="token 3 expired"):
        check_enrollment_token(row, NOW)
    check_enrollment_token(row, NOW - timedelta(seconds=1))
    row.uses = 2
    with pytest.raises(EnrollmentTokenRefused, match=r"used up \(2 of 2"):
        check_enrollment_token(row, NOW - timedelta(seconds=1))
    row.uses, row.revoked_at = 0, NOW
    with pytest.raises(EnrollmentTokenRefused, match="revoked"):
        check_enrollment_token(row, NOW - timedelta(seconds=1))


# -- over HTTP ---------------------------------------------------------------------------


def test_reenrollment_needs_proof_or_approval(client: Client) -> None:
    cred = enroll(client, "cam-1", site="lab")
    # the enrollment token alone: refused, the device keeps its credential and labels
    r = _enroll(client, "cam-1", site="attacker")
    assert r.status_code == 403 and "already enrolled" in r.json()["detail"]
    assert client.get("/api/v1/devices/cam-1/desired", headers=bearer(cred)).status_code == 200
    dev = _device(client, "cam-1")
    assert dev["labels"] == {"site": "lab"} and dev["status"] == "reenrollment_pending"
    assert dev["reenroll_requested_at"]
    # another device's credential is no proof
    other = enroll(client, "cam-2")
    assert _enroll(client, "cam-1", credential=other).status_code == 403
    # its own credential is: a new one, the old one still valid for the overlap
    r = _enroll(client, "cam-1", credential=cred)
    assert r.status_code == 201
    new = r.json()["credential"]
    assert client.get("/api/v1/devices/cam-1/desired", headers=bearer(new)).status_code == 200
    assert client.get("/api/v1/devices/cam-1/desired", headers=bearer(cred)).status_code == 200
    assert _device(client, "cam-1")["status"] == "active"
    # the device lost its state: an operator approves one re-enrollment with the token
    r = client.post("/api/v1/devices/cam-1/approve", json={"valid_s": 600}, headers=admin())
    assert r.status_code == 200 and r.json()["reenroll_approved_until"]
    r = _enroll(client, "cam-1")
    assert r.status_code == 201
    # without proof there is no overlap: the credential before is dead at once
    assert client.get("/api/v1/devices/cam-1/desired", headers=bearer(new)).status_code == 401
    assert _enroll(client, "cam-1").status_code == 403  # used once
    # approval needs the admin scope and sane bounds
    approve = "/api/v1/devices/cam-1/approve"
    assert client.post(approve, json={"valid_s": 0}, headers=admin()).status_code == 400
    assert client.post(approve, json={}, headers=bearer(other)).status_code == 403


def test_enrollment_tokens_expire_run_out_and_rotate(client: Client) -> None:
    r = client.post("/api/v1/enrollment-tokens", json={"name": "line 1", "max_uses": 2}, headers=admin())
    assert r.status_code == 201, r.text
    token, token_id = r.json()["token"], r.json()["info"]["id"]
    first = _enroll(client, "t-1", token=token)
    assert first.status_code == 201
    assert _enroll(client, "t-2", token=token).status_code == 201
    r = _enroll(client, "t-3", token=token)
    assert r.status_code == 401 and "used up (2 of 2 enrollments)" in r.json()["detail"]
    listed = client.get("/api/v1/enrollment-tokens", headers=admin()).json()
    assert [(t["id"], t["uses"], t["max_uses"]) for t in listed] == [(token_id, 2, 2)]
    assert "token" not in listed[0]
    # rotation: a new token, the old one revoked; enrolled devices are not touched
    r = client.post("/api/v1/enrollment-tokens", json={"name": "line 1 (2)"}, headers=admin())
    new = r.json()["token"]
    r = client.delete(f"/api/v1/enrollment-tokens/{token_id}", headers=admin())
    assert r.status_code == 200 and r.json()["revoked_at"]
    cred = first.json()["credential"]
    assert client.get("/api/v1/devices/t-1/desired", headers=bearer(cred)).status_code == 200
    r = _enroll(client, "t-4", token=token)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert _enroll(client, "t-4", token=new).status_code == 201
    # a proven re-enrollment needs no valid token (the device holds a rotated-out one)
    assert _enroll(client, "t-1", token=token, credential=cred).status_code == 201
    # expiry
    short = client.post("/api/v1/enrollment-tokens", json={"expires_in_s": 0.2}, headers=admin()).json()
    time.sleep(0.3)
    r = _enroll(client, "t-5", token=short["token"])
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    # admin only; bad bounds are 400
    tokens = "/api/v1/enrollment-tokens"
    assert client.post(tokens, json={}, headers=bearer(cred)).status_code == 403
    assert client.post(tokens, json={"max_uses": 0}, headers=admin()).status_code == 400
    assert client.post(tokens, json={"expires_in_s": -1}, headers=admin()).status_code == 400
    assert client.delete("/api/v1/enrollment-tokens/999", headers=admin()).status_code == 404


@pytest.mark.parametrize("bad", ["a+b", "a#", "a/b", "a\x00b", "x" * 65, "caméra", "", "-lead", "a b"])
def test_ids_that_collide_with_topics_or_paths_are_refused(client: Client, bad: str) -> None:
    r = _enroll(client, bad)
    assert r.status_code == 400 and "device id" in r.json()["detail"], r.text


@pytest.mark.parametrize("labels", [
    {"a+b": "x"}, {"a#": "x"}, {"a/b": "x"}, {"k": "x/y"}, {"k": "+"}, {"k": "#"}, {"k": "a\x00"},
    {"k": "é"}, {"k": "x" * 129}, {"x" * 65: "v"}, {"": "v"}, {f"k{i}": "v" for i in range(65)},
])
def test_labels_that_collide_are_refused_everywhere_they_enter(client: Client,
                                                              labels: dict[str, str]) -> None:
    r = client.post("/api/v1/devices/enroll", json={"device_id": "lab-1", "token": ENROLL, "labels": labels})
    assert r.status_code == 400 and "label" in r.json()["detail"], r.text
    enroll(client, "lab-2")
    r = client.put("/api/v1/devices/lab-2/labels", json={"labels": labels}, headers=admin())
    assert r.status_code == 400 and "label" in r.json()["detail"], r.text


def test_relabel_revoke_delete(client: Client) -> None:
    cred = enroll(client, "cam-1", site="lab")
    r = client.put("/api/v1/devices/cam-1/labels", json={"labels": {"site": "paris", "ring": "canary"}},
                   headers=admin())
    assert r.status_code == 200 and r.json()["labels"] == {"site": "paris", "ring": "canary"}
    assert client.put("/api/v1/devices/nope/labels", json={"labels": {}}, headers=admin()).status_code == 404
    # revoke: the credential stops working at once; the device shows as revoked
    r = client.post("/api/v1/devices/cam-1/revoke", headers=admin())
    assert r.status_code == 200 and r.json()["status"] == "revoked" and r.json()["revoked_at"]
    assert client.get("/api/v1/devices/cam-1/desired", headers=bearer(cred)).status_code == 401
    listed = {d["device_id"]: d for d in client.get("/api/v1/devices", headers=admin()).json()}
    assert listed["cam-1"]["status"] == "revoked"
    # not by its credential nor by the token; an approval brings it back
    r = _enroll(client, "cam-1", credential=cred)
    assert r.status_code == 403 and "revoked" in r.json()["detail"]
    assert client.post("/api/v1/devices/cam-1/rotate", headers=admin()).status_code == 400
    client.post("/api/v1/devices/cam-1/approve", json={"valid_s": 60}, headers=admin())
    back = _enroll(client, "cam-1")
    assert back.status_code == 201 and _device(client, "cam-1")["status"] == "active"
    # delete: gone (404), its credential dead, its id free for a new enrollment
    new_cred = back.json()["credential"]
    r = client.delete("/api/v1/devices/cam-1", headers=admin())
    assert r.status_code == 200 and r.json() == {"device_id": "cam-1", "deleted": True}
    assert client.get("/api/v1/devices/cam-1", headers=admin()).status_code == 404
    assert client.get("/api/v1/devices/cam-1/desired", headers=bearer(new_cred)).status_code == 401
    assert client.delete("/api/v1/devices/cam-1", headers=admin()).status_code == 404
    assert _enroll(client, "cam-1").status_code == 201
    # admin scope: a deploy token may relabel, not revoke or delete
    deploy = client.post("/api/v1/tokens", json={"scopes": ["deploy"]}, headers=admin()).json()["token"]
    r = client.put("/api/v1/devices/cam-1/labels", json={"labels": {}}, headers=bearer(deploy))
    assert r.status_code == 200
    assert client.post("/api/v1/devices/cam-1/revoke", headers=bearer(deploy)).status_code == 403
    assert client.delete("/api/v1/devices/cam-1", headers=bearer(deploy)).status_code == 403


def test_rotation_is_asked_then_done_by_the_device_with_an_overlap(client: Client) -> None:
    creds = {d: enroll(client, d) for d in ("r-1", "r-2", "r-3")}
    desired = client.get("/api/v1/devices/r-1/desired", headers=bearer(creds["r-1"]))
    assert "rotate_credential" not in desired.json()
    r = client.post("/api/v1/devices/r-1/rotate", headers=admin())
    assert r.status_code == 200 and r.json()["rotation_requested_at"]
    again = client.get("/api/v1/devices/r-1/desired", headers=bearer(creds["r-1"]))
    assert again.json()["rotate_credential"] is True
    assert again.headers["etag"] != desired.headers["etag"]
    # the device asks with its current credential; the old one overlaps
    r = client.post("/api/v1/devices/r-1/credential", headers=bearer(creds["r-1"]))
    assert r.status_code == 201
    new = r.json()["credential"]
    assert new != creds["r-1"]
    d = client.get("/api/v1/devices/r-1/desired", headers=bearer(new))
    assert d.status_code == 200 and "rotate_credential" not in d.json()
    # the old credential still works, but a device presenting it evidently lost the answer
    # (and the new broker password with it): it is told to rotate again, within the overlap
    d = client.get("/api/v1/devices/r-1/desired", headers=bearer(creds["r-1"]))
    assert d.status_code == 200 and d.json()["rotate_credential"] is True
    r = client.post("/api/v1/devices/r-1/credential", headers=bearer(creds["r-1"]))
    assert r.status_code == 201
    newer = r.json()["credential"]
    d = client.get("/api/v1/devices/r-1/desired", headers=bearer(newer))
    assert d.status_code == 200 and "rotate_credential" not in d.json()
    # a device cannot rotate another's credentials
    assert client.post("/api/v1/devices/r-1/credential", headers=bearer(creds["r-2"])).status_code == 403
    # the whole fleet: every device is asked, none is cut off before it asks
    client.post("/api/v1/devices/r-3/revoke", headers=admin())
    r = client.post("/api/v1/devices/rotate", headers=admin())
    assert r.status_code == 200 and r.json() == {"requested": 2}
    d = client.get("/api/v1/devices/r-2/desired", headers=bearer(creds["r-2"]))
    assert d.status_code == 200 and d.json()["rotate_credential"] is True
    assert client.post("/api/v1/devices/rotate", headers=bearer(creds["r-2"])).status_code == 403


def test_a_lost_enrollment_answer_is_recovered_with_the_device_secret(client: Client, tmp_path: Path) -> None:
    """The agent makes and stores its secret before it first enrolls; with it, an enrollment
    whose answer never reached the device's disk is simply made again, no operator needed."""
    state = tmp_path / "agent"
    fc = FleetClient(url="http://testserver.local", device_id="sec-1", enrollment_token=ENROLL,
                     labels={}, state_dir=state, client=client)
    first = fc.credential()
    secret_file = state / "device_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600 and len(secret_file.read_text()) >= 32
    (state / "device.json").unlink()  # the answer was lost: no credential on the device
    again = FleetClient(url="http://testserver.local", device_id="sec-1", enrollment_token=ENROLL,
                        labels={}, state_dir=state, client=client).credential()
    assert again.credential != first.credential
    assert client.get("/api/v1/devices/sec-1/desired", headers=bearer(again.credential)).status_code == 200
    # the secret is no token of its own: another secret, or none, is refused
    body = {"device_id": "sec-1", "token": ENROLL, "device_secret": "x" * 43}
    assert client.post("/api/v1/devices/enroll", json=body).status_code == 403
    body["device_secret"] = "short"
    r = client.post("/api/v1/devices/enroll", json=body)
    assert r.status_code == 400 and "device_secret" in r.json()["detail"]
    # the refused attempts show as pending to the operator
    assert _device(client, "sec-1")["status"] == "reenrollment_pending"
