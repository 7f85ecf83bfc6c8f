"""Delay-compensated optimizers: DC-ASGD (Zheng et al., ICML 2017) and DC-Adam.

A stale gradient ``g`` was computed at the weights ``w_read`` some τ updates
ago; the optimizer applies it to the current weights ``w_now``. DC-ASGD
corrects it with the diagonal of a cheap Hessian approximation::

    g̃ = g + λ · g ⊙ g ⊙ (w_now − w_read)

with λ constant (``lambda_``) or adaptive (``adaptive=True``)::

    meansq_t = m · meansq_{t−1} + (1 − m) · g ⊙ g
    λ_t      = λ0 / sqrt(meansq_t + ε)

τ and ``w_read`` come from ``tf_async.staleness`` (the StepContext seam).
Without a published context (synchronous training) the compensation is not
even built into the graph, so both optimizers equal their Keras base
(``keras.optimizers.SGD`` / ``Adam`` / ``AdamW``) bit for bit.

Embedding tables: a row-sparse (``tf.IndexedSlices``) gradient is compensated
on its rows only (duplicate ids summed first; ``w_read`` of a row is the row
as the step read it, see ``tf_async.staleness``): the compensation term
g ⊙ g ⊙ (w_now − w_read) is zero wherever g is. The base update then follows
the optimizer's semantics: DCSGD without momentum (and not adaptive) is
row-sparse and exact; momentum, AMSGrad/Adam moments and DC-ASGD's adaptive
mean square decay every row (Keras' dense semantics) unless ``lazy=True``
(LazyAdam semantics: only the touched rows' state advances, see
``tf_async.keras_optimizers.lazy``).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import keras
import tensorflow as tf
from keras import ops

from tf_async import staleness
from tf_async.keras_optimizers import _sparse_rows, lazy as _lazy
from tf_async.keras_optimizers._exact_step import ExactGlobalStep
from tf_async.keras_optimizers._arguments import (
    check_learning_rate,
    check_non_negative,
    check_positive,
    check_unit_interval,
)

__all__ = ["DCSGD", "DCAdam", "AdamAsync"]


_check_learning_rate = check_learning_rate


def _check_dc_args(lambda_: float, meansq_momentum: float, epsilon: float) -> None:
    check_non_negative("lambda_", lambda_)
    check_unit_interval("meansq_momentum", meansq_momentum)
    check_positive("epsilon", epsilon)


def _stale_delta(variable) -> Optional[tf.Tensor]:
    """``w_now − w_read`` for ``variable``, or None if its gradient is fresh.

    Decided at trace time: no published context (or a context that does not
    name this variable) means τ = 0 and no compensation is built.
    """
    context = staleness.current()
    if context is None or variable not in context:
        return None
    read = context.read_value(variable)
    if isinstance(read, tf.IndexedSlices):  # rows read; the others count as fresh
        ids = read.indices
        return _sparse_rows.densify(
            ids, _sparse_rows.gather(variable, ids) - _sparse_rows.read_rows(variable, ids),
            variable,
        )
    w_read = tf.cast(read, variable.dtype)
    return ops.subtract(variable, w_read)


def _stale_rows_delta(variable, ids) -> Optional[tf.Tensor]:
    """``w_now[ids] − w_read[ids]`` (rows only), or None if the gradient is fresh."""
    context = staleness.current()
    if context is None or variable not in context:
        return None
    return _sparse_rows.gather(variable, ids) - _sparse_rows.read_rows(variable, ids)


def _check_lazy(lazy) -> bool:
    if not isinstance(lazy, bool):
        raise TypeError(f"`lazy` must be a bool; received lazy={lazy!r}.")
    return lazy


@keras.saving.register_keras_serializable(package="tf_async")
class DCSGD(keras.optimizers.SGD):
    """SGD (momentum, Nesterov) with DC-ASGD delay compensation.

    Zheng et al., "Asynchronous Stochastic Gradient Descent with Delay
    Compensation", ICML 2017: g̃ = g + λ·g⊙g⊙(w_now − w_read), then the
    ``keras.optimizers.SGD`` update with g̃.

    Args:
      learning_rate: float > 0, schedule or callable.
      momentum: float in [0, 1].
      nesterov: Nesterov momentum.
      lambda_: λ (λ0 when ``adaptive``), float >= 0. The paper uses 0.04
        (constant) and 2.0 (adaptive) on CIFAR-10.
      adaptive: λ_t = λ0 / sqrt(meansq_t + ε) with a per-element running
        mean square of the gradient.
      meansq_momentum: m in [0, 1) of that running mean square.
      epsilon: ε > 0 of the adaptive normaliser.
      lazy: for a table's row-sparse gradient, advance momentum, the
        adaptive mean square and weight decay on the touched rows only
        (LazySGD semantics). Dense gradients: unchanged.
      **kwargs: base optimizer arguments (``weight_decay``, ``clipnorm``, ...).
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        lambda_: float = 0.04,
        adaptive: bool = False,
        meansq_momentum: float = 0.95,
        epsilon: float = 1e-7,
        lazy: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        learning_rate = _check_learning_rate(learning_rate)
        _check_dc_args(lambda_, meansq_momentum, epsilon)
        lazy = _check_lazy(lazy)
        if isinstance(momentum, int) and not isinstance(momentum, bool):
            momentum = float(momentum)
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            name=name,
            **kwargs,
        )
        self.lambda_ = float(lambda_)
        self.adaptive = bool(adaptive)
        self.meansq_momentum = float(meansq_momentum)
        self.epsilon = float(epsilon)
        self.lazy = lazy

    @property
    def updates_only_touched_rows(self) -> bool:
        """True if a table's rows not in the batch keep weights and state."""
        return self.lazy or (
            self.momentum == 0 and not self.adaptive and self.weight_decay is None
        )

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._meansqs = []
        if self.adaptive:
            self._meansqs = self.add_optimizer_variables(variables, "meansq")

    def _apply_weight_decay(self, variables):
        if not self.lazy:
            super()._apply_weight_decay(variables)
        # lazy: folded into update_step (a table decays its touched rows only)

    def _compensated(self, gradient, variable):
        if self.lambda_ == 0:
            return gradient
        lam = ops.cast(self.lambda_, variable.dtype)
        if self.adaptive:
            meansq = self._meansqs[self._get_variable_index(variable)]
            m = ops.cast(self.meansq_momentum, variable.dtype)
            new_meansq = ops.add(
                ops.multiply(meansq, m),
                ops.multiply(ops.square(gradient), ops.subtract(1, m)),
            )
            self.assign(meansq, new_meansq)
            lam = ops.divide(
                lam, ops.sqrt(ops.add(new_meansq, ops.cast(self.epsilon, variable.dtype)))
            )
        delta = _stale_delta(variable)
        if delta is None:
            return gradient
        return ops.add(
            gradient,
            ops.multiply(lam, ops.multiply(ops.square(gradient), delta)),
        )

    def _compensated_rows(self, ids, rows, variable):
        """DC-ASGD on the touched rows (``rows``: their summed gradients)."""
        if self.lambda_ == 0:
            return rows
        dtype = variable.dtype
        lam = tf.cast(self.lambda_, dtype)
        if self.adaptive:
            meansq = self._meansqs[self._get_variable_index(variable)]
            m = tf.cast(self.meansq_momentum, dtype)
            if self.lazy:
                meansq_rows = _sparse_rows.gather(meansq, ids) * m + tf.square(rows) * (1 - m)
                _sparse_rows.scatter_update(meansq, ids, meansq_rows)
            else:  # the running mean square decays on every row (dense semantics)
                self.assign(meansq, ops.multiply(meansq, m))
                _sparse_rows.scatter_add(meansq, ids, tf.square(rows) * (1 - m))
                meansq_rows = _sparse_rows.gather(meansq, ids)
            lam = lam / tf.sqrt(meansq_rows + tf.cast(self.epsilon, dtype))
        delta = _stale_rows_delta(variable, ids)
        if delta is None:
            return rows
        return rows + lam * (tf.square(rows) * delta)

    def update_step(self, gradient, variable, learning_rate):
        """g̃ = g + λ·g⊙g⊙(w_now − w_read); then Keras SGD with g̃ (rows:
        see the module docstring)."""
        if _sparse_rows.is_rows(gradient):
            ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
            rows = self._compensated_rows(ids, rows, variable)
            if self.lazy:
                _lazy.decay(self, variable, learning_rate, ids)
            if self.momentum == 0:
                lr = tf.cast(learning_rate, variable.dtype)
                _sparse_rows.scatter_sub(variable, ids, rows * lr)
            elif self.lazy:
                momentum = self.momentums[self._get_variable_index(variable)]
                _lazy.sgd_momentum_rows(self, momentum, ids, rows, variable, learning_rate)
            else:
                super().update_step(
                    _sparse_rows.densify(ids, rows, variable), variable, learning_rate
                )
            return
        if self.lazy:
            _lazy.decay(self, variable, learning_rate)
        gradient = ops.cast(gradient, variable.dtype)
        gradient = self._compensated(gradient, variable)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "lambda_": self.lambda_,
                "adaptive": self.adaptive,
                "meansq_momentum": self.meansq_momentum,
                "epsilon": self.epsilon,
                "lazy": self.lazy,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tf_async")
class DCAdam(ExactGlobalStep, keras.optimizers.Adam):
    """Adam / AdamW fed with the delay-compensated gradient ("AdamAsync").

    m, v (and AMSGrad's v̂) are updated with g̃ = g + λ·g⊙g⊙(w_now − w_read).
    Bias correction uses this optimizer's own int64 ``global_step``, bumped
    once per apply with the raw ``tf.Variable.assign_add`` (an atomic
    increment, also on a parameter server) and the value that call returns —
    never Keras' ``optimizer.iterations``, whose Keras-level ``assign_add`` is
    read-then-assign and loses increments when workers apply concurrently.
    ``weight_decay`` gives AdamW's decoupled decay (``keras.optimizers.AdamW``).

    Args:
      learning_rate, beta_1, beta_2, epsilon, amsgrad: as ``keras.optimizers.Adam``.
      lambda_: λ (λ0 when ``adaptive``), float >= 0.
      adaptive: λ_t = λ0 / sqrt(meansq_t + ε) where meansq_t = β2·v_{t−1} +
        (1−β2)·g⊙g is the DC-ASGD mean square with m = β2, computed from
        Adam's own second moment (no extra slot).
      lazy: for a table's row-sparse gradient, LazyAdam semantics (only the
        touched rows' m, v, weight decay and weights advance; see
        ``LazyAdam``). Dense gradients: unchanged.
      **kwargs: base optimizer arguments (``weight_decay``, ``clipnorm``, ...).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        lambda_: float = 0.04,
        adaptive: bool = False,
        lazy: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        learning_rate = _check_learning_rate(learning_rate)
        _check_dc_args(lambda_, 0.0, epsilon)
        lazy = _check_lazy(lazy)
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if isinstance(value, numbers.Real):  # Keras also accepts tensors, callables
                check_unit_interval(arg, value)
        if lazy and kwargs.get("gradient_accumulation_steps"):
            _lazy._reject_accumulation("DCAdam(lazy=True)", kwargs)
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            name=name,
            **kwargs,
        )
        self.lambda_ = float(lambda_)
        self.adaptive = bool(adaptive)
        self.lazy = lazy

    @property
    def updates_only_touched_rows(self) -> bool:
        """True with ``lazy=True``: a table's untouched rows keep weights and m, v."""
        return self.lazy

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Exact global step: bumped by raw tf.Variable.assign_add once per apply.
        self._build_global_step()

    def _apply_weight_decay(self, variables):
        if not self.lazy:
            super()._apply_weight_decay(variables)
        # lazy: folded into the update (a table decays its touched rows only)

    def _update_step_at(self, gradient, variable, learning_rate, step):
        if _sparse_rows.is_rows(gradient):
            ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
            rows = self._compensated_rows(ids, rows, variable)
            if self.lazy:
                _lazy.decay(self, variable, learning_rate, ids)
                _lazy.adam_rows(self, ids, rows, variable, learning_rate, step)
            else:
                _lazy.adam_dense(
                    self, _sparse_rows.densify(ids, rows, variable), variable,
                    learning_rate, step,
                )
            return
        if self.lazy:
            _lazy.decay(self, variable, learning_rate)
        gradient = ops.cast(gradient, variable.dtype)
        if self.lambda_ != 0:
            delta = _stale_delta(variable)
            if delta is not None:
                lam = ops.cast(self.lambda_, variable.dtype)
                if self.adaptive:
                    v = self._velocities[self._get_variable_index(variable)]
                    b2 = ops.cast(self.beta_2, variable.dtype)
                    meansq = ops.add(
                        ops.multiply(v, b2), ops.multiply(ops.square(gradient), 1 - b2)
                    )
                    lam = ops.divide(
                        lam, ops.sqrt(ops.add(meansq, ops.cast(self.epsilon, variable.dtype)))
                    )
                gradient = ops.add(
                    gradient, ops.multiply(lam, ops.multiply(ops.square(gradient), delta))
                )
        _lazy.adam_dense(self, gradient, variable, learning_rate, step)

    def _compensated_rows(self, ids, rows, variable):
        """DC-ASGD on the touched rows; the adaptive λ reads v on those rows."""
        if self.lambda_ == 0:
            return rows
        delta = _stale_rows_delta(variable, ids)
        if delta is None:
            return rows
        dtype = variable.dtype
        lam = tf.cast(self.lambda_, dtype)
        if self.adaptive:
            v = self._velocities[self._get_variable_index(variable)]
            b2 = tf.cast(self.beta_2, dtype)
            meansq = _sparse_rows.gather(v, ids) * b2 + tf.square(rows) * (1 - b2)
            lam = lam / tf.sqrt(meansq + tf.cast(self.epsilon, dtype))
        return rows + lam * (tf.square(rows) * delta)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"lambda_": self.lambda_, "adaptive": self.adaptive, "lazy": self.lazy})
        return config


#: The name used in the project's source articles for DC-Adam.
AdamAsync = DCAdam
