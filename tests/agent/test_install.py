"""Installing bundles for real: signatures, hashes, onnxruntime, golden vectors, trial, recovery."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import pytest

from agent.errors import LoadError, SmokeTestError
from agent.update.lifecycle import UpdateState
from fleet.demo.models import golden_inputs
from shared.bundle.keyring import Keyring
from shared.errors import (
    AgentTooOldError,
    EdgefleetError,
    HashMismatchError,
    RollbackError,
    SignatureError,
)

from .conftest import Bundles, Rig, make_rig, read_bundle, resign, write_raw_bundle

S = UpdateState
X = golden_inputs(batch=2, seed=7)["x"]


def test_install_good_bundle_then_predict(rig: Rig, bundles: Bundles) -> None:
    rec = rig.installer.install_file(bundles.build(1))
    assert rec.state == S.COMMITTED and rec.active is not None and rec.active.release == 1
    assert rig.kinds() == ["download_started", "verified", "staged", "smoke_passed", "activated", "committed"]
    probs = rig.predict(X)["probs"]
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert rig.installer.store.highest("clf") == (1, rec.active.digest)
    # Content-addressed blobs, a stored envelope, nothing left in staging.
    blobs = sorted(p.name for p in (rig.state_dir / "blobs" / "sha256").iterdir())
    assert blobs == sorted(read_bundle(bundles.build(1))[1])
    assert list((rig.state_dir / "staging").iterdir()) == []
    assert len(list((rig.state_dir / "releases" / "clf").iterdir())) == 1


def test_upgrade_keeps_previous_and_gc_keeps_only_referenced(rig: Rig, bundles: Bundles) -> None:
    rig.installer.install_file(bundles.build(1))
    rig.installer.install_file(bundles.build(2, seed=1))
    rec = rig.installer.install_file(bundles.build(3, seed=2))
    assert (rec.active.release, rec.previous.release) == (3, 2)  # type: ignore[union-attr]
    assert rig.host.get("clf").release == 3  # type: ignore[union-attr]
    kept = {p.name for p in (rig.state_dir / "blobs" / "sha256").iterdir()}
    r1_model = hashlib.sha256(bundles.model("good", 0).read_bytes()).hexdigest()
    assert r1_model not in kept
    assert len(list((rig.state_dir / "releases" / "clf").iterdir())) == 2


def _refused(rig: Rig, bundle: Path, exc_type: type[EdgefleetError], code: str) -> None:
    before = rig.host.get("clf")
    with pytest.raises(exc_type) as err:
        rig.installer.install_file(bundle)
    assert err.value.code == code
    after = rig.host.get("clf")
    assert after is before and after is not None and after.release == 1, "active model must not change"
    rig.predict(X)
    rec = rig.installer.store.load("clf")
    assert rec is not None and rec.active is not None and rec.active.release == 1


@pytest.fixture
def installed(rig: Rig, bundles: Bundles) -> Rig:
    rig.installer.install_file(bundles.build(1))
    rig.events.clear()
    return rig


def test_tampered_model_blob_is_refused_by_hash(installed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    env, blobs = read_bundle(bundles.build(2, seed=1))
    model_sha = hashlib.sha256(bundles.model("good", 1).read_bytes()).hexdigest()
    data = bytearray(blobs[model_sha])
    data[-10] ^= 0xFF
    blobs[model_sha] = bytes(data)
    _refused(installed, write_raw_bundle(tmp_path / "t.bundle", env, blobs), HashMismatchError, "hash")
    rec = installed.installer.store.load("clf")
    assert rec.state == S.FAILED and rec.reason == "hash"  # type: ignore[union-attr]
    assert installed.kinds()[-1] == "failed" and installed.events[-1][4] == "hash"
    assert model_sha not in {p.name for p in (installed.state_dir / "blobs" / "sha256").iterdir()}
    assert list((installed.state_dir / "staging").iterdir()) == []


def test_untrusted_signer_is_refused(installed: Rig, bundles: Bundles, other_keyring: Keyring) -> None:
    _refused(installed, bundles.build(2, keyring=other_keyring), SignatureError, "signature")
    assert installed.events == []  # refused before any state change: nothing staged


def test_rollback_refused(rig: Rig, bundles: Bundles) -> None:
    rig.installer.install_file(bundles.build(1))
    rig.installer.install_file(bundles.build(3, seed=2))
    with pytest.raises(RollbackError) as err:
        rig.installer.install_file(bundles.build(2, seed=1))
    assert err.value.code == "rollback"
    assert rig.host.get("clf").release == 3  # type: ignore[union-attr]
    rec = rig.installer.store.load("clf")
    assert rec.state == S.FAILED and rec.reason == "rollback" and rec.active.release == 3  # type: ignore[union-attr]


def test_same_release_number_other_digest_is_refused(installed: Rig, bundles: Bundles) -> None:
    _refused(installed, bundles.build(1, seed=5), RollbackError, "rollback")


def test_bundle_for_newer_agent_is_refused(installed: Rig, bundles: Bundles) -> None:
    _refused(installed, bundles.build(2, min_agent_version="9.0.0"), AgentTooOldError, "agent_version")


def test_golden_mismatch_fails_smoke_test(installed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    other_model = bundles.model("good", 3).read_bytes()
    bad = resign(bundles.build(2, seed=1), tmp_path / "g.bundle", bundles.keyring,
                 replace_files={"model": other_model})
    _refused(installed, bad, SmokeTestError, "smoke_test")
    assert installed.kinds() == ["download_started", "verified", "staged", "failed"]
    assert "differs from golden" in installed.events[-1][5]


def test_unloadable_model_fails_with_load(installed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    bad = resign(bundles.build(2, seed=1), tmp_path / "l.bundle", bundles.keyring,
                 replace_files={"model": bundles.model("garbage").read_bytes()})
    _refused(installed, bad, LoadError, "load")


def test_failed_digest_is_not_retried_from_the_fleet(
    installed: Rig, bundles: Bundles, tmp_path: Path
) -> None:
    from agent.update.lifecycle import Target

    bad = resign(bundles.build(2, seed=1), tmp_path / "l.bundle", bundles.keyring,
                 replace_files={"model": bundles.model("garbage").read_bytes()})
    with pytest.raises(LoadError):
        installed.installer.install_file(bad)
    rec = installed.installer.store.load("clf")
    assert rec is not None and rec.target is not None and rec.target.digest in rec.failed_digests
    installed.events.clear()
    # The fleet still desires it: nothing happens (no fetcher is even needed).
    again = installed.installer.apply_target("clf", Target(rec.target.release, rec.target.digest, "u", "v"))
    assert again.state == S.FAILED and installed.events == []


def test_trial_commits_when_healthy(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> None:
    now = [1000.0]
    rig = make_rig(tmp_path / "s", keyring, trial_seconds=10, clock=lambda: now[0])
    rig.installer.install_file(bundles.build(1))
    rec = rig.installer.install_file(bundles.build(2, seed=1), trial=True)
    assert rec.state == S.TRIAL and rec.trial_until == 1010.0
    for _ in range(5):
        rig.predict(X)
    assert rig.installer.check_trials() == pytest.approx(10.0)
    now[0] = 1011.0
    assert rig.installer.check_trials() is None
    rec = rig.installer.store.load("clf")
    assert rec.state == S.COMMITTED and rec.active.release == 2 and rec.previous.release == 1  # type: ignore[union-attr]
    assert rig.kinds()[-1] == "committed"


def test_trial_errors_roll_back_to_previous(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> None:
    now = [1000.0]
    rig = make_rig(tmp_path / "s", keyring, trial_seconds=5, trial_max_error_rate=0.2, clock=lambda: now[0])
    rig.installer.install_file(bundles.build(1))
    rig.installer.install_file(bundles.build(2, variant="faulty"), trial=True)
    assert rig.host.get("clf").release == 2  # type: ignore[union-attr]
    from agent.errors import InferenceError

    for i in range(10):
        x = np.full((1, 4), 2.5 if i % 2 else 0.5, dtype=np.float32)
        with contextlib.suppress(InferenceError):
            rig.predict(x)
    now[0] = 1006.0
    rig.installer.check_trials()
    rec = rig.installer.store.load("clf")
    assert rec.state == S.ROLLED_BACK and rec.reason == "trial_errors"  # type: ignore[union-attr]
    assert rec.active.release == 1 and rec.previous is None  # type: ignore[union-attr]
    assert "5/10" in rec.message  # type: ignore[union-attr]
    assert rig.host.get("clf").release == 1  # type: ignore[union-attr]
    rig.predict(np.full((1, 4), 2.5, dtype=np.float32))  # the old model copes with it
    kind, release, from_release, reason = rig.events[-1][1:5]
    assert (kind, release, from_release, reason) == ("rolled_back", 1, 2, "trial_errors")
    # Anti-rollback stays at the faulty release: a fix must come as a higher release.
    assert rig.installer.store.highest("clf")[0] == 2  # type: ignore[index]


def test_restart_during_trial_rolls_back_runtime_crash(tmp_path: Path, keyring: Keyring,
                                                       bundles: Bundles) -> None:
    rig = make_rig(tmp_path / "s", keyring)
    rig.installer.install_file(bundles.build(1))
    rig.installer.install_file(bundles.build(2, seed=1), trial=True)
    # The process dies here; a new one starts from the records.
    fresh = make_rig(tmp_path / "s", keyring)
    assert fresh.installer.recover() == []
    rec = fresh.installer.store.load("clf")
    assert rec.state == S.ROLLED_BACK and rec.reason == "runtime_crash"  # type: ignore[union-attr]
    assert fresh.host.get("clf").release == 1  # type: ignore[union-attr]
    assert fresh.events[-1][1] == "rolled_back"


def test_restart_serves_active_or_falls_back_to_previous(tmp_path: Path, keyring: Keyring,
                                                        bundles: Bundles) -> None:
    rig = make_rig(tmp_path / "s", keyring)
    rig.installer.install_file(bundles.build(1))
    rec = rig.installer.install_file(bundles.build(2, seed=1))
    fresh = make_rig(tmp_path / "s", keyring)
    fresh.installer.recover()
    assert fresh.host.get("clf").release == 2  # type: ignore[union-attr]
    # The active release's model blob is damaged on disk: serve the previous one, not none.
    (tmp_path / "s" / "blobs" / "sha256" / hashlib.sha256(bundles.model("good", 1).read_bytes())
     .hexdigest()).write_bytes(b"x" * 10)
    third = make_rig(tmp_path / "s", keyring)
    third.installer.recover()
    assert third.host.get("clf").release == 1  # type: ignore[union-attr]
    assert rec.active is not None


def test_interrupted_install_resumes(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> None:
    """A kill after staging: the record says STAGED; the next start finishes the job."""
    rig = make_rig(tmp_path / "s", keyring)
    rig.installer.install_file(bundles.build(1))
    bundle = bundles.build(2, seed=1)
    vm = keyring.trust_root().verify_manifest(read_bundle(bundle)[0])
    from agent.update.lifecycle import Target, transition

    rec = rig.installer.store.load("clf")
    target = Target(2, vm.digest, bundle_path=str(bundle))
    for state in (S.DOWNLOADING, S.VERIFYING, S.STAGED):
        rec = transition(rec, state, target=target)  # type: ignore[arg-type]
    rig.installer.blobs.save_envelope("clf", 2, vm.digest, vm.envelope)
    for sha, data in read_bundle(bundle)[1].items():
        with rig.installer.blobs.open_staging(sha) as fh:
            fh.write(data)
        rig.installer.blobs.commit(sha)
    rig.installer.store.save(rec)

    fresh = make_rig(tmp_path / "s", keyring)
    assert fresh.installer.recover() == ["clf"]
    assert fresh.host.get("clf").release == 1  # type: ignore[union-attr]
    done = fresh.installer.resume("clf")
    assert done is not None and done.state == S.COMMITTED and fresh.host.get("clf").release == 2  # type: ignore[union-attr]
    assert fresh.kinds() == ["smoke_passed", "activated", "committed"]


def test_install_file_verifies_the_signatures_once_then_once_more_when_rechecking(
    rig: Rig, bundles: Bundles
) -> None:
    """One verification at intake (the name comes from it; policy is checked on its result),
    one when VERIFYING re-checks the stored envelope; no third (it used to run twice at intake)."""
    calls: list[int] = []
    real = rig.trust.verify_manifest

    def counted(envelope: bytes, **kw: object) -> object:
        calls.append(len(envelope))
        return real(envelope, **kw)  # type: ignore[arg-type]

    rig.trust.verify_manifest = counted  # type: ignore[method-assign]
    rec = rig.installer.install_file(bundles.build(1))
    assert rec.state == S.COMMITTED
    assert len(calls) == 2
    # a refusal by policy after the signatures verified is recorded, and costs one verification
    calls.clear()
    with pytest.raises(RollbackError):
        rig.installer.install_file(bundles.build(1, seed=3))
    assert len(calls) == 1
    assert rig.installer.store.load("clf").reason == "rollback"  # type: ignore[union-attr]
