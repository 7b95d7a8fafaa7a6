"""Device and cloud runtime over the exported ONNX graphs. No torch here: this is what a
Raspberry Pi installs with the [edge] extra."""
