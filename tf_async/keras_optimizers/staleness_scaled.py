"""Staleness-aware step scaling for any Keras optimizer (Zhang et al., IJCAI 2016).

``StalenessScaled(inner, policy)`` lets ``inner`` compute its update
Δ = w_after − w_before exactly as it would (moments, momentum, weight decay,
clipping: all of ``inner.apply``) and then keeps only f(τ)·Δ::

    "inverse"        f(τ) = 1 / max(1, τ)        (Zhang et al.: lr / τ)
    "inverse_sqrt"   f(τ) = 1 / sqrt(max(1, τ))
    "exp"            f(τ) = exp(−β τ),  β in [0, 1)

Scaling the *step*, not the gradient, is what matters for Adam-like inners:
Adam is invariant to the gradient's scale, so a scaled gradient would change
nothing. For SGD and Adam this is exactly the staleness-dependent learning
rate lr·f(τ) (momentum buffers still see the full gradient).

τ comes from ``tf_async.staleness``. With no published context (synchronous
training) the wrapper calls ``inner.apply`` and nothing else, so it equals the
inner optimizer exactly. The excess (1 − f)·Δ is removed with one
``assign_sub`` per variable through ``strategy.extended.update``.

An embedding table with a row-sparse gradient whose inner optimizer changes
only the touched rows (``row_sparse.updates_only_touched_rows``: SGD(),
Adagrad, LazyAdam, ...) is scaled on those rows only (read before, one
``scatter_sub`` after); otherwise the whole table, as the inner update is.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tf_async import _keras_fit, staleness
from tf_async.keras_optimizers import _sparse_rows, _wrapper, row_sparse
from tf_async.keras_optimizers._arguments import check_unit_interval

__all__ = ["StalenessScaled", "POLICIES"]

POLICIES = ("inverse", "inverse_sqrt", "exp")


def staleness_factor(tau, policy: str, beta: float = 0.0) -> tf.Tensor:
    """f(τ) as a float32 scalar tensor for the named policy."""
    tau = tf.cast(tau, tf.float32)
    if policy == "inverse":
        return 1.0 / tf.maximum(1.0, tau)
    if policy == "inverse_sqrt":
        return tf.math.rsqrt(tf.maximum(1.0, tau))
    if policy == "exp":
        return tf.exp(-float(beta) * tau)
    raise ValueError(f"`policy` must be one of {POLICIES}; received policy={policy!r}.")


def _shrink(variable, before, keep, ids=None):
    """variable -= (1 − keep) · (variable − before)   (keeps keep·Δ); on rows
    ``ids`` only when given."""
    keep = tf.cast(keep, variable.dtype)
    if ids is not None:
        excess = (1 - keep) * (_sparse_rows.gather(variable, ids) - before)
        return _sparse_rows.scatter_sub(variable, ids, excess)
    excess = (1 - keep) * (tf.convert_to_tensor(variable) - before)  # sharded too
    return variable.assign_sub(excess)


@keras.saving.register_keras_serializable(package="tf_async")
class StalenessScaled(_wrapper.InnerOptimizerWrapper):
    """Wraps any Keras optimizer and scales its step by f(τ).

    Args:
      inner: the ``keras.optimizers.Optimizer`` to wrap (its variables,
        learning rate and iterations are the wrapper's).
      policy: ``"inverse"`` (1/max(1,τ)), ``"inverse_sqrt"`` or ``"exp"``
        (exp(−βτ)).
      beta: β in [0, 1) for ``"exp"``.
      name: optimizer name.
    """

    def __init__(
        self,
        inner: keras.optimizers.Optimizer,
        policy: str = "inverse",
        beta: float = 0.5,
        name: Optional[str] = None,
        **kwargs,
    ):
        _wrapper.check_inner(inner)
        if policy not in POLICIES:
            raise ValueError(
                f"`policy` must be one of {POLICIES}; received policy={policy!r}."
            )
        check_unit_interval("beta", beta)
        _wrapper.reject_base_arguments("StalenessScaled", kwargs)
        super().__init__(inner, name=name)
        self.policy = policy
        self.beta = float(beta)

    def factor(self, tau) -> tf.Tensor:
        """f(τ) of this wrapper's policy."""
        return staleness_factor(tau, self.policy, self.beta)

    def apply(self, grads, trainable_variables=None):
        self._build_on_first_apply(trainable_variables)
        context = staleness.current()
        if context is None:
            # τ = 0: exactly the inner optimizer.
            return self.inner_optimizer.apply(grads, trainable_variables)
        variables = list(
            self._trainable_variables if trainable_variables is None else trainable_variables
        )
        grads = list(grads)
        updated = []  # (tf variable, value before, rows or None)
        for variable, gradient in zip(variables, grads):
            if gradient is None:
                continue
            raw = _keras_fit.raw_variable(variable)
            if _sparse_rows.is_rows(gradient) and row_sparse.updates_only_touched_rows(
                self.inner_optimizer, variable
            ):
                ids = _sparse_rows.unique_ids(gradient)
                updated.append((raw, _sparse_rows.gather(raw, ids), ids))
            else:
                updated.append((raw, tf.convert_to_tensor(raw), None))
        keep = self.factor(context.tau)
        self.inner_optimizer.apply(grads, variables)

        def rescale(distribution):
            for variable, value, ids in updated:
                distribution.extended.update(
                    variable, _shrink, args=(value, keep, ids), group=False
                )

        _wrapper.in_cross_replica(rescale)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "policy": self.policy,
            "beta": self.beta,
        }
