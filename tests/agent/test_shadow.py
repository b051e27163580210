"""Shadow evaluation on the device: comparison, sampling, CPU budget, the bounded queue, and a
candidate run beside the serving release on real onnxruntime sessions."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from agent.runtime.shadow import (
    BusyBudget,
    Comparison,
    Sampler,
    ShadowPolicy,
    ShadowRunner,
    class_score_output,
    compare_outputs,
)
from fleet.demo.models import field_traffic, golden_inputs, write_classifier
from fleet.demo.shadow_models import write_divergent_classifier
from shared.bundle.manifest import Manifest, Quantization, TensorSpec, Tolerance


def manifest(outputs: list[TensorSpec], release: int = 2) -> Manifest:
    return Manifest(
        schema="edgefleet.manifest/v1", name="clf", release=release, version=f"1.{release}",
        created="2026-01-01T00:00:00Z", expires="2027-01-01T00:00:00Z", runtime="onnxruntime",
        quantization=Quantization(mode="none"),
        min_agent_version="0.0.0", inputs=[TensorSpec("x", "float32", ["batch", 4])], outputs=outputs,
        files={}, golden_tolerance=Tolerance(atol=1e-4, rtol=1e-3),
    )


PROBS = TensorSpec("probs", "float32", ["batch", 3])
BOXES = TensorSpec("boxes", "float32", ["batch", "n", 4])


# -- comparison ------------------------------------------------------------------------------


def test_class_scores_are_the_first_float_output_with_a_fixed_last_axis() -> None:
    assert class_score_output(manifest([PROBS])) == "probs"
    assert class_score_output(manifest([TensorSpec("emb", "float32", ["batch", "dim"])])) is None
    assert class_score_output(manifest([TensorSpec("score", "float32", [1])])) is None
    assert class_score_output(manifest([TensorSpec("ids", "int64", ["batch", 5])])) is None


def test_argmax_agreement_with_error_and_cosine_figures() -> None:
    m = manifest([PROBS])
    cur = {"probs": np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32)}
    same_top = {"probs": np.array([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]], np.float32)}
    flipped = {"probs": np.array([[0.1, 0.2, 0.7], [0.1, 0.8, 0.1]], np.float32)}
    agree = compare_outputs(m, cur, same_top, class_output="probs")
    assert agree.agrees and agree.max_abs_error == pytest.approx(0.2, abs=1e-6)
    assert agree.cosine is not None and 0.9 < agree.cosine < 1.0
    differ = compare_outputs(m, cur, flipped, class_output="probs")
    assert not differ.agrees and differ.max_abs_error == pytest.approx(0.6, abs=1e-6)


def test_tensor_outputs_agree_within_the_golden_tolerance() -> None:
    m = manifest([BOXES])
    cur = {"boxes": np.ones((1, 2, 4), np.float32)}
    close = {"boxes": cur["boxes"] + 5e-4}  # within atol 1e-4 + rtol 1e-3 * 1
    far = {"boxes": cur["boxes"] + 0.05}
    ok = compare_outputs(m, cur, close, class_output=None)
    assert ok.agrees and ok.cosine == pytest.approx(1.0)
    bad = compare_outputs(m, cur, far, class_output=None)
    assert not bad.agrees and bad.max_abs_error == pytest.approx(0.05, rel=1e-3)
    wrong_shape = compare_outputs(m, cur, {"boxes": np.ones((1, 3, 4), np.float32)}, class_output=None)
    assert wrong_shape == Comparison(False, None, None)


# -- sampling and budget ------------------------------------------------------------------------


def test_sampler_takes_exactly_its_rate_evenly() -> None:
    s = Sampler(0.2)
    taken = [s.take() for _ in range(100)]
    assert sum(taken) == 20
    assert all(sum(taken[i:i + 5]) == 1 for i in range(0, 100, 5))
    assert sum(Sampler(1.0).take() for _ in range(10)) == 10


def test_busy_budget_caps_the_share_of_wall_time() -> None:
    now = [0.0]
    b = BusyBudget(0.25, clock=lambda: now[0])
    assert b.allows()
    b.spend(1.0)  # a long run: 0.25 of budget, now 0.75 s in debt
    assert not b.allows()
    now[0] += 2.9  # refills 0.725 s
    assert not b.allows()
    now[0] += 0.2  # 0.775 s refilled in all: out of debt
    assert b.allows()
    now[0] += 100.0  # the budget never exceeds one second's worth
    b.spend(0.25)
    assert not b.allows()


def test_policy_bounds() -> None:
    for bad in ({"sample_rate": 0.0}, {"sample_rate": 1.5}, {"max_busy_fraction": 0.0}, {"queue_size": 0}):
        with pytest.raises(ValueError):
            ShadowPolicy(**bad)  # type: ignore[arg-type]


# -- the runner ---------------------------------------------------------------------------------


class GatedSession:
    """A session that blocks until released, so the test knows what is queued."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.delay_s = delay_s
        self.calls = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("never released")
        time.sleep(self.delay_s)
        return {"probs": np.array([[0.7, 0.2, 0.1]], np.float32)}


class Candidate:
    def __init__(self, session: Any, release: int = 2) -> None:
        self.manifest = manifest([PROBS], release)
        self.digest = "c" * 64
        self.session = session


def _offer(runner: ShadowRunner) -> bool:
    x = {"x": np.zeros((1, 4), np.float32)}
    return runner.offer(x, {"probs": np.array([[0.6, 0.3, 0.1]], np.float32)}, 0.001)


def test_a_full_queue_drops_samples_instead_of_waiting() -> None:
    session = GatedSession()
    policy = ShadowPolicy(sample_rate=1.0, max_busy_fraction=1.0, queue_size=2)
    runner = ShadowRunner(Candidate(session), policy)
    try:
        assert _offer(runner)
        assert session.entered.wait(10), "the worker never took the first sample"
        assert _offer(runner) and _offer(runner)  # the queue holds two
        t0 = time.perf_counter()
        assert not any(_offer(runner) for _ in range(5))  # full: dropped at once
        assert time.perf_counter() - t0 < 1.0
        session.release.set()
        assert runner.wait_idle(10)
        h = runner.health()
        assert (h.samples, h.agreed, h.dropped_queue, h.dropped_budget) == (3, 3, 5, 0)
        assert h.agreement == 1.0 and h.metric == "argmax" and h.release == 2
    finally:
        session.release.set()
        runner.close()


def test_a_spent_cpu_budget_drops_samples() -> None:
    session = GatedSession(delay_s=0.05)
    session.release.set()
    frozen = [0.0]
    runner = ShadowRunner(Candidate(session), ShadowPolicy(sample_rate=1.0, max_busy_fraction=0.01),
                          clock=lambda: frozen[0])
    try:
        assert _offer(runner)
        assert runner.wait_idle(10)
        assert not any(_offer(runner) for _ in range(10))  # 0.05 s spent of a 0.01 s budget
        h = runner.health()
        assert (h.samples, h.dropped_budget, h.dropped_queue) == (1, 10, 0)
        frozen[0] += 10.0  # time passes: the debt is paid
        assert _offer(runner)
        assert runner.wait_idle(10)
        assert runner.health().samples == 2
    finally:
        runner.close()


def test_a_candidate_failure_counts_as_a_disagreeing_sample() -> None:
    class Failing:
        def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise RuntimeError("Gather index out of range")

    runner = ShadowRunner(Candidate(Failing()), ShadowPolicy(sample_rate=1.0, max_busy_fraction=1.0))
    try:
        for _ in range(3):
            assert _offer(runner)
            assert runner.wait_idle(10)
        h = runner.health()
        assert (h.samples, h.errors, h.agreed, h.agreement) == (3, 3, 0, 0.0)
    finally:
        runner.close()


# -- real sessions beside a serving release -------------------------------------------------------


def _loaded(path: Path, release: int) -> LoadedModel:
    m = manifest([PROBS], release)
    session = OnnxBackend().load(path, m)
    return LoadedModel(manifest=m, release=release, digest=f"{release:064x}", session=session)


@pytest.mark.parametrize("variant", ["same", "divergent"])
def test_shadow_beside_a_serving_release(tmp_path: Path, variant: str) -> None:
    serving, candidate = tmp_path / "r1.onnx", tmp_path / "r2.onnx"
    write_classifier(serving, seed=0)
    if variant == "same":
        write_classifier(candidate, seed=0)
    else:
        write_divergent_classifier(candidate, seed=0)
    host = ModelHost()
    try:
        host.swap(_loaded(serving, 1))
        runner = ShadowRunner(_loaded(candidate, 2), ShadowPolicy(sample_rate=0.5, max_busy_fraction=1.0))
        host.set_shadow("clf", runner)
        # golden inputs agree either way: the smoke test cannot tell them apart
        for row in golden_inputs(batch=8)["x"]:
            host.predict("clf", {"x": row[None, :]})
        assert runner.wait_idle(10)
        assert host.shadow_health("clf").agreement == 1.0  # type: ignore[union-attr]
        rng = np.random.default_rng(7)
        for i in range(200):
            x = field_traffic(rng)
            used, out = host.predict("clf", {"x": x})
            assert used.release == 1  # the serving release answers, always
            expected = _loaded(serving, 1).session.run({"x": x})["probs"] if i == 0 else None
            if expected is not None:
                np.testing.assert_allclose(out["probs"], expected, rtol=1e-6)
            if i % 8 == 7:  # let the candidate catch up: a loaded machine must not turn samples into drops
                assert runner.wait_idle(10)
        assert runner.wait_idle(10)
        h = host.shadow_health("clf")
        assert h is not None and h.samples + h.dropped_queue + h.dropped_budget == 104
        assert h.samples >= 50 and h.candidate_p95_ms is not None and h.current_p95_ms is not None
        assert h.agreement is not None
        if variant == "same":
            assert h.agreement == 1.0 and h.max_abs_error == 0.0 and h.cosine_min == pytest.approx(1.0)
        else:
            assert h.agreement < 0.7 and h.max_abs_error is not None and h.max_abs_error > 0.1
        host.clear_shadow("clf")
        assert host.shadow_health("clf") is None
    finally:
        host.close()
