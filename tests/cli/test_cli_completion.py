"""``edgefleet completion bash``: the script, run by a real bash, completes commands,
subcommands and options from the parser (so it never falls behind it)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from .conftest import Result


def _complete(script: str, *words: str) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last one being completed)."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    quoted = " ".join(f"'{w}'" for w in words)
    program = f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n_edgefleet\n" \
              'printf "%s\\n" "${COMPREPLY[@]}"\n'
    r = subprocess.run(["bash", "--norc", "--noprofile"], input=program, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion_follows_the_parser(cli: Callable[..., Result]) -> None:
    r = cli("completion", "bash")
    assert r.code == 0, r.err
    script = r.out
    assert _complete(script, "edgefleet", "roll") == ["rollout"]
    assert _complete(script, "edgefleet", "rollout", "app") == ["approve"]
    assert _complete(script, "edgefleet", "rollout", "approve", "3", "--js") == ["--json"]
    assert _complete(script, "edgefleet", "--fleet", "x", "device", "rel") == ["relabel"]
    assert set(_complete(script, "edgefleet", "rollout", "")) >= {
        "create", "list", "status", "start", "pause", "resume", "approve", "abort", "rollback", "watch"}
