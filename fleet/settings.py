"""Fleet settings. Defaults are the embedded ones: SQLite in the data dir, an in-process
MQTT broker, keys generated on first start. Production passes a PostgreSQL URL and an
external broker URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("api", "ingester", "controller")

# Further settings read from EDGEFLEET_<NAME> (upper case), with their type.
ENV_FIELDS: dict[str, type] = {
    "retention_days": float,
    "rollup_retention_days": float,
    "retention_interval_s": float,
    "enroll_rate_per_s": float,
    "enroll_burst": int,
    "public_rate_per_s": float,
    "public_burst": int,
    "device_rate_per_s": float,
    "device_burst": int,
    "trust_forwarded_for": bool,
    "json_max_bytes": int,
    "json_max_depth": int,
    "mqtt_shared_subscription": bool,
    "mqtt_share_group": str,
    "mqtt_session_expiry_s": int,
    "device_health_interval_s": float,
    "ingest_messages_per_min": float,
    "ingest_bytes_per_min": float,
    "ingest_rows_per_min": float,
    "ingest_max_inferences_per_s": float,
    "log_format": str,
    "controller_interval_s": float,
    "mqtt_username": str,
    "mqtt_password": str,
    "mqtt_reload_command": str,
    "device_cert_days": float,
}
# Path settings read from EDGEFLEET_<NAME>.
ENV_PATHS = ("mqtt_ca_file", "mqtt_password_file", "device_ca_dir", "mqtt_crl_file")

# Secrets read from a file named by an environment variable (fleet.secrets), beside their
# plain variables (EDGEFLEET_ADMIN_TOKEN, ...); setting both is refused. The broker login's is
# ..._MQTT_LOGIN_PASSWORD_FILE: EDGEFLEET_MQTT_PASSWORD_FILE is Mosquitto's device password file.
SECRET_FILE_ENV = {
    "admin_token": ("EDGEFLEET_ADMIN_TOKEN_FILE", "EDGEFLEET_ADMIN_TOKEN"),
    "enrollment_token": ("EDGEFLEET_ENROLLMENT_TOKEN_FILE", "EDGEFLEET_ENROLLMENT_TOKEN"),
    "mqtt_password": ("EDGEFLEET_MQTT_LOGIN_PASSWORD_FILE", "EDGEFLEET_MQTT_PASSWORD"),
    "database_password": ("EDGEFLEET_DATABASE_PASSWORD_FILE", "EDGEFLEET_DATABASE_PASSWORD"),
}


class SettingsError(ValueError):
    """An environment variable or option that cannot be used; the message names it."""


def _parse_env(key: str, text: str, kind: type) -> object:
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{key}={text!r}: use true or false")
    if kind is str:
        return text
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"{key}={text!r} is not a {kind.__name__}") from None
    if isinstance(value, int | float) and value < 0:
        raise SettingsError(f"{key}={text!r} must not be negative")
    return value


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./fleet-data")
    # None: sqlite:///<data_dir>/fleet.db
    database_url: str | None = None
    # Put into database_url (which then holds none), so the URL can be shown and passed around.
    database_password: str | None = None
    # None: start the embedded broker (amqtt) on embedded_mqtt_port and use it.
    mqtt_url: str | None = None
    embedded_mqtt_host: str = "127.0.0.1"
    embedded_mqtt_port: int = 1883
    # URL devices are told to use for MQTT (defaults to mqtt_url or the embedded one).
    public_mqtt_url: str | None = None
    # The fleet's own broker login and TLS trust (mqtts:// URLs); user info in mqtt_url
    # works too, these win. None CA file: the system CAs.
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_ca_file: Path | None = None
    # Mosquitto password file the API keeps per-device broker passwords in (user = device
    # id; set at enrollment, rotated by re-enrollment). None: the fleet hands out none.
    mqtt_password_file: Path | None = None
    # Run after each change of mqtt_password_file so the broker re-reads it, e.g.
    # "systemctl reload mosquitto" or "kill -HUP <pid>" (split like a shell, run without one).
    mqtt_reload_command: str | None = None
    # Device certificates (mutual TLS, docs/deployment.md): the device CA's directory (ca.key,
    # ca.crt; made on first use; None: data_dir/device-ca), the lifetime of the certificates
    # it issues, and where the CRL is written for the broker (Mosquitto's crlfile; None:
    # <device CA dir>/crl.pem). A revocation rewrites it, runs mqtt_reload_command and
    # disconnects the device from the broker.
    device_ca_dir: Path | None = None
    device_cert_days: float = 30.0
    mqtt_crl_file: Path | None = None
    # Signing keys directory (root.json + signing-*.key). The fleet verifies uploads
    # against root.json and signs re-issued releases for fleet-ordered rollbacks.
    keys_dir: Path | None = None
    # Operator token with every scope; None: generated and written to data_dir/admin.token.
    admin_token: str | None = None
    # Devices present this once-per-fleet token to enroll; None: generated, data_dir/enroll.token.
    enrollment_token: str | None = None
    controller_interval_s: float = 1.0
    # A device with no message for this long counts as silent.
    silence_after_s: float = 90.0
    # Roles this process runs (``edgefleet serve --role``). Several processes of each role may
    # share one PostgreSQL database and one external broker; only one controller acts at a time.
    run_api: bool = True
    run_ingester: bool = True
    run_controller: bool = True
    max_bundle_bytes: int = 4 * (1 << 30)
    # Upgrade the database schema to the newest migration on start (Alembic).
    db_auto_upgrade: bool = True
    # Ingesters share the health/event stream through an MQTT 5 shared subscription
    # ($share/<group>/...). None: on with an external broker (mqtt_url), off with the
    # embedded one (amqtt has no shared subscriptions).
    mqtt_shared_subscription: bool | None = None
    mqtt_share_group: str = "edgefleet-ingest"
    # With shared subscriptions (MQTT 5): how long the broker keeps an ingester's session
    # (its subscriptions and the messages queued for it) across a disconnect or, where the
    # broker persists sessions, a broker restart. 0: a clean session on every connect.
    # The broker keeps handing a dead ingester's session its share of the stream until the
    # session expires, so this bounds how long devices can go unheard because an ingester
    # died: at most fleet.ingest.ingester.MAX_SESSION_EXPIRY_S (120 s), well under a
    # rollout's silent_after_s (300 s by default) less a health interval (docs/telemetry.md).
    mqtt_session_expiry_s: int = 60
    # The devices' health interval (agent.toml [telemetry] health_interval_s; the agent's
    # default): with shared subscriptions, a rollout's silent_after_s must be at least the
    # session expiry plus this, or a dead ingester's devices count as silent (refused at create).
    device_health_interval_s: float = 60.0
    # Each device's telemetry budget at each ingester (fleet.ingest.budget; 0 turns one off):
    # past it, messages are dropped, counted and the device flagged. The bursts cover a
    # spool flushing after an outage (20 000 messages, 8 MiB, 50 000 rows).
    ingest_messages_per_min: float = 60.0
    ingest_bytes_per_min: float = 256 * 1024.0
    ingest_rows_per_min: float = 600.0
    # The most inferences a device could serve per second: a health window claiming more is refused.
    ingest_max_inferences_per_s: float = 10_000.0
    # Raw HealthReport rows older than this are deleted (hourly rollups are kept longer).
    retention_days: float = 30.0
    rollup_retention_days: float = 400.0
    retention_interval_s: float = 3600.0
    # Token buckets (requests per second, burst); a rate of 0 turns the limit off.
    # enroll: per client IP on POST /devices/enroll; public: per client IP on /healthz,
    # /metrics, /schema; device: per device credential on the device endpoints.
    enroll_rate_per_s: float = 1.0
    enroll_burst: int = 30
    public_rate_per_s: float = 20.0
    public_burst: int = 100
    device_rate_per_s: float = 10.0
    device_burst: int = 200
    # Trust X-Forwarded-For for the client IP (only behind a reverse proxy you run).
    trust_forwarded_for: bool = False
    # Every request body not declared binary (bundle uploads are) is read before routing:
    # larger is 413, nested deeper (arrays and objects) is 400 (fleet.api.body_limits).
    json_max_bytes: int = 1 << 20
    json_max_depth: int = 32
    # "text" or "json" (one JSON object per line).
    log_format: str = "text"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        flags = (self.run_api, self.run_ingester, self.run_controller)
        return tuple(role for role, on in zip(ROLES, flags, strict=True) if on)

    def shared_subscription(self) -> bool:
        if self.mqtt_shared_subscription is not None:
            return self.mqtt_shared_subscription
        return self.mqtt_url is not None

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'fleet.db'}"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Environment (EDGEFLEET_*) first, explicit arguments win."""
        env = os.environ
        s = cls()
        if "EDGEFLEET_DATABASE_URL" in env:
            s.database_url = env["EDGEFLEET_DATABASE_URL"]
        if "EDGEFLEET_MQTT_URL" in env:
            s.mqtt_url = env["EDGEFLEET_MQTT_URL"]
        if "EDGEFLEET_DATA_DIR" in env:
            s.data_dir = Path(env["EDGEFLEET_DATA_DIR"])
        if "EDGEFLEET_EMBEDDED_MQTT_PORT" in env:
            s.embedded_mqtt_port = int(env["EDGEFLEET_EMBEDDED_MQTT_PORT"])
        if "EDGEFLEET_ADMIN_TOKEN" in env:
            s.admin_token = env["EDGEFLEET_ADMIN_TOKEN"]
        if "EDGEFLEET_ENROLLMENT_TOKEN" in env:
            s.enrollment_token = env["EDGEFLEET_ENROLLMENT_TOKEN"]
        if "EDGEFLEET_KEYS_DIR" in env:
            s.keys_dir = Path(env["EDGEFLEET_KEYS_DIR"])
        if env.get("EDGEFLEET_EMBEDDED_MQTT_PORT", "").isdigit():
            s.embedded_mqtt_port = int(env["EDGEFLEET_EMBEDDED_MQTT_PORT"])
        if "EDGEFLEET_PUBLIC_MQTT_URL" in env:
            s.public_mqtt_url = env["EDGEFLEET_PUBLIC_MQTT_URL"]
        for name in ENV_PATHS:
            if env.get("EDGEFLEET_" + name.upper()):
                setattr(s, name, Path(env["EDGEFLEET_" + name.upper()]))
        for name, kind in ENV_FIELDS.items():
            key = "EDGEFLEET_" + name.upper()
            if key in env:
                setattr(s, name, _parse_env(key, env[key], kind))
        for name, (file_key, plain_key) in SECRET_FILE_ENV.items():
            if env.get(file_key):
                if env.get(plain_key):
                    raise SettingsError(f"{plain_key} and {file_key} are both set; keep one")
                setattr(s, name, _secret_file(Path(env[file_key]), file_key))
        if env.get("EDGEFLEET_DATABASE_PASSWORD"):
            s.database_password = env["EDGEFLEET_DATABASE_PASSWORD"]
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        if s.database_password is not None:
            if not s.database_url:
                raise SettingsError("a database password needs a database URL (EDGEFLEET_DATABASE_URL "
                                    "or --database-url) to go into")
            from fleet.secrets import SecretError, with_database_password

            try:
                s.database_url = with_database_password(s.database_url, s.database_password)
            except SecretError as exc:
                raise SettingsError(str(exc)) from None
            s.database_password = None
        return s


def _secret_file(path: Path, what: str) -> str:
    from fleet.secrets import SecretError, read_secret_file

    try:
        return read_secret_file(path, what)
    except SecretError as exc:
        raise SettingsError(str(exc)) from None
