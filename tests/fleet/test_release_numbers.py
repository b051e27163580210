"""Release numbers at the fleet: uploads never reuse a number, the builder numbers above the
fleet's registry, and the API answers out-of-range numbers with 4xx."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fleet_support import ADMIN, admin, make_bundle, serve_fleet, upload
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.settings import Settings
from shared.bundle.archive import read_envelope
from shared.bundle.envelope import Envelope
from shared.bundle.keyring import Keyring
from shared.bundle.manifest import parse_manifest

REPO = Path(__file__).resolve().parents[2]


def test_upload_refuses_a_taken_release_with_another_digest(client: TestClient[Any], keyring: Keyring,
                                                           tmp_path: Path) -> None:
    first = make_bundle(tmp_path / "a", keyring, release=5, version="1.0.5")
    r = upload(client, first.path)
    assert r.status_code == 201, r.text
    assert upload(client, first.path).status_code == 200  # the identical bundle again
    other = make_bundle(tmp_path / "b", keyring, release=5, version="1.0.5b", model_bytes=b"other model")
    r = upload(client, other.path)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "detector release 5 already exists as bundle" in detail and "never reused" in detail
    # another model may use the same number
    assert upload(client, make_bundle(tmp_path / "c", keyring, name="ocr", release=5).path).status_code == 201


def test_highest_release_of_a_model(client: TestClient[Any], keyring: Keyring, tmp_path: Path) -> None:
    r = client.get("/api/v1/bundles/highest", params={"name": "detector"}, headers=admin())
    assert r.status_code == 200 and r.json() == {"name": "detector", "release": 0, "version": None,
                                                 "bundle_id": None}
    for release in (3, 3_000_000_000, 40):
        assert upload(client, make_bundle(tmp_path / str(release), keyring, release=release,
                                          version=f"v{release}").path).status_code == 201
    body = client.get("/api/v1/bundles/highest", params={"name": "detector"}, headers=admin()).json()
    assert (body["release"], body["version"]) == (3_000_000_000, "v3000000000")
    r = client.get("/api/v1/bundles/highest", params={"name": "Bad Name"}, headers=admin())
    assert r.status_code == 400 and "must match" in r.json()["detail"]
    assert client.get("/api/v1/bundles/highest", params={"name": "detector"}).status_code == 401


def _build(
    keys: Path, tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    from fleet.demo.models import write_classifier

    model = tmp / "clf.onnx"
    if not model.exists():
        write_classifier(model)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli.main", "bundle", "build", str(model), "--name", "detector",
         "--keys", str(keys), "--ledger", str(tmp / "ledger.json"), *args],
        env=full_env, capture_output=True, text=True, timeout=120,
    )


def _release_of(path: Path) -> int:
    return parse_manifest(Envelope.from_json(read_envelope(path)).payload).release


def test_builder_numbers_above_the_fleet_and_refuses_a_lower_explicit_release(
    settings: Settings, keyring: Keyring, tmp_path: Path
) -> None:
    with serve_fleet(settings) as url:
        with TestClient(create_app(settings)) as c:
            assert upload(c, make_bundle(tmp_path / "x", keyring, release=9_000_000_000_000,
                                         version="9.0.0").path).status_code == 201
        out = tmp_path / "next.bundle"
        r = _build(keyring.directory, tmp_path, "--version", "9.0.1", "--fleet", url, "--token", ADMIN,
                   "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert _release_of(out) == 9_000_000_000_001
        assert "release  9000000000001 (9.0.1)" in r.stdout
        # an explicit release at or below the fleet's highest is refused at build time
        r = _build(keyring.directory, tmp_path, "--version", "8", "--release", "8000000000000",
                   "--fleet", url, "--token", ADMIN, "-o", str(tmp_path / "low.bundle"))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "is not above release 9000000000001 already issued" in r.stderr  # the ledger knows it
        assert "Use --release 9000000000002 or higher" in r.stderr
        assert not (tmp_path / "low.bundle").exists()
        # EDGEFLEET_URL also points the builder at the fleet; --offline does not ask it
        r = _build(keyring.directory, tmp_path, "--version", "x", "-o", str(tmp_path / "y.bundle"),
                   env={"EDGEFLEET_URL": "http://127.0.0.1:9", "EDGEFLEET_TOKEN": ADMIN})
        assert r.returncode == 1 and "cannot number the build above the fleet's releases" in r.stderr
        assert "--offline" in r.stderr
        r = _build(keyring.directory, tmp_path, "--version", "x", "--offline",
                   "-o", str(tmp_path / "y.bundle"), env={"EDGEFLEET_URL": "http://127.0.0.1:9"})
        assert r.returncode == 0, r.stderr
        assert _release_of(tmp_path / "y.bundle") == 9_000_000_000_002  # the ledger: above the last


def test_release_out_of_range_refused_by_the_builder(keyring: Keyring, tmp_path: Path) -> None:
    r = _build(keyring.directory, tmp_path, "--version", "x", "--release", str(2**53),
               "-o", str(tmp_path / "z.bundle"))
    assert r.returncode == 2
    assert f"release {2**53} is out of range; release numbers are 1 .. {2**53 - 1}" in r.stderr


# -- rollouts of a release not above what the devices accepted ------------------------------


def _report_serving(client: TestClient[Any], device_id: str, release: int, version: str) -> None:
    from sqlmodel import Session

    from fleet.db.models import Device

    with Session(client.app.state.ctx.engine) as s:
        device = s.get(Device, device_id)
        assert device is not None
        device.models = {"detector": {"release": release, "version": version, "state": "committed"}}
        s.add(device)
        s.commit()


def _spec(bundle_id: int, **over: Any) -> dict[str, Any]:
    return {"name": f"b{bundle_id}", "bundle_id": bundle_id, "selector": {"site": "lab"},
            "stages": [{"name": "all", "percent": 100}], **over}


def test_rollout_of_a_lower_release_is_refused_before_assignment(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    from fleet_support import enroll

    for d in ("d1", "d2", "d3"):
        enroll(client, d, site="lab", ring="b" if d == "d2" else "a")
    old = upload(client, make_bundle(tmp_path / "o", keyring, release=100, version="1.1.0").path).json()
    new = upload(client, make_bundle(tmp_path / "n", keyring, release=200,
                                     version="1.0.0-reissued").path).json()
    _report_serving(client, "d1", 200, "1.0.0-reissued")  # reported serving
    _report_serving(client, "d2", 100, "1.1.0")
    # d1 and d3 are assigned r200 by another (ended) rollout: they will install it
    rid = client.post("/api/v1/rollouts", json=_spec(new["id"], selector={}, stages=[
        {"name": "one", "selector": {"ring": "a"}, "percent": 100}]), headers=admin()).json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    assert client.post(f"/api/v1/rollouts/{rid}/abort", headers=admin()).status_code == 200

    r = client.post("/api/v1/rollouts", json=_spec(old["id"]), headers=admin())
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["code"] == "release_not_above"
    detail = body["detail"]
    assert "detector r100 (1.1.0) is not above what 2 of the rollout's 3 devices already accepted" in detail
    assert "d1 (r200 (1.0.0-reissued) reported)" in detail and "d3 (r200 (1.0.0-reissued) assigned)" in detail
    assert "d2 " not in detail and "Nothing was assigned" in detail and '"reissue": true' in detail
    listed = client.get("/api/v1/rollouts", headers=admin()).json()
    assert [x["id"] for x in listed] == [rid]  # nothing was created
    from sqlmodel import Session

    from fleet.db.models import Assignment

    with Session(client.app.state.ctx.engine) as s:
        assert s.get(Assignment, ("d2", "detector")) is None  # nothing was assigned

    # "reissue": true signs the same content again as a new, higher release and rolls that out
    r = client.post("/api/v1/rollouts", json=_spec(old["id"], reissue=True), headers=admin())
    assert r.status_code == 201, r.text
    st = r.json()
    assert st["release"] == 201 and st["bundle_id"] not in (old["id"], new["id"])
    assert st["version"] == "1.1.0"
    reissued = [e for e in st["events"] if e["kind"] == "reissued"]
    assert reissued and "re-issued detector r100 (1.1.0) as r201" in reissued[0]["message"]
    again = client.get(f"/api/v1/bundles/{st['bundle_id']}", headers=admin()).json()
    assert (again["reissue_of"], again["version"]) == (100, "1.1.0")
    assert client.post("/api/v1/rollouts", json=_spec(old["id"], reissue="yes"),
                       headers=admin()).status_code == 400


def test_start_refuses_when_devices_accepted_a_higher_release_since_create(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    from fleet_support import enroll

    enroll(client, "d1", site="lab")
    b = upload(client, make_bundle(tmp_path / "o", keyring, release=100, version="1.1.0").path).json()
    rid = client.post("/api/v1/rollouts", json=_spec(b["id"]), headers=admin()).json()["id"]
    _report_serving(client, "d1", 150, "1.2.0")  # e.g. installed from a file meanwhile
    r = client.post(f"/api/v1/rollouts/{rid}/start", headers=admin())
    assert r.status_code == 409 and "d1 (r150 (1.2.0) reported)" in r.json()["detail"]
    st = client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()
    assert st["state"] == "created" and all(d["status"] == "pending" for d in st["devices"])


# -- a device's refusal reaches the rollout and ends the stage ------------------------------


def _failed_event(client: TestClient[Any], device_id: str, release: int, reason: str, message: str) -> None:
    from datetime import UTC, datetime

    from sqlmodel import Session

    from fleet.db.models import DeviceEvent

    now = datetime.now(UTC)
    with Session(client.app.state.ctx.engine) as s:
        s.add(DeviceEvent(device_id=device_id, ts=now.timestamp(), received_at=now, seq=7, model="detector",
                          kind="failed", release=release, from_release=9, reason=reason, message=message))
        s.commit()


def test_a_rollback_refusal_shows_its_text_and_rolls_the_stage_back(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    from fleet_support import enroll

    for d in ("d1", "d2"):
        enroll(client, d, site="lab")
    b = upload(client, make_bundle(tmp_path / "o", keyring, release=100, version="1.1.0").path).json()
    rid = client.post("/api/v1/rollouts", json=_spec(b["id"]), headers=admin()).json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    ctrl = client.app.state.ctx.controller
    ctrl.tick()
    assert client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()["state"] == "running"
    text = "detector release 100 is older than release 150 already accepted on this device"
    _failed_event(client, "d2", 100, "rollback", text)
    ctrl.tick()
    st = client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()
    assert st["state"] == "rolled_back", st["reason"]
    assert "1 of 2 devices refused the release (rollback): d2 refused r100 (1.1.0): rollback: " + text in (
        st["reason"]
    )
    assert "(gate device_refused)" in st["reason"]
    d2 = next(d for d in st["devices"] if d["device_id"] == "d2")
    assert (d2["progress"], d2["reason"]) == ("failed", "rollback")
    assert d2["detail"] == f"refused r100 (1.1.0): rollback: {text}"
    failed = [e for e in st["events"] if e["kind"] == "gate_failed"]
    assert failed and failed[0]["data"]["gate"] == "device_refused"


def test_a_stage_that_cannot_progress_ends_by_its_deadline(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from fleet_support import enroll

    enroll(client, "d1", site="lab")
    b = upload(client, make_bundle(tmp_path / "o", keyring, release=100, version="1.1.0").path).json()
    spec = _spec(b["id"], silent_after_s=120, on_gate_failure="pause")
    rid = client.post("/api/v1/rollouts", json=spec, headers=admin()).json()["id"]
    start = datetime.now(UTC)
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    _failed_event(client, "d1", 100, "download", "GET /api/v1/blobs/…: connection reset")
    ctrl = client.app.state.ctx.controller
    ctrl.tick(now=start + timedelta(seconds=60))
    st = client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()
    assert st["state"] == "running"  # a download may succeed on a retry
    assert st["devices"][0]["detail"].startswith("failed to install r100 (1.1.0): download: GET")
    from sqlmodel import Session

    from fleet.db.models import Device

    with Session(client.app.state.ctx.engine) as s:  # it keeps reporting: not silent
        device = s.get(Device, "d1")
        assert device is not None
        device.last_seen = start + timedelta(seconds=120)
        s.add(device)
        s.commit()
    ctrl.tick(now=start + timedelta(seconds=125))
    st = client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()
    assert st["state"] == "paused", st
    assert "cannot progress after 12" in st["reason"] and "(deadline 120 s)" in st["reason"]
    assert "(gate stage_stalled)" in st["reason"]


def test_cli_rollout_create_refused_then_reissued(
    settings: Settings, keyring: Keyring, tmp_path: Path
) -> None:
    import json

    from fleet_support import enroll

    with serve_fleet(settings) as url:
        with TestClient(create_app(settings)) as c:
            enroll(c, "d1", site="lab")
            low = upload(c, make_bundle(tmp_path / "o", keyring, release=100, version="1.1.0").path).json()
            upload(c, make_bundle(tmp_path / "n", keyring, release=200, version="1.0.0-r").path)
            _report_serving(c, "d1", 200, "1.0.0-r")
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps(_spec(low["id"])))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update({"PYTHONPATH": str(REPO), "EDGEFLEET_URL": url, "EDGEFLEET_TOKEN": ADMIN})

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "fleet.cli.main", "rollout", "create", *args],
                                  env=env, capture_output=True, text=True, timeout=60)

        r = cli(str(spec))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "HTTP 409: detector r100 (1.1.0) is not above what 1 of the rollout's 1 devices" in r.stderr
        assert "d1 (r200 (1.0.0-r) reported)" in r.stderr
        r = cli(str(spec), "--reissue")
        assert r.returncode == 0, r.stderr
        assert "detector r201 (1.1.0)" in r.stdout
        assert "re-issued r100 as r201: some devices had accepted a higher release" in r.stdout
