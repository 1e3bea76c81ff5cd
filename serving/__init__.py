"""Using registered models: loading them (``models:/`` URIs, ``loading``) and classifying images with them
(``classify``: streaming, ONNX Runtime or PyTorch, worker processes, bad files become error rows).

What a logged model is belongs to ``zoo.model_format``; the `zoo` commands that call this are in ``zoo.cli``.
Nothing here imports ``training``.
"""
