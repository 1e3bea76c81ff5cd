"""Using registered models: loading them (``models:/`` URIs, ``loading``) and classifying images with them
(``classify``: streaming, ONNX Runtime or PyTorch, bad files become error rows; ``workers``: the processes
that decode and classify batches beside it; ``scores``: one batch's arithmetic, shared by both).

What a logged model is belongs to ``zoo.model_format``; the `zoo` commands that call this are in ``cli``.
Nothing here imports ``training``.
"""
