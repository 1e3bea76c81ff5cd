"""What a logged zoo model is: an MLflow pyfunc model "from code" holding the network with its normalization as a
``torch.export`` program (and, registered, as ONNX), a signature, an input example and metadata. training writes
it (``mlflow_model``); serving reads it back (``model``)."""
