"""The manifest's optional ``fixed_inputs`` (``bundle build --fix-input``): scalar inputs only,
numbers only, and absent from the encoding when unused, so agents that predate the field
keep reading every manifest that does not use it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from shared.bundle.manifest import Manifest, encode_manifest, parse_manifest
from shared.errors import MalformedDocumentError

SCALAR_INPUTS = [{"name": "x", "dtype": "float32", "shape": ["batch", 4]},
                 {"name": "sr", "dtype": "int64", "shape": []}]


def _parse(doc: dict[str, Any]) -> Manifest:
    return parse_manifest(json.dumps(doc).encode())


def test_fixed_scalar_input_round_trips(make_doc: Callable[..., dict[str, Any]]) -> None:
    m = _parse(make_doc(inputs=SCALAR_INPUTS, fixed_inputs={"sr": 16000}))
    assert m.fixed_inputs == {"sr": 16000}
    assert parse_manifest(encode_manifest(m)).fixed_inputs == {"sr": 16000}


@pytest.mark.parametrize(("fixed", "match"), [
    ({"x": 1}, r"fixed input 'x' is not a scalar input of the model \(\['sr'\]\)"),
    ({"rate": 1}, r"fixed input 'rate' is not a scalar input"),
    ({"sr": True}, r"Expected `int \| float`, got `bool` - at `\$\.fixed_inputs"),
    ({"sr": "16000"}, r"Expected `int \| float`, got `str`"),
])
def test_fixed_inputs_that_do_not_fit_are_refused(
    make_doc: Callable[..., dict[str, Any]], fixed: dict[str, Any], match: str
) -> None:
    with pytest.raises(MalformedDocumentError, match=match):
        _parse(make_doc(inputs=SCALAR_INPUTS, fixed_inputs=fixed))


def test_unused_optional_fields_are_not_encoded(make_doc: Callable[..., dict[str, Any]]) -> None:
    encoded = json.loads(encode_manifest(_parse(make_doc())))
    assert "fixed_inputs" not in encoded and "reissue_of" not in encoded and "description" not in encoded
    # an agent from before fixed_inputs refuses unknown fields: none is there
    older_fields = {f.name for f in msgspec.structs.fields(Manifest)} - {"fixed_inputs"}
    assert set(encoded) <= older_fields
