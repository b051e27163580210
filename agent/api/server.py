"""The local inference API: loopback HTTP and an optional Unix socket.

    GET  /healthz                   200 while the process runs
    GET  /readyz                    200 when a model is loaded, else 503
    GET  /v1/models                 active models with release, version, signature, batching
    POST /v1/models/{name}/predict  JSON {"inputs": {...}}, application/x-npz (one array per
                                    input) or application/x-npy (one array, single-input models)
    GET|POST|DELETE /v1/locks/...   update locks of local applications (agent.api.locks)

The reply has the request's format unless ``Accept`` asks for another one (an x-npy
reply needs a single-output model; x-npy requests of several-output models get npz).
Requests run through the model's scheduler (dynamic batching); one without a result
within ``request_timeout_s`` is answered 504. Errors are JSON
``{"error": "<code>", "detail": "<what to do>"}``. The server never dies on bad input:
every request is answered or its connection closed. See docs/agent-api.md.

HTTP/1.1 framing is agent.api.http1's (not http.server, which brings ssl and email.* into
every agent); tests/agent/test_api_headers.py keeps them out of ``import agent.main``.
Connections, workers and timeouts are agent.api.connections'; a body is judged by its
declared size (413) and the ``BodyBudget`` of bodies in flight (503) before it is read, and
JSON inputs are decoded by agent.api.json_inputs (docs/agent-api.md, "Limits").
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agent.api import locks as lock_routes
from agent.api.connections import Connection, ConnectionLimits, ConnectionServer
from agent.api.http1 import RequestHandler
from agent.api.json_inputs import JsonInputError, decode_inputs
from agent.errors import ConfigError, InferenceError, InputError, UnknownModelError
from agent.runtime.batching import RequestTimeout
from agent.runtime.host import LoadedModel, ModelHost
from agent.update.locks import LockError, LockTable

log = logging.getLogger(__name__)

NPZ = "application/x-npz"
NPY = "application/x-npy"
JSON = "application/json"
FORMATS = (JSON, NPZ, NPY)
PREDICT_PREFIX = "/v1/models/"


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def _specs(specs: list[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in specs]


def describe(model: LoadedModel, max_batch_rows: int = 1) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "release": model.release,
        "version": m.version,
        "digest": model.digest,
        "runtime": m.runtime,
        "inputs": _specs(m.inputs),
        "outputs": _specs(m.outputs),
        "max_batch_rows": max_batch_rows,
    }


def _json_inputs(model: LoadedModel, body: bytes | bytearray) -> dict[str, np.ndarray]:
    try:
        return decode_inputs(body, {s.name: s.dtype for s in model.manifest.inputs}, model.name)
    except JsonInputError as exc:
        raise ApiError(400, exc.code, exc.detail) from None


def _npz_inputs(body: bytes | bytearray, max_bytes: int) -> dict[str, np.ndarray]:
    import zipfile  # only .npz bodies need it (~1.7 MB): not loaded with the agent

    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:  # BytesIO copies a bytearray
            total = sum(info.file_size for info in npz.zip.infolist())
            if total > max_bytes:
                raise ApiError(413, "too_large", f"the npz expands to {total} bytes, max {max_bytes}")
            return {k: npz[k] for k in npz.files}
    except ApiError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ApiError(400, "bad_npz", f"the body is not a valid .npz without pickles: {exc}") from None


def _npy_inputs(model: LoadedModel, body: bytes | bytearray) -> dict[str, np.ndarray]:
    names = [s.name for s in model.manifest.inputs]
    if len(names) != 1:
        raise ApiError(400, "input", f"{NPY} carries one array but model {model.name} takes inputs "
                       f"{names}; send {NPZ} with one array per input")
    return {names[0]: _npy_array(body)}


class _SlowPath(Exception):
    """A .npy header this module does not parse itself (format 3.0): numpy's reader decodes it."""


# Parsed .npy headers, keyed by their bytes: an application sends the same header with every
# request, and parsing it (ast.literal_eval) costs more than the rest of the decode.
_NPY_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], bool]] = {}


def _npy_header(body: bytes | bytearray) -> tuple[np.dtype[Any], tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a .npy body; ValueError when malformed."""
    if body[:6] != b"\x93NUMPY" or len(body) < 10:
        raise ValueError("the magic string \\x93NUMPY is missing")
    major = body[6]
    if major == 1:
        start = 10
        end = start + int.from_bytes(body[8:10], "little")
    elif major in (2, 3):
        start = 12
        end = start + int.from_bytes(body[8:12], "little")
    else:
        raise ValueError(f"unknown .npy format version {major}.{body[7]}")
    key = bytes(body[:end])
    parsed = _NPY_HEADERS.get(key)
    if parsed is None:
        buf = io.BytesIO(key)
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:  # 3.0 (utf-8 field names): numpy's reader, not cached
            raise _SlowPath
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are not allowed")
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_NPY_HEADERS) >= 64:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = parsed
    return (*parsed, end)


def _npy_read(body: bytes | bytearray) -> np.ndarray:
    buf = io.BytesIO(body)
    arr = np.lib.format.read_array(buf, allow_pickle=False)
    if buf.tell() != len(body):
        raise ApiError(400, "bad_npy", f"the body has {len(body) - buf.tell()} bytes after the array")
    return arr


def _npy_array(body: bytes | bytearray) -> np.ndarray:
    """The array of a .npy body, without copying its data (a read-only view of ``body``)."""
    try:
        try:
            dtype, shape, fortran, offset = _npy_header(body)
        except _SlowPath:
            return _npy_read(body)
        count = 1
        for dim in shape:
            count *= dim
        need = count * dtype.itemsize
        have = len(body) - offset
        if have < need:
            raise ValueError(f"the array needs {need} bytes of data, the body holds {have}")
        if have > need:
            raise ApiError(400, "bad_npy", f"the body has {have - need} bytes after the array")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
    except ApiError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ApiError(400, "bad_npy", f"the body is not a valid .npy without pickles: {exc}") from None


_NPY_OUT_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_bytes(arr: np.ndarray) -> bytes:
    """A .npy of ``arr``; the header of a (dtype, shape) is built once (numpy's writer
    spends more time on it than on the data of a typical output)."""
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    key = (arr.dtype.str, arr.shape)
    header = _NPY_OUT_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        if arr.dtype.hasobject:
            np.lib.format.write_array(buf, arr, allow_pickle=False)  # raises ValueError
        try:
            np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
        except ValueError:  # a shape too long for a 1.0 header: numpy picks the version
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            return buf.getvalue()
        header = buf.getvalue()
        if len(_NPY_OUT_HEADERS) >= 64:
            _NPY_OUT_HEADERS.clear()
        _NPY_OUT_HEADERS[key] = header
    return header + arr.tobytes()


def _reply_format(accept: str, request_format: str, n_outputs: int) -> str:
    """The reply's media type: the first fitting one ``Accept`` lists, else the request's.

    q-values are not weighed; x-npy fits only a model with one output.
    """
    default = NPZ if request_format == NPY and n_outputs != 1 else request_format
    wanted = [part.split(";", 1)[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not wanted:
        return default
    for media in wanted:
        if media in FORMATS and not (media == NPY and n_outputs != 1):
            return media
        if media in ("*/*", "application/*"):
            return default
    if NPY in wanted:
        raise ApiError(406, "not_acceptable", f"{NPY} holds one array and the model has {n_outputs} "
                       f"outputs; accept {NPZ} or {JSON}")
    raise ApiError(406, "not_acceptable", f"the reply can be {JSON}, {NPZ} or {NPY}, not {accept!r}")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


class BodyBudget:
    """Bytes of request bodies (weighted by what decoding them costs) held at once, over all
    connections: what keeps the API's memory bounded whatever the number of clients. A
    request over what is left is answered 503 before its body is read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, cost: int) -> bool:
        with self._lock:
            if self.used + cost > self.limit:
                return False
            self.used += cost
            return True

    def give(self, cost: int) -> None:
        with self._lock:
            self.used -= cost


# What decoding a body costs beyond its bytes, as a multiple of its size (docs/agent-api.md):
# .npy is viewed in place, .npz is copied once and expanded (checked after), JSON text is
# copied twice and parsed into an array (agent.api.json_inputs).
BODY_COST = {NPY: 1, NPZ: 2, JSON: 5}
# A JSON reply is built as Python lists (~32 bytes a number) and encoded (~10-20 more): it
# may hold at most max_json_bytes / this many numbers.
JSON_REPLY_BYTES_PER_NUMBER = 16


class _Handler(RequestHandler):
    server_version = "edgefleet-agent"
    logger = log
    host: ModelHost
    max_body_bytes: int
    max_json_bytes: int
    budget: BodyBudget
    request_timeout_s: float | None
    locks: LockTable | None = None
    update_waiting: Callable[[], dict[str, str]] | None = None

    # -- plumbing -----------------------------------------------------------------

    _send = RequestHandler.send_reply  # status line, headers and a small body in one write

    def _json(self, status: int, doc: Any, **kw: Any) -> None:
        self._send(status, msgspec.json.encode(doc), JSON, **kw)

    def _error(self, exc: ApiError, close: bool = False) -> None:
        if exc.status >= 500 and exc.status != 503:
            log.warning("api %s %s: %s", exc.status, exc.code, exc.detail)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        self._json(exc.status, {"error": exc.code, "detail": exc.detail}, headers=headers, close=close)

    def _guard(self, fn: Any) -> None:
        self._consumed = not self.body_length
        self._cost = 0
        try:
            fn()
        except ApiError as exc:
            # A body left unread would be parsed as the next request: close instead.
            self._error(exc, close=exc.status in (411, 413) or not self._consumed)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except TimeoutError:
            raise  # answered 408 by RequestHandler.serve
        except Exception as exc:  # the server must not die on anything a client sends
            log.exception("api: unexpected error")
            with contextlib.suppress(OSError):
                self._error(ApiError(500, "internal", f"unexpected error: {exc}"), close=True)
        finally:
            if self._cost:
                self.budget.give(self._cost)
                self._cost = 0

    def _body(self, limit: int | None = None, media: str = JSON) -> bytes | bytearray:
        """The body, judged by its declared size before a byte of it is read: 411 without a
        Content-Length, 413 over ``limit``, 503 when the body budget cannot hold it."""
        n = self.body_length
        if n is None:
            raise ApiError(411, "length_required", "a Content-Length header is required")
        limit = self.max_body_bytes if limit is None else limit
        if n > limit:
            hint = f" (api.max_json_bytes); send {NPY} or {NPZ} for large inputs" if media == JSON else ""
            raise ApiError(413, "too_large", f"the body is {n} bytes, max {limit}{hint}")
        cost = n * BODY_COST.get(media, 1)
        if not self.budget.take(cost):
            raise ApiError(503, "busy", f"request bodies of {self.budget.used} bytes (weighted) are being "
                           f"handled, at most {self.budget.limit} (api.max_inflight_bytes); retry later")
        self._cost = cost
        self.send_continue()
        data = self.rfile.read(n)
        self._consumed = True
        if len(data) != n:
            raise ApiError(400, "bad_request", f"the body ended after {len(data)} of {n} bytes")
        return data

    # -- routes -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_HEAD(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def do_PUT(self) -> None:
        self._guard(self._not_allowed)

    def do_DELETE(self) -> None:
        self._guard(self._delete)

    def _delete(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._is_lock_path(path):
            return self._lock_request("DELETE", path)
        self._not_allowed()

    # -- update locks -------------------------------------------------------------------

    def _is_lock_path(self, path: str) -> bool:
        return path == lock_routes.PREFIX or path.startswith(lock_routes.PREFIX + "/")

    def _lock_request(self, method: str, path: str) -> None:
        if self.locks is None:
            raise ApiError(404, "not_found", "update locks are not enabled on this agent")
        body = b""
        if method == "POST" and self.body_length:
            body = self._body(lock_routes.MAX_LOCK_BODY)
        self._consumed = True
        try:
            status, doc = lock_routes.handle(self.locks, method, path, body, self.update_waiting)
        except LockError as exc:
            raise ApiError(exc.status, exc.code, exc.detail) from None
        self._json(status, doc)

    def _not_allowed(self) -> None:
        raise ApiError(405, "method_not_allowed", f"{self.command} is not supported on {self.path}")

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._is_lock_path(path):
            self._lock_request("GET", path)
        elif path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/readyz":
            models = self.host.snapshot()
            if models:
                self._json(200, {"status": "ready", "models": sorted(models)})
            else:
                self._json(503, {"error": "no_model", "detail": "no model is active yet; install a bundle"})
        elif path == "/v1/models":
            models = self.host.snapshot()
            self._json(200, {"models": [describe(m, self._batch_rows(n)) for n, m in sorted(models.items())]})
        elif path.startswith(PREDICT_PREFIX) and path.endswith("/predict"):
            raise ApiError(405, "method_not_allowed", "predict takes POST")
        else:
            raise ApiError(404, "not_found", f"no route {path}; see GET /v1/models")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if self._is_lock_path(path):
            return self._lock_request("POST", path)
        parts = path.split("/")
        if not (len(parts) == 5 and path.startswith(PREDICT_PREFIX) and parts[4] == "predict" and parts[3]):
            raise ApiError(404, "not_found", f"no route {path}; POST /v1/models/<name>/predict")
        name = parts[3]
        model = self.host.get(name)
        if model is None:
            if not self.host.ready():
                raise ApiError(503, "no_model", "no model is active yet; install a bundle")
            raise ApiError(404, "unknown_model",
                           f"no active model {name!r}; active: {sorted(self.host.snapshot())}")
        ctype = self.headers.get("Content-Type", JSON).split(";", 1)[0].strip().lower() or JSON
        if ctype not in FORMATS:
            raise ApiError(415, "unsupported_media_type", f"send {JSON}, {NPZ} or {NPY}, not {ctype!r}")
        body = self._body(self.max_json_bytes if ctype == JSON else self.max_body_bytes, ctype)
        if ctype == NPZ:
            inputs = _npz_inputs(body, self.max_body_bytes)
        elif ctype == NPY:
            inputs = _npy_inputs(model, body)
        else:
            inputs = _json_inputs(model, body)
        del body  # the inputs hold what they need (an .npy view keeps its buffer)
        reply = _reply_format(self.headers.get("Accept", ""), ctype or JSON, len(model.manifest.outputs))
        try:
            used, outputs = self.host.predict(name, inputs, timeout_s=self.request_timeout_s)
        except InputError as exc:
            raise ApiError(400, "input", str(exc)) from None
        except UnknownModelError as exc:
            raise ApiError(404, "unknown_model", str(exc)) from None
        except InferenceError as exc:
            raise ApiError(500, "inference", f"{exc}; the error is counted in health telemetry") from None
        except RequestTimeout as exc:
            raise ApiError(504, "timeout", f"{name}: {exc} (api.request_timeout_s); the device is "
                           "busy, retry later or send fewer requests at once") from None
        headers = {"X-Edgefleet-Release": str(used.release)}
        if reply == NPZ:
            self._send(200, _npz_bytes(outputs), NPZ, headers)
        elif reply == NPY:
            self._send(200, _npy_bytes(next(iter(outputs.values()))), NPY,
                       {**headers, "X-Edgefleet-Output": next(iter(outputs))})
        else:
            numbers = sum(int(np.size(v)) for v in outputs.values())
            if numbers > self.max_json_bytes // JSON_REPLY_BYTES_PER_NUMBER:
                raise ApiError(406, "not_acceptable", f"the outputs hold {numbers} numbers, more than a JSON "
                               f"reply may ({self.max_json_bytes // JSON_REPLY_BYTES_PER_NUMBER}: "
                               f"api.max_json_bytes / {JSON_REPLY_BYTES_PER_NUMBER}); send Accept: {NPZ}")
            self._json(
                200,
                {
                    "model": name,
                    "release": used.release,
                    "outputs": {k: v.tolist() for k, v in outputs.items()},
                },
                headers=headers,
            )

    def _batch_rows(self, name: str) -> int:
        scheduler = self.host.scheduler(name)
        return 1 if scheduler is None else scheduler.max_rows


def _listen_tcp(address: tuple[str, int], backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    try:
        return socket.create_server(address, family=family, backlog=backlog)
    except OSError as exc:
        where = f"api.listen = {address[0]}:{address[1]}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{where}: the address is already in use (another agent running?); "
                              "stop it or choose another port") from None
        raise ConfigError(f"{where}: cannot listen: {exc.strerror or exc}") from None


def _listen_unix(path: Path, backlog: int) -> socket.socket:
    if not path.parent.is_dir():
        raise ConfigError(f"api.unix_socket = {str(path)!r}: directory {path.parent} does not exist "
                          "(the systemd unit's RuntimeDirectory= makes /run/edgefleet; else create it)")
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"api.unix_socket = {str(path)!r}: cannot listen: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _within_open_files(limits: ConnectionLimits) -> ConnectionLimits:
    """``max_connections`` within the process's open-file limit: the soft limit is raised
    toward the hard one when it is short (systemd's default soft limit is 1024), else the
    connections are capped, leaving 128 descriptors to the rest of the agent."""
    import resource

    need = limits.max_connections + 128
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < need:
            capped = max(1, soft - 128)
            log.warning("api: %d open files allowed: api.max_connections %d lowered to %d",
                        soft, limits.max_connections, capped)
            return msgspec.structs.replace(limits, max_connections=capped)
    return limits


class ApiServer:
    """The API on loopback TCP and/or a Unix socket; ``start`` serves in daemon threads
    (agent.api.connections: one thread parks idle connections, ``limits.workers`` serve)."""

    def __init__(self, host: ModelHost, *, listen: tuple[str, int] | None, unix_socket: str = "",
                 max_body_bytes: int = 64 * 1024 * 1024, max_json_bytes: int = 8 * 1024 * 1024,
                 max_inflight_bytes: int = 128 * 1024 * 1024, request_timeout_s: float | None = 30.0,
                 limits: ConnectionLimits | None = None, locks: LockTable | None = None,
                 update_waiting: Callable[[], dict[str, str]] | None = None) -> None:
        self.budget = BodyBudget(max_inflight_bytes)
        handler = type("Handler", (_Handler,), {"host": host, "max_body_bytes": max_body_bytes,
                                                "max_json_bytes": min(max_json_bytes, max_body_bytes),
                                                "budget": self.budget,
                                                "request_timeout_s": request_timeout_s, "locks": locks,
                                                "update_waiting": staticmethod(update_waiting)
                                                if update_waiting else None})
        self.limits = _within_open_files(limits or ConnectionLimits())
        listeners: list[socket.socket] = []
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path: Path | None = None
        try:
            if listen is not None:
                tcp = _listen_tcp(listen, self.limits.backlog)
                listeners.append(tcp)
                self.tcp_address = tcp.getsockname()[:2]
            if unix_socket:
                listeners.append(_listen_unix(Path(unix_socket), self.limits.backlog))
                self.unix_path = Path(unix_socket)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise

        def serve(conn: Connection) -> bool:
            if conn.state is None:
                conn.state = handler(conn)
            return conn.state.serve()  # type: ignore[attr-defined, no-any-return]

        self.connections = ConnectionServer(listeners, serve, self.limits)

    def start(self) -> None:
        self.connections.start()

    def stop(self) -> None:
        self.connections.stop()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)
