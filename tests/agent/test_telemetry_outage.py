"""Store-and-forward against a real Mosquitto: a broker outage loses nothing, a tiny spool
drops the oldest health (never events) and says so, and the spool survives kill -9 of a real
agent process."""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.cli import main as cli_main
from agent.runtime.host import ModelHost
from agent.telemetry.reporter import Reporter
from agent.telemetry.spool import SPOOL_DIR, read_all
from shared.bundle.keyring import Keyring
from shared.telemetry import messages, topics

from .conftest import Bundles, make_rig

REPO = Path(__file__).resolve().parents[2]
SPOOLED = ("health", "event")


def make_persistent(broker: Any, directory: Path) -> None:
    """Restart the fixture's broker with persistence, so a subscriber's session (and the QoS 1
    messages queued for it) outlives a broker restart, like a production broker's."""
    broker.stop()
    directory.mkdir(exist_ok=True)
    text = broker.conf.read_text().replace("persistence false\n", "")
    broker.conf.write_text(
        text + f"persistence true\npersistence_location {directory}/\nuser {getpass.getuser()}\n"
    )
    broker.start()


class Subscriber:
    """A persistent-session subscriber recording every message of one device, duplicates included."""

    def __init__(self, broker: Any, device: str, client_id: str = "watcher") -> None:
        self.got: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.PREFIX}/{device}/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        _, kind = topics.parse_topic(msg.topic)
        if kind != "desired":
            with self.lock:
                self.got.append((kind, messages.decode(kind, msg.payload)))

    def messages(self, kinds: tuple[str, ...] = ("status", *SPOOLED)) -> list[tuple[str, Any]]:
        with self.lock:
            return [(k, m) for k, m in self.got if k in kinds]

    def wait(self, pred: Callable[[list[tuple[str, Any]]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.messages()):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got seqs {first_seen(self.messages())}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_seen(got: list[tuple[str, Any]], kinds: tuple[str, ...] = SPOOLED) -> list[int]:
    """Seqs of ``kinds`` in order of first arrival (QoS 1 may deliver a message twice)."""
    seen: dict[int, None] = {}
    for kind, msg in got:
        if kind in kinds:
            seen.setdefault(msg.seq, None)
    return list(seen)


def missing(got: list[tuple[str, Any]], start: int, end: int) -> set[int]:
    return set(range(start, end + 1)) - {m.seq for _k, m in got}


@pytest.fixture
def persistent_broker(mosquitto: Any, tmp_path: Path) -> Any:
    make_persistent(mosquitto, tmp_path / "broker-db")
    return mosquitto


@pytest.fixture
def watcher(persistent_broker: Any) -> Iterator[Subscriber]:
    sub = Subscriber(persistent_broker, "dev-o")
    yield sub
    sub.close()


def test_outage_loses_nothing(persistent_broker: Any, watcher: Subscriber, bundles: Bundles,
                              keyring: Keyring, tmp_path: Path) -> None:
    rig = make_rig(tmp_path / "state", keyring)
    rig.installer.install_file(bundles.build(1))
    rep = Reporter(device_id="dev-o", mqtt_url=persistent_broker.url, state_dir=rig.state_dir,
                   host=rig.host, health_interval_s=0.2, keepalive_s=5)
    rep.client.reconnect_delay_set(min_delay=1, max_delay=1)  # keep the test short
    stop_traffic = threading.Event()

    def traffic() -> None:
        rng = np.random.default_rng(3)
        while not stop_traffic.wait(0.01):
            rig.host.predict("clf", {"x": rng.random((2, 4), dtype=np.float32)})

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    rep.start()
    try:
        assert rep.connected.wait(10)
        watcher.wait(lambda got: len(first_seen(got)) >= 3, 10, "health before the outage")
        persistent_broker.stop()
        rep.event("clf", "download_started", 2, 1)
        time.sleep(1.2)
        rep.event("clf", "failed", 2, 1, "download", "connection refused")
        time.sleep(1.2)
        outage_seq = rep.seq.next()  # a marker (never sent): messages above it came after the outage
        persistent_broker.start()
        watcher.wait(lambda got: any(m.seq > outage_seq for k, m in got if k == "health"), 15,
                     "health made after the broker came back")
        assert rep.flush(10)
    finally:
        stop_traffic.set()
        worker.join(5)
        rep.stop()
    watcher.wait(lambda got: any(k == "status" and not m.online for k, m in got), 5, "clean offline")

    got = watcher.messages()
    seqs = first_seen(got)
    assert seqs == sorted(seqs), "health and events arrive in seq order"
    assert seqs[-1] > outage_seq > seqs[0]
    # Every seq from the first to the last message is there (status included), except the
    # will's, which only a lost connection would have published, and the test's marker.
    everything = [m.seq for _k, m in got]
    assert missing(got, min(everything), max(everything)) <= {rep.will_seq, outage_seq}
    kinds = [m.kind for k, m in got if k == "event"]
    assert kinds[:2] == ["download_started", "failed"]
    healths = [m for k, m in got if k == "health"]
    assert sum(h.models[0].inferences for h in {h.seq: h for h in healths}.values()) > 50
    assert all(h.dropped == 0 for h in healths)
    assert max(h.spooled for h in healths) >= 5  # the outage's backlog was reported
    assert not list((rig.state_dir / SPOOL_DIR).glob("*.tmp"))


def test_tiny_spool_drops_oldest_health_keeps_events(persistent_broker: Any, watcher: Subscriber,
                                                      tmp_path: Path) -> None:
    persistent_broker.stop()  # the device starts while the broker is away
    rep = Reporter(device_id="dev-o", mqtt_url=persistent_broker.url, state_dir=tmp_path / "state",
                   host=ModelHost(), health_interval_s=0.03, keepalive_s=5, spool_max_bytes=4096)
    rep.client.reconnect_delay_set(min_delay=1, max_delay=1)  # keep the test short
    rep.start()
    try:
        for i in range(4):
            time.sleep(0.35)
            rep.event("clf", "failed", 10 + i, 9, "download", f"attempt {i}")
        time.sleep(0.3)
        stats = rep.spool.stats()
        assert stats.dropped["health"] > 10 and stats.dropped["event"] == 0
        assert stats.bytes <= 4096
        persistent_broker.start()
        assert rep.connected.wait(10)
        assert rep.flush(10)
        last = rep.seq.next()
        watcher.wait(lambda got: any(k == "health" and m.seq > last for k, m in got), 10,
                     "health after the drain")
    finally:
        rep.stop()
    got = watcher.messages()
    events = [m for k, m in got if k == "event"]
    assert [e.message for e in events] == [f"attempt {i}" for i in range(4)]  # every event, in order
    seqs = first_seen(got)
    assert seqs == sorted(seqs)
    healths = sorted({m.seq: m for k, m in got if k == "health"}.values(), key=lambda h: h.seq)
    latest = healths[-1]
    # The first health messages were dropped; the ones that made it are the newest; the
    # count of what was dropped comes in the next health and matches the gaps exactly.
    assert latest.dropped_health > 10 and latest.dropped_events == 0
    assert latest.dropped == latest.dropped_health
    # Seqs start at the will's (the reporter's first number); every gap is a counted drop.
    gaps = missing(got, rep.will_seq + 1, max(m.seq for _k, m in got)) - {last}
    assert len(gaps) == latest.dropped_health
    assert min(gaps) < events[0].seq  # the oldest went first
    assert all(h.dropped_health <= latest.dropped_health for h in healths)


def _agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def test_spool_survives_kill_9(mosquitto: Any, bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-k"\nstate_dir = "{state}"\ntrust_root = "{keyring.root_path}"\n'
        f'[mqtt]\nurl = "{mosquitto.url}"\nhealth_interval_s = 0.2\nkeepalive_s = 5\n'
        '[api]\nlisten = "127.0.0.1:0"\n'
    )
    assert cli_main(["--config", str(cfg), "install", str(bundles.build(1))]) == 0
    mosquitto.stop()  # offline: everything the agent reports goes to its spool
    log = tmp_path / "agent.log"
    proc = _agent(cfg, log)
    spool = state / SPOOL_DIR
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sum(p.stat().st_size for p in spool.glob("*.seg")) > 3000:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"nothing spooled: {log.read_text()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = [messages.decode(kind, payload) for kind, payload in read_all(spool)]
    assert len(before) >= 5 and all(isinstance(m, messages.Health) for m in before)
    assert [m.seq for m in before] == sorted(m.seq for m in before)
    assert before[0].models[0].name == "clf"

    mosquitto.start()
    sub = Subscriber(mosquitto, "dev-k", client_id="watcher-k")
    proc = _agent(cfg, log)
    try:
        want = {m.seq for m in before}
        sub.wait(lambda got: want <= {m.seq for k, m in got if k == "health"}
                 and any(m.seq > max(want) for k, m in got if k == "health"), 20,
                 "the health spooled before kill -9")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()
    seqs = first_seen(sub.messages())
    assert seqs == sorted(seqs) and seqs[: len(before)] == [m.seq for m in before]
    assert "Traceback" not in log.read_text()
