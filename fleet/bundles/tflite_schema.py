"""Read a TFLite flatbuffer's weight tensors (those backed by a non-empty buffer)."""

from __future__ import annotations

from shared.errors import MalformedDocumentError

_TYPE_NAMES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
    7: "int16", 9: "int8", 10: "float64",
}


def weight_dtypes(data: bytes) -> set[str]:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise MalformedDocumentError(
            "reading TFLite models needs LiteRT (pip install ai-edge-litert)"
        ) from None
    try:
        model = schema.Model.GetRootAs(data, 0)
        found: set[str] = set()
        for s in range(model.SubgraphsLength()):
            sub = model.Subgraphs(s)
            for t in range(sub.TensorsLength()):
                tensor = sub.Tensors(t)
                buf = model.Buffers(tensor.Buffer())
                if buf is not None and (buf.DataLength() > 0 or buf.Size() > 0):
                    found.add(_TYPE_NAMES.get(tensor.Type(), f"type{tensor.Type()}"))
        return found
    except Exception as exc:  # flatbuffers raises plain errors on damaged input
        raise MalformedDocumentError(f"not a readable TFLite model: {exc}") from None
