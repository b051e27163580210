"""A bundle's golden .npz read without ``zipfile``: the arrays of a plain ``np.savez`` (or
``np.savez_compressed``) archive, read from its central directory, CRC-checked, each member
parsed by numpy's own .npy reader.

Every start reads the golden inputs for the warm-up; ``np.load`` of an .npz imports
``zipfile`` (with shutil, bz2, lzma, the cp437 codec: ~1.5-4 ms of a cold start,
docs/performance.md). Anything this reader does not expect (a comment, zip64, encryption,
another compression, a member that is not an .npy, a damaged file) goes to ``np.load``
unchanged, which then reads it or names what is wrong, as before.
"""

from __future__ import annotations

import binascii
import io
import struct
from pathlib import Path

import numpy as np

_EOCD = struct.Struct("<4sHHHHLLH")  # end of central directory, without a comment
_CENTRAL = struct.Struct("<4sHHHHHHLLLHHHHHLL")  # a central directory entry
_LOCAL = struct.Struct("<4sHHHHHLLLHH")  # a member's local header
_STORED, _DEFLATED = 0, 8
_FLAGS_KNOWN = 0x0008 | 0x0800  # sizes in a data descriptor after the data; UTF-8 name


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the .npz at ``path`` by name, as ``{k: f[k] for k in np.load(path).files}``
    gives them, with the errors ``np.load`` raises as OSError or ValueError (its
    zipfile.BadZipFile, EOFError of a truncated member and NotImplementedError of an unknown
    compression as a ValueError of the same message, so that a caller catching those two, as
    the warm-up and the smoke test do, sees every damaged file)."""
    with open(path, "rb") as fh:
        arrays = _read(fh)
    if arrays is not None:
        return arrays
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array, not an .npz archive")
        with data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, NotImplementedError) as exc:  # a damaged or odd archive
        raise ValueError(str(exc) or f"{path} is not a readable .npz archive") from None


def _read(fh: io.BufferedReader) -> dict[str, np.ndarray] | None:
    """None: not the plain archive this reader knows (``np.load`` reads it instead)."""
    try:
        if fh.read(4) != b"PK\x03\x04":
            return None
        size = fh.seek(0, io.SEEK_END)
        if size < 4 + _EOCD.size:
            return None
        fh.seek(size - _EOCD.size)
        sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack(fh.read(_EOCD.size))
        if (sig != b"PK\x05\x06" or disk or cd_disk or n_disk != n_total or comment
                or cd_offset + cd_size != size - _EOCD.size):
            return None
        fh.seek(cd_offset)
        directory = fh.read(cd_size)
        members = []
        pos = 0
        for _ in range(n_total):
            (sig, _made, _need, flags, method, _time, _date, crc, csize, usize, name_len, extra_len,
             comment_len, _disk, _iattr, _eattr, offset) = _CENTRAL.unpack_from(directory, pos)
            pos += _CENTRAL.size
            raw_name = directory[pos:pos + name_len]
            pos += name_len + extra_len + comment_len
            if (sig != b"PK\x01\x02" or flags & ~_FLAGS_KNOWN or method not in (_STORED, _DEFLATED)
                    or 0xFFFFFFFF in (csize, usize, offset)):
                return None
            name = raw_name.decode("utf-8" if flags & 0x0800 else "ascii")
            if not name.endswith(".npy"):
                return None  # np.load gives such a member as bytes
            members.append((name, method, crc, csize, usize, offset, raw_name))
        if pos != cd_size:
            return None
        arrays = {}
        for name, method, crc, csize, usize, offset, raw_name in members:
            fh.seek(offset)
            sig, _need, local_flags, _method, _t, _d, _crc, _cs, _us, name_len, extra_len = _LOCAL.unpack(
                fh.read(_LOCAL.size))
            if sig != b"PK\x03\x04" or local_flags & ~_FLAGS_KNOWN or fh.read(name_len) != raw_name:
                return None
            fh.seek(extra_len, io.SEEK_CUR)
            data = fh.read(csize)
            if len(data) != csize:
                return None
            if method == _DEFLATED:
                import zlib  # np.savez_compressed's members only

                try:
                    data = zlib.decompress(data, -15, usize)
                except zlib.error:
                    return None
            if len(data) != usize or binascii.crc32(data) != crc:  # zlib's CRC-32, as zipfile checks
                return None
            arrays[name[:-4]] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        return arrays
    except (ValueError, OSError, EOFError, struct.error, UnicodeDecodeError):
        return None
