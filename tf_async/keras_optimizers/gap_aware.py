"""Gap-Aware staleness mitigation for any Keras optimizer.

Barkai, Hakimi, Schuster, "Gap-Aware Mitigation of Gradient Staleness",
ICLR 2020 (arXiv 1909.10802). A stale gradient g was computed at ``w_read``;
the master applies it at ``w_now``. The *gap* is their per-element distance
measured in units of a typical step, and the gradient is divided by it::

    C_t  = β·C_{t−1} + (1 − β)·|w_after − w_before|   (running average of the
                                                       step size, per element)
    Ĉ    = C / (1 − β^k)                              (k = applies so far;
                                                       bias correction)
    G    = 1 + |w_now − w_read| / (Ĉ + ε)             (per element, G ≥ 1)
    g̃    = g / G        -> the inner optimizer's update with g̃

The step size |w_after − w_before| is the inner optimizer's own step (for SGD
with momentum |v|, for Adam |lr·m̂/(√v̂+ε)|, weight decay included), so one
wrapper gives the paper's SGD, Adam and AdamW forms: ``GapAware(SGD(lr,
momentum=0.9))``, ``GapAware(Adam(lr))``, ``GapAware(AdamW(lr, wd))``. The
penalty enters through the gradient, so momentum buffers and Adam's moments
see g̃ (as in the paper's algorithm).

τ and ``w_read`` come from ``tf_async.staleness``. With no published context
(synchronous training) ``apply`` is exactly ``inner.apply``; with a context
and a zero gap G = 1 and g / 1 is g, so the weights equal the inner
optimizer's bit for bit (only C advances).

Embedding tables: a row-sparse gradient is penalised on its rows (duplicate
ids summed first, ``w_read`` of a row as the step read it). If the inner
optimizer moves only the touched rows (``row_sparse.updates_only_touched_rows``)
C advances on those rows only; otherwise on the whole table, as the inner
update does.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tf_async import _keras_fit, staleness
from tf_async.keras_optimizers import _sparse_rows, _wrapper, row_sparse
from tf_async.keras_optimizers._arguments import check_positive, check_unit_interval
from tf_async.keras_optimizers.delay_compensated import _stale_delta, _stale_rows_delta

__all__ = ["GapAware", "gap_penalty"]


def gap_penalty(gap, avg_step, applies, step_average: float, epsilon: float):
    """G = 1 + |gap| / (C / (1 − β^k) + ε) (k = ``applies``; Ĉ = 0 at k = 0)."""
    dtype = avg_step.dtype
    beta = tf.cast(step_average, dtype)
    debias = 1 - tf.pow(beta, tf.cast(applies, dtype))
    c_hat = tf.math.divide_no_nan(avg_step, debias)
    return 1 + tf.abs(gap) / (c_hat + tf.cast(epsilon, dtype))


def _average_step(avg_step, ids, before, after, beta):
    """C ← β·C + (1 − β)·|after − before| (rows ``ids`` only when given)."""
    beta = tf.cast(beta, avg_step.dtype)
    step = tf.abs(after - before)
    if ids is None:
        return avg_step.assign(beta * avg_step + (1 - beta) * step)
    rows = beta * _sparse_rows.gather(avg_step, ids) + (1 - beta) * step
    return _sparse_rows.scatter_update(avg_step, ids, rows)


@keras.saving.register_keras_serializable(package="tf_async")
class GapAware(_wrapper.InnerOptimizerWrapper):
    """Wraps any Keras optimizer and divides each stale gradient by its gap.

    G = 1 + |w_now − w_read| / Ĉ per element, Ĉ the bias-corrected running
    average of the inner optimizer's step size |Δw| (Barkai et al., ICLR 2020;
    see the module docstring).

    Args:
      inner: the ``keras.optimizers.Optimizer`` to wrap (SGD with momentum /
        Nesterov, Adam, AdamW, ... — its variables, learning rate and
        iterations are the wrapper's).
      step_average: β in [0, 1) of the running average C of |Δw|.
      epsilon: ε > 0 added to Ĉ (elements that never moved).
      name: optimizer name.
    """

    def __init__(
        self,
        inner: keras.optimizers.Optimizer,
        step_average: float = 0.99,
        epsilon: float = 1e-12,
        name: Optional[str] = None,
        **kwargs,
    ):
        _wrapper.check_inner(inner)
        check_unit_interval("step_average", step_average)
        check_positive("epsilon", epsilon)
        _wrapper.reject_base_arguments("GapAware", kwargs)
        super().__init__(inner, name=name)
        self.step_average = float(step_average)
        self.epsilon = float(epsilon)

    def build(self, var_list):
        super().build(var_list)
        self._avg_steps = self.add_optimizer_variables(var_list, "avg_step")
        self._gap_applies = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", aggregation="none",
            name="gap_aware_applies",
        )

    @property
    def average_steps(self) -> list:
        """C per trainable variable (running average of |Δw|)."""
        return list(self._avg_steps)

    def _penalised(self, gradient, variable, applies):
        avg_step = self._avg_steps[self._get_variable_index(variable)]
        if _sparse_rows.is_rows(gradient):
            ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
            gap = _stale_rows_delta(variable, ids)
            if gap is None:
                return gradient
            penalty = gap_penalty(gap, _sparse_rows.gather(avg_step, ids), applies,
                                  self.step_average, self.epsilon)
            return tf.IndexedSlices(rows / penalty, ids, gradient.dense_shape)
        gap = _stale_delta(variable)
        if gap is None:
            return gradient
        gradient = tf.cast(gradient, variable.dtype)
        penalty = gap_penalty(gap, tf.convert_to_tensor(avg_step), applies,
                              self.step_average, self.epsilon)
        return gradient / penalty

    def apply(self, grads, trainable_variables=None):
        self._build_on_first_apply(trainable_variables)
        if staleness.current() is None:
            # τ = 0: exactly the inner optimizer.
            return self.inner_optimizer.apply(grads, trainable_variables)
        variables = list(
            self._trainable_variables if trainable_variables is None else trainable_variables
        )
        applies = _keras_fit.raw_variable(self._gap_applies).read_value()
        penalised, updated = [], []  # updated: (variable, C, rows or None, before)
        for variable, gradient in zip(variables, list(grads)):
            if gradient is None:
                penalised.append(None)
                continue
            raw = _keras_fit.raw_variable(variable)
            avg_step = _keras_fit.raw_variable(
                self._avg_steps[self._get_variable_index(variable)])
            if _sparse_rows.is_rows(gradient) and row_sparse.updates_only_touched_rows(
                self.inner_optimizer, variable
            ):
                ids = _sparse_rows.unique_ids(gradient)
                updated.append((raw, avg_step, ids, _sparse_rows.gather(raw, ids)))
            else:
                updated.append((raw, avg_step, None, tf.convert_to_tensor(raw)))  # sharded too
            penalised.append(self._penalised(gradient, variable, applies))
        self.inner_optimizer.apply(penalised, variables)

        def average(distribution):
            for raw, avg_step, ids, before in updated:
                after = (tf.convert_to_tensor(raw) if ids is None
                         else _sparse_rows.gather(raw, ids))
                distribution.extended.update(
                    avg_step, _average_step, args=(ids, before, after, self.step_average),
                    group=False,
                )
            counter = _keras_fit.raw_variable(self._gap_applies)
            distribution.extended.update(
                counter, lambda v: v.assign_add(tf.constant(1, tf.int64)), group=False
            )

        _wrapper.in_cross_replica(average)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "step_average": self.step_average,
            "epsilon": self.epsilon,
        }
