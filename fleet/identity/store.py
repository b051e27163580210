"""Device certificates in the database and on disk: the CA of the settings, the record of
every certificate issued, revocation, the CRL file the broker reads, and the broker's
reload and disconnect after a revocation.

Revocation reaches the broker in three steps (measured with Mosquitto 2.0.11):

1. the CRL file (``mqtt_crl_file``, Mosquitto's ``crlfile``) is rewritten with every
   revoked serial that has not expired;
2. ``mqtt_reload_command`` (SIGHUP): Mosquitto reloads the CRL, so a new TLS handshake
   with a revoked certificate fails ("certificate verify failed");
3. a reload leaves live connections alone, so the fleet takes the device's session over:
   it connects with the device's client id on its own listener (client ids are one
   namespace across listeners) and leaves; Mosquitto closes the device's connection and
   the device's reconnect meets the new CRL.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import subprocess
import threading
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet.db.models import DeviceCertificate, as_utc
from fleet.identity.ca import DeviceCA, IssuedCertificate, write_crl
from fleet.settings import Settings

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 10.0
RELOAD_SETTLE_S = 0.5  # Mosquitto handles SIGHUP in its main loop, a moment after the signal
TAKEOVER_TIMEOUT_S = 5.0
CRL_NAME = "crl.pem"


def ca_dir(settings: Settings) -> Path:
    return Path(settings.device_ca_dir) if settings.device_ca_dir else Path(settings.data_dir) / "device-ca"


def crl_path(settings: Settings) -> Path:
    return Path(settings.mqtt_crl_file) if settings.mqtt_crl_file else ca_dir(settings) / CRL_NAME


def device_ca(settings: Settings) -> DeviceCA:
    return DeviceCA.load_or_create(ca_dir(settings))


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def record_issued(session: Session, issued: IssuedCertificate) -> DeviceCertificate:
    row = DeviceCertificate(serial=serial_hex(issued.serial), device_id=issued.device_id,
                            fingerprint=issued.fingerprint, not_after=issued.not_after)
    session.add(row)
    return row


def live_certificates(session: Session, device_id: str, now: dt.datetime) -> list[DeviceCertificate]:
    """The device's certificates that neither expired nor were revoked, newest first."""
    rows = session.exec(
        select(DeviceCertificate).where(
            DeviceCertificate.device_id == device_id, col(DeviceCertificate.revoked_at).is_(None)
        ).order_by(col(DeviceCertificate.issued_at).desc())
    ).all()
    return [r for r in rows if (as_utc(r.not_after) or now) > now]


def revoke_device_certificates(session: Session, device_id: str,
                               now: dt.datetime | None = None) -> list[str]:
    """Mark every live certificate of ``device_id`` revoked (the caller commits, then calls
    ``publish_revocation``). The hook for device revocation and deletion: returns the
    serials revoked, [] when the device holds none."""
    now = now or dt.datetime.now(dt.UTC)
    rows = live_certificates(session, device_id, now)
    for row in rows:
        row.revoked_at = now
        session.add(row)
    return [r.serial for r in rows]


def build_crl(settings: Settings, engine: Engine, now: dt.datetime | None = None) -> bytes:
    """The CRL of every revoked certificate not yet expired."""
    now = now or dt.datetime.now(dt.UTC)
    with Session(engine) as session:
        rows = session.exec(
            select(DeviceCertificate).where(col(DeviceCertificate.revoked_at).is_not(None))
        ).all()
    revoked = [(int(r.serial, 16), as_utc(r.revoked_at) or now) for r in rows
               if (as_utc(r.not_after) or now) > now]
    return device_ca(settings).crl(revoked, now=now)


def write_current_crl(settings: Settings, engine: Engine) -> Path:
    path = crl_path(settings)
    write_crl(path, build_crl(settings, engine))
    return path


def run_reload(command: str | None) -> bool:
    """Ask the broker to re-read its files; a failure is logged, not raised."""
    if not command:
        return False
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, timeout=RELOAD_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("broker reload command %r failed: %s", command, exc)
        return False
    if done.returncode != 0:
        log.error("broker reload command %r exited %d: %s", command, done.returncode,
                  done.stderr.decode(errors="replace")[:300])
        return False
    return True


def disconnect_from_broker(settings: Settings, device_id: str) -> bool:
    """End ``device_id``'s live broker connection by taking its session over with the
    fleet's login (external broker only); True when the broker accepted the takeover."""
    if not settings.mqtt_url:
        return False
    import paho.mqtt.client as mqtt

    from fleet.broker.client import make_client, target_from_settings

    target = target_from_settings(settings, settings.mqtt_url)
    client = make_client(target, "revoke", mqtt5=True, client_id=device_id)
    accepted = threading.Event()
    answered = threading.Event()

    def on_connect(c: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object) -> None:
        if not rc.is_failure:
            accepted.set()
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(target.host, target.port, keepalive=10, clean_start=True)
    except OSError as exc:
        log.error("revocation of %s: cannot reach the broker at %s to end its session: %s",
                  device_id, target.url, exc)
        return False
    client.loop_start()
    try:
        answered.wait(TAKEOVER_TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    if not accepted.is_set():
        log.error("revocation of %s: the broker at %s did not accept the session takeover",
                  device_id, target.url)
    return accepted.is_set()


def publish_revocation(settings: Settings, engine: Engine, device_id: str) -> tuple[Path, bool, bool]:
    """After a revocation was committed: CRL file, broker reload, the device's connection
    ended. Returns (CRL path, reloaded, disconnected)."""
    path = write_current_crl(settings, engine)
    reloaded = run_reload(settings.mqtt_reload_command)
    if reloaded:
        threading.Event().wait(RELOAD_SETTLE_S)
    disconnected = disconnect_from_broker(settings, device_id)
    log.info("device %s: certificates revoked; CRL %s written, broker reloaded: %s, session ended: %s",
             device_id, path, reloaded, disconnected)
    return path, reloaded, disconnected


def revoke_with_device(session: Session, settings: Settings, engine: Engine, device_id: str) -> list[str]:
    """Device revocation and deletion (fleet.api.device_credentials.cut_off): the device's
    certificates are revoked in the caller's transaction, and once it commits the CRL is
    written, the broker reloaded and the device's session ended. A failure there is logged:
    the revocation is stored and the next start (or revocation) writes the CRL again."""
    serials = revoke_device_certificates(session, device_id)
    if serials:
        def publish(_: Session) -> None:
            try:
                publish_revocation(settings, engine, device_id)
            except Exception:
                log.exception("device %s: certificates revoked, but the CRL was not published", device_id)

        event.listen(session, "after_commit", publish, once=True)
    return serials
