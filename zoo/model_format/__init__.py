"""What a logged (and registered) zoo model is, for the side that writes it and the side that reads it.

A zoo model is an MLflow pyfunc model "from code":

- ``pyfunc_model.py``: its code, with ``zoo/imaging.py`` (the image decoder `zoo classify` uses)
  shipped beside it; images or pixels in [0, 1] in, labels out;
- ``artifacts/program.pt2``: the network *with* its normalization, a pickle-free ``torch.export``
  program with a dynamic batch dimension;
- ``artifacts/model.onnx`` (registered models): the same network and normalization as ONNX,
  checked against PyTorch (``onnx_graph.py``, also what `zoo export` writes);
- its signature (an ``image`` bytes or a ``pixels`` column, a ``top_k`` param), an input example
  of real images, pinned requirements, and metadata (``zoo_model``, ``normalization``,
  ``input_shape``, ``class_names``, ``resize`` for a model scored on center crops, and how it
  was trained) that readers use instead of hard-coding anything.

Modules: ``model`` (the in-memory model and its metadata; no torch or MLflow at import),
``onnx_graph`` (the ONNX export and its parity check), ``mlflow_model`` (logging it:
program, signature, example, graph), ``pyfunc_model`` (the code shipped inside it).
training writes models through ``mlflow_model``; serving reads them back; neither imports the other.
"""
