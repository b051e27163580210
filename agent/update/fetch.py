"""HTTP downloads of envelopes and blobs: capped, hash-checked, resumable, retried.

The envelope is fetched first (at most 1 MiB) so the caller can verify it before any
model byte is requested. A blob streams into ``staging/<sha256>.part`` with a hard cap at
its manifest size and a SHA-256 check, and is placed only when both hold.

Rules of a blob download:
- a partial file is kept in staging when a transfer breaks (or the process dies); the
  next attempt recomputes its hash from the bytes on disk and asks for the rest with
  ``Range: bytes=<size>-``. Only ``206`` with ``Content-Range: bytes <size>-<last>/<total>``
  continues it; a ``200`` means the server ignored the range: the partial is truncated
  and the full body taken from byte 0. Blobs are content-addressed, so no ``If-Range``
  is needed: the bytes behind a hash never change;
- ``Accept-Encoding: identity`` is sent and any other ``Content-Encoding`` is refused:
  the device never decompresses what it has not verified;
- a transfer slower than ``min_rate_bps`` over ``stall_window_s`` (a trickle) is cut,
  and so is one with no byte for ``stall_window_s`` (the read timeout);
- network errors, cuts, stalls, 408/429/5xx are retried up to ``attempts`` times with
  exponential backoff and full jitter (uniform in [0, min(max, base * 2^n)]), keeping
  the partial; other 4xx, too many bytes and a hash mismatch of a transfer that
  started at byte 0 are not (a mismatch of a resumed one is retried once from 0);
- ``rate_limit_bps`` caps the bytes per second of all downloads of this fetcher together (a
  token bucket shared by every chunk in flight); time spent waiting for tokens does not
  count as a stall;
- with a ``window`` (metered link) no blob or chunk request starts outside it: the download
  stops with ``WaitingForWindow`` (a kind of ``Cancelled``: the record keeps its state and
  the partial, and the next pass inside the window resumes).

A file whose manifest entry lists chunks is fetched chunk by chunk (agent.update.chunked).
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from agent.config import UpdateConfig
from agent.errors import AuthError, DownloadError
from agent.update.blobs import BlobStore, BlobWriter, disk_full
from agent.update.window import UpdateWindow
from shared.bundle.envelope import MAX_ENVELOPE_BYTES
from shared.bundle.manifest import FileRef
from shared.errors import HashMismatchError, LengthMismatchError

if TYPE_CHECKING:  # httpx is imported when a download starts: an offline agent never needs it
    import hashlib  # with the first blob too (shared.digest)

    import httpx

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadPolicy(msgspec.Struct, frozen=True):
    """How hard a download tries; the [update] download_* keys of the agent config."""

    attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    stall_window_s: float = 30.0
    min_rate_bps: float = 1024.0
    connect_timeout_s: float = 10.0
    parallel: int = 4  # chunk requests in flight per file
    rate_limit_bps: float = 0.0  # 0: no limit
    window: UpdateWindow | None = None

    @classmethod
    def from_config(cls, u: UpdateConfig) -> DownloadPolicy:
        """The policy of an agent's ``[update]`` table."""
        return cls(
            attempts=u.download_attempts, backoff_base_s=u.download_backoff_s,
            backoff_max_s=u.download_backoff_max_s, stall_window_s=u.download_stall_window_s,
            min_rate_bps=u.download_min_rate_bps, parallel=u.download_parallel,
            rate_limit_bps=u.download_rate_limit_bps,
            window=UpdateWindow.parse(u.window) if u.metered and u.window else None,
        )

    def timeout(self) -> httpx.Timeout:
        import httpx

        return httpx.Timeout(connect=self.connect_timeout_s, read=self.stall_window_s,
                             write=30.0, pool=self.connect_timeout_s)


def default_timeout() -> httpx.Timeout:
    """The agent's HTTP client timeouts (fleet API and downloads)."""
    import httpx

    return httpx.Timeout(connect=10.0, read=30.0, write=30.0, pool=10.0)


def _uniform() -> float:
    """random.random(), random imported at the first backoff, not with the agent."""
    import random

    return random.random()


def backoff_delay(attempt: int, policy: DownloadPolicy, rand: Callable[[], float] = _uniform) -> float:
    """Full jitter: a delay uniform in [0, min(backoff_max_s, backoff_base_s * 2**attempt))."""
    return rand() * min(policy.backoff_max_s, policy.backoff_base_s * (2.0 ** min(attempt, 30)))


class Retryable(DownloadError):
    """A transfer that broke for reasons of the link or the server; the partial is kept."""


class Cancelled(DownloadError):
    """The agent is stopping; the record stays in its state so the next start resumes."""


class WaitingForWindow(Cancelled):
    """A metered link outside its update window: stop, keep the partial, resume in the window."""


class TokenBucket:
    """Bytes per second shared by every transfer of a fetcher (all chunks in flight).

    ``take(n)`` returns at once while tokens last and otherwise sleeps the debt off; a burst
    of at most a quarter second (at least 64 KiB) is allowed after an idle spell.
    """

    def __init__(self, rate_bps: float, cancel: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_bps
        self.burst = max(65536.0, rate_bps / 4)
        self.cancel = cancel
        self.clock = clock
        self.tokens = self.burst
        self.last = clock()
        self.lock = threading.Lock()

    def take(self, n: int) -> float:
        """Account ``n`` bytes; return the seconds slept."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            debt = -self.tokens
        if debt <= 0:
            return 0.0
        delay = debt / self.rate
        self.cancel.wait(delay)
        return delay


class RateMeter:
    """Refuses a trickle: fewer than ``min_rate_bps * window`` bytes in any tumbling window."""

    def __init__(self, policy: DownloadPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = policy.stall_window_s
        self.min_rate = policy.min_rate_bps
        self.clock = clock
        self.start = clock()
        self.received = 0

    def pause(self, seconds: float) -> None:
        """Time spent waiting for the rate limit is not the link's fault: leave it out."""
        self.start += seconds

    def add(self, n: int, what: str) -> None:
        self.received += n
        now = self.clock()
        elapsed = now - self.start
        if elapsed < self.window:
            return
        rate = self.received / elapsed
        if rate < self.min_rate:
            raise Retryable(
                f"{what} stalled: {self.received} bytes in {elapsed:.1f} s ({rate:.0f} B/s), "
                f"below the minimum {self.min_rate:.0f} B/s over {self.window:.0f} s"
            )
        self.start, self.received = now, 0


class FetchStats(msgspec.Struct):
    """Bytes by origin, for logs, status and the tests (updated from several threads)."""

    network: int = 0  # body bytes received
    reused: int = 0  # chunk bytes copied from blobs of installed releases
    resumed: int = 0  # chunk bytes found verified in a kept partial
    fallbacks: int = 0  # chunked downloads that fell back to the whole file
    lock: threading.Lock = msgspec.field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


class Fetcher:
    def __init__(
        self,
        client: httpx.Client,
        headers: Callable[[], dict[str, str]] = dict,
        *,
        policy: DownloadPolicy | None = None,
        cancel: threading.Event | None = None,
        rand: Callable[[], float] = _uniform,
        clock: Callable[[], float] = time.monotonic,
        local_now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.client = client
        self.headers = headers
        self.policy = policy or DownloadPolicy()
        self.cancel = cancel or threading.Event()
        self.rand = rand
        self.clock = clock
        self.local_now = local_now
        self.delays: list[float] = []  # the backoff delays slept, for logs and tests
        self.bucket = (TokenBucket(self.policy.rate_limit_bps, self.cancel, clock)
                       if self.policy.rate_limit_bps > 0 else None)
        self.stats = FetchStats()

    def waiting_reason(self) -> str | None:
        """Why no download may start now (metered link outside its window), else None."""
        window = self.policy.window
        return None if window is None else window.waiting_reason(self.local_now())

    def check_window(self, what: str) -> None:
        reason = self.waiting_reason()
        if reason is not None:
            raise WaitingForWindow(f"{what}: {reason}")

    def throttle(self, n: int, meter: RateMeter) -> None:
        if self.bucket is not None:
            meter.pause(self.bucket.take(n))

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**self.headers(), **(extra or {}), "Accept-Encoding": "identity"}

    def _check(self, response: httpx.Response, url: str, ok: tuple[int, ...] = (200,)) -> None:
        status = response.status_code
        if status == 401:
            raise AuthError(f"fleet refused the device credential for {url} (401)")
        if status in RETRY_STATUS:
            raise Retryable(f"GET {url} answered HTTP {status}")
        if status not in ok:
            raise DownloadError(f"GET {url} answered HTTP {status}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(
                f"GET {url} answered with Content-Encoding {encoding!r}; the agent asks for identity "
                "and verifies raw bytes only (turn compression off for this path on the server/proxy)"
            )

    def _retrying(self, what: str, once: Callable[[], bytes | None]) -> bytes | None:
        import httpx

        last: Exception | None = None
        for attempt in range(self.policy.attempts):
            if self.cancel.is_set():
                raise Cancelled(f"{what}: the agent is stopping")
            try:
                return once()
            except Retryable as exc:
                last = exc
            except httpx.HTTPError as exc:
                last = exc
            if attempt + 1 < self.policy.attempts:
                delay = backoff_delay(attempt, self.policy, self.rand)
                self.delays.append(delay)
                log.warning("%s: attempt %d of %d failed (%s); next in %.2f s",
                            what, attempt + 1, self.policy.attempts, last, delay)
                if self.cancel.wait(delay):
                    raise Cancelled(f"{what}: the agent is stopping")
        raise DownloadError(f"{what} failed after {self.policy.attempts} attempts: {last}")

    # -- envelope ---------------------------------------------------------------------

    def fetch_envelope(self, url: str, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> bytes:
        def once() -> bytes:
            with self.client.stream("GET", url, headers=self._headers(),
                                    timeout=self.policy.timeout()) as response:
                self._check(response, url)
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > max_bytes:
                        raise DownloadError(f"envelope at {url} is larger than {max_bytes} bytes")
                return bytes(body)

        data = self._retrying(f"GET {url}", once)
        assert data is not None
        return data

    # -- blobs ------------------------------------------------------------------------

    def fetch_blob(self, url: str, ref: FileRef, blobs: BlobStore) -> None:
        """Stream one blob into the store, resuming a kept partial; placed only when length
        and hash hold. A partial survives retryable failures and is resumed next time."""
        try:
            self._retrying(f"blob {ref.sha256[:12]}… from {url}", lambda: self._blob_once(url, ref, blobs))
        except (LengthMismatchError, HashMismatchError):
            blobs.discard(ref.sha256)
            raise
        except OSError as exc:
            blobs.discard(ref.sha256)
            if exc.errno == errno.ENOSPC:
                raise disk_full(exc, f"blob {ref.sha256[:12]}") from None
            raise

    def _blob_once(self, url: str, ref: FileRef, blobs: BlobStore) -> None:
        import hashlib

        sha = ref.sha256[:12]
        self.check_window(f"blob {sha}…")
        offset, digest = blobs.resume_partial(ref.sha256)
        if offset > ref.size:
            log.warning("blob %s…: partial of %d bytes is longer than %d; starting over",
                        sha, offset, ref.size)
            blobs.discard(ref.sha256)
            offset, digest = 0, hashlib.sha256()
        if offset == ref.size:
            self._place(ref, blobs, digest, resumed=True)
            return
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        with self.client.stream("GET", url, headers=self._headers(extra),
                                timeout=self.policy.timeout()) as response:
            if offset and response.status_code == 416:
                blobs.discard(ref.sha256)
                raise Retryable(f"GET {url}: range from {offset} not satisfiable (416); starting over")
            self._check(response, url, ok=(200, 206) if offset else (200,))
            if response.status_code == 206:
                self._check_content_range(response, url, ref, offset, blobs)
            elif offset:
                log.warning("blob %s…: the server ignored Range bytes=%d- (HTTP 200); taking it from byte 0",
                            sha, offset)
                offset, digest = 0, hashlib.sha256()
            remaining = ref.size - offset
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) != remaining:
                raise LengthMismatchError(
                    f"blob {sha}… at {url} announces {declared} bytes from offset {offset}, "
                    f"the manifest's size {ref.size} leaves {remaining}"
                )
            meter = RateMeter(self.policy, self.clock)
            # write + hash on a worker thread (BlobWriter): they overlap the transfer
            with blobs.open_partial(ref.sha256, append=offset > 0) as dest, BlobWriter(dest, digest) as sink:
                for chunk in response.iter_raw():
                    n = len(chunk)
                    if n > remaining:
                        raise LengthMismatchError(f"blob {sha}… at {url} is longer than {ref.size} bytes")
                    sink.write(chunk)
                    remaining -= n
                    self.stats.add(network=n)
                    self.throttle(n, meter)
                    meter.add(n, f"blob {sha}…")
                    if self.cancel.is_set():
                        raise Cancelled(f"blob {sha}…: the agent is stopping (partial kept)")
            if remaining:
                raise Retryable(f"blob {sha}… at {url} ended {remaining} bytes short of {ref.size}")
        self._place(ref, blobs, digest, resumed=offset > 0)

    def _check_content_range(self, response: httpx.Response, url: str, ref: FileRef, offset: int,
                             blobs: BlobStore) -> None:
        value = response.headers.get("content-range", "")
        m = CONTENT_RANGE_RE.match(value.strip())
        total_ok = m is not None and (m.group(3) == "*" or int(m.group(3)) == ref.size)
        if m is None or int(m.group(1)) != offset or int(m.group(2)) != ref.size - 1 or not total_ok:
            blobs.discard(ref.sha256)
            raise Retryable(
                f"GET {url}: 206 with Content-Range {value!r}, expected bytes {offset}-{ref.size - 1}/"
                f"{ref.size}; dropping the partial and starting over"
            )

    def _place(self, ref: FileRef, blobs: BlobStore, digest: hashlib._Hash, *, resumed: bool) -> None:
        if digest.hexdigest() != ref.sha256:
            blobs.discard(ref.sha256)
            if resumed:
                raise Retryable(f"blob {ref.sha256[:12]}…: resumed file does not hash right; starting over")
            raise HashMismatchError(
                f"file hash {digest.hexdigest()[:12]}… does not match the manifest's {ref.sha256[:12]}…"
            )
        blobs.commit(ref.sha256)
