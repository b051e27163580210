"""InputCheck: the signature check compiled per release passes what validate_inputs passes
(the caller's dict itself, no copy) and refuses what it refuses with the same message."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from agent.errors import InputError
from agent.runtime.host import InputCheck, validate_inputs
from shared.bundle.keyring import Keyring
from shared.bundle.manifest import Manifest, TensorSpec

from .conftest import Bundles, verified

_BASE: list[Manifest] = []


@pytest.fixture(autouse=True)
def _base(bundles: Bundles, keyring: Keyring) -> None:
    if not _BASE:
        _BASE.append(verified(bundles.build(1), keyring).manifest)


def manifest() -> Manifest:
    return msgspec.structs.replace(
        _BASE[0], inputs=[TensorSpec("x", "float32", ["batch", 4]), TensorSpec("k", "int64", [1])])


GOOD = {"x": np.zeros((3, 4), np.float32), "k": np.ones(1, np.int64)}


def test_good_inputs_pass_as_they_are() -> None:
    check = InputCheck(manifest())
    assert check(GOOD) is GOOD
    assert validate_inputs(manifest(), GOOD) == GOOD


@pytest.mark.parametrize("bad", [
    {"x": np.zeros((3, 4), np.float64), "k": np.ones(1, np.int64)},
    {"x": np.zeros((3, 5), np.float32), "k": np.ones(1, np.int64)},
    {"x": np.zeros((4,), np.float32), "k": np.ones(1, np.int64)},
    {"x": np.zeros((3, 4), np.float32), "k": np.ones(2, np.int64)},
    {"x": np.zeros((3, 4), np.float32)},
    {"x": np.zeros((3, 4), np.float32), "k": np.ones(1, np.int64), "z": np.ones(1)},
    {"x": [[0.0] * 4], "k": np.ones(1, np.int64)},
    {"x": np.zeros((3, 4), np.float32), "q": np.ones(1, np.int64)},
])
def test_bad_inputs_get_the_full_message(bad: dict[str, object]) -> None:
    with pytest.raises(InputError) as slow:
        validate_inputs(manifest(), bad)  # type: ignore[arg-type]
    with pytest.raises(InputError) as fast:
        InputCheck(manifest())(bad)  # type: ignore[arg-type]
    assert str(fast.value) == str(slow.value)
