"""Release numbers end to end (issue 15): real fleet (uvicorn, SQLite, controller, ingester),
real Mosquitto, real agents and real signature checks.

- 30 builds of one model in a loop, under a second, get distinct growing numbers from the
  builder's ledger; the fleet stores all of them and an agent installs each one in order;
- a rollout of a release below what the devices accepted is refused before assignment,
  naming the devices;
- a device's refusal (its reason code and its own text; `agent_version`, and `rollback` from a
  device that accepted a higher release behind the fleet's back) shows in the rollout status, the
  CLI's ``rollout status``, and ends the stage instead of leaving it running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import _installer
from agent.config import parse_config
from fleet.bundles.build import build_bundle
from fleet.bundles.ledger import ReleaseLedger
from fleet.db.engine import session_scope
from fleet.demo.models import golden_inputs, write_classifier
from fleet.rollout.assignments import set_assignment

from ..waiting import wait_for
from .rollout_rig import ADMIN, DEVICES, running_rig, serve_r1

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_thirty_builds_in_a_second_install_in_order(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    with running_rig(tmp_path, mosquitto, traffic_pause_s=0.2) as rig:
        model = tmp_path / "clf.onnx"
        write_classifier(model, seed=0)
        golden = golden_inputs()
        ledger = ReleaseLedger(rig.keyring.directory / "releases.json")
        built: list[tuple[int, Path]] = []
        started = time.monotonic()
        for i in range(1, 31):  # versions 1.0.1 .. 1.0.30, as fast as the machine builds
            release = ledger.reserve("clf", now_ms=time.time_ns() // 1_000_000)
            out = tmp_path / f"clf-1.0.{i}.bundle"
            build_bundle(model, name="clf", version=f"1.0.{i}", release=release, keyring=rig.keyring,
                         out=out, golden_inputs=golden)
            built.append((release, out))
        elapsed = time.monotonic() - started
        print(f"30 builds in {elapsed:.2f} s: r{built[0][0]} .. r{built[-1][0]}")
        releases = [r for r, _ in built]
        assert releases == sorted(set(releases)), releases  # distinct and growing
        # The old default (Unix seconds) would have given several builds one number.
        assert len({r // 1000 for r in releases}) < len(releases)
        assert elapsed < 5.0, elapsed  # under a second on an idle machine; 2 busy cores allowed

        for (release, path) in built:  # the fleet stores every one: no number is taken twice
            r = rig.http.post("/api/v1/bundles", content=path.read_bytes(),
                              headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            assert r.json()["release"] == release
        top = rig.http.get("/api/v1/bundles/highest", params={"name": "clf"}).json()
        assert (top["release"], top["version"]) == (releases[-1], "1.0.30")

        # Through the fleet: the rig's agents take every tenth build in turn (millisecond
        # numbers, ~1.8e12, stored and accepted on both sides), each above the last.
        ids = {int(b["release"]): int(b["id"]) for b in rig.http.get("/api/v1/bundles").json()}
        for release in releases[9::10]:
            with session_scope(rig.app.state.ctx.engine) as session:
                for device in DEVICES:
                    set_assignment(session, device, "clf", ids[release], None)
            for device in DEVICES:
                wait_for(lambda d=device, r=release: rig.active(d) == (r, "committed"), timeout=30,
                         what=f"{device} to commit r{release}")

        # A device installs each one in order (offline install path: verify, smoke test,
        # activate, anti-rollback floor raised each time); none is refused.
        cfg = parse_config({"device_id": "bench-01", "state_dir": str(tmp_path / "bench-01"),
                            "trust_root": str(rig.keyring.root_path)})
        installer = _installer(cfg)
        for i, (release, path) in enumerate(built, start=1):
            rec = installer.install_file(path, trial=False)
            assert rec.active is not None
            got = (rec.active.release, rec.active.version, str(rec.state))
            assert got == (release, f"1.0.{i}", "committed")


def _spec(bundle_id: int, name: str, **over: object) -> dict[str, object]:
    return {"name": name, "bundle_id": bundle_id, "selector": {"site": "lab"},
            "stages": [{"name": "all", "percent": 100, "min_devices": 2}],
            "gates": {"max_error_rate": 0.5}, **over}


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_lower_release_refused_and_device_refusal_ends_the_stage(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto
) -> None:
    with running_rig(tmp_path, mosquitto, traffic_pause_s=0.1) as rig:
        serve_r1(rig)
        r3 = rig.upload(3, lambda p: write_classifier(p, seed=3))
        done = rig.rollout(_spec(r3, "r3"))
        assert done["state"] == "succeeded", done["reason"]
        assert (done["release"], done["version"]) == (3, "1.3")

        # A lower release: refused before anything is assigned, naming the devices.
        r2 = rig.upload(2, lambda p: write_classifier(p, seed=2))
        r = rig.http.post("/api/v1/rollouts", json=_spec(r2, "r2 (lower)"))
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "clf r2 (1.2) is not above what 2 of the rollout's 2 devices already accepted" in detail
        for device in DEVICES:
            assert f"{device} (r3 (1.3)" in detail
        assert len(rig.http.get("/api/v1/rollouts").json()) == 1
        for device in DEVICES:
            assert rig.active(device) == (3, "committed")

        # A release the devices refuse (it needs a newer agent): the device's reason code and
        # text reach the rollout status, and the stage ends (paused, as the spec says).
        model = tmp_path / "clf-r4.onnx"
        write_classifier(model, seed=4)
        out = tmp_path / "clf-r4.bundle"
        build_bundle(model, name="clf", version="1.4", release=4, keyring=rig.keyring, out=out,
                     golden_inputs=golden_inputs(), min_agent_version="99.0.0")
        r = rig.http.post("/api/v1/bundles", content=out.read_bytes(),
                          headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        status = rig.rollout(_spec(int(r.json()["id"]), "r4 (needs agent 99)", on_gate_failure="pause"))
        assert status["state"] == "paused", status
        reason = status["reason"] or ""
        assert "devices refused the release (agent_version)" in reason, reason
        assert "gate device_refused" in reason, reason
        refused = [d for d in status["devices"] if d["progress"] == "failed"]
        assert refused, status["devices"]
        for d in refused:
            assert d["reason"] == "agent_version"
            assert d["detail"].startswith("refused r4 (1.4): agent_version: bundle needs agent 99.0.0"), d
        for device in DEVICES:
            assert rig.active(device)[0] == 3  # still serving what they had (last update: failed)

        # The CLI shows the same.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update({"PYTHONPATH": str(REPO), "COLUMNS": "220", "EDGEFLEET_URL": rig.url,
                    "EDGEFLEET_TOKEN": ADMIN})
        cli = subprocess.run([sys.executable, "-m", "fleet.cli.main", "rollout", "status", str(status["id"])],
                             env=env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "r4 (1.4)" in cli.stdout, cli.stdout
        assert "agent_version" in cli.stdout and "bundle needs agent 99.0.0" in cli.stdout, cli.stdout
        for d in refused:  # each device's own words, on its own line
            line = f"{d['device_id']} failed: refused r4 (1.4): agent_version: bundle needs agent"
            assert line in cli.stdout, cli.stdout
        cli = subprocess.run([sys.executable, "-m", "fleet.cli.main", "rollout", "list"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "r4 (1.4)" in cli.stdout and "r3 (1.3)" in cli.stdout, cli.stdout


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_device_that_accepted_a_higher_release_meanwhile_refuses_and_the_stage_ends(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto
) -> None:
    """The fleet's knowledge is stale: after the rollout started, edge-02 got r5 from a USB
    stick. When its stage comes, it refuses r3 (``rollback``) in its own words; the stage
    fails at once and the rollout rolls back instead of running forever."""
    labels = {"edge-01": {"site": "lab", "ring": "canary"}, "edge-02": {"site": "lab", "ring": "main"}}
    with running_rig(tmp_path, mosquitto, traffic_pause_s=0.1, labels=labels) as rig:
        serve_r1(rig)
        r3 = rig.upload(3, lambda p: write_classifier(p, seed=3))
        usb = tmp_path / "clf-r5-usb.bundle"
        model = tmp_path / "clf-r5.onnx"
        write_classifier(model, seed=5)
        build_bundle(model, name="clf", version="1.5-usb", release=5, keyring=rig.keyring, out=usb,
                     golden_inputs=golden_inputs())
        spec = _spec(r3, "r3 staged", stages=[
            {"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1, "bake_seconds": 3},
            {"name": "all", "percent": 100}])
        r = rig.http.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        rid = int(r.json()["id"])
        assert rig.http.post(f"/api/v1/rollouts/{rid}/start").status_code == 200
        rec = rig.agents["edge-02"].installer.install_file(usb, trial=False)  # the USB stick
        assert rec.active is not None and rec.active.release == 5

        def ended() -> dict[str, object] | None:
            st = rig.status(rid)
            return st if st["state"] not in ("created", "running") else None

        status = wait_for(ended, timeout=90, what=f"rollout {rid} to end")
        assert status["state"] == "rolled_back", status
        reason = str(status["reason"])
        assert "stage all: 1 of 2 devices refused the release (rollback): " in reason
        assert "edge-02 refused r3 (1.3): rollback: " in reason
        assert "clf release 3 is older than release 5 already accepted on this device" in reason
        edge02 = next(d for d in status["devices"] if d["device_id"] == "edge-02")
        assert (edge02["progress"], edge02["reason"]) == ("failed", "rollback")
        states = {s["name"]: s["state"] for s in status["stages"]}
        assert states == {"canary": "passed", "all": "rolled_back"}, states
