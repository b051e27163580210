"""Run a model file at build time (golden vectors, quantization checks), whatever its format.

ONNX goes through onnxruntime, TFLite through LiteRT (``ai_edge_litert``, falling back to
``tflite_runtime``). The format is told by the file's bytes, not its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fleet.bundles.signature import tensor_specs
from shared.bundle.manifest import Quantization, Runtime, TensorSpec
from shared.errors import MalformedDocumentError

TFLITE_MAGIC = b"TFL3"


class ModelRunner(Protocol):
    runtime: Runtime
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def model_format(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return "tflite" if head[4:8] == TFLITE_MAGIC else "onnx"


class OnnxRunner:
    runtime: Runtime = "onnxruntime"

    def __init__(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise MalformedDocumentError(f"onnxruntime cannot load {path}: {exc}") from None
        self.inputs = tensor_specs(self.session.get_inputs(), "input")
        self.outputs = tensor_specs(self.session.get_outputs(), "output")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, feeds))


def load_interpreter(**kwargs: Any) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]  # the same class, older package
        except ImportError:
            raise MalformedDocumentError(
                "TFLite models need LiteRT: pip install ai-edge-litert"
            ) from None
    return Interpreter(**kwargs)


def _tflite_specs(details: list[dict[str, Any]]) -> list[TensorSpec]:
    specs = []
    for d in details:
        sig = d.get("shape_signature")
        dims = list(sig if sig is not None and len(sig) else d["shape"])
        shape: list[int | str] = [
            int(v) if v >= 0 else f"{d['name']}_dim{axis}" for axis, v in enumerate(dims)
        ]
        specs.append(TensorSpec(name=d["name"], dtype=np.dtype(d["dtype"]).name, shape=shape))
    return specs


class TfliteRunner:
    runtime: Runtime = "litert"

    def __init__(self, path: Path):
        try:
            self.interpreter = load_interpreter(model_path=str(path), num_threads=1)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise MalformedDocumentError(f"LiteRT cannot load {path}: {exc}") from None
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = _tflite_specs(self._in)
        self.outputs = _tflite_specs(self._out)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        it = self.interpreter
        for d in self._in:
            arr = feeds[d["name"]]
            if tuple(arr.shape) != tuple(d["shape"]):
                it.resize_tensor_input(d["index"], list(arr.shape))
        it.allocate_tensors()
        for d in it.get_input_details():
            it.set_tensor(d["index"], feeds[d["name"]])
        it.invoke()
        return [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]


def open_model(path: Path) -> ModelRunner:
    if not Path(path).is_file():
        raise MalformedDocumentError(f"model file {path} does not exist")
    return TfliteRunner(path) if model_format(path) == "tflite" else OnnxRunner(path)


def tflite_quantization(path: Path) -> Quantization:
    """Read how a converted TFLite model is quantized from the dtypes of its weights."""
    from fleet.bundles.tflite_schema import weight_dtypes

    dtypes = weight_dtypes(Path(path).read_bytes())
    for kind in ("int8", "uint8", "int16", "float16"):
        if kind in dtypes:
            return Quantization(mode="tflite", weight_dtype=kind)
    return Quantization(mode="tflite", weight_dtype="float32" if dtypes else None)
