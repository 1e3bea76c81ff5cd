"""The `zoo` command line and everything that uses registered models: loading, ONNX export, classification."""
