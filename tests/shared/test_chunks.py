"""Chunk lists in the manifest: validated, optional, and stable where fine-tuning leaves bytes alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared.bundle.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    TARGET_MAX_CHUNKS,
    choose_chunk_size,
    chunk_count,
    chunk_span,
    hash_chunks,
)
from shared.bundle.manifest import FileRef, Manifest, encode_manifest, parse_manifest
from shared.errors import MalformedDocumentError

SIZE = 3 * MIN_CHUNK_SIZE + 10


def _parse(doc: dict) -> Manifest:
    return parse_manifest(json.dumps(doc).encode())


def _with_model(make_doc, **fields) -> dict:
    doc = make_doc()
    doc["files"]["model"] = {**doc["files"]["model"], "size": SIZE, **fields}
    return doc


def test_manifest_without_chunks_parses_and_encodes_as_before(make_doc) -> None:
    doc = make_doc()
    m = _parse(doc)
    assert m.files["model"].chunks is None and m.files["model"].chunk_size is None
    assert b"chunk" not in encode_manifest(m), "old agents (unknown fields forbidden) still read it"


def test_manifest_with_chunks_round_trips(make_doc) -> None:
    chunks = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    m = _parse(_with_model(make_doc, chunk_size=MIN_CHUNK_SIZE, chunks=chunks))
    assert m.files["model"].chunks == chunks
    assert parse_manifest(encode_manifest(m)) == m


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"chunk_size": MIN_CHUNK_SIZE}, "chunk_size and chunks must be given together"),
        ({"chunks": ["0" * 64] * 4}, "chunk_size and chunks must be given together"),
        ({"chunk_size": MIN_CHUNK_SIZE // 2, "chunks": ["0" * 64] * 7}, "must be a power of two in"),
        ({"chunk_size": MAX_CHUNK_SIZE * 2, "chunks": ["0" * 64]}, "must be a power of two in"),
        ({"chunk_size": 3 * MIN_CHUNK_SIZE, "chunks": ["0" * 64] * 2}, "must be a power of two in"),
        ({"chunk_size": MIN_CHUNK_SIZE, "chunks": ["0" * 64] * 3}, "3 chunk hashes, a size of"),
        ({"chunk_size": MIN_CHUNK_SIZE, "chunks": ["0" * 64] * 5}, "needs 4"),
        ({"chunk_size": MIN_CHUNK_SIZE, "chunks": ["0" * 64] * 3 + ["A" * 64]}, "chunk 3 hash is not"),
        ({"chunk_size": MIN_CHUNK_SIZE, "chunks": ["0" * 63] * 4}, "chunk 0 hash is not"),
    ],
)
def test_bad_chunk_lists_are_refused_naming_the_file(make_doc, fields, fragment) -> None:
    with pytest.raises(MalformedDocumentError, match="file 'model'") as err:
        _parse(_with_model(make_doc, **fields))
    assert fragment in str(err.value)


def test_too_many_chunks_are_refused(make_doc) -> None:
    n = 2049
    doc = _with_model(make_doc, chunk_size=MIN_CHUNK_SIZE, chunks=["0" * 64] * n)
    doc["files"]["model"]["size"] = n * MIN_CHUNK_SIZE
    with pytest.raises(MalformedDocumentError, match="2049 chunks, at most 2048"):
        _parse(doc)


def test_spans_and_sizes() -> None:
    assert chunk_count(0, MIN_CHUNK_SIZE) == 0
    assert chunk_count(SIZE, MIN_CHUNK_SIZE) == 4
    assert chunk_span(3, SIZE, MIN_CHUNK_SIZE) == (3 * MIN_CHUNK_SIZE, 10)
    assert choose_chunk_size(200 << 20) == DEFAULT_CHUNK_SIZE
    big = choose_chunk_size(16 << 30)
    assert big == MAX_CHUNK_SIZE and chunk_count(16 << 30, big) <= TARGET_MAX_CHUNKS


def test_hash_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    path = tmp_path / "f"
    path.write_bytes(data)
    whole, chunks = hash_chunks(path, MIN_CHUNK_SIZE)
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks == [hashlib.sha256(data[i:i + MIN_CHUNK_SIZE]).hexdigest()
                      for i in range(0, len(data), MIN_CHUNK_SIZE)]
    ref = FileRef(sha256=whole, size=len(data), media_type="x", chunk_size=MIN_CHUNK_SIZE, chunks=chunks)
    assert ref.chunks is not None and len(ref.chunks) == chunk_count(len(data), MIN_CHUNK_SIZE)


def test_onnx_fine_tune_keeps_the_offsets_of_unchanged_initializers(tmp_path: Path) -> None:
    """ONNX serializes initializers in graph order; new values of the same shapes keep every
    offset, so the chunks before the first changed tensor are byte-identical."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((256, 256)).astype(np.float32) for _ in range(8)]
    tuned = weights[:6] + [w + np.float32(0.01) for w in weights[6:]]
    sizes = []
    chunk_lists = []
    for name, ws in (("a", weights), ("b", tuned)):
        graph = onnx.helper.make_graph(
            [], "g", [], [], [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(ws)])
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(onnx.helper.make_model(graph).SerializeToString())
        sizes.append(path.stat().st_size)
        chunk_lists.append(hash_chunks(path, MIN_CHUNK_SIZE)[1])
    assert sizes[0] == sizes[1]
    same = [a == b for a, b in zip(*chunk_lists, strict=True)]
    first_changed = same.index(False)
    assert all(same[:first_changed]) and not any(same[first_changed:])
    # 6 of 8 tensors unchanged: about 3/4 of the chunks are reused.
    assert first_changed / len(same) > 0.7
