"""The narrated demo, also the end-to-end test's scenario.

1. keys, and two signed bundles of one model: r1 healthy, r2 faulty on field traffic
   (its golden vectors pass, so only health telemetry from devices can reveal it);
2. a real fleet process (embedded SQLite and MQTT broker unless a broker URL is given)
   and several real agent processes, each with a local app sending it traffic;
3. roll r1 to every device; then stage r2 canary -> 50% -> 100% and watch the fleet
   stop at the canary, roll back by re-issuing r1 as a new release, and every device
   end up serving the healthy model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier
from fleet.demo.processes import ManagedProcess, free_port, python_module, wait_until
from fleet.demo.traffic import TrafficGenerator
from shared.bundle.keyring import init_keyring
from shared.randomtoken import random_token

MODEL = "demo-classifier"
TERMINAL = {"succeeded", "rolled_back", "aborted", "failed"}


@dataclass
class DemoConfig:
    workdir: Path
    agents: int = 5
    mqtt_url: str | None = None
    health_interval_s: float = 2.0
    bake_seconds: float = 6.0
    traffic_rate: float = 15.0
    narrate: Callable[[str], None] = print


@dataclass
class DemoResult:
    first_rollout: dict[str, Any]
    second_rollout: dict[str, Any]
    serving: dict[str, int]
    healthy_releases: set[int]
    bundles: dict[str, dict[str, Any]] = field(default_factory=dict)


class DemoFleet:
    """A fleet process, agent processes and their local apps; stop() ends them all."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.work = Path(cfg.workdir).resolve()
        self.t0 = time.monotonic()
        self.admin_token = random_token(24)
        self.enroll_token = random_token(24)
        self.fleet_port = free_port()
        self.fleet_url = f"http://127.0.0.1:{self.fleet_port}"
        self.mqtt_port = None if cfg.mqtt_url else free_port()  # the embedded broker's
        self.admin_token_file = self.work / "fleet" / "admin.token"
        self.fleet: ManagedProcess | None = None
        self.agents: dict[str, ManagedProcess] = {}
        self.agent_api: dict[str, str] = {}
        self.traffic: dict[str, TrafficGenerator] = {}
        self.http = httpx.Client(
            base_url=self.fleet_url, timeout=30.0, headers={"Authorization": f"Bearer {self.admin_token}"}
        )

    def say(self, who: str, text: str) -> None:
        self.cfg.narrate(f"[{time.monotonic() - self.t0:6.1f}s] {who:<7}| {text}")

    # -- setup -----------------------------------------------------------------
    def build_bundles(self) -> dict[str, Path]:
        keys = init_keyring(self.work / "keys")
        self.say("build", f"signing keys in {keys.directory} (root 2-of-3, one online key)")
        out = {}
        for label, release, faulty in (("1.0.0", 1, False), ("1.1.0", 2, True)):
            model = self.work / f"model-r{release}.onnx"
            write_classifier(model, faulty=faulty)
            bundle = self.work / f"{MODEL}-r{release}.bundle"
            vm = build_bundle(
                model, name=MODEL, version=label, release=release, keyring=keys, out=bundle,
                golden_inputs=golden_inputs(),
            )
            kind = "faulty on field inputs >= 2.0, golden vectors pass" if faulty else "healthy"
            self.say("build", f"{MODEL} r{release} ({label}, {kind}) digest {vm.digest[:12]}")
            out[label] = bundle
        return out

    def start_fleet(self) -> None:
        argv = python_module(
            "fleet.cli.main", "serve", "--host", "127.0.0.1", "--port", str(self.fleet_port),
            "--data-dir", str(self.work / "fleet"), "--keys", str(self.work / "keys"),
            "--admin-token-file", str(self.admin_token_file),
            "--enrollment-token-file", str(self.work / "fleet" / "enroll.token"),
        )
        # The tokens as files (0600), not options everyone sees in ps; the operator's CLI
        # and the dashboard read the admin token from its file when --keep-running
        for path, token in ((self.admin_token_file, self.admin_token),
                            (self.work / "fleet" / "enroll.token", self.enroll_token)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token + "\n")
            path.chmod(0o600)
        env = {}
        if self.cfg.mqtt_url:
            argv += ["--mqtt-url", self.cfg.mqtt_url]
        else:
            env["EDGEFLEET_EMBEDDED_MQTT_PORT"] = str(self.mqtt_port)
        self.fleet = ManagedProcess("fleet", argv, self.work / "logs" / "fleet.log", env).start()
        try:
            wait_until(lambda: self.http.get("/healthz").status_code == 200, timeout=60, what="the fleet")
        except TimeoutError:
            raise RuntimeError(f"the fleet did not start; its log ends:\n{self.fleet.tail()}") from None
        broker = self.cfg.mqtt_url or "embedded broker"
        self.say("fleet", f"serving at {self.fleet_url} (SQLite, {broker})")

    def start_agents(self) -> None:
        for i in range(1, self.cfg.agents + 1):
            device = f"edge-{i:02d}"
            labels = {"site": "lab", "ring": "canary" if i == 1 else "main"}
            api_port = free_port()
            home = self.work / "devices" / device
            home.mkdir(parents=True, exist_ok=True)
            labels_toml = ", ".join(f'{k} = "{v}"' for k, v in labels.items())
            mqtt = f'url = "{self.cfg.mqtt_url}"\n' if self.cfg.mqtt_url else ""
            (home / "agent.toml").write_text(
                f'device_id = "{device}"\n'
                f'state_dir = "{home / "state"}"\n'
                f'trust_root = "{self.work / "keys" / "root.json"}"\n'
                f"[fleet]\n"
                f'url = "{self.fleet_url}"\n'
                f'enrollment_token = "{self.enroll_token}"\n'
                f"labels = {{ {labels_toml} }}\n"
                f"poll_interval_s = 5.0\n"
                f"[mqtt]\n{mqtt}"
                f"health_interval_s = {self.cfg.health_interval_s}\n"
                f"[api]\n"
                f'listen = "127.0.0.1:{api_port}"\n'
                f"[update]\n"
                f"trial_seconds = 3.0\n"
                # The device's own trial bound is a coarse safety net (it catches a model
                # that fails most requests); the fleet's gates compare across devices and
                # catch subtler faults: this demo is about the latter.
                f"trial_max_error_rate = 0.9\n"
            )
            argv = python_module("agent", "--config", str(home / "agent.toml"), "run")
            self.agents[device] = ManagedProcess(device, argv, self.work / "logs" / f"{device}.log").start()
            self.agent_api[device] = f"http://127.0.0.1:{api_port}"
        for device, proc in self.agents.items():
            try:
                wait_until(
                    lambda d=device: self.http.get(f"/api/v1/devices/{d}").status_code == 200,
                    timeout=60, what=f"{device} to enroll",
                )
            except TimeoutError:
                raise RuntimeError(f"{device} did not enroll; its log ends:\n{proc.tail()}") from None
        self.say("agents", f"{len(self.agents)} agents enrolled: " + ", ".join(self.agents))

    def start_traffic(self) -> None:
        for n, (device, url) in enumerate(self.agent_api.items()):
            gen = TrafficGenerator(url, MODEL, rate=self.cfg.traffic_rate, seed=n)
            gen.start()
            self.traffic[device] = gen
        self.say("apps", f"a local app on every device sends {self.cfg.traffic_rate:.0f} requests/s")

    def bring_up(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Keys and bundles, the fleet, the agents and their apps; the two uploaded bundles."""
        bundles = self.build_bundles()
        self.start_fleet()
        self.start_agents()
        v1 = self.upload(bundles["1.0.0"])
        v2 = self.upload(bundles["1.1.0"])
        self.start_traffic()
        return v1, v2

    # -- operations ------------------------------------------------------------
    def check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {response.text}")
        return response.json()

    def upload(self, bundle: Path) -> dict[str, Any]:
        with open(bundle, "rb") as fh:
            info = self.check(self.http.post(
                "/api/v1/bundles", content=fh.read(), headers={"Content-Type": "application/octet-stream"}
            ))
        self.say("fleet", f"bundle {info['name']} r{info['release']} uploaded as id {info['id']}")
        return info

    def rollout(self, spec: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        created = self.check(self.http.post("/api/v1/rollouts", json=spec))
        rid = created["id"]
        self.check(self.http.post(f"/api/v1/rollouts/{rid}/start"))
        self.say("fleet", f"rollout {rid} '{spec['name']}' started: "
                 + " -> ".join(s["name"] for s in spec["stages"]))
        return self.watch(rid, timeout)

    def watch(self, rid: int, timeout: float) -> dict[str, Any]:
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            status = self.check(self.http.get(f"/api/v1/rollouts/{rid}"))
            events = status.get("events", [])
            for ev in events[seen:]:
                self.say("fleet", f"rollout {rid}: {ev.get('message') or ev.get('kind')}")
            seen = len(events)
            if status["state"] in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout {rid} still {status['state']} after {timeout:.0f}s: {status}")
            time.sleep(0.5)

    def serving(self) -> dict[str, int]:
        out = {}
        for device, url in self.agent_api.items():
            models = httpx.get(f"{url}/v1/models", timeout=5).json()
            entries = models.get("models", models) if isinstance(models, dict) else models
            out[device] = next(int(m["release"]) for m in entries if m["name"] == MODEL)
        return out

    def stop(self) -> None:
        for gen in self.traffic.values():
            gen.stop()
        for proc in self.agents.values():
            proc.stop()
        if self.fleet:
            self.fleet.stop()
        self.http.close()


def gates(min_inferences: int) -> dict[str, Any]:
    return {"max_error_rate": 0.05, "min_inferences": min_inferences, "max_install_failures": 0}


def healthy_spec(bundle_id: int) -> dict[str, Any]:
    """Rollout 1: the healthy release to every device in one stage."""
    return {
        "name": f"{MODEL} 1.0.0 everywhere", "bundle_id": bundle_id, "selector": {"site": "lab"},
        "stages": [{"name": "all", "percent": 100, "bake_seconds": 0}],
        "gates": gates(10), "on_gate_failure": "rollback",
    }


def staged_spec(bundle_id: int, bake_seconds: float) -> dict[str, Any]:
    """Rollout 2: the faulty release staged canary -> 50% -> 100%."""
    return {
        "name": f"{MODEL} 1.1.0 staged", "bundle_id": bundle_id, "selector": {"site": "lab"},
        "stages": [
            {"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1,
             "bake_seconds": bake_seconds},
            {"name": "half", "percent": 50, "bake_seconds": bake_seconds},
            {"name": "all", "percent": 100, "bake_seconds": bake_seconds},
        ],
        "gates": gates(40), "on_gate_failure": "rollback",
    }


def wait_for_stop(demo: DemoFleet) -> None:
    """--keep-running: say where everything is, then wait for Ctrl-C or SIGTERM (both arrive
    as KeyboardInterrupt, see fleet.demo.__main__); the caller stops every child."""
    broker = demo.cfg.mqtt_url or f"mqtt://127.0.0.1:{demo.mqtt_port} (embedded)"
    demo.say("demo", "keeping it running; Ctrl-C or SIGTERM stops the fleet and every agent")
    demo.say("demo", f"dashboard: {demo.fleet_url}/dashboard")
    demo.say("demo", f"admin token file: {demo.admin_token_file}")
    demo.say("demo", f"broker: {broker}")
    demo.say("demo", f"CLI: EDGEFLEET_URL={demo.fleet_url} EDGEFLEET_TOKEN=$(cat {demo.admin_token_file}) "
             "edgefleet device list")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        demo.say("demo", "stopping the agents and the fleet")


def run_demo(cfg: DemoConfig, *, keep_running: bool = False) -> DemoResult:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    demo = DemoFleet(cfg)
    try:
        v1, v2 = demo.bring_up()
        first = demo.rollout(healthy_spec(v1["id"]))
        demo.say("fleet", f"rollout {first['id']} ended: {first['state']}")
        if first["state"] != "succeeded":
            raise RuntimeError(f"the healthy release did not roll out: {first.get('reason')}")

        second = demo.rollout(staged_spec(v2["id"], cfg.bake_seconds))
        demo.say("fleet", f"rollout {second['id']} ended: {second['state']}: {second.get('reason')}")

        # Healthy = r1, or r1 re-issued under a higher number for the devices that had r2.
        healthy = {v1["release"]}
        if second["state"] == "rolled_back":
            healthy |= {b["release"] for b in demo.check(demo.http.get("/api/v1/bundles"))
                        if b.get("reissue_of") == v1["release"]}
        serving = wait_until(
            lambda: (s := demo.serving()) and all(r in healthy for r in s.values()) and s,
            timeout=60, what=f"every device to serve one of {sorted(healthy)}",
        )
        demo.say("agents", "serving: " + ", ".join(f"{d} r{r}" for d, r in serving.items()))
        for device, gen in demo.traffic.items():
            demo.say("apps", f"{device}: {gen.stats.ok} answered, {gen.stats.errors} failed "
                     f"({gen.stats.not_ready} before any model was installed); answered by release "
                     f"{dict(sorted(gen.stats.releases.items()))}")
        if keep_running:
            wait_for_stop(demo)
        return DemoResult(first, second, serving, healthy, {"v1": v1, "v2": v2})
    finally:
        demo.stop()
