"""``edgefleet bundle verify`` with its head start: the blobs hashed while the parser, the
imports and the signature check run (shared/bundle/speculative.py), and only the parsers
argv can reach built. Answers must be exactly those of the plain path."""

from __future__ import annotations

import argparse
import contextlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cli.main import _verify_file_guess, build_parser
from shared.errors import EdgefleetError

from .conftest import run_cli


def _paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _paths(sub, (*prefix, name))


def _help(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parser.parse_args(argv)
    return out.getvalue()


def test_every_help_is_the_same_from_the_reached_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    full = build_parser()
    paths = list(_paths(full))
    assert len(paths) > 40
    for path in paths:
        argv = [*path, "--help"]
        assert _help(build_parser(argv), argv) == _help(full, argv), path


@pytest.mark.parametrize("argv", [
    ["bundle", "verify", "b.bundle", "--trust", "root.json"],
    ["bundle", "build", "m.onnx", "--name", "d", "--version", "1", "--keys", "k", "-o", "o"],
    ["rollout", "watch", "3", "--timeout", "5"],
    ["keys", "init", "./keys"],
    ["serve", "--port", "9000", "--role", "api"],
])
def test_the_reached_parser_parses_the_same(argv: list[str]) -> None:
    full, reached = vars(build_parser().parse_args(argv)), vars(build_parser(argv).parse_args(argv))
    full.pop("group", None), reached.pop("group", None)
    assert reached == full


def test_bundle_verify_builds_neither_serve_nor_other_commands() -> None:
    import subprocess
    import sys

    code = ("import sys; from fleet.cli.main import build_parser; "
            "build_parser(['bundle', 'verify', 'x', '--trust', 'y']); "
            "print('fleet.cli.serve' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("argv", "guess"), [
    (["bundle", "verify", "b.bundle", "--trust", "r.json"], "b.bundle"),
    (["bundle", "verify", "--trust", "r.json", "b.bundle"], "b.bundle"),
    (["bundle", "verify", "--trust=r.json", "b.bundle"], "b.bundle"),
    (["bundle", "verify", "b.bundle", "--help"], None),
    (["bundle", "verify", "a", "b"], None),
    (["bundle", "inspect", "b.bundle"], None),
    ([], None),
])
def test_verify_file_guess(argv: list[str], guess: str | None) -> None:
    assert _verify_file_guess(argv) == guess


# -- a chunked bundle, through the real command ----------------------------------------


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle whose model (9 MB) is listed in 1 MiB chunks, and its trust root."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("chunked")
    big = numpy_helper.from_array(np.random.default_rng(1).standard_normal((2250, 1000)).astype(np.float32),
                                  "big")
    graph = helper.make_graph([helper.make_node("Gather", ["big", "idx"], ["out"])], "g",
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1000])], [big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "big.onnx"))
    assert run_cli("keys", "init", str(root / "keys"), "--root-keys", "1").code == 0
    r = run_cli("bundle", "build", str(root / "big.onnx"), "--name", "big", "--version", "1.0.0",
                "--keys", str(root / "keys"), "--offline", "-o", str(root / "big.bundle"))
    assert r.code == 0, r.err
    return root / "big.bundle", root / "keys" / "root.json"


def _model_member(bundle: Path) -> tarfile.TarInfo:
    with tarfile.open(bundle) as tar:
        return max(tar.getmembers()[1:], key=lambda m: m.size)


def _plain_error(bundle: Path, trust: Path) -> str:
    """The refusal of the verify handler without a head start, as the CLI prints it."""
    from fleet.cli.bundle import verify

    with pytest.raises(EdgefleetError) as caught:
        verify(argparse.Namespace(file=str(bundle), trust=str(trust)))
    return f"edgefleet: error: {' '.join(str(caught.value).split())}"


def test_chunked_bundle_verifies(chunked: tuple[Path, Path]) -> None:
    bundle, trust = chunked
    assert _model_member(bundle).size > 8 * 1024 * 1024
    r = run_cli("bundle", "verify", str(bundle), "--trust", str(trust))
    assert r.code == 0, r.err
    assert r.out.startswith("OK ") and "hash-checked" in r.out


def test_tampered_chunk_is_refused_as_without_head_start(chunked: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, trust = chunked
    member = _model_member(bundle)
    data = bytearray(bundle.read_bytes())
    data[member.offset_data + 3 * (1 << 20) + 99] ^= 0xFF
    bad = tmp_path / "tampered.bundle"
    bad.write_bytes(bytes(data))
    r = run_cli("bundle", "verify", str(bad), "--trust", str(trust))
    r.assert_clean_error("does not verify (hash): file hash")
    assert "chunk 3 does not match the manifest's" in r.err
    assert r.err.strip().splitlines()[-1] == _plain_error(bad, trust)


def test_truncated_bundle_is_refused_as_without_head_start(chunked: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    bundle, trust = chunked
    member = _model_member(bundle)
    bad = tmp_path / "truncated.bundle"
    bad.write_bytes(bundle.read_bytes()[:member.offset_data + 5 * (1 << 20) + 10])
    r = run_cli("bundle", "verify", str(bad), "--trust", str(trust))
    r.assert_clean_error("does not verify")
    assert r.err.strip().splitlines()[-1] == _plain_error(bad, trust)


def test_in_process_main_leaves_the_collector_alone(chunked: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Only the program (argv from sys.argv) freezes the collector before it exits."""
    import gc

    from fleet.cli.main import main

    bundle, trust = chunked
    before = gc.get_freeze_count()
    assert main(["bundle", "verify", str(bundle), "--trust", str(trust)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert gc.get_freeze_count() == before
