"""Framework glue for simcore: ``simcore.adapters.torch``, ``.jax`` and ``.cupy``.

Importing this package imports no framework; each submodule imports its own
framework when it is imported itself.
"""
