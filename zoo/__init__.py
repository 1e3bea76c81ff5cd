"""What a model and its data are: the lowest layer (docs/architecture.md). It imports neither MLflow nor
another package of the project, and importing it loads nothing (the CLI and `zoo classify x.onnx` start
without torch)."""
