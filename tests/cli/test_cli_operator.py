"""Operator commands as subprocesses against a stub of the fleet API (real HTTP, fake fleet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROLLOUT = {
    "id": 3, "name": "detector r7 to lab", "model": "detector", "bundle_id": 2, "state": "running",
    "current_stage": 0, "reason": None,
    "stages": [
        {"name": "canary", "state": "baking", "devices": ["edge-01"],
         "gates": [{"name": "max_error_rate", "verdict": "pass", "value": 0.01, "bound": 0.05}]},
        {"name": "all", "state": "pending", "devices": []},
    ],
    "events": [{"ts": 1700000000, "kind": "started", "message": "rollout started"}],
}


def _with(**changes: object) -> dict:
    return {**ROLLOUT, **changes}


def _env(stub) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"EDGEFLEET_URL": stub.url, "EDGEFLEET_TOKEN": "op-token"}


def test_unreachable_fleet_is_one_clear_line(cli) -> None:
    for argv in (["device", "list"], ["rollout", "status", "3"], ["bundle", "list"]):
        r = cli(*argv, "--fleet", "http://127.0.0.1:9")
        r.assert_clean_error("cannot reach the fleet at http://127.0.0.1:9: is `edgefleet serve` running?")


def test_device_list_table(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/devices", (200, [
        {"id": "edge-01", "labels": {"site": "lab", "ring": "canary"}, "online": True,
         "last_seen": "2020-01-01T00:00:00Z", "models": {"detector": {"release": 7, "state": "committed"}}},
        {"id": "edge-02", "labels": {}, "online": False, "last_seen": None, "models": {}},
    ]))
    r = cli("device", "list", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert "devices (2, 1 online)" in r.out
    assert "edge-01" in r.out and "ring=canary, site=lab" in r.out and "detector r7 committed" in r.out
    assert "never" in r.out and "2020-01-01T00:00:00Z" in r.out  # piped: absolute, not "d ago"
    assert stub_fleet.requests[0]["headers"]["Authorization"] == "Bearer op-token"


def test_device_list_json(cli, stub_fleet) -> None:
    devices = [{"id": "edge-01", "labels": {}, "online": True}]
    stub_fleet.route("GET", "/api/v1/devices", (200, {"devices": devices}))
    r = cli("device", "list", "--json", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert json.loads(r.out) == devices


def test_token_from_fleet_data_admin_token(cli, stub_fleet, tmp_path: Path) -> None:
    (tmp_path / "fleet-data").mkdir()
    (tmp_path / "fleet-data" / "admin.token").write_text("file-token\n")
    stub_fleet.route("GET", "/api/v1/bundles", (200, []))
    r = cli("bundle", "list", "--fleet", stub_fleet.url, cwd=tmp_path)
    assert r.code == 0, r.err
    assert stub_fleet.requests[0]["headers"]["Authorization"] == "Bearer file-token"


def test_http_error_shows_detail(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/devices", (401, {"status_code": 401, "detail": "token not valid"}))
    cli("device", "list", env=_env(stub_fleet)).assert_clean_error(
        "GET /api/v1/devices failed with HTTP 401: token not valid; pass --token")


def test_bundle_upload(cli, stub_fleet, built) -> None:
    stub_fleet.route("POST", "/api/v1/bundles", (201, {
        "id": 2, "name": "detector", "release": 7, "version": "1.0.0", "digest": "ab" * 32}))
    r = cli("bundle", "upload", str(built.bundle), env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert "bundle id 2, detector release 7 (1.0.0)" in r.out
    req = stub_fleet.requests[0]
    assert req["body"] == built.bundle.read_bytes()
    assert req["headers"]["Content-Type"] == "application/octet-stream"


def test_bundle_upload_refused(cli, stub_fleet, built) -> None:
    stub_fleet.route("POST", "/api/v1/bundles", (400, {
        "status_code": 400, "detail": "bundle does not verify (signature): 0 valid signatures"}))
    cli("bundle", "upload", str(built.bundle), env=_env(stub_fleet)).assert_clean_error(
        "HTTP 400: bundle does not verify (signature): 0 valid signatures")


def test_bundle_upload_missing_file(cli, stub_fleet, tmp_path: Path) -> None:
    cli("bundle", "upload", str(tmp_path / "nope.bundle"), env=_env(stub_fleet)).assert_clean_error(
        "does not exist")
    assert stub_fleet.requests == []


def test_bundle_list(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/bundles", (200, [
        {"id": 1, "name": "detector", "release": 7, "version": "1.0.0", "digest": "cd" * 32,
         "created": "2024-01-01T00:00:00Z", "expires": "2025-01-01T00:00:00Z"}]))
    r = cli("bundle", "list", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert "detector" in r.out and "cdcdcdcdcdcd" in r.out


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_rollout_create_and_start(cli, stub_fleet, tmp_path: Path, suffix: str) -> None:
    spec = {"name": "r7", "bundle_id": 2, "selector": {"site": "lab"},
            "stages": [{"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1},
                       {"name": "all", "percent": 100}],
            "gates": {"max_error_rate": 0.05}, "on_gate_failure": "rollback"}
    path = tmp_path / f"spec{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(spec))
    else:
        path.write_text(
            'name = "r7"\nbundle_id = 2\nselector = { site = "lab" }\non_gate_failure = "rollback"\n'
            "[gates]\nmax_error_rate = 0.05\n"
            '[[stages]]\nname = "canary"\nselector = { ring = "canary" }\nmin_devices = 1\n'
            '[[stages]]\nname = "all"\npercent = 100\n'
        )
    stub_fleet.route("POST", "/api/v1/rollouts", (201, _with(state="created")))
    stub_fleet.route("POST", "/api/v1/rollouts/3/start", (200, _with(state="running")))
    r = cli("rollout", "create", str(path), "--start", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert "rollout 3" in r.out and "started" in r.out
    assert json.loads(stub_fleet.requests[0]["body"]) == spec
    assert [q["path"] for q in stub_fleet.requests] == ["/api/v1/rollouts", "/api/v1/rollouts/3/start"]


def test_rollout_create_prints_the_fleet_s_warnings(cli, stub_fleet, tmp_path: Path) -> None:
    """The create answer's warnings (fleet.rollout.capacity) go to stderr; the rollout is
    created and started all the same, and --json keeps them after --start."""
    warning = ("stage 'shadow': min_agreement 0.95 implies catching a 5% slice, but 1 of 3 devices "
               "weighed x 1 requests/s x sample rate 0.1 x bake 600 s = about 60 samples ...")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"name": "r7", "bundle_id": 2, "stages": [{"name": "all"}]}))
    stub_fleet.route("POST", "/api/v1/rollouts", (201, _with(state="created", warnings=[warning])))
    stub_fleet.route("POST", "/api/v1/rollouts/3/start", (200, _with(state="running")))
    r = cli("rollout", "create", str(path), "--start", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert f"warning: {warning}" in r.err and "rollout 3" in r.out and "warning" not in r.out
    r = cli("rollout", "create", str(path), "--start", "--json", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert json.loads(r.out)["warnings"] == [warning] and json.loads(r.out)["state"] == "running"


def test_rollout_create_bad_spec(cli, stub_fleet, tmp_path: Path) -> None:
    bad = tmp_path / "spec.toml"
    bad.write_text("name = \n")
    cli("rollout", "create", str(bad), env=_env(stub_fleet)).assert_clean_error(
        f"rollout spec {bad} is not valid TOML")
    other = tmp_path / "spec.yaml"
    other.write_text("name: x")
    cli("rollout", "create", str(other), env=_env(stub_fleet)).assert_clean_error(
        "must end in .json or .toml")
    assert stub_fleet.requests == []


def test_rollout_create_refused_by_fleet(cli, stub_fleet, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "x"}')
    stub_fleet.route("POST", "/api/v1/rollouts", (400, {"detail": "spec needs bundle_id"}))
    cli("rollout", "create", str(spec), env=_env(stub_fleet)).assert_clean_error(
        "HTTP 400: spec needs bundle_id")


def test_rollout_status_text_and_json(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/rollouts/3", (200, ROLLOUT))
    r = cli("rollout", "status", "3", env=_env(stub_fleet))
    assert r.code == 0, r.err
    for text in ("rollout 3", "running", "canary", "max_error_rate pass 0.01 (bound 0.05)", "history:",
                 "rollout started"):
        assert text in r.out, text
    r = cli("rollout", "status", "3", "--json", env=_env(stub_fleet))
    assert json.loads(r.out) == ROLLOUT


def test_rollout_status_unknown_id(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/rollouts/9", (404, {"status_code": 404, "detail": "no rollout 9"}))
    cli("rollout", "status", "9", env=_env(stub_fleet)).assert_clean_error("HTTP 404: no rollout 9")


@pytest.mark.parametrize("action", ["start", "pause", "resume", "abort", "rollback"])
def test_rollout_actions(cli, stub_fleet, action: str) -> None:
    stub_fleet.route("POST", f"/api/v1/rollouts/3/{action}", (200, _with(state="paused")))
    r = cli("rollout", action, "3", env=_env(stub_fleet))
    assert r.code == 0, r.err
    assert f"rollout 3: {action} accepted, state paused" in r.out


def test_rollout_action_conflict(cli, stub_fleet) -> None:
    stub_fleet.route("POST", "/api/v1/rollouts/3/resume",
                     (409, {"detail": "rollout 3 is running; only a paused rollout resumes"}))
    cli("rollout", "resume", "3", env=_env(stub_fleet)).assert_clean_error(
        "HTTP 409: rollout 3 is running; only a paused rollout resumes")


def test_rollout_watch_succeeded(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/rollouts/3", (200, ROLLOUT), (200, _with(current_stage=1)),
                     (200, _with(state="succeeded", current_stage=1)))
    r = cli("rollout", "watch", "3", "--interval", "0.05", env=_env(stub_fleet))
    assert r.code == 0, (r.out, r.err)
    assert "rollout 3: running, stage 1/2 canary" in r.out
    assert "rollout 3: running, stage 2/2 all" in r.out
    assert "rollout 3 succeeded" in r.out


def test_rollout_watch_rolled_back_exits_3(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/rollouts/3", (200, ROLLOUT), (200, _with(
        state="rolled_back", reason="stage canary: error rate 0.4 > 0.05",
        events=[*ROLLOUT["events"], {"ts": 1700000100, "kind": "rolled_back", "message": "rolled back"}])))
    r = cli("rollout", "watch", "3", "--interval", "0.05", env=_env(stub_fleet))
    assert r.code == 3, (r.out, r.err)
    assert "rollout 3 ended rolled_back: stage canary: error rate 0.4 > 0.05" in r.out
    assert "rolled back" in r.out


def test_rollout_watch_timeout(cli, stub_fleet) -> None:
    stub_fleet.route("GET", "/api/v1/rollouts/3", (200, ROLLOUT))
    r = cli("rollout", "watch", "3", "--interval", "0.05", "--timeout", "0.3", env=_env(stub_fleet))
    r.assert_clean_error("rollout 3 is still running after 0.3s")
