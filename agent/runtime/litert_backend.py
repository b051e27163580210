"""The LiteRT (TFLite) backend.

The interpreter comes from ``ai_edge_litert`` (LiteRT, the maintained successor of
tflite-runtime) or, where only that is installed, from ``tflite_runtime``. Both are
imported on first load, never at agent import. tflite-runtime wheels up to 2.14 (the
last ones published) are built against NumPy 1 and crash under NumPy 2, so that
combination is refused with a clear error instead of a segfault.

An Interpreter is not thread-safe, so a session owns a small pool of interpreters
(``interpreters``, default 1): a run borrows one, resizes its inputs when the batch or
another dynamic axis changed, invokes, copies the outputs and gives it back. Several
threads may call ``run`` at once; with one interpreter they take turns.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import LoadError
from agent.runtime.base import check_signature, require_runtime, warm_up
from shared.bundle.manifest import Manifest

# The newest tflite-runtime release is 2.14.0; every one so far is built for NumPy 1.
LAST_NUMPY1_TFLITE_RUNTIME = (2, 14)


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split(".")[:2]]
    major, minor = [*parts, 0, 0][:2]
    return major, minor


def tflite_runtime_refusal(tflite_version: str, numpy_version: str) -> str | None:
    """Why this tflite-runtime cannot run under this NumPy, or None when it can."""
    if _major_minor(numpy_version)[0] >= 2 and _major_minor(tflite_version) <= LAST_NUMPY1_TFLITE_RUNTIME:
        return (
            f"tflite-runtime {tflite_version} is built for NumPy 1 and crashes under NumPy "
            f"{numpy_version}; install ai-edge-litert (pip install ai-edge-litert) or numpy<2"
        )
    return None


def interpreter_class() -> tuple[Any, str]:
    """The Interpreter class and where it came from; raise LoadError when none is usable."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError as exc:
        litert_error = str(exc)
    if importlib.util.find_spec("tflite_runtime") is None:
        raise LoadError(
            f"no LiteRT runtime on this device (ai_edge_litert: {litert_error}; tflite_runtime: "
            "not installed): pip install ai-edge-litert"
        )
    try:
        version = importlib.metadata.version("tflite-runtime")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    refusal = tflite_runtime_refusal(version, np.__version__)
    if refusal is not None:
        raise LoadError(refusal)
    try:
        from tflite_runtime.interpreter import Interpreter as TfliteInterpreter
    except ImportError as exc:
        raise LoadError(f"tflite_runtime {version} cannot be imported: {exc}") from None
    return TfliteInterpreter, f"tflite_runtime {version}"


class _Slot:
    """One interpreter with the input shapes it is currently allocated for."""

    def __init__(self, interpreter: Any) -> None:
        self.it = interpreter
        self.inputs = {d["name"]: d for d in interpreter.get_input_details()}
        self.outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
        self.shapes = {name: tuple(int(v) for v in d["shape"]) for name, d in self.inputs.items()}

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        it = self.it
        resized = False
        for name, arr in feeds.items():
            if arr.shape != self.shapes[name]:
                it.resize_tensor_input(self.inputs[name]["index"], list(arr.shape))
                self.shapes[name] = arr.shape
                resized = True
        if resized:
            it.allocate_tensors()
        for name, arr in feeds.items():
            it.set_tensor(self.inputs[name]["index"], np.ascontiguousarray(arr))
        it.invoke()
        return {name: it.get_tensor(self.outputs[name]) for name in output_names}  # get_tensor copies


class LiteRtSession:
    def __init__(self, slots: list[_Slot], output_names: list[str]) -> None:
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in slots:
            self._free.put(slot)
        self.size = len(slots)
        self._outputs = output_names
        self.golden: dict[str, np.ndarray] | None = None  # the bundle's golden inputs (batching probe)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot = self._free.get()
        try:
            return slot.run(inputs, self._outputs)
        except Exception:
            # A failed resize/invoke may leave the interpreter half-allocated: force a fresh
            # allocation on the next run.
            slot.shapes = {name: () for name in slot.shapes}
            raise
        finally:
            self._free.put(slot)


class LiteRtBackend:
    name = "litert"
    _import_lock = threading.Lock()

    def __init__(self, *, num_threads: int = 1, interpreters: int = 1) -> None:
        if num_threads < 1 or interpreters < 1:
            raise ValueError("num_threads and interpreters must be >= 1")
        self.num_threads = num_threads
        self.interpreters = interpreters

    def load(self, model_path: Path, manifest: Manifest) -> LiteRtSession:
        require_runtime(self.name, manifest)
        with self._import_lock:
            interpreter, origin = interpreter_class()
        slots = []
        for _ in range(self.interpreters):
            try:
                it = interpreter(model_path=str(model_path), num_threads=self.num_threads)
                it.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise LoadError(
                    f"LiteRT ({origin}) cannot load {manifest.name} r{manifest.release}: {exc}"
                ) from None
            slots.append(_Slot(it))
        check_signature(manifest, list(slots[0].inputs), list(slots[0].outputs), "LiteRT")
        session = LiteRtSession(slots, [s.name for s in manifest.outputs])
        session.golden = warm_up(session, manifest, model_path)
        return session
