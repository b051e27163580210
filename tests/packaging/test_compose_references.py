"""packaging/deploy/compose.yaml, its cross-references checked (no engine runs here): the
devices' password file the fleet writes is the file the broker reads (a shared volume, the
tested Mosquitto config pointed into it), the fleet can make the broker reload it (same uid,
the broker's process namespace), the file exists before the broker starts, the broker's
certificate made as the header says carries the names both URLs use, every volume is
declared and every file mounted from the repository exists, and the fleet's settings read
the environment as meant."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fleet.settings import Settings

from .conftest import PACKAGING

DEPLOY = PACKAGING / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
FLEET_IMAGE = "edgefleet/fleet:0.1.0"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def _fleet_services(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in c["services"].items() if s.get("image") == FLEET_IMAGE}


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each volume entry."""
    out = []
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def _in_volume(path: str, svc: dict[str, Any]) -> tuple[str, str, str] | None:
    """The mount (source, target, mode) holding ``path`` in ``svc``, the deepest one."""
    found = [m for m in _mounts(svc) if path == m[1] or path.startswith(m[1].rstrip("/") + "/")]
    return max(found, key=lambda m: len(m[1])) if found else None


def _dockerfile_uid() -> int:
    m = re.search(r"useradd .*--uid (\d+) .*edgefleet-fleet", (DEPLOY / "Dockerfile").read_text())
    assert m, "the Dockerfile's fleet user has no fixed uid"
    return int(m.group(1))


def _broker_conf() -> str:
    """The config Mosquitto runs with: the tested file through the service's own command."""
    svc = _compose()["services"]["mosquitto"]
    script = " ".join(svc["command"])
    sed = re.search(r"sed '([^']+)'", script)
    assert sed and "exec mosquitto -c /tmp/mosquitto.conf" in script
    conf = (PACKAGING / "mosquitto" / "edgefleet-production.conf").read_text()
    r = subprocess.run(["sed", sed.group(1)], input=conf, capture_output=True, text=True, check=True)
    return r.stdout


def test_the_password_file_the_fleet_writes_is_the_one_the_broker_reads() -> None:
    c = _compose()
    mosq = c["services"]["mosquitto"]
    conf = _broker_conf()
    devices_file = re.findall(r"^password_file (\S+)$", conf.split("listener 8884")[0], re.M)
    assert len(devices_file) == 1, "the devices' listener has one password_file"
    broker_mount = _in_volume(devices_file[0], mosq)
    assert broker_mount and not broker_mount[0].startswith((".", "/")), (
        f"{devices_file[0]} is not in a named volume of the broker (a directory, so the fleet's "
        "compaction by rename is seen)")
    for name, svc in _fleet_services(c).items():
        path = svc["environment"].get("EDGEFLEET_MQTT_PASSWORD_FILE")
        assert path, f"{name}: EDGEFLEET_MQTT_PASSWORD_FILE is not set"
        fleet_mount = _in_volume(path, svc)
        assert fleet_mount and fleet_mount[0] == broker_mount[0] and fleet_mount[2] == "rw", (
            f"{name}: {path} is not in the broker's volume {broker_mount[0]}, writable")
        assert Path(path).relative_to(fleet_mount[1]) == Path(devices_file[0]).relative_to(broker_mount[1])


def test_the_fleet_can_make_the_broker_reload() -> None:
    c = _compose()
    uid = _dockerfile_uid()
    mosq = c["services"]["mosquitto"]
    assert str(mosq["user"]).split(":")[0] == str(uid), "signals need the broker to run as the fleet's uid"
    for name, svc in _fleet_services(c).items():
        argv = shlex.split(svc["environment"]["EDGEFLEET_MQTT_RELOAD_COMMAND"])
        assert argv[0] == "python" and "os.kill(1, signal.SIGHUP)" in argv[-1], name
        assert svc["pid"] == "service:mosquitto", f"{name}: the broker is not process 1 of its namespace"


def test_the_password_file_exists_before_the_broker_starts() -> None:
    c = _compose()
    init = c["services"]["broker-init"]
    mosq = c["services"]["mosquitto"]
    assert mosq["depends_on"]["broker-init"]["condition"] == "service_completed_successfully"
    script = " ".join(init["command"])
    volume_dir = next(t for s, t, _m in _mounts(init) if s == _in_volume(
        "/etc/mosquitto/devices/edgefleet.passwd", mosq)[0])  # type: ignore[index]
    assert f"touch {volume_dir}/edgefleet.passwd" in script
    assert f"chown -R {_dockerfile_uid()}:{_dockerfile_uid()} {volume_dir}" in script
    data = next(t for s, t, _m in _mounts(init) if s == "mosquitto-data")
    assert data in script, "the broker's persistence volume is owned by its uid too"


def test_every_volume_is_declared_and_every_repository_file_exists() -> None:
    c = _compose()
    declared = set(c["volumes"])
    for name, svc in c["services"].items():
        for source, _target, _mode in _mounts(svc):
            if source.startswith("../"):
                assert (DEPLOY / source).exists(), f"{name}: {source} is not in the repository"
            elif not source.startswith(("./", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"


def _substituted(value: Any) -> str:
    """What compose makes of ``${VAR:?message}`` once VAR is set (to "secret")."""
    return re.sub(r"\$\{(\w+):\?[^}]*\}", "secret", str(value))


def _cert_names() -> list[str]:
    header = COMPOSE.read_text().split("name: edgefleet")[0]
    m = re.search(r"gen-certs\.sh \S+ (\S+)((?: DNS:\S+| IP:\S+)*)", header)
    assert m, "the header does not say how to make the broker's certificate"
    return [m.group(1), *[x.split(":", 1)[1] for x in m.group(2).split()]]


def test_the_certificate_carries_the_names_both_urls_use(tmp_path: Path) -> None:
    svc = next(iter(_fleet_services(_compose()).values()))
    env = {k: _substituted(v) for k, v in svc["environment"].items()}
    hosts = {urlsplit(env[k]).hostname for k in ("EDGEFLEET_MQTT_URL", "EDGEFLEET_PUBLIC_MQTT_URL")}
    names = _cert_names()
    assert hosts <= set(names), f"the certificate names {names}; the URLs use {hosts}"
    # made for real, as the header says
    subprocess.run(["sh", str(PACKAGING / "mosquitto" / "gen-certs.sh"), str(tmp_path), names[0],
                    *[f"DNS:{n}" for n in names[1:]]], check=True, capture_output=True)
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "broker.crt"), "-noout", "-ext",
                           "subjectAltName"], check=True, capture_output=True, text=True).stdout
    for host in hosts:
        assert f"DNS:{host}" in text, text


def test_the_fleet_settings_read_the_environment_as_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = next(iter(_fleet_services(_compose()).values()))
    for key, value in svc["environment"].items():
        monkeypatch.setenv(key, _substituted(value))
    s = Settings.from_env()
    env = svc["environment"]
    assert str(s.mqtt_password_file) == env["EDGEFLEET_MQTT_PASSWORD_FILE"]
    assert s.mqtt_reload_command == env["EDGEFLEET_MQTT_RELOAD_COMMAND"]
    assert s.log_format == "json" and s.public_mqtt_url == env["EDGEFLEET_PUBLIC_MQTT_URL"]
