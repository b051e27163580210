"""The agent assembled in one place: config -> state -> model host -> installer -> API ->
telemetry link -> desired-state loop. A test builds the same parts with other settings
(logging: agent/logsetup.py; the MQTT session and its login: agent/telemetry/link.py).

Threads: the API serves requests in its own threads; one update worker polls the
desired state (every poll_interval_s, and at once on an MQTT notice), installs, and
judges trials, so an update never blocks inference; paho runs the MQTT network loop;
the main thread waits for SIGTERM/SIGINT and pings the systemd watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from agent import __version__, sdnotify
from agent.api.connections import ConnectionLimits
from agent.api.server import ApiServer
from agent.config import AgentConfig
from agent.connection_state import ConnectionState, status_document
from agent.errors import ConfigError, DownloadError, StateError
from agent.runtime.base import Backend
from agent.runtime.batching import BatchPolicy
from agent.runtime.host import ModelHost
from agent.runtime.registry import default_backends
from agent.runtime.shadow import ShadowPolicy
from agent.telemetry.drift import BaselineAttacher
from agent.telemetry.link import TelemetryLink
from agent.update.blobs import BlobStore
from agent.update.clock import TrustedClock
from agent.update.fetch import DownloadPolicy, Fetcher, default_timeout
from agent.update.gating import ActivationGate
from agent.update.installer import Installer
from agent.update.locks import LockTable
from agent.update.shadow_stage import ShadowStager, ShadowTarget
from agent.update.store import StateStore
from agent.update.truststore import TrustStore
from agent.update.window import UpdateWindow
from shared.bundle.trust import TrustRoot
from shared.errors import EdgefleetError

if TYPE_CHECKING:  # imported by a fleet-connected agent only (an offline one never talks HTTP)
    import httpx

    from agent.fleet_client import FleetClient
    from agent.identity.certificate import DeviceCertificate
    from agent.telemetry.reporter import Reporter  # once the MQTT session starts (telemetry.link)

log = logging.getLogger("agent")

# After the fleet served a trust root this agent refused, ask again for the same version
# only after this long (a download failure is retried at the next poll).
ROOT_RETRY_S = 600.0


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
        self.config_path: Path | None = None  # the file it came from, for SIGHUP's comparison
        self.store = StateStore(config.state_dir)
        self.blobs = BlobStore(config.state_dir)
        rt = config.runtime
        self.host = ModelHost(BatchPolicy(max_batch_size=rt.max_batch_size,
                                          max_queue_delay_s=rt.max_queue_delay_ms / 1000.0,
                                          workers=rt.resolved_workers, auto=rt.batching == "auto"),
                              on_load=BaselineAttacher(self.blobs))
        self.trust_root = load_trust_root(config.trust_root, config.state_dir)
        self.backend = backend or default_backends(threads=rt.intra_op_threads,
                                                   litert_interpreters=rt.resolved_workers)
        # Only a fleet-connected agent talks HTTP: an offline one skips the client and its TLS
        # context (~90 ms of a cold start: the CA bundle is parsed).
        self.http: httpx.Client | None = http
        self.fleet: FleetClient | None = None
        # [mqtt] certificate = "fleet": the broker login is a certificate the fleet signs.
        self.certificate: DeviceCertificate | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # wakes the update worker
        self._sync = threading.Event()  # asks it for a desired-state pull
        fetcher = None
        if config.fleet is not None:
            assert config.device_id is not None
            import httpx

            from agent.fleet_client import FleetClient

            client = self.http = http or httpx.Client(timeout=default_timeout(), follow_redirects=False)
            self.fleet = FleetClient(
                url=config.fleet.url, device_id=config.device_id,
                enrollment_token=config.fleet.enrollment_token, labels=config.fleet.labels,
                state_dir=config.state_dir, client=client,
            )
            if config.mqtt.fleet_certificate:
                from agent.identity.certificate import DeviceCertificate

                self.certificate = DeviceCertificate(self.fleet, config.state_dir)
            fetcher = Fetcher(client, self.fleet.auth_headers, cancel=self._stop,
                              policy=DownloadPolicy.from_config(config.update))
        # what `status` and GET /v1/status show of the fleet and broker links
        self.connection = ConnectionState(config.state_dir,
                                          fleet_url=config.fleet.url if config.fleet else None)
        self.link = TelemetryLink(config, host=self.host, states=self.states,
                                  on_desired=self.request_sync, model_details=self.model_details,
                                  wake=self._wake.set, fleet=self.fleet, certificate=self.certificate)
        # Expiry checks use the best time the agent has; activation waits for the maintenance
        # window and for the update locks of local applications (docs/agent-lifecycle.md).
        self.clock = TrustedClock(config.state_dir)
        self.locks = LockTable(config.state_dir, max_lease_s=config.update.lock_max_lease_s,
                               on_release=self._wake.set)
        window = config.update.activation_window
        gate = ActivationGate(window=UpdateWindow.parse(window) if window else None, locks=self.locks,
                              local_now=self.clock.local_now, wall_now=self.clock.now_ts)
        self.installer = Installer(
            store=self.store, blobs=self.blobs, host=self.host, trust_root=self.trust_root,
            backend=self.backend, fetcher=fetcher, emit=self.link.emit,
            gate=gate, expiry_now=self.clock.now,
            offline_expiry_grace_s=config.update.offline_expiry_grace_s,
            trial_seconds=config.update.trial_seconds,
            trial_max_error_rate=config.update.trial_max_error_rate,
            trial_min_inferences=config.update.trial_min_inferences,
            trial_max_latency_ratio=config.update.trial_max_latency_ratio or None,
            trial_max_restarts=config.update.trial_max_restarts,
            disk_margin_bytes=int(config.update.disk_margin_mb * (1 << 20)),
            retry_failed_s=config.update.retry_failed_s, retry_failed_max_s=config.update.retry_failed_max_s,
        )
        self.shadows = ShadowStager(self.installer)
        self.api: ApiServer | None = None
        self._worker: threading.Thread | None = None
        self._started = False
        self._root_refused: tuple[int, float] | None = None  # (version, retry after: monotonic)

    # -- state -----------------------------------------------------------------------

    def states(self) -> dict[str, str]:
        try:
            return {name: str(rec.state) for name, rec in self.store.load_all().items()}
        except StateError:
            return {}

    # -- telemetry (agent/telemetry/link.py) ---------------------------------------------

    @property
    def reporter(self) -> Reporter | None:
        return self.link.reporter

    def _start_reporter(self) -> bool:
        return self.link.start()

    def renew_certificate(self, now: float | None = None, *, force: bool = False) -> bool:
        return self.link.renew_certificate(now, force=force)

    def heal_login(self) -> bool:
        return self.link.heal_login()

    def _broker_probe(self) -> tuple[str | None, tuple[bool, str | None] | None]:
        r = self.link.reporter
        return (None, None) if r is None else (r.address.url, (r.connected.is_set(), r.last_error))

    def status(self) -> dict[str, object]:
        """GET /v1/status: the document of `edgefleet-agent status --json`, live."""
        import msgspec

        batching = {name: scheduler.status(wait=False) for name in sorted(self.host.snapshot())
                    if (scheduler := self.host.scheduler(name)) is not None}
        return {"models": msgspec.to_builtins(list(self.store.load_all().values())),
                "batching": batching,  # per active model: agent.runtime.batching.ModelScheduler.status
                **status_document(self.config.state_dir, self.connection)}

    # -- desired state ----------------------------------------------------------------

    def hangup(self) -> None:
        """SIGHUP (``systemctl reload``): pull the desired state now; compare the config file
        with the running config and name what a restart would change."""
        self.request_sync()
        if self.config_path is None:
            log.info("SIGHUP: pulling the desired state now")
            return
        from agent.config import load_config

        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            log.warning("SIGHUP: %s is not valid (%s); the agent keeps running on the config it "
                        "started with", self.config_path, exc)
            return
        changed = [f for f in self.config.__struct_fields__
                   if getattr(fresh, f) != getattr(self.config, f)]
        if changed:
            log.warning("SIGHUP: %s changed (%s); the config is read at start only: restart the agent "
                        "(systemctl restart edgefleet-agent) to apply it", self.config_path,
                        ", ".join(changed))
        else:
            log.info("SIGHUP: pulling the desired state now; %s unchanged", self.config_path)

    def request_sync(self) -> None:
        """Pull the desired state now (called on an MQTT notice)."""
        self._sync.set()
        self._wake.set()

    def model_details(self) -> dict[str, dict[str, object]]:
        """Per-model health fields of the update: what it waits for, the releases held."""
        waiting = self.installer.waiting()
        return {name: {"held": held, "waiting": waiting.get(name)}
                for name, held in self.installer.held_releases().items()}

    def sync_once(self) -> None:
        """One desired-state pull, applied model by model (the fleet's answer is the truth)."""
        if self.fleet is None:
            return
        desired = self.fleet.desired()
        if desired.rotate_credential:  # an operator asked; the answer moves HTTP and MQTT
            self.fleet.rotate()
            self.renew_certificate(force=True)  # a certificate login: a new key and certificate
        self.clock.observe(self.fleet.server_date)
        self.clock.observe(desired.server_time)
        # Before any model: a release signed under a root rotated just now needs that root.
        if desired.root_version is not None and desired.root_version > self.trust_root.version:
            self.follow_roots(desired.root_version)
        for entry in desired.models:
            if self._stop.is_set():
                return
            self.installer.apply_target(entry.name, self.fleet.target(entry))
        if not self._stop.is_set():
            self.shadows.sync({
                e.name: ShadowTarget(self.fleet.shadow_target(e.shadow), ShadowPolicy(
                    sample_rate=e.shadow.sample_rate, max_busy_fraction=e.shadow.max_busy_fraction))
                for e in desired.models if e.shadow is not None
            })

    def follow_roots(self, target: int) -> None:
        """Walk the trust root forward to the fleet's ``target`` with the roots it serves.

        The fleet only relays them: each link is accepted (and kept in state_dir/trust/) only
        when a threshold of the previous root's keys and of its own signed it. A refused link
        is logged and the agent keeps the last root it accepted; releases signed under a
        newer one stay refused.
        """
        assert self.fleet is not None
        refused = self._root_refused
        if refused is not None and refused[0] == target and time.monotonic() < refused[1]:
            return
        store = TrustStore(self.config.trust_root, self.config.state_dir)
        before = self.trust_root.version
        try:
            root, accepted = store.follow(self.fleet.trust_roots, target)
        except DownloadError as exc:
            log.warning("trust root v%d announced by the fleet, not fetched: %s", target, exc)
            return
        except EdgefleetError as exc:
            with contextlib.suppress(StateError):
                self._use_root(store.load())  # links accepted before the bad one stay
            log.error("REFUSED trust root from the fleet (announced v%d): %s; keeping trust root v%d "
                      "(bundles signed under a newer root are refused until a valid chain arrives)",
                      target, exc, self.trust_root.version)
            self._root_refused = (target, time.monotonic() + ROOT_RETRY_S)
            return
        self._root_refused = None
        self._use_root(root)
        log.info("trust root v%d -> v%d from the fleet (accepted %s)", before, root.version,
                 ", ".join(f"v{v}" for v in accepted))

    def _use_root(self, root: TrustRoot) -> None:
        self.trust_root = root
        self.installer.trust = root

    def _work(self, pending: list[str]) -> None:
        for name in pending:
            self.installer.resume(name)
        poll = self.config.fleet.poll_interval_s if self.config.fleet else 3600.0
        next_poll = 0.0
        reporter_up = self._start_reporter()
        while not self._stop.is_set():
            if not reporter_up:
                reporter_up = self._start_reporter()
            elif self.certificate is not None:
                self.renew_certificate()
            self._wake.clear()
            if self.link.login_refused:
                self.heal_login()
            if time.monotonic() >= next_poll or self._sync.is_set():
                # Offline (no fleet) this only re-arms the timer: without it the loop would
                # spin, re-reading every record from disk (next_poll stayed 0, wait 0).
                self._sync.clear()
                if self.fleet is not None:
                    try:
                        self.sync_once()
                        self.connection.fleet_ok()
                    except (EdgefleetError, StateError) as exc:
                        log.warning("desired-state pull failed: %s", exc)
                        self.connection.fleet_failed(exc)
                    except Exception as exc:
                        log.exception("desired-state pull failed")
                        self.connection.fleet_failed(exc)
                next_poll = time.monotonic() + poll
            try:
                trial_in = self.installer.check_trials()
            except Exception:
                log.exception("trial check failed")
                trial_in = None
            try:
                staged_in = self.installer.resume_staged()
            except Exception:
                log.exception("activating staged releases failed")
                staged_in = None
            wait = max(0.0, next_poll - time.monotonic())
            if trial_in is not None:
                wait = min(wait, trial_in + 0.01)
            if staged_in is not None:
                wait = min(wait, staged_in + 0.05)
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
                                 max_body_bytes=api.max_body_bytes, max_json_bytes=api.max_json_bytes,
                                 max_inflight_bytes=api.max_inflight_bytes,
                                 request_timeout_s=api.request_timeout_s, limits=ConnectionLimits(
                                     max_connections=api.max_connections, workers=api.workers,
                                     max_queued=api.max_queued, backlog=api.backlog,
                                     idle_timeout_s=api.idle_timeout_s, head_timeout_s=api.head_timeout_s,
                                     io_timeout_s=api.io_timeout_s),
                                 locks=self.locks,
                                 update_waiting=self.installer.waiting, status=self.status)
            self.api.start()
            self.connection.start_monitor(self._broker_probe)
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
        self.link.stop()
        self.connection.stop()
        if self.http is not None:
            self.http.close()
        self.store.release()
        log.info("edgefleet-agent stopped")

    def run(self, started: Callable[[], None] | None = None) -> int:
        """Serve until SIGTERM or SIGINT, then shut down cleanly; ``started`` is called once the
        agent serves (the CLI turns the cyclic collector back on there)."""
        stop = threading.Event()

        def _signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        def _hangup(signum: int, frame: FrameType | None) -> None:
            # Nothing is reloaded in place (the config is read once; its changes need a
            # restart): SIGHUP pulls the desired state now and says whether the config changed.
            threading.Thread(target=self.hangup, name="sighup", daemon=True).start()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGHUP, _hangup)
        self.start()
        if started is not None:
            started()
        try:
            interval = sdnotify.watchdog_interval()
            while not stop.wait(interval or 3600.0):
                if interval:
                    sdnotify.notify("WATCHDOG=1")
        finally:
            self.stop()
        return 0
