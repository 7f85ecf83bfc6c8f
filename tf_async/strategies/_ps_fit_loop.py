"""The epoch loop ``model.fit`` runs under ``AsyncParameterServerStrategy``.

Keras 3's own ``fit`` cannot drive a parameter-server cluster (DESIGN.md §3b),
so this loop replaces only the part that moves data and schedules steps; the
rest is Keras': ``compile`` (losses, metrics, optimizer), ``CallbackList``
(progress bar, History, checkpoints, early stopping, TensorBoard,
BackupAndRestore), ``evaluate`` for validation.

Scheduling never blocks per step: each batch (or, with
``compile(steps_per_execution=k)``, each k batches) is one
``ClusterCoordinator.schedule`` call. Logs for callbacks are refreshed from the
parameter servers every ``log_every_steps`` steps, or by default every 2 s (one
``tf.function`` reads all metric variables in one round trip; the workers are
not stalled), and exactly at epoch end after ``coordinator.join()``.
"""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_async import _keras_fit, staleness
from tf_async.strategies import _ps_data, _ps_step_ids
from tf_async.strategies._ps_train_step import PSCounters, TrainStep


def _floats(logs: dict) -> dict:
    out = {}
    for key, value in logs.items():
        try:
            out[key] = float(np.asarray(value))
        except (TypeError, ValueError):
            out[key] = value
    return out


# Steps of one scheduled function are unrolled in groups of at most this many
# (a ``tf.while_loop`` runs the groups), as Keras' unrolled steps per execution.
UNROLL = 8


def steps_per_execution(model) -> int:
    """``compile(steps_per_execution=k)``: k >= 1 steps per scheduled function."""
    k = getattr(model, "steps_per_execution", 1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"`steps_per_execution` must be an int >= 1 under "
            f"AsyncParameterServerStrategy, got {k!r}."
        )
    return int(k)


class FitState:
    """Per-model objects kept across ``fit`` calls: counters on the PS, the
    traced step and log-reading functions, the last per-worker iterator."""

    def __init__(self, strategy, model: keras.Model):
        self.counters = PSCounters(strategy)
        self._strategy = strategy
        self._train_step = TrainStep(
            model, self.counters, strategy.max_staleness, strategy.on_nonfinite,
            look_ahead_horizon=strategy.look_ahead_horizon,
        )
        self._step_functions: dict = {}
        counters = self.counters
        self.step_ids = _ps_step_ids.StepIds()
        self.source = None
        self.iterator = None

        @tf.function
        def read_results():
            # One call: every metric and counter is read in a single round trip.
            return model.get_metrics_result(), counters.epoch_tensors()

        self.read_results = read_results

    def step_function(self, count: int):
        """The scheduled function running ``count`` consecutive steps.

        Its arguments are the per-worker iterator and the first step's id
        (``StepIds.take(count)``); step ``j`` has id ``first + j``. Each step
        reads, computes and commits on its own, exactly like ``count``
        separately scheduled steps, without the per-call overhead.
        """
        if count not in self._step_functions:
            self._step_functions[count] = self._make_step_function(count)
        return self._step_functions[count]

    def _make_step_function(self, count: int):
        strategy, replica_fn = self._strategy, self._train_step.replica_fn
        group = min(count, UNROLL)
        groups, tail = divmod(count, group)

        def run(iterator, first, n):
            for j in range(n):
                _keras_fit.run_in_single_replica_context(
                    strategy, replica_fn, first + j, next(iterator)
                )

        @tf.function
        def step_function(iterator, block, slot):
            first = _ps_step_ids.combine(block, slot)
            if groups == 1:
                run(iterator, first, group)
            else:
                def body(i):
                    run(iterator, first + i * group, group)
                    return (i + 1,)

                tf.while_loop(
                    lambda i: i < groups, body, (tf.constant(0, tf.int64),),
                    parallel_iterations=1,
                )
            if tail:
                run(iterator, first + groups * group, tail)

        return step_function

    def iterator_for(self, strategy, source, key):
        """Per-worker iterator over ``source``; reused when fit gets the same
        (infinite, repeated) dataset or dataset function, with the same
        ``class_weight``, again (``key``: the unweighted source and weights)."""
        if self.source is None or key[0] is not self.source[0] or key[1] != self.source[1]:
            self.iterator = _ps_data.per_worker_iterator(
                strategy, strategy.coordinator, source
            )
            self.source = key
        return self.iterator


def run_fit(
    strategy,
    model: keras.Model,
    x=None,
    y=None,
    batch_size=None,
    epochs: int = 1,
    verbose="auto",
    callbacks=None,
    validation_split: float = 0.0,
    validation_data=None,
    shuffle: bool = True,
    class_weight=None,
    sample_weight=None,
    initial_epoch: int = 0,
    steps_per_epoch=None,
    validation_steps=None,
    validation_batch_size=None,
    validation_freq: int = 1,
):
    """``model.fit`` on the parameter-server cluster of ``strategy``."""
    _keras_fit.assert_compile_called(model, "fit")
    strategy.check_model(model)
    if model.run_eagerly:
        raise ValueError(
            "`compile(run_eagerly=True)` is not supported by "
            "AsyncParameterServerStrategy's fit: each step is a tf.function "
            "scheduled on a remote worker, which cannot run Python eagerly. "
            "Compile with `run_eagerly=False` (the default); to debug a step "
            "eagerly, fit the same model without a strategy. (evaluate/predict "
            "run on the coordinator and do honour run_eagerly.)"
        )
    if class_weight is not None:
        class_weight = _ps_data.check_class_weight(class_weight)
    if validation_split and validation_data is None:
        (x, y, sample_weight), validation_data = _ps_data.split_validation(
            x, y, sample_weight, validation_split
        )
    per_call = steps_per_execution(model)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"`epochs` must be an int >= 0, got {epochs!r}.")
    steps, unweighted = _ps_data.steps_and_source(
        x, y, sample_weight, batch_size, steps_per_epoch, shuffle
    )
    source = _ps_data.with_class_weights(unweighted, class_weight)
    # As Keras' EpochIterator: with `steps_per_epoch` given, a finite dataset
    # (or arrays) of N batches is consumed across epochs; an epoch that reaches
    # its end stops early with Keras' warning, and the next starts a new pass.
    per_pass = _ps_data.batches_per_pass(x, batch_size) if steps_per_epoch else None
    if validation_data is not None:
        val_x, val_y, val_sample_weight = keras.utils.unpack_x_y_sample_weight(
            validation_data
        )

    coordinator = strategy.coordinator
    with strategy.scope():
        _keras_fit.symbolic_build(model, _ps_data.element_spec(source, strategy.num_workers))
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    staleness.check_worker_slots(
        model.optimizer, strategy.num_workers, "AsyncParameterServerStrategy")
    if steps_per_epoch and callable(x) and not isinstance(x, tf.data.Dataset):
        _ps_data.warn_if_fn_runs_short(
            source, strategy.num_workers, steps * max(epochs - initial_epoch, 0))
    if not model.trainable_variables:
        # As Keras' train_step: the steps run (metrics, non-trainable updates).
        warnings.warn("The model does not have any trainable weights.", stacklevel=3)

    state = strategy._fit_state(model)
    counters = state.counters
    class_weight_key = tuple(sorted(class_weight.items())) if class_weight else None
    iterator = state.iterator_for(strategy, source, key=(unweighted, class_weight_key))

    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = keras.callbacks.CallbackList(
            callbacks,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=epochs,
            steps=steps,
            model=model,
        )
    log_every = strategy.log_every_steps
    refresh_seconds = 2.0  # without log_every_steps: refresh logs by time

    def read_logs(final: bool = False) -> dict:
        results, counts = state.read_results()
        if not final and int(counts[2]) + int(counts[3]) == 0:
            return {}  # no step of this epoch has finished: nothing measured yet
        logs = _floats(results)
        logs.update(PSCounters.stats_from(*counts))
        return logs

    model.stop_training = False
    callbacks.on_train_begin()  # BackupAndRestore may restore weights here
    initial_epoch = _keras_fit.initial_epoch(model, initial_epoch)
    counters.start(int(model.optimizer.iterations.numpy()))
    training_logs = None
    seen = 0  # batches of the current pass over a finite `x` (per_pass)
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        counters.reset_epoch_stats()
        callbacks.on_epoch_begin(epoch)
        logs: dict = {}
        last_refresh = time.monotonic()
        step = 0
        epoch_steps = min(steps, per_pass - seen) if per_pass else steps
        while step < epoch_steps:
            # As in Keras: callbacks see one batch per `steps_per_execution`.
            count = min(per_call, epoch_steps - step)
            callbacks.on_train_batch_begin(step)
            coordinator.schedule(
                state.step_function(count),
                args=(iterator, *state.step_ids.take(count)),
            )
            done = step + count
            if done < epoch_steps and (
                done // log_every > step // log_every
                if log_every
                else time.monotonic() - last_refresh > refresh_seconds
            ):
                logs = read_logs()
                last_refresh = time.monotonic()
            callbacks.on_train_batch_end(done - 1, logs)
            step = done
            if model.stop_training:
                break
        if per_pass:
            if epoch_steps < steps and not model.stop_training:
                warnings.warn(_ps_data.RAN_OUT_OF_DATA, stacklevel=3)
            seen += step
            if seen >= per_pass:
                seen = 0
        coordinator.join()
        epoch_logs = read_logs(final=True)
        if validation_data is not None and _keras_fit.should_eval(
            model, epoch, validation_freq
        ):
            val_logs = model.evaluate(
                x=val_x,
                y=val_y,
                sample_weight=val_sample_weight,
                batch_size=validation_batch_size or batch_size,
                steps=validation_steps,
                callbacks=callbacks,
                return_dict=True,
            )
            epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        training_logs = epoch_logs
        if model.stop_training:
            break
    coordinator.join()
    if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
        # As Keras' fit: e.g. `use_ema=True` copies the averages into the
        # weights (eagerly, on the coordinator: the variables are on the PS).
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=training_logs)
    return model.history


def _chief_data(x, steps, method: str):
    """``x`` as Keras' own ``evaluate``/``predict`` on the coordinator takes it.

    A dataset function (``fn()`` or ``fn(input_context)``, as ``fit`` takes)
    is called once here with a one-pipeline ``InputContext`` (the whole data
    on the coordinator); ``steps`` is required when its dataset is infinite or
    of unknown size. A ``tf.distribute`` distributed dataset is refused with
    what to pass instead.
    """
    _ps_data.check_not_distributed(x, method)
    if callable(x) and not isinstance(x, tf.data.Dataset):
        dataset = _ps_data.call_dataset_fn(x, num_input_pipelines=1, input_pipeline_id=0)
        if steps is None and _ps_data.cardinality(dataset) < 0:
            raise ValueError(
                f"`steps` is required when `x` of `{method}` is a dataset function "
                "whose dataset is infinite or of unknown size (as tf-keras' "
                "DatasetCreator required), e.g. "
                f"`model.{method}(dataset_fn, steps=10)`."
            )
        return dataset
    return x


def _replace_x(args, kwargs, method: str):
    args, kwargs = list(args), dict(kwargs)
    if args:
        x = args[0]
        steps = kwargs.get("steps", args[3] if method == "predict" and len(args) > 3
                           else args[5] if method == "evaluate" and len(args) > 5 else None)
        args[0] = _chief_data(x, steps, method)
    elif "x" in kwargs:
        kwargs["x"] = _chief_data(kwargs["x"], kwargs.get("steps"), method)
    return args, kwargs


def run_on_chief(strategy, model, original, *args, method: str = "evaluate", **kwargs):
    """Runs Keras' own ``evaluate``/``predict`` on the coordinator.

    The model's variables stay on the parameter servers and are read remotely;
    the step is traced under TF's default strategy, so Keras' loop (data
    adapters, callbacks, progress bar) works unchanged. Training steps in
    flight are joined first, so results reflect every scheduled step.

    * An optimizer not built yet (``evaluate`` before any ``fit``) is built
      here inside the strategy's scope, so its slots go to the parameter
      servers like ``fit`` puts them (Keras would build it on the chief).
    * ``compile(jit_compile=True)`` is not applied to the coordinator's step:
      an XLA cluster cannot read variables living on another task (the
      parameter servers); the step runs as a plain ``tf.function``.
    """
    strategy.check_model(model, method)
    args, kwargs = _replace_x(args, kwargs, method)
    strategy.coordinator.join()
    if model.built and model.optimizer is not None and not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
    saved = {
        name: getattr(model, name)
        for name in ("train_function", "test_function", "predict_function")
    }
    saved_jit = model.jit_compile
    cached = strategy._chief_functions.setdefault(id(model), {})
    for name in ("test_function", "predict_function"):
        setattr(model, name, cached.get(name))
    _keras_fit.set_model_strategy(model, _keras_fit.default_strategy())
    try:
        model.jit_compile = False
        with _keras_fit.outside_strategy_scopes():
            return original(*args, **kwargs)
    finally:
        model.jit_compile = saved_jit
        _keras_fit.set_model_strategy(model, strategy)
        for name in ("test_function", "predict_function"):
            cached[name] = getattr(model, name)
        for name, value in saved.items():
            setattr(model, name, value)
