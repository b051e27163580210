"""``edgefleet bundle verify`` imports msgspec without typing_extensions (fleet.cli.bundle's
``shared.leanimport``): the same answers, and what msgspec would have taken from
typing_extensions is typing's own on this Python."""

from __future__ import annotations

import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import typing_extensions

from fleet.cli.main import main
from shared.bundle import envelope, manifest, trust

from .conftest import REPO, Built

PROBE = (
    "import sys\n"
    "from fleet.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('loaded', *(m in sys.modules for m in ('typing_extensions', 'inspect', 'msgspec')))\n"
    "sys.exit(rc)\n"
)


def _fresh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)


def _in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    assert "typing_extensions" in sys.modules  # so the block is a no-op here: the plain import
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_answers_alike_without_typing_extensions(
    built: Built, tmp_path: Path, flip_model_byte: Callable[[Path, Path, Built], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = str(built.keys / "root.json")
    bad = tmp_path / "bad.bundle"
    flip_model_byte(built.bundle, bad, built)
    for bundle, code in ((built.bundle, 0), (bad, 1)):
        fresh = _fresh("bundle", "verify", str(bundle), "--trust", root)
        assert fresh.returncode == code, fresh.stderr
        *out, loaded = fresh.stdout.splitlines()
        assert loaded == "loaded False False True"
        assert (code, "\n".join(out) + ("\n" if out else ""), fresh.stderr) == _in_process(
            capsys, "bundle", "verify", str(bundle), "--trust", root)


def test_what_msgspec_takes_from_typing_extensions_is_typings_own() -> None:
    """msgspec.__init__ -> _utils: get_type_hints (always with include_extras=True),
    Required, NotRequired; with the import blocked it takes typing's."""
    assert sys.version_info >= (3, 11)
    assert typing_extensions.Required is typing.Required
    assert typing_extensions.NotRequired is typing.NotRequired
    structs = [obj for mod in (manifest, envelope, trust) for obj in vars(mod).values()
               if isinstance(obj, type) and issubclass(obj, msgspec.Struct)
               and obj.__module__ == mod.__name__]
    assert len(structs) >= 6
    for struct in structs:
        assert typing_extensions.get_type_hints(struct, include_extras=True) == typing.get_type_hints(
            struct, include_extras=True), struct
