"""A small Python client for the agent's local inference API (TCP or Unix socket).

    from agent.client import AgentClient

    with AgentClient(unix_socket="/run/edgefleet/agent.sock") as agent:
        if agent.ready():
            probs = agent.predict("clf", {"x": x})["probs"]

Requests travel as raw tensors (``application/x-edgefleet-tensors``, the default): each
array's bytes as they are in memory, names, dtypes and shapes in one header; no zip, no
parse, no copy on either side. ``framing="npy"|"npz"|"json"`` picks another framing
(``binary=False`` is ``framing="json"``, converting the outputs with the dtypes the model
declares). Every refusal raises AgentError with the server's code (e.g. ``input``,
``unknown_model``, ``timeout``) and detail; an unreachable agent raises AgentUnavailableError.

HTTP/1.1 is spoken on a plain socket kept open between calls (a few idle ones are kept
for callers in several threads): a predict costs one ``sendall`` of the head and the
tensors and the reads of the reply, which is what ``bench/b_api.py`` measures against the
runtime. Inputs are not checked here: the agent checks them against the model's signature
and answers 400 ``input`` with what is wrong.
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec
import numpy as np

from agent.api.codecs import (
    JSON,
    NPY,
    NPZ,
    TENSORS,
    TENSORS_HEADER,
    npy_bytes,
    npy_header,
    tensor_header,
    tensor_layout,
    wire_arrays,
)
from agent.api.errors import ApiError

DEFAULT_URL = "http://127.0.0.1:8181"
FRAMINGS = {"tensors": TENSORS, "npy": NPY, "npz": NPZ, "json": JSON}
_MAX_HEAD = 1 << 16
_SMALL = 1 << 16  # bodies up to this size go out in one write with the head
_IDLE_KEPT = 4  # idle connections kept for the next calls


class AgentError(Exception):
    """The agent answered with an error: ``status``, ``code`` and ``detail`` as it sent them."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class AgentUnavailableError(AgentError):
    """The agent could not be reached (not running, wrong socket path, connection cut)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "unavailable", detail)


class Response:
    __slots__ = ("body", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes | bytearray) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # names lower-cased
        self.body = body

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def text(self) -> str:
        return bytes(self.body).decode("utf-8", "replace")


class _Connection:
    """One keep-alive HTTP/1.1 connection; ``request`` sends a request and reads its reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.used = False  # a request went through it: the agent may have closed it since
        self.closed = False

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def request(self, head: bytes, body: list[Any], size: int) -> Response:
        if size <= _SMALL:
            self.sock.sendall(b"".join((head, *body)) if body else head)
        else:
            self.sock.sendall(head)
            for part in body:
                self.sock.sendall(part)
        return self._reply()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ConnectionResetError("the agent closed the connection")
        self.buf += chunk

    def _reply(self) -> Response:
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise ConnectionError("the reply's head is too long")
            self._fill()
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ConnectionError(f"not an HTTP reply: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        n = int(headers.get("content-length", "0"))
        body: bytearray
        if len(buf) >= n:
            body = bytearray(buf[:n])  # writable outputs, as np.load gives
            del buf[:n]
        else:  # a large body: received straight into its own buffer
            out = bytearray(n)
            have = len(buf)
            out[:have] = buf
            buf.clear()
            view = memoryview(out)
            while have < n:
                k = self.sock.recv_into(view[have:])
                if not k:
                    raise ConnectionResetError("the agent closed the connection mid-reply")
                have += k
            view.release()
            body = out
        if headers.get("connection", "").lower() == "close":
            self.close()
        self.used = True
        return Response(int(code), reason, headers, body)


class AgentClient:
    def __init__(self, url: str | None = None, unix_socket: str | None = None, *,
                 timeout: float = 60.0) -> None:
        if url and unix_socket:
            raise ValueError("give url or unix_socket, not both")
        self.timeout = timeout
        self._unix = str(unix_socket) if unix_socket else None
        if self._unix:
            self._where = f"unix:{self._unix}"
            self._host = "agent"
        else:
            self._where = url or DEFAULT_URL
            parts = urlsplit(self._where)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"url {self._where!r}: the agent's API is plain http://host:port")
            self._address = (parts.hostname, parts.port or 80)
            self._host = parts.netloc
        self._idle: list[_Connection] = []
        self._outputs: dict[str, dict[str, str]] = {}  # model -> output name -> dtype (JSON replies)
        self._paths: dict[str, str] = {}
        self.last_release: int | None = None

    # -- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _connect(self) -> _Connection:
        try:
            if self._unix:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(self._unix)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self._address, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise AgentUnavailableError(f"cannot reach the agent at {self._where}: {exc}") from None
        return _Connection(sock)

    def _request(self, method: str, path: str, body: list[Any] | None = None,
                 headers: dict[str, str] | None = None) -> Response:
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in body) if body else 0
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Length: {size}\r\n"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        data = (head + "\r\n").encode("latin-1")
        for attempt in (0, 1):
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._connect()
            try:
                response = conn.request(data, body or [], size)
            except (OSError, ConnectionError) as exc:
                conn.close()
                # A kept connection the agent closed meanwhile (idle timeout, restart): once more
                # on a new one. A new connection failing is the agent's answer.
                if attempt == 0 and conn.used and not isinstance(exc, TimeoutError):
                    continue
                raise AgentUnavailableError(f"cannot reach the agent at {self._where}: {exc}") from None
            if not conn.closed and len(self._idle) < _IDLE_KEPT:
                self._idle.append(conn)
            elif not conn.closed:
                conn.close()
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _raise(response: Response) -> None:
        try:
            doc = response.json()
            code, detail = str(doc["error"]), str(doc["detail"])
        except (ValueError, KeyError, TypeError, msgspec.DecodeError):
            code, detail = "http", response.text[:500] or response.reason
        raise AgentError(response.status, code, detail)

    def _json_call(self, method: str, path: str, doc: Any = None) -> Response:
        if doc is None:
            return self._request(method, path)
        return self._request(method, path, [msgspec.json.encode(doc)], {"Content-Type": JSON})

    # -- API ----------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when the agent serves at least one model (False when it is up but has none)."""
        response = self._request("GET", "/readyz")
        if response.status == 503:
            return False
        if response.status != 200:
            self._raise(response)
        return True

    def models(self) -> list[dict[str, Any]]:
        """The active models: name, release, version, digest, runtime, inputs, outputs, batching."""
        response = self._request("GET", "/v1/models")
        if response.status != 200:
            self._raise(response)
        models: list[dict[str, Any]] = response.json()["models"]
        for m in models:
            self._outputs[m["name"]] = {o["name"]: o["dtype"] for o in m["outputs"]}
        return models

    def predict(self, name: str, inputs: dict[str, np.ndarray], *, binary: bool = True,
                framing: str | None = None) -> dict[str, np.ndarray]:
        """Run the active release of ``name``; the release that answered is in ``last_release``.

        ``framing``: "tensors" (default), "npy" (single-input, single-output models), "npz"
        or "json" (``binary=False``)."""
        media = FRAMINGS.get(framing or ("tensors" if binary else "json"))
        if media is None:
            raise ValueError(f"framing {framing!r}: one of {', '.join(FRAMINGS)}")
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = f"/v1/models/{quote(name, safe='')}/predict"
        if media == TENSORS:
            arrays = wire_arrays(inputs)
            headers = {"Content-Type": TENSORS, TENSORS_HEADER: tensor_header(arrays)}
            response = self._request("POST", path, [a.reshape(-1).view(np.uint8) for a in arrays.values()],
                                     headers)
        elif media == NPY:
            if len(inputs) != 1:
                raise ValueError(f"framing npy carries one array, got {len(inputs)} inputs")
            (arr,) = wire_arrays(inputs).values()
            header = npy_header(arr)  # the header, then the array's own bytes: no copy
            body = [npy_bytes(arr)] if header is None else [header, arr.reshape(-1).view(np.uint8)]
            response = self._request("POST", path, body, {"Content-Type": NPY})
        elif media == NPZ:
            buf = io.BytesIO()
            # numpy's stub reads **arrays as its allow_pickle: bool
            np.savez(buf, **{k: np.asarray(v) for k, v in inputs.items()})  # type: ignore[arg-type]
            response = self._request("POST", path, [buf.getvalue()], {"Content-Type": NPZ, "Accept": NPZ})
        else:
            doc = {"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
            response = self._json_call("POST", path, doc)
        if response.status != 200:
            self._raise(response)
        release = response.headers.get("x-edgefleet-release")
        self.last_release = int(release) if release and release.isdigit() else None
        return self._outputs_of(name, response)

    def _outputs_of(self, name: str, response: Response) -> dict[str, np.ndarray]:
        ctype = response.headers.get("content-type", "").split(";", 1)[0].strip()
        body = response.body
        if ctype == TENSORS:
            try:
                layout = tensor_layout(response.headers.get(TENSORS_HEADER.lower()))
            except ApiError as exc:
                raise AgentError(response.status, "bad_reply", exc.detail) from None
            out, offset = {}, 0
            for out_name, dtype, shape, nbytes in layout:
                arr = np.frombuffer(body, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
                out[out_name] = arr.reshape(shape)
                offset += nbytes
            return out
        if ctype == NPZ:
            with np.load(io.BytesIO(body), allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if ctype == NPY:
            output = response.headers.get("x-edgefleet-output", "output")
            return {output: np.load(io.BytesIO(body), allow_pickle=False)}
        outputs = response.json()["outputs"]
        if name not in self._outputs:
            self.models()
        dtypes = self._outputs.get(name, {})
        return {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in outputs.items()}

    # -- update locks (docs/agent-api.md "Update locks") ----------------------------------

    def _lock_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._json_call(method, path, body)
        if response.status != 200:
            self._raise(response)
        doc: dict[str, Any] = response.json()
        return doc

    def acquire_lock(self, holder: str, lease_s: float, reason: str = "") -> dict[str, Any]:
        """Hold off activation of updates for ``lease_s`` seconds (renew before it runs out).
        Answers ``{"holder", "lease_s", "expires_in_s", "expires_at", "reason"}``."""
        return self._lock_call("POST", f"/v1/locks/{quote(holder, safe='')}",
                               {"lease_s": lease_s, "reason": reason})

    def renew_lock(self, holder: str, lease_s: float | None = None) -> dict[str, Any]:
        """A new lease for a lock still held; AgentError ``no_lock`` (404) once it lapsed."""
        body = {} if lease_s is None else {"lease_s": lease_s}
        return self._lock_call("POST", f"/v1/locks/{quote(holder, safe='')}/renew", body)

    def release_lock(self, holder: str) -> None:
        self._lock_call("DELETE", f"/v1/locks/{quote(holder, safe='')}")

    def locks(self) -> dict[str, Any]:
        """``{"locks": [...], "waiting": {model: what its staged release waits for}}``."""
        return self._lock_call("GET", "/v1/locks")

    @contextlib.contextmanager
    def update_lock(self, holder: str, lease_s: float, reason: str = "") -> Iterator[dict[str, Any]]:
        """``with agent.update_lock("camera-app", 60):`` holds the lock for the block (renew it
        with ``renew_lock`` if the block may outlast the lease), releases it on exit."""
        lease = self.acquire_lock(holder, lease_s, reason)
        try:
            yield lease
        finally:
            with contextlib.suppress(AgentError):
                self.release_lock(holder)
