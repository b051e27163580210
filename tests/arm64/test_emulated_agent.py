"""The arm64 agent on emulated aarch64: the cross-built .deb installed by dpkg in a Debian 12
arm64 root (qemu-user through binfmt_misc), the agent started from it as the edgefleet user
against the real fleet on the host (uvicorn, SQLite) and a real Mosquitto. It installs signed
ONNX and TFLite bundles, answers predict over its local API with the numbers the host
computes, reports health over MQTT, and a faulty release is rolled back by the fleet's gates.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.client import AgentClient
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier, write_tflite_classifier
from fleet.demo.traffic import TrafficGenerator
from fleet.settings import Settings
from shared.bundle.keyring import Keyring, init_keyring
from shared.telemetry.messages import Health, decode

from ..fleet.fleet_support import ADMIN, ENROLL, free_port, serve_fleet
from ..waiting import wait_for
from .rootfs import chroot_argv

DEVICE = "arm-01"
LABELS = {"site": "lab", "hw": "qemu-aarch64"}
TERMINAL = {"succeeded", "rolled_back", "aborted", "paused"}
# Under qemu-user the agent runs some 10-30x slower than natively: generous waits.
SLOW = 240.0


@dataclass
class Fleet:
    url: str
    http: httpx.Client
    keyring: Keyring
    work: Path
    health: list[Health] = field(default_factory=list)

    def upload(self, model: Path, name: str, release: int) -> int:
        out = self.work / f"{name}-r{release}.bundle"
        build_bundle(model, name=name, version=f"1.{release}", release=release, keyring=self.keyring,
                     out=out, golden_inputs=golden_inputs())
        r = self.http.post("/api/v1/bundles", content=out.read_bytes(),
                           headers={"Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
        return int(r.json()["id"])

    def rollout(self, bundle_id: int, name: str, min_inferences: int, bake_s: float = 0) -> dict[str, Any]:
        spec = {"name": name, "bundle_id": bundle_id, "selector": LABELS,
                "stages": [{"name": "all", "percent": 100, "bake_seconds": bake_s}],
                "gates": {"max_error_rate": 0.05, "min_inferences": min_inferences,
                          "max_install_failures": 0},
                "on_gate_failure": "rollback"}
        r = self.http.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert self.http.post(f"/api/v1/rollouts/{rid}/start").status_code == 200

        def finished() -> dict[str, Any] | None:
            status: dict[str, Any] = self.http.get(f"/api/v1/rollouts/{rid}").json()
            return status if status["state"] in TERMINAL else None

        status: dict[str, Any] = wait_for(finished, timeout=SLOW, what=f"rollout {name} to finish")
        for e in status["events"]:
            print(f"{e['ts']} {e['kind']}: {e['message']}")
        return status


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: Any) -> Iterator[Fleet]:
    keyring = init_keyring(tmp_path / "keys")
    settings = Settings(data_dir=tmp_path / "fleet", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
                        keys_dir=keyring.directory, admin_token=ADMIN, enrollment_token=ENROLL,
                        mqtt_url=mosquitto.url, controller_interval_s=0.25)
    received: list[Health] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="arm64-test-subscriber")

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        message = decode("health", msg.payload, device_id=DEVICE)
        assert isinstance(message, Health)
        received.append(message)

    sub.on_message = on_message
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe(f"edgefleet/v1/devices/{DEVICE}/health", qos=1)
    sub.loop_start()
    try:
        with serve_fleet(settings) as url, httpx.Client(base_url=url, timeout=30,
                                                        headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            yield Fleet(url, http, keyring, tmp_path, received)
    finally:
        sub.loop_stop()
        sub.disconnect()


@dataclass
class Device:
    api: AgentClient
    api_url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def device(arm64_root: Path, fleet: Fleet, mosquitto: Any, tmp_path: Path) -> Iterator[Device]:
    """The installed agent, started from /usr/bin/edgefleet-agent in the arm64 root as the
    package's edgefleet user, its state in a fresh /var/lib/edgefleet."""
    wipe = "rm -rf /var/lib/edgefleet/* /var/lib/edgefleet/.[!.]*"
    subprocess.run(chroot_argv(arm64_root, "sh", "-c", wipe), check=True)
    port = free_port()
    root_json = arm64_root / "etc/edgefleet/root.json"
    root_json.write_bytes(fleet.keyring.root_path.read_bytes())
    root_json.chmod(0o644)
    labels = ", ".join(f'{k} = "{v}"' for k, v in LABELS.items())
    # The packaged conffile keeps its owner and mode (root:edgefleet 0640): write into it.
    (arm64_root / "etc/edgefleet/agent.toml").write_text(
        f'device_id = "{DEVICE}"\nstate_dir = "/var/lib/edgefleet"\ntrust_root = "/etc/edgefleet/root.json"\n'
        f'[fleet]\nurl = "{fleet.url}"\nenrollment_token = "{ENROLL}"\nlabels = {{ {labels} }}\n'
        f"poll_interval_s = 1.0\n"
        f'[mqtt]\nurl = "{mosquitto.url}"\nhealth_interval_s = 1.0\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\nunix_socket = ""\n'
        # the fleet's gates judge the faulty release, not the device's own coarse trial bound
        f"[update]\ntrial_seconds = 3.0\ntrial_max_error_rate = 0.9\n")
    log = tmp_path / "agent-arm64.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(chroot_argv(arm64_root, "/usr/bin/edgefleet-agent", "--config",
                                            "/etc/edgefleet/agent.toml", "run", user="edgefleet"),
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    dev = Device(AgentClient(url=url, timeout=60), url, proc, log)
    try:
        try:
            wait_for(lambda: fleet.http.get(f"/api/v1/devices/{DEVICE}").status_code == 200, timeout=SLOW,
                     what="the arm64 agent to enroll")
        except Exception:
            print(dev.tail())
            raise
        yield dev
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        print(dev.tail())


def _machine(arm64_root: Path) -> str:
    r = subprocess.run(chroot_argv(arm64_root, "/opt/edgefleet/bin/python", "-c",
                                   "import platform; print(platform.machine())"),
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def _host_onnx(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    out: np.ndarray = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    return out


def _host_tflite(model: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    out: np.ndarray = it.get_tensor(outp["index"])
    return out


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # includes making the arm64 root when the cache is cold (~8 min)
def test_install_predict_telemetry_rollback_on_emulated_aarch64(
    arm64_root: Path, fleet: Fleet, device: Device, tmp_path: Path,
) -> None:
    assert _machine(arm64_root) == "aarch64"  # the agent's Python really is the arm64 one
    x = np.random.default_rng(7).random((5, 4), dtype=np.float32)

    # 1. a healthy ONNX release, installed through a rollout (download, verify, smoke, trial)
    healthy = tmp_path / "clf-r1.onnx"
    write_classifier(healthy, seed=0)
    traffic = TrafficGenerator(device.api_url, "clf", rate=8.0, seed=1)
    traffic.start()
    try:
        first = fleet.rollout(fleet.upload(healthy, "clf", 1), "clf r1", min_inferences=10)
        assert first["state"] == "succeeded", (first, device.tail())

        # 2. predict over the local API: aarch64 onnxruntime gives the host's numbers
        got = device.api.predict("clf", {"x": x})["probs"]
        assert device.api.last_release == 1
        np.testing.assert_allclose(got, _host_onnx(healthy, x), rtol=1e-5, atol=1e-6)

        # 3. health over MQTT from the arm64 device: the model, its release, its inferences
        def served_health() -> Health | None:
            return next((h for h in reversed(fleet.health) if any(
                m.name == "clf" and m.release == 1 and m.total_inferences > 0 for m in h.models)), None)

        health = wait_for(served_health, timeout=60, what="health over MQTT naming clf r1")
        assert health.device_id == DEVICE and health.mem_rss_mb and health.mem_rss_mb > 0

        # 4. a faulty release (fails on field traffic, passes its golden vectors): the fleet's
        # gates roll it back, and the device serves the healthy model under a new release number
        faulty = tmp_path / "clf-r2.onnx"
        write_classifier(faulty, faulty=True, seed=0)
        second = fleet.rollout(fleet.upload(faulty, "clf", 2), "clf r2 faulty", min_inferences=20, bake_s=8)
        assert second["state"] == "rolled_back", (second, device.tail())
        assert "error_rate" in (second.get("reason") or ""), second

        def healthy_again() -> int | None:
            device.api.predict("clf", {"x": x})
            release = device.api.last_release
            return release if release is not None and release > 2 else None

        reissued = wait_for(healthy_again, timeout=SLOW, what="the device to serve the healthy re-issue")
        np.testing.assert_allclose(device.api.predict("clf", {"x": x})["probs"], _host_onnx(healthy, x),
                                   rtol=1e-5, atol=1e-6)
        print(f"faulty r2 rolled back; serving re-issue r{reissued}")
    finally:
        traffic.stop()

    # 5. a TFLite release (LiteRT's aarch64 wheel), installed and answering predict
    tfl = tmp_path / "tcl-r1.tflite"
    write_tflite_classifier(tfl, seed=3)
    traffic = TrafficGenerator(device.api_url, "tcl", rate=8.0, seed=2)
    traffic.start()
    try:
        third = fleet.rollout(fleet.upload(tfl, "tcl", 1), "tcl r1", min_inferences=10)
    finally:
        traffic.stop()
    assert third["state"] == "succeeded", (third, device.tail())
    got = device.api.predict("tcl", {"x": x})["probs"]
    assert device.api.last_release == 1
    np.testing.assert_allclose(got, _host_tflite(tfl, x), rtol=1e-5, atol=1e-6)


RATIO_SCRIPT = """
import json, sys, time
import numpy as np, onnxruntime as ort
x = np.random.default_rng(0).random((8, 512), dtype=np.float32)
out = {}
for name in ("float", "int8"):
    s = ort.InferenceSession(f"/tmp/ratio-{name}.onnx", providers=["CPUExecutionProvider"])
    s.run(None, {"x": x})
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            y = s.run(None, {"x": x})[0]
        best = min(best, (time.perf_counter() - t) / 20)
    out[name] = {"ms": best * 1000, "y": y[:2].tolist()}
json.dump(out, sys.stdout)
"""


def _mlp(path: Path, width: int = 512, layers: int = 4) -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        weights = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(weights, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        prev = f"r{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", width]) for n in ("x", prev)]
    graph = helper.make_graph(nodes, "mlp", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


@pytest.mark.timeout(1800)
def test_quantized_vs_float_under_emulation(arm64_root: Path, tmp_path: Path,
                                            report_figure: Callable[[str], None]) -> None:
    """The int8 (dynamic) and float MLP on the device's onnxruntime: int8 agrees with float, and
    the latency ratio is recorded, labelled what it is: emulated, not a speed figure (qemu-user
    translates NEON/dot-product code; no VNNI on arm64; a real board's ratio differs)."""
    from fleet.bundles.quantize import quantize

    _mlp(tmp_path / "float.onnx")
    quantize(tmp_path / "float.onnx", tmp_path / "int8.onnx", "dynamic")
    for name in ("float", "int8"):
        (arm64_root / f"tmp/ratio-{name}.onnx").write_bytes((tmp_path / f"{name}.onnx").read_bytes())
    r = subprocess.run(chroot_argv(arm64_root, "/opt/edgefleet/bin/python", "-c", RATIO_SCRIPT),
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    y_float, y_int8 = np.array(got["float"]["y"]), np.array(got["int8"]["y"])
    assert np.abs(y_float - y_int8).max() <= 0.1 * np.abs(y_float).max(), "int8 strays from float on aarch64"
    ratio = got["int8"]["ms"] / got["float"]["ms"]
    figure = {"label": "emulated, not a speed figure", "machine": "aarch64 under qemu-user",
              "model": "MLP 4x512x512, batch 8", "float_ms": round(got["float"]["ms"], 3),
              "int8_ms": round(got["int8"]["ms"], 3), "int8_over_float": round(ratio, 3)}
    report_figure(f"int8/float latency ratio on aarch64: {json.dumps(figure)}")
    assert ratio > 0
