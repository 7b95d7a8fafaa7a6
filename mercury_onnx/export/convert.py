"""torch module -> checked, simplified ONNX file with a dynamic batch axis.

Exporter: torch 2.14 has both the TorchScript exporter (`dynamo=False`) and the
torch.export-based one (`dynamo=True`). For these graphs both work with a dynamic batch and
give the same ops after onnxsim; the TorchScript path is the default because it runs many
times faster. timm's fused SDPA attention exports as plain MatMul/Softmax on both (opset 17 for
TorchScript; dynamo starts at opset 18 and cannot convert down, so it is bumped to 18).
"""
from __future__ import annotations

import collections
import warnings
from pathlib import Path

import onnx
import torch

# Ops that would make K data-dependent or select with a boolean mask: never in a head.
FORBIDDEN_HEAD_OPS = ("NonZero", "Compress", "Unique")


class ExportError(RuntimeError):
    """The graph could not be exported, simplified or checked. The message says which step."""


def export_onnx(module: torch.nn.Module, args: tuple, path: str | Path, input_names: list[str],
                output_names: list[str], opset: int = 17, dynamo: bool = False,
                simplify: bool = True) -> onnx.ModelProto:
    """Export with `batch` as the dynamic first axis of every input and output, run onnxsim
    and the full ONNX checker, and save to path."""
    path = Path(path)
    module = module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(module, args, str(path), input_names=input_names,
                                  output_names=output_names, opset_version=opset, dynamo=True,
                                  dynamic_shapes={n: {0: batch} for n in input_names},
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(module, args, str(path), input_names=input_names,
                                  output_names=output_names, opset_version=opset, dynamo=False,
                                  dynamic_axes={n: {0: "batch"} for n in input_names + output_names},
                                  do_constant_folding=True)
    except Exception as e:
        raise ExportError(f"torch.onnx.export of {path.name} failed: {type(e).__name__}: {e}") from e
    model = onnx.load(str(path))
    if simplify:
        import onnxsim
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as e:
            raise ExportError(f"onnxsim failed on {path.name}: {e}") from e
        if not ok:
            raise ExportError(f"onnxsim could not validate the simplified {path.name}")
        model = simplified
    _name_batch_axes(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected {path.name}: {e}") from e
    onnx.save(model, str(path))
    return model


def _name_batch_axes(model: onnx.ModelProto) -> None:
    """Call the first axis `batch` on every graph input and output (dynamo names it s0...)."""
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def check_static_head(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """The head must select with TopK and never with NonZero / boolean masks (static K)."""
    ops = op_counts(model)
    bad = [op for op in FORBIDDEN_HEAD_OPS if op in ops]
    if bad:
        raise ExportError(f"the head graph contains {bad}: K would not be static")
    if "TopK" not in ops:
        raise ExportError("the head graph has no TopK: pruning is missing from the graph")
    return ops
