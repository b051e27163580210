"""edgefleet-agent score: batch scoring of .npz files with the installed release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.cli import EXIT_PARTIAL, main
from shared.bundle.keyring import Keyring

from .conftest import Bundles
from .test_runtime_litert import reference, tflite_bundle


@pytest.fixture
def cfg(tmp_path: Path, keyring: Keyring) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "state"\ntrust_root = "{keyring.root_path}"\n'
                    "[runtime]\nmax_batch_size = 4\n")
    return path


def test_score_directory_skips_bad_files(cfg: Path, bundles: Bundles, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(cfg), "install", str(tflite_bundle(bundles))]) == 0
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs = {f"{i:02d}.npz": rng.random((i + 1, 4), dtype=np.float32) for i in range(5)}
    for fname, x in xs.items():
        np.savez(src / fname, x=x)
    np.savez(src / "sub" / "deep.npz", x=xs["00.npz"])
    (src / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(src / "wrong.npz", y=xs["00.npz"])
    np.save(src / "plain.npy", xs["00.npz"])
    capsys.readouterr()
    assert main(["-c", str(cfg), "score", "tcl", "--input-dir", str(src), "--output-dir", str(out)]) \
        == EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "scored 5 of 7 files with tcl release 1" in captured.out and "2 failed" in captured.out
    assert "broken.npz" in captured.out and "model tcl takes inputs ['x']" in captured.out
    assert "scored 7/7 files (5 ok, 2 failed)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(xs)  # no temporary files left behind
    for fname, x in xs.items():
        with np.load(out / fname) as got:
            assert np.allclose(got["probs"], reference(x), atol=1e-5)
    # a recursive pattern reaches sub-directories, and only good files: exit 0
    assert main(["-c", str(cfg), "score", "tcl", "--input-dir", str(src), "--output-dir", str(out),
                 "--pattern", "**/0*.npz"]) == 0
    assert main(["-c", str(cfg), "score", "tcl", "--input-dir", str(src / "sub"), "--output-dir",
                 str(out / "sub")]) == 0
    assert (out / "sub" / "deep.npz").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "nope", "--input-dir", "{src}", "--output-dir", "{out}"], "no active release of 'nope'"),
        (["score", "clf", "--input-dir", "{src}/missing", "--output-dir", "{out}"], "does not exist"),
        (["score", "clf", "--input-dir", "{src}", "--output-dir", "{src}"], "is the input directory"),
        (["score", "clf", "--input-dir", "{src}", "--output-dir", "{out}", "--pattern", "*.x"],
         "no file in"),
    ],
)
def test_score_errors_are_one_line(cfg: Path, bundles: Bundles, tmp_path: Path, args: list[str],
                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(cfg), "install", str(bundles.build(1))]) == 0
    src = tmp_path / "in"
    src.mkdir()
    np.savez(src / "a.npz", x=np.zeros((1, 4), np.float32))
    capsys.readouterr()
    argv = [a.format(src=src, out=tmp_path / "out") for a in args]
    assert main(["-c", str(cfg), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-agent: error:") and message in err and err.count("\n") == 1
