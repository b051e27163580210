"""MessagePack parsing for untrusted payloads, with the rules of ``shared.strictjson``:
size cap first, no duplicate map keys, no NaN or infinity.

msgspec decodes MessagePack fast but, like most decoders, keeps the last of duplicate
keys and accepts NaN. A small scan over the bytes refuses those first (and map keys
that are not strings, extension types, nesting past ``MAX_DEPTH`` and trailing bytes);
then msgspec decodes into plain Python values (dict, list, str, int, float, bool, None).

The scan is Python, byte by byte (~20 us for a health message), so ``loads`` first tries
a proof that needs none: msgspec decodes, and if re-encoding the result gives back the
very same bytes, the input is msgspec's own encoding of that value, whose maps cannot
hold a key twice (a dict cannot); a walk over the decoded value then checks the rest
(finite floats, string keys, no extension values, the depth). What msgspec writes, which
is what agents send, passes in ~2 us; anything else (another encoder's widths, or a
refusal) goes through the scan, which gives the precise error.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec

from shared.errors import MalformedDocumentError

DEFAULT_MAX_BYTES = 1 << 20
MAX_DEPTH = 32

_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
# Fixed-size scalars: first byte -> bytes that follow it.
_SCALAR = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
           0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# Length-prefixed byte strings (str and bin): first byte -> width of the length.
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}


# Decoded values the scan lets through besides floats, lists and dicts (bin -> bytes).
_PLAIN = frozenset({str, int, bool, type(None), bytes})


def _plain(items: Any, depth: int) -> bool:
    """Whether the values of a decoded list or dict at ``depth`` hold only what the scan
    allows: finite floats, string keys, no extension values (Ext, datetime), nesting at
    most MAX_DEPTH. False is no verdict: the scan then decides, naming what is wrong."""
    if type(items) is dict:
        if not all(type(k) is str for k in items):
            return False
        items = items.values()
    if items and depth >= MAX_DEPTH:
        return False
    for v in items:
        t = type(v)
        if t is float:
            if v - v != 0.0:  # NaN or infinity (inf - inf is NaN)
                return False
        elif t is list or t is dict:
            if not _plain(v, depth + 1):
                return False
        elif t not in _PLAIN:
            return False
    return True


class _Scan:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what
        self.pos = 0

    def fail(self, why: str) -> MalformedDocumentError:
        return MalformedDocumentError(f"{self.what} is not valid MessagePack: {why} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise self.fail("truncated")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def length(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def string(self) -> bytes | None:
        """The bytes of a str at the position, or None (and the position unchanged) if it is not one."""
        b = self.data[self.pos] if self.pos < len(self.data) else -1
        if 0xA0 <= b <= 0xBF:
            self.pos += 1
            return self.take(b & 0x1F)
        if b in _STR:
            self.pos += 1
            return self.take(self.length(_STR[b]))
        return None

    def value(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        if self.string() is not None:
            return
        b = self.take(1)[0]
        if b <= 0x7F or b >= 0xE0:  # positive and negative fixint
            return
        if b in _SCALAR:
            self.take(_SCALAR[b])
        elif b in (0xCA, 0xCB):
            raw = self.take(4 if b == 0xCA else 8)
            value = (_F32 if b == 0xCA else _F64).unpack(raw)[0]
            if not math.isfinite(value):
                raise self.fail(f"number {value} is out of range")
        elif b in _BIN:
            self.take(self.length(_BIN[b]))
        elif 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            n = b & 0x0F if b <= 0x9F else self.length(2 if b == 0xDC else 4)
            for _ in range(n):
                self.value(depth + 1)
        elif 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
            n = b & 0x0F if b <= 0x8F else self.length(2 if b == 0xDE else 4)
            seen: set[bytes] = set()
            for _ in range(n):
                key = self.string()
                if key is None:
                    raise self.fail("a map key is not a string")
                if key in seen:
                    raise MalformedDocumentError(
                        f"{self.what}: duplicate MessagePack key {key.decode('utf-8', 'replace')!r}"
                    )
                seen.add(key)
                self.value(depth + 1)
        else:  # 0xc1 (never used) and the extension types
            raise self.fail(f"type byte 0x{b:02x} is not allowed")


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "document") -> Any:
    """Parse MessagePack that came from outside, refusing oversize and ambiguous input."""
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise MalformedDocumentError(
            f"{what} is {len(raw)} bytes, more than the {max_bytes} allowed", size=len(raw)
        )
    try:  # the fast proof (module docstring); any doubt goes to the scan
        value = msgspec.msgpack.decode(raw)
        canonical = msgspec.msgpack.encode(value) == raw
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, TypeError, ValueError):
        canonical = False
    if canonical and _plain((value,), -1):
        return value
    scan = _Scan(raw, what)
    scan.value(0)
    if scan.pos != len(raw):
        raise scan.fail(f"{len(raw) - scan.pos} bytes after the end of the value")
    try:
        return msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # e.g. a str that is not UTF-8
        raise MalformedDocumentError(f"{what} is not valid MessagePack: {exc}") from None
