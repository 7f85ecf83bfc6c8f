"""DANA-Zero: one momentum buffer per worker, look-ahead by their sum.

Hakimi, Barkai, Gabel, Schuster, "Taming Momentum in a Distributed
Asynchronous Environment" (arXiv 1907.11612), algorithm DANA-Zero: the master
keeps a momentum buffer v^i for every worker i. When worker i's gradient g
arrives::

    v^i ← γ·v^i + g;   θ ← θ − η·v^i

and the weights sent back to worker i (where its next gradient is computed)
are the look-ahead θ̂ = θ − η·γ·Σ_j v^j: every worker's next momentum step,
which is what the other workers' pending updates will (mostly) apply before
worker i's gradient lands.

Implemented (Keras' momentum form, so one worker equals Keras exactly)::

    DanaZeroSGD   m^i ← μ·m^i − lr·g;   w ← w + m^i;   S = Σ_j m^j
                  ŵ = w + μ·S
    DanaZeroAdam  m^i ← m^i + (1 − β1)·(g − m^i)   (per worker)
                  v   ← v + (1 − β2)·(g² − v)       (shared)
                  w   ← w − α_t·m^i/(√v + ε),  α_t = lr·√(1 − β2^t)/(1 − β1^t),
                        t = the exact global step (all workers' applies)
                  ŵ = w − α_{t+1}·β1·S/(√v + ε),  S = Σ_j m^j,
                        t = applies so far

With a constant learning rate m^i = −lr·v^i, so DanaZeroSGD is the paper's
DANA-Zero; with a schedule the learning rate sits inside the buffer (Keras'
form) instead of multiplying it at apply time. The Adam variant's look-ahead
is each worker's next Adam step with an unknown (zero) gradient, as the SGD
one is each worker's next momentum step; its bias correction uses the global
step t, not worker i's own number of applies (so while t/M is small the
per-worker first moments are under-corrected, a warm-up of about
M/(1 − β1) steps).

State: per variable one ``[num_workers, *shape]`` slot (row i is worker i's
buffer, read and written as one row per step: O(size), not O(M·size)) and a
running sum S (``+= new − old`` on every apply, the atomic
AssignAddVariableOp on a parameter server: only worker i writes row i, so
concurrent applies of different workers keep S = Σ_j m^j up to rounding).
For a variable split over parameter servers (``variable_partitioner``) the
buffers are one ``[num_workers, *shard.shape]`` slot per shard, on the
shard's server (worker i's buffer: row i of each, concatenated), and S is
partitioned like the variable. The prediction reads S only. Adam also keeps
v and an exact int64 ``global_step``. Row-sparse (embedding) gradients are densified: every
worker's buffer row of the table decays as in Keras' momentum semantics.

Seam (``tf_async.staleness``): the worker is ``staleness.current_worker()``
(published by the strategy, 0 without one); ``worker_slots`` = num_workers
lets a strategy check it matches its worker count at ``fit`` start;
``predict_weights`` is the look-ahead the strategy computes the gradient at
(``h`` is not used: Σ_j already covers every pending worker; a strategy with
h = 0, i.e. no expected staleness, asks for no prediction).

Without a strategy (or any strategy publishing no worker) every step is
worker 0's: with ``num_workers=1`` DanaZeroSGD is ``keras.optimizers.SGD(lr,
momentum)`` and DanaZeroAdam ``keras.optimizers.Adam(lr, ...)`` bit for bit
(same arithmetic in the same order; the buffers are rows of a ``[1, *shape]``
slot).
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import tensorflow as tf
from keras import ops

from tf_async import _keras_fit, staleness
from tf_async.keras_optimizers import _sparse_rows
from tf_async.keras_optimizers._arguments import (
    check_learning_rate,
    check_positive,
    check_unit_interval,
)
from tf_async.keras_optimizers._exact_step import ExactGlobalStep
from tf_async.keras_optimizers.lazy import adam_alpha

__all__ = ["DanaZeroSGD", "DanaZeroAdam", "check_num_workers"]


def check_num_workers(num_workers: Any) -> int:
    """``num_workers``: an int >= 1 (ValueError otherwise, naming the range)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(
            "`num_workers` must be an int >= 1 (the number of asynchronous workers, "
            f"one momentum buffer each); received num_workers={num_workers!r}."
        )
    return num_workers


class _WorkerMomenta:
    """Mixin: per-worker momentum slots, their running sum and the row access."""

    predicts_weights = True

    @property
    def worker_slots(self) -> int:
        """Workers with a momentum buffer (``tf_async.staleness.worker_slots``)."""
        return self.num_workers

    def _build_worker_momenta(self, var_list) -> None:
        self._worker_momentums, self._momentum_sums = [], []
        for variable in var_list:
            if getattr(variable, "overwrite_with_gradient", False):
                self._worker_momentums.append(None)
                self._momentum_sums.append(None)
                continue
            name = variable.path.replace("/", "_")
            # One slot per part: the variable, or each shard of one split over
            # parameter servers (``variable_partitioner``), colocated with it.
            parts = (_keras_fit.variable_shards(variable)
                     or [_keras_fit.raw_variable(variable)])
            slots = []
            for k, part in enumerate(parts):
                suffix = f"_shard_{k}" if len(parts) > 1 else ""
                with self._distribution_strategy.extended.colocate_vars_with(part):
                    slots.append(self.add_variable(
                        shape=(self.num_workers, *part.shape), dtype=variable.dtype,
                        initializer="zeros", name=f"worker_momentums_{name}{suffix}",
                    ))
            self._worker_momentums.append(slots)
            self._momentum_sums.append(
                self.add_variable_from_reference(variable, "momentum_sum"))

    @property
    def worker_momentums(self) -> list:
        """Per trainable variable the ``[num_workers, *shape]`` buffers; for a
        variable split over parameter servers a list, per shard the
        ``[num_workers, *shard.shape]`` buffers on that shard's server."""
        return [slots if slots is None or len(slots) > 1 else slots[0]
                for slots in self._worker_momentums]

    @property
    def momentum_sums(self) -> list:
        """Per trainable variable S = Σ_j (worker j's buffer)."""
        return list(self._momentum_sums)

    def _worker_row(self, variable):
        """(slots, worker, worker's buffer) for ``variable``'s update; a sharded
        variable's buffer is its rows of every shard's slot, concatenated."""
        slots = self._worker_momentums[self._get_variable_index(variable)]
        worker = staleness.current_worker()
        rows = [tf.gather(_keras_fit.raw_variable(slot), worker) for slot in slots]
        return slots, worker, rows[0] if len(rows) == 1 else tf.concat(rows, axis=0)

    def _store_row(self, variable, slots, worker, old, new) -> None:
        """Worker's buffer ← ``new`` (split by shard); S += new − old."""
        parts = [new] if len(slots) == 1 else tf.split(
            new, [int(slot.shape[1]) for slot in slots], axis=0)
        for slot, part in zip(slots, parts):
            raw = _keras_fit.raw_variable(slot)
            raw.scatter_update(tf.IndexedSlices(part[None], worker[None]))
        total = self._momentum_sums[self._get_variable_index(variable)]
        self.assign_add(total, ops.subtract(new, old))

    def _sum(self, variable, ids):
        total = self._momentum_sums[self._get_variable_index(variable)]
        if ids is None:
            return tf.convert_to_tensor(_keras_fit.raw_variable(total))
        return _sparse_rows.gather(total, ids)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_workers": self.num_workers}


def _dense(gradient, variable):
    if _sparse_rows.is_rows(gradient):
        ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
        gradient = _sparse_rows.densify(ids, rows, variable)
    return ops.cast(gradient, variable.dtype)


@keras.saving.register_keras_serializable(package="tf_async")
class DanaZeroSGD(_WorkerMomenta, keras.optimizers.Optimizer):
    """DANA-Zero momentum SGD: a momentum buffer per worker, stale gradients
    computed at ŵ = w + μ·Σ_j m^j (see the module docstring).

    Args:
      learning_rate: float > 0, a schedule or a callable.
      momentum: μ in [0, 1).
      num_workers: int >= 1, the asynchronous workers (must equal the
        strategy's worker count; 1 without a strategy).
      name, **kwargs: as ``keras.optimizers.Optimizer`` (``weight_decay``,
        ``clipnorm``, ...).
    """

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.9,
                 num_workers: int = 1, name: Optional[str] = None, **kwargs):
        learning_rate = check_learning_rate(learning_rate)
        if isinstance(momentum, int) and not isinstance(momentum, bool):
            momentum = float(momentum)
        check_unit_interval("momentum", momentum)
        num_workers = check_num_workers(num_workers)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.num_workers = num_workers
        self.momentum = float(momentum)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._build_worker_momenta(variables)

    def update_step(self, gradient, variable, learning_rate):
        """m^i ← μ·m^i − lr·g; w ← w + m^i (Keras SGD's arithmetic, on row i)."""
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = _dense(gradient, variable)
        slots, worker, m = self._worker_row(variable)
        momentum = ops.cast(self.momentum, variable.dtype)
        new = ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate))
        self._store_row(variable, slots, worker, m, new)
        self.assign_add(variable, new)

    def predict_weights(self, variable, value, horizon, ids=None):
        """ŵ = value + μ·S (S = Σ_j m^j; its rows ``ids`` for a table read by rows)."""
        del horizon  # Σ_j covers every pending worker
        dtype = value.dtype
        return value + tf.cast(self.momentum, dtype) * tf.cast(self._sum(variable, ids), dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum}


@keras.saving.register_keras_serializable(package="tf_async")
class DanaZeroAdam(ExactGlobalStep, _WorkerMomenta, keras.optimizers.Optimizer):
    """DANA-Zero Adam: a first moment per worker, one shared second moment,
    stale gradients computed at ŵ = w − α·β1·Σ_j m^j/(√v + ε) (module docstring).

    Args:
      learning_rate, beta_1, beta_2, epsilon: as ``keras.optimizers.Adam``
        (no AMSGrad).
      num_workers: int >= 1, the asynchronous workers (must equal the
        strategy's worker count; 1 without a strategy).
      name, **kwargs: as ``keras.optimizers.Optimizer`` (``weight_decay``
        gives AdamW's decoupled decay, ``clipnorm``, ...).
    """

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, num_workers: int = 1,
                 name: Optional[str] = None, **kwargs):
        learning_rate = check_learning_rate(learning_rate)
        check_unit_interval("beta_1", beta_1)
        check_unit_interval("beta_2", beta_2)
        check_positive("epsilon", epsilon)
        num_workers = check_num_workers(num_workers)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.num_workers = num_workers
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._build_worker_momenta(var_list)
        self._velocities = self.add_optimizer_variables(var_list, "velocity")
        self._build_global_step()

    def _update_step_at(self, gradient, variable, learning_rate, step):
        """Keras Adam's arithmetic with worker i's first moment (row i)."""
        gradient = _dense(gradient, variable)
        alpha = adam_alpha(self, variable.dtype, learning_rate, step)
        slots, worker, m = self._worker_row(variable)
        v = self._velocities[self._get_variable_index(variable)]
        new = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self._store_row(variable, slots, worker, m, new)
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        self.assign_sub(
            variable, ops.divide(ops.multiply(new, alpha), ops.add(ops.sqrt(v), self.epsilon)))

    def predict_weights(self, variable, value, horizon, ids=None):
        """ŵ = value − α_{t+1}·β1·S/(√v + ε), t = applies so far."""
        del horizon  # Σ_j covers every pending worker
        dtype = value.dtype
        step = _keras_fit.raw_variable(self._global_step).read_value() + 1
        alpha = adam_alpha(self, dtype, self.learning_rate, step)
        v = self._velocities[self._get_variable_index(variable)]
        v = (tf.convert_to_tensor(_keras_fit.raw_variable(v)) if ids is None
             else _sparse_rows.gather(v, ids))
        total = tf.cast(self._sum(variable, ids), dtype)
        step_ahead = alpha * tf.cast(self.beta_1, dtype) * total
        return value - step_ahead / (tf.sqrt(tf.cast(v, dtype)) + tf.cast(self.epsilon, dtype))

    def get_config(self) -> dict:
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon}
