"""AsyncParameterServerStrategy: asynchronous parameter-server training with
Keras 3 ``model.fit``, staleness measured per step and optionally bounded.

Variables (and optimizer slots, colocated by Keras' TF optimizer) live on the
parameter servers; every batch is one step scheduled on whichever worker is
free (``ClusterCoordinator.schedule``), so a slow worker does not hold the
others back. TF's gRPC runtime does all communication.

Per step τ = number of updates other workers applied between this step's read
of the weights and its apply (Recht et al. 2011 "Hogwild!"; Ho et al. 2013
"More effective distributed ML via a stale synchronous parameter server" for
the bound). τ and the weights read are published to the optimizer through
:mod:`tf_async.staleness`, and ``staleness_mean`` / ``staleness_max`` per epoch
go to History, the progress bar and TensorBoard. See ``_ps_train_step`` for
the step and the bounded-staleness (SSP) protocol.
"""

from __future__ import annotations

import re
from typing import Optional

import tensorflow as tf

from tf_async import _keras_fit, _rows
from tf_async.staleness import check_max_staleness
from tf_async.strategies import _nonfinite, _ps_eval, _ps_fit_loop

__all__ = ["AsyncParameterServerStrategy"]


def _check_horizon(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"`look_ahead_horizon` must be None or a float >= 0, got {value!r}.")
    return float(value)


def _check_cluster(cluster_resolver) -> int:
    if cluster_resolver is None:
        raise ValueError(
            "`cluster_resolver` is required, e.g. tf_async.local_cluster(workers=2, "
            "ps=1) or tf.distribute.cluster_resolver.TFConfigClusterResolver()."
        )
    jobs = cluster_resolver.cluster_spec().as_dict()
    for job in ("worker", "ps"):
        if not jobs.get(job):
            raise ValueError(
                f"`cluster_resolver`: AsyncParameterServerStrategy needs at least "
                f"one '{job}' task; the cluster has jobs {sorted(jobs)} "
                f"({ {k: len(v) for k, v in jobs.items()} })."
            )
    return len(jobs["worker"])


def _cluster_lost_message(error) -> str:
    text = str(getattr(error, "message", error))
    tasks = sorted(set(re.findall(r"/job:ps/replica:\d+/task:(\d+)", text)))
    which = f"parameter server task {', '.join(tasks)}" if tasks else "a parameter server"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = next((line.strip() for line in text.splitlines()
                   if "UNAVAILABLE" in line or "Connection" in line or "Socket" in line), "")
    return (
        f"AsyncParameterServerStrategy: fit stopped because {which} (or this "
        "chief's connection to the cluster) is unreachable; the variables it held "
        "and the steps since the last checkpoint are gone. Restart the parameter "
        "servers (or the whole job) and, in a new process, run fit again with "
        "keras.callbacks.BackupAndRestore (or load a ModelCheckpoint) to resume. "
        f"TensorFlow said: {first} {detail}".strip()
    )


class AsyncParameterServerStrategy(tf.distribute.experimental.ParameterServerStrategy):
    """Parameter-server strategy whose ``model.fit`` trains asynchronously.

    Usage (plain Keras, no subclassing)::

        strategy = AsyncParameterServerStrategy(tf_async.local_cluster(2, 1))
        with strategy.scope():
            model = make_model()
            model.compile(optimizer="adam", loss=..., metrics=["accuracy"])
        model.fit(dataset_or_fn, epochs=3, steps_per_epoch=100)

    Args:
      cluster_resolver: resolver of a cluster with >= 1 ``worker`` and >= 1
        ``ps`` task (this process is the coordinator/chief).
      max_staleness: ``None`` — fully asynchronous; ``k >= 0`` — every applied
        step has τ ≤ k (a step that would be staler recomputes its gradient on
        the current weights; none is dropped). ``0`` is sequential SGD.
      variable_partitioner: as in ``ParameterServerStrategy``, shards large
        variables (and their optimizer slots) across ps tasks, e.g.
        ``tf.distribute.experimental.partitioners.MinSizePartitioner``. An
        embedding table split this way is looked up and updated per shard.
      log_every_steps: refresh the logs callbacks see every this many steps
        (default: every 2 seconds); epoch-end logs are always exact.
      on_nonfinite: a step whose gradients, loss or non-trainable updates hold
        NaN/Inf is never applied. ``"skip"`` (default): it changes nothing
        (weights, optimizer state and ``iterations``, version, τ, metrics) and
        is counted exactly in ``nonfinite_skipped`` (History, progress bar,
        TensorBoard); ``"raise"``: ``fit`` stops with
        ``tf_async.strategies.NonFiniteStepError`` naming the step and worker.
        The check runs on the parameter server, where the apply runs.
      evaluation_shards: where ``evaluate``/``predict`` (and ``fit``'s
        validation) run. ``None`` (default): on the coordinator, Keras' own
        loop reading the variables from the parameter servers. An int ``S >=
        1`` or ``"auto"`` (``S = 5 × workers``, tf-keras'
        ``pss_evaluation_shards="auto"``): on the workers, the data split
        into ``S`` shards of whole batches, each a scheduled closure; every
        batch is evaluated exactly once (also when a worker fails and its
        shard is retried) and the metrics equal Keras' ``evaluate``;
        ``predict`` returns the outputs in input order. Which is faster when:
        docs/async_parameter_server.md. Settable between calls.

    ``fit`` takes Keras' arguments, including ``class_weight`` (applied in
    each worker's input pipeline) and ``validation_split`` (arrays only, as in
    Keras). Limits: one replica (device) per worker.

    ``keras.layers.Embedding`` tables on the parameter servers are read as the
    rows a batch looks up, where they live (in the train step and in
    ``evaluate``/``predict``); ids outside ``[-input_dim, input_dim)`` stop
    ``fit``/``evaluate``/``predict`` with a ``ValueError`` naming the layer.

    Raises:
      ValueError: ``max_staleness < 0``; a cluster without ps or workers;
        ``on_nonfinite`` not ``"skip"``/``"raise"``; ``evaluation_shards``
        < 1 or a string other than ``"auto"``; (when a variable is
        created) a ``variable_partitioner`` result that does not split axis 0
        only.
      TypeError: ``variable_partitioner`` not callable; ``evaluation_shards``
        not None, ``"auto"`` or an int.
    """

    def __init__(
        self,
        cluster_resolver,
        max_staleness: Optional[int] = None,
        variable_partitioner=None,
        log_every_steps: Optional[int] = None,
        on_nonfinite: str = "skip",
        evaluation_shards=None,
    ):
        self._max_staleness = check_max_staleness(max_staleness)
        self._evaluation_shards = _ps_eval.check_evaluation_shards(evaluation_shards)
        self._on_nonfinite = _nonfinite.check_on_nonfinite(on_nonfinite)
        if log_every_steps is not None and (
            isinstance(log_every_steps, bool)
            or not isinstance(log_every_steps, int)
            or log_every_steps < 1
        ):
            raise ValueError(
                f"`log_every_steps` must be None or an int >= 1, got {log_every_steps!r}."
            )
        self._log_every_steps = log_every_steps
        variable_partitioner = _rows.check_partitioner(variable_partitioner)
        self._look_ahead_horizon = None
        self._num_workers = _check_cluster(cluster_resolver)
        super().__init__(cluster_resolver, variable_partitioner=variable_partitioner)
        _keras_fit.note_cluster_connected("/job:chief")
        self._coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(
            self
        )
        self._chief_functions: dict = {}
        self._fit_states: dict = {}  # id(model) -> (model, loss tracker, FitState)
        self._evaluations: dict = {}  # id(model) -> (model, loss tracker, WorkerEvaluation)
        self._last_fit_model = None
        _keras_fit.install_trainer_dispatch()
        _keras_fit.install_atomic_assign_add()
        # Embedding tables on the PS are read as rows also outside the train
        # step (evaluate/predict on the chief, a direct model(x)).
        _keras_fit.install_embedding_lookup()
        if variable_partitioner is not None:
            _keras_fit.allow_sharded_variable_updates(self)
            # Split tables get each shard's initial value on its PS.
            self._tf_async_partitioned_init = True
            _keras_fit.install_partitioned_initial_values()
        # Tables' row updates run holding the table's lock (_table_locks).
        _keras_fit.install_update_guard(self)

    @property
    def coordinator(self) -> tf.distribute.experimental.coordinator.ClusterCoordinator:
        """The ``ClusterCoordinator`` this strategy schedules steps with."""
        return self._coordinator

    @property
    def max_staleness(self) -> Optional[int]:
        return self._max_staleness

    @property
    def on_nonfinite(self) -> str:
        return self._on_nonfinite

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def look_ahead_horizon(self) -> float:
        """``h`` handed to a weight-predicting optimizer (DANA look-ahead,
        ``tf_async.staleness.predicts_weights``): the updates expected
        between a step's read and its apply. Default: ``num_workers − 1``
        (bounded by ``max_staleness``); settable to a float >= 0 before ``fit``."""
        if self._look_ahead_horizon is not None:
            return self._look_ahead_horizon
        bound = self._num_workers - 1
        if self._max_staleness is not None:
            bound = min(bound, self._max_staleness)
        return float(bound)

    @look_ahead_horizon.setter
    def look_ahead_horizon(self, value) -> None:
        self._look_ahead_horizon = _check_horizon(value)

    @property
    def evaluation_shards(self):
        """``None`` (evaluate/predict on the coordinator), ``"auto"`` or the
        number of shards evaluated on the workers; settable."""
        return self._evaluation_shards

    @evaluation_shards.setter
    def evaluation_shards(self, value) -> None:
        self._evaluation_shards = _ps_eval.check_evaluation_shards(value)

    @property
    def log_every_steps(self) -> Optional[int]:
        return self._log_every_steps

    @property
    def global_version(self) -> Optional[int]:
        """Updates applied to the model in the last ``fit`` (the atomic version
        counter on the parameter servers), or ``None`` before any fit."""
        if self._last_fit_model is None:
            return None
        self._coordinator.join()
        state = self._fit_states[id(self._last_fit_model)][2]
        return int(state.counters.version.numpy())

    def steps_applied(self, first: int, count: int, model=None):
        """The parameter servers' exactly-once ledger, for audits.

        Returns a NumPy bool array: element ``j`` says whether the step with id
        ``first + j`` was applied (or skipped as non-finite) exactly once.
        Step ids number the steps scheduled for ``model`` (default: the last
        fitted model) from 0, across its fits since it was compiled; the
        ledger keeps the most recent 65 536 ids.
        """
        import numpy as np

        from tf_async.strategies._ps_train_step import DONE_RING_SIZE

        for name, value in (("first", first), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0. Received: {name}={value!r}")
        if count > DONE_RING_SIZE:
            raise ValueError(
                f"`count` must be <= {DONE_RING_SIZE} (the ledger's size). "
                f"Received: count={count}"
            )
        model = model if model is not None else self._last_fit_model
        entry = self._fit_states.get(id(model)) if model is not None else None
        if entry is None or entry[0] is not model:
            raise ValueError(
                "`model` has not been fitted under this strategy since it was "
                "compiled: there is no ledger to read."
            )
        state = entry[2]
        scheduled = state.step_ids.next_id
        if first + count > scheduled or first < scheduled - DONE_RING_SIZE:
            raise ValueError(
                f"Steps {first}..{first + count - 1} are outside the ledger: ids "
                f"{max(0, scheduled - DONE_RING_SIZE)}..{scheduled - 1} were scheduled "
                "and are kept."
            )
        self._coordinator.join()
        done = state.counters.done.numpy()
        ids = np.arange(first, first + count, dtype=np.int64)
        return done[ids % DONE_RING_SIZE] == ids + 1

    def _fit_state(self, model) -> "_ps_fit_loop.FitState":
        # Every ``compile`` makes a new loss tracker: a recompiled model (new
        # optimizer, loss or metrics) gets newly traced steps.
        compiled = _keras_fit.loss_tracker(model)
        entry = self._fit_states.get(id(model))
        if entry is None or entry[0] is not model or entry[1] is not compiled:
            entry = (model, compiled, _ps_fit_loop.FitState(self, model))
            self._fit_states[id(model)] = entry
        self._last_fit_model = model
        return entry[2]

    def _worker_evaluation(self, model) -> "_ps_eval.WorkerEvaluation":
        compiled = _keras_fit.loss_tracker(model)
        entry = self._evaluations.get(id(model))
        if entry is None or entry[0] is not model or entry[1] is not compiled:
            entry = (model, compiled, _ps_eval.WorkerEvaluation(self, model))
            self._evaluations[id(model)] = entry
        return entry[2]

    def check_model(self, model, method: str = "fit") -> None:
        """ValueError unless ``model`` was created in this strategy's scope."""
        if _keras_fit.model_strategy(model) is not self:
            if _keras_fit.stranded_on_localhost(model.variables):
                raise ValueError(_keras_fit.stranded_message(
                    "this model's variables were", method))
            raise ValueError(
                "The model was not created under this AsyncParameterServerStrategy's "
                "scope(): build and compile it inside `with strategy.scope():` so "
                "its variables live on the parameter servers."
            )

    # -- model.fit / evaluate / predict hooks (see tf_async/_keras_fit.py) -------
    def _tf_async_fit(self, model, original, *args, **kwargs):
        del original  # Keras 3's fit cannot schedule on a PS cluster.
        try:
            return _ps_fit_loop.run_fit(self, model, *args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            nonfinite = _nonfinite.from_tf_error(error)  # on_nonfinite="raise"
            if nonfinite is not None:
                raise nonfinite from None
            ids = _rows.ids_error_from(error)  # an Embedding's ids out of range
            if ids is not None:
                raise ids from None
            raise
        except tf.errors.UnavailableError as error:
            # The coordinator retries lost workers itself: what reaches fit is
            # a lost parameter server (or the chief's link to the cluster).
            raise tf.errors.UnavailableError(None, None, _cluster_lost_message(error)) from None

    def _tf_async_evaluate(self, model, original, *args, **kwargs):
        return self._evaluate_or_predict(model, original, *args, method="evaluate", **kwargs)

    def _tf_async_predict(self, model, original, *args, **kwargs):
        return self._evaluate_or_predict(model, original, *args, method="predict", **kwargs)

    def _evaluate_or_predict(self, model, original, *args, method, **kwargs):
        try:
            # run_eagerly=True: Keras' eager loop on the coordinator (a
            # worker runs tf.functions only).
            if self._evaluation_shards is None or model.run_eagerly:
                return _ps_fit_loop.run_on_chief(
                    self, model, original, *args, method=method, **kwargs)
            run = _ps_eval.evaluate if method == "evaluate" else _ps_eval.predict
            return run(self, model, *args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            ids = _rows.ids_error_from(error)  # an Embedding's ids out of range
            if ids is None:
                raise
            raise ids from None
