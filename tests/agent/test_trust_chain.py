"""A device walks its pinned root forward to rotated roots (offline, via the CLI) and then
accepts bundles signed by the new delegation; a tampered stored link fails closed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import StateError
from agent.update.truststore import TrustStore
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier
from shared.bundle.keyring import delegate, init_keyring, load_keyring, rotate_root

REPO = Path(__file__).resolve().parents[2]


def agent(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    keys = tmp_path / "keys"
    init_keyring(keys)
    device = tmp_path / "device"
    device.mkdir()
    pinned = device / "root.json"
    pinned.write_bytes((keys / "root.json").read_bytes())  # the device pins root v1
    config = device / "agent.toml"
    config.write_text(f'state_dir = "{device / "state"}"\ntrust_root = "{pinned}"\n')
    return keys, config, device


def test_walks_rotated_chain_then_accepts_new_delegation(setup: tuple[Path, Path, Path]) -> None:
    keys, config, device = setup
    rotate_root(keys)  # v2: new root keys
    delegate(keys, name="vision", models=["clf"])  # v3: a scoped delegation for 'clf'
    model = device / "m.onnx"
    write_classifier(model)
    ring = load_keyring(keys)
    bundle = device / "clf.bundle"
    build_bundle(model, name="clf", version="1", release=1, keyring=ring, out=bundle,
                 golden_inputs=golden_inputs(), signing_keys=ring.delegation_keys("vision"))
    # Pinned v1 does not know the 'vision' keys: refused.
    r = agent(config, "install", str(bundle))
    assert r.returncode != 0 and "signature" in r.stderr, r.stderr
    # Walk the chain offline (files in any order), then the same bundle installs.
    roots = sorted((keys / "roots").glob("*.root.json"), reverse=True)
    r = agent(config, "trust", "update", *map(str, roots))
    assert r.returncode == 0 and "now v3" in r.stdout, (r.stdout, r.stderr)
    assert "v3" in agent(config, "trust", "show").stdout
    r = agent(config, "install", str(bundle))
    assert r.returncode == 0, r.stderr


def test_gap_in_chain_is_refused(setup: tuple[Path, Path, Path]) -> None:
    keys, config, _device = setup
    rotate_root(keys)
    rotate_root(keys)
    r = agent(config, "trust", "update", str(keys / "roots" / "3.root.json"))
    assert r.returncode != 0 and "v2 is missing" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_tampered_stored_link_fails_closed(setup: tuple[Path, Path, Path]) -> None:
    keys, _config, device = setup
    rotate_root(keys)
    store = TrustStore(device / "root.json", device / "state")
    root, accepted = store.update([(keys / "roots" / "2.root.json").read_bytes()])
    assert root.version == 2 and accepted == [2]
    # An attacker swaps the stored link for a self-signed root of their own with version 2.
    rogue = init_keyring(device / "rogue")
    rogue_v2 = rotate_root(rogue.directory)
    (device / "state" / "trust" / "2.root.json").write_bytes(
        (rogue.directory / "roots" / f"{rogue_v2.version}.root.json").read_bytes())
    with pytest.raises(StateError, match="does not follow"):
        store.load()


def _load_in_fresh_process(pinned: Path, state: Path) -> str:
    """The root version a new process loads, and whether that made it import cryptography."""
    code = ("import sys; from agent.update.truststore import TrustStore; "
            f"root = TrustStore({str(pinned)!r}, {str(state)!r}).load(); "
            "print(root.version, 'cryptography' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_checked_chain_is_not_checked_again_until_a_byte_changes(setup: tuple[Path, Path, Path]) -> None:
    keys, _config, device = setup
    pinned, state = device / "root.json", device / "state"
    rotate_root(keys)
    TrustStore(pinned, state).update([(keys / "roots" / "2.root.json").read_bytes()])
    # The first start on this chain checks its signatures (cryptography) and records it ...
    assert _load_in_fresh_process(pinned, state) == "2 True"
    assert (state / "trust" / "verified").is_file()
    # ... the next starts parse the same bytes and stay without cryptography.
    assert _load_in_fresh_process(pinned, state) == "2 False"
    # A record that does not match (damaged, or from another chain) means a full check again.
    (state / "trust" / "verified").write_text("0" * 64 + "\n")
    assert _load_in_fresh_process(pinned, state) == "2 True"
    assert _load_in_fresh_process(pinned, state) == "2 False"
    # A link swapped after the chain was recorded is checked again and fails closed.
    rogue = init_keyring(device / "rogue")
    rogue_v2 = rotate_root(rogue.directory)
    (state / "trust" / "2.root.json").write_bytes(
        (rogue.directory / "roots" / f"{rogue_v2.version}.root.json").read_bytes())
    with pytest.raises(StateError, match="does not follow"):
        TrustStore(pinned, state).load()
