"""``edgefleet-agent doctor``: one line per check, ok or FAIL with the fix.

Checks what stands between a device and a working agent, in the order an operator would
fix them: config, trust root, state directory and its disk, spool, fleet (reachable, token
accepted, clock), broker (reachable, login accepted). Read-only, except that it never takes
the broker login while the agent runs (with ``use_username_as_clientid`` a second login as
the device would take the running agent's connection over): then the agent's own
connection state is what counts (``edgefleet-agent status``).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AgentConfig
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    import ssl

    from paho.mqtt.reasoncodes import ReasonCode

# The fleet's clock and the device's may differ this much before expiry checks suffer
MAX_CLOCK_SKEW_S = 60.0
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<10} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.fix and not self.ok else "")


def check_trust_root(config: AgentConfig) -> Check:
    from agent.main import load_trust_root

    try:
        root = load_trust_root(config.trust_root, config.state_dir)
    except EdgefleetError as exc:
        return Check("trust", False, str(exc),
                     f"copy the fleet's root.json (edgefleet keys init) to {config.trust_root}")
    return Check("trust", True, f"{config.trust_root}: root version {root.version}")


def check_state_dir(config: AgentConfig) -> Iterator[Check]:
    state = config.state_dir
    if not state.is_dir():
        yield Check("state", False, f"{state} does not exist",
                    f"mkdir -p {state} && chown edgefleet: {state} (the .deb makes it)")
        return
    if not os.access(state, os.W_OK | os.X_OK):
        yield Check("state", False, f"{state} is not writable by uid {os.getuid()}",
                    f"chown edgefleet: {state}, or run doctor as the agent's user")
    else:
        yield Check("state", True, f"{state} writable")
    free_mb = shutil.disk_usage(state).free / 2**20
    margin = config.update.disk_margin_mb
    yield Check("disk", free_mb > margin, f"{free_mb:.0f} MB free under {state} (margin {margin:g} MB)",
                "free space on that file system; an update needs room for its files and the margin")


def check_spool(config: AgentConfig) -> Check:
    from agent.telemetry.spool import SPOOL_DIR

    spool = config.state_dir / SPOOL_DIR
    used = sum(f.stat().st_size for f in spool.glob("*") if f.is_file()) if spool.is_dir() else 0
    bound = config.mqtt.spool_max_bytes
    return Check("spool", used < bound, f"{used} of {bound} bytes used (telemetry waiting for the broker)",
                 "the broker has been unreachable; fix the broker check below (oldest health is dropped "
                 "first when full)")


def check_fleet(config: AgentConfig) -> Iterator[Check]:
    """Reachable, the stored credential accepted, and the clocks close."""
    import httpx

    from agent.fleet_client import DEVICE_FILE, Credential

    assert config.fleet is not None
    url = config.fleet.url
    with httpx.Client(timeout=TIMEOUT_S) as http:
        try:
            r = http.get(f"{url}/healthz")
        except httpx.HTTPError as exc:
            yield Check("fleet", False, f"{url} unreachable: {exc}",
                        "check fleet.url, DNS, the network and any proxy; the fleet must be running")
            return
        yield Check("fleet", r.status_code == 200, f"{url} answered HTTP {r.status_code}",
                    "the fleet is up but unhealthy: see its logs")
        date = r.headers.get("date")
        if date:
            from email.utils import parsedate_to_datetime

            skew = time.time() - parsedate_to_datetime(date).timestamp()
            yield Check("clock", abs(skew) < MAX_CLOCK_SKEW_S, f"{skew:+.0f} s from the fleet's clock",
                        "enable time sync (systemd-timesyncd or chrony); bundle expiry needs a sane clock")
        device_file = config.state_dir / DEVICE_FILE
        if not device_file.exists():
            yield Check("enrolled", bool(config.fleet.enrollment_token),
                        f"not enrolled yet ({device_file} absent); the agent enrolls on start",
                        "set fleet.enrollment_token to the fleet's enroll.token")
            return
        import msgspec

        try:
            cred = msgspec.json.decode(device_file.read_bytes(), type=Credential)
        except (OSError, msgspec.DecodeError) as exc:
            yield Check("enrolled", False, f"{device_file} unreadable: {exc}",
                        f"remove {device_file}; the agent enrolls again on start")
            return
        r = http.get(f"{url}/api/v1/devices/{cred.device_id}/desired",
                     headers={"Authorization": f"Bearer {cred.credential}"})
        yield Check("token", r.status_code in (200, 304),
                    f"the fleet answered HTTP {r.status_code} to device {cred.device_id}'s credential",
                    "the device was revoked or deleted at the fleet: an operator approves its "
                    f"re-enrollment (edgefleet device approve {cred.device_id})")
        yield from check_broker(config, cred.mqtt_url if not config.mqtt.url else config.mqtt.url,
                                cred.device_id, cred.broker_password)


def check_broker(config: AgentConfig, url: str | None, username: str | None,
                 password: str | None) -> Iterator[Check]:
    from agent.telemetry.connection import mqtt_tls, parse_mqtt_url

    if not url:
        yield Check("broker", False, "no MQTT URL in the config nor from the fleet",
                    "set mqtt.url, or the fleet's --public-mqtt-url")
        return
    address = parse_mqtt_url(url)
    if username is None:  # a broker login in the URL (agents without a fleet)
        username, password = address.username, address.password
    where = f"{'mqtts' if address.tls else 'mqtt'}://{address.host}:{address.port}"
    try:
        with socket.create_connection((address.host, address.port), timeout=TIMEOUT_S) as sock:
            if address.tls:
                ctx = mqtt_tls(config.mqtt).context()
                with ctx.wrap_socket(sock, server_hostname=address.host):
                    pass
    except OSError as exc:
        yield Check("broker", False, f"{where} unreachable: {exc}",
                    "check the broker is running, the port, the firewall; for TLS mqtt.ca_file")
        return
    yield Check("broker", True, f"{where} reachable" + (" (TLS verified)" if address.tls else ""))
    if agent_running(config):
        yield Check("login", True, "not tried: the running agent holds the device's connection "
                    "(edgefleet-agent status shows its state)")
        return
    code = mqtt_login(address.host, address.port, mqtt_tls(config.mqtt).context() if address.tls else None,
                      username or config.device_id or "doctor", password)
    yield Check("login", code == 0, f"{where} answered CONNACK {code} to user {username}",
                "the broker refused the device's password: the agent fetches a new one on start "
                "(enrolled devices), or the broker's password file misses it")


def agent_running(config: AgentConfig) -> bool:
    from agent.errors import StateError
    from agent.update.store import StateStore

    store = StateStore(config.state_dir)
    try:
        store.acquire()
    except (StateError, OSError):
        return True
    store.release()
    return False


def mqtt_login(host: str, port: int, tls: ssl.SSLContext | None, username: str, password: str | None) -> int:
    """The CONNACK return code of an MQTT 3.1.1 login (-1: no answer)."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion  # loaded by paho.mqtt.client already

    answer: list[int] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    if tls:
        client.tls_set_context(tls)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object = None) -> None:
        answer.append(rc.value)  # CallbackAPIVersion.VERSION2: always a ReasonCode
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return -1
    client.loop_start()
    done.wait(TIMEOUT_S)
    client.disconnect()
    client.loop_stop()
    return answer[0] if answer else -1


def run_checks(config: AgentConfig, config_path: Path) -> Iterator[Check]:
    yield Check("config", True, f"{config_path} (device {config.device_id or 'unset: offline only'})")
    yield check_trust_root(config)
    yield from check_state_dir(config)
    if config.mqtt_enabled or config.fleet is not None:
        yield check_spool(config)
    if config.fleet is not None:
        yield from check_fleet(config)
    elif config.mqtt_enabled and config.mqtt.url:
        yield from check_broker(config, config.mqtt.url, None, None)


def doctor(load: Callable[[], AgentConfig], config_path: Path, out: Callable[[str], None]) -> int:
    """Print every check; 0 when all are ok, 1 otherwise."""
    from agent.errors import ConfigError

    try:
        config = load()
    except ConfigError as exc:
        out(Check("config", False, str(exc), f"edit {config_path}").line())
        return 1
    failed = 0
    for check in run_checks(config, config_path):
        out(check.line())
        failed += not check.ok
    out(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0
