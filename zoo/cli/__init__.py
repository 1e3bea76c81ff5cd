"""The `zoo` command line: one module per command, the group in ``main``, shared options in ``options``.

    main      the `zoo` group (entry point ``zoo = zoo.cli.main:main``; also ``python -m zoo.cli``): exit codes,
              one-line errors, every command attached
    options   options several commands share (--model, --dataset, --mean/--std, MODEL_URI, --format, ...)
    train     zoo train        study   zoo study       renorm   zoo renorm
    classify  zoo classify     export  zoo export      models   zoo models
    datasets  zoo datasets     ui      zoo ui          demo     zoo demo

Commands parse and print; the work is done by ``training`` (train, study, renorm) and ``serving``
(classify, export), imported inside each command so that `zoo classify x.onnx` starts without torch.
"""
