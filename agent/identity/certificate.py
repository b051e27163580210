"""The device's client certificate from the fleet's device CA (``[mqtt] certificate =
"fleet"``).

- the key is made on the device, in a child process (agent.identity.keygen), and never
  leaves it; the fleet signs the CSR (``POST /api/v1/devices/{id}/certificate``, with the
  device credential) and says when to renew (two thirds of the lifetime);
- files in ``state_dir/tls/``: ``key-<n>.pem`` (0600), ``cert-<n>.pem`` and
  ``certificate.json`` naming the pair in use and its renewal time. A renewal writes a new
  pair, then replaces ``certificate.json`` atomically, then removes the old pair: a power
  cut leaves the old pair or the new one in use, never a key with another's certificate;
- the resident agent reads only JSON and PEM paths; ssl checks that key and certificate
  belong together when the MQTT connection loads them;
- renewal and expiry times are kept on the device's own clock (moved by the difference
  between it and the fleet's HTTP Date), so a device whose clock is off renews on time.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from agent.errors import AuthError, DownloadError, StateError
from shared import strictjson
from shared.contract.certificates import CertificateAnswer, CertificateRequest
from shared.errors import EdgefleetError
from shared.fsutil import atomic_write

if TYPE_CHECKING:
    import httpx

    from agent.fleet_client import FleetClient

log = logging.getLogger(__name__)

TLS_DIR = "tls"
META_FILE = "certificate.json"
KEYGEN_TIMEOUT_S = 60.0
RETRY_S = 60.0  # after a failed request, ask again no sooner than this
MAX_ANSWER_BYTES = 64 * 1024


class CertificateMeta(msgspec.Struct, frozen=True):
    serial: str
    key_file: str  # names inside the tls directory
    cert_file: str
    not_after_ts: float
    renew_after_ts: float


def on_local_clock(fleet_ts: float, fleet_now: float | None, local_now: float) -> float:
    """A time the fleet named, moved onto this device's clock: a device whose clock is off
    (days ahead, or never set) still renews at the right moment instead of at every poll
    (or never). ``fleet_now`` is the fleet's clock when it answered (HTTP Date)."""
    if fleet_now is None:
        return fleet_ts
    return fleet_ts + (local_now - fleet_now)


class CertificateError(DownloadError):
    """The device could not get a certificate now; it keeps the one it has and asks later."""


class DeviceCertificate:
    def __init__(self, fleet: FleetClient, state_dir: Path) -> None:
        self.fleet = fleet
        self.dir = Path(state_dir) / TLS_DIR
        self._retry_at = 0.0

    # -- what is in use ---------------------------------------------------------------

    def meta(self) -> CertificateMeta | None:
        path = self.dir / META_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{path}: {exc.strerror or exc}") from None
        try:
            return msgspec.json.decode(raw, type=CertificateMeta)
        except msgspec.DecodeError as exc:
            log.warning("%s is unreadable (%s); asking the fleet for a new certificate", path, exc)
            return None

    def files(self) -> tuple[Path, Path] | None:
        """(certificate, key) in use, None before the first certificate."""
        meta = self.meta()
        if meta is None:
            return None
        cert, key = self.dir / meta.cert_file, self.dir / meta.key_file
        return (cert, key) if cert.is_file() and key.is_file() else None

    def due(self, now: float | None = None) -> bool:
        """Whether to ask for a (new) certificate: none yet, or past its renewal time."""
        now = time.time() if now is None else now
        meta = self.meta()
        return meta is None or self.files() is None or now >= meta.renew_after_ts

    # -- getting one ------------------------------------------------------------------

    def ensure(self, now: float | None = None, *, force: bool = False) -> bool:
        """Get a certificate when one is due, or now with ``force`` (a credential rotation),
        unless the last failure is too recent. True when a new one is in use;
        CertificateError when there is none to use at all."""
        now = time.time() if now is None else now
        if not force and not self.due(now):
            return False
        if time.monotonic() < self._retry_at:
            if self.files() is None:
                raise CertificateError("no device certificate yet (the last request failed)")
            return False
        try:
            self.renew()
        except (EdgefleetError, OSError) as exc:  # refused, unreachable, a bad answer, disk
            self._retry_at = time.monotonic() + RETRY_S
            if self.files() is None:
                raise CertificateError(f"no device certificate: {exc}") from None
            log.warning("certificate renewal failed (%s); keeping serial %s until it expires",
                        exc, (self.meta() or CertificateMeta("?", "", "", 0, 0)).serial)
            return False
        return True

    def renew(self) -> CertificateMeta:
        """New key, CSR to the fleet, new pair in use, old pair removed."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tag = os.urandom(4).hex()
        key_name, cert_name = f"key-{tag}.pem", f"cert-{tag}.pem"
        try:
            csr = self._make_csr(self.dir / key_name)
            answer, fleet_now = self._request(csr)
            atomic_write(self.dir / cert_name, answer.certificate.encode())
            atomic_write(self.dir / "ca.pem", answer.ca_certificate.encode())
        except BaseException:
            for name in (key_name, cert_name):
                (self.dir / name).unlink(missing_ok=True)
            raise
        old = self.meta()
        local_now = time.time()
        meta = CertificateMeta(serial=answer.serial, key_file=key_name, cert_file=cert_name,
                               not_after_ts=on_local_clock(answer.not_after_ts, fleet_now, local_now),
                               renew_after_ts=on_local_clock(answer.renew_after_ts, fleet_now, local_now))
        atomic_write(self.dir / META_FILE, msgspec.json.encode(meta))
        if old is not None:
            for name in (old.key_file, old.cert_file):
                if name not in (key_name, cert_name):
                    (self.dir / name).unlink(missing_ok=True)
        log.info("device certificate serial %s in use (renew after %s, expires %s)", answer.serial,
                 answer.renew_after or answer.renew_after_ts, answer.not_after or answer.not_after_ts)
        return meta

    def _make_csr(self, key_path: Path) -> bytes:
        import subprocess  # once per certificate lifetime: not on the agent's start path

        try:
            done = subprocess.run(  # -P: not the working directory on sys.path (as sigcheck)
                [sys.executable, "-P", "-m", "agent.identity.keygen", self.fleet.device_id, str(key_path)],
                capture_output=True, timeout=KEYGEN_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CertificateError(f"making the device key failed: {exc}") from None
        if done.returncode != 0 or b"BEGIN CERTIFICATE REQUEST" not in done.stdout:
            raise CertificateError(f"making the device key failed (exit {done.returncode}): "
                                   f"{done.stderr.decode(errors='replace')[-300:]}")
        return done.stdout

    def _request(self, csr: bytes) -> tuple[CertificateAnswer, float | None]:
        """The fleet's answer and its clock at that moment (HTTP Date; None without one)."""
        from email.utils import parsedate_to_datetime

        import httpx

        url = f"{self.fleet.url}/api/v1/devices/{self.fleet.device_id}/certificate"
        body = msgspec.to_builtins(CertificateRequest(csr.decode()))
        for attempt in (1, 2):
            try:
                r: httpx.Response = self.fleet.http.post(url, json=body, headers=self.fleet.auth_headers())
            except httpx.HTTPError as exc:
                raise CertificateError(f"POST {url} failed: {exc}") from None
            if r.status_code == 401 and attempt == 1:
                log.warning("fleet refused the credential; enrolling again")
                self.fleet.enroll()
                continue
            if r.status_code != 201:
                raise CertificateError(f"POST {url} answered HTTP {r.status_code}: {r.text[:300]}")
            answer = strictjson.decode(r.content, CertificateAnswer, max_bytes=MAX_ANSWER_BYTES,
                                       what="certificate answer")
            if answer.device_id != self.fleet.device_id or "BEGIN CERTIFICATE" not in answer.certificate:
                raise CertificateError(f"the fleet answered a certificate for {answer.device_id!r}")
            try:
                fleet_now: float | None = parsedate_to_datetime(r.headers.get("date", "")).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                fleet_now = None
            return answer, fleet_now
        raise AuthError("the fleet refused the credential right after enrollment")
