"""ONNX export of the Mercury head and tail. Heavy imports stay inside functions; the manifest
the runtime reads lives in the torch-free mercury_onnx.formats."""


def export_model(source, out_dir, keep_ratios=(0.5,), options=None, **kw):
    """Mercury checkpoint / backbone JSON / timm name -> validated export folder (a Path).
    Options: mercury_onnx.export.pipeline.ExportOptions, or its fields as keywords."""
    from .pipeline import export_model as _export_model

    return _export_model(source, out_dir, keep_ratios, options, **kw)
