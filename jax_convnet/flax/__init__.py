"""Flax wrappers around jax_convnet's ops.

* :mod:`jax_convnet.flax.linen` -- ``Conv``, ``MaxPool``, ``max_pool``, ``AvgPool`` and
  ``avg_pool`` for ``flax.linen``;
* :mod:`jax_convnet.flax.nnx` -- the same for ``flax.nnx``;
* both: ``CrossMapNorm`` and ``ResponseNorm`` (no parameters; flax has no such layers).

Both take ``flax``'s own arguments (where they make sense for 2-d convolutions with zero
padding), name and shape their parameters exactly like ``flax``'s modules (a parameter tree
made for ``flax.linen.Conv`` / ``flax.nnx.Conv`` works unchanged in NHWC), and add ``layout``
(``"NHWC"``, the default, or cuda-convnet's ``"C01B"``) and ``partial_sum``.

Flax is an optional dependency: ``pip install 'jax_convnet[flax]'``.
"""
from __future__ import annotations

import importlib

try:
    import flax as _flax  # noqa: F401  (the real top-level package: imports are absolute)
except ImportError as e:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "jax_convnet.flax needs Flax, which is not installed: install the 'flax' extra "
        "(pip install 'jax_convnet[flax]') or flax itself (pip install flax)") from e

__all__ = ["linen", "nnx"]


def __getattr__(name):
    # nnx is heavier to import than linen; load each on first use.
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
