"""The edgefleet command on this machine only: help, keys, bundle build/inspect/verify."""

from __future__ import annotations

import json
import stat
import tarfile
from pathlib import Path

import pytest

from shared.bundle.archive import read_envelope
from shared.bundle.trust import TrustRoot


def test_help_lists_commands_with_examples(cli) -> None:
    r = cli("--help")
    assert r.code == 0
    for word in ("serve", "keys", "bundle", "device", "rollout", "examples:"):
        assert word in r.out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["keys", "init", "--help"], ["--root-keys", "--threshold", "examples:"]),
        (["bundle", "build", "--help"], ["--golden", "milliseconds", "--ledger", "examples:"]),
        (["bundle", "verify", "--help"], ["--trust", "Exit 0"]),
        (["bundle", "inspect", "--help"], ["nothing is verified"]),
        (["rollout", "create", "--help"], ["bundle_id", "[[stages]]", "--start"]),
        (["rollout", "watch", "--help"], ["--timeout", "Exit 0", "3 when"]),
        (["serve", "--help"], ["--database-url", "--mqtt-url", "--enrollment-token"]),
        (["device", "list", "--help"], ["--fleet", "EDGEFLEET_URL", "EDGEFLEET_TOKEN"]),
    ],
)
def test_subcommand_help(cli, argv: list[str], words: list[str]) -> None:
    r = cli(*argv)
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    for word in words:
        assert word in text, word


def test_help_does_not_import_heavy_modules(cli) -> None:
    import subprocess
    import sys

    code = ("import sys; from fleet.cli.main import build_parser; build_parser(); "
            "heavy = [m for m in ('httpx', 'rich', 'numpy', 'onnxruntime', 'cryptography', 'litestar') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert out.strip() == "[]"


def test_usage_errors_exit_2(cli) -> None:
    r = cli("rollout", "status", "abc")
    assert r.code == 2
    assert "edgefleet: error: argument ID: 'abc' is not a whole number" in r.err
    r = cli("bundle", "build", "model.onnx")
    assert r.code == 2
    assert "the following arguments are required" in r.err
    r = cli("frobnicate")
    assert r.code == 2 and "invalid choice" in r.err
    r = cli("keys")
    assert r.code == 2 and "init" in r.err


def test_keys_init(cli, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    r = cli("keys", "init", str(keys), "--root-keys", "3", "--threshold", "2", "--signing-keys", "2")
    assert r.code == 0, r.err
    assert "root.json" in r.out and "pin this file on every device" in r.out
    names = sorted(p.name for p in keys.iterdir())
    assert names == ["root-1.key", "root-2.key", "root-3.key", "root.json", "roots", "signing-1.key",
                     "signing-2.key"]
    for p in keys.glob("*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    root = TrustRoot.load((keys / "root.json").read_bytes())
    assert root.payload.root.threshold == 2
    assert len(root.payload.delegations[0].keyids) == 2


def test_keys_init_refuses_existing_root(cli, built) -> None:
    before = (built.keys / "root.json").read_bytes()
    cli("keys", "init", str(built.keys)).assert_clean_error("already holds a root.json")
    assert (built.keys / "root.json").read_bytes() == before


def test_keys_init_refuses_threshold_above_keys(cli, tmp_path: Path) -> None:
    cli("keys", "init", str(tmp_path / "k"), "--root-keys", "2", "--threshold", "3").assert_clean_error(
        "--threshold 3 is more than the 2 root keys")
    assert not (tmp_path / "k").exists()


def test_bundle_build_prints_identity(built) -> None:
    out = built.build.out
    assert "detector" in out and "7 (1.0.0)" in out
    digest = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("digest"))
    root = TrustRoot.load((built.keys / "root.json").read_bytes())
    assert root.verify_manifest(read_envelope(built.bundle)).digest == digest
    assert "bytes" in out


def test_bundle_build_default_release_is_unix_time_in_ms(cli, built, tmp_path: Path) -> None:
    import time

    before = time.time_ns() // 1_000_000
    out = tmp_path / "b.bundle"
    r = cli("bundle", "build", str(built.model), "--name", "detector", "--version", "2",
            "--keys", str(built.keys), "--ledger", str(tmp_path / "ledger.json"), "-o", str(out))
    assert r.code == 0, r.err
    root = TrustRoot.load((built.keys / "root.json").read_bytes())
    release = root.verify_manifest(read_envelope(out)).manifest.release
    assert before <= release <= time.time_ns() // 1_000_000


def test_bundle_build_with_golden_npz(cli, built, tmp_path: Path) -> None:
    import numpy as np

    golden = tmp_path / "golden.npz"
    np.savez(golden, x=np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4))
    out = tmp_path / "g.bundle"
    r = cli("bundle", "build", str(built.model), "--name", "detector", "--version", "3", "--release", "9",
            "--golden", str(golden), "--atol", "0.01", "--keys", str(built.keys),
            "--ledger", str(tmp_path / "ledger.json"), "-o", str(out))
    assert r.code == 0, r.err
    root = TrustRoot.load((built.keys / "root.json").read_bytes())
    manifest = root.verify_manifest(read_envelope(out)).manifest
    assert manifest.golden_tolerance.atol == 0.01


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--name", "Bad Name"], "model name 'Bad Name' must match"),
        (["--golden", "/nonexistent/golden.npz"], "golden inputs /nonexistent/golden.npz does not exist"),
        (["--keys", "/nonexistent/keys"], "key directory /nonexistent/keys does not exist"),
        (["--quantize", "static"], "--quantize static needs --calibration"),
    ],
)
def test_bundle_build_errors(cli, built, tmp_path: Path, extra: list[str], fragment: str) -> None:
    args = {"--name": "detector", "--version": "1", "--keys": str(built.keys),
            "-o": str(tmp_path / "x.bundle")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    argv = ["bundle", "build", str(built.model)] + [item for kv in args.items() for item in kv]
    cli(*argv).assert_clean_error(fragment)
    assert not (tmp_path / "x.bundle").exists()


def test_bundle_build_missing_model(cli, built, tmp_path: Path) -> None:
    cli("bundle", "build", str(tmp_path / "nope.onnx"), "--name", "d", "--version", "1",
        "--keys", str(built.keys), "-o", str(tmp_path / "x.bundle")).assert_clean_error("does not exist")


def test_bundle_build_not_a_model(cli, built, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    cli("bundle", "build", str(junk), "--name", "d", "--version", "1",
        "--keys", str(built.keys), "-o", str(tmp_path / "x.bundle")).assert_clean_error("cannot load")


def test_bundle_inspect_unverified_json(cli, built) -> None:
    r = cli("bundle", "inspect", str(built.bundle), "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["verified"] is False and doc["delegation"] is None
    assert doc["manifest"]["name"] == "detector" and doc["manifest"]["release"] == 7
    assert set(doc["manifest"]["files"]) >= {"model", "golden"}
    assert len(doc["digest"]) == 64 and len(doc["signatures"]) == 1


def test_bundle_inspect_text_says_unverified(cli, built) -> None:
    r = cli("bundle", "inspect", str(built.bundle))
    assert r.code == 0, r.err
    assert "UNVERIFIED" in r.out and "--trust" in r.out
    assert "x float32[batch, 4]" in r.out


def test_bundle_inspect_with_trust(cli, built) -> None:
    r = cli("bundle", "inspect", str(built.bundle), "--trust", str(built.keys / "root.json"), "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["verified"] is True and doc["delegation"] == "online"
    r = cli("bundle", "inspect", str(built.bundle), "--trust", str(built.keys / "root.json"))
    assert "VERIFIED against" in r.out and "UNVERIFIED" not in r.out


def test_bundle_verify_good(cli, built) -> None:
    r = cli("bundle", "verify", str(built.bundle), "--trust", str(built.keys / "root.json"))
    assert r.code == 0, r.err
    assert r.out.startswith("OK ") and "detector release 7" in r.out and "hash-checked" in r.out


def test_bundle_verify_tampered_blob(cli, built, tmp_path: Path, flip_model_byte) -> None:
    bad = tmp_path / "tampered.bundle"
    flip_model_byte(built.bundle, bad, built)
    r = cli("bundle", "verify", str(bad), "--trust", str(built.keys / "root.json"))
    r.assert_clean_error("does not verify (hash): file hash")
    assert "does not match the manifest's" in r.err


def test_bundle_verify_wrong_trust_root(cli, built, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert cli("keys", "init", str(other), "--root-keys", "1").code == 0
    r = cli("bundle", "verify", str(built.bundle), "--trust", str(other / "root.json"))
    r.assert_clean_error("does not verify (signature)")
    assert "keys the root does not delegate" in r.err


def test_bundle_verify_missing_file(cli, built, tmp_path: Path) -> None:
    cli("bundle", "verify", str(tmp_path / "nope.bundle"), "--trust", str(built.keys / "root.json")
        ).assert_clean_error("bundle")
    cli("bundle", "verify", str(built.bundle), "--trust", str(tmp_path / "nope.json")
        ).assert_clean_error("trust root")


def test_bundle_verify_trust_root_is_garbage(cli, built, tmp_path: Path) -> None:
    bad = tmp_path / "root.json"
    bad.write_text('{"payloadType": "x"}')
    cli("bundle", "verify", str(built.bundle), "--trust", str(bad)).assert_clean_error(
        "is not usable (malformed)")


def test_bundle_verify_not_a_tar(cli, built, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x00\x01 not a tar" * 100)
    cli("bundle", "verify", str(junk), "--trust", str(built.keys / "root.json")).assert_clean_error(
        "not a readable bundle archive")
    cli("bundle", "inspect", str(junk)).assert_clean_error("not a readable bundle archive")


def test_bundle_verify_extra_member(cli, built, tmp_path: Path) -> None:
    import io

    bad = tmp_path / "extra.bundle"
    with tarfile.open(built.bundle) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        info = tarfile.TarInfo("../evil")
        info.size = 4
        dst.addfile(info, io.BytesIO(b"evil"))
    cli("bundle", "verify", str(bad), "--trust", str(built.keys / "root.json")).assert_clean_error(
        "does not verify (unsafe_archive): member '../evil' has an unsafe path")


def test_serve_options_become_settings(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.cli.main import build_parser
    from fleet.cli.serve import settings_from_args

    monkeypatch.setenv("EDGEFLEET_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.delenv("EDGEFLEET_EMBEDDED_MQTT_PORT", raising=False)
    args = build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "9001", "--data-dir", str(tmp_path),
        "--keys", str(built.keys),
        "--mqtt-url", "mqtt://broker:1883", "--mqtt-port", "18830", "--admin-token", "adm",
        "--enrollment-token", "enr",
    ])
    s = settings_from_args(args)
    assert (s.host, s.port, s.data_dir, s.keys_dir) == ("0.0.0.0", 9001, tmp_path, built.keys)
    assert (s.mqtt_url, s.embedded_mqtt_port) == ("mqtt://broker:1883", 18830)
    assert (s.admin_token, s.enrollment_token) == ("adm", "enr")
    assert s.database_url == "sqlite:///from-env.db"  # the environment fills what options leave out


def test_serve_refuses_keys_without_root(cli, tmp_path: Path) -> None:
    cli("serve", "--keys", str(tmp_path), "--data-dir", str(tmp_path / "d")).assert_clean_error(
        "holds no root.json; create one with 'edgefleet keys init")
    cli("serve", "--port", "70000").assert_clean_error("port 70000 is above 65535", code=2)


def test_keys_rotate_and_delegate_then_build_with_delegation(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from fleet.demo.models import write_classifier

    run_cli = cli
    keys = tmp_path / "keys"
    assert run_cli("keys", "init", str(keys)).code == 0
    pinned = (keys / "root.json").read_bytes()
    r = run_cli("keys", "rotate", str(keys), "--root-keys", "2", "--threshold", "2")
    assert r.code == 0 and "trust root v2" in r.out, r.err
    r = run_cli("keys", "delegate", str(keys), "--name", "vision", "--models", "clf-*")
    assert r.code == 0 and "trust root v3" in r.out, r.err
    model = tmp_path / "m.onnx"
    write_classifier(model)
    out = tmp_path / "b.bundle"
    r = run_cli("bundle", "build", str(model), "--name", "clf-a", "--version", "1", "--release", "1",
                "--keys", str(keys), "--delegation", "vision", "-o", str(out))
    assert r.code == 0, r.err
    # A device pinning root v1 walks v2, v3 and then accepts the bundle signed by 'vision'.
    root = TrustRoot.load(pinned)
    for version in (2, 3):
        root = root.rotate((keys / "roots" / f"{version}.root.json").read_bytes())
    r = run_cli("bundle", "verify", str(out), "--trust", str(keys / "root.json"))
    assert r.code == 0, r.err
    # The delegation cannot sign another model name.
    r = run_cli("bundle", "build", str(model), "--name", "other", "--version", "1", "--release", "1",
                "--keys", str(keys), "--delegation", "vision", "-o", str(tmp_path / "x.bundle"))
    assert r.code == 1 and "scope" in r.err, r.err
