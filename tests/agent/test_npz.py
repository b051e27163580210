"""agent.runtime.npz: a golden .npz read without zipfile, as np.load reads it."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.runtime.npz import _read, load_npz

ARRAYS = {"in.x": np.arange(12, dtype=np.float32).reshape(3, 4), "out.y": np.array([1, 2], dtype=np.int64),
          "s": np.array(3.5), "in.u": np.array(["ab", "c"])}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_savez_archive_is_read_without_zipfile_as_np_load_reads_it(tmp_path: Path,
                                                                     save: Callable[..., None]) -> None:
    path = tmp_path / "g.npz"
    save(path, **ARRAYS)
    with open(path, "rb") as fh:
        fast = _read(fh)
    assert fast is not None  # the reader's own path, not np.load's
    with np.load(path) as ref:
        assert list(fast) == list(ref.files)
        for k in ref.files:
            assert fast[k].dtype == ref[k].dtype and np.array_equal(fast[k], ref[k])
            assert fast[k].flags.writeable


def test_what_it_does_not_know_goes_to_np_load(tmp_path: Path) -> None:
    damaged = tmp_path / "d.npz"
    np.savez(damaged, **ARRAYS)
    raw = bytearray(damaged.read_bytes())
    raw[raw.index(b"\x00\x00\x80?") + 2] ^= 1  # a bit of in.x's data: the CRC no longer fits
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"Bad CRC-32 for file 'in\.x\.npy'"):
        load_npz(damaged)  # zipfile's BadZipFile, as a ValueError of the same message
    with zipfile.ZipFile(tmp_path / "c.npz", "w") as z:  # a comment; a member that is not an .npy
        z.writestr("in.x.npy", b"not an array")
        z.comment = b"made by hand"
    assert load_npz(tmp_path / "c.npz") == {"in.x": b"not an array"}
    np.save(tmp_path / "a.npy", ARRAYS["in.x"])
    with pytest.raises(ValueError, match=r"a single array, not an \.npz"):
        load_npz(tmp_path / "a.npy")
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04 and then nothing of a zip")
    with pytest.raises(ValueError, match="not a zip file"):
        load_npz(tmp_path / "g.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz")


def test_an_archive_np_load_cannot_read_is_a_value_error(tmp_path: Path) -> None:
    # np.load's NotImplementedError (an unknown compression) and EOFError get past callers
    # that catch OSError and ValueError (the warm-up, the smoke test): both come as ValueError
    path = tmp_path / "m.npz"
    np.savez(path, **ARRAYS)
    raw = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # each header's method field
        pos = raw.find(sig)
        while pos != -1:
            raw[pos + at:pos + at + 2] = (97).to_bytes(2, "little")  # WavPack: zipfile cannot
            pos = raw.find(sig, pos + 4)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="compression method is not supported"):
        load_npz(path)
