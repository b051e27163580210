"""Offline verification of a 200 MB bundle, whole processes, against Debian's mender-artifact.

Ours: ``edgefleet bundle verify BUNDLE --trust ROOT`` (Ed25519 envelope checked against the
trust root, members vetted, every chunk hash checked in parallel: shared/bundle/parallel_verify,
the hashing started before the imports and the signature check: shared/bundle/speculative), as
users get it: the console script of a non-editable install (the lean venv bench/.venv-agent,
the repository's sources on PYTHONPATH, byte-compiled once: ``agent_env``).
Baseline: ``mender-artifact validate -k PUB`` of an artifact signed with an ECDSA P-256 key whose
payload is the same 200 MB model file. Both commands run alternately, ROUNDS times each; the
row takes the median of the per-alternation ratios and the note gives their spread.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import QUICK, agent_env, agent_python, emit, row

SIZE_MB = 200
ROUNDS = 3 if QUICK else 9


def _big_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = SIZE_MB * 1_000_000 // 4000
    big = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, 1000)).astype(np.float32),
                                  "big")
    graph = helper.make_graph([helper.make_node("Gather", ["big", "idx"], ["out"])], "g",
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1000])], [big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    mender = shutil.which("mender-artifact")
    edgefleet = str(Path(sys.executable).with_name("edgefleet"))
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        work = Path(tmp)
        model = work / "big.onnx"
        _big_model(model)
        subprocess.run([edgefleet, "keys", "init", str(work / "keys"), "--root-keys", "1"], check=True,
                       capture_output=True)
        subprocess.run([edgefleet, "bundle", "build", str(model), "--name", "big", "--version", "1.0.0",
                        "--keys", str(work / "keys"), "--offline", "-o", str(work / "big.bundle")],
                       check=True, capture_output=True)
        ours_cmd = [str(agent_python().with_name("edgefleet")), "bundle", "verify", str(work / "big.bundle"),
                    "--trust", str(work / "keys" / "root.json")]
        ours_env = agent_env()
        if mender is None:
            ours = [_timed(ours_cmd, ours_env) for _ in range(ROUNDS)]
            emit([row(f"bundle verify, whole process ({SIZE_MB} MB)", min(ours), 0.0, "s", "",
                      note="mender-artifact not installed (apt-get install mender-artifact): not measured")])
            return
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        (work / "priv.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (work / "pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        subprocess.run([mender, "write", "module-image", "-T", "single-file", "-n", "big", "-t", "dev",
                        "-o", str(work / "big.mender"), "-f", str(model), "-k", str(work / "priv.pem")],
                       check=True, capture_output=True)
        theirs_cmd = [mender, "validate", "-k", str(work / "pub.pem"), str(work / "big.mender")]
        _timed(ours_cmd, ours_env), _timed(theirs_cmd)  # page cache warm for both, our .pyc written
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(_timed(ours_cmd, ours_env))
            theirs.append(_timed(theirs_cmd))
    ratios = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    ratio = statistics.median(ratios)
    emit([row(f"bundle verify vs mender-artifact validate ({SIZE_MB} MB)", statistics.median(ours),
              statistics.median(theirs), "s", "<= 1.0x", ratio=ratio,
              note=f"whole processes, signed, page cache warm, {ROUNDS} alternations; median of per-pair "
              f"ratios, spread {ratios[0]:.2f}-{ratios[-1]:.2f}; "
              f"best {min(ours):.3f} s vs {min(theirs):.3f} s")])


if __name__ == "__main__":
    main()
