"""The interface every inference backend implements (onnxruntime, LiteRT)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from agent.errors import LoadError
from shared.bundle.manifest import Manifest, TensorSpec


class Session(Protocol):
    """A loaded model. ``run`` must be safe to call from several threads at once."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def load(self, model_path: Path, manifest: Manifest) -> Session:
        """Load and warm up the model; raise agent.errors.LoadError when it cannot."""
        ...


def concrete_shape(spec: TensorSpec, dynamic: int = 1) -> list[int]:
    """The signature's shape with every dynamic axis set to ``dynamic``."""
    return [dim if isinstance(dim, int) else dynamic for dim in spec.shape]


def require_runtime(backend: str, manifest: Manifest) -> None:
    """Refuse (LoadError) a manifest written for another runtime than ``backend``."""
    if manifest.runtime != backend:
        raise LoadError(
            f"{manifest.name} r{manifest.release} needs runtime {manifest.runtime!r}; "
            f"this backend runs {backend!r}"
        )


def check_signature(manifest: Manifest, inputs: list[str], outputs: list[str], runtime: str) -> None:
    """Refuse a model whose input/output names differ from the manifest's."""
    have_in, have_out = sorted(inputs), sorted(outputs)
    want_in = sorted(s.name for s in manifest.inputs)
    want_out = sorted(s.name for s in manifest.outputs)
    if have_in != want_in or not set(want_out) <= set(have_out):
        raise LoadError(
            f"{manifest.name} r{manifest.release}: the {runtime} model's inputs {have_in} / outputs "
            f"{have_out} differ from the manifest's {want_in} / {want_out}"
        )


def golden_feeds(model_path: Path, manifest: Manifest) -> dict[str, np.ndarray] | None:
    """The bundle's own golden inputs, read from the golden blob stored beside the model blob
    (blobs are content-addressed in one directory); None when it is not there."""
    ref = manifest.files.get("golden")
    if ref is None:
        return None
    path = Path(model_path).parent / ref.sha256
    if not path.is_file():
        return None
    from agent.runtime.npz import load_npz

    try:
        data = load_npz(path)  # as np.load reads it, without zipfile for a plain np.savez
        return {s.name: data[f"in.{s.name}"] for s in manifest.inputs}
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(
            f"{manifest.name} r{manifest.release}: its golden inputs cannot be read for the "
            f"warm-up: {exc}"
        ) from None


def warm_up(session: Session, manifest: Manifest, model_path: Path) -> dict[str, np.ndarray] | None:
    """One run on the bundle's own golden inputs so the first request does not pay for setup.

    Nothing is made up from the signature: a model with dynamic axes or scalar inputs may
    not run on invented shapes. Without its golden file beside it (a model loaded outside
    the blob store) there is no warm-up; the smoke test runs the golden vectors anyway.
    Returns the golden inputs (the batching probe takes its rows from them), or None.
    """
    feeds = golden_feeds(model_path, manifest)
    if feeds is None:
        return None
    try:
        session.run(feeds)
    except Exception as exc:
        raise LoadError(
            f"{manifest.name} r{manifest.release}: warm-up run on its golden inputs failed: {exc}"
        ) from None
    return feeds
