"""The agent's MQTT session as the agent wires it: started once its URL and login are known,
kept on the device's current credentials, and healed when the broker refuses the login.

- The URL comes from the config, else from the fleet's enrollment answer; the login is the
  device id and the broker password enrollment handed out (the API credential never goes to
  the broker).
- With ``[mqtt] certificate = "fleet"`` the login is a certificate the fleet signs: no
  certificate, no session (never a silent fallback to a password login); a renewed one is
  used at once.
- Lifecycle events emitted before the session starts are kept (the last 100) and sent when
  it starts.
- A refused login asks the update worker (``wake``) to fetch new credentials, at most once in
  LOGIN_HEAL_QUIET_S and not within it after any credential change (a rotation's own
  reconnect race).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from agent.config import AgentConfig
from agent.errors import StateError
from agent.runtime.host import ModelHost
from agent.telemetry.connection import TlsOptions, mqtt_tls
from shared.errors import EdgefleetError

if TYPE_CHECKING:  # a fleet-connected agent only
    from agent.fleet_client import Credential, FleetClient
    from agent.identity.certificate import DeviceCertificate
    from agent.telemetry.reporter import Reporter  # its modules load when the session starts

log = logging.getLogger("agent")

# After the broker refused the device's login, the agent fetches new credentials with its
# API credential (its broker password may have been reset); at most once in this period,
# and not within it after any credential change (a rotation's own reconnect race).
LOGIN_HEAL_QUIET_S = 60.0

# (model, kind, release, from_release, reason, message): Reporter.event's arguments
Event = tuple[str, str, int, int | None, str | None, str]


class TelemetryLink:
    """Owns the agent's Reporter from its start to its stop."""

    def __init__(self, config: AgentConfig, *, host: ModelHost, states: Callable[[], dict[str, str]],
                 on_desired: Callable[[], None],
                 model_details: Callable[[], dict[str, dict[str, object]]],
                 wake: Callable[[], None], fleet: FleetClient | None = None,
                 certificate: DeviceCertificate | None = None) -> None:
        self.config = config
        self.host = host
        self.states = states
        self.on_desired = on_desired
        self.model_details = model_details
        self.wake = wake
        self.fleet = fleet
        self.certificate = certificate
        self.reporter: Reporter | None = None
        self._events: list[Event] = []
        self._events_lock = threading.Lock()
        self._login_refused = threading.Event()  # set by the reporter's network thread
        self._credentials_at: float | None = None  # monotonic: last credential change or heal
        if fleet is not None:
            fleet.on_change(self.credential_changed)

    def emit(self, model: str, kind: str, release: int, from_release: int | None,
             reason: str | None, message: str) -> None:
        """One lifecycle event; kept until the session starts (the last 100)."""
        with self._events_lock:
            if self.reporter is None:
                self._events.append((model, kind, release, from_release, reason, message))
                del self._events[:-100]
                return
        self.reporter.event(model, kind, release, from_release, reason, message)

    def start(self) -> bool:
        """Start MQTT once its URL is known (config, else the fleet's enrollment answer).
        False while it waits for something (enrollment, a certificate): call again later."""
        if self.reporter is not None or self.config.device_id is None:
            return True
        if not self.config.mqtt_enabled and self.fleet is None:
            return True
        url = self.config.mqtt.url
        username = password = None
        protocol = self.config.mqtt.protocol
        if self.fleet is not None:
            try:
                cred = self.fleet.credential()
            except (EdgefleetError, StateError) as exc:
                log.warning("not enrolled yet (%s); telemetry starts after enrollment", exc)
                return False
            url = url or cred.mqtt_url
            # The broker user is the device id; its password the one enrollment handed out
            # (None from a fleet that does not manage the broker: the API credential is never
            # sent to the broker).
            username, password = cred.device_id, cred.broker_password
            if protocol == "auto" and url == cred.mqtt_url and cred.mqtt_protocol:
                protocol = cred.mqtt_protocol  # the fleet's word for its own broker
        if not url:
            log.warning("no MQTT URL in the config nor from the fleet; telemetry is off")
            return True
        tls = mqtt_tls(self.config.mqtt)
        if self.certificate is not None and not url.startswith("mqtts:"):
            # never a silent fallback to a login without the certificate
            log.error('mqtt.certificate = "fleet" needs an mqtts:// broker, but the MQTT URL is %s; '
                      "telemetry is off", url.split("@")[-1])
            return True
        if self.certificate is not None:
            try:
                self.certificate.ensure()
            except (EdgefleetError, StateError) as exc:
                log.warning("no device certificate yet (%s); telemetry starts once the fleet signed one",
                            exc)
                return False
            tls = self._certificate_tls()
        assert self.config.device_id is not None
        from agent.telemetry.reporter import Reporter

        reporter = Reporter(
            device_id=self.config.device_id, mqtt_url=url, state_dir=self.config.state_dir,
            host=self.host, states=self.states, on_desired=self.on_desired,
            model_details=self.model_details,
            health_interval_s=self.config.mqtt.health_interval_s,
            keepalive_s=self.config.mqtt.keepalive_s, username=username, password=password,
            protocol=protocol, tls=tls,
            spool_max_bytes=self.config.mqtt.spool_max_bytes, encoding=self.config.mqtt.encoding,
        )
        if self.fleet is not None and password is not None:
            reporter.on_login_refused = self._on_login_refused
        reporter.start()
        with self._events_lock:
            self.reporter = reporter
            pending, self._events = self._events, []
        for ev in pending:
            reporter.event(*ev)
        return True

    def stop(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()

    def _certificate_tls(self) -> TlsOptions:
        """The [mqtt] TLS options with the device certificate in use."""
        assert self.certificate is not None
        files = self.certificate.files()
        tls = mqtt_tls(self.config.mqtt)
        if files is None:
            return tls
        return msgspec.structs.replace(tls, cert_file=files[0], key_file=files[1])

    def renew_certificate(self, now: float | None = None, *, force: bool = False) -> bool:
        """Renew the device certificate when due (or now with ``force``); the MQTT connection
        moves to the new one at once (no restart). True when a new certificate is in use."""
        if self.certificate is None:
            return False
        try:
            renewed = self.certificate.ensure(now, force=force)
        except (EdgefleetError, StateError) as exc:
            log.warning("device certificate: %s", exc)
            return False
        if renewed and self.reporter is not None:
            self.reporter.use_tls(self._certificate_tls())
        return renewed

    # -- the broker's login --------------------------------------------------------------

    def _on_login_refused(self) -> None:
        self._login_refused.set()
        self.wake()

    @property
    def login_refused(self) -> bool:
        """The broker refused the login since the last heal_login()."""
        return self._login_refused.is_set()

    def heal_login(self) -> bool:
        """The broker refused the login: fetch new credentials with the API credential (the
        fleet rewrites the broker password), unless one changed within LOGIN_HEAL_QUIET_S.
        True when new credentials were fetched."""
        self._login_refused.clear()
        changed = self._credentials_at
        if self.fleet is None or (changed is not None and time.monotonic() - changed < LOGIN_HEAL_QUIET_S):
            return False
        self._credentials_at = time.monotonic()
        log.warning("the broker refused the device's login; fetching new credentials from the fleet")
        try:
            self.fleet.rotate()
        except (EdgefleetError, StateError) as exc:
            log.warning("new credentials after a refused broker login: %s", exc)
            return False
        return True

    def credential_changed(self, cred: Credential) -> None:
        """A re-enrollment or rotation: the MQTT login moves to the new broker password at
        once, like the HTTP client (which reads the credential on every request)."""
        self._credentials_at = time.monotonic()
        reporter = self.reporter
        if reporter is not None and cred.broker_password is not None:
            reporter.use_login(cred.device_id, cred.broker_password)
