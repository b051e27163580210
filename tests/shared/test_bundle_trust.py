"""TrustRoot: loading a pinned root, verifying manifests, anti-rollback policy, rotation."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from shared.bundle import envelope as dsse
from shared.bundle.keyring import build_root
from shared.bundle.keys import generate, key_id, raw_public
from shared.bundle.manifest import payload_digest
from shared.bundle.trust import TrustRoot, check_release_policy
from shared.errors import (
    AgentTooOldError,
    ExpiredError,
    MalformedDocumentError,
    RollbackError,
    ScopeError,
    SignatureError,
)
from shared.timeutil import format_ts, utcnow


def _kid(key) -> str:
    return key_id(key.public_key())


# --- TrustRoot.load ------------------------------------------------------------------


def test_load_self_signed_root(keys) -> None:
    root = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    assert root.version == 1
    assert root.payload.root.threshold == 2
    assert [d.name for d in root.payload.delegations] == ["online"]


def test_load_accepts_exactly_threshold_signatures(keys) -> None:
    data = build_root(keys.root, 2, keys.signers, sign_with=keys.root[1:])
    assert TrustRoot.load(data).version == 1


def test_load_refuses_below_threshold(keys) -> None:
    data = build_root(keys.root, 2, keys.signers, sign_with=keys.root[:1])
    with pytest.raises(SignatureError, match=r"root: 1 valid signature.*threshold is 2"):
        TrustRoot.load(data)


def test_load_refuses_root_signed_by_signing_keys(keys) -> None:
    # Delegated keys are listed in the root's keys, but they are not in the root role.
    data = build_root(keys.root, 1, keys.signers, sign_with=keys.signers)
    with pytest.raises(SignatureError, match=r"root: 0 valid signature"):
        TrustRoot.load(data)


def test_load_refuses_wrong_payload_type(keys, make_root_doc, sign_raw) -> None:
    data = sign_raw(json.dumps(make_root_doc(keys.root, keys.signers)).encode(), keys.root)
    with pytest.raises(SignatureError, match=r"root envelope carries 'application/vnd.edgefleet.manifest"):
        TrustRoot.load(data)


def _signed_root(payload: dict, keys_) -> bytes:
    return dsse.sign(dsse.ROOT_TYPE, json.dumps(payload).encode(), keys_).to_json()


def test_load_refuses_key_id_not_matching_its_key(make_root_doc, keys) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    victim = _kid(keys.root[0])
    doc["keys"][victim]["public"] = raw_public(keys.stranger.public_key()).hex()
    with pytest.raises(MalformedDocumentError, match=f"key id {victim[:12]}… does not match its public key"):
        TrustRoot.load(_signed_root(doc, keys.root))


def test_load_refuses_unknown_key_id_in_root_role(make_root_doc, keys) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["root"]["keyids"].append("ff" * 32)
    with pytest.raises(MalformedDocumentError, match=r"role root names unknown key ids"):
        TrustRoot.load(_signed_root(doc, keys.root))


def test_load_refuses_unknown_key_id_in_delegation(make_root_doc, keys) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["delegations"][0]["keyids"] = ["ee" * 32]
    with pytest.raises(MalformedDocumentError, match=r"role delegation online names unknown key ids"):
        TrustRoot.load(_signed_root(doc, keys.root))


@pytest.mark.parametrize("threshold", [0, 4, -1])
def test_load_refuses_root_threshold_out_of_range(make_root_doc, keys, threshold: int) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["root"]["threshold"] = threshold
    with pytest.raises(MalformedDocumentError, match=f"role root threshold {threshold} must be 1..3"):
        TrustRoot.load(_signed_root(doc, keys.root))


def test_load_refuses_delegation_threshold_out_of_range(make_root_doc, keys) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["delegations"][0]["threshold"] = 3
    with pytest.raises(MalformedDocumentError, match=r"role delegation online threshold 3 must be 1..2"):
        TrustRoot.load(_signed_root(doc, keys.root))


def test_load_refuses_key_listed_twice_in_a_role(make_root_doc, keys) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["root"]["keyids"].append(doc["root"]["keyids"][0])
    with pytest.raises(MalformedDocumentError, match=r"role root lists a key twice"):
        TrustRoot.load(_signed_root(doc, keys.root))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"schema": "other/v1"}, "root schema 'other/v1'"),
        ({"version": 0}, "root version must be at least 1"),
        ({"version": "1"}, "Expected `int`, got `str`"),
        ({"expires": "tomorrow"}, "root expires 'tomorrow' is not an RFC 3339 timestamp"),
        ({"extra": True}, "Object contains unknown field `extra`"),
    ],
)
def test_load_refuses_malformed_root(make_root_doc, keys, change: dict, fragment: str) -> None:
    doc = make_root_doc(keys.root, keys.signers, **change)
    with pytest.raises(MalformedDocumentError) as info:
        TrustRoot.load(_signed_root(doc, keys.root))
    assert fragment in str(info.value)


def test_load_refuses_duplicate_delegation_and_empty_scope(make_root_doc, keys) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["delegations"].append(dict(doc["delegations"][0]))
    with pytest.raises(MalformedDocumentError, match=r"delegation 'online' listed twice"):
        TrustRoot.load(_signed_root(doc, keys.root))
    doc = make_root_doc(keys.root, keys.signers)
    doc["delegations"][0]["models"] = []
    with pytest.raises(MalformedDocumentError, match=r"delegation online covers no models"):
        TrustRoot.load(_signed_root(doc, keys.root))


# --- verify_manifest ---------------------------------------------------------------


def test_verify_manifest_valid(trust, keys, make_doc, sign) -> None:
    env = sign(make_doc(), keys.signers[:1])
    verified = trust.verify_manifest(env)
    assert verified.manifest.name == "detector"
    assert verified.manifest.release == 5
    assert verified.delegation == "online"
    assert verified.envelope == env
    assert verified.digest == payload_digest(dsse.Envelope.from_json(env).payload)


def test_verify_manifest_unknown_key(trust, keys, make_doc, sign) -> None:
    with pytest.raises(SignatureError, match=r"best: 0 valid.*1 signature\(s\) by keys the root does not"):
        trust.verify_manifest(sign(make_doc(), [keys.stranger]))


def test_verify_manifest_root_key_is_not_a_signing_key(trust, keys, make_doc, sign) -> None:
    # Root keys are known to the root but are not delegated to sign manifests.
    with pytest.raises(SignatureError, match=r"not signed by a threshold of any delegation"):
        trust.verify_manifest(sign(make_doc(), keys.root))


def test_verify_manifest_below_delegation_threshold(keys, make_doc, sign) -> None:
    trust2 = keys.trust(signing_threshold=2)
    with pytest.raises(SignatureError, match=r"best: 1 valid signature"):
        trust2.verify_manifest(sign(make_doc(), keys.signers[:1]))
    assert trust2.verify_manifest(sign(make_doc(), keys.signers)).manifest.name == "detector"


def test_verify_manifest_duplicate_signature_counts_once(keys, make_doc, sign) -> None:
    trust2 = keys.trust(signing_threshold=2)
    env = sign(make_doc(), [keys.signers[0], keys.signers[0]])
    with pytest.raises(SignatureError, match=r"best: 1 valid signature"):
        trust2.verify_manifest(env)


def test_verify_manifest_tampered_payload(trust, keys, make_doc, sign) -> None:
    env = dsse.Envelope.from_json(sign(make_doc(release=5), keys.signers[:1]))
    tampered = env.payload.replace(b'"release": 5', b'"release": 9')
    assert tampered != env.payload
    forged = dsse.Envelope(env.payload_type, tampered, env.signatures).to_json()
    with pytest.raises(SignatureError, match=r"best: 0 valid signature"):
        trust.verify_manifest(forged)


def test_verify_manifest_single_flipped_byte(trust, keys, make_doc, sign) -> None:
    env = dsse.Envelope.from_json(sign(make_doc(), keys.signers[:1]))
    payload = bytearray(env.payload)
    payload[len(payload) // 2] ^= 0x01
    forged = dsse.Envelope(env.payload_type, bytes(payload), env.signatures).to_json()
    with pytest.raises(SignatureError, match=r"not signed by a threshold"):
        trust.verify_manifest(forged)


def test_verify_manifest_wrong_payload_type(trust, keys, make_doc, sign) -> None:
    env = sign(make_doc(), keys.signers[:1], dsse.ROOT_TYPE)
    with pytest.raises(SignatureError, match=r"expected a manifest"):
        trust.verify_manifest(env)


def test_verify_manifest_expired_manifest(trust, keys, make_doc, sign) -> None:
    past = format_ts(utcnow() - timedelta(minutes=1))
    with pytest.raises(ExpiredError, match=r"manifest detector r5 expired at"):
        trust.verify_manifest(sign(make_doc(expires=past), keys.signers[:1]))


def test_verify_manifest_expired_by_clock(trust, keys, make_doc, sign) -> None:
    env = sign(make_doc(), keys.signers[:1])
    with pytest.raises(ExpiredError, match=r"manifest detector r5 expired"):
        trust.verify_manifest(env, now=utcnow() + timedelta(days=31))


def test_verify_manifest_expired_delegation(make_root_doc, keys, make_doc, sign) -> None:
    doc = make_root_doc(keys.root, keys.signers)
    doc["delegations"][0]["expires"] = format_ts(utcnow() - timedelta(days=1))
    root = TrustRoot.load(_signed_root(doc, keys.root))
    with pytest.raises(ExpiredError, match=r"delegation 'online' expired at"):
        root.verify_manifest(sign(make_doc(), keys.signers[:1]))


def test_verify_manifest_expired_root(keys, make_doc, sign) -> None:
    root = keys.trust(expires_days=-1)
    with pytest.raises(ExpiredError, match=r"trust root v1 expired at"):
        root.verify_manifest(sign(make_doc(), keys.signers[:1]))


def test_verify_manifest_out_of_scope(keys, make_doc, sign) -> None:
    root = keys.trust(models=("cam-*",))
    with pytest.raises(ScopeError, match=r"model 'detector' is outside the scope .*'online'"):
        root.verify_manifest(sign(make_doc(), keys.signers[:1]))
    assert root.verify_manifest(sign(make_doc(name="cam-left"), keys.signers[:1])).manifest.name == "cam-left"


def test_verify_manifest_scope_is_case_sensitive(keys, make_doc, sign) -> None:
    root = keys.trust(models=("Cam*",))
    with pytest.raises(ScopeError, match=r"outside the scope"):
        root.verify_manifest(sign(make_doc(name="cam"), keys.signers[:1]))


def test_verify_manifest_malformed_after_valid_signature(trust, keys, make_doc, sign) -> None:
    with pytest.raises(MalformedDocumentError, match=r"Expected `int`, got `str` - at `\$\.release`"):
        trust.verify_manifest(sign(make_doc(release="1"), keys.signers[:1]))


def test_verify_manifest_malformed_envelope(trust) -> None:
    with pytest.raises(MalformedDocumentError, match=r"envelope is not valid JSON"):
        trust.verify_manifest(b"\x00garbage")


# --- check_release_policy ------------------------------------------------------------


def test_policy_accepts_first_and_newer_release(make_manifest) -> None:
    m = make_manifest(release=5)
    check_release_policy(m, "d5", agent_version="0.1.0", highest=None)
    check_release_policy(m, "d5", agent_version="0.1.0", highest=(4, "d4"))
    check_release_policy(m, "d5", agent_version="0.1.0", highest=(5, "d5"))


def test_policy_refuses_older_release(make_manifest) -> None:
    with pytest.raises(RollbackError, match=r"detector release 5 is older than release 6"):
        check_release_policy(make_manifest(release=5), "d5", agent_version="0.1.0", highest=(6, "d6"))


def test_policy_refuses_reused_release_number(make_manifest) -> None:
    with pytest.raises(RollbackError, match=r"release number cannot be reused"):
        check_release_policy(make_manifest(release=5), "other", agent_version="0.1.0", highest=(5, "d5"))


@pytest.mark.parametrize(("needed", "have"), [("0.2.0", "0.1.9"), ("1.0.0", "0.99.99"), ("0.1.10", "0.1.9")])
def test_policy_refuses_too_old_agent(make_manifest, needed: str, have: str) -> None:
    with pytest.raises(AgentTooOldError, match=f"bundle needs agent {needed}, this agent is {have}"):
        check_release_policy(make_manifest(min_agent_version=needed), "d", agent_version=have, highest=None)


def test_policy_refuses_malformed_agent_version(make_manifest) -> None:
    with pytest.raises(MalformedDocumentError, match=r"version '0.1' is not MAJOR.MINOR.PATCH"):
        check_release_policy(make_manifest(), "d", agent_version="0.1", highest=None)


# --- rotation --------------------------------------------------------------------------


def test_rotation_signed_by_old_and_new_threshold(keys) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    new_root = [generate() for _ in range(3)]
    data = build_root(new_root, 2, keys.signers, version=2, sign_with=keys.root[:2] + new_root[:2])
    v2 = v1.rotate(data)
    assert v2.version == 2
    assert v2.payload.root.keyids == [_kid(k) for k in new_root]


def test_rotation_refuses_new_keys_only(keys) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    new_root = [generate() for _ in range(3)]
    data = build_root(new_root, 2, keys.signers, version=2)
    with pytest.raises(SignatureError, match=r"root v1 \(signing its successor\): 0 valid signature"):
        v1.rotate(data)


def test_rotation_refuses_one_old_key_below_old_threshold(keys) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    new_root = [generate() for _ in range(3)]
    data = build_root(new_root, 2, keys.signers, version=2, sign_with=keys.root[:1] + new_root[:2])
    with pytest.raises(SignatureError, match=r"1 valid signature.*threshold is 2"):
        v1.rotate(data)


def test_rotation_refuses_old_keys_only(keys) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    new_root = [generate() for _ in range(3)]
    data = build_root(new_root, 2, keys.signers, version=2, sign_with=keys.root)
    with pytest.raises(SignatureError, match=r"root: 0 valid signature"):
        v1.rotate(data)


def test_rotation_refuses_version_skip(keys) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    data = build_root(keys.root, 2, keys.signers, version=3)
    with pytest.raises(RollbackError, match=r"new root has version 3; expected 2"):
        v1.rotate(data)


def test_rotation_refuses_same_version(keys) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers))
    with pytest.raises(RollbackError, match=r"new root has version 1; expected 2"):
        v1.rotate(build_root(keys.root, 2, keys.signers))


def test_rotated_root_verifies_with_new_delegation(keys, make_doc, sign) -> None:
    v1 = TrustRoot.load(build_root(keys.root, 2, keys.signers[:1]))
    data = build_root(keys.root, 2, keys.signers[1:], version=2)
    v2 = v1.rotate(data)
    env_old = sign(make_doc(), keys.signers[:1])
    env_new = sign(make_doc(), keys.signers[1:])
    assert v1.verify_manifest(env_old).manifest.release == 5
    assert v2.verify_manifest(env_new).manifest.release == 5
    with pytest.raises(SignatureError, match=r"not signed by a threshold"):
        v2.verify_manifest(env_old)
