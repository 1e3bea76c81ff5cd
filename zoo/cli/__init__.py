"""The `zoo` command line: the group and its error contract in ``main``, shared options in ``options``, one
module per command. Commands parse and print; ``training`` and ``serving`` do the work, imported inside each
command so that `zoo classify x.onnx` starts without torch."""
