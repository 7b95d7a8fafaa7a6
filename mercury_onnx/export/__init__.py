"""ONNX export of the Mercury head and tail. Heavy imports stay inside functions; the manifest
the runtime reads lives in the torch-free mercury_onnx.formats."""


def export_model(source, out_dir, keep_ratios=(0.5,), **kw):
    """Mercury checkpoint / backbone JSON / timm name -> validated export folder (a Path).
    See mercury_onnx.export.pipeline.export_model for the options."""
    from .pipeline import export_model as _export_model

    return _export_model(source, out_dir, keep_ratios, **kw)
