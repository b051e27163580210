"""Telemetry against a real Mosquitto: birth, health, events, last will after kill -9,
sequence numbers across restarts, desired-state notices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest

from agent.cli import main as cli_main
from agent.runtime.host import ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from agent.telemetry.reporter import Reporter
from agent.telemetry.sequence import SeqCounter
from agent.update.blobs import BlobStore
from agent.update.installer import Installer
from agent.update.store import StateStore
from shared.bundle.keyring import Keyring
from shared.telemetry import messages, topics

from .conftest import Bundles

REPO = Path(__file__).resolve().parents[2]


class Listener:
    """A subscriber recording (kind, retained, message) for one device."""

    def __init__(self, url: str, device: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.got: list[tuple[str, bool, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.PREFIX}/{device}/#", qos=1)
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        _, kind = topics.parse_topic(msg.topic)
        if kind == "desired":
            return
        with self.lock:
            self.got.append((kind, bool(msg.retain), messages.decode(kind, msg.payload)))

    def find(self, pred: Callable[[str, bool, Any], bool]) -> list[tuple[str, bool, Any]]:
        with self.lock:
            return [g for g in self.got if pred(*g)]

    def wait(self, pred: Callable[[str, bool, Any], bool], timeout: float = 10.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(pred)
            if found:
                return found[-1][2]
            time.sleep(0.05)
        raise AssertionError(f"no {what} message; got {[(k, r) for k, r, _ in self.got]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def offline_config(tmp_path: Path, keyring: Keyring, mosquitto: Any) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-7"\nstate_dir = "{tmp_path / "state"}"\ntrust_root = "{keyring.root_path}"\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\nhealth_interval_s = 0.3\nkeepalive_s = 5\n'
        '[api]\nlisten = "127.0.0.1:0"\n'
    )
    return cfg


def _start_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


@pytest.fixture
def listener(mosquitto: Any) -> Iterator[Listener]:
    lst = Listener(mosquitto.url, "dev-7")
    yield lst
    lst.close()


def test_birth_health_will_and_seq_across_restart(offline_config: Path, bundles: Bundles, mosquitto: Any,
                                                  listener: Listener, tmp_path: Path) -> None:
    assert cli_main(["--config", str(offline_config), "install", str(bundles.build(1))]) == 0
    log = tmp_path / "agent.log"
    proc = _start_agent(offline_config, log)
    try:
        birth = listener.wait(lambda k, r, m: k == "status" and m.online, what="birth")
        assert birth.agent_version == "0.1.0" and birth.device_id == "dev-7"
        health = listener.wait(lambda k, r, m: k == "health" and m.models, what="health")
        assert health.models[0].name == "clf" and health.models[0].release == 1
        assert health.models[0].state == "committed" and health.mem_rss_mb > 0 and health.disk_free_mb > 0
        listener.wait(lambda k, r, m: k == "health" and m.seq > health.seq, what="second health")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        will = listener.wait(lambda k, r, m: k == "status" and not m.online, what="last will")
        assert will.device_id == "dev-7"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A late subscriber sees the device offline (retained).
    late = Listener(mosquitto.url, "dev-7")
    try:
        assert late.wait(lambda k, r, m: k == "status", what="retained status").online is False
        assert late.find(lambda k, r, m: k == "status")[0][1] is True
    finally:
        late.close()
    seqs = [m.seq for k, _, m in listener.got if k != "status" or m.online]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # Restart: sequence numbers continue above everything sent before; SIGTERM is clean.
    proc = _start_agent(offline_config, log)
    try:
        birth2 = listener.wait(lambda k, r, m: k == "status" and m.online and m.seq > max(seqs),
                               what="second birth")
        assert birth2.seq > max(seqs)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    offline = listener.wait(lambda k, r, m: k == "status" and not m.online and m.seq > birth2.seq,
                            what="clean offline")
    assert offline.online is False
    text = log.read_text()
    assert "Traceback" not in text and "started" in text


def test_events_and_desired_notice(mosquitto: Any, listener: Listener, tmp_path: Path) -> None:
    pulled = threading.Event()
    rep = Reporter(device_id="dev-7", mqtt_url=mosquitto.url, state_dir=tmp_path, host=ModelHost(),
                   on_desired=pulled.set, health_interval_s=60)
    rep.start()
    try:
        assert rep.connected.wait(10)
        rep.event("clf", "failed", 4, 3, "hash", "file hash differs")
        ev = listener.wait(lambda k, r, m: k == "event", what="event")
        assert (ev.kind, ev.release, ev.from_release, ev.reason) == ("failed", 4, 3, "hash")
        pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        pub.connect(*rep.broker)
        pub.loop_start()
        pub.publish(topics.topic("dev-7", "desired"), b"garbage", qos=1).wait_for_publish(5)
        time.sleep(0.3)
        assert not pulled.is_set()
        notice = messages.DesiredNotice(v=1, generation=2, ts=time.time())
        pub.publish(topics.topic("dev-7", "desired"), messages.encode(notice), qos=1).wait_for_publish(5)
        assert pulled.wait(5)
        pub.loop_stop()
        pub.disconnect()
    finally:
        rep.stop()


def test_health_carries_each_model_s_last_published_event(
    mosquitto: Any, listener: Listener, tmp_path: Path, keyring: Keyring, bundles: Bundles
) -> None:
    """Events that reached the broker can still miss the fleet (shared subscriptions do not
    survive a Mosquitto restart): every health repeats each model's latest event."""
    host = ModelHost()
    rep = Reporter(device_id="dev-7", mqtt_url=mosquitto.url, state_dir=tmp_path / "state", host=host,
                   health_interval_s=3600, encoding="msgpack")
    # The installer emits its lifecycle events into the reporter, as agent.main wires them.
    installer = Installer(store=StateStore(tmp_path / "state"), blobs=BlobStore(tmp_path / "state"),
                          host=host, trust_root=keyring.trust_root(), backend=OnnxBackend(), emit=rep.event)
    rep.start()
    try:
        assert rep.connected.wait(10)
        assert rep.health().models == []  # nothing loaded yet
        installer.install_file(bundles.build(1))
        rep.publish_health()
        health = listener.wait(lambda k, r, m: k == "health" and m.models, what="health")
        events = [m for k, _, m in listener.find(lambda k, r, m: k == "event")]
        assert [e.kind for e in events][-1] == "committed"
        last = events[-1]
        (model,) = health.models
        assert model.name == "clf" and model.last_event == messages.LastEvent(
            seq=last.seq, ts=last.ts, kind="committed", release=1, from_release=last.from_release,
            reason=None)
        assert last.seq < health.seq
        # A later event replaces it (per model; one for a model not loaded carries no health).
        rep.event("clf", "rolled_back", 1, 2, "trial_errors", "error rate 0.4 in trial")
        rep.event("other", "failed", 3, None, "hash", "file hash differs")
        rep.publish_health()
        health2 = listener.wait(lambda k, r, m: k == "health" and m.seq > health.seq, what="second health")
        back = listener.wait(lambda k, r, m: k == "event" and m.kind == "rolled_back", what="rolled_back")
        assert [m.name for m in health2.models] == ["clf"]
        assert health2.models[0].last_event == messages.LastEvent(
            seq=back.seq, ts=back.ts, kind="rolled_back", release=1, from_release=2, reason="trial_errors")
        assert rep.last_events()["other"].kind == "failed"
    finally:
        rep.stop()


def test_seq_counter_persists_blocks(tmp_path: Path) -> None:
    a = SeqCounter(tmp_path / "seq.json", block=10)
    used = [a.next() for _ in range(25)]
    assert used == list(range(25))
    b = SeqCounter(tmp_path / "seq.json", block=10)
    assert b.next() >= 25
    (tmp_path / "seq.json").write_bytes(b"{garbage")
    c = SeqCounter(tmp_path / "seq.json", block=10)
    assert c.next() > 1_000_000_000  # continues from the clock, never restarts at 0
    assert msgspec.json.decode((tmp_path / "seq.json").read_bytes())["reserved"] > 0
