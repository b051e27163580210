"""SHA-256 of small data in memory (an envelope, a trust root, a public key) without OpenSSL.

``hashlib``'s import loads OpenSSL's libcrypto (~2 ms of every agent start, where only a few
KB are hashed: the stored envelope, the trust roots, their keys; docs/performance.md, agent
cold start). CPython's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before; ~0.2 ms to
import) gives the same digest and is as quick on such sizes. Files (model blobs, bundles)
keep hashlib's OpenSSL path, several times faster on megabytes: hash them with hashlib.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Protocol

    class Sha256(Protocol):
        def update(self, data: bytes, /) -> None: ...
        def digest(self) -> bytes: ...
        def hexdigest(self) -> str: ...


def _own_sha256() -> Callable[[bytes], Sha256]:
    for name in ("_sha2", "_sha256"):  # CPython 3.12+, 3.11
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except ImportError:
            continue
    import hashlib  # a Python without its own hashes

    return hashlib.sha256


_sha256 = _own_sha256()


def sha256_small(data: bytes) -> Sha256:
    """A SHA-256 object (``digest``, ``hexdigest``, ``update``) over ``data``: for data of a
    few KB to a few MB held in memory, not for files."""
    return _sha256(data)


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of ``data`` (small, in memory)."""
    return _sha256(data).hexdigest()
