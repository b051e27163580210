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


def warm_up(session: Session, manifest: Manifest) -> None:
    """One run on zeros (every dynamic axis 1) so the first request does not pay for setup."""
    feeds = {s.name: np.zeros(concrete_shape(s), dtype=s.dtype) for s in manifest.inputs}
    try:
        session.run(feeds)
    except Exception as exc:
        raise LoadError(f"{manifest.name} r{manifest.release}: warm-up run failed: {exc}") from None
