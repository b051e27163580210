"""The agent's view of its links, to the fleet (HTTP) and to the broker (MQTT), for
``edgefleet-agent status`` and the local API's ``GET /v1/status``.

- The running agent keeps one ``ConnectionState``. The update worker reports each
  desired-state pull (``fleet_ok`` / ``fleet_failed``); the MQTT session is read through a
  probe (connected, last error) by a monitor thread once a second, which notes when it
  changed (so "since" is right to a second without touching the session's own code).
- On every change the state is written to ``state_dir/connection.json`` (temp file and
  rename, no fsync: it is a view, not a record worth flash wear), so ``status`` run in
  another process reads it, with the writer's pid to tell a stopped agent's last view.
- Enrollment is read from the credential file the fleet client keeps (``device.json``);
  no secret leaves it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

CONNECTION_FILE = "connection.json"
DEVICE_FILE = "device.json"  # agent.fleet_client.DEVICE_FILE (not imported: it pulls httpx)
PROBE_INTERVAL_S = 1.0

# (connected, last error) of the MQTT session; None while no session was started
BrokerProbe = Callable[[], "tuple[bool, str | None] | None"]


class FleetLink(msgspec.Struct):
    url: str | None = None  # None: an offline agent (no [fleet])
    reachable: bool | None = None  # None: not tried yet
    last_contact: float | None = None  # unix time of the last answered desired-state pull
    last_error: str | None = None
    last_error_at: float | None = None


class BrokerLink(msgspec.Struct):
    url: str | None = None  # None: no session started (no URL yet, or no [mqtt])
    connected: bool = False
    since: float | None = None  # unix time it last became connected or disconnected
    last_error: str | None = None


class Enrollment(msgspec.Struct):
    enrolled: bool = False
    device_id: str | None = None
    fleet_url: str | None = None
    mqtt_url: str | None = None
    at: float | None = None  # when the credential was last written (enrolment or rotation)


class ConnectionView(msgspec.Struct):
    fleet: FleetLink
    broker: BrokerLink
    pid: int | None = None
    written_at: float | None = None


def read_enrollment(state_dir: Path) -> Enrollment:
    path = Path(state_dir) / DEVICE_FILE
    try:
        raw = msgspec.json.decode(path.read_bytes())
        at = path.stat().st_mtime
    except (OSError, msgspec.DecodeError):
        return Enrollment()
    if not isinstance(raw, dict):
        return Enrollment()
    return Enrollment(enrolled=bool(raw.get("credential")), device_id=raw.get("device_id"),
                      fleet_url=raw.get("fleet_url"), mqtt_url=raw.get("mqtt_url"), at=at)


def read_view(state_dir: Path) -> ConnectionView | None:
    """What the agent last wrote, or None when it never ran with this state_dir."""
    try:
        return msgspec.json.decode((Path(state_dir) / CONNECTION_FILE).read_bytes(), type=ConnectionView)
    except (OSError, msgspec.DecodeError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (status run as an operator, agent as its own user)
    return True


class ConnectionState:
    """Thread-safe; every change is written to ``state_dir/connection.json``."""

    def __init__(self, state_dir: Path, *, fleet_url: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / CONNECTION_FILE
        self.clock = clock
        self._lock = threading.Lock()
        self._fleet = FleetLink(url=fleet_url)
        self._broker = BrokerLink()
        self._last_probe: tuple[str | None, bool, str | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reports ------------------------------------------------------------------------

    def fleet_ok(self) -> None:
        with self._lock:
            self._fleet.reachable = True
            self._fleet.last_contact = self.clock()
            self._save()

    def fleet_failed(self, error: BaseException | str) -> None:
        with self._lock:
            self._fleet.reachable = False
            self._fleet.last_error = str(error)
            self._fleet.last_error_at = self.clock()
            self._save()

    def observe_broker(self, url: str | None, probe: tuple[bool, str | None] | None) -> None:
        """Note the session's state as read now; writes only when it changed."""
        connected, error = probe if probe is not None else (False, None)
        with self._lock:
            if (url, connected, error) == self._last_probe:
                return
            self._last_probe = (url, connected, error)
            b = self._broker
            if b.connected != connected or b.since is None:
                b.since = self.clock()
            b.url, b.connected = url, connected
            if error is not None:  # the session clears its error on connecting; the view keeps it
                b.last_error = error
            self._save()

    # -- reading ------------------------------------------------------------------------

    def view(self) -> ConnectionView:
        with self._lock:
            return ConnectionView(fleet=msgspec.structs.replace(self._fleet),
                                  broker=msgspec.structs.replace(self._broker),
                                  pid=os.getpid(), written_at=self.clock())

    # -- the monitor --------------------------------------------------------------------

    def start_monitor(self, probe: Callable[[], tuple[str | None, tuple[bool, str | None] | None]],
                      interval_s: float = PROBE_INTERVAL_S) -> None:
        """Read ``probe`` (broker URL, session state) every ``interval_s`` in a daemon thread."""
        def run() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):  # a view must never take the agent down
                    self.observe_broker(*probe())
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=run, name="connection-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _save(self) -> None:
        view = ConnectionView(fleet=self._fleet, broker=self._broker, pid=os.getpid(),
                              written_at=self.clock())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(view))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only or full state dir: the local API still answers from memory


def status_document(state_dir: Path, live: ConnectionState | None = None) -> dict[str, Any]:
    """enrollment, fleet, broker and whether the agent runs: ``live`` (in the agent) or the
    file the agent wrote (``status`` in another process)."""
    view = live.view() if live is not None else read_view(state_dir)
    doc: dict[str, Any] = {"enrollment": msgspec.to_builtins(read_enrollment(state_dir))}
    if view is None:
        doc.update(agent_running=False, fleet=None, broker=None, as_of=None)
    else:
        doc.update(agent_running=live is not None or pid_alive(view.pid),
                   fleet=msgspec.to_builtins(view.fleet), broker=msgspec.to_builtins(view.broker),
                   as_of=view.written_at)
    return doc


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return f"{stamp} ({max(0, int(now - ts))} s ago)"


def status_lines(doc: dict[str, Any], now: float | None = None) -> list[str]:
    """``status_document`` for a person: one line per link, the error on its own line."""
    now = time.time() if now is None else now
    out = []
    en = doc["enrollment"]
    if en["enrolled"]:
        out.append(f"enrollment: device {en['device_id']} enrolled at {en['fleet_url']}, "
                   f"credential written {_when(en['at'], now)}")
    else:
        out.append("enrollment: not enrolled (the agent enrolls at its first start, "
                   "with fleet.enrollment_token)")
    if doc["fleet"] is None:
        out.append("agent: has not run with this state_dir; no connection state yet")
        return out
    if not doc["agent_running"]:
        out.append(f"agent: not running; its last view, as of {_when(doc['as_of'], now)}:")
    fl = doc["fleet"]
    if fl["url"] is None:
        out.append("fleet: none configured (offline agent)")
    else:
        state = {True: "reachable", False: "unreachable", None: "not tried yet"}[fl["reachable"]]
        out.append(f"fleet {fl['url']}: {state}, last contact {_when(fl['last_contact'], now)}")
        if fl["last_error"]:
            out.append(f"  last error {_when(fl['last_error_at'], now)}: {fl['last_error']}")
    br = doc["broker"]
    if br["url"] is None:
        out.append("broker: no session (no MQTT URL yet: [mqtt] url or the fleet's enrollment answer)")
    else:
        state = "connected" if br["connected"] else "disconnected"
        out.append(f"broker {br['url']}: {state} since {_when(br['since'], now)}")
        if br["last_error"]:
            out.append(f"  last error: {br['last_error']}")
    return out
