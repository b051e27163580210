"""The bundle manifest: what a signed release says about its model and files.

Files are content-addressed: the manifest names each file by role ("model",
"golden", "baseline") with its SHA-256 and exact size, so a verified manifest
pins every byte the device will load. A file may also list the SHA-256 of its
fixed-size chunks (``chunk_size``, ``chunks``) so that a device fetches only the chunks it
does not already hold; the whole-file hash stays the identity.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from shared import strictjson
from shared.bundle.chunks import validate_chunks
from shared.digest import sha256_hex
from shared.errors import MalformedDocumentError
from shared.release import validate_release
from shared.timeutil import parse_ts
from shared.versioning import parse_version

SCHEMA = "edgefleet.manifest/v1"
MAX_MANIFEST_BYTES = 256 * 1024
MAX_FILE_BYTES = 16 * (1 << 30)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
REQUIRED_FILES = ("model", "golden")
FILE_ROLES = frozenset({"model", "golden", "baseline"})

Runtime = Literal["onnxruntime", "litert"]


class TensorSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A model input or output. A dimension is a size, or a name for a dynamic axis."""

    name: str
    dtype: str
    shape: list[int | str]


class FileRef(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A file by SHA-256 and exact size; optionally its fixed-size chunks (shared/bundle/chunks.py).

    ``omit_defaults``: an entry without chunks encodes exactly as before chunks existed, so
    manifests that do not use them stay readable by older agents.
    """

    sha256: str
    size: int
    media_type: str
    chunk_size: int | None = None
    chunks: list[str] | None = None


class Tolerance(msgspec.Struct, forbid_unknown_fields=True):
    atol: float
    rtol: float


class Quantization(msgspec.Struct, forbid_unknown_fields=True):
    mode: str  # none | dynamic | static | tflite
    weight_dtype: str | None = None
    agreement: dict[str, float] = {}


class Manifest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``omit_defaults``: optional fields left at their defaults are not encoded, so a
    manifest that does not use a newer field stays readable by agents that predate it."""

    schema: str
    name: str
    release: int
    version: str
    created: str
    expires: str
    runtime: Runtime
    quantization: Quantization
    min_agent_version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, FileRef]
    golden_tolerance: Tolerance
    reissue_of: int | None = None
    description: str = ""
    # scalar inputs the model was specialised on at build (``--fix-input sr=16000``): the
    # device refuses any other value (agents that predate the field refuse the manifest)
    fixed_inputs: dict[str, int | float] | None = None

    def validate(self) -> Manifest:
        """Check what types alone cannot; raise MalformedDocumentError naming the field."""
        if self.schema != SCHEMA:
            raise MalformedDocumentError(f"manifest schema {self.schema!r}, expected {SCHEMA!r}")
        if not NAME_RE.match(self.name):
            raise MalformedDocumentError(
                f"model name {self.name!r} must match {NAME_RE.pattern}"
            )
        validate_release(self.release)
        if self.reissue_of is not None:
            validate_release(self.reissue_of, what="reissue_of")
        if not 0 < len(self.version) <= 64:
            raise MalformedDocumentError("version label must be 1 to 64 characters")
        parse_ts(self.created, field="created")
        parse_ts(self.expires, field="expires")
        parse_version(self.min_agent_version)
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            if not specs:
                raise MalformedDocumentError(f"manifest lists no {kind}s")
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise MalformedDocumentError(f"duplicate {kind} names: {names}")
            for spec in specs:
                if spec.dtype not in DTYPES:
                    raise MalformedDocumentError(
                        f"{kind} {spec.name!r} has dtype {spec.dtype!r}; one of {sorted(DTYPES)}"
                    )
                for dim in spec.shape:
                    if isinstance(dim, int) and dim < 0:
                        raise MalformedDocumentError(f"{kind} {spec.name!r} has dimension {dim}")
        scalars = {s.name for s in self.inputs if not s.shape}
        for name, value in (self.fixed_inputs or {}).items():
            if name not in scalars:
                raise MalformedDocumentError(
                    f"fixed input {name!r} is not a scalar input of the model ({sorted(scalars)})"
                )
            if isinstance(value, bool):  # a Manifest built in code (decoding refuses booleans)
                raise MalformedDocumentError(f"fixed input {name!r} has value {value!r}, not a number")
        for role in REQUIRED_FILES:
            if role not in self.files:
                raise MalformedDocumentError(f"manifest lists no {role!r} file")
        for role, ref in self.files.items():
            if role not in FILE_ROLES:
                raise MalformedDocumentError(f"unknown file role {role!r}")
            if not SHA256_RE.match(ref.sha256):
                raise MalformedDocumentError(f"file {role!r} sha256 is not 64 lowercase hex")
            if not 0 <= ref.size <= MAX_FILE_BYTES:
                raise MalformedDocumentError(f"file {role!r} size {ref.size} out of range")
            validate_chunks(role, ref.size, ref.chunk_size, ref.chunks)
        if self.golden_tolerance.atol < 0 or self.golden_tolerance.rtol < 0:
            raise MalformedDocumentError("golden tolerances must be non-negative")
        return self


def parse_manifest(payload: bytes) -> Manifest:
    manifest = strictjson.decode(
        payload, Manifest, max_bytes=MAX_MANIFEST_BYTES, what="manifest"
    )
    return manifest.validate()


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest.validate())


def payload_digest(payload: bytes) -> str:
    """The identity of a release: SHA-256 of the exact signed manifest bytes."""
    return sha256_hex(payload)  # small: without OpenSSL (shared.digest)
