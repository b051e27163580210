"""Dynamic batching in the model host, with real onnxruntime sessions and real threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.errors import InferenceError
from agent.runtime.batching import BatchPolicy, RequestTimeout, batch_axis_reason
from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from fleet.bundles.build import build_bundle
from shared.bundle.keyring import Keyring

from .conftest import Bundles, make_rig

X_SHAPE = ["batch", 4]


def write_onnx(path: Path, nodes: list[onnx.NodeProto], inputs: dict[str, list[int | str]],
               outputs: dict[str, list[int | str]]) -> Path:
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def onnx_bundle(bundles: Bundles, kind: str, release: int = 1) -> Path:
    """Small real models: ``fixed`` (batch axis fixed at 2), ``rows`` (softmax over the batch
    axis: rows depend on each other), ``pair`` (inputs a, b -> sum, diff)."""
    out = bundles.directory / f"{kind}-r{release}.bundle"
    if out.exists():
        return out
    rng = np.random.default_rng(0)
    if kind == "fixed":
        path = write_onnx(bundles.directory / "fixed.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                          {"x": [2, 4]}, {"y": [2, 4]})
        golden = {"x": rng.random((2, 4), dtype=np.float32)}
    elif kind == "rows":
        path = write_onnx(bundles.directory / "rows.onnx",
                          [helper.make_node("Softmax", ["x"], ["y"], axis=0)], {"x": X_SHAPE}, {"y": X_SHAPE})
        golden = {"x": rng.random((3, 4), dtype=np.float32)}
    else:
        path = write_onnx(bundles.directory / "pair.onnx",
                          [helper.make_node("Add", ["a", "b"], ["sum"]),
                           helper.make_node("Sub", ["a", "b"], ["diff"])],
                          {"a": X_SHAPE, "b": X_SHAPE}, {"sum": X_SHAPE, "diff": X_SHAPE})
        golden = {"a": rng.random((3, 4), dtype=np.float32), "b": rng.random((3, 4), dtype=np.float32)}
    build_bundle(path, name=kind, version="1", release=release, keyring=bundles.keyring, out=out,
                 golden_inputs=golden)
    return out


class GatedSession:
    """A real session whose runs wait while the gate is closed (to hold a worker busy)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running.set()
        self.gate.wait(10)
        return self.inner.run(inputs)  # type: ignore[attr-defined]


def gated(host: ModelHost, name: str) -> GatedSession:
    """Swap the active model of ``name`` for the same release on a GatedSession."""
    model = host.get(name)
    assert model is not None
    session = GatedSession(model.session)
    host.swap(LoadedModel(manifest=model.manifest, release=model.release, digest=model.digest,
                          session=session))
    return session


def concurrently(fns: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(fns)

    def call(i: int) -> None:
        try:
            results[i] = fns[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results


def host_with(keyring: Keyring, tmp_path: Path, policy: BatchPolicy, *bundle_files: Path) -> ModelHost:
    rig = make_rig(tmp_path / "state", keyring)
    rig.host.policy = policy
    for b in bundle_files:
        rig.installer.install_file(b)
    return rig.host


WINDOW = BatchPolicy(max_batch_size=16, max_queue_delay_s=0.3, workers=1)


def test_merged_runs_equal_unbatched_runs(bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    host = host_with(keyring, tmp_path, WINDOW, bundles.build(1))
    model = host.get("clf")
    assert model is not None and host.scheduler("clf").max_rows == 16  # type: ignore[union-attr]
    rng = np.random.default_rng(7)
    xs = [rng.random((int(rng.integers(1, 4)), 4), dtype=np.float32) for _ in range(6)]
    results = concurrently([lambda x=x: host.predict("clf", {"x": x})[1] for x in xs])
    assert host.scheduler("clf").batches >= 1  # type: ignore[union-attr]
    for x, got in zip(xs, results, strict=True):
        assert isinstance(got, dict), got
        want = model.session.run({"x": x})["probs"]
        assert got["probs"].shape == want.shape
        assert np.allclose(got["probs"], want, rtol=1e-6, atol=1e-7)
    snap = model.metrics.snapshot()
    assert (snap.inferences, snap.errors) == (6, 0)  # requests are counted, not runs


def test_a_failing_row_fails_only_its_request(bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    """The faulty demo model fails a whole run when any row has a value >= 2."""
    host = host_with(keyring, tmp_path, WINDOW, bundles.build(1, variant="faulty"))
    good = [np.full((2, 4), 0.5, dtype=np.float32) for _ in range(4)]
    bad = np.array([[0.1, 2.5, 0.1, 0.1]], dtype=np.float32)
    inputs = [*good[:2], bad, *good[2:]]
    results = concurrently([lambda x=x: host.predict("clf", {"x": x})[1] for x in inputs])
    assert host.scheduler("clf").split_retries >= 1  # type: ignore[union-attr]
    assert isinstance(results[2], InferenceError) and "clf r1 failed" in str(results[2])
    assert all(isinstance(r, dict) and r["probs"].shape == (2, 3) for i, r in enumerate(results) if i != 2)
    snap = host.get("clf").metrics.snapshot()  # type: ignore[union-attr]
    assert (snap.inferences, snap.errors) == (5, 1)


@pytest.mark.parametrize(("kind", "reason"), [("fixed", "fixed first axis 2"),
                                              ("rows", "changes when rows run together")])
def test_models_that_cannot_batch_run_unbatched(bundles: Bundles, keyring: Keyring, tmp_path: Path,
                                                 kind: str, reason: str) -> None:
    host = host_with(keyring, tmp_path, WINDOW, onnx_bundle(bundles, kind))
    scheduler = host.scheduler(kind)
    assert scheduler is not None and scheduler.max_rows == 1 and reason in (scheduler.unbatched_reason or "")
    rows = 2 if kind == "fixed" else 3
    xs = [np.random.default_rng(i).random((rows, 4), dtype=np.float32) for i in range(4)]
    results = concurrently([lambda x=x: host.predict(kind, {"x": x})[1] for x in xs])
    model = host.get(kind)
    assert model is not None and scheduler.batches == 0
    for x, got in zip(xs, results, strict=True):
        assert np.allclose(got["y"], model.session.run({"x": x})["y"])  # type: ignore[index]


def test_batch_axis_reason_reads_the_signature(bundles: Bundles, keyring: Keyring) -> None:
    from .conftest import verified

    assert batch_axis_reason(verified(bundles.build(1), keyring).manifest) is None
    assert "fixed first axis" in (batch_axis_reason(verified(onnx_bundle(bundles, "fixed"), keyring).manifest)
                                  or "")


def test_batching_off_and_requests_of_other_shapes(bundles: Bundles, keyring: Keyring,
                                                   tmp_path: Path) -> None:
    host = host_with(keyring, tmp_path, BatchPolicy(max_batch_size=1), bundles.build(1))
    assert "off" in (host.scheduler("clf").unbatched_reason or "")  # type: ignore[union-attr]
    host2 = host_with(keyring, tmp_path / "b", WINDOW, onnx_bundle(bundles, "pair"))
    a = np.ones((2, 4), np.float32)
    # a request whose inputs disagree on the row count is never merged, and is still answered
    results = concurrently([
        lambda: host2.predict("pair", {"a": a, "b": a})[1],
        lambda: host2.predict("pair", {"a": a[:1], "b": a[:1] * 3})[1],
    ])
    assert np.allclose(results[0]["sum"], 2) and np.allclose(results[1]["diff"], -2)  # type: ignore[index]


def test_queued_request_times_out_unrun(bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    host = host_with(keyring, tmp_path, BatchPolicy(max_batch_size=1, workers=1), bundles.build(1))
    session = gated(host, "clf")
    session.gate.clear()
    x = np.zeros((1, 4), np.float32)
    first = threading.Thread(target=host.predict, args=("clf", {"x": x}))
    first.start()
    assert session.running.wait(5)
    start = time.monotonic()
    with pytest.raises(RequestTimeout, match="no worker took the request") as info:
        host.predict("clf", {"x": x}, timeout_s=0.2)
    assert not info.value.started and 0.15 < time.monotonic() - start < 2
    session.gate.set()
    first.join(5)
    snap = host.get("clf").metrics.snapshot()  # type: ignore[union-attr]
    assert snap.inferences == 1  # the timed-out request never ran


def test_swap_while_requests_are_queued_drops_nothing(bundles: Bundles, keyring: Keyring,
                                                      tmp_path: Path) -> None:
    rig = make_rig(tmp_path / "state", keyring)
    rig.host.policy = BatchPolicy(max_batch_size=4, workers=1)
    rig.installer.install_file(bundles.build(1))
    session = gated(rig.host, "clf")
    session.gate.clear()
    x = np.zeros((1, 4), np.float32)
    pending = []
    for _ in range(6):
        t = threading.Thread(target=lambda: pending.append(rig.host.predict("clf", {"x": x})[0].release))
        t.start()
    assert session.running.wait(5)
    rig.installer.install_file(bundles.build(2, seed=1))  # queued requests stay on r1's scheduler
    after = rig.host.predict("clf", {"x": x})[0].release
    session.gate.set()
    deadline = time.monotonic() + 5
    while len(pending) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert after == 2 and pending == [1] * 6


def test_onnx_backend_unchanged_for_direct_use(bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    """The installer's smoke test still runs sessions directly, outside any scheduler."""
    from .conftest import read_bundle, verified

    vm = verified(bundles.build(1), keyring)
    path = tmp_path / "m.onnx"
    path.write_bytes(read_bundle(bundles.build(1))[1][vm.manifest.files["model"].sha256])
    session = OnnxBackend().load(path, vm.manifest)
    assert session.run({"x": np.zeros((3, 4), np.float32)})["probs"].shape == (3, 3)


def test_config_keys(make_config: Callable[..., object]) -> None:
    from agent.config import AgentConfig
    from agent.errors import ConfigError

    cfg = make_config()
    assert isinstance(cfg, AgentConfig)
    assert (cfg.runtime.max_batch_size, cfg.runtime.max_queue_delay_ms) == (8, 0.0)
    assert cfg.api.request_timeout_s == 30.0
    assert 1 <= cfg.runtime.resolved_workers <= 4
    cfg = make_config(runtime={"max_batch_size": 1, "max_queue_delay_ms": 2, "workers": 3},
                      api={"listen": "127.0.0.1:0", "request_timeout_s": 0.5})
    assert isinstance(cfg, AgentConfig)
    assert cfg.runtime.max_queue_delay_ms == 2.0 and cfg.runtime.resolved_workers == 3
    assert cfg.api.request_timeout_s == 0.5
    for bad in ({"max_batch_size": 0}, {"max_queue_delay_ms": -1}, {"workers": -1}, {"max_batch_size": "8"}):
        with pytest.raises(ConfigError, match=r"runtime\."):
            make_config(runtime=bad)
    with pytest.raises(ConfigError, match=r"api\.request_timeout_s"):
        make_config(api={"request_timeout_s": 0})
