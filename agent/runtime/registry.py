"""Choose the backend by the manifest's ``runtime`` ("onnxruntime" | "litert").

The registry is itself a Backend, so the installer loads any release through it.
Backends import their runtime on first load, so a device that only runs ONNX models
never imports LiteRT, and the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agent.errors import LoadError
from agent.runtime.base import Backend, Session
from agent.runtime.litert_backend import LiteRtBackend
from agent.runtime.onnx_backend import OnnxBackend
from shared.bundle.manifest import Manifest


class BackendRegistry:
    name = "registry"

    def __init__(self, backends: Iterable[Backend]) -> None:
        self.backends = {b.name: b for b in backends}

    @property
    def runtimes(self) -> list[str]:
        return sorted(self.backends)

    def load(self, model_path: Path, manifest: Manifest) -> Session:
        backend = self.backends.get(manifest.runtime)
        if backend is None:
            raise LoadError(
                f"{manifest.name} r{manifest.release} needs runtime {manifest.runtime!r}, which this "
                f"agent does not run (it runs {', '.join(self.runtimes)})"
            )
        return backend.load(model_path, manifest)


def default_backends(*, threads: int = 1, litert_interpreters: int = 1) -> BackendRegistry:
    """onnxruntime and LiteRT, ``threads`` each (intra-op threads / num_threads)."""
    return BackendRegistry([
        OnnxBackend(intra_op_threads=threads),
        LiteRtBackend(num_threads=threads, interpreters=litert_interpreters),
    ])
