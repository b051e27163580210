"""edgefleet-agent install / predict / status, offline, and its one-line errors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from agent.cli import build_parser, main, run_args, startup_done
from agent.update.store import StateStore
from shared.bundle.keyring import Keyring

from .conftest import Bundles

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path: Path, keyring: Keyring) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "state"\ntrust_root = "{keyring.root_path}"\n')
    return path


def test_install_status_predict(cfg: Path, bundles: Bundles, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(cfg), "install", str(bundles.build(1))]) == 0
    assert "installed clf release 1 (version 1.1)" in capsys.readouterr().out
    assert main(["--config", str(cfg), "status"]) == 0
    assert "clf: state committed, active r1 (1.1), previous none" in capsys.readouterr().out
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["-c", str(cfg), "predict", "clf", "-i", str(tmp_path / "in.npz"),
                 "-o", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert out["probs"].shape == (3, 3)
    capsys.readouterr()
    assert main(["--config", str(cfg), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"][0]["state"] == "committed" and doc["models"][0]["active"]["release"] == 1


def test_refusal_is_one_line_with_reason(cfg: Path, bundles: Bundles,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(cfg), "install", str(bundles.build(3, seed=2))]) == 0
    capsys.readouterr()
    assert main(["--config", str(cfg), "install", str(bundles.build(2, seed=1))]) == 3
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-agent: error: refused (rollback):") and err.count("\n") == 1
    assert main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "state failed, active r3 (1.3)" in out and "reason rollback" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["install", "/nonexistent.bundle"], "does not exist"),
        (["predict", "clf", "-i", "x.npz", "-o", "y.npz"], "no active release of 'clf'"),
    ],
)
def test_expected_errors(
    cfg: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(cfg), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgefleet-agent: error: ") and message in err and "Traceback" not in err


def test_bad_config_and_not_a_bundle(tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('state_dir = "s"\ntrust_root = "r"\nfoo = 1\n')
    assert main(["--config", str(bad), "status"]) == 1
    assert "unknown key foo = 1" in capsys.readouterr().err
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\0" * 2048)
    assert main(["--config", str(cfg), "install", str(junk)]) == 3
    assert "refused (unsafe_archive): bundle must start" in capsys.readouterr().err


def test_install_while_agent_runs_is_refused(cfg: Path, bundles: Bundles, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = StateStore(tmp_path / "state")
    store.acquire()
    try:
        assert main(["--config", str(cfg), "install", str(bundles.build(1))]) == 1
        assert "another edgefleet-agent process" in capsys.readouterr().err
    finally:
        store.release()


def test_module_help_and_lean_imports() -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("run", "install", "predict", "status"):
        assert cmd in out
    code = ("import sys, agent.main, agent.cli; "
            "bad = [m for m in ('onnx', 'litestar', 'sqlmodel', 'pydantic', 'onnxruntime', 'fleet') "
            "if m in sys.modules]; print(bad)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_a_start_imports_no_update_source_nor_mqtt_session() -> None:
    # loaded when first used, not with the agent (cold start, docs/performance.md): bundle
    # sources (tarfile, chunked downloads) with the first bundle driven, the MQTT session's
    # modules (paho, reporter, spool) when it starts, HTTP and crypto only for a fleet
    code = ("import sys, agent.main, agent.cli; "
            "print(sorted(m for m in ('agent.update.sources', 'agent.update.chunked', 'tarfile', "
            "'agent.telemetry.reporter', 'agent.telemetry.spool', 'paho', 'httpx', 'cryptography', "
            "'agent.fleet_client', 'agent.identity.certificate', 'dataclasses') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_the_collector_is_as_found_after_a_command(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # main turns it off while a command starts (python -m agent before its imports too)
    assert gc.isenabled()
    assert main(["--config", str(cfg), "status"]) == 0
    assert gc.isenabled()
    gc.disable()
    try:
        assert main(["--config", str(cfg), "status"]) == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_command_imports_the_cli_with_the_collector_off() -> None:
    # the service starts the console script: its entry point, like python -m agent, is the
    # launcher that turns the collector off before the CLI's imports, and on again after
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edgefleet-agent"] == "agent.launch:main"
    code = ("import gc, sys\n"
            "seen = []\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'agent.cli': seen.append(gc.isenabled())\n"
            "sys.meta_path.insert(0, Watch())\n"
            "sys.argv = ['edgefleet-agent', '--version']\n"
            "from agent.launch import main\n"
            "try:\n"
            "    main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(seen, gc.isenabled())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[False] True", out.stdout + out.stderr


def test_startup_done_turns_the_collector_on_with_the_start_in_the_oldest_generation() -> None:
    gc.disable()
    try:
        made = [[] for _ in range(5000)]  # containers made while the collector is off: young
        assert gc.get_count()[0] >= 5000
        startup_done(True)
        # on again, nothing left frozen (all of it stays collectable), nothing young to walk
        assert gc.isenabled() and gc.get_freeze_count() == 0 and gc.get_count()[0] < 100
        oldest = {id(o) for o in gc.get_objects(generation=2)}
        assert all(id(x) in oldest for x in made)
    finally:
        gc.enable()
    gc.disable()
    try:
        startup_done(False)  # it was off before the start: it stays off
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("argv", [
    ["run"], ["-c", "a.toml", "run"], ["--config", "a.toml", "run"], ["--config=a=b.toml", "run"],
    ["--log-level", "DEBUG", "run"], ["--log-level=ERROR", "--log-format=json", "run"],
    ["--log-format", "journal", "-c", "/etc/edgefleet/agent.toml", "--log-level", "WARNING", "run"],
    ["-c", "run", "run"],
])
def test_run_args_parse_run_as_argparse_does(argv: list[str]) -> None:
    # the service's start skips argparse (~7 ms, docs/performance.md): same fields, same values
    fast = run_args(argv)
    assert fast is not None
    full = vars(build_parser().parse_args(argv))
    assert vars(fast) == {k: full[k] for k in ("config", "log_level", "log_format", "command")}


@pytest.mark.parametrize("argv", [
    [], ["status"], ["run", "--help"], ["--help", "run"], ["-h"], ["--version"], ["run", "-c", "a"],
    ["--conf", "a.toml", "run"], ["-ca.toml", "run"], ["-c=a.toml", "run"], ["--config=", "run"],
    ["--config", "-x", "run"], ["--config=-x", "run"], ["-c", "a", "-c", "b", "run"], ["-c", "run"],
    ["--log-level", "TRACE", "run"], ["--log-format", "xml", "run"], ["--", "run"], ["x", "run"],
    ["--log-level"], ["run", "run"],
])
def test_run_args_leave_anything_else_to_argparse(argv: list[str]) -> None:
    assert run_args(argv) is None


def test_a_run_start_loads_no_argparse_nor_zipfile_nor_typing_extensions(tmp_path: Path, keyring: Keyring,
                                                   bundles: Bundles) -> None:
    # a start reads its arguments by hand, the golden .npz without zipfile (agent.runtime.npz),
    # imports msgspec without typing_extensions (shared.leanimport), hashes the small stored
    # envelope without OpenSSL (shared.digest); cold start, docs/performance.md
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "state"\ntrust_root = "{keyring.root_path}"\n'
                   f'[api]\nlisten = ""\nunix_socket = "{tmp_path / "api.sock"}"\n')
    assert main(["--config", str(cfg), "install", str(bundles.build(1))]) == 0
    code = ("import sys, agent.cli; from agent.main import Agent; "
            "Agent.run = lambda self, started=None: (self.start(), print(sorted(self.host.snapshot())), "
            "self.stop(), 0)[3]; "
            f"rc = agent.cli.main(['-c', {str(cfg)!r}, '--log-level', 'ERROR', 'run']); "
            "print(rc, sorted(m for m in ('argparse', 'gettext', 'locale', 'zipfile', 'typing_extensions', "
            "'hashlib', 'shutil', 'shared.telemetry.messages') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.split("\n")[-3:] == ["['clf']", "0 []", ""]


def test_what_msgspec_takes_from_typing_extensions_is_typings_own() -> None:
    """A start imports msgspec without typing_extensions (shared.leanimport): msgspec then
    takes get_type_hints (always with include_extras=True), Required and NotRequired from
    typing. The same on the structs a start decodes."""
    import typing

    import msgspec
    import typing_extensions

    from agent import config, connection_state
    from agent.update import lifecycle
    from shared.bundle import envelope, manifest, trust

    assert sys.version_info >= (3, 11)
    assert typing_extensions.Required is typing.Required
    assert typing_extensions.NotRequired is typing.NotRequired
    structs = [obj for mod in (config, connection_state, lifecycle, manifest, envelope, trust)
               for obj in vars(mod).values()
               if isinstance(obj, type) and issubclass(obj, msgspec.Struct)
               and obj.__module__ == mod.__name__]
    assert len(structs) >= 12
    for struct in structs:
        assert typing_extensions.get_type_hints(struct, include_extras=True) == typing.get_type_hints(
            struct, include_extras=True), struct
