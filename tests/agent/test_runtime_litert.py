"""The LiteRT backend, the backend registry and several models on one host, with real runtimes."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.errors import LoadError
from agent.runtime.host import ModelHost
from agent.runtime.litert_backend import LiteRtBackend, interpreter_class, tflite_runtime_refusal
from agent.runtime.onnx_backend import OnnxBackend
from agent.runtime.registry import BackendRegistry, default_backends
from agent.update.blobs import BlobStore
from agent.update.installer import Installer
from agent.update.lifecycle import UpdateState
from agent.update.store import StateStore
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_tflite_classifier
from shared.bundle.keyring import Keyring

from .conftest import Bundles, verified


def tflite_bundle(bundles: Bundles, release: int = 1, *, name: str = "tcl", seed: int = 0,
                  int8: bool = False) -> Path:
    """A signed bundle of the demo TFLite classifier (manifest.runtime == "litert")."""
    out = bundles.directory / f"{name}-r{release}-s{seed}-{int8}.bundle"
    if not out.exists():
        model = bundles.directory / f"tcl-{seed}-{int8}.tflite"
        write_tflite_classifier(model, int8_weights=int8, seed=seed)
        build_bundle(model, name=name, version=f"2.{release}", release=release, keyring=bundles.keyring,
                     out=out, golden_inputs=golden_inputs())
    return out


def reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the demo TFLite classifier computes, in NumPy (same draws as the writer)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    logits = x @ w.T + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_installer(state: Path, keyring: Keyring, host: ModelHost, backend: object = None) -> Installer:
    return Installer(store=StateStore(state), blobs=BlobStore(state), host=host,
                     trust_root=keyring.trust_root(), backend=backend or default_backends())  # type: ignore[arg-type]


def model_path(bundle: Path, bundles: Bundles, tmp_path: Path) -> tuple[Path, object]:
    from .conftest import read_bundle

    vm = verified(bundle, bundles.keyring)
    path = tmp_path / "model.tflite"
    path.write_bytes(read_bundle(bundle)[1][vm.manifest.files["model"].sha256])
    return path, vm.manifest


def test_session_resizes_dynamic_batch_and_matches_numpy(bundles: Bundles, tmp_path: Path) -> None:
    path, manifest = model_path(tflite_bundle(bundles), bundles, tmp_path)
    session = LiteRtBackend(num_threads=2).load(path, manifest)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    for rows in (1, 5, 2, 5, 1, 64):
        x = rng.random((rows, 4), dtype=np.float32)
        got = session.run({"x": x})["probs"]
        assert got.shape == (rows, 3) and got.dtype == np.float32
        assert np.allclose(got, reference(x), atol=1e-5)


def test_int8_weights_load_and_stay_close(bundles: Bundles, tmp_path: Path) -> None:
    path, manifest = model_path(tflite_bundle(bundles, int8=True), bundles, tmp_path)
    session = LiteRtBackend().load(path, manifest)  # type: ignore[arg-type]
    x = np.random.default_rng(4).random((16, 4), dtype=np.float32)
    assert np.allclose(session.run({"x": x})["probs"], reference(x), atol=0.05)


def test_one_interpreter_is_shared_safely_by_threads(bundles: Bundles, tmp_path: Path) -> None:
    path, manifest = model_path(tflite_bundle(bundles), bundles, tmp_path)
    session = LiteRtBackend(interpreters=1).load(path, manifest)  # type: ignore[arg-type]
    errors: list[str] = []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(40):
            x = rng.random((int(rng.integers(1, 6)), 4), dtype=np.float32)
            got = session.run({"x": x})["probs"]
            if got.shape != (len(x), 3) or not np.allclose(got, reference(x), atol=1e-5):
                errors.append(f"wrong result for {len(x)} rows")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_onnx_and_tflite_models_active_at_once(bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    host = ModelHost()
    installer = make_installer(tmp_path / "state", keyring, host)
    installer.install_file(bundles.build(1))
    installer.install_file(tflite_bundle(bundles))
    models = host.snapshot()
    assert {m.manifest.runtime for m in models.values()} == {"onnxruntime", "litert"}
    x = np.random.default_rng(5).random((3, 4), dtype=np.float32)
    assert np.allclose(host.predict("tcl", {"x": x})[1]["probs"], reference(x), atol=1e-5)
    assert host.predict("clf", {"x": x})[1]["probs"].shape == (3, 3)
    # A restart loads both again, each with its own backend.
    host2 = ModelHost()
    make_installer(tmp_path / "state", keyring, host2).recover()
    assert sorted(host2.snapshot()) == ["clf", "tcl"]


def test_runtime_this_agent_does_not_run_fails_install_with_load(
        bundles: Bundles, keyring: Keyring, tmp_path: Path) -> None:
    host = ModelHost()
    installer = make_installer(tmp_path / "state", keyring, host, BackendRegistry([OnnxBackend()]))
    installer.install_file(bundles.build(1))
    with pytest.raises(LoadError, match=r"needs runtime 'litert'.*runs onnxruntime"):
        installer.install_file(tflite_bundle(bundles))
    rec = installer.store.load("tcl")
    assert rec is not None and rec.state == UpdateState.FAILED and rec.reason == "load"
    assert rec.active is None and sorted(host.snapshot()) == ["clf"]


def test_litert_not_installed_fails_install_with_load(bundles: Bundles, keyring: Keyring, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    installer = make_installer(tmp_path / "state", keyring, ModelHost())
    with pytest.raises(LoadError, match=r"no LiteRT runtime on this device.*pip install ai-edge-litert"):
        installer.install_file(tflite_bundle(bundles))
    rec = installer.store.load("tcl")
    assert rec is not None and rec.reason == "load" and "ai-edge-litert" in rec.message


def test_tflite_runtime_under_numpy2_is_refused() -> None:
    assert tflite_runtime_refusal("2.14.0", "2.1.0") is not None
    assert "NumPy 1" in (tflite_runtime_refusal("2.13.0", "2.0.0") or "")
    assert tflite_runtime_refusal("2.14.0", "1.26.4") is None
    assert tflite_runtime_refusal("2.15.0", "2.1.0") is None


def _fake_tflite_runtime(root: Path, version: str) -> None:
    pkg = root / "tflite_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "interpreter.py").write_text("class Interpreter:\n    fake = True\n")
    dist = root / f"tflite_runtime-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tflite-runtime\nVersion: {version}\n")


def test_fallback_to_tflite_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    old = tmp_path / "old"
    old.mkdir()
    _fake_tflite_runtime(old, "2.14.0")
    monkeypatch.syspath_prepend(str(old))
    with pytest.raises(LoadError, match=r"tflite-runtime 2\.14\.0 is built for NumPy 1"):
        interpreter_class()
    assert "tflite_runtime.interpreter" not in sys.modules  # refused before importing it
    monkeypatch.setattr(np, "__version__", "1.26.4")
    try:
        cls, origin = interpreter_class()
        assert cls.fake and origin == "tflite_runtime 2.14.0"
    finally:
        sys.modules.pop("tflite_runtime.interpreter", None)
        sys.modules.pop("tflite_runtime", None)


def test_runtimes_are_imported_only_by_the_backend_that_needs_them() -> None:
    import subprocess

    code = ("import sys, agent.main, agent.cli, agent.client, agent.batch, agent.runtime.registry; "
            "print([m for m in ('ai_edge_litert', 'tflite_runtime', 'onnxruntime') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
