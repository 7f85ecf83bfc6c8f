"""tf_async: asynchronous and memory-lean distributed training for Keras 3 + TF 2.

Public API (loaded lazily, so ``python -m tf_async.launch`` starts without
importing TensorFlow):

* ``tf_async.strategies`` — distribution strategies.
* ``tf_async.keras_optimizers`` — staleness-compensating / sharded optimizers.
* ``tf_async.staleness`` — the StepContext seam (τ and the weights read).
* ``tf_async.cluster`` — ``local_cluster()`` and TF_CONFIG helpers.
* ``tf_async.local_cluster`` — shortcut for ``tf_async.cluster.local_cluster``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("cluster", "keras_optimizers", "staleness", "strategies", "launch")
_SHORTCUTS = {
    "local_cluster": ("cluster", "local_cluster"),
    "StepContext": ("staleness", "StepContext"),
}

__all__ = ["__version__", *_SUBMODULES, *_SHORTCUTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from tf_async import cluster, keras_optimizers, launch, staleness, strategies
    from tf_async.cluster import local_cluster
    from tf_async.staleness import StepContext


_checked = False


def _check_once() -> None:
    global _checked
    if not _checked:
        from tf_async._compat import check_versions

        check_versions()
        _checked = True


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES or name in _SHORTCUTS:
        _check_once()
    if name in _SUBMODULES:
        return importlib.import_module(f"tf_async.{name}")
    if name in _SHORTCUTS:
        module, attribute = _SHORTCUTS[name]
        return getattr(importlib.import_module(f"tf_async.{module}"), attribute)
    raise AttributeError(f"module 'tf_async' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
