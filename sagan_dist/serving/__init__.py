"""The EMA generator as an MLflow model: its files, the pyfunc that serves it, and `models:/` loading.

A logged model holds no pickle: ``artifacts/generator.pt`` (a weights-only state dict),
``artifacts/generator.json`` (the run's config, redacted, as plain JSON) and ``pyfunc_code.py``, a
models-from-code file that only imports `sagan_dist.serving.pyfunc`. `files` writes and reads the
two data files; `registry` turns a ``models:/NAME@ALIAS`` URI into a generator for the CLI without
running anything stored with the model.
"""
