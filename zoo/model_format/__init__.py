"""What a logged zoo model is: an MLflow pyfunc model "from code" (``pyfunc_model.py`` with zoo/imaging.py beside
it), holding the network *with* its normalization as a pickle-free ``torch.export`` program, for registered
models the same as ONNX (``onnx_graph.py``), a signature, an input example and metadata that readers use
instead of hard-coding anything. training writes it (``mlflow_model``); serving reads it back (``model``).
"""
