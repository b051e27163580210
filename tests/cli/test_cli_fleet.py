"""The CLI and FleetClient against a real fleet started with ``edgefleet serve``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cli.client import FleetClient, FleetHTTPError

TOKEN = "cli-test-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fleet(built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("fleet")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    log = open(work / "fleet.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli.main", "serve", "--port", str(port),
         "--mqtt-port", str(_free_port()), "--data-dir", str(work / "data"), "--keys", str(built.keys),
         "--admin-token", TOKEN, "--enrollment-token", "enroll-me"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = (work / "fleet.log").read_text()[-2000:]
                pytest.fail(f"edgefleet serve exited {proc.returncode}: {tail}")
            try:
                with FleetClient(url, TOKEN, timeout=2) as client:
                    client.health()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"the fleet did not answer: {(work / 'fleet.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _env(url: str) -> dict[str, str]:
    return {"EDGEFLEET_URL": url, "EDGEFLEET_TOKEN": TOKEN}


def test_upload_list_and_rollout_lifecycle(fleet: str, built, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("bundle", "upload", str(built.bundle), "--json", env=_env(fleet))
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["name"] == "detector" and info["release"] == 7

    r = cli("bundle", "list", "--json", env=_env(fleet))
    assert r.code == 0, r.err
    assert [b["release"] for b in json.loads(r.out) if b["name"] == "detector"] == [7]

    r = cli("device", "list", env=_env(fleet))
    assert r.code == 0, r.err
    assert "devices (0, 0 online)" in r.out

    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "cli test"\nbundle_id = {info["id"]}\n'
                    '[[stages]]\nname = "all"\npercent = 100\nbake_seconds = 0\n')
    # Created, then aborted before it starts: watch ends at once with exit 3.
    r = cli("rollout", "create", str(spec), "--json", env=_env(fleet))
    assert r.code == 0, r.err
    rid = json.loads(r.out)["id"]
    r = cli("rollout", "abort", str(rid), env=_env(fleet))
    assert r.code == 0, r.err
    assert "state aborted" in r.out
    r = cli("rollout", "watch", str(rid), "--timeout", "10", env=_env(fleet))
    assert r.code == 3, (r.out, r.err)
    assert f"rollout {rid} ended aborted" in r.out
    r = cli("rollout", "status", str(rid), env=_env(fleet))
    assert r.code == 0, r.err
    assert "aborted" in r.out and "history:" in r.out
    cli("rollout", "resume", str(rid), env=_env(fleet)).assert_clean_error("HTTP 409")

    # Started with no devices enrolled: no data is not good news, so the stage is
    # inconclusive and the rollout pauses, saying which gate lacks which sample.
    r = cli("rollout", "create", str(spec), "--start", env=_env(fleet))
    assert r.code == 0, r.err
    assert "started" in r.out
    r = cli("rollout", "list", "--json", env=_env(fleet))
    rid2 = max(x["id"] for x in json.loads(r.out))
    deadline = time.monotonic() + 30
    while True:
        status = json.loads(cli("rollout", "status", str(rid2), "--json", env=_env(fleet)).out)
        if status["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert status["state"] == "paused", status
    assert "inconclusive" in (status.get("reason") or ""), status


def test_tampered_upload_is_refused(fleet: str, built, tmp_path: Path, cli, flip_model_byte) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.bundle"
    flip_model_byte(built.bundle, bad, built)
    r = cli("bundle", "upload", str(bad), env=_env(fleet))
    r.assert_clean_error("failed with HTTP 400")
    assert "hash" in r.err


def test_wrong_token(fleet: str, cli) -> None:
    r = cli("device", "list", "--token", "nope", env={"EDGEFLEET_URL": fleet})
    r.assert_clean_error("HTTP 401")
    with FleetClient(fleet, "nope") as client, pytest.raises(FleetHTTPError) as info:
        client.list_rollouts()
    assert info.value.status_code == 401


def test_client_against_real_fleet(fleet: str) -> None:
    with FleetClient(fleet, TOKEN) as client:
        assert isinstance(client.list_devices(), list)
        assert isinstance(client.list_rollouts(), list)
        with pytest.raises(FleetHTTPError) as info:
            client.get_rollout(999999)
        assert info.value.status_code == 404 and "999999" in info.value.detail
        with pytest.raises(FleetHTTPError) as info:
            client.rollout_action(999999, "pause")
        assert info.value.status_code == 404


def test_device_identity_commands(fleet: str, cli) -> None:  # type: ignore[no-untyped-def]
    """enrollment-token create|list|revoke and device show|relabel|revoke|approve|rotate|delete."""
    import httpx

    env = _env(fleet)
    r = cli("enrollment-token", "create", "--name", "line-3", "--max-uses", "2", env=env)
    assert r.code == 0, r.err
    token = r.out.strip().splitlines()[-1]
    assert "2 uses" in r.out and token.startswith("efe_")
    with httpx.Client(base_url=fleet) as http:
        enrolled = http.post("/api/v1/devices/enroll", json={"device_id": "cli-cam", "token": token})
        assert enrolled.status_code == 201, enrolled.text
        r = cli("enrollment-token", "list", env=env)
        assert r.code == 0 and "uses 1/2" in r.out and "line-3" in r.out
        r = cli("device", "relabel", "cli-cam", "site=lab", "ring=canary", env=env)
        assert r.code == 0 and "ring=canary, site=lab" in r.out, r.err
        r = cli("device", "relabel", "cli-cam", "room=2", "--merge", "--remove", "ring", "--json", env=env)
        assert r.code == 0 and json.loads(r.out)["labels"] == {"site": "lab", "room": "2"}
        r = cli("device", "relabel", "cli-cam", "site=a/b", env=env)
        assert r.code != 0 and "label" in r.err
        r = cli("device", "rotate", "cli-cam", env=env)
        assert r.code == 0 and "rotate" in r.out
        r = cli("device", "show", "cli-cam", env=env)
        assert r.code == 0 and "rotation_requested_at" in r.out
        r = cli("device", "revoke", "cli-cam", env=env)
        assert r.code == 0 and "status revoked" in r.out
        cred = enrolled.json()["credential"]
        assert http.get("/api/v1/devices/cli-cam/desired",
                        headers={"Authorization": f"Bearer {cred}"}).status_code == 401
        r = cli("device", "list", env=env)
        assert r.code == 0 and "revoked" in r.out
        r = cli("device", "approve", "cli-cam", "--valid", "60", env=env)
        assert r.code == 0 and "may re-enroll once" in r.out
        again = http.post("/api/v1/devices/enroll", json={"device_id": "cli-cam", "token": token})
        assert again.status_code == 201
        r = cli("device", "rotate", "--all", env=env)
        assert r.code == 0 and "devices asked to rotate" in r.out
        r = cli("enrollment-token", "revoke", "1", env=env)
        assert r.code == 0 and "revoked" in r.out
        refused = http.post("/api/v1/devices/enroll", json={"device_id": "cli-cam-2", "token": token})
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
        assert cli("device", "delete", "cli-cam", env=env).code != 0  # needs --yes
        r = cli("device", "delete", "cli-cam", "--yes", env=env)
        assert r.code == 0 and "deleted" in r.out
        assert cli("device", "show", "cli-cam", env=env).code != 0


def test_device_certificate_commands(fleet: str, cli) -> None:  # type: ignore[no-untyped-def]
    """device certificates|revoke-certificates against the real fleet."""
    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    env = _env(fleet)
    with httpx.Client(base_url=fleet) as http:
        enrolled = http.post("/api/v1/devices/enroll", json={"device_id": "cert-cam", "token": "enroll-me"})
        cred = enrolled.json()["credential"]
        r = cli("device", "certificates", "cert-cam", env=env)
        assert r.code == 0 and "no certificate" in r.out, r.err
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cert-cam")]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
        signed = http.post("/api/v1/devices/cert-cam/certificate", json={"csr": csr},
                           headers={"Authorization": f"Bearer {cred}"})
        assert signed.status_code == 201, signed.text
        serial = signed.json()["serial"]
    r = cli("device", "certificates", "cert-cam", env=env)
    assert r.code == 0 and serial in r.out and "valid" in r.out, r.err
    r = cli("device", "revoke-certificates", "cert-cam", env=env)
    assert r.code == 0 and "1 certificate(s) revoked" in r.out and "crl.pem" in r.out, r.err
    r = cli("device", "certificates", "cert-cam", "--json", env=env)
    assert r.code == 0 and json.loads(r.out)[0]["revoked_at"]
    r = cli("device", "revoke-certificates", "nobody", env=env)
    assert r.code != 0 and "not enrolled" in r.err


def test_rollout_approve_and_a_rollout_that_matches_no_device(fleet: str, built, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              cli) -> None:
    listed = json.loads(cli("bundle", "list", "--json", env=_env(fleet)).out)
    if not listed:
        assert cli("bundle", "upload", str(built.bundle), env=_env(fleet)).code == 0
        listed = json.loads(cli("bundle", "list", "--json", env=_env(fleet)).out)
    spec = tmp_path / "nowhere.toml"
    spec.write_text(f'name = "nowhere"\nbundle_id = {listed[0]["id"]}\n[selector]\nsite = "nowhere"\n'
                    '[[stages]]\nname = "all"\npercent = 100\nbake_seconds = 0\n')
    r = cli("rollout", "create", str(spec), env=_env(fleet))
    assert r.code == 0, r.err
    assert "warning: the rollout matches no device (site=nowhere)" in r.err
    rid = int(r.out.split()[1])
    # approve reaches the fleet: a created rollout has no stage waiting for approval
    cli("rollout", "approve", str(rid), env=_env(fleet)).assert_clean_error("HTTP 409")


def test_times_are_absolute_in_pipes(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli.operator import when

    assert when(1_800_000_000) == "2027-01-15T08:00:00Z"  # stdout is not a terminal here
    assert when(None) == "never"
