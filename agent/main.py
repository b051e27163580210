"""The agent assembled in one place: config -> state -> model host -> installer -> API ->
reporter -> desired-state loop. A test builds the same parts with other settings.

Threads: the API serves requests in its own threads; one update worker polls the
desired state (every poll_interval_s, and at once on an MQTT notice), installs, and
judges trials, so an update never blocks inference; paho runs the MQTT network loop;
the main thread waits for SIGTERM/SIGINT and pings the systemd watchdog.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import httpx

from agent import __version__, sdnotify
from agent.api.server import ApiServer
from agent.config import AgentConfig
from agent.errors import ConfigError, StateError
from agent.fleet_client import FleetClient
from agent.runtime.base import Backend
from agent.runtime.batching import BatchPolicy
from agent.runtime.host import ModelHost
from agent.runtime.registry import default_backends
from agent.telemetry.drift import BaselineAttacher
from agent.telemetry.reporter import Reporter
from agent.update.blobs import BlobStore
from agent.update.fetch import DEFAULT_TIMEOUT, DownloadPolicy, Fetcher
from agent.update.installer import Installer
from agent.update.store import StateStore
from agent.update.truststore import TrustStore
from shared.bundle.trust import TrustRoot
from shared.errors import EdgefleetError

log = logging.getLogger("agent")


class _JournalFilter(logging.Filter):
    _PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = self._PRIORITY.get(record.levelname, 6)
        return True


def setup_logging(level: str = "INFO") -> None:
    """One line per record on stderr; under systemd, with a <priority> prefix for journald."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.addFilter(_JournalFilter())
        handler.setFormatter(logging.Formatter("<%(priority)d>%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def load_trust_root(path: Path, state_dir: Path | None = None) -> TrustRoot:
    """The pinned root, walked forward through the newer roots this device accepted."""
    try:
        Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"trust_root {path}: {exc.strerror or exc}") from None
    try:
        if state_dir is None:
            return TrustRoot.load(Path(path).read_bytes())
        return TrustStore(Path(path), state_dir).load()
    except StateError:
        raise
    except EdgefleetError as exc:
        raise ConfigError(f"trust_root {path} is not a valid signed root: {exc}") from None


class Agent:
    def __init__(self, config: AgentConfig, *, backend: Backend | None = None,
                 http: httpx.Client | None = None) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.blobs = BlobStore(config.state_dir)
        rt = config.runtime
        self.host = ModelHost(BatchPolicy(max_batch_size=rt.max_batch_size,
                                          max_queue_delay_s=rt.max_queue_delay_ms / 1000.0,
                                          workers=rt.resolved_workers),
                              on_load=BaselineAttacher(self.blobs))
        self.trust_root = load_trust_root(config.trust_root, config.state_dir)
        self.backend = backend or default_backends(threads=rt.intra_op_threads,
                                                   litert_interpreters=rt.resolved_workers)
        self.http = http or httpx.Client(timeout=DEFAULT_TIMEOUT, follow_redirects=False)
        self.fleet: FleetClient | None = None
        self._stop = threading.Event()
        fetcher = None
        if config.fleet is not None:
            assert config.device_id is not None
            self.fleet = FleetClient(
                url=config.fleet.url, device_id=config.device_id,
                enrollment_token=config.fleet.enrollment_token, labels=config.fleet.labels,
                state_dir=config.state_dir, client=self.http,
            )
            fetcher = Fetcher(self.http, self.fleet.auth_headers, cancel=self._stop,
                              policy=DownloadPolicy.from_config(config.update))
        self.installer = Installer(
            store=self.store, blobs=self.blobs, host=self.host, trust_root=self.trust_root,
            backend=self.backend, fetcher=fetcher, emit=self._emit,
            trial_seconds=config.update.trial_seconds,
            trial_max_error_rate=config.update.trial_max_error_rate,
            trial_min_inferences=config.update.trial_min_inferences,
            trial_max_restarts=config.update.trial_max_restarts,
            disk_margin_bytes=int(config.update.disk_margin_mb * (1 << 20)),
            retry_failed_s=config.update.retry_failed_s, retry_failed_max_s=config.update.retry_failed_max_s,
        )
        self.api: ApiServer | None = None
        self.reporter: Reporter | None = None
        self._events: list[tuple[str, str, int, int | None, str | None, str]] = []
        self._events_lock = threading.Lock()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._started = False

    # -- events -----------------------------------------------------------------------

    def _emit(self, model: str, kind: str, release: int, from_release: int | None,
              reason: str | None, message: str) -> None:
        with self._events_lock:
            if self.reporter is None:
                self._events.append((model, kind, release, from_release, reason, message))
                del self._events[:-100]
                return
        self.reporter.event(model, kind, release, from_release, reason, message)

    def states(self) -> dict[str, str]:
        try:
            return {name: str(rec.state) for name, rec in self.store.load_all().items()}
        except StateError:
            return {}

    # -- telemetry --------------------------------------------------------------------

    def _start_reporter(self) -> bool:
        """Start MQTT once its URL is known (config, else the fleet's enrollment answer)."""
        if self.reporter is not None or self.config.device_id is None:
            return True
        if not self.config.mqtt_enabled and self.fleet is None:
            return True
        url = self.config.mqtt.url
        username = password = None
        if self.fleet is not None:
            try:
                cred = self.fleet.credential()
            except (EdgefleetError, StateError) as exc:
                log.warning("not enrolled yet (%s); telemetry starts after enrollment", exc)
                return False
            url = url or cred.mqtt_url
            username, password = cred.device_id, cred.credential
        if not url:
            log.warning("no MQTT URL in the config nor from the fleet; telemetry is off")
            return True
        reporter = Reporter(
            device_id=self.config.device_id, mqtt_url=url, state_dir=self.config.state_dir,
            host=self.host, states=self.states, on_desired=self.request_sync,
            health_interval_s=self.config.mqtt.health_interval_s,
            keepalive_s=self.config.mqtt.keepalive_s, username=username, password=password,
            spool_max_bytes=self.config.mqtt.spool_max_bytes,
        )
        reporter.start()
        with self._events_lock:
            self.reporter = reporter
            pending, self._events = self._events, []
        for ev in pending:
            reporter.event(*ev)
        return True

    # -- desired state ----------------------------------------------------------------

    def request_sync(self) -> None:
        """Pull the desired state now (called on an MQTT notice)."""
        self._wake.set()

    def sync_once(self) -> None:
        """One desired-state pull, applied model by model (the fleet's answer is the truth)."""
        if self.fleet is None:
            return
        desired = self.fleet.desired()
        for entry in desired.models:
            if self._stop.is_set():
                return
            self.installer.apply_target(entry.name, self.fleet.target(entry))

    def _work(self, pending: list[str]) -> None:
        for name in pending:
            self.installer.resume(name)
        poll = self.config.fleet.poll_interval_s if self.config.fleet else 3600.0
        next_poll = 0.0
        reporter_up = self._start_reporter()
        while not self._stop.is_set():
            if not reporter_up:
                reporter_up = self._start_reporter()
            if time.monotonic() >= next_poll or self._wake.is_set():
                # Offline (no fleet) this only re-arms the timer: without it the loop would
                # spin, re-reading every record from disk (next_poll stayed 0, wait 0).
                self._wake.clear()
                if self.fleet is not None:
                    try:
                        self.sync_once()
                    except (EdgefleetError, StateError) as exc:
                        log.warning("desired-state pull failed: %s", exc)
                    except Exception:
                        log.exception("desired-state pull failed")
                next_poll = time.monotonic() + poll
            try:
                trial_in = self.installer.check_trials()
            except Exception:
                log.exception("trial check failed")
                trial_in = None
            wait = max(0.0, next_poll - time.monotonic())
            if trial_in is not None:
                wait = min(wait, trial_in + 0.01)
            if not reporter_up:
                wait = min(wait, 5.0)
            self._wake.wait(wait)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self.store.acquire()
        try:
            self.store.ensure_dirs()
            self.blobs.ensure_dirs()
            pending = self.installer.recover()
            api = self.config.api
            self.api = ApiServer(self.host, listen=api.tcp_address, unix_socket=api.unix_socket,
                                 max_body_bytes=api.max_body_bytes,
                                 request_timeout_s=api.request_timeout_s)
            self.api.start()
        except BaseException:
            self.store.release()
            raise
        self._worker = threading.Thread(target=self._work, args=(pending,), name="update", daemon=True)
        self._worker.start()
        self._started = True
        log.info(
            "edgefleet-agent %s started: device %s, models %s, api %s%s",
            __version__, self.config.device_id or "-", sorted(self.host.snapshot()) or "none",
            self.api.tcp_address, f" unix:{self.api.unix_path}" if self.api.unix_path else "",
        )
        sdnotify.notify("READY=1")

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        sdnotify.notify("STOPPING=1")
        self._stop.set()
        self._wake.set()
        if self.api is not None:
            self.api.stop()
        self.host.close()
        if self._worker is not None:
            self._worker.join(timeout=10)
        if self.reporter is not None:
            self.reporter.stop()
        self.http.close()
        self.store.release()
        log.info("edgefleet-agent stopped")

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then shut down cleanly."""
        stop = threading.Event()

        def _signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            interval = sdnotify.watchdog_interval()
            while not stop.wait(interval or 3600.0):
                if interval:
                    sdnotify.notify("WATCHDOG=1")
        finally:
            self.stop()
        return 0
