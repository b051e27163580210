"""``serve(settings)``: resolve the embedded defaults, then run the app under uvicorn."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import uvicorn
from sqlalchemy.exc import InterfaceError, OperationalError

from fleet.app import broker_url, create_app
from fleet.db.engine import describe
from fleet.logs import configure as configure_logs
from fleet.settings import Settings
from fleet.startup import check_can_listen, check_database_url, database_unreachable
from shared.bundle.keyring import atomic_write, init_keyring
from shared.randomtoken import random_token

log = logging.getLogger("fleet")


def _token(settings_value: str | None, path: Path, what: str) -> str:
    """The given token, else the one in ``path``, else a new one written there (0600)."""
    if settings_value:
        return settings_value
    if path.is_file():
        existing = path.read_text().strip()
        if existing:
            return existing
    token = random_token(32)
    atomic_write(path, (token + "\n").encode(), mode=0o600)
    os.chmod(path, 0o600)
    log.info("generated the %s in %s", what, path)
    return token


def resolve(settings: Settings) -> Settings:
    """Fill in what the embedded defaults derive: data dir, keys, tokens."""
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_dir = Path(settings.keys_dir) if settings.keys_dir else data_dir / "keys"
    if not (keys_dir / "root.json").is_file():
        if settings.keys_dir is not None:
            raise SystemExit(
                f"edgefleet: {keys_dir} holds no root.json; create it with 'edgefleet keys init {keys_dir}'"
            )
        init_keyring(keys_dir)
        log.info(
            "created signing keys in %s; devices pin %s. Move root-*.key offline for production.",
            keys_dir, keys_dir / "root.json",
        )
    return replace(
        settings,
        data_dir=data_dir,
        keys_dir=keys_dir,
        admin_token=_token(settings.admin_token, data_dir / "admin.token", "operator token"),
        enrollment_token=_token(settings.enrollment_token, data_dir / "enroll.token", "enrollment token"),
    )


def serve(settings: Settings) -> None:
    roles = ",".join(settings.roles) if len(settings.roles) < 3 else "all"
    configure_logs(settings.log_format, role=roles if roles != "all" else "")
    check_database_url(settings.resolved_database_url())
    check_can_listen(settings.host, settings.port, "the fleet API", "--port")
    if settings.mqtt_url is None:
        check_can_listen(settings.embedded_mqtt_host, settings.embedded_mqtt_port, "the embedded MQTT broker",
                         "--mqtt-port (or pass an external broker with --mqtt-url)")
    settings = resolve(settings)
    try:
        app = create_app(settings)
    except (OperationalError, InterfaceError) as exc:
        raise database_unreachable(describe(settings.resolved_database_url()), exc) from exc
    broker = settings.mqtt_url or f"embedded broker at {broker_url(settings)}"
    log.info(
        "edgefleet fleet (%s) on http://%s:%d (database %s, MQTT %s, keys %s, data %s)",
        roles,
        settings.host,
        settings.port,
        describe(settings.resolved_database_url()),
        broker,
        settings.keys_dir,
        settings.data_dir,
    )
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="info", access_log=False, log_config=None
    )
