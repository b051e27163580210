"""packaging/mosquitto/reload-on-change.sh, the broker's reloader sidecar on Kubernetes, run
for real: beside a real Mosquitto, watching the password file the fleet's own writer
changes (no reload command, as in the API's pods); a new device's login is then accepted,
and a revoked device's live session is ended, without anyone signalling the broker but the
script."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fleet.broker.passwords import BrokerPasswordFile

from ..conftest import free_port, mosquitto_binary
from .conftest import PACKAGING

SCRIPT = PACKAGING / "mosquitto" / "reload-on-change.sh"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def connect(port: int, user: str, password: str) -> tuple[mqtt.Client, threading.Event, list[int]]:
    """A client logging in as ``user``; the event is set once the broker answered, the list
    holds its reason code (0: accepted)."""
    answered, codes = threading.Event(), []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    client.username_pw_set(user, password)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        codes.append(rc.value)
        answered.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client, answered, codes


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def login_accepted(port: int, user: str, password: str) -> bool:
    client, answered, codes = connect(port, user, password)
    try:
        answered.wait(5)
        return codes == [0]
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def broker_and_reloader(tmp_path: Path) -> Iterator[tuple[int, BrokerPasswordFile]]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto (Debian package 'mosquitto')")
    # a process name of its own, so the script signals this broker and no other on the machine
    name = f"mosq-{secrets.token_hex(4)}"
    (tmp_path / name).symlink_to(binary)
    passwd = tmp_path / "devices" / "edgefleet.passwd"
    passwd.parent.mkdir()
    passwd.touch(mode=0o600)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""  # as root it would drop to "mosquitto"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                    f"persistence false\n{user}")
    broker = subprocess.Popen([str(tmp_path / name), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    reloader = subprocess.Popen(["sh", str(SCRIPT), str(passwd), name, "0.2"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _listening(port), "the broker to listen")
        assert reloader.stdout is not None
        first = reloader.stdout.readline()  # printed once it took the file's first state
        assert first.startswith("reload-on-change: watching"), first
        yield port, BrokerPasswordFile(passwd)
    finally:
        reloader.terminate()
        broker.terminate()
        broker.wait(10)
        out = reloader.communicate(timeout=10)[0]
        assert broker.returncode in (0, -15), out
    assert f"sent SIGHUP to {name}" in out, out  # the script, nobody else, reloaded the broker


def test_a_new_login_is_accepted_and_a_revoked_session_ended(
    broker_and_reloader: tuple[int, BrokerPasswordFile],
) -> None:
    port, passwords = broker_and_reloader
    assert not login_accepted(port, "dev-1", "pw-1")
    passwords.set("dev-1", "pw-1")
    wait_for(lambda: login_accepted(port, "dev-1", "pw-1"), "the broker to reload the new login")

    client, answered, codes = connect(port, "dev-1", "pw-1")
    gone = threading.Event()
    client.on_disconnect = lambda *_a: gone.set()
    try:
        assert answered.wait(5) and codes == [0]
        passwords.revoke("dev-1")
        assert gone.wait(20), "the revoked device's session went on"
        assert not login_accepted(port, "dev-1", "pw-1")
    finally:
        client.loop_stop()
