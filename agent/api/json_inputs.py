"""JSON predict inputs decoded straight into NumPy arrays, without Python lists.

``msgspec`` decoding nested lists builds a Python float (24 bytes) and a list slot (8) per
number: a JSON body became 6-8 times its size in RSS before NumPy copied it once more. Here
msgspec only checks the document and finds each input's text (``msgspec.Raw``, no values
built); then, for numeric dtypes:

- the *skeleton* of the text (what is left when digits, ``.eE+-`` and whitespace are
  removed) must be exactly the skeleton of a rectangular array of the shape read from its
  first element at each depth (``[[,],[,]]`` for 2x2). As the text is valid JSON, this proves
  every leaf is a number and every row has the same length;
- the numbers (the text without brackets) are parsed by ``np.fromstring`` into the input's
  dtype family (float32, float64, int64 or uint64), then cast; a value out of the dtype's
  range is refused.

The brackets are blanked in the body's own buffer, which is then copied once for
``np.fromstring``: decoding peaks at about 3.2 times the text, body included (about 9
through lists), at about 1.4 times the time (docs/agent-api.md, "Limits").
Other dtypes (bool, strings) go through msgspec lists, within the same size limit.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import msgspec
import numpy as np

MAX_NDIM = 32
# Byte tables: what the skeleton keeps (all but digits, ".eE+-" and whitespace), brackets.
_SKELETON = np.ones(256, dtype=bool)
_SKELETON[np.frombuffer(b"0123456789.eE+- \t\r\n", dtype=np.uint8)] = False
_BRACKET = np.zeros(256, dtype=bool)
_BRACKET[[0x5B, 0x5D]] = True


@functools.cache
def _empty_list() -> re.Pattern[bytes]:
    return re.compile(rb"\[[ \t\r\n]*\]")  # compiled when first used, not with the agent


class JsonInputError(ValueError):
    """A JSON body that is not ``{"inputs": {name: rectangular nested numbers}}``; ``code``
    is the API's error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    inputs: dict[str, msgspec.Raw]


def _canonical(dims: tuple[int, ...]) -> bytes:
    """The skeleton of a rectangular array of this shape; built by repetition (bytes.join
    would hold a buffer struct of ~80 bytes per item)."""
    text = b""
    for d in reversed(dims):
        text = b"[]" if d == 0 else b"".join((b"[", (text + b",") * (d - 1), text, b"]"))
    return text


def _canonical_len(dims: tuple[int, ...]) -> int:
    n = 0
    for d in reversed(dims):
        n = 2 + d * n + max(d - 1, 0)
    return n


def _shape(skeleton: bytes, count: int) -> tuple[int, ...]:
    """The shape a rectangular array with this skeleton and ``count`` numbers has, read from
    the first list at each depth; the caller compares the whole skeleton with it."""
    ndim = len(skeleton) - len(skeleton.lstrip(b"["))
    if ndim == 0:
        return ()
    if ndim > MAX_NDIM:
        raise JsonInputError("input", f"the array is nested {ndim} deep, at most {MAX_NDIM}")
    chars = np.frombuffer(skeleton, dtype=np.uint8)
    # int8 may wrap past 127 levels: such a text is no canonical skeleton, refused below anyway
    depth = np.cumsum((chars == 0x5B).astype(np.int8) - (chars == 0x5D).astype(np.int8), dtype=np.int8)
    dims = []
    for level in range(1, ndim + 1):
        start = level - 1  # the first list at this depth opens here
        closed = np.flatnonzero(depth[start:] == level - 1)
        if closed.size == 0:
            raise JsonInputError("input", "the brackets of the array do not match")
        end = start + int(closed[0])
        commas = int(np.count_nonzero((chars[start:end] == 0x2C) & (depth[start:end] == level)))
        if commas:
            dims.append(commas + 1)
        elif level < ndim:
            dims.append(1)
        else:  # "[]" holds one number or none
            dims.append(1 if count else 0)
    return tuple(dims)


def _numbers(digits: bytes, dtype: np.dtype[Any], name: str) -> np.ndarray:
    """The comma-separated numbers of ``digits`` (brackets blanked) in the family of ``dtype``:
    float32 for float32/float16 (parsed straight, no float64 copy), float64, int64 or uint64."""
    family: type[np.generic] = (
        (np.float32 if dtype.itemsize <= 4 else np.float64) if dtype.kind == "f"
        else np.uint64 if dtype == np.uint64 else np.int64)
    if not digits.strip(b", \t\r\n"):  # only empty lists
        return np.empty(0, dtype=family)
    if family is np.uint64 and b"-" in digits:
        raise JsonInputError("input", f"input {name!r} of dtype {dtype} has a negative value")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(digits, dtype=family, sep=",")
        except (ValueError, DeprecationWarning, OverflowError):
            what = "integers" if dtype.kind in "iu" else "numbers"
            raise JsonInputError("input", f"input {name!r} of dtype {dtype} must hold {what} "
                                 "only") from None
    if family is not np.float32 and family is not np.float64:
        _check_saturation(values, digits, name)
    return values


def _check_saturation(values: np.ndarray, digits: bytes, name: str) -> None:
    """np.fromstring saturates a 64-bit integer overflow at the type's bounds: a value at a
    bound is checked against its text (rare: only then is the text split)."""
    info = np.iinfo(values.dtype)
    at_bound = np.flatnonzero((values == info.max) | (values == info.min) if info.min else values == info.max)
    if not at_bound.size:
        return
    tokens = digits.split(b",")
    for i in at_bound:
        if int(tokens[i]) != int(values[i]):
            raise JsonInputError("input", f"input {name!r} has a value outside {values.dtype} "
                                 f"[{info.min}, {info.max}]")


def _cast(values: np.ndarray, dtype: np.dtype[Any], name: str) -> np.ndarray:
    if dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = values.astype(dtype, copy=False)
        if out.size and not np.isfinite(out).all():
            raise JsonInputError("input", f"input {name!r} has a value out of the range of {dtype}")
        return out
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise JsonInputError("input", f"input {name!r} has a value outside {dtype} "
                             f"[{info.min}, {info.max}]")
    return values.astype(dtype, copy=False)


def numeric_array(buf: bytearray, start: int, end: int, dtype: np.dtype[Any], name: str) -> np.ndarray:
    """The rectangular JSON array of numbers at ``buf[start:end]`` (valid JSON text) as an
    array of ``dtype``. Blanks the brackets of that text in place: ``buf`` is the caller's
    own copy of the body, read once more here (for ``np.fromstring``) and then dropped."""
    region = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
    skeleton = region[_SKELETON[region]].tobytes()
    empty_row = b"[]" in skeleton and _empty_list().search(memoryview(buf)[start:end]) is not None
    region[_BRACKET[region]] = 0x20
    values = _numbers(bytes(memoryview(buf)[start:end]), dtype, name)
    del region
    dims = _shape(skeleton, values.size)
    if dims and dims[-1] == 1 and empty_row:  # "[]" beside "[5]": the same skeleton
        raise JsonInputError("input", f"input {name!r} is not a rectangular array of numbers (an "
                             "empty row beside rows of one)")
    size = 1
    for d in dims:
        size *= d
    if size != values.size or _canonical_len(dims) != len(skeleton) or _canonical(dims) != skeleton:
        raise JsonInputError("input", f"input {name!r} is not a rectangular array of numbers "
                             f"(its first rows have shape {list(dims)})")
    return _cast(values, dtype, name).reshape(dims)


def _offset(buf: bytearray, raw: msgspec.Raw) -> int:
    """Where ``raw`` (a view msgspec made into ``buf``) starts in ``buf``."""
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data if buf else 0
    return int(np.frombuffer(raw, dtype=np.uint8).ctypes.data - base)


def decode_inputs(body: bytes | bytearray, dtypes: dict[str, str], model: str) -> dict[str, np.ndarray]:
    """``{"inputs": {...}}`` into arrays of the model's input dtypes; JsonInputError.
    A bytearray body is used as scratch space (agent.api.connections reads bodies into one)."""
    if not isinstance(body, bytearray):
        body = bytearray(body)
    try:
        doc = msgspec.json.decode(body, type=_Request)
    except msgspec.ValidationError as exc:
        raise JsonInputError("bad_request", f'the body must be {{"inputs": {{"<input name>": [...]}}}}: '
                             f"{exc}") from None
    except msgspec.DecodeError as exc:
        raise JsonInputError("bad_json", f"the body is not valid JSON: {exc}; send "
                             '{"inputs": {name: nested lists}}') from None
    except RecursionError:
        raise JsonInputError("bad_json", "the body is nested too deeply; an input has at most "
                             f"{MAX_NDIM} dimensions") from None
    out = {}
    for name, raw in doc.inputs.items():
        if name not in dtypes:
            raise JsonInputError("input", f"model {model} has no input {name!r}; it takes {sorted(dtypes)}")
        try:
            dtype = np.dtype(dtypes[name])
        except TypeError:
            raise JsonInputError("input", f"input {name!r} has dtype {dtypes[name]!r}, "
                                 "unknown here") from None
        if dtype.kind in "fiu":
            size = len(memoryview(raw))
            start = _offset(body, raw)
            if start >= 0 and start + size <= len(body):
                out[name] = numeric_array(body, start, start + size, dtype, name)
            else:  # a msgspec that copied the value: work on a copy of it
                out[name] = numeric_array(bytearray(raw), 0, size, dtype, name)
            continue
        try:
            out[name] = np.asarray(msgspec.json.decode(raw), dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise JsonInputError("input", f"input {name!r} is not a rectangular array of {dtype}: "
                                 f"{exc}") from None
    return out
