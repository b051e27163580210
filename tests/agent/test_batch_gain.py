"""Batching auto: the pure decision on measured figures, and what the agent does and says
(GET /v1/models over real HTTP) with real models: one whose batch axis is fixed (cannot
batch), one whose calibration shows no gain, one whose calibration shows a gain. The
figures are injected where the decision must be deterministic; the measurement itself is
run for real once, with no assertion on its timings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.api.server import ApiServer
from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.main import Agent
from agent.runtime.batch_gain import LIVE_MIN_RUNS, Calibration, LiveGain, Run, decide, measure_gain
from agent.runtime.batching import BatchPolicy
from agent.runtime.host import ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from shared.bundle.keyring import Keyring

from ..waiting import wait_for
from .conftest import Bundles, make_rig, verified
from .test_runtime_batching import onnx_bundle

# PP-OCRv4 rec and the bench MLP as measured on this project's CI machine (docs/performance.md)
REC = Calibration(rows=8, single_s=0.0244, batched_s=8 * 0.0353)
MLP = Calibration(rows=8, single_s=0.00339, batched_s=8 * 0.00089)


def test_decision_on_figures() -> None:
    assert decide(MLP) is None and MLP.gain == pytest.approx(3.81, abs=0.01)
    reason = decide(REC)
    assert reason is not None and "does not pay" in reason and "gain 0.69x" in reason
    assert "8 rows in one run take 35.300 ms a row against 24.400 ms alone" in reason
    assert decide(Calibration(rows=4, single_s=1.0, batched_s=4 / 1.2)) is None  # exactly the bound
    assert decide(Calibration(rows=4, single_s=1.0, batched_s=4 / 1.19)) is not None
    assert decide(Calibration(rows=1, single_s=1.0, batched_s=1.0)) is not None
    assert decide(REC, min_gain=0.5) is None
    assert MLP.summary() == {"rows": 8, "single_ms": 3.39, "batched_ms": 7.12, "gain": 3.81}


def fixed(calibration: Calibration) -> Callable[[Run, dict[str, np.ndarray], int], Calibration]:
    """A measurement that answers ``calibration`` (after running the rows for real once)."""
    def measure(run: Run, row: dict[str, np.ndarray], rows: int) -> Calibration:
        run({k: np.concatenate([v] * rows) for k, v in row.items()})
        return Calibration(rows, calibration.single_s, calibration.batched_s * rows / calibration.rows)
    return measure


class Served:
    def __init__(self, tmp_path: Path, keyring: Keyring, host: ModelHost) -> None:
        self.rig = make_rig(tmp_path / "state", keyring)
        self.rig.installer.host = host
        self.host = host
        self.server = ApiServer(host, listen=("127.0.0.1", 0))
        self.server.start()
        h, port = self.server.tcp_address  # type: ignore[misc]
        self.http = httpx.Client(base_url=f"http://{h}:{port}", timeout=10)

    def models(self) -> dict[str, dict[str, object]]:
        return {m["name"]: m for m in self.http.get("/v1/models").json()["models"]}

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.host.close()


Serve = Callable[[ModelHost], "Served"]


@pytest.fixture
def serve(tmp_path: Path, keyring: Keyring) -> Iterator[Serve]:
    made: list[Served] = []

    def make(host: ModelHost) -> Served:
        made.append(Served(tmp_path / str(len(made)), keyring, host))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_no_gain_turns_batching_off_and_says_so(serve: Serve, bundles: Bundles) -> None:
    s = serve(ModelHost(BatchPolicy(max_batch_size=8, workers=2, auto=True), measure=fixed(REC)))
    s.rig.installer.install_file(bundles.build(1))
    clf = s.models()["clf"]
    batching = clf["batching"]
    assert clf["max_batch_rows"] == 1
    assert isinstance(batching, dict) and batching["mode"] == "auto" and batching["enabled"] is False
    assert "does not pay" in batching["reason"] and batching["calibration"]["rows"] == 4
    assert batching["calibration"]["gain"] == pytest.approx(REC.gain, abs=0.01)
    x = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    r = s.http.post("/v1/models/clf/predict", json={"inputs": {"x": x.tolist()}})
    assert r.status_code == 200 and np.allclose(r.json()["outputs"]["probs"],
                                              s.host.predict("clf", {"x": x})[1]["probs"], atol=1e-6)


def test_gain_keeps_batching_on(serve: Serve, bundles: Bundles) -> None:
    s = serve(ModelHost(BatchPolicy(max_batch_size=8, workers=2, auto=True), measure=fixed(MLP)))
    s.rig.installer.install_file(bundles.build(1))
    clf = s.models()["clf"]
    assert clf["max_batch_rows"] == 8
    assert clf["batching"] == {"mode": "auto", "enabled": True, "reason": None,
                               "calibration": {"rows": 4, "single_ms": 3.39, "batched_ms": 3.56,
                                               "gain": 3.81}}


def test_a_fixed_batch_axis_cannot_batch(serve: Serve, bundles: Bundles) -> None:
    calls: list[int] = []

    def measure(run: Run, row: dict[str, np.ndarray], rows: int) -> Calibration:
        calls.append(rows)
        return MLP

    s = serve(ModelHost(BatchPolicy(max_batch_size=8, workers=2, auto=True), measure=measure))
    s.rig.installer.install_file(onnx_bundle(bundles, "fixed"))
    batching = s.models()["fixed"]["batching"]
    assert batching["enabled"] is False and "fixed first axis 2" in batching["reason"]  # type: ignore[index]
    assert batching["calibration"] is None and calls == []  # type: ignore[index]


def test_on_and_off_modes(serve: Serve, bundles: Bundles) -> None:
    on = serve(ModelHost(BatchPolicy(max_batch_size=8, workers=2, auto=False), measure=fixed(REC)))
    on.rig.installer.install_file(bundles.build(1))
    assert on.models()["clf"]["batching"] == {"mode": "on", "enabled": True, "reason": None,
                                              "calibration": None}
    off = serve(ModelHost(BatchPolicy(max_batch_size=1, workers=2, auto=True)))
    off.rig.installer.install_file(bundles.build(1))
    batching = off.models()["clf"]["batching"]
    assert batching["mode"] == "off" and batching["enabled"] is False  # type: ignore[index]


def test_the_measurement_runs_the_real_session(bundles: Bundles, keyring: Keyring) -> None:
    path = bundles.build(1)
    vm = verified(path, keyring)
    model = bundles.model()
    session = OnnxBackend().load(model, vm.manifest)
    cal = measure_gain(session.run, {"x": np.ones((1, 4), np.float32)}, 4)
    assert cal.rows == 4 and cal.single_s > 0 and cal.batched_s > 0


def test_config(make_config: Callable[..., AgentConfig]) -> None:
    assert make_config().runtime.batching == "auto"
    assert make_config(runtime={"batching": "on"}).runtime.batching == "on"
    with pytest.raises(ConfigError, match=r"runtime\.batching"):
        make_config(runtime={"batching": "always"})


def test_live_figures_turn_batching_off_only_when_merging_does_not_pay() -> None:
    live = LiveGain()
    assert live.verdict() is None
    for _ in range(LIVE_MIN_RUNS):
        live.note(0.0244, 1, merged=False)  # rec: 24.4 ms a row alone
        live.note(8 * 0.0353, 8, merged=True)  # 35.3 ms a row in eights
    reason = live.verdict()
    assert reason is not None and "35.300 ms a row against 24.400 ms a row alone" in reason
    mlp = LiveGain()
    for _ in range(LIVE_MIN_RUNS):
        mlp.note(0.00339, 1, merged=False)
        mlp.note(8 * 0.00089, 8, merged=True)
    assert mlp.verdict() is None
    few = LiveGain()
    for _ in range(LIVE_MIN_RUNS - 1):
        few.note(0.001, 1, merged=False)
        few.note(1.0, 2, merged=True)
    assert few.verdict() is None  # too few runs to say
    few.note(0.001, 1, merged=False)
    few.note(1.0, 2, merged=True)
    assert few.verdict() is not None


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_the_agent_status_names_the_batching_decision(make_config: Callable[..., AgentConfig],
                                                      bundles: Bundles, mode: str) -> None:
    agent = Agent(make_config(runtime={"batching": mode, "max_batch_size": 8}))
    agent.start()
    try:
        agent.installer.install_file(bundles.build(1))
        host, port = agent.api.tcp_address  # type: ignore[union-attr, misc]

        def batching() -> dict[str, object]:
            doc = httpx.get(f"http://{host}:{port}/v1/status", timeout=10).json()["batching"]["clf"]
            return doc if "probe is running" not in str(doc["reason"]) else {}  # type: ignore[no-any-return]

        doc = wait_for(batching, 30, "the batching probe's answer")
        assert doc["mode"] == mode
        # auto: a real measurement, so either decision; both come with the figures
        if mode == "auto":
            calibration = doc["calibration"]
            assert isinstance(calibration, dict) and calibration["rows"] == 4 and calibration["gain"] > 0
            assert doc["enabled"] is (doc["reason"] is None)
        else:
            assert doc == {"mode": "on", "enabled": True, "reason": None, "calibration": None}
    finally:
        agent.stop()
