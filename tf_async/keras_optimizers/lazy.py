"""Lazy (row-sparse) Adam, AdamW and SGD with momentum for embedding tables.

A dense Adam step on an embedding table decays m and v of *every* row and
moves every row, so its cost follows the table, not the batch. The lazy
variants, for a gradient that arrives as ``tf.IndexedSlices`` (rows of a
table), advance only the touched rows (duplicate ids summed first, as in the
dense gradient)::

    LazyAdam  (TF1 tf.contrib.opt.LazyAdamOptimizer, TF Addons LazyAdam):
        t      = exact global step (atomic counter, this apply included)
        m[r]  ← m[r] + (g[r] − m[r])(1 − β1)          rows r touched only
        v[r]  ← v[r] + (g[r]² − v[r])(1 − β2)
        w[r]  ← w[r] − lr·sqrt(1 − β2^t)/(1 − β1^t) · m[r] / (sqrt(v[r]) + ε)
    LazyAdamW: LazyAdam + decoupled decay of the touched rows,
        w[r] ← w[r] − λ·lr·w[r]   (TF Addons' DecoupledWeightDecayExtension,
        sparse path)
    LazySGD   (TF1 MomentumOptimizer's sparse apply):
        m[r]  ← μ·m[r] − lr·g[r];   w[r] ← w[r] + m[r]   (Nesterov:
        w[r] ← w[r] + μ·m[r] − lr·g[r])

Rows not in the batch keep w, m and v unchanged (a semantic choice: their
moments do not decay while they are not looked up). A variable whose gradient
is dense (a ``Dense`` kernel, or a table under ``gradient_accumulation_steps``
-- rejected, see below) gets exactly the Keras update, so on dense variables,
and on a table whose every row is touched, the lazy optimizers equal
``keras.optimizers.Adam`` / ``AdamW`` / ``SGD`` (same ops, same order).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import keras
import tensorflow as tf

from tf_async import _keras_fit
from tf_async.keras_optimizers import _sparse_rows
from tf_async.keras_optimizers._arguments import (
    check_adam_arguments,
    check_learning_rate,
    check_weight_decay,
)
from tf_async.keras_optimizers._exact_step import ExactGlobalStep

__all__ = ["LazyAdam", "LazyAdamW", "LazySGD"]


def _reject_accumulation(cls_name: str, kwargs: dict) -> None:
    if kwargs.get("gradient_accumulation_steps"):
        raise ValueError(
            f"{cls_name} does not support `gradient_accumulation_steps`: Keras "
            "accumulates gradients into dense buffers, so every row of a table "
            "would be updated. Received: gradient_accumulation_steps="
            f"{kwargs['gradient_accumulation_steps']!r}"
        )


def decay(optimizer, variable, learning_rate, ids=None) -> None:
    """Decoupled weight decay w ← w − λ·lr·w (Keras ``_apply_weight_decay``),
    on rows ``ids`` only when given."""
    if optimizer.weight_decay is None or not _keras_fit.uses_weight_decay(optimizer, variable):
        return
    dtype = variable.dtype
    lr = tf.cast(learning_rate, dtype)
    wd = tf.cast(optimizer.weight_decay, dtype)
    if ids is None:
        raw = _keras_fit.raw_variable(variable)
        raw.assign_sub(raw * wd * lr)
    else:
        _sparse_rows.scatter_sub(variable, ids, _sparse_rows.gather(variable, ids) * wd * lr)


def adam_alpha(optimizer, dtype, learning_rate, step):
    """Keras Adam's step size at bias-correction step ``step``:
    lr·√(1 − β2^t)/(1 − β1^t) (``optimizer.beta_1``, ``optimizer.beta_2``)."""
    lr = tf.cast(learning_rate, dtype)
    local_step = tf.cast(step, dtype)
    beta_1_power = tf.pow(tf.cast(optimizer.beta_1, dtype), local_step)
    beta_2_power = tf.pow(tf.cast(optimizer.beta_2, dtype), local_step)
    return lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)


def adam_dense(optimizer, gradient, variable, learning_rate, step) -> None:
    """Keras Adam's ``update_step`` at bias-correction step ``step``."""
    dtype = variable.dtype
    gradient = tf.cast(gradient, dtype)
    alpha = adam_alpha(optimizer, dtype, learning_rate, step)
    index = optimizer._get_variable_index(variable)
    m = optimizer._momentums[index]
    v = optimizer._velocities[index]
    optimizer.assign_add(m, (gradient - m) * (1 - optimizer.beta_1))
    optimizer.assign_add(v, (tf.square(gradient) - v) * (1 - optimizer.beta_2))
    if optimizer.amsgrad:
        v_hat = optimizer._velocity_hats[index]
        optimizer.assign(v_hat, tf.maximum(v_hat, v))
        v = v_hat
    optimizer.assign_sub(variable, (m * alpha) / (tf.sqrt(v) + optimizer.epsilon))


def adam_rows(optimizer, ids, gradient_rows, variable, learning_rate, step) -> None:
    """LazyAdam on rows ``ids`` (unique) with their gradients ``gradient_rows``.

    The same arithmetic as Keras Adam on those rows; m and v get their
    increments with ``_sparse_rows.scatter_add`` (as Keras' dense
    ``assign_add``) and are read back after it. Under the asynchronous
    parameter-server step the whole update holds the table's lock
    (``strategies/_table_locks``), so concurrent workers lose no increment.
    """
    dtype = variable.dtype
    g = tf.cast(gradient_rows, dtype)
    alpha = adam_alpha(optimizer, dtype, learning_rate, step)
    index = optimizer._get_variable_index(variable)
    m = optimizer._momentums[index]
    v = optimizer._velocities[index]
    gather = _sparse_rows.gather
    _sparse_rows.scatter_add(m, ids, (g - gather(m, ids)) * (1 - optimizer.beta_1))
    _sparse_rows.scatter_add(v, ids, (tf.square(g) - gather(v, ids)) * (1 - optimizer.beta_2))
    m_rows = gather(m, ids)
    v_rows = gather(v, ids)
    if optimizer.amsgrad:
        v_hat = optimizer._velocity_hats[index]
        v_rows = tf.maximum(gather(v_hat, ids), v_rows)
        _sparse_rows.scatter_update(v_hat, ids, v_rows)
    _sparse_rows.scatter_sub(
        variable, ids, (m_rows * alpha) / (tf.sqrt(v_rows) + optimizer.epsilon)
    )


def sgd_momentum_rows(optimizer, momentum_variable, ids, gradient_rows, variable,
                      learning_rate) -> None:
    """Lazy SGD with momentum on rows ``ids`` (Keras SGD's arithmetic)."""
    dtype = variable.dtype
    g = tf.cast(gradient_rows, dtype)
    lr = tf.cast(learning_rate, dtype)
    mu = tf.cast(optimizer.momentum, dtype)
    m_rows = _sparse_rows.gather(momentum_variable, ids) * mu - g * lr
    _sparse_rows.scatter_update(momentum_variable, ids, m_rows)
    if optimizer.nesterov:
        _sparse_rows.scatter_add(variable, ids, m_rows * mu - g * lr)
    else:
        _sparse_rows.scatter_add(variable, ids, m_rows)


@keras.saving.register_keras_serializable(package="tf_async")
class LazyAdam(ExactGlobalStep, keras.optimizers.Adam):
    """Adam whose table rows advance only when looked up (LazyAdam semantics).

    For a row-sparse (``IndexedSlices``) gradient only the touched rows' m, v
    and weights change; dense gradients get Keras Adam exactly. Bias
    correction uses the exact global step (``global_step``). Reference: TF1
    ``tf.contrib.opt.LazyAdamOptimizer`` / TF Addons ``LazyAdam``. Formula in
    the module docstring.

    Args:
      learning_rate: float > 0, a ``LearningRateSchedule`` or a callable.
      beta_1, beta_2: moment decays in [0, 1).
      epsilon: > 0, added to sqrt(v).
      amsgrad: keep the running maximum of v (rows touched only).
      weight_decay: None or >= 0: decoupled decay (AdamW) of the touched rows.
      **kwargs: other ``keras.optimizers.Optimizer`` arguments (``clipnorm``,
        ``use_ema``, ...; not ``gradient_accumulation_steps``).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: Optional[float] = None,
        name: Optional[str] = None,
        **kwargs,
    ):
        learning_rate = check_adam_arguments(
            learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay,
            zero_learning_rate=False, tensor_betas=True,
        )
        _reject_accumulation(type(self).__name__, kwargs)
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )

    @property
    def updates_only_touched_rows(self) -> bool:
        """True: a table's rows not in the batch keep their weights and slots."""
        return True

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._build_global_step()

    def _apply_weight_decay(self, variables):
        # Folded into the update: a table decays only its touched rows.
        return

    def _update_step_at(self, gradient, variable, learning_rate, step):
        if _sparse_rows.is_rows(gradient):
            ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
            decay(self, variable, learning_rate, ids)
            adam_rows(self, ids, rows, variable, learning_rate, step)
        else:
            decay(self, variable, learning_rate)
            adam_dense(self, gradient, variable, learning_rate, step)


@keras.saving.register_keras_serializable(package="tf_async")
class LazyAdamW(LazyAdam):
    """LazyAdam with decoupled weight decay (``keras.optimizers.AdamW``'s
    arguments): a table decays only its touched rows, dense variables as AdamW.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        if weight_decay is None:
            raise ValueError(
                "`weight_decay` must be a float >= 0 for LazyAdamW; received "
                "weight_decay=None (use LazyAdam for no decay)."
            )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )


@keras.saving.register_keras_serializable(package="tf_async")
class LazySGD(keras.optimizers.SGD):
    """SGD with momentum whose table rows' momenta advance only when looked up.

    For a row-sparse gradient: m[r] ← μ·m[r] − lr·g[r], w[r] ← w[r] + m[r]
    (Nesterov: w[r] + μ·m[r] − lr·g[r]) on the touched rows only (TF1
    ``MomentumOptimizer``'s sparse apply); dense gradients get Keras SGD
    exactly. ``weight_decay`` decays the touched rows only.

    Args:
      learning_rate: float > 0, schedule or callable.
      momentum: μ in (0, 1]. (Without momentum ``keras.optimizers.SGD()``
        already updates only the touched rows; 0 is rejected here.)
      nesterov: Nesterov momentum.
      **kwargs: other ``keras.optimizers.Optimizer`` arguments
        (``weight_decay``, ``clipnorm``, ...; not
        ``gradient_accumulation_steps``).
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        learning_rate = check_learning_rate(learning_rate)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(
                f"`momentum` must be a float in (0, 1]; received momentum={momentum!r}."
            )
        if not 0 < momentum <= 1:
            raise ValueError(
                f"`momentum` must be in (0, 1] for LazySGD; received momentum={momentum} "
                "(keras.optimizers.SGD() without momentum is already row-sparse)."
            )
        check_weight_decay(kwargs.get("weight_decay"))
        _reject_accumulation(type(self).__name__, kwargs)
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=nesterov,
            name=name,
            **kwargs,
        )

    @property
    def updates_only_touched_rows(self) -> bool:
        """True: a table's rows not in the batch keep their weights and momenta."""
        return True

    def _apply_weight_decay(self, variables):
        # Folded into the update: a table decays only its touched rows.
        return

    def update_step(self, gradient, variable, learning_rate):
        """Lazy momentum on a table's touched rows; Keras SGD otherwise."""
        if _sparse_rows.is_rows(gradient):
            ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
            decay(self, variable, learning_rate, ids)
            momentum = self.momentums[self._get_variable_index(variable)]
            sgd_momentum_rows(self, momentum, ids, rows, variable, learning_rate)
        else:
            decay(self, variable, learning_rate)
            super().update_step(gradient, variable, learning_rate)
