"""The rollout's state machine: verdicts become actions, the state changes only by the table,
and the drawing in docs/architecture.md is the table's own."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleet_support import make_bundle, upload
from litestar.testing import TestClient
from test_fleet_controller import ctrl, report, rollout, setup_fleet, status

from fleet.errors import ConflictError
from fleet.rollout import actions as act
from fleet.rollout import engine as eng
from fleet.rollout.controller import RolloutController
from shared.bundle.keyring import Keyring

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 6, 5, 0, 0, tzinfo=UTC)


def test_architecture_draws_the_transition_table() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    drawings = re.findall(r"```mermaid\n(stateDiagram-v2\n(?:.*\n)*?)```", doc)
    rollout = [d for d in drawings if "created --> running" in d]
    assert rollout == [eng.state_diagram()]


def _state_writes(tree: ast.AST) -> list[tuple[str, int]]:
    """(enclosing function, line) of every assignment to an attribute named ``state``."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            targets: list[ast.expr] = []
            if isinstance(child, ast.Assign):
                targets = child.targets
            elif isinstance(child, ast.AugAssign | ast.AnnAssign):
                targets = [child.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "state":
                    out.append((name, child.lineno))
            visit(child, name)

    visit(tree, "<module>")
    return out


def test_no_rollout_state_is_set_outside_the_table() -> None:
    """Every write of a ``.state`` in the fleet is set_state's, which asks engine.transition;
    a Rollout row is only ever made ``created``; no SQL update writes a state."""
    writes: dict[str, list[tuple[str, int]]] = {}
    for path in sorted((ROOT / "fleet").rglob("*.py")):
        if "migrations" in path.parts:
            continue
        source = path.read_text()
        tree = ast.parse(source)
        found = _state_writes(tree)
        if found:
            writes[str(path.relative_to(ROOT))] = found
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rollout":
                for kw in node.keywords:
                    if kw.arg == "state":
                        assert ast.unparse(kw.value) == "eng.RolloutState.CREATED.value", (path, node.lineno)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "values":
                assert "state" not in {kw.arg for kw in node.keywords}, (path, node.lineno)
    assert {p: [f for f, _ in w] for p, w in writes.items()} == {"fleet/rollout/controller.py": ["set_state"]}
    setter = ast.unparse(
        next(n for n in ast.walk(ast.parse((ROOT / "fleet/rollout/controller.py").read_text()))
             if isinstance(n, ast.FunctionDef) and n.name == "set_state")
    )
    assert "rollout.state = eng.transition(rollout.state, op).value" in setter


def test_state_lists_elsewhere_are_the_engines() -> None:
    """The CLI's watch stops at the engine's finished states; the metrics label every state."""
    from fleet.cli.client import TERMINAL_STATES
    from fleet.metrics import ROLLOUT_STATES

    assert {s.value for s in eng.FINISHED_STATES} == TERMINAL_STATES
    assert set(ROLLOUT_STATES) == {s.value for s in eng.RolloutState}
    # finished: nothing but an operator's rollback (of a succeeded rollout) leaves it
    assert {s for (s, op) in eng.TRANSITIONS if s in eng.FINISHED_STATES and op != "rollback"} == set()


def test_progress_names_every_update_state_as_the_device_does() -> None:
    """A device's progress on the fleet adds its own (pending, assigned, silent, shadow) to the
    device's update states, spelt as shared.telemetry.vocabulary spells them."""
    from fleet.rollout.progress import Progress
    from shared.telemetry.vocabulary import UpdateState

    device_side = {s.value for s in UpdateState} - {UpdateState.IDLE.value}
    assert device_side <= {p.value for p in Progress}
    assert {p.value for p in Progress} - device_side == {"pending", "assigned", "silent", "shadow"}


@pytest.mark.parametrize("state", list(eng.RolloutState))
@pytest.mark.parametrize("op", sorted({op for _s, op in eng.TRANSITIONS}))
def test_transition_allows_the_table_and_refuses_the_rest(state: eng.RolloutState, op: str) -> None:
    if (state, op) in eng.TRANSITIONS:
        assert eng.transition(state.value, op) is eng.TRANSITIONS[(state, op)]
    else:
        with pytest.raises(eng.TransitionError, match=f"cannot {op} a rollout that is {state.value}"):
            eng.transition(state.value, op)


SPEC = eng.parse_spec({"name": "r", "bundle_id": 1, "stages": [{"name": "a"}, {"name": "b"}]})


def _decision(verdict: eng.Verdict, message: str = "stage a: msg", gate: str | None = None) -> eng.Decision:
    return eng.Decision(verdict, message, gate=gate)


def _plan(decision: eng.Decision, spec: eng.RolloutSpec = SPEC, **over: Any) -> list[act.Action]:
    args: dict[str, Any] = {"now": NOW, "last_evaluation": None, "awaiting_approval": False, "members": 3,
                            "target": "detector r2 (2.0)", **over}
    return act.plan(spec, 0, decision, **args)


def _kinds(actions: list[act.Action]) -> list[str]:
    return [a.kind if isinstance(a, act.Record) else type(a).__name__ for a in actions]


@pytest.mark.parametrize(
    ("verdict", "on_failure", "expected"),
    [
        (eng.Verdict.WAIT, "rollback", ["StopWaitingForApproval", "evaluation", "Note"]),
        (eng.Verdict.AWAIT_APPROVAL, "rollback", ["WaitForApproval", "awaiting_approval", "Note"]),
        (eng.Verdict.EXTEND, "rollback", ["StopWaitingForApproval", "Extend", "Note", "extended"]),
        (eng.Verdict.INCONCLUSIVE, "rollback",
         ["StopWaitingForApproval", "Transition", "EndShadow", "Note", "inconclusive", "paused"]),
        (eng.Verdict.ADVANCE, "rollback", ["StopWaitingForApproval", "stage_passed", "EnterStage"]),
        (eng.Verdict.COMPLETE, "rollback",
         ["StopWaitingForApproval", "stage_passed", "Transition", "Note", "succeeded"]),
        (eng.Verdict.FAIL, "rollback", ["StopWaitingForApproval", "gate_failed", "Note", "RollBack"]),
        (eng.Verdict.FAIL, "pause",
         ["StopWaitingForApproval", "gate_failed", "Note", "Transition", "EndShadow", "paused"]),
    ],
)
def test_each_verdict_plans_its_actions(verdict: eng.Verdict, on_failure: str, expected: list[str]) -> None:
    spec = msgspec.structs.replace(SPEC, on_gate_failure=on_failure)
    actions = _plan(_decision(verdict, gate="max_error_rate"), spec)
    assert _kinds(actions) == expected
    # every state change a verdict asks for is one the table allows from running
    for a in actions:
        if isinstance(a, act.Transition):
            eng.transition(eng.RolloutState.RUNNING.value, a.op)


def test_plan_details() -> None:
    # a wait is recorded once; a repeated one plans nothing but clearing an approval wait
    repeated = _plan(_decision(eng.Verdict.WAIT), last_evaluation="stage a: msg")
    assert _kinds(repeated) == ["StopWaitingForApproval"]
    assert _kinds(_plan(_decision(eng.Verdict.AWAIT_APPROVAL), awaiting_approval=True)) == ["Note"]
    assert act.EnterStage(1) in _plan(_decision(eng.Verdict.ADVANCE))
    done = _plan(_decision(eng.Verdict.COMPLETE))
    assert act.Record("succeeded", "succeeded: 3 devices run detector r2 (2.0)") in done
    assert act.Transition("succeed", None) in done
    failed = _plan(_decision(eng.Verdict.FAIL, "stage a: error_rate 0.3 > 0.05", gate="max_error_rate"))
    assert act.RollBack("stage a: error_rate 0.3 > 0.05 at 05:00:00 UTC (gate max_error_rate)", "a") in failed


def test_rolling_back_a_succeeded_rollout_without_keys_is_refused_and_changes_nothing(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    """Formerly the rollout moved to paused, which the table forbids for a succeeded one."""
    creds = setup_fleet(client)
    r1 = upload(client, make_bundle(tmp_path / "1", keyring, release=1).path).json()
    r2 = upload(client, make_bundle(tmp_path / "2", keyring, release=2).path).json()
    gates = {"max_error_rate": 0.1, "min_inferences": 10}
    for rid_bundle, release in ((r1["id"], 1), (r2["id"], 2)):
        rid = rollout(client, rid_bundle, [{"name": "all", "percent": 100}], gates=gates)
        for d in creds:
            report(client, d, release, inferences=20)
        ctrl(client).tick()
        assert status(client, rid)["state"] == "succeeded"
    keyless = RolloutController(client.app.state.ctx.engine)  # no keys_dir: cannot re-issue r1
    refused = f"cannot roll back rollout {rid}: no signing keys.*stays succeeded"
    with pytest.raises(ConflictError, match=refused):
        keyless.rollback(rid)
    after = status(client, rid)
    assert after["state"] == "succeeded" and after["events"][-1]["kind"] == "succeeded"
