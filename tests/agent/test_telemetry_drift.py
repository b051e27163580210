"""Drift: PSI of live inputs over the bins of the bundle's baseline quantiles, carried into
Health per model; and the system figures of Health."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from agent.runtime.metrics import (
    BASELINE_LEVELS,
    Baseline,
    BaselineInput,
    DriftTracker,
    baseline_bins,
    parse_baseline,
    psi,
)
from agent.telemetry.drift import BaselineAttacher
from agent.telemetry.reporter import Reporter
from agent.update.blobs import BlobStore
from fleet.bundles.build import input_baseline
from fleet.demo.models import field_traffic
from shared.bundle.keyring import Keyring
from shared.telemetry import messages

from .conftest import Bundles, make_rig, resign


def baseline_of(samples: dict[str, np.ndarray]) -> Baseline:
    """A baseline written exactly as the bundle build writes it."""
    doc = input_baseline([samples])
    return parse_baseline(json.dumps(doc).encode())


def test_bins_from_quantiles() -> None:
    q = dict(zip([str(lv) for lv in BASELINE_LEVELS], [-2.3, -1.6, -0.7, 0.0, 0.7, 1.6, 2.3], strict=True))
    edges, shares = baseline_bins(BaselineInput(count=1000, mean=0, std=1, quantiles=q))  # type: ignore[misc]
    assert edges.tolist() == [-2.3, -1.6, -0.7, 0.0, 0.7, 1.6, 2.3]
    assert np.allclose(shares, [0.01, 0.04, 0.20, 0.25, 0.25, 0.20, 0.04, 0.01])
    # Equal quantiles (zero padding fills the lower half) merge their bins.
    q = dict(zip([str(lv) for lv in BASELINE_LEVELS], [0, 0, 0, 0, 0.5, 0.9, 1.0], strict=True))
    edges, shares = baseline_bins(BaselineInput(count=10, mean=0, std=1, quantiles=q))  # type: ignore[misc]
    assert edges.tolist() == [0, 0.5, 0.9, 1.0] and np.allclose(shares, [0.5, 0.25, 0.2, 0.04, 0.01])
    assert baseline_bins(BaselineInput(count=0, mean=0, std=0, quantiles={})) is None
    assert baseline_bins(BaselineInput(count=1, mean=0, std=0, quantiles={"0.5": 1, "0.75": 0})) is None


def test_psi_and_tracker() -> None:
    rng = np.random.default_rng(0)
    base = baseline_of({"a": rng.normal(size=20000), "b": rng.normal(size=20000)})
    expected = np.array([0.01, 0.04, 0.2, 0.25, 0.25, 0.2, 0.04, 0.01])
    assert psi(np.array([1, 4, 20, 25, 25, 20, 4, 1]), expected) < 1e-9
    tracker = DriftTracker(base)
    for _ in range(100):
        tracker.observe({"a": rng.normal(size=(1, 16)), "b": rng.normal(1.0, 1.0, size=(1, 16))})
    scores = tracker.scores()
    assert scores["a"] < 0.05 < 0.25 < scores["b"]
    # A quiet window reports nothing and carries its values into the next one.
    tracker.observe({"a": rng.normal(size=(1, 16)), "b": rng.normal(size=(1, 16))})
    assert tracker.scores() == {}
    for _ in range(20):
        tracker.observe({"a": rng.normal(size=(1, 16)), "b": rng.normal(size=(1, 16))})
    assert set(tracker.scores()) == {"a", "b"}
    # Large tensors are subsampled: at most `sample` values per request.
    tracker.observe({"a": rng.normal(size=(1, 224, 224, 3)), "b": np.zeros((2, 2))})
    state = tracker._inputs["a"]
    assert state.fill + int(state.counts.sum()) <= tracker.sample
    # Unknown inputs and non-numeric arrays are ignored.
    tracker.observe({"c": np.ones(3), "a": np.array(["x"])})


def test_parse_baseline_refusals() -> None:
    with pytest.raises(ValueError, match="schema"):
        parse_baseline(b'{"schema": "other/v9", "inputs": {}}')
    with pytest.raises(ValueError, match="invalid"):
        parse_baseline(b"{not json")
    with pytest.raises(ValueError, match="more than"):
        parse_baseline(b" " * 100, max_bytes=10)


def test_health_reports_drift_of_the_active_release(bundles: Bundles, keyring: Keyring,
                                                    tmp_path: Path) -> None:
    rig = make_rig(tmp_path / "state", keyring)
    rig.host.on_load = BaselineAttacher(BlobStore(rig.state_dir))
    rig.installer.install_file(bundles.build(1))
    rep = Reporter(device_id="dev-d", mqtt_url="mqtt://127.0.0.1:9", state_dir=rig.state_dir, host=rig.host)
    try:
        rng = np.random.default_rng(5)
        # Like the validation data ([0, 1)): low drift.
        for _ in range(100):
            rig.predict(rng.random((2, 4), dtype=np.float32))
        calm = rep.health()
        # Field traffic reaches 2.2: far outside the baseline's bins.
        for _ in range(100):
            rig.predict(field_traffic(rng, batch=2))
        shifted = rep.health()
        empty = rep.health()
    finally:
        rep.spool.close()
    m = calm.models[0]
    assert m.drift is not None and m.drift_inputs is not None and set(m.drift_inputs) == {"x"}
    # The demo bundle's baseline comes from its 8 golden rows only: in-distribution PSI is not 0.
    assert m.drift == m.drift_inputs["x"] < 0.3
    assert shifted.models[0].drift is not None and shifted.models[0].drift > 1.0
    assert empty.models[0].drift is None  # no traffic in the window, no score
    # The figures go over the wire and back through the shared schema.
    back = messages.decode("health", messages.encode(shifted), device_id="dev-d")
    assert back.models[0].drift_inputs == shifted.models[0].drift_inputs

    # System figures: the agent process, the device, the state_dir's disk.
    assert calm.mem_rss_mb > 10 and calm.disk_free_mb > 0 and calm.cpu_percent >= 0
    assert calm.device_cpu_percent is not None and 0 <= calm.device_cpu_percent <= 100
    assert calm.temperature_c is None or -40 < calm.temperature_c < 200


def test_release_without_usable_baseline_serves_without_drift(
    bundles: Bundles, keyring: Keyring, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = resign(bundles.build(7), tmp_path / "bad-baseline.bundle", keyring,
                 replace_files={"baseline": msgspec.json.encode({"schema": "nope", "inputs": {}})})
    rig = make_rig(tmp_path / "state", keyring)
    rig.host.on_load = BaselineAttacher(BlobStore(rig.state_dir))
    rig.installer.install_file(bad)
    assert "baseline unusable" in caplog.text
    loaded = rig.host.get("clf")
    assert loaded is not None and loaded.metrics.drift is None
    rig.predict(np.zeros((1, 4), dtype=np.float32))
    snap = loaded.metrics.snapshot(reset_window=True)
    assert snap.inferences == 1 and snap.drift is None and snap.drift_inputs is None
