"""Batch scoring of files: every .npz of a directory through a model, one .npz out per file.

Used by ``edgefleet-agent score``. A file that cannot be read or that the model refuses
is reported and skipped; the others are scored. Each output is written atomically (a
temporary file in the output directory, fsync, rename), so an interrupted run leaves
whole outputs only and can simply be run again.
"""

from __future__ import annotations

import contextlib
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

from agent.errors import InferenceError, InputError, UnknownModelError
from agent.runtime.host import ModelHost

Progress = Callable[[int, int, Path, str | None], None]


class ScoreReport(msgspec.Struct):
    total: int = 0
    scored: int = 0
    failed: list[tuple[Path, str]] = msgspec.field(default_factory=list)
    seconds: float = 0.0


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` so that it holds the old content or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as its allow_pickle: bool
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array (.npy), not named arrays (.npz)")
        return {k: npz[k] for k in npz.files}


def input_files(input_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for p in input_dir.glob(pattern) if p.is_file())


def score_files(host: ModelHost, name: str, input_dir: Path, output_dir: Path, *,
                pattern: str = "*.npz", progress: Progress | None = None) -> ScoreReport:
    """Score every file matching ``pattern`` under ``input_dir`` into ``output_dir``.

    The output of ``input_dir/a/b.npz`` is ``output_dir/a/b.npz``. ValueError when the
    output directory is the input directory (the inputs would be overwritten).
    """
    if output_dir.resolve() == input_dir.resolve():
        raise ValueError(f"the output directory {output_dir} is the input directory; choose another")
    files = input_files(input_dir, pattern)
    report = ScoreReport(total=len(files))
    start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(files, 1):
        error: str | None = None
        try:
            inputs = _read(src)
            _, outputs = host.predict(name, inputs)
            dest = output_dir / src.relative_to(input_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_npz_atomic(dest, outputs)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            error = f"cannot read or write: {exc}"
        except (InputError, InferenceError, UnknownModelError) as exc:
            error = str(exc)
        if error is None:
            report.scored += 1
        else:
            report.failed.append((src, error))
        if progress is not None:
            progress(i, len(files), src, error)
    report.seconds = time.perf_counter() - start
    return report
