"""What every benchmark shares: result rows, timing statistics, real and built models,
signed bundles, agent configs and processes, RSS.

Every row compares ours with a baseline measured in the same run on the same machine,
so a noisy machine moves both; a row never asserts a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
AGENT_VENV = BENCH / ".venv-agent"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")

OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_PREFIX = "rapidocr_onnxruntime/models/"


@dataclass
class Row:
    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    target: str
    met: bool | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row(name: str, ours: float, baseline: float, unit: str, target: str, *,
        met: bool | None = None, note: str = "", ratio: float | None = None) -> Row:
    """A result row; ``target`` like '<= 1.3x' or '>= 1.5x' decides ``met`` unless given."""
    r = ratio if ratio is not None else (ours / baseline if baseline else float("inf"))
    if met is None and target:
        op, _, value = target.partition(" ")
        bound = float(value.rstrip("x"))
        met = r <= bound if op == "<=" else r >= bound
    return Row(name, round(ours, 4), round(baseline, 4), unit, round(r, 3), target, met, note)


# -- statistics -------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, per_round: int,
                warmup: int = 3) -> dict[str, list[float]]:
    """Time each fn ``rounds * per_round`` times, alternating in blocks, so noise hits both."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return times


# -- models -------------------------------------------------------------------------------------


def model_cache() -> Path:
    """The same cache the real-model tests use (tests/bundles/conftest.py)."""
    return Path(os.environ.get("EDGEFLEET_MODEL_CACHE", Path.home() / ".cache" / "edgefleet" / "models"))


def ocr_models() -> Path:
    """PP-OCRv4 det/rec from the rapidocr-onnxruntime wheel (pip download --no-deps, cached)."""
    root = model_cache() / OCR_WHEEL.replace("==", "-")
    if (root / ".complete").exists():
        return root
    wheels = root / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                    "--dest", str(wheels), OCR_WHEEL], check=True, timeout=600)
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(OCR_PREFIX) and name.endswith(".onnx"):
                (root / Path(name).name).write_bytes(zf.read(name))
    wheel.unlink()
    (root / ".complete").touch()
    return root


def ocr_model(kind: str) -> Path:
    return ocr_models() / f"ch_PP-OCRv4_{kind}_infer.onnx"


def text_images(n: int, h: int, w: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic text lines normalised as PP-OCR expects (as in the real-model tests)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((h, w, 3), 235.0) + rng.normal(0, 6, (h, w, 3))
        for _ in range(int(rng.integers(3, 8))):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 10)
            img[y:y + rng.integers(3, 8), x:x + rng.integers(4, 20)] = rng.uniform(10, 60)
        out.append({"x": ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)})
    return out


def write_conv_model(path: Path, *, channels: tuple[int, ...] = (8,), fc: int = 0, classes: int = 10) -> None:
    """A small CNN built with onnx.helper: x [batch, 3, H, W] -> probs [batch, classes].

    Conv(3x3, stride 2) + Relu per entry of ``channels``, global average pool, an optional
    hidden fully connected layer of ``fc`` units, a classifier and a softmax.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev, c_in = [], [], "x", 3
    for i, c in enumerate(channels):
        w = (rng.normal(size=(c, c_in, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(c, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                      strides=[2, 2], kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, c_in = f"r{i}", c
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    prev = "flat"
    if fc:
        inits.append(numpy_helper.from_array((rng.normal(size=(c_in, fc)) * 0.1).astype(np.float32), "wf"))
        inits.append(numpy_helper.from_array(np.zeros(fc, np.float32), "bf"))
        nodes += [helper.make_node("Gemm", ["flat", "wf", "bf"], ["h"]),
                  helper.make_node("Relu", ["h"], ["hr"])]
        prev, c_in = "hr", fc
    inits.append(numpy_helper.from_array((rng.normal(size=(c_in, classes)) * 0.1).astype(np.float32), "wc"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "bc"))
    nodes += [helper.make_node("Gemm", [prev, "wc", "bc"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, "bench_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    Path(path).write_bytes(model.SerializeToString())


def write_classifier(path: Path) -> None:
    from fleet.demo.models import write_classifier as demo

    demo(path)


def ort_session(model: Path, threads: int = 1) -> Any:
    """An onnxruntime session with the agent's options (agent/runtime/onnx_backend.py)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


# -- bundles and agents --------------------------------------------------------------------------


def keyring(directory: Path) -> Any:
    from shared.bundle.keyring import init_keyring, load_keyring

    if (directory / "root.json").exists():
        return load_keyring(directory)
    return init_keyring(directory)


def build(model: Path, name: str, golden: dict[str, np.ndarray], keys: Any, out: Path,
          **kw: Any) -> Any:
    from fleet.bundles.build import build_bundle

    return build_bundle(model, name=name, version="1.0.0", release=kw.pop("release", 1), keyring=keys,
                        out=out, golden_inputs=golden, **kw)


def agent_python() -> Path:
    """The lean device venv (``pip install '.[agent]'`` only); made once by ``make bench``."""
    py = AGENT_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AGENT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"{ROOT}[agent]"], check=True)
    return py


def agent_env() -> dict[str, str]:
    """The lean venv runs the repository's current code (its deps, our sources).

    Our sources are byte-compiled once and cached as on a device (pip and the .deb compile
    the installed package); the cache lives in the lean venv, not in the tree. Without it,
    under PYTHONDONTWRITEBYTECODE, every agent start compiled ~55 modules (0.11-0.16 s)
    that the bare baseline, all from site-packages, never compiles.
    """
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONPYCACHEPREFIX"] = str(AGENT_VENV / "pycache")
    return env


def write_agent_config(path: Path, *, state_dir: Path, trust_root: Path, unix_socket: Path,
                       runtime: dict[str, Any] | None = None) -> Path:
    lines = [f'state_dir = "{state_dir}"', f'trust_root = "{trust_root}"', "[api]", 'listen = ""',
             f'unix_socket = "{unix_socket}"', "[runtime]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in (runtime or {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_install(config: Path, bundle: Path) -> None:
    py = agent_python()
    proc = subprocess.run([str(py), "-m", "agent", "-c", str(config), "install", str(bundle)],
                          env=agent_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"edgefleet-agent install failed: {proc.stdout}{proc.stderr}")


def start_agent(config: Path, log: Path, python: Path | None = None) -> subprocess.Popen[bytes]:
    """The installed ``edgefleet-agent`` command of the venv (what the systemd unit starts)."""
    py = python or agent_python()
    with open(log, "ab") as fh:
        return subprocess.Popen([str(py.parent / "edgefleet-agent"), "-c", str(config), "--log-level",
                                 "WARNING", "run"], env=agent_env(), stdout=fh, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_ready(sock: Path, timeout: float = 120.0, proc: subprocess.Popen[bytes] | None = None,
               interval: float = 0.005) -> float:
    """Poll GET /readyz on the Unix socket; return the monotonic time it first answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            c = UnixHttp(sock)
            try:
                status, _, _ = c.request("GET", "/readyz")
            finally:
                c.close()
            if status == 200:
                return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"agent on {sock} not ready within {timeout} s")


class UnixHttp:
    """A minimal HTTP/1.1 keep-alive client on a Unix socket: what a lean C/Python app does.

    It adds as little as possible of its own, so the latency measured is the agent's.
    """

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
        self.sock.sendall(head.encode() + body if len(body) < 65536 else head.encode())
        if len(body) >= 65536:
            self.sock.sendall(body)
        return self._response()

    def _response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return status, headers, body

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buf += chunk


def npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / (1 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[str]:
    """A private Mosquitto on a free loopback port (never 1883); yields its mqtt:// URL."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 100000\n")
    binary = next((b for b in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(b).exists()), None)
    if binary is None:
        raise RuntimeError("mosquitto is not installed (Debian package 'mosquitto')")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start")
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        stop(proc)  # type: ignore[arg-type]


def postgres_url() -> str:
    return os.environ.get("EDGEFLEET_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pg_schema(base: str) -> contextlib.AbstractContextManager[str]:
    """A fresh PostgreSQL schema for one benchmark, dropped after it."""
    from fleet.db.engine import temporary_schema

    return temporary_schema(base, "bench")


def emit(rows: list[Row]) -> None:
    """Print a module's rows as JSON on the last line of stdout (bench.run collects them)."""
    print("BENCH_ROWS " + json.dumps([r.as_dict() for r in rows]), flush=True)


# -- the models the agent benchmarks serve ---------------------------------------------------------


def bench_model(kind: str, workdir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """(model file, one realistic input) for 'rec', 'det', 'clf' (demo) or 'cnn224'."""
    if kind == "rec":
        return ocr_model("rec"), text_images(1, 48, 320)[0]
    if kind == "det":
        return ocr_model("det"), text_images(1, 320, 320)[0]
    if kind == "clf":
        path = workdir / "clf.onnx"
        write_classifier(path)
        return path, {"x": np.random.default_rng(1).random((1, 4), dtype=np.float32)}
    if kind == "mlp":
        path = workdir / "mlp.onnx"
        write_mlp_model(path)
        return path, {"x": np.random.default_rng(1).random((1, 256), dtype=np.float32)}
    if kind == "cnn224":
        path = workdir / "cnn224.onnx"
        write_conv_model(path, channels=(8,))
        return path, {"x": np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)}
    raise ValueError(kind)


@dataclass
class PreparedAgent:
    config: Path
    socket: Path
    model: Path
    name: str
    sample: dict[str, np.ndarray]
    workdir: Path


def prepare_agent(kind: str, workdir: Path, runtime: dict[str, Any] | None = None) -> PreparedAgent:
    """Build a signed bundle of the model, write an offline agent config (state_dir, trust_root,
    a Unix socket) and install the bundle with ``edgefleet-agent install`` from the lean venv."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = keyring(workdir.parent / "keys")
    model, sample = bench_model(kind, workdir)
    bundle = workdir / f"{kind}.bundle"
    build(model, kind, sample, keys, bundle, atol=1e-2, rtol=1e-2)
    sock = Path(f"/tmp/edgefleet-bench-{os.getpid()}-{kind}-{len(list(workdir.parent.iterdir()))}.sock")
    config = write_agent_config(workdir / "agent.toml", state_dir=workdir / "state",
                                trust_root=keys.root_path, unix_socket=sock, runtime=runtime)
    agent_install(config, bundle)
    return PreparedAgent(config, sock, model, kind, sample, workdir)


def write_mlp_model(path: Path, *, width: int = 2048, layers: int = 3, features: int = 256) -> None:
    """x [batch, features] -> y [batch, 16] through ``layers`` dense layers of ``width``: weights
    far larger than the CPU caches, so a run of one row streams every weight from memory and a
    batch of rows shares that cost (the case dynamic batching exists for)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev, d_in = [], [], "x", features
    for i in range(layers):
        w = (rng.normal(size=(d_in, width)) / np.sqrt(d_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        prev, d_in = f"r{i}", width
    inits += [numpy_helper.from_array((rng.normal(size=(d_in, 16)) / np.sqrt(d_in)).astype(np.float32), "wo"),
              numpy_helper.from_array(np.zeros(16, np.float32), "bo")]
    nodes.append(helper.make_node("Gemm", [prev, "wo", "bo"], ["y"]))
    graph = helper.make_graph(
        nodes, "bench_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    Path(path).write_bytes(model.SerializeToString())


# -- fleet processes, proxies, telemetry ------------------------------------------------------------


@contextlib.contextmanager
def fleet_process(workdir: Path, mqtt_url: str, database_url: str, *,
                  env: dict[str, str] | None = None, roles: Sequence[str] | None = None,
                  urls: dict[str, str] | None = None) -> Iterator[tuple[str, str, str, Path]]:
    """A real ``python -m fleet.cli.main serve`` on PostgreSQL and the given broker.

    Yields (http URL, admin token, enrollment token, keys dir); its log is workdir/fleet.log.
    ``roles`` (e.g. ``("api", "ingester", "controller")``): one process per role instead
    (``serve --role ROLE``, the same database, broker, keys, data dir and tokens), started in
    that order, each answering /healthz and /metrics on its own port; the URL yielded is the
    api's, ``urls`` (when given) receives each role's, and the logs are workdir/fleet-ROLE.log."""
    import httpx

    keys_dir = workdir / "keys"
    keyring(keys_dir)
    admin, enroll = "bench-admin-token-0123456789", "bench-enroll-token-0123456789"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    started: list[tuple[subprocess.Popen[bytes], Any]] = []
    role_urls: dict[str, str] = {}
    try:
        for role in roles or (None,):
            port = free_port()
            argv = [sys.executable, "-m", "fleet.cli.main", "serve", "--host", "127.0.0.1",
                    "--port", str(port), "--data-dir", str(workdir / "fleet-data"), "--keys", str(keys_dir),
                    "--database-url", database_url, "--mqtt-url", mqtt_url,
                    "--admin-token", admin, "--enrollment-token", enroll]
            name = "fleet.log" if role is None else f"fleet-{role}.log"
            if role is not None:
                argv += ["--role", role]
            log = open(workdir / name, "ab")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir)
            started.append((proc, log))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the fleet exited: {(workdir / name).read_text()[-1500:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the fleet ({name}) did not answer /healthz within 60 s")
                time.sleep(0.2)
            role_urls[role or "all"] = url
        if urls is not None:
            urls.update(role_urls)
        yield role_urls.get("api") or next(iter(role_urls.values())), admin, enroll, keys_dir
    finally:
        for proc, log in reversed(started):
            stop(proc)  # type: ignore[arg-type]
            log.close()


class CountingProxy:
    """A loopback TCP proxy in front of ``target`` counting the bytes each way (threads).

    With ``keep`` it also keeps the bytes of each direction (all connections one after the
    other) and counts the reads (about one per TCP segment for small messages); ``mark()``
    notes where the streams are, ``between_marks()`` gives what passed between the last two."""

    def __init__(self, target_host: str, target_port: int, *, keep: bool = False) -> None:
        import threading

        self.target = (target_host, target_port)
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self.connections = 0
        self.keep = keep
        self.data = {"up": bytearray(), "down": bytearray()}
        self.segments = 0
        self.marks: list[tuple[int, int, int, int]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def mark(self) -> None:
        with self._lock:
            self.marks.append((len(self.data["up"]), len(self.data["down"]), self.segments, self.connections))

    def between_marks(self) -> tuple[bytes, bytes]:
        (u0, d0, _s0, _c0), (u1, d1, _s1, _c1) = self.marks[-2:]
        with self._lock:
            return bytes(self.data["up"][u0:u1]), bytes(self.data["down"][d0:d1])

    def segments_between_marks(self) -> int:
        return self.marks[-1][2] - self.marks[-2][2]

    def connections_between_marks(self) -> int:
        return self.marks[-1][3] - self.marks[-2][3]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if way == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    if self.keep:
                        self.data[way] += data
                        self.segments += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def health_payload(device_id: str, seq: int, *, model: str = "clf", release: int = 1,
                   state: str = "committed", inferences: int = 100, errors: int = 0,
                   interval_s: float = 5.0, encoding: str = "json", session: str = "") -> bytes:
    """One encoded v1 health message (shared.telemetry.messages.Health) with one model, in
    ``encoding`` ("json", or "msgpack": the agent's default, ``[mqtt] encoding``). The fleet
    stores a (device, session, seq) once: a run that numbers from 1 again needs its own session."""
    from shared.telemetry import messages

    m = messages.ModelHealth(name=model, release=release, version=f"1.0.{release}", state=state,
                             inferences=inferences, errors=errors, total_inferences=inferences * seq,
                             total_errors=errors * seq, latency_p50_ms=1.2, latency_p95_ms=3.4)
    return messages.encode(messages.Health(v=messages.VERSION, device_id=device_id, seq=seq, ts=time.time(),
                                           interval_s=interval_s, models=[m], cpu_percent=3.0,
                                           mem_rss_mb=90.0, mem_percent=4.0, disk_free_mb=1000.0,
                                           uptime_s=10.0 * seq, session=session), encoding)  # type: ignore[arg-type]


def insert_devices(database_url: str, ids: list[str], labels: dict[str, str] | None = None) -> None:
    """Known devices straight into the database (what enrollment leaves, without the HTTP round trip)."""
    from fleet.db.engine import make_engine, session_scope
    from fleet.db.models import Device

    engine = make_engine(database_url)
    with session_scope(engine) as session:
        for d in ids:
            session.add(Device(id=d, labels=dict(labels or {}), credential_hash="0" * 64))
    engine.dispose()
