"""Production deployment files, checked statically (no Docker engine or cluster here):
they parse, every fleet role runs, each command is one the real `edgefleet` parser accepts,
images and environment agree, and the broker config is the one tested in test_mosquitto_acl."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.cli.main import build_parser
from fleet.cli.serve import ROLE_CHOICES, parse_roles
from fleet.settings import Settings

from .conftest import PACKAGING

DEPLOY = PACKAGING / "deploy"
ROLES = {"api", "ingester", "controller"}
IMAGE = "edgefleet/fleet:0.1.0"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _serve_roles(argv: list[str]) -> str:
    """The --role of a serve command, after the real CLI parser accepted it."""
    args = build_parser().parse_args(argv)
    assert args.handler == "fleet.cli.serve:run"
    parse_roles(args.role)
    return args.role


def test_role_names_match_the_cli() -> None:
    assert set(ROLE_CHOICES) >= ROLES


def test_compose_runs_every_role_on_postgres_and_mosquitto() -> None:
    compose = _docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert {"postgres", "mosquitto", "migrate"} <= set(services)
    roles: Counter[str] = Counter()
    for name, svc in services.items():
        if svc.get("image") != IMAGE:
            continue
        env = svc["environment"]
        assert env["EDGEFLEET_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["EDGEFLEET_DATABASE_URL"]
        mqtt_url = env["EDGEFLEET_MQTT_URL"]
        assert mqtt_url.startswith("mqtts://") and "@mosquitto:8884" in mqtt_url
        assert env["EDGEFLEET_PUBLIC_MQTT_URL"].endswith(":8883")
        assert svc["env_file"] == "fleet.env"
        assert any(v.startswith("fleet-data:") for v in svc["volumes"]), f"{name}: no shared blob volume"
        if name == "migrate":
            assert build_parser().parse_args(svc["command"]).handler == "fleet.cli.db:upgrade"
            continue
        roles[_serve_roles(svc["command"])] += 1
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert roles == {"api": 2, "ingester": 2, "controller": 1}
    mosq = services["mosquitto"]["volumes"]
    assert "../mosquitto/edgefleet-production.conf:/mosquitto/config/mosquitto.conf:ro" in mosq
    assert services["mosquitto"]["ports"] == ["8883:8883"]  # the fleet listener is not published
    env_keys = {line.split("=")[0] for line in (DEPLOY / "fleet.env.example").read_text().splitlines()
                if line and not line.startswith("#")}
    assert {"EDGEFLEET_ADMIN_TOKEN", "EDGEFLEET_ENROLLMENT_TOKEN"} <= env_keys
    used = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / "compose.yaml").read_text()))
    assert used <= env_keys, f"compose needs {used - env_keys} that fleet.env.example does not name"


def test_dockerfile_installs_the_fleet_and_runs_edgefleet() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "'/src[fleet]'" in text
    assert re.search(r'^ENTRYPOINT \["edgefleet"\]$', text, flags=re.M)
    assert re.search(r"^USER edgefleet-fleet$", text, flags=re.M)


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "edgefleet", key
            out[key] = doc
    return out


def test_k8s_deployments_cover_every_role(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = k8s[("ConfigMap", "edgefleet-fleet")]["data"]
    secret = k8s[("Secret", "edgefleet-fleet")]["stringData"]
    assert secret["EDGEFLEET_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert secret["EDGEFLEET_MQTT_URL"].startswith("mqtts://") and ":8884" in secret["EDGEFLEET_MQTT_URL"]
    assert not set(config) & set(secret)
    replicas = {}
    for (kind, name), doc in k8s.items():
        if kind != "Deployment" or not name.startswith("edgefleet-"):
            continue
        spec = doc["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"] == labels
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        role = _serve_roles(container["args"])
        assert labels["app.kubernetes.io/component"] == role and name == f"edgefleet-{role}"
        replicas[role] = spec["replicas"]
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"edgefleet-fleet"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == config["EDGEFLEET_DATA_DIR"]
        assert mounts["keys"] == config["EDGEFLEET_KEYS_DIR"]
        assert config["SSL_CERT_FILE"].startswith(mounts["mqtt-ca"] + "/")
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in k8s[("PersistentVolumeClaim", claim)]["spec"]["accessModes"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz"
    assert replicas == {"api": 2, "ingester": 2, "controller": 1}
    service = k8s[("Service", "edgefleet-api")]["spec"]
    assert service["selector"]["app.kubernetes.io/component"] == "api"
    job = k8s[("Job", "edgefleet-db-upgrade")]["spec"]["template"]["spec"]["containers"][0]
    assert build_parser().parse_args(job["args"]).handler == "fleet.cli.db:upgrade"


def test_k8s_broker_config_is_the_tested_one(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    data = k8s[("ConfigMap", "mosquitto")]["data"]
    shipped = (PACKAGING / "mosquitto" / "edgefleet.acl").read_text()
    assert data["edgefleet.acl"].strip() == shipped.strip()
    conf = (PACKAGING / "mosquitto" / "edgefleet-production.conf").read_text()
    expected = (conf.replace("log_dest syslog", "log_dest stdout")
                .replace("/etc/mosquitto/edgefleet.passwd", "/etc/mosquitto/devices/edgefleet.passwd")
                .replace("/etc/mosquitto/edgefleet-services.passwd",
                         "/etc/mosquitto/passwd/edgefleet-services.passwd")
                .replace("/etc/mosquitto/edgefleet.acl", "/etc/mosquitto/conf/edgefleet.acl"))
    assert data["mosquitto.conf"].strip() == expected.strip()
    container = k8s[("Deployment", "mosquitto")]["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    files = r"^(?:cafile|certfile|keyfile|password_file|acl_file) (\S+)$"
    for path in re.findall(files, data["mosquitto.conf"], flags=re.M):
        assert str(Path(path).parent) in mounts, f"{path} is not mounted"
    assert shlex.join(container["args"]).endswith("/etc/mosquitto/conf/mosquitto.conf")


def _pod(k8s: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    return k8s[("Deployment", name)]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _container(pod: dict[str, Any], name: str, key: str = "containers") -> dict[str, Any]:
    return next(c for c in pod[key] if c["name"] == name)


def _mount_of(path: str, pod: dict[str, Any], container: dict[str, Any]) -> tuple[str, str, bool]:
    """(claim, mountPath, read-only) of the claim-backed mount holding ``path`` in ``container``."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in container["volumeMounts"]:
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            claim = volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim, f"{path} is on volume {m['name']}, not a claim both pods can mount"
            return claim, m["mountPath"], bool(m.get("readOnly"))
    raise AssertionError(f"{path} is not mounted in {container['name']}")


def _devices_password_file(k8s: dict[tuple[str, str], dict[str, Any]]) -> str:
    conf = k8s[("ConfigMap", "mosquitto")]["data"]["mosquitto.conf"]
    found = re.findall(r"^password_file (\S+)$", conf.split("listener 8884")[0], re.M)
    assert len(found) == 1, "the devices' listener has one password_file"
    return str(found[0])


def _fleet_uid() -> int:
    m = re.search(r"useradd .*--uid (\d+) .*edgefleet-fleet", (DEPLOY / "Dockerfile").read_text())
    assert m, "the Dockerfile's fleet user has no fixed uid"
    return int(m.group(1))


def test_k8s_the_password_file_the_api_writes_is_the_one_the_broker_reads(
    k8s: dict[tuple[str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker_file = _devices_password_file(k8s)
    mosq_pod = _pod(k8s, "mosquitto")
    claim, broker_dir, _ro = _mount_of(broker_file, mosq_pod, _container(mosq_pod, "mosquitto"))
    assert "ReadWriteMany" in k8s[("PersistentVolumeClaim", claim)]["spec"]["accessModes"], (
        "the API's pods and the broker's may run on different nodes")
    api_pod = _pod(k8s, "edgefleet-api")
    api = _container(api_pod, "fleet")
    env = {e["name"]: e["value"] for e in api.get("env", [])}
    path = env.get("EDGEFLEET_MQTT_PASSWORD_FILE")
    assert path, "the API does not write the devices' password file"
    api_claim, api_dir, api_ro = _mount_of(path, api_pod, api)
    assert api_claim == claim and not api_ro, f"{path} is not on the broker's claim {claim}, writable"
    assert Path(path).relative_to(api_dir) == Path(broker_file).relative_to(broker_dir)
    # the other roles never write it (only the API enrols, rotates and revokes)
    config = k8s[("ConfigMap", "edgefleet-fleet")]["data"]
    assert "EDGEFLEET_MQTT_PASSWORD_FILE" not in config
    # the settings the API process reads (ConfigMap, Secret, its own env)
    secret = k8s[("Secret", "edgefleet-fleet")]["stringData"]
    for key, value in {**config, **secret, **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("EDGEFLEET_MQTT_RELOAD_COMMAND", raising=False)
    settings = Settings.from_env()
    assert str(settings.mqtt_password_file) == path and settings.mqtt_reload_command is None


def test_k8s_the_password_file_exists_before_the_broker_starts(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    broker_file = _devices_password_file(k8s)
    pod = _pod(k8s, "mosquitto")
    claim, broker_dir, _ro = _mount_of(broker_file, pod, _container(pod, "mosquitto"))
    init = _container(pod, "passwd-init", "initContainers")
    (mount,) = init["volumeMounts"]
    init_dir = mount["mountPath"]
    assert _mount_of(f"{init_dir}/{Path(broker_file).name}", pod, init)[0] == claim
    in_init = f"{init_dir}/{Path(broker_file).relative_to(broker_dir)}"
    script = init["command"][-1]
    uid = _fleet_uid()
    assert f"touch {in_init}" in script and f"chown {uid}:{uid} {init_dir} {in_init}" in script


def test_k8s_the_broker_reloads_the_file_the_api_writes(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    broker_file = _devices_password_file(k8s)
    pod = _pod(k8s, "mosquitto")
    assert pod["shareProcessNamespace"] is True, "the reloader cannot see the broker's process"
    uid = _fleet_uid()
    assert pod["securityContext"]["runAsUser"] == uid, "the broker reads the fleet's file as its uid"
    for kind in ("containers", "initContainers"):
        for c in pod[kind]:
            if c["name"] != "passwd-init":
                assert "runAsUser" not in c.get("securityContext", {}), f"{c['name']}: another uid"
    assert _pod(k8s, "edgefleet-api")["securityContext"]["runAsUser"] == uid
    reloader = _container(pod, "reloader")
    sh, script, watched, process, _interval = reloader["command"]
    assert sh == "sh" and watched == broker_file and process == "mosquitto"
    claim, _d, _ro = _mount_of(broker_file, pod, _container(pod, "mosquitto"))
    assert _mount_of(watched, pod, reloader)[0] == claim
    conf_mount = next(m for m in reloader["volumeMounts"] if script.startswith(m["mountPath"] + "/"))
    conf_volume = next(v for v in pod["volumes"] if v["name"] == conf_mount["name"])
    shipped = k8s[("ConfigMap", conf_volume["configMap"]["name"])]["data"][Path(script).name]
    assert shipped == (PACKAGING / "mosquitto" / "reload-on-change.sh").read_text()
    assert _container(pod, "mosquitto")["args"][0] == process
