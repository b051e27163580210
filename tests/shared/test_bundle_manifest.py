"""Manifest schema: every malformed field is refused with a message naming it."""

from __future__ import annotations

import json

import msgspec
import pytest

from shared.bundle.manifest import Manifest, encode_manifest, parse_manifest, payload_digest
from shared.errors import MalformedDocumentError


def _parse(doc: dict) -> Manifest:
    return parse_manifest(json.dumps(doc).encode())


def test_valid_manifest_round_trips(make_doc) -> None:
    m = _parse(make_doc())
    again = parse_manifest(encode_manifest(m))
    assert again == m
    assert m.inputs[0].shape == ["batch", 4]


def test_payload_digest_is_sha256_of_exact_bytes() -> None:
    assert payload_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _files(make_doc, **changes):
    doc = make_doc()
    files = doc["files"]
    for role, change in changes.items():
        if change is None:
            del files[role]
        else:
            files[role] = {**files.get(role, files["model"]), **change}
    return doc


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"schema": "edgefleet.manifest/v2"}, "manifest schema 'edgefleet.manifest/v2'"),
        ({"name": "Detector"}, "model name 'Detector' must match"),
        ({"name": "../etc"}, "model name '../etc' must match"),
        ({"name": "detector\n"}, "model name 'detector\\n' must match"),
        ({"name": ""}, "model name '' must match"),
        ({"name": "a" * 65}, "must match"),
        ({"release": 0}, "release 0 is out of range; release numbers are 1 .. 9007199254740991"),
        ({"release": -3}, "release -3 is out of range; release numbers are 1 .. 9007199254740991"),
        ({"release": 2**53}, f"release {2**53} is out of range; release numbers are 1 .. {2**53 - 1}"),
        ({"release": "1"}, "Expected `int`, got `str` - at `$.release`"),
        ({"release": 1.0}, "Expected `int`, got `float` - at `$.release`"),
        ({"release": True}, "Expected `int`, got `bool` - at `$.release`"),
        ({"version": ""}, "version label must be 1 to 64 characters"),
        ({"version": "v" * 65}, "version label must be 1 to 64 characters"),
        ({"created": "2024-01-01"}, "created '2024-01-01' has no timezone"),
        ({"expires": "soon"}, "expires 'soon' is not an RFC 3339 timestamp"),
        ({"runtime": "tensorrt"}, "Invalid enum value 'tensorrt' - at `$.runtime`"),
        ({"min_agent_version": "1.0"}, "version '1.0' is not MAJOR.MINOR.PATCH"),
        ({"min_agent_version": "1.0.0\n"}, "is not MAJOR.MINOR.PATCH"),
        ({"inputs": []}, "manifest lists no inputs"),
        ({"outputs": []}, "manifest lists no outputs"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}] * 2}, "duplicate input names"),
        ({"inputs": [{"name": "x", "dtype": "complex64", "shape": [1]}]}, "input 'x' has dtype 'complex64'"),
        ({"outputs": [{"name": "y", "dtype": "float32", "shape": [1, -1]}]}, "output 'y' has dimension -1"),
        ({"outputs": [{"name": "y", "dtype": "float32", "shape": [1.5]}]}, "at `$.outputs[0].shape[0]`"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [], "layout": "nchw"}]},
         "unknown field `layout`"),
        ({"golden_tolerance": {"atol": -1.0, "rtol": 0.0}}, "golden tolerances must be non-negative"),
        ({"golden_tolerance": {"atol": "0.1", "rtol": 0.0}}, "Expected `float`, got `str`"),
        ({"surprise": 1}, "Object contains unknown field `surprise`"),
        ({"quantization": {"mode": "none", "bits": 8}}, "unknown field `bits`"),
    ],
)
def test_malformed_manifest(make_doc, overrides: dict, fragment: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        _parse(make_doc(**overrides))
    assert fragment in str(info.value)


def test_missing_required_field(make_doc) -> None:
    doc = make_doc()
    del doc["release"]
    with pytest.raises(MalformedDocumentError, match=r"missing required field `release`"):
        _parse(doc)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"model": None}, "manifest lists no 'model' file"),
        ({"golden": None}, "manifest lists no 'golden' file"),
        ({"weights": {}}, "unknown file role 'weights'"),
        ({"model": {"sha256": "ab" * 31}}, "file 'model' sha256 is not 64 lowercase hex"),
        ({"model": {"sha256": "AB" * 32}}, "file 'model' sha256 is not 64 lowercase hex"),
        ({"model": {"sha256": "ab" * 32 + "\n"}}, "file 'model' sha256 is not 64 lowercase hex"),
        ({"golden": {"size": -1}}, "file 'golden' size -1 out of range"),
        ({"golden": {"size": 17 * (1 << 30)}}, "out of range"),
        ({"golden": {"size": "10"}}, "Expected `int`, got `str`"),
        ({"model": {"extra": 1}}, "unknown field `extra`"),
    ],
)
def test_malformed_files(make_doc, changes: dict, fragment: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        _parse(_files(make_doc, **changes))
    assert fragment in str(info.value)


def test_baseline_file_is_optional_and_allowed(make_doc) -> None:
    doc = _files(make_doc, baseline={"sha256": "cd" * 32, "size": 10, "media_type": "application/json"})
    assert set(_parse(doc).files) == {"model", "golden", "baseline"}


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b'{"name": "a", "name": "b"}', "duplicate JSON key 'name'"),
        (b'{"golden_tolerance": {"atol": NaN}}', "JSON constant NaN is not allowed"),
        (b'{"golden_tolerance": {"atol": Infinity}}', "JSON constant Infinity is not allowed"),
        (b'{"golden_tolerance": {"atol": 1e999}}', "JSON number 1e999 is out of range"),
        (b"[1, 2", "manifest is not valid JSON"),
        (b"[]", "Expected `object`, got `array`"),
        (b"\xff\xfe", "manifest is not valid JSON"),
    ],
)
def test_manifest_json_refusals(payload: bytes, fragment: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        parse_manifest(payload)
    assert fragment in str(info.value)


def test_oversize_manifest() -> None:
    with pytest.raises(MalformedDocumentError, match=r"manifest is \d+ bytes, more than the 262144 allowed"):
        parse_manifest(b" " * (256 * 1024 + 1))


def test_encode_validates(make_manifest) -> None:
    m = msgspec.structs.replace(make_manifest(), release=0)
    with pytest.raises(MalformedDocumentError, match=r"release 0 is out of range; release numbers are 1 .. "):
        encode_manifest(m)
