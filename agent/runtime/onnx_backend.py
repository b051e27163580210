"""The onnxruntime backend. onnxruntime is imported on first load, not at agent import."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import LoadError
from agent.runtime.base import check_signature, require_runtime, warm_up
from shared.bundle.manifest import Manifest

_OPT_LEVELS = ("disable", "basic", "extended", "all")


class OnnxSession:
    def __init__(self, session: Any, output_names: list[str]) -> None:
        self._session = session
        self._outputs = output_names
        self.golden: dict[str, np.ndarray] | None = None  # the bundle's golden inputs (batching probe)
        # InferenceSession.run checks the feed's names against the model on every call, which
        # the host's InputCheck already proved against the manifest (itself checked against
        # the model at load): the binding's own run, when this onnxruntime has it.
        inner = getattr(session, "_sess", None)
        self._run = getattr(inner, "run", None)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._run is not None:
            results = self._run(self._outputs, inputs, None)
        else:
            results = self._session.run(self._outputs, inputs)
        return dict(zip(self._outputs, results, strict=True))


class OnnxBackend:
    name = "onnxruntime"
    _import_lock = threading.Lock()

    def __init__(self, *, intra_op_threads: int = 1, optimization: str = "all") -> None:
        if optimization not in _OPT_LEVELS:
            raise ValueError(f"optimization must be one of {_OPT_LEVELS}")
        self.intra_op_threads = intra_op_threads
        self.optimization = optimization

    def load(self, model_path: Path, manifest: Manifest) -> OnnxSession:
        require_runtime(self.name, manifest)
        with self._import_lock:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise LoadError(
                    f"{manifest.name} r{manifest.release} needs onnxruntime, which is not installed "
                    f"on this device ({exc}): pip install onnxruntime"
                ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise LoadError(f"onnxruntime cannot load {manifest.name} r{manifest.release}: {exc}") from None
        check_signature(manifest, [i.name for i in session.get_inputs()],
                        [o.name for o in session.get_outputs()], "onnxruntime")
        wrapped = OnnxSession(session, [s.name for s in manifest.outputs])
        wrapped.golden = warm_up(wrapped, manifest, model_path)
        return wrapped
