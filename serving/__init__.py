"""Using registered models: loading them (``models:/`` URIs, ``loading``) and classifying images with them
(``classify``: streaming, ONNX Runtime or PyTorch, bad files become error rows).

What a logged model is belongs to ``model_format``; the `zoo` commands that call this are in ``cli``.
Nothing here imports ``training``.
"""
