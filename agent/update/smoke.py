"""The smoke test: a release's golden inputs run through the newly loaded session (the
old one keeps serving) and must give the golden outputs within the bundle's tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.errors import InputError, SmokeTestError
from agent.runtime.host import LoadedModel, validate_inputs
from agent.runtime.npz import load_npz


def run_golden(loaded: LoadedModel, golden: Path) -> None:
    """Run the golden inputs and compare with the golden outputs; raise SmokeTestError."""
    m = loaded.manifest
    tol = m.golden_tolerance
    try:
        arrays = load_npz(golden)  # as np.load reads it, without zipfile for a plain np.savez
    except (OSError, ValueError) as exc:
        raise SmokeTestError(f"{m.name} r{m.release}: golden file is not a valid npz: {exc}") from None
    try:
        inputs = validate_inputs(m, {s.name: arrays[f"in.{s.name}"] for s in m.inputs})
        expected = {s.name: arrays[f"out.{s.name}"] for s in m.outputs}
    except KeyError as exc:
        raise SmokeTestError(f"{m.name} r{m.release}: golden file lacks {exc}") from None
    except InputError as exc:
        raise SmokeTestError(f"{m.name} r{m.release}: golden inputs do not fit: {exc}") from None
    try:
        outputs = loaded.session.run(inputs)
    except Exception as exc:
        raise SmokeTestError(
            f"{m.name} r{m.release}: the model fails on its golden inputs: {exc}"
        ) from None
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            raise SmokeTestError(
                f"{m.name} r{m.release}: output {name!r} has shape "
                f"{None if got is None else list(got.shape)}, golden {list(want.shape)}"
            )
        if not np.allclose(got, want, atol=tol.atol, rtol=tol.rtol):
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise SmokeTestError(
                f"{m.name} r{m.release}: output {name!r} differs from golden by up to {diff:.3g} "
                f"(atol {tol.atol}, rtol {tol.rtol})"
            )
