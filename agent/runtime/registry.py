"""Choose the backend by the manifest's ``runtime`` ("onnxruntime" | "litert").

The registry is itself a Backend, so the installer loads any release through it.
Backends import their runtime on first load, so a device that only runs ONNX models
never imports LiteRT, and the other way round; the LiteRT backend's own module is
imported on first load too (it pulls ``importlib.metadata``: ~40 ms of every start).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.errors import LoadError
from agent.runtime.base import Backend, Session
from agent.runtime.onnx_backend import OnnxBackend
from shared.bundle.manifest import Manifest


class LazyBackend:
    """A backend built (its module imported) on its first load."""

    def __init__(self, name: str, factory: Callable[[], Backend]) -> None:
        self.name = name
        self._factory = factory
        self._backend: Backend | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                self._backend = self._factory()
            return self._backend

    def load(self, model_path: Path, manifest: Manifest) -> Session:
        return self.backend.load(model_path, manifest)


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
    def litert() -> Backend:
        from agent.runtime.litert_backend import LiteRtBackend

        return LiteRtBackend(num_threads=threads, interpreters=litert_interpreters)

    return BackendRegistry([OnnxBackend(intra_op_threads=threads), LazyBackend("litert", litert)])
