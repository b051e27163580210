"""Read a model's input/output signature from onnxruntime into manifest TensorSpecs."""

from __future__ import annotations

from typing import Any

from shared.bundle.manifest import TensorSpec
from shared.errors import MalformedDocumentError

ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def tensor_specs(nodes: list[Any], kind: str) -> list[TensorSpec]:
    """Convert onnxruntime NodeArg lists; unnamed dynamic axes get a stable name."""
    specs = []
    for node in nodes:
        dtype = ORT_TYPES.get(node.type)
        if dtype is None:
            raise MalformedDocumentError(
                f"{kind} {node.name!r} has type {node.type}; edgefleet serves tensor inputs of "
                f"{sorted(ORT_TYPES.values())}"
            )
        shape: list[int | str] = []
        for axis, dim in enumerate(node.shape or []):
            if (isinstance(dim, int) and dim >= 0) or (isinstance(dim, str) and dim):
                shape.append(dim)
            else:
                shape.append(f"{node.name}_dim{axis}")
        specs.append(TensorSpec(name=node.name, dtype=dtype, shape=shape))
    return specs
