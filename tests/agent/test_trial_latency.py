"""A release that is correct but much slower rolls back on the device by itself
(``trial_latency``), with the real installer, host and onnxruntime: no fleet involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from agent.update.lifecycle import UpdateState as S
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier
from shared.bundle.keyring import Keyring

from .conftest import Bundles, make_rig

X = np.full((1, 4), 0.5, dtype=np.float32)


def write_slow_classifier(path: Path, *, width: int = 1024, rounds: int = 200) -> None:
    """The demo classifier (seed 0, same outputs to the bit) plus work that depends on the
    input and is multiplied by zero: ``rounds`` matrix products of ``width`` x ``width``
    (4.5 ms median for a bare session on an AVX-512 machine, where 40 rounds ran in 0.9 ms
    and the trial's p95 of 1.8 ms stayed under the 2 ms it never judges: it committed)."""
    write_classifier(path, seed=0)
    model = onnx.load(str(path))
    g = model.graph
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    rng = np.random.default_rng(1)
    g.initializer.extend([
        numpy_helper.from_array(np.array([1, width // 4], dtype=np.int64), "reps"),
        numpy_helper.from_array((rng.normal(size=(width, width)) / width).astype(np.float32), "Wslow"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_slow"),
    ])
    nodes = [helper.make_node("Tile", ["x", "reps"], ["h0"])]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "Wslow"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"h{rounds}"], ["hsum"], keepdims=1),
        helper.make_node("Mul", ["hsum", "zero_slow"], ["nothing_slow"]),
        helper.make_node("Add", ["logits", "nothing_slow"], ["logits_slow"]),
    ]
    softmax.input[0] = "logits_slow"
    index = list(g.node).index(softmax)
    for k, node in enumerate(nodes):
        g.node.insert(index + k, node)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def test_a_correct_but_slow_release_rolls_back_with_trial_latency(
    tmp_path: Path, keyring: Keyring, bundles: Bundles
) -> None:
    slow_model = tmp_path / "slow.onnx"
    write_slow_classifier(slow_model)
    slow = tmp_path / "slow.bundle"
    build_bundle(slow_model, name="clf", version="1.2", release=2, keyring=keyring, out=slow,
                 golden_inputs=golden_inputs())
    now = [1000.0]
    rig = make_rig(tmp_path / "s", keyring, trial_seconds=5, clock=lambda: now[0])
    rig.installer.install_file(bundles.build(1))
    fast = [rig.predict(X) for _ in range(400)]  # the serving release's latencies on this device
    rig.installer.install_file(slow, trial=True)
    assert rig.host.get("clf").release == 2  # type: ignore[union-attr]
    for _ in range(100):
        out = rig.predict(X)
        np.testing.assert_array_equal(out["probs"], fast[0]["probs"])  # correct, only slower
    now[0] = 1006.0
    rig.installer.check_trials()
    rec = rig.installer.store.load("clf")
    assert rec is not None
    assert rec.state == S.ROLLED_BACK and rec.reason == "trial_latency", (rec.state, rec.message)
    assert rec.active is not None and rec.active.release == 1
    assert "p95" in rec.message and "on the previous release" in rec.message and "bound x2" in rec.message
    assert rig.host.get("clf").release == 1  # type: ignore[union-attr]
    kind, release, from_release, reason = rig.events[-1][1:5]
    assert (kind, release, from_release, reason) == ("rolled_back", 1, 2, "trial_latency")


def test_a_release_as_fast_as_the_previous_commits(tmp_path: Path, keyring: Keyring,
                                                   bundles: Bundles) -> None:
    now = [1000.0]
    rig = make_rig(tmp_path / "s", keyring, trial_seconds=5, clock=lambda: now[0])
    rig.installer.install_file(bundles.build(1))
    for _ in range(100):
        rig.predict(X)
    rig.installer.install_file(bundles.build(2), trial=True)
    for _ in range(100):
        rig.predict(X)
    now[0] = 1006.0
    rig.installer.check_trials()
    rec = rig.installer.store.load("clf")
    assert rec is not None and rec.state == S.COMMITTED, rec
    assert "p95" in rec.message and "100 and 100 samples" in rec.message
