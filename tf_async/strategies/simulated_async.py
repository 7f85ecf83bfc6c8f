"""M asynchronous workers simulated deterministically on one device.

``SimulatedAsyncStrategy`` is a ``tf.distribute.OneDeviceStrategy`` under which
``model.compile`` + ``model.fit`` train as M asynchronous workers would: the
gradient of step t is computed at the weights as they were τ_t updates ago and
applied to the current weights (DESIGN.md §5)::

    "round_robin"  τ_t = min(M − 1, max_staleness, t)      (worker k of M reads,
                   the M − 1 others apply, then k applies)
    "random"       τ_t = min(U{0 … max_staleness}, t), drawn from a stateless
                   generator keyed by (seed, t): deterministic for a seed.

How (one seam, pinned in ``tests/test_keras_seams.py``): Keras' ``fit`` calls
``strategy.run(model.train_step, ...)``. ``run`` recognises that call and runs
the step with

1. ring[t mod K] ← w (K = max_staleness + 1 snapshot slots per variable; one
   ``[K, *shape]`` ``tf.Variable`` each, created once, never grown);
2. w ← ring[(t − τ) mod K] for the forward and backward pass;
3. inside ``optimizer.apply_gradients`` / ``apply`` (wrapped on the instance
   while the step is traced): w ← live value, then the optimizer applies under
   ``tf_async.staleness.publish(τ, w, w_read)``, so delay-compensating
   optimizers see τ and the weights the gradient was computed at.

A step whose gradients or loss hold NaN/Inf is not applied (``on_nonfinite``,
:mod:`_nonfinite`): the apply runs under ``tf.cond``; a skipped step changes
no weight, optimizer state, ``iterations``, step counter t, τ statistic or
metric (the metric variables are restored), and counts in
``nonfinite_skipped`` (total since the strategy was created).

Look-ahead (DANA, :mod:`tf_async.keras_optimizers.look_ahead`): if the
optimizer predicts weights (``tf_async.staleness.predicts_weights``), step 1
stores its prediction of the weights ``h`` updates ahead (``h`` = the expected
staleness: ``max_staleness`` for ``"round_robin"``, ``max_staleness / 2`` for
``"random"``), made from the live weights and the optimizer state at that
step; the gradient τ steps later is computed at that prediction, which is also
the step's published ``w_read`` (one snapshot per step, as before).

Worker: step t is simulated worker t mod M's (round robin: the worker that
read τ = M − 1 updates ago; ``"random"``: the same index, τ drawn
independently); it is published with τ (``staleness.current_worker()``), so an
optimizer with per-worker state (DANA-Zero) updates that worker's buffer. Such
an optimizer's ``num_workers`` must be M (checked when ``fit`` starts).

Everything is graph code (no Python at step time), so ``jit_compile=True``
works. ``staleness_mean`` and ``staleness_max`` (over the applied steps of the
current epoch, like the parameter-server strategy) are added to the step's
logs and so reach the progress bar and ``History``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from tf_async import _keras_fit, staleness
from tf_async.staleness import check_max_staleness
from tf_async.strategies import _nonfinite

__all__ = ["SimulatedAsyncStrategy"]

STALENESS_MODES = ("round_robin", "random")


def _split_apply_call(name: str, args: tuple, kwargs: dict):
    """``(gradients, args, kwargs)`` of a call to Keras'
    ``optimizer.apply_gradients(grads_and_vars)`` or
    ``optimizer.apply(grads, trainable_variables=None)``; an iterator of
    pairs is turned into a list so the call can still consume it."""
    kwargs = dict(kwargs)
    key = "grads_and_vars" if name == _keras_fit.APPLY_GRADIENTS_NAME else "grads"
    first = list(args[0] if args else kwargs.pop(key))
    gradients = [g for g, _ in first] if key == "grads_and_vars" else first
    return gradients, (first, *args[1:]), kwargs


class _SimState:
    """Ring buffers and counters for one model's trainable variables."""

    def __init__(self, variables: List[tf.Variable], slots: int):
        self.variables = variables
        self.slots = slots
        self.rings = [
            tf.Variable(
                tf.stack([v.read_value()] * slots),
                trainable=False,
                name=f"stale_snapshots_{i}",
            )
            for i, v in enumerate(variables)
        ]
        self.step = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="sim_step")
        # Per epoch (reset by the fit hook's callback at each epoch's start).
        self.tau_sum = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="tau_sum")
        self.tau_max = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="tau_max")
        self.epoch_steps = tf.Variable(
            tf.constant(0, tf.int64), trainable=False, name="epoch_steps")
        self.nonfinite = tf.Variable(
            tf.constant(0, tf.int64), trainable=False, name="nonfinite_skipped"
        )


class _EpochStaleness(keras.callbacks.Callback):
    """Resets the strategy's per-epoch staleness statistics of one model."""

    def __init__(self, strategy, model):
        super().__init__()
        self._strategy = strategy
        self._model_id = id(model)
        self._target = model

    def on_epoch_begin(self, epoch, logs=None):
        self._strategy.reset_epoch_staleness(self._target)


class SimulatedAsyncStrategy(tf.distribute.OneDeviceStrategy):
    """One-device strategy that trains like ``num_workers`` async workers.

    Args:
      num_workers: M >= 1 simulated workers (M = 1 is plain training).
      staleness: ``"round_robin"`` (τ = M − 1) or ``"random"`` (τ uniform in
        [0, max_staleness]).
      max_staleness: bound on τ (int >= 0); ``None`` means M − 1.
      seed: seed of the ``"random"`` staleness sequence.
      device: the one device to run on.
      on_nonfinite: ``"skip"`` (default) — a step with NaN/Inf gradients or
        loss is not applied and counts in ``nonfinite_skipped``; ``"raise"`` —
        ``fit`` stops with ``tf_async.strategies.NonFiniteStepError`` naming
        the step t and the simulated worker (t mod M).
    """

    def __init__(
        self,
        num_workers: int,
        staleness: str = "round_robin",
        max_staleness: Optional[int] = None,
        seed: int = 0,
        device: str = "/cpu:0",
        on_nonfinite: str = "skip",
    ):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int):
            raise TypeError(f"`num_workers` must be an int >= 1; received {num_workers!r}.")
        if num_workers < 1:
            raise ValueError(f"`num_workers` must be >= 1; received num_workers={num_workers}.")
        if staleness not in STALENESS_MODES:
            raise ValueError(
                f"`staleness` must be one of {STALENESS_MODES}; received staleness={staleness!r}."
            )
        check_max_staleness(max_staleness)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int; received seed={seed!r}.")
        self._on_nonfinite = _nonfinite.check_on_nonfinite(on_nonfinite)
        super().__init__(device)
        _keras_fit.install_trainer_dispatch()  # for _tf_async_fit
        self._num_workers = num_workers
        self._staleness_mode = staleness
        bound = num_workers - 1 if max_staleness is None else max_staleness
        if staleness == "round_robin":
            bound = min(bound, num_workers - 1)
        self._max_staleness = bound
        self._seed = seed
        self._states: Dict[Tuple[int, Tuple[int, ...]], _SimState] = {}

    # ------------------------------------------------------------------ info
    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def staleness_mode(self) -> str:
        return self._staleness_mode

    @property
    def max_staleness(self) -> int:
        """Largest τ this strategy produces; the ring keeps this + 1 snapshots."""
        return self._max_staleness

    @property
    def on_nonfinite(self) -> str:
        return self._on_nonfinite

    @property
    def snapshot_variables(self) -> List[tf.Variable]:
        """All ring-buffer variables (``[max_staleness + 1, *shape]`` each)."""
        return [ring for state in self._states.values() for ring in state.rings]

    # ------------------------------------------------------------------ run
    def _tf_async_fit(self, model, original, *args, **kwargs):
        """Keras' own ``fit``; an ``on_nonfinite="raise"`` failure becomes a
        ``NonFiniteStepError`` instead of a TF assertion trace."""
        staleness.check_worker_slots(
            model.optimizer, self._num_workers, type(self).__name__)
        args, kwargs = self._with_epoch_callback(model, original, args, kwargs)
        try:
            return original(*args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            where = f" of {self._num_workers} simulated"
            nonfinite = _nonfinite.from_tf_error(error, where)
            if nonfinite is None:
                raise
            raise nonfinite from None

    def _with_epoch_callback(self, model, original, args, kwargs):
        """``fit``'s arguments with a callback that starts each epoch's
        staleness statistics from zero."""
        return _keras_fit.fit_with_callback(original, args, kwargs, _EpochStaleness(self, model))

    def reset_epoch_staleness(self, model) -> None:
        """Starts ``staleness_mean`` / ``staleness_max`` of ``model`` from zero."""
        for (model_id, _), state in self._states.items():
            if model_id == id(model):
                state.tau_sum.assign(0)
                state.tau_max.assign(0)
                state.epoch_steps.assign(0)

    @property
    def look_ahead_horizon(self) -> float:
        """``h`` of a weight-predicting optimizer: the expected τ."""
        if self._staleness_mode == "round_robin":
            return float(self._max_staleness)
        return self._max_staleness / 2.0

    def run(self, fn, args=(), kwargs=None, options=None):
        model = _keras_fit.keras_train_step_model(fn)
        if model is not None and model.trainable_variables:
            fn = self._stale_train_step(model, fn)
        return super().run(fn, args=args, kwargs=kwargs, options=options)

    def _state_for(self, model: keras.Model) -> Tuple[_SimState, list]:
        keras_variables = list(model.trainable_variables)
        raw = [_keras_fit.raw_variable(v) for v in keras_variables]
        key = (id(model), tuple(_keras_fit.variable_key(v) for v in raw))
        state = self._states.get(key)
        if state is None:
            with tf.init_scope(), self.scope():
                state = _SimState(raw, self._max_staleness + 1)
            self._states[key] = state
        return state, keras_variables

    def _draw_tau(self, step: tf.Tensor) -> tf.Tensor:
        if self._staleness_mode == "round_robin":
            tau = tf.constant(self._max_staleness, tf.int64)
        else:
            seed = tf.stack([tf.constant(self._seed, tf.int64), step])
            tau = tf.random.stateless_uniform(
                [], seed=seed, minval=0, maxval=self._max_staleness + 1, dtype=tf.int64
            )
        return tf.minimum(tau, step)

    def _stale_train_step(self, model: keras.Model, train_step):
        staleness.check_worker_slots(model.optimizer, self._num_workers, type(self).__name__)
        state, keras_variables = self._state_for(model)

        @tf.autograph.experimental.do_not_convert
        def stale_train_step(*args, **kwargs):
            step = state.step.read_value()
            tau = self._draw_tau(step)
            worker = tf.math.floormod(step, self._num_workers)  # whose gradient applies
            slots = tf.constant(state.slots, tf.int64)
            live_slot = tf.math.floormod(step, slots)
            stale_slot = tf.math.floormod(step - tau, slots)
            optimizer = model.optimizer
            horizon = self.look_ahead_horizon
            predicting = horizon > 0 and staleness.predicts_weights(optimizer)
            live, stale_values = [], []
            for keras_variable, variable, ring in zip(
                    keras_variables, state.variables, state.rings):
                value = variable.read_value()
                snapshot = value
                if predicting:  # the weights this step's read would compute at
                    snapshot = staleness.predicted_read(
                        optimizer, keras_variable, value, horizon)
                ring.scatter_update(tf.IndexedSlices(snapshot[None], live_slot[None]))
                live.append(value)
                stale_values.append(tf.gather(ring, stale_slot))
            for variable, value in zip(state.variables, stale_values):
                variable.assign(value)

            restored = []

            def restore():
                if not restored:
                    for variable, value in zip(state.variables, live):
                        variable.assign(value)
                    restored.append(True)

            publishing = []
            losses = []  # the step's (scaled) loss, seen by scale_loss
            finite_flags = []
            metric_variables = [_keras_fit.raw_variable(v) for v in model.metrics_variables]
            metric_values = [v.read_value() for v in metric_variables]

            def guarded(name, method_args, method_kwargs, method):
                gradients, method_args, method_kwargs = _split_apply_call(
                    name, method_args, method_kwargs)
                finite = _nonfinite.all_finite(list(gradients) + losses)
                finite_flags.append(finite)
                checks = []
                if self._on_nonfinite == "raise":
                    checks.append(_nonfinite.assert_finite(
                        finite, step, worker))

                def apply():
                    method(*method_args, **method_kwargs)
                    return tf.constant(True)

                with tf.control_dependencies(checks):
                    return tf.cond(finite, apply, lambda: tf.constant(False))

            def stale(name, method):
                def wrapper(*method_args, **method_kwargs):
                    if publishing:  # apply_gradients -> apply: publish once
                        return method(*method_args, **method_kwargs)
                    restore()
                    publishing.append(True)
                    try:
                        with staleness.publish(tau, keras_variables, stale_values,
                                               worker=worker):
                            return guarded(name, method_args, method_kwargs, method)
                    finally:
                        publishing.pop()

                return wrapper

            def scale_loss(method):
                def wrapper(loss):
                    losses.append(loss)
                    return method(loss)

                return wrapper

            names = _keras_fit.OPTIMIZER_APPLY_NAMES
            wrapped = {name: stale(name, getattr(optimizer, name)) for name in names}
            wrapped[_keras_fit.SCALE_LOSS_NAME] = scale_loss(
                getattr(optimizer, _keras_fit.SCALE_LOSS_NAME))
            vars(optimizer).update(wrapped)
            try:
                logs = train_step(*args, **kwargs)
            finally:
                for name in wrapped:
                    vars(optimizer).pop(name, None)
            restore()

            finite = finite_flags[0] if finite_flags else tf.constant(True)
            applied = tf.cast(finite, tf.int64)

            def restore_metrics():  # a skipped step's batch never existed
                for variable, value in zip(metric_variables, metric_values):
                    variable.assign(value)
                return tf.constant(True)

            tf.cond(finite, lambda: tf.constant(True), restore_metrics)
            state.step.assign_add(applied)
            applied_steps = state.epoch_steps.assign_add(applied)
            tau_sum = state.tau_sum.assign_add(tau * applied)
            tau_max = state.tau_max.assign(
                tf.maximum(state.tau_max.read_value(), tau * applied))
            nonfinite = state.nonfinite.assign_add(1 - applied)
            logs = dict(logs)
            results = model.get_metrics_result()  # after a restore
            logs.update({key: value for key, value in results.items() if key in logs})
            logs["staleness_mean"] = tf.cast(tau_sum, tf.float32) / tf.cast(
                tf.maximum(applied_steps, 1), tf.float32)
            logs["staleness_max"] = tf.cast(tau_max, tf.float32)
            logs["nonfinite_skipped"] = tf.cast(nonfinite, tf.float32)
            return logs

        return stale_train_step
