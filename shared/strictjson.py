"""JSON parsing for untrusted documents: size cap first, no duplicate keys, no NaN.

The stdlib parser with Python hooks enforces the rules (~16 us for a health message), so
``loads`` first tries a proof that needs no hook: msgspec decodes, and if re-encoding the
result gives back the very same bytes, the input is msgspec's own (compact) encoding of
that value. Such a text holds no key twice in an object (a dict cannot), no NaN or
Infinity and no number out of range (msgspec writes a non-finite float as ``null``, so a
``1e999`` read as inf would not come back the same). What msgspec writes, which is what
agents send, passes in ~4 us; anything else (indented, escaped, another encoder's
spacing, or a refusal) goes through the stdlib parser, which gives the precise error.
Nesting is bounded by the interpreter's recursion limit on both paths.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

import msgspec

from shared.errors import MalformedDocumentError

T = TypeVar("T")

DEFAULT_MAX_BYTES = 1 << 20


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedDocumentError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise MalformedDocumentError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedDocumentError(f"JSON number {text[:32]} is out of range")
    return value


def loads(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "document") -> Any:
    """Parse JSON that came from outside, refusing oversize and ambiguous input."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise MalformedDocumentError(
            f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed", size=len(raw)
        )
    try:  # the fast proof (module docstring); any doubt goes to the stdlib parser
        value = msgspec.json.decode(raw)
        if msgspec.json.encode(value) == raw:
            return value
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError, ValueError):
        pass
    try:
        return json.loads(
            raw,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite_float,
        )
    except MalformedDocumentError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedDocumentError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedDocumentError(f"{what} is nested too deeply") from None


def decode(
    data: bytes | str, into: type[T], *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "document"
) -> T:
    """Parse and validate against a msgspec type, with strict types (no str->int coercion)."""
    obj = loads(data, max_bytes=max_bytes, what=what)
    return convert(obj, into, what=what)


def convert(obj: Any, into: type[T], *, what: str = "document") -> T:
    try:
        return msgspec.convert(obj, into, strict=True)
    except msgspec.ValidationError as exc:
        raise MalformedDocumentError(f"{what} is invalid: {exc}") from None


def dumps(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
