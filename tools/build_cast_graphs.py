"""Build the codec's float32 <-> float16 Cast graphs into mercury_onnx/runtime/graphs/.

    python tools/build_cast_graphs.py            # rewrites cast_f32_f16.onnx and cast_f16_f32.onnx

Each is one ONNX Cast node (input x, output y, opset 17, IR 8), made with onnx.helper. The
runtime reads the files as bytes and hands them to onnxruntime, so the device needs no onnx
package. tests/runtime/test_codec.py rebuilds them here and checks the committed bytes.
"""
from __future__ import annotations

from pathlib import Path

GRAPHS = Path(__file__).resolve().parents[1] / "mercury_onnx" / "runtime" / "graphs"
CASTS = {"cast_f32_f16.onnx": ("FLOAT", "FLOAT16"), "cast_f16_f32.onnx": ("FLOAT16", "FLOAT")}


def cast_graph(src: str, dst: str) -> bytes:
    """A serialised one-node model y = Cast(x, to=dst), e.g. cast_graph("FLOAT", "FLOAT16")."""
    from onnx import TensorProto, helper

    s, d = getattr(TensorProto, src), getattr(TensorProto, dst)
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=d)], "cast",
                              [helper.make_tensor_value_info("x", s, None)],
                              [helper.make_tensor_value_info("y", d, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def main() -> None:
    GRAPHS.mkdir(exist_ok=True)
    for name, (src, dst) in CASTS.items():
        (GRAPHS / name).write_bytes(cast_graph(src, dst))
        print(f"wrote {GRAPHS / name}")


if __name__ == "__main__":
    main()
