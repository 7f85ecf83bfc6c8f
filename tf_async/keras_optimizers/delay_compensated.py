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
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import keras
import tensorflow as tf
from keras import ops

from tf_async import _keras_fit, staleness
from tf_async.keras_optimizers._arguments import (
    check_non_negative,
    check_positive,
    check_unit_interval,
)

__all__ = ["DCSGD", "DCAdam", "AdamAsync"]


def _check_learning_rate(learning_rate: Any) -> Any:
    if isinstance(learning_rate, bool):
        raise TypeError("`learning_rate` must be a float > 0, a schedule or a callable.")
    if isinstance(learning_rate, (int, float)):
        if not learning_rate > 0:
            raise ValueError(
                f"`learning_rate` must be > 0; received learning_rate={learning_rate}."
            )
        return float(learning_rate)
    return learning_rate


def _check_dc_args(lambda_: float, meansq_momentum: float, epsilon: float) -> None:
    check_non_negative("lambda_", lambda_)
    check_unit_interval("meansq_momentum", meansq_momentum)
    check_positive("epsilon", epsilon)


def _dense(gradient):
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def _stale_delta(variable) -> Optional[tf.Tensor]:
    """``w_now − w_read`` for ``variable``, or None if its gradient is fresh.

    Decided at trace time: no published context (or a context that does not
    name this variable) means τ = 0 and no compensation is built.
    """
    context = staleness.current()
    if context is None or variable not in context:
        return None
    w_read = tf.cast(context.read_value(variable), variable.dtype)
    return ops.subtract(variable, w_read)


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
        name: Optional[str] = None,
        **kwargs,
    ):
        learning_rate = _check_learning_rate(learning_rate)
        _check_dc_args(lambda_, meansq_momentum, epsilon)
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

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._meansqs = []
        if self.adaptive:
            self._meansqs = self.add_optimizer_variables(variables, "meansq")

    def _compensated(self, gradient, variable):
        if self.lambda_ == 0:
            return gradient
        lam = ops.cast(self.lambda_, variable.dtype)
        if self.adaptive:
            gradient = _dense(gradient)
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
        gradient = _dense(gradient)
        return ops.add(
            gradient,
            ops.multiply(lam, ops.multiply(ops.square(gradient), delta)),
        )

    def update_step(self, gradient, variable, learning_rate):
        """g̃ = g + λ·g⊙g⊙(w_now − w_read); then Keras SGD with g̃."""
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
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tf_async")
class DCAdam(keras.optimizers.Adam):
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
        name: Optional[str] = None,
        **kwargs,
    ):
        learning_rate = _check_learning_rate(learning_rate)
        _check_dc_args(lambda_, 0.0, epsilon)
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if isinstance(value, numbers.Real):  # Keras also accepts tensors, callables
                check_unit_interval(arg, value)
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

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Exact global step: bumped by raw tf.Variable.assign_add once per apply.
        self._global_step = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", aggregation="none",
            name="global_step",
        )

    @property
    def global_step(self):
        """Exact number of applied updates (bias-correction step)."""
        return self._global_step

    # Keras 3.15 TF backend seam, see tf_async/_keras_fit.py
    # ("optimizers seams"): the cross-replica per-apply hook of TFOptimizer.
    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        step = _keras_fit.raw_variable(self._global_step).assign_add(1)

        def apply_grad_to_update_var(var, grad, learning_rate, step):
            return self._dc_adam_step(grad, var, learning_rate, step)

        for grad, var in grads_and_vars:
            distribution.extended.update(
                var, apply_grad_to_update_var, args=(grad, learning_rate, step),
                group=False,
            )

    def update_step(self, gradient, variable, learning_rate):
        """Fallback for callers outside the TF distributed update path."""
        return self._dc_adam_step(gradient, variable, learning_rate, self.iterations + 1)

    def _dc_adam_step(self, gradient, variable, learning_rate, step):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        local_step = ops.cast(step, variable.dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, variable.dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), local_step)

        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]

        if self.lambda_ != 0:
            delta = _stale_delta(variable)
            if delta is not None:
                gradient = _dense(gradient)
                lam = ops.cast(self.lambda_, variable.dtype)
                if self.adaptive:
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

        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(
            v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2)
        )
        if self.amsgrad:
            v_hat = self._velocity_hats[self._get_variable_index(variable)]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        self.assign_sub(
            variable,
            ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon)),
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"lambda_": self.lambda_, "adaptive": self.adaptive})
        return config


#: The name used in the project's source articles for DC-Adam.
AdamAsync = DCAdam
