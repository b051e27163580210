"""Signature checks in a child process (what the resident agent does) give the same answers
as in-process ones, keep cryptography out of the calling process, and fall back to an
in-process check when the child cannot run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.bundle import sigcheck
from shared.bundle.keyring import build_root
from shared.bundle.keys import raw_public

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def child_mode() -> Iterator[None]:
    sigcheck.use_child_process(True)
    yield
    sigcheck.use_child_process(False)


MESSAGE = b"DSSEv1 payload"


def _cases() -> list[sigcheck.Check]:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    raw = raw_public(key.public_key())
    sig = key.sign(MESSAGE)
    return [
        (raw, sig),  # valid
        (raw, key.sign(MESSAGE + b"!")),  # over another message
        (raw_public(other.public_key()), sig),  # another key
        (raw, sig[:-1] + bytes([sig[-1] ^ 1])),  # signature changed
        (raw, sig[:10]),  # signature too short
        (raw[:31], sig),  # key too short
        (raw, b""),  # empty signature
        (raw, sig),  # valid again (a key may sign twice)
    ]


EXPECTED = [True, False, False, False, False, False, False, True]


def test_in_process_answers() -> None:
    assert sigcheck.check_here(MESSAGE, _cases()) == EXPECTED
    assert sigcheck.check_here(b"", [(_cases()[0][0], b"")]) == [False]


def test_child_gives_the_same_answers(monkeypatch: pytest.MonkeyPatch, child_mode: object) -> None:
    calls: list[object] = []
    real = subprocess.run
    monkeypatch.setattr(sigcheck, "check_here", lambda *_: pytest.fail("checked in-process"))
    monkeypatch.delitem(sys.modules, "cryptography")  # as in an agent that never loaded it

    def spy(*args: object, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(args)
        return real(*args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "run", spy)
    assert sigcheck.check(MESSAGE, _cases()) == EXPECTED
    assert len(calls) == 1  # one child for the whole batch


def test_child_failure_falls_back_in_process(
    monkeypatch: pytest.MonkeyPatch, child_mode: object, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delitem(sys.modules, "cryptography", raising=False)
    monkeypatch.setattr(sigcheck.sys, "executable", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="shared.bundle.sigcheck"):
        assert sigcheck.check(MESSAGE, _cases()) == EXPECTED
    assert "checking in this process" in caplog.text


def test_child_refuses_a_malformed_request() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = b"\x00\x00\x00\x01a"
    for body in (b"\x00\x00\x00\x05abc", b"\x00\x00", b"", one * 2, one * 4):
        r = subprocess.run([sys.executable, "-P", "-m", "shared.bundle.sigcheck"], input=body,
                           capture_output=True, env=env, timeout=60, check=False)
        assert r.returncode == 2 and b"malformed request" in r.stderr, (body, r.stderr)
        assert r.stdout == b""


VERIFY_IN_FRESH_PROCESS = """
import sys
from pathlib import Path
from shared.bundle import sigcheck
from shared.bundle.trust import TrustRoot
from shared.errors import SignatureError
sigcheck.use_child_process(True)
keys = Path(sys.argv[1])
root = TrustRoot.load((keys / "root.json").read_bytes())
ok = root.verify_manifest(Path(sys.argv[2]).read_bytes())
try:
    root.verify_manifest(Path(sys.argv[3]).read_bytes())
    print("forged accepted")
except SignatureError as exc:
    print("forged refused:", exc)
print("verified", ok.manifest.name, ok.manifest.release)
print("cryptography loaded" if "cryptography" in sys.modules else "cryptography not loaded")
"""


def test_verifying_root_and_manifest_never_loads_cryptography_in_the_caller(
    tmp_path: Path, keys: Any, make_doc: Callable[..., dict[str, Any]], sign: Callable[..., bytes]
) -> None:
    (tmp_path / "root.json").write_bytes(build_root(keys.root, 2, keys.signers, signing_threshold=1))
    doc = make_doc()
    good = tmp_path / "good.json"
    good.write_bytes(sign(doc, keys.signers[:1]))
    forged = tmp_path / "forged.json"
    forged.write_bytes(sign(doc, [keys.stranger]))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", VERIFY_IN_FRESH_PROCESS, str(tmp_path), str(good), str(forged)],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "forged refused: manifest is not signed by a threshold" in r.stdout, r.stdout
    assert f"verified {doc['name']} {doc['release']}" in r.stdout, r.stdout
    assert "cryptography not loaded" in r.stdout, r.stdout
    assert "checking in this process" not in r.stderr, r.stderr
