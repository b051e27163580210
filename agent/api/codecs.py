"""How predict inputs and outputs travel as HTTP bodies: the four framings of the local API.

    application/x-edgefleet-tensors  raw little-endian C-order bytes of each tensor, one after
                                     the other; names, dtypes and shapes in the header
                                     ``X-Edgefleet-Tensors: x=float32[1,3,224,224]; k=int64[1]``
                                     (the fastest: no parse, viewed in place; the client's default)
    application/x-npy                one .npy: the single input of a single-input model
    application/x-npz                an .npz (zip) with one array per input
    application/json                 {"inputs": {name: nested lists}} (agent.api.json_inputs)

Decoders take the body and return arrays (views into the body where the framing allows) or
raise ApiError 400 with a code naming the framing (``bad_tensors``, ``bad_npy``, ``bad_npz``,
``bad_json``); encoders build a reply body and its headers. Nothing here touches a socket.
"""

from __future__ import annotations

import functools
import io
import re
from typing import Any

import numpy as np

from agent.api.errors import ApiError
from agent.api.json_inputs import JsonInputError, decode_inputs

TENSORS = "application/x-edgefleet-tensors"
NPZ = "application/x-npz"
NPY = "application/x-npy"
JSON = "application/json"
FORMATS = (TENSORS, JSON, NPZ, NPY)
TENSORS_HEADER = "X-Edgefleet-Tensors"

# What decoding a body costs beyond its bytes, as a multiple of its size (docs/agent-api.md):
# tensors and .npy are viewed in place, .npz is copied once and expanded (checked after),
# JSON text is copied twice and parsed into an array (agent.api.json_inputs).
BODY_COST = {TENSORS: 1, NPY: 1, NPZ: 2, JSON: 5}

# -- raw tensors ---------------------------------------------------------------------------

# The dtypes a tensor may have, by the name the header gives (NumPy's, little-endian).
TENSOR_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                 "float16", "float32", "float64")
}
_DTYPE_NAMES = {dtype: name for name, dtype in TENSOR_DTYPES.items()}


# The patterns are compiled when first used, not with the agent (~0.5 ms of every start).
@functools.cache
def _tensor_spec() -> re.Pattern[str]:
    return re.compile(r"\s*((?:[^\s=;%]|%[0-9A-Fa-f]{2})+)=([a-z0-9]+)\[([0-9, ]*)\]\s*")


@functools.cache
def _name_safe() -> re.Pattern[str]:
    # Printable ASCII but "%", ";" and "=": what was spelt [^\s=;%\x00-\x1f\x7f-\U0010ffff], the
    # same set of characters (tests/agent/test_api_framings.py checks every code point), whose
    # compilation took ~2.3 ms of every agent start.
    return re.compile(r"[!-$&-:<>-~]+")


MAX_TENSORS = 64
MAX_NDIM = 32

TensorLayout = tuple[tuple[str, np.dtype[Any], tuple[int, ...], int], ...]  # name, dtype, shape, bytes
# Parsed tensor headers by their text: an application sends the same one with every request.
_LAYOUTS: dict[str, TensorLayout] = {}


def _unquote(name: str) -> str:
    if "%" not in name:
        return name
    raw = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), name)
    return raw.encode("latin-1").decode("utf-8", errors="strict")


def quote_name(name: str) -> str:
    """A tensor name as the header writes it: %XX (UTF-8) for whitespace, ``=;%``, controls
    and anything beyond ASCII; a plain name (``x``, ``input.1``, ``images:0``) as is."""
    safe = _name_safe()
    if safe.fullmatch(name):
        return name
    return "".join(c if safe.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode())
                   for c in name)


def tensor_layout(header: str | None) -> TensorLayout:
    """The tensors an ``X-Edgefleet-Tensors`` header declares; ApiError 400 ``bad_tensors``."""
    if header is None:
        raise ApiError(400, "bad_tensors", f"{TENSORS} needs a {TENSORS_HEADER} header naming each "
                       "tensor: 'x=float32[1,3,224,224]; k=int64[1]'")
    layout = _LAYOUTS.get(header)
    if layout is not None:
        return layout
    specs = []
    names = set()
    parts = header.split(";")
    if len(parts) > MAX_TENSORS:
        raise ApiError(400, "bad_tensors", f"{TENSORS_HEADER} declares {len(parts)} tensors, "
                       f"at most {MAX_TENSORS}")
    spec = _tensor_spec()
    for part in parts:
        m = spec.fullmatch(part)
        if m is None:
            raise ApiError(400, "bad_tensors", f"{TENSORS_HEADER} part {part.strip()[:80]!r} is not "
                           "'name=dtype[d0,d1,...]' (e.g. x=float32[1,3,224,224]; a scalar is x=int64[])")
        try:
            name = _unquote(m[1])
        except UnicodeDecodeError:
            raise ApiError(400, "bad_tensors", f"tensor name {m[1][:80]!r} is not %-encoded UTF-8") from None
        dtype = TENSOR_DTYPES.get(m[2])
        if dtype is None:
            raise ApiError(400, "bad_tensors", f"tensor {name!r} has dtype {m[2]!r}; one of "
                           f"{', '.join(TENSOR_DTYPES)}")
        dims = m[3].replace(" ", "")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError:
            raise ApiError(400, "bad_tensors", f"tensor {name!r} has shape [{m[3]}]: sizes separated "
                           "by commas") from None
        if len(shape) > MAX_NDIM:
            raise ApiError(400, "bad_tensors", f"tensor {name!r} has {len(shape)} dimensions, "
                           f"at most {MAX_NDIM}")
        if name in names:
            raise ApiError(400, "bad_tensors", f"tensor {name!r} is declared twice")
        names.add(name)
        count = 1
        for d in shape:
            count *= d
        specs.append((name, dtype, shape, count * dtype.itemsize))
    layout = tuple(specs)
    if len(_LAYOUTS) >= 64:
        _LAYOUTS.clear()
    _LAYOUTS[header] = layout
    return layout


def tensors_inputs(body: bytes | bytearray, header: str | None) -> dict[str, np.ndarray]:
    """The tensors of a raw-tensors body, viewed in place (copied only when misaligned)."""
    layout = tensor_layout(header)
    need = sum(spec[3] for spec in layout)
    if need != len(body):
        raise ApiError(400, "bad_tensors", f"{TENSORS_HEADER} declares {need} bytes of tensors, the "
                       f"body holds {len(body)}")
    out = {}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        arr = np.frombuffer(body, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        if not arr.flags.aligned:
            arr = arr.copy()
        if dtype.kind == "b" and nbytes and (np.frombuffer(body, np.uint8, nbytes, offset) > 1).any():
            raise ApiError(400, "bad_tensors", f"tensor {name!r} of dtype bool holds bytes other "
                           "than 0 and 1")
        out[name] = arr
        offset += nbytes
    return out


def tensor_header(arrays: dict[str, np.ndarray]) -> str:
    """The ``X-Edgefleet-Tensors`` value describing ``arrays`` (each C-contiguous, little-endian)."""
    return "; ".join(f"{quote_name(k)}={_dtype_name(v.dtype)}[{','.join(map(str, v.shape))}]"
                     for k, v in arrays.items())


def _dtype_name(dtype: np.dtype[Any]) -> str:
    name = _DTYPE_NAMES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} cannot travel as a raw tensor (one of {', '.join(TENSOR_DTYPES)})")
    return name


def wire_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` as they travel: C-contiguous and little-endian (copied only when not)."""
    out = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        out[k] = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return out


def tensors_reply(outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The body and header of a raw-tensors reply."""
    arrays = wire_arrays(outputs)
    header = tensor_header(arrays)
    if len(arrays) == 1:
        return next(iter(arrays.values())).tobytes(), {TENSORS_HEADER: header}
    return b"".join(a.tobytes() for a in arrays.values()), {TENSORS_HEADER: header}


# -- .npy ------------------------------------------------------------------------------------


class _SlowPath(Exception):
    """A .npy header this module does not parse itself (format 3.0): numpy's reader decodes it."""


# Parsed .npy headers, keyed by their bytes: an application sends the same header with every
# request, and parsing it (ast.literal_eval) costs more than the rest of the decode.
_NPY_HEADERS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], bool]] = {}


def _npy_header(body: bytes | bytearray) -> tuple[np.dtype[Any], tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a .npy body; ValueError when malformed."""
    if body[:6] != b"\x93NUMPY" or len(body) < 10:
        raise ValueError("the magic string \\x93NUMPY is missing")
    major = body[6]
    if major == 1:
        start = 10
        end = start + int.from_bytes(body[8:10], "little")
    elif major in (2, 3):
        start = 12
        end = start + int.from_bytes(body[8:12], "little")
    else:
        raise ValueError(f"unknown .npy format version {major}.{body[7]}")
    key = bytes(body[:end])
    parsed = _NPY_HEADERS.get(key)
    if parsed is None:
        buf = io.BytesIO(key)
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:  # 3.0 (utf-8 field names): numpy's reader, not cached
            raise _SlowPath
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are not allowed")
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_NPY_HEADERS) >= 64:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = parsed
    return (*parsed, end)


def _npy_read(body: bytes | bytearray) -> np.ndarray:
    buf = io.BytesIO(body)
    arr = np.lib.format.read_array(buf, allow_pickle=False)
    if buf.tell() != len(body):
        raise ApiError(400, "bad_npy", f"the body has {len(body) - buf.tell()} bytes after the array")
    return arr


def npy_array(body: bytes | bytearray) -> np.ndarray:
    """The array of a .npy body, without copying its data (a view of ``body``)."""
    try:
        try:
            dtype, shape, fortran, offset = _npy_header(body)
        except _SlowPath:
            return _npy_read(body)
        count = 1
        for dim in shape:
            count *= dim
        need = count * dtype.itemsize
        have = len(body) - offset
        if have < need:
            raise ValueError(f"the array needs {need} bytes of data, the body holds {have}")
        if have > need:
            raise ApiError(400, "bad_npy", f"the body has {have - need} bytes after the array")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
    except ApiError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ApiError(400, "bad_npy", f"the body is not a valid .npy without pickles: {exc}") from None


def npy_inputs(model_name: str, input_names: list[str], body: bytes | bytearray) -> dict[str, np.ndarray]:
    if len(input_names) != 1:
        raise ApiError(400, "input", f"{NPY} carries one array but model {model_name} takes inputs "
                       f"{input_names}; send {TENSORS} or {NPZ} with one array per input")
    return {input_names[0]: npy_array(body)}


_NPY_OUT_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def npy_header(arr: np.ndarray) -> bytes | None:
    """The .npy header of a C-contiguous ``arr`` (built once per dtype and shape: numpy's
    writer spends more time on it than on the data of a typical output); None when the
    shape needs a header version numpy picks itself."""
    key = (arr.dtype.str, arr.shape)
    header = _NPY_OUT_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        if arr.dtype.hasobject:
            np.lib.format.write_array(buf, arr, allow_pickle=False)  # raises ValueError
        try:
            np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
        except ValueError:  # a shape too long for a 1.0 header
            return None
        header = buf.getvalue()
        if len(_NPY_OUT_HEADERS) >= 64:
            _NPY_OUT_HEADERS.clear()
        _NPY_OUT_HEADERS[key] = header
    return header


def npy_bytes(arr: np.ndarray) -> bytes:
    """A .npy of ``arr``."""
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    header = npy_header(arr)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, allow_pickle=False)
        return buf.getvalue()
    return header + arr.tobytes()


# -- .npz ------------------------------------------------------------------------------------


def npz_inputs(body: bytes | bytearray, max_bytes: int) -> dict[str, np.ndarray]:
    import zipfile  # only .npz bodies need it (~1.7 MB): not loaded with the agent

    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:  # BytesIO copies a bytearray
            total = sum(info.file_size for info in npz.zip.infolist())
            if total > max_bytes:
                raise ApiError(413, "too_large", f"the npz expands to {total} bytes, max {max_bytes}")
            return {k: npz[k] for k in npz.files}
    except ApiError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ApiError(400, "bad_npz", f"the body is not a valid .npz without pickles: {exc}") from None


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as allow_pickle
    return buf.getvalue()


# -- JSON ------------------------------------------------------------------------------------


def json_inputs(model_name: str, dtypes: dict[str, str], body: bytes | bytearray) -> dict[str, np.ndarray]:
    try:
        return decode_inputs(body, dtypes, model_name)
    except JsonInputError as exc:
        raise ApiError(400, exc.code, exc.detail) from None


# -- choosing the reply's framing --------------------------------------------------------------


def reply_format(accept: str, request_format: str, n_outputs: int) -> str:
    """The reply's media type: the first fitting one ``Accept`` lists, else the request's.

    q-values are not weighed; x-npy fits only a model with one output.
    """
    default = NPZ if request_format == NPY and n_outputs != 1 else request_format
    if not accept:
        return default
    wanted = [part.split(";", 1)[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not wanted:
        return default
    for media in wanted:
        if media in FORMATS and not (media == NPY and n_outputs != 1):
            return media
        if media in ("*/*", "application/*"):
            return default
    if NPY in wanted:
        raise ApiError(406, "not_acceptable", f"{NPY} holds one array and the model has {n_outputs} "
                       f"outputs; accept {TENSORS}, {NPZ} or {JSON}")
    raise ApiError(406, "not_acceptable", f"the reply can be {TENSORS}, {JSON}, {NPZ} or {NPY}, "
                   f"not {accept!r}")
