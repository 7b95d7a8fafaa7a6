"""ONNX export of the Mercury head and tail. Heavy imports stay inside functions: the
runtime (and a Raspberry Pi) import `mercury_onnx.export.manifest` without torch."""
