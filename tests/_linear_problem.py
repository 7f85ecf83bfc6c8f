"""The small linear regression the look-ahead and DANA-Zero tests share.

``Dense(2)`` on 3 features, mse: seeded inputs and targets for ``steps``
batches of ``batch`` rows, and the seeded initial kernel and bias. Small
enough that every NumPy reference in those tests fits in a few lines.
"""

from __future__ import annotations

import numpy as np


def data(steps: int, batch: int):
    """``(x [steps·batch, 3], y [steps·batch, 2])``, float32."""
    rng = np.random.RandomState(0)
    return (rng.randn(steps * batch, 3).astype("float32"),
            rng.randn(steps * batch, 2).astype("float32"))


def init():
    """``[kernel (3, 2), bias (2,)]``, float32."""
    rng = np.random.RandomState(1)
    return [rng.randn(3, 2).astype("float32"), rng.randn(2).astype("float32")]
