"""Ed25519 signature checks, in this process or in a short-lived child process.

The device agent checks in a child (``use_child_process(True)``): cryptography's OpenSSL
bindings add ~7.6 MB to a process's RSS once imported, and a process cannot unload them, so
an agent that verified one update in-process would carry them until it restarts. The child
(``python -m shared.bundle.sigcheck``) costs a fraction of a second per envelope, once per
update or root rotation. If the child cannot run or answers out of protocol, the check runs
in this process instead (logged): the outcome of a check never depends on the child.

Protocol on the child's stdin: the message, then for each check its public key and its
signature, each field a 4-byte big-endian length and its bytes (the message goes once
however many signatures an envelope carries). On stdout: one byte per check, ``1`` valid,
``0`` not.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import BinaryIO

Check = tuple[bytes, bytes]  # (raw Ed25519 public key, signature)

CHILD_TIMEOUT_S = 60.0
_LEN = struct.Struct(">I")
_in_child = False


def use_child_process(enabled: bool) -> None:
    """Check signatures in a child process from now on (the agent) or in this one."""
    global _in_child
    _in_child = enabled


def check(message: bytes, items: Sequence[Check]) -> list[bool]:
    """Whether each signature verifies over ``message`` with its key."""
    if not items:
        return []
    if _in_child and "cryptography" not in sys.modules:
        answer = _check_in_child(message, items)
        if answer is not None:
            return answer
    return check_here(message, items)


def check_here(message: bytes, items: Sequence[Check]) -> list[bool]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    out = []
    for raw, sig in items:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
        except (InvalidSignature, ValueError):
            out.append(False)
        else:
            out.append(True)
    return out


def _check_in_child(message: bytes, items: Sequence[Check]) -> list[bool] | None:
    import subprocess

    request = b"".join(_LEN.pack(len(f)) + f for f in (message, *(f for item in items for f in item)))
    try:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "shared.bundle.sigcheck"],  # -P: not the cwd on sys.path
            input=request,
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _warn("signature check child could not run (%s); checking in this process", exc)
        return None
    if done.returncode != 0 or len(done.stdout) != len(items) or set(done.stdout) - {0x30, 0x31}:
        _warn(
            "signature check child failed (exit %s, %d of %d answers: %s); checking in this process",
            done.returncode, len(done.stdout), len(items), done.stderr.decode(errors="replace")[-300:],
        )
        return None
    return [b == 0x31 for b in done.stdout]


def _warn(message: str, *args: object) -> None:
    import logging  # only on this fallback: `edgefleet bundle verify` never needs it

    logging.getLogger(__name__).warning(message, *args)


def _read_request(stream: BinaryIO) -> tuple[bytes, list[Check]]:
    data = stream.read()
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + _LEN.size > len(data):
            raise ValueError("truncated length")
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        if pos + n > len(data):
            raise ValueError("truncated field")
        fields.append(data[pos:pos + n])
        pos += n
    if not fields or len(fields) % 2 != 1:
        raise ValueError(f"{len(fields)} fields are not a message and (key, signature) pairs")
    return fields[0], [(fields[i], fields[i + 1]) for i in range(1, len(fields), 2)]


def main() -> int:
    try:
        message, items = _read_request(sys.stdin.buffer)
    except ValueError as exc:
        print(f"sigcheck: malformed request: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(bytes(0x31 if ok else 0x30 for ok in check_here(message, items)))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
