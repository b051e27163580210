"""The device side of the fleet HTTP API: enrollment, credential, desired state.

The credential lives in ``state_dir/device.json`` (mode 0600) and is reused across
restarts; a 401 from the fleet triggers one re-enrollment with the enrollment token, which
carries the credential the device holds as its proof (the fleet refuses to re-enroll a known
id on the token alone). When the desired state says ``rotate_credential`` the device fetches
new credentials with its current ones (``rotate``). Whoever holds a connection made with a
credential (the MQTT reporter) registers ``on_change`` and moves to the new one at once.
With it, when the fleet manages the broker's password file, the device's broker password
(``broker_password``; the broker user name is the device id). Files written before that
field existed, and fleets that do not hand one out, leave it None.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin

import httpx
import msgspec

from agent.errors import AuthError, DownloadError, StateError
from agent.update.lifecycle import Target
from shared import strictjson
from shared.bundle.manifest import NAME_RE, SHA256_RE
from shared.contract.desired import DesiredEntry, DesiredShadow, DesiredState
from shared.contract.enrollment import MQTT_PROTOCOL_HINTS, EnrollRequest, EnrollResponse, RootsPage
from shared.errors import MalformedDocumentError
from shared.fsutil import atomic_write
from shared.release import is_release
from shared.telemetry.topics import check_device_id

log = logging.getLogger(__name__)

DEVICE_FILE = "device.json"
# Made (and stored, 0600) before the first enrollment and sent with every one: the fleet takes
# it as proof of being this device when an enrollment is made again (its answer was lost).
SECRET_FILE = "device_secret"
MAX_DESIRED_BYTES = 1 << 20
MAX_ROOTS_BYTES = 8 << 20  # a page of roots: the fleet sends at most 16 of 256 KiB, base64


class Credential(msgspec.Struct, frozen=True):
    device_id: str
    credential: str
    mqtt_url: str | None
    fleet_url: str
    broker_password: str | None = None
    # The fleet's hint for its broker ("3.1.1" for its embedded one); None: negotiate.
    mqtt_protocol: str | None = None


class FleetClient:
    def __init__(self, *, url: str, device_id: str, enrollment_token: str, labels: dict[str, str],
                 state_dir: Path, client: httpx.Client) -> None:
        self.url = url.rstrip("/")
        self.device_id = check_device_id(device_id)
        self.enrollment_token = enrollment_token
        self.labels = labels
        self.path = Path(state_dir) / DEVICE_FILE
        self.http = client
        self._lock = threading.Lock()
        self._cred: Credential | None = None
        # The last desired state and its ETag: a poll sends If-None-Match and a 304 (no body)
        # means "unchanged", so an idle device's polls cost a few hundred bytes.
        self._desired: tuple[str, DesiredState] | None = None
        # The fleet's clock as of the last desired-state answer (HTTP Date), for expiry checks.
        self.server_date: float | None = None
        self._listeners: list[Callable[[Credential], None]] = []

    # -- credential -------------------------------------------------------------------

    def _load(self) -> Credential | None:
        if not self.path.exists():
            return None
        try:
            cred = msgspec.json.decode(self.path.read_bytes(), type=Credential)
        except (OSError, msgspec.DecodeError) as exc:
            raise StateError(f"{self.path} is unreadable ({exc}); remove it to enroll again") from None
        if cred.device_id != self.device_id or cred.fleet_url != self.url:
            log.warning("%s belongs to %s at %s; enrolling again", self.path, cred.device_id, cred.fleet_url)
            return None
        return cred

    def credential(self) -> Credential:
        with self._lock:
            if self._cred is None:
                self._cred = self._load()
            if self._cred is None:
                self._cred = self._enroll()
            return self._cred

    def on_change(self, listener: Callable[[Credential], None]) -> None:
        """Call ``listener`` with every new credential (re-enrollment, rotation)."""
        self._listeners.append(listener)

    def enroll(self) -> Credential:
        with self._lock:
            self._cred = self._enroll()
            cred = self._cred
        self._changed(cred)
        return cred

    def rotate(self) -> Credential:
        """New credentials from the fleet, asked for with the current ones (the fleet keeps the
        old API credential valid for an overlap window, so a lost answer is asked again)."""
        url = f"{self.url}/api/v1/devices/{self.device_id}/credential"
        try:
            r = self.http.post(url, headers=self.auth_headers())
        except httpx.HTTPError as exc:
            raise DownloadError(f"credential rotation at {url} failed: {exc}") from None
        if r.status_code in (401, 403):
            raise AuthError(f"the fleet refused the credential rotation (HTTP {r.status_code}): "
                            f"{r.text[:300]}")
        if r.status_code not in (200, 201):
            raise DownloadError(f"credential rotation answered HTTP {r.status_code}: {r.text[:300]}")
        with self._lock:
            self._cred = self._store(r.content, what="credential rotation")
            cred = self._cred
        log.info("credentials of %s rotated", self.device_id)
        self._changed(cred)
        return cred

    def _changed(self, cred: Credential) -> None:
        for listener in self._listeners:
            try:
                listener(cred)
            except Exception:
                log.exception("a credential listener failed")

    def _enroll(self) -> Credential:
        if not self.enrollment_token:
            raise AuthError("the device has no credential and fleet.enrollment_token is empty")
        url = f"{self.url}/api/v1/devices/enroll"
        request = EnrollRequest(device_id=self.device_id, token=self.enrollment_token,
                                labels=self.labels, device_secret=self._secret())
        body = msgspec.to_builtins(request)
        # The credential held (in memory, else on disk) proves this is the device: a known id
        # is not re-enrolled on the enrollment token alone.
        held = self._cred
        if held is None:
            with contextlib.suppress(StateError):
                held = self._load()
        headers = {"Authorization": f"Bearer {held.credential}"} if held is not None else {}
        try:
            r = self.http.post(url, json=body, headers=headers)
            if r.status_code == 400 and "device_secret" in r.text:  # a fleet that predates it
                del body["device_secret"]
                r = self.http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DownloadError(f"enrollment at {url} failed: {exc}") from None
        if r.status_code in (401, 403):
            raise AuthError(f"the fleet refused enrollment (HTTP {r.status_code}): {r.text[:300]}")
        if r.status_code not in (200, 201):
            raise DownloadError(f"enrollment answered HTTP {r.status_code}: {r.text[:300]}")
        cred = self._store(r.content, what="enrollment response")
        log.info("enrolled as %s at %s", self.device_id, self.url)
        return cred

    def _secret(self) -> str:
        """The device secret, made and written durably before it is first sent."""
        path = self.path.with_name(SECRET_FILE)
        try:
            secret = path.read_text().strip()
            if len(secret) >= 32:
                return secret
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"{path} is unreadable ({exc}); remove it to make a new one") from None
        secret = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, secret.encode(), mode=0o600)
        return secret

    def _store(self, content: bytes, *, what: str) -> Credential:
        """The credential of an enrollment or rotation answer, written to device.json (0600)."""
        resp = strictjson.decode(content, EnrollResponse, what=what)
        if resp.device_id != self.device_id:
            raise MalformedDocumentError(f"enrollment answered for device {resp.device_id!r}")
        hint = resp.mqtt_protocol if resp.mqtt_protocol in MQTT_PROTOCOL_HINTS else None
        cred = Credential(self.device_id, resp.credential, resp.mqtt_url, self.url,
                          broker_password=resp.broker_password, mqtt_protocol=hint)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.encode(cred), mode=0o600)
        os.chmod(self.path, 0o600)
        return cred

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential().credential}"}

    # -- desired state ----------------------------------------------------------------

    def desired(self) -> DesiredState:
        """GET the desired state (the truth), conditional on the last ETag (304: the state
        kept from before); re-enroll once on 401."""
        url = f"{self.url}/api/v1/devices/{self.device_id}/desired"
        for attempt in (1, 2):
            headers = self.auth_headers()
            cached = self._desired
            if cached is not None:
                headers["If-None-Match"] = cached[0]
            try:
                r = self.http.get(url, headers=headers)
            except httpx.HTTPError as exc:
                raise DownloadError(f"GET {url} failed: {exc}") from None
            if r.status_code == 401 and attempt == 1:
                log.warning("fleet refused the credential; enrolling again")
                self.enroll()
                continue
            self.server_date = _http_date(r.headers.get("date"))
            if r.status_code == 304 and cached is not None:
                return cached[1]
            if r.status_code != 200:
                raise DownloadError(f"GET {url} answered HTTP {r.status_code}: {r.text[:300]}")
            state = self.parse_desired(r.content)
            etag = r.headers.get("etag")
            self._desired = (etag, state) if etag else None
            return state
        raise AuthError("the fleet refused the credential right after enrollment")

    def trust_roots(self, after: int) -> list[bytes]:
        """The root envelopes the fleet holds above version ``after`` (one page, in order).

        Unverified: the caller hands them to TrustStore.update, which checks every link
        against the root it holds. The body is read up to MAX_ROOTS_BYTES."""
        url = f"{self.url}/api/v1/trust/roots"
        try:
            with self.http.stream("GET", url, params={"after": after}, headers=self.auth_headers()) as r:
                if r.status_code != 200:
                    r.read()
                    raise DownloadError(f"GET {url}?after={after} answered HTTP {r.status_code}: "
                                        f"{r.text[:300]}")
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ROOTS_BYTES:
                        raise DownloadError(f"GET {url}: answer over {MAX_ROOTS_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise DownloadError(f"GET {url} failed: {exc}") from None
        page = strictjson.decode(bytes(body), RootsPage, max_bytes=MAX_ROOTS_BYTES, what="trust roots")
        try:
            return [base64.b64decode(b, validate=True) for b in page.roots]
        except binascii.Error:
            raise MalformedDocumentError("trust roots: an entry is not base64") from None

    def parse_desired(self, body: bytes) -> DesiredState:
        state = strictjson.decode(body, DesiredState, max_bytes=MAX_DESIRED_BYTES, what="desired state")
        if state.device_id != self.device_id:
            raise MalformedDocumentError(f"desired state is for device {state.device_id!r}")
        if state.root_version is not None and state.root_version < 1:
            raise MalformedDocumentError(f"desired state names trust root v{state.root_version}")
        names = set()
        for e in state.models:
            if not NAME_RE.match(e.name) or not SHA256_RE.match(e.digest) or not is_release(e.release):
                raise MalformedDocumentError(f"desired entry {e.name!r} r{e.release} is malformed")
            if "{sha256}" not in e.blob_url:
                raise MalformedDocumentError(f"desired entry {e.name!r}: blob_url lacks {{sha256}}")
            if e.name in names:
                raise MalformedDocumentError(f"desired state names {e.name!r} twice")
            sh = e.shadow
            if sh is not None and (
                not SHA256_RE.match(sh.digest) or not is_release(sh.release) or "{sha256}" not in sh.blob_url
                or not 0 < sh.sample_rate <= 1 or not 0 < sh.max_busy_fraction <= 1
            ):
                raise MalformedDocumentError(f"desired entry {e.name!r}: shadow r{sh.release} is malformed")
            names.add(e.name)
        return state

    def shadow_target(self, shadow: DesiredShadow) -> Target:
        """The candidate of a shadow entry as an installer target (absolute URLs)."""
        base = self.url + "/"
        return Target(
            release=shadow.release,
            digest=shadow.digest,
            envelope_url=urljoin(base, shadow.envelope_url),
            blob_url=urljoin(base, shadow.blob_url),
        )

    def target(self, entry: DesiredEntry) -> Target:
        """The installer's target for an entry, with URLs made absolute against the fleet URL."""
        base = self.url + "/"
        return Target(
            release=entry.release,
            digest=entry.digest,
            envelope_url=urljoin(base, entry.envelope_url),
            blob_url=urljoin(base, entry.blob_url),
            activation_window=entry.activation_window or None,
        )


def _http_date(value: str | None) -> float | None:
    """UNIX seconds of an HTTP ``Date`` header, None when absent or unparsable."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
