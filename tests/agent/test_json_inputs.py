"""JSON predict inputs straight into NumPy (agent.api.json_inputs), fuzzed: any JSON document
gives arrays or a JsonInputError (a 400), never another exception (a 500); what it accepts
is exactly what NumPy makes of the same lists."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.api.json_inputs import JsonInputError, decode_inputs

DTYPES = {"f": "float32", "d": "float64", "i": "int64", "b": "int8", "u": "uint16"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
    max_leaves=30,
)


def _numpy_reference(value: Any, dtype: str) -> np.ndarray | None:
    """What np.asarray makes of the lists, when they are a rectangular array of numbers that
    fit the dtype (bools and strings are not numbers here); None otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ref = np.asarray(value, dtype=np.float64 if dtype.startswith("float") else object)
    except (ValueError, TypeError, OverflowError, Warning):
        return None
    def leaves(v: Any) -> list[Any]:
        return [x for item in v for x in leaves(item)] if isinstance(v, list) else [v]

    flat = leaves(value)
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in flat):
        return None
    if dtype.startswith("int") or dtype.startswith("uint"):
        if any(isinstance(v, float) for v in flat):
            return None
        info = np.iinfo(dtype)
        if any(not info.min <= v <= info.max for v in flat):
            return None
        try:
            return np.asarray(value, dtype=dtype)
        except ValueError:  # ragged
            return None
    with np.errstate(over="ignore"):
        out = ref.astype(dtype)
    return out if np.isfinite(out).all() else None


@settings(max_examples=500, deadline=None)
@given(json_values, st.sampled_from(sorted(DTYPES)))
def test_any_document_is_arrays_or_a_named_refusal(value: Any, key: str) -> None:
    body = json.dumps({"inputs": {key: value}}).encode()
    try:
        got = decode_inputs(bytearray(body), DTYPES, "m")[key]
    except JsonInputError as exc:
        assert exc.code in ("input", "bad_json", "bad_request") and exc.detail
        got = None
    want = _numpy_reference(value, DTYPES[key])
    if want is None:
        assert got is None or got.size == 0, (value, got)
    else:
        assert got is not None, value
        assert got.dtype == np.dtype(DTYPES[key]) and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.int8]),
                  hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
                  elements={"allow_nan": False, "allow_infinity": False}))
def test_arrays_round_trip(arr: np.ndarray) -> None:
    dtype = arr.dtype.name
    body = json.dumps({"inputs": {"x": arr.tolist()}}, indent=1).encode()
    got = decode_inputs(body, {"x": dtype}, "m")["x"]
    want = np.asarray(arr.tolist(), dtype=arr.dtype)  # JSON has no shape for emptiness: [] is (0,)
    assert got.dtype == arr.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
