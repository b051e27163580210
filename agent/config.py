"""The agent's TOML config, parsed into typed (frozen msgspec) structs and validated.

Only ``state_dir`` and ``trust_root`` are required: an offline device has no fleet.
An unknown key or a bad value raises ConfigError naming the key and the value.

    device_id = "dev-1"            # required with [fleet] or [mqtt]
    state_dir = "/var/lib/edgefleet"
    trust_root = "/etc/edgefleet/root.json"
    [fleet]
    url = "http://127.0.0.1:8080"
    enrollment_token = "..."
    labels = { ring = "canary", site = "lab" }
    poll_interval_s = 300.0
    [mqtt]
    url = "mqtt://127.0.0.1:1883"  # default: the mqtt_url the fleet returns at enrollment;
                                   # mqtts://host[:8883] for TLS
    health_interval_s = 60.0
    keepalive_s = 300              # PINGREQ period; health (60 s) already keeps NAT and liveness
    spool_max_bytes = 8388608      # on-disk store-and-forward bound; oldest health dropped first
    encoding = "msgpack"           # health and events: "msgpack" (compact) or "json" (docs/telemetry.md)
    protocol = "auto"              # "auto" (MQTT 5, else 3.1.1), "5" or "3.1.1"
    ca_file = ""                   # mqtts: the CA that signed the broker; "": system CAs
    cert_file = ""                 # mqtts: optional client certificate (PEM) ...
    key_file = ""                  # ... and its key, when not in cert_file
    certificate = ""               # "fleet": a client certificate from the fleet's device CA,
                                   # key made on the device, renewed by itself (docs/deployment.md)
    tls_insecure = false           # true skips the broker host name check (never the chain)
    [api]
    listen = "127.0.0.1:8181"      # port 0 picks a free port; "" disables TCP
    unix_socket = ""               # a path; "" disables
    max_body_bytes = 67108864
    max_json_bytes = 8388608       # JSON predict bodies (413 beyond, before reading)
    max_inflight_bytes = 134217728 # bodies held at once, weighted by decoding cost (503 beyond)
    request_timeout_s = 30.0       # a request without a result by then is answered 504
    max_connections = 1024         # open connections (503 beyond); idle ones cost no thread
    workers = 16                   # requests served at once
    max_queued = 256               # complete requests waiting for a worker (503 beyond)
    backlog = 128                  # listen backlog
    idle_timeout_s = 30.0          # an idle keep-alive connection is closed after this
    head_timeout_s = 10.0          # a request head not complete by then: 408 (slowloris)
    io_timeout_s = 30.0            # a read or write within a request waits at most this
    [runtime]
    intra_op_threads = 1           # onnxruntime intra-op threads and LiteRT num_threads
    max_batch_size = 8             # rows merged into one run; 1 turns dynamic batching off
    batching = "auto"              # "auto": merge only models a load-time calibration shows gain; "on"
    max_queue_delay_ms = 0.0       # how long a run waits for more rows; 0: only what queued
    workers = 0                    # runs of one model at once (and LiteRT interpreters); 0: auto
    [update]
    trial_seconds = 10.0
    trial_max_error_rate = 0.5
    trial_min_inferences = 0
    trial_max_latency_ratio = 2.0  # trial p95 / the previous release's on the device; 0: off
    trial_max_restarts = 0         # starts tolerated in TRIAL (power cuts) before rolling back
    disk_margin_mb = 16.0          # free space kept beyond the missing blobs of a release
    download_attempts = 5          # tries per blob per install pass (backoff with full jitter)
    download_backoff_s = 1.0       # first backoff bound; doubles per attempt
    download_backoff_max_s = 30.0
    download_stall_window_s = 30.0 # no byte, or under download_min_rate_bps, over this window
    download_min_rate_bps = 1024.0 # bytes per second
    retry_failed_s = 30.0          # pause before retrying a download/disk_full failure; doubles
    retry_failed_max_s = 1800.0
    download_parallel = 4          # chunk requests in flight per file (1 to 16)
    download_rate_limit_bps = 0.0  # bytes per second over all downloads; 0: no limit
    metered = false                # true: downloads start only inside `window`
    window = ""                    # "HH:MM-HH:MM" local time, e.g. "02:00-05:00"; needs metered
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from agent.errors import ConfigError
from agent.telemetry.connection import PROTOCOLS as MQTT_PROTOCOLS
from agent.update.window import UpdateWindow
from shared.mqtturl import BadMqttUrl, parse_mqtt_url
from shared.telemetry.topics import DEVICE_ID_RE
from shared.telemetry.vocabulary import ENCODINGS

DEFAULT_CONFIG_PATH = Path("/etc/edgefleet/agent.toml")
CONFIG_ENV = "EDGEFLEET_AGENT_CONFIG"


class FleetConfig(msgspec.Struct, frozen=True):
    url: str
    enrollment_token: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    # The retained MQTT desired notice wakes the agent at once; the HTTP poll (the truth)
    # is the fallback for lost notices, so it can be slow: it dominated an idle agent's
    # bytes on the wire at 30 s (bench/b_wire.py).
    poll_interval_s: float = 300.0


class MqttConfig(msgspec.Struct, frozen=True):
    url: str | None = None
    health_interval_s: float = 60.0
    # paho 2.2 sends a PINGREQ every keepalive even while health flows (measured), so this is
    # the ping period; health every 60 s already keeps NAT mappings and the fleet's liveness.
    # It bounds the last will (1.5x) and noticing a half-open link (2x; the spool holds).
    # docs/performance.md (wire bytes) has the figures.
    keepalive_s: int = 300
    spool_max_bytes: int = 8 * 1024 * 1024
    # Health and events on the wire; status stays JSON (docs/telemetry.md). Readers detect it.
    encoding: str = "msgpack"
    protocol: str = "auto"  # agent.telemetry.connection.PROTOCOLS
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    # The client certificate comes from the fleet's device CA (agent.identity.certificate).
    fleet_certificate: bool = False


class ApiConfig(msgspec.Struct, frozen=True):
    listen: str = "127.0.0.1:8181"
    unix_socket: str = ""
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 8 * 1024 * 1024
    max_inflight_bytes: int = 128 * 1024 * 1024
    request_timeout_s: float = 30.0
    max_connections: int = 1024
    workers: int = 16
    max_queued: int = 256
    backlog: int = 128
    idle_timeout_s: float = 30.0
    head_timeout_s: float = 10.0
    io_timeout_s: float = 30.0

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class RuntimeConfig(msgspec.Struct, frozen=True):
    intra_op_threads: int = 1
    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    workers: int = 0  # 0: auto, see resolved_workers
    batching: str = "auto"  # "auto" (agent.runtime.batch_gain decides per model) or "on"

    @property
    def resolved_workers(self) -> int:
        """``workers``, or with 0 the cores over the threads per run, between 1 and 4."""
        if self.workers:
            return self.workers
        return max(1, min(4, (os.cpu_count() or 1) // self.intra_op_threads))


MAX_LOCK_LEASE_S = 86400.0
MAX_OFFLINE_GRACE_S = 30 * 86400.0


class UpdateConfig(msgspec.Struct, frozen=True):
    trial_seconds: float = 10.0
    trial_max_error_rate: float = 0.5
    trial_min_inferences: int = 0
    trial_max_latency_ratio: float = 2.0  # 0: latency is not judged (agent.update.gating)
    trial_max_restarts: int = 0
    disk_margin_mb: float = 16.0
    download_attempts: int = 5
    download_backoff_s: float = 1.0
    download_backoff_max_s: float = 30.0
    download_stall_window_s: float = 30.0
    download_min_rate_bps: float = 1024.0
    retry_failed_s: float = 30.0
    retry_failed_max_s: float = 1800.0
    download_parallel: int = 4
    download_rate_limit_bps: float = 0.0
    metered: bool = False
    window: str = ""
    # Maintenance window: staged releases are activated only inside it ("" = any time).
    activation_window: str = ""
    # Longest lease an application may take on an update lock (local API /v1/locks).
    lock_max_lease_s: float = 3600.0
    # Bounded grace for expired bundle files installed offline on devices without a trusted
    # clock (0 = none); every use is logged.
    offline_expiry_grace_s: float = 0.0


class AgentConfig(msgspec.Struct, frozen=True):
    state_dir: Path
    trust_root: Path
    device_id: str | None = None
    fleet: FleetConfig | None = None
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    update: UpdateConfig = msgspec.field(default_factory=UpdateConfig)
    # Whether an [mqtt] table was given: with no fleet, it is what turns telemetry on.
    mqtt_enabled: bool = False


class _Table:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False
    ) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                misspelt = _close_match(key, [k for k in self.data if k not in self.used])
                if misspelt is not None:  # named like any other unknown key
                    raise ConfigError(f"unknown key {self._key(misspelt)} = {self.data[misspelt]!r} "
                                      f"(did you mean {self._key(key)}?)")
                raise ConfigError(f"{self._key(key)} is required")
            return default
        value = self.data[key]
        if isinstance(value, str) and value in PLACEHOLDERS:
            raise ConfigError(
                f"{self._key(key)} = {value!r} is the placeholder of the shipped config; set the "
                "real value (see /usr/share/doc/edgefleet-agent/install.md)"
            )
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are not numbers; ints are accepted where floats are expected.
        ok = not isinstance(value, bool) and isinstance(value, kinds)
        if not ok and bool in kinds and isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self._key(key)} = {value!r} must be a {names}")
        return float(value) if float in kinds and isinstance(value, int) else value

    def positive(self, key: str, kind: type, default: float, *, allow_zero: bool = False) -> Any:
        value = self.get(key, (kind, int) if kind is float else kind, default)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{self._key(key)} = {value!r} must be {bound}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            meant = _close_match(unknown[0], sorted(self.used - set(self.data)))
            hint = (f"did you mean {self._key(meant)}?" if meant
                    else f"known keys: {', '.join(sorted(self.used))}")
            raise ConfigError(f"unknown key {self._key(unknown[0])} = {self.data[unknown[0]]!r} ({hint})")


# Values of the shipped agent.toml that must be replaced before the agent runs
PLACEHOLDERS = frozenset({"CHANGE-ME", "https://fleet.example.com", "mqtts://broker.example.com:8883"})


def _close_match(word: str, candidates: list[str]) -> str | None:
    """The candidate ``word`` is most likely a misspelling of (error path only: difflib loads late)."""
    if not candidates:
        return None
    import difflib

    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def _check_http_url(key: str, value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{key} = {value!r} must be a URL {schemes[0]}://host[:port]")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{key} = {value!r} has a bad port") from None
    return value.rstrip("/")


def _check_mqtt_url(value: str) -> str:
    """``value`` on the broker URL grammar of shared.mqtturl (the fleet reads the same)."""
    try:
        parse_mqtt_url(value)
    except BadMqttUrl as exc:
        raise ConfigError(f"mqtt.url = {value!r} {exc.problem}") from None
    return value.rstrip("/")


def _is_tls_url(value: str) -> bool:
    try:
        return parse_mqtt_url(value).tls
    except BadMqttUrl:
        return False  # refused with its reason by _check_mqtt_url


def _check_listen(value: str) -> str:
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"api.listen = {value!r} must be HOST:PORT (port 0 picks a free one)")
    return value


def _sub(root: _Table, name: str) -> _Table | None:
    data = root.get(name, dict)
    return None if data is None else _Table(data, f"{name}.")


def _fleet_certificate(value: str, mqtt: dict[str, Any], has_fleet: bool) -> bool:
    """``[mqtt] certificate``: "" (none, or cert_file) or "fleet"."""
    if value not in ("", "fleet"):
        raise ConfigError(f'mqtt.certificate = {value!r} must be "fleet" or ""')
    if value != "fleet":
        return False
    if not has_fleet:
        raise ConfigError('mqtt.certificate = "fleet" needs a [fleet] section (the fleet signs it)')
    for key in ("cert_file", "key_file"):
        if mqtt.get(key):
            raise ConfigError(f'mqtt.{key} and mqtt.certificate = "fleet" exclude each other')
    url = mqtt.get("url")
    if url and not _is_tls_url(str(url)):
        raise ConfigError(f'mqtt.certificate = "fleet" needs a TLS URL, but mqtt.url = {url!r}')
    return True


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML document. Relative paths are taken from ``base_dir``."""
    root = _Table(data, "")
    base = base_dir or Path.cwd()

    def path(key: str) -> Path:
        value = root.get(key, str, required=True)
        if not value:
            raise ConfigError(f"{key} = {value!r} must be a path")
        return (base / value) if not os.path.isabs(value) else Path(value)

    state_dir = path("state_dir")
    trust_root = path("trust_root")
    device_id = root.get("device_id", str)
    if device_id is not None and not DEVICE_ID_RE.match(device_id):
        raise ConfigError(f"device_id = {device_id!r} must match {DEVICE_ID_RE.pattern}")

    fleet = None
    if (t := _sub(root, "fleet")) is not None:
        labels = t.get("labels", dict, {})
        for k, v in labels.items():
            if not isinstance(v, str):
                raise ConfigError(f"fleet.labels.{k} = {v!r} must be a string")
        fleet = FleetConfig(
            url=_check_http_url("fleet.url", t.get("url", str, required=True), ("http", "https")),
            enrollment_token=t.get("enrollment_token", str, ""),
            labels=dict(labels),
            poll_interval_s=t.positive("poll_interval_s", float, 300.0),
        )
        t.finish()

    mqtt = MqttConfig()
    mqtt_enabled = False
    if (t := _sub(root, "mqtt")) is not None:
        mqtt_enabled = True
        url = t.get("url", str)

        def tls_file(key: str, t: _Table = t) -> Path | None:  # this section's t, not a later one
            value = t.get(key, str, "")
            if not value:
                return None
            file = (base / value) if not os.path.isabs(value) else Path(value)
            if not file.is_file():
                raise ConfigError(f"mqtt.{key} = {value!r} is not a file")
            return file

        mqtt = MqttConfig(
            url=None if not url else _check_mqtt_url(url),
            health_interval_s=t.positive("health_interval_s", float, 60.0),
            keepalive_s=t.positive("keepalive_s", int, 300),
            spool_max_bytes=t.positive("spool_max_bytes", int, 8 * 1024 * 1024),
            encoding=t.get("encoding", str, "msgpack"),
            protocol=t.get("protocol", str, "auto"),
            ca_file=tls_file("ca_file"),
            cert_file=tls_file("cert_file"),
            key_file=tls_file("key_file"),
            tls_insecure=t.get("tls_insecure", bool, False),
            fleet_certificate=_fleet_certificate(t.get("certificate", str, ""), t.data, fleet is not None),
        )
        if mqtt.protocol not in MQTT_PROTOCOLS:
            raise ConfigError(f"mqtt.protocol = {mqtt.protocol!r} must be one of "
                              + ", ".join(f'"{p}"' for p in MQTT_PROTOCOLS))
        if mqtt.key_file is not None and mqtt.cert_file is None:
            raise ConfigError(f"mqtt.key_file = {str(mqtt.key_file)!r} needs mqtt.cert_file")
        if mqtt.url and not parse_mqtt_url(mqtt.url).tls:
            for key in ("ca_file", "cert_file", "key_file", "tls_insecure"):
                if t.data.get(key):
                    raise ConfigError(f"mqtt.{key} = {t.data[key]!r} needs a TLS URL, but "
                                      f"mqtt.url = {mqtt.url!r}; use mqtts://")
        if mqtt.encoding not in ENCODINGS:
            raise ConfigError(f"mqtt.encoding = {mqtt.encoding!r} must be one of {', '.join(ENCODINGS)}")
        if mqtt.spool_max_bytes < 65536:
            raise ConfigError(f"mqtt.spool_max_bytes = {mqtt.spool_max_bytes!r} must be at least 65536")
        t.finish()

    api = ApiConfig()
    if (t := _sub(root, "api")) is not None:
        api = ApiConfig(
            listen=_check_listen(t.get("listen", str, api.listen)),
            unix_socket=t.get("unix_socket", str, ""),
            max_body_bytes=t.positive("max_body_bytes", int, api.max_body_bytes),
            max_json_bytes=t.positive("max_json_bytes", int, api.max_json_bytes),
            max_inflight_bytes=t.positive("max_inflight_bytes", int, api.max_inflight_bytes),
            request_timeout_s=t.positive("request_timeout_s", float, api.request_timeout_s),
            max_connections=t.positive("max_connections", int, api.max_connections),
            workers=t.positive("workers", int, api.workers),
            max_queued=t.positive("max_queued", int, api.max_queued),
            backlog=t.positive("backlog", int, api.backlog),
            idle_timeout_s=t.positive("idle_timeout_s", float, api.idle_timeout_s),
            head_timeout_s=t.positive("head_timeout_s", float, api.head_timeout_s),
            io_timeout_s=t.positive("io_timeout_s", float, api.io_timeout_s),
        )
        t.finish()
        if api.max_inflight_bytes < api.max_body_bytes:
            raise ConfigError(f"api.max_inflight_bytes = {api.max_inflight_bytes} must be at least "
                              f"api.max_body_bytes = {api.max_body_bytes}: a body that size could "
                              "never be taken")

    runtime = RuntimeConfig()
    if (t := _sub(root, "runtime")) is not None:
        runtime = RuntimeConfig(
            intra_op_threads=t.positive("intra_op_threads", int, 1),
            max_batch_size=t.positive("max_batch_size", int, runtime.max_batch_size),
            max_queue_delay_ms=t.positive("max_queue_delay_ms", float, 0.0, allow_zero=True),
            workers=t.positive("workers", int, 0, allow_zero=True),
            batching=t.get("batching", str, "auto"),
        )
        t.finish()
        if runtime.batching not in ("auto", "on"):
            raise ConfigError(f"runtime.batching = {runtime.batching!r} must be \"auto\" or \"on\" "
                              "(max_batch_size = 1 turns batching off)")

    update = UpdateConfig()
    if (t := _sub(root, "update")) is not None:
        update = UpdateConfig(
            trial_seconds=t.positive("trial_seconds", float, 10.0, allow_zero=True),
            trial_max_error_rate=t.positive("trial_max_error_rate", float, 0.5, allow_zero=True),
            trial_min_inferences=t.positive("trial_min_inferences", int, 0, allow_zero=True),
            trial_max_latency_ratio=t.positive("trial_max_latency_ratio", float, 2.0, allow_zero=True),
            trial_max_restarts=t.positive("trial_max_restarts", int, 0, allow_zero=True),
            disk_margin_mb=t.positive("disk_margin_mb", float, 16.0, allow_zero=True),
            download_attempts=t.positive("download_attempts", int, 5),
            download_backoff_s=t.positive("download_backoff_s", float, 1.0, allow_zero=True),
            download_backoff_max_s=t.positive("download_backoff_max_s", float, 30.0, allow_zero=True),
            download_stall_window_s=t.positive("download_stall_window_s", float, 30.0),
            download_min_rate_bps=t.positive("download_min_rate_bps", float, 1024.0, allow_zero=True),
            retry_failed_s=t.positive("retry_failed_s", float, 30.0, allow_zero=True),
            retry_failed_max_s=t.positive("retry_failed_max_s", float, 1800.0, allow_zero=True),
            download_parallel=t.positive("download_parallel", int, 4),
            download_rate_limit_bps=t.positive("download_rate_limit_bps", float, 0.0, allow_zero=True),
            metered=t.get("metered", bool, False),
            window=t.get("window", str, ""),
            activation_window=t.get("activation_window", str, ""),
            lock_max_lease_s=t.positive("lock_max_lease_s", float, 3600.0),
            offline_expiry_grace_s=t.positive("offline_expiry_grace_s", float, 0.0, allow_zero=True),
        )
        if update.activation_window:
            try:
                UpdateWindow.parse(update.activation_window)
            except ValueError as exc:
                raise ConfigError(f"update.activation_window = {exc}") from None
        if not 1.0 <= update.lock_max_lease_s <= MAX_LOCK_LEASE_S:
            raise ConfigError(f"update.lock_max_lease_s = {update.lock_max_lease_s!r} must be 1 to "
                              f"{MAX_LOCK_LEASE_S:.0f} seconds")
        if update.offline_expiry_grace_s > MAX_OFFLINE_GRACE_S:
            raise ConfigError(f"update.offline_expiry_grace_s = {update.offline_expiry_grace_s!r} "
                              f"must be at most {MAX_OFFLINE_GRACE_S:.0f} seconds (30 days)")
        if update.download_parallel > 16:
            raise ConfigError(f"update.download_parallel = {update.download_parallel!r} must be 1 to 16")
        if update.window:
            try:
                UpdateWindow.parse(update.window)
            except ValueError as exc:
                raise ConfigError(f"update.window = {exc}") from None
        if update.metered and not update.window:
            raise ConfigError('update.metered = true needs update.window, e.g. window = "02:00-05:00"')
        if update.window and not update.metered:
            raise ConfigError(
                f"update.window = {update.window!r} applies to metered links only; set metered = true"
            )
        if update.trial_max_error_rate > 1:
            raise ConfigError(
                f"update.trial_max_error_rate = {update.trial_max_error_rate!r} must be in [0, 1]"
            )
        t.finish()
    root.finish()

    if (fleet is not None or (mqtt_enabled and mqtt.url)) and device_id is None:
        raise ConfigError("device_id is required when [fleet] or [mqtt] is given")
    if mqtt_enabled and not mqtt.url and fleet is None:
        raise ConfigError("mqtt.url is required when there is no [fleet] to provide it")
    return AgentConfig(
        state_dir=state_dir,
        trust_root=trust_root,
        device_id=device_id,
        fleet=fleet,
        mqtt=mqtt,
        api=api,
        runtime=runtime,
        update=update,
        mqtt_enabled=mqtt_enabled,
    )


def load_config(path: Path) -> AgentConfig:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=Path(path).resolve().parent)


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
