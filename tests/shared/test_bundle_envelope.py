"""DSSE: the pre-authentication encoding, envelope parsing refusals, and signature counting."""

from __future__ import annotations

import base64
import json

import pytest

from shared.bundle import envelope as dsse
from shared.bundle.keys import key_id, raw_public
from shared.errors import MalformedDocumentError, SignatureError


def _env(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "payloadType": dsse.MANIFEST_TYPE,
        "payload": base64.b64encode(b"{}").decode(),
        "signatures": [{"keyid": "ab" * 32, "sig": base64.b64encode(b"s" * 64).decode()}],
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_pae_matches_the_dsse_spec_example() -> None:
    assert (
        dsse.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert dsse.pae("t/é", b"") == b"DSSEv1 4 t/\xc3\xa9 0 "


def test_pae_separates_type_from_payload() -> None:
    # Moving a byte from the type into the payload must change the signed message.
    assert dsse.pae("ab", b"c") != dsse.pae("a", b"bc")


def test_round_trip_keeps_exact_bytes(keys) -> None:
    payload = b'{"b": 1,   "a": 2}\n'
    env = dsse.sign(dsse.MANIFEST_TYPE, payload, keys.signers)
    parsed = dsse.Envelope.from_json(env.to_json())
    assert parsed == env
    assert parsed.payload == payload
    assert [s.keyid for s in parsed.signatures] == [key_id(k.public_key()) for k in keys.signers]


def test_sign_needs_a_key() -> None:
    with pytest.raises(ValueError, match=r"at least one signing key"):
        dsse.sign(dsse.MANIFEST_TYPE, b"x", [])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "envelope is not valid JSON"),
        (b"[]", "exactly payloadType, payload and signatures"),
        (_env(extra=1), "exactly payloadType, payload and signatures"),
        (_env(payload=5), "payloadType and payload must be strings"),
        (_env(payloadType=None), "payloadType and payload must be strings"),
        (_env(signatures=[]), "envelope has no signatures"),
        (_env(signatures={}), "envelope has no signatures"),
        (_env(payload="not base64!"), "envelope payload is not valid base64"),
        (_env(payload="YWJj\n"), "envelope payload is not valid base64"),
        (_env(signatures=[{"keyid": "a", "sig": "@@@@"}]), "envelope signature is not valid base64"),
        (_env(signatures=[{"keyid": "a"}]), "exactly keyid and sig"),
        (_env(signatures=[{"keyid": "a", "sig": "", "x": 1}]), "exactly keyid and sig"),
        (_env(signatures=[{"keyid": 1, "sig": ""}]), "exactly keyid and sig"),
        (_env(signatures=["sig"]), "exactly keyid and sig"),
        (b'{"payloadType": "a", "payloadType": "b", "payload": "", "signatures": []}',
         "duplicate JSON key 'payloadType'"),
        (b'{"payloadType": NaN}', "JSON constant NaN is not allowed"),
    ],
)
def test_from_json_refuses(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        dsse.Envelope.from_json(data)
    assert fragment in str(info.value)


def test_from_json_refuses_too_many_signatures() -> None:
    sigs = [{"keyid": f"{i:064x}", "sig": ""} for i in range(dsse.MAX_SIGNATURES + 1)]
    with pytest.raises(MalformedDocumentError, match=f"33 signatures, max {dsse.MAX_SIGNATURES}"):
        dsse.Envelope.from_json(_env(signatures=sigs))


def test_from_json_accepts_the_maximum_number_of_signatures() -> None:
    sigs = [{"keyid": f"{i:064x}", "sig": ""} for i in range(dsse.MAX_SIGNATURES)]
    assert len(dsse.Envelope.from_json(_env(signatures=sigs)).signatures) == dsse.MAX_SIGNATURES


def test_from_json_refuses_oversize_before_parsing() -> None:
    data = _env(payload=base64.b64encode(b"x" * 2000).decode())
    with pytest.raises(MalformedDocumentError, match=r"envelope is \d+ bytes, more than the 1000 allowed"):
        dsse.Envelope.from_json(data, max_bytes=1000)


def test_from_json_refuses_deep_nesting() -> None:
    with pytest.raises(MalformedDocumentError, match=r"nested too deeply"):
        dsse.Envelope.from_json(b"[" * 200_000)


def _trusted(keys_):
    return {key_id(k.public_key()): raw_public(k.public_key()) for k in keys_}


def test_verify_returns_payload_at_threshold(keys) -> None:
    env = dsse.sign(dsse.MANIFEST_TYPE, b"payload", keys.signers)
    out = dsse.verify(env, payload_type=dsse.MANIFEST_TYPE, trusted=_trusted(keys.signers),
                      threshold=2, role="online")
    assert out == b"payload"


def test_verify_counts_a_key_once_however_many_times_it_signed(keys) -> None:
    env = dsse.sign(dsse.MANIFEST_TYPE, b"payload", [keys.signers[0], keys.signers[0]])
    assert len(env.signatures) == 2
    with pytest.raises(SignatureError, match=r"1 valid signature"):
        dsse.verify(env, payload_type=dsse.MANIFEST_TYPE, trusted=_trusted(keys.signers),
                    threshold=2, role="online")


def test_verify_names_untrusted_signers(keys) -> None:
    env = dsse.sign(dsse.MANIFEST_TYPE, b"payload", [keys.stranger])
    with pytest.raises(SignatureError, match=r"0 valid signature.*1 signature\(s\) by keys this role"):
        dsse.verify(env, payload_type=dsse.MANIFEST_TYPE, trusted=_trusted(keys.signers),
                    threshold=1, role="online")


def test_verify_refuses_wrong_payload_type(keys) -> None:
    env = dsse.sign(dsse.ROOT_TYPE, b"payload", keys.signers)
    with pytest.raises(SignatureError, match=r"expected 'application/vnd.edgefleet.manifest"):
        dsse.verify(env, payload_type=dsse.MANIFEST_TYPE, trusted=_trusted(keys.signers),
                    threshold=1, role="online")


def test_verify_refuses_threshold_zero(keys) -> None:
    env = dsse.sign(dsse.MANIFEST_TYPE, b"payload", keys.signers)
    with pytest.raises(SignatureError, match=r"threshold 0; it must be at least 1"):
        dsse.verify(env, payload_type=dsse.MANIFEST_TYPE, trusted=_trusted(keys.signers),
                    threshold=0, role="online")


def test_signature_over_other_payload_type_does_not_verify(keys) -> None:
    # The type is inside PAE: relabelling a signed root as a manifest breaks every signature.
    env = dsse.sign(dsse.ROOT_TYPE, b"payload", keys.signers)
    relabelled = dsse.Envelope(dsse.MANIFEST_TYPE, env.payload, env.signatures)
    assert dsse.valid_keyids(relabelled, _trusted(keys.signers)) == set()


def test_invalid_then_valid_signature_by_same_key_counts(keys) -> None:
    good = dsse.sign(dsse.MANIFEST_TYPE, b"payload", keys.signers[:1])
    bad = dsse.Signature(good.signatures[0].keyid, b"\0" * 64)
    env = dsse.Envelope(dsse.MANIFEST_TYPE, b"payload", (bad, good.signatures[0]))
    assert dsse.valid_keyids(env, _trusted(keys.signers)) == {good.signatures[0].keyid}
