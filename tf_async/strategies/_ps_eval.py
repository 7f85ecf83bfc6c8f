"""Worker-side ``evaluate``/``predict`` (opt-in: ``evaluation_shards``).

tf-keras' exact evaluation (``compile(pss_evaluation_shards=...)``) in
Keras 3 terms. The data is split into ``S`` shards, each one closure
scheduled with ``ClusterCoordinator.schedule`` on whichever worker is free:

* the data (a dataset, a dataset function's dataset — called once with a
  one-pipeline ``InputContext`` —, or arrays batched by ``batch_size``) is
  sent to every worker once per call (``create_per_worker_dataset``), each
  builds it whole; shard ``i`` of ``S`` is its batches
  ``i, i + S, i + 2S, ...`` (``Dataset.shard`` on batches), so the shards
  cover every batch exactly once, the last ones possibly shorter;
* a shard reads each weight once (one fused transfer per parameter server;
  embedding tables read as rows, as in the train step) and runs Keras'
  own ``test_step`` / ``predict_step`` per batch in a ``StatelessScope``:
  the metric states start at zero and are carried through the shard's loop
  as tensors, nothing is written anywhere;
* a shard writes its final metric states (``predict``: its outputs and
  batch sizes, serialized) into its own variables on a parameter server
  (``ShardResults``, an overwrite);
* once every shard has finished, the coordinator reads them all (one call),
  sums the metric states (Keras' metric states are sums and counts, the same
  assumption the train step's metric contributions make), writes the sums
  into the model's metric variables once and reads Keras' ``result()``;
  ``predict`` puts the shards' batches back in input order.

A shard retried by the coordinator after a worker failure starts again from
zero and overwrites its results with the same values: no example is counted
twice or lost (tf-keras' exactly-once visitation), also when the worker dies
after its shard finished.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_async import _keras_fit
from tf_async.strategies import _fused_transfer, _ps_data, _table_rows

# ``evaluation_shards="auto"``: this many shards per worker (tf-keras'
# heuristic for ``pss_evaluation_shards="auto"`` was 5 per worker).
AUTO_SHARDS_PER_WORKER = 5


def check_evaluation_shards(value):
    """``None``, ``"auto"`` or an int >= 1 (else TypeError/ValueError)."""
    message = ("`evaluation_shards` must be None (evaluate/predict on the "
               "coordinator), 'auto' or an int >= 1 (shards run on the workers), "
               f"got {value!r}.")
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(message)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(message)
    if value < 1:
        raise ValueError(message)
    return int(value)


def num_shards(setting, num_workers: int) -> int:
    return AUTO_SHARDS_PER_WORKER * num_workers if setting == "auto" else int(setting)


def _worker_source(x, y, sample_weight, batch_size, steps, method: str) -> tf.data.Dataset:
    """The finite dataset every worker builds whole (``steps`` batches of it)."""
    _ps_data.check_not_distributed(x, method)
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1
    ):
        raise ValueError(f"`steps` must be None or an int >= 1, got {steps!r}.")

    def limited(dataset):
        if steps is not None:
            return dataset.take(int(steps))
        if _ps_data.cardinality(dataset) == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                f"`steps` is required when `x` of `{method}` is infinite: its "
                f"shards on the workers need an end, e.g. `model.{method}(x, steps=10)`."
            )
        return dataset

    if callable(x) and not isinstance(x, tf.data.Dataset):
        # Called once, with a one-pipeline InputContext (the whole data, as on
        # the coordinator); its dataset goes to the workers like a Dataset.
        x = _ps_data.call_dataset_fn(x, 1, 0)
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "`y`/`sample_weight` must be None when `x` is a tf.data.Dataset.")
        _ps_data.check_sendable(x)
        return limited(x)
    if x is None:
        raise ValueError("`x` is required: a tf.data.Dataset, a dataset function or arrays.")
    arrays = tuple(a for a in (x, y, sample_weight) if a is not None)
    dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size or 32)
    return limited(dataset)


class ShardResults:
    """Per shard, variables on a parameter server that its closure overwrites
    with its results before it ends.

    A closure's return value stays on its worker until fetched: a worker that
    dies between the closure's end and the fetch takes it along (the fetch
    fails; seen with a worker SIGKILLed mid-evaluate), and the coordinator
    does not rerun a finished closure. Written on the PS, a finished shard's
    results survive its worker; a retried shard writes the same values again
    (an overwrite, never an add), so nothing is counted twice.
    """

    def __init__(self, strategy, specs, shards: int):
        with strategy.scope():
            anchor = tf.Variable(0, dtype=tf.int64, trainable=False,
                                 name="tf_async_shard_results")
            with strategy.extended.colocate_vars_with(anchor):
                self.variables = [
                    [tf.Variable(tf.zeros(spec.shape, spec.dtype), trainable=False,
                                 name="tf_async_shard_result") for spec in specs]
                    for _ in range(shards)
                ]
        self._anchor = anchor
        self.read = tf.function(lambda: [[v.read_value() for v in row]
                                         for row in self.variables])

    def write(self, index, values):
        """Inside a shard's closure: shard ``index`` (a tensor) stores ``values``."""
        def branch(row):
            def assign():
                for variable, value in zip(row, values):
                    variable.assign(tf.cast(value, variable.dtype), read_value=False)
                return tf.constant(True)
            return assign

        return tf.switch_case(tf.cast(index, tf.int32), [branch(r) for r in self.variables])


class WorkerEvaluation:
    """The shard functions of one compiled model (traced once per input spec)."""

    def __init__(self, strategy, model: keras.Model):
        self._strategy = strategy
        self._model = model
        self._functions: dict = {}

    # -- on the worker ---------------------------------------------------------
    def _snapshot(self, step, spec):
        """``[(variable, value read once)]`` for the model's weights; tables
        only looked up (read as rows by the train step) stay unmapped and are
        read as rows at each lookup (``_rows``)."""
        model = self._model
        x, y, sw = keras.utils.unpack_x_y_sample_weight(spec)
        tables = _table_rows.tables_read_by_rows(
            model, x, y, sw, lambda x, y, sw: step((x, y, sw)))
        metrics = {id(v) for v in model.metrics_variables}
        variables = [v for v in model.variables
                     if id(v) not in metrics and id(v) not in tables]
        reads, counts = [], []
        for variable in variables:
            parts = getattr(variable.value, "variables", None) or [variable.value]
            for part in parts:
                with tf.device(part.device):
                    reads.append(part.read_value())
            counts.append(len(parts))
        received = _fused_transfer.send(reads, [None] * len(reads))
        mapping, first = [], 0
        for variable, count in zip(variables, counts):
            value = received[first] if count == 1 else tf.concat(
                received[first:first + count], axis=0)
            mapping.append((variable, value))
            first += count
        return mapping

    def _evaluate_shard(self, spec, shards):
        model, strategy = self._model, self._strategy
        metric_variables = list(model.metrics_variables)
        results = ShardResults(
            strategy, [tf.TensorSpec(v.shape, v.dtype) for v in metric_variables], shards)

        def body(dataset, shards, index):
            mapping = self._snapshot(model.test_step, spec)
            iterator = iter(dataset.shard(shards, index))

            def step(optional, state):
                with keras.StatelessScope(
                        state_mapping=mapping + list(zip(metric_variables, state))) as scope:
                    model.test_step(optional.get_value())
                new = [tf.cast(scope.get_current_value(v), v.dtype) for v in metric_variables]
                return iterator.get_next_as_optional(), new

            zeros = [tf.zeros(v.shape, v.dtype) for v in metric_variables]
            _, state = tf.while_loop(
                lambda optional, state: optional.has_value(), step,
                (iterator.get_next_as_optional(), zeros), parallel_iterations=1)
            return state

        @tf.function
        def evaluate_shard(dataset, shards, index):
            results.write(index, _keras_fit.run_in_single_replica_context(
                strategy, body, dataset, shards, index))

        return evaluate_shard, results

    def _predict_shard(self, spec, shards):
        model, strategy = self._model, self._strategy
        probe = tf.function(model.predict_step, autograph=False).get_concrete_function(spec)
        out_specs = tf.nest.flatten(probe.structured_outputs)
        structure = probe.structured_outputs
        # Outputs of any length travel serialized (a string scalar per output):
        # a variable of unknown shape cannot be passed to a remote function.
        results = ShardResults(strategy, [tf.TensorSpec([], tf.string)] * (len(out_specs) + 1),
                               shards)
        results.dtypes = [o.dtype for o in out_specs] + [tf.int64]

        def body(dataset, shards, index):
            mapping = self._snapshot(model.predict_step, spec)
            iterator = iter(dataset.shard(shards, index))
            arrays = [tf.TensorArray(o.dtype, size=0, dynamic_size=True, infer_shape=False,
                                     element_shape=tf.TensorShape([None]).concatenate(
                                         o.shape[1:]))
                      for o in out_specs]
            rows = tf.TensorArray(tf.int64, size=0, dynamic_size=True)

            def step(i, optional, arrays, rows):
                with keras.StatelessScope(state_mapping=mapping):
                    outputs = tf.nest.flatten(model.predict_step(optional.get_value()))
                arrays = [a.write(i, o) for a, o in zip(arrays, outputs)]
                rows = rows.write(i, tf.shape(outputs[0], out_type=tf.int64)[0])
                return i + 1, iterator.get_next_as_optional(), arrays, rows

            _, _, arrays, rows = tf.while_loop(
                lambda i, optional, arrays, rows: optional.has_value(), step,
                (tf.constant(0), iterator.get_next_as_optional(), arrays, rows),
                parallel_iterations=1)
            return [tf.io.serialize_tensor(t) for t in [a.concat() for a in arrays]
                    + [rows.stack()]]

        @tf.function
        def predict_shard(dataset, shards, index):
            results.write(index, _keras_fit.run_in_single_replica_context(
                strategy, body, dataset, shards, index))

        return predict_shard, results, structure

    def function(self, kind: str, spec, shards: int):
        """``(shard function, ShardResults[, output structure])`` for ``kind``."""
        key = (kind, repr(spec), shards)
        if key not in self._functions:
            make = self._evaluate_shard if kind == "evaluate" else self._predict_shard
            self._functions[key] = make(spec, shards)
        return self._functions[key]


def _callbacks(model, callbacks, verbose, steps):
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks
    return keras.callbacks.CallbackList(
        callbacks, add_progbar=verbose != 0, verbose=verbose, epochs=1,
        steps=steps, model=model)


def _prepare(strategy, model, source):
    """Per-worker datasets of ``source`` and the batch spec; builds the model
    (and an unbuilt optimizer, in scope) as Keras' evaluate would."""
    spec = _ps_data.element_spec(source, strategy.num_workers)
    if getattr(model, "compiled", False):
        with strategy.scope():
            _keras_fit.symbolic_build(model, spec)
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
    elif not model.built:
        raise ValueError(
            "`predict` on the workers (`evaluation_shards`) needs a built model: "
            "this one is neither compiled nor built. Give it an `Input`, call it "
            "on a batch (in the strategy's scope), or set "
            "`strategy.evaluation_shards = None` to predict on the coordinator.")
    datasets = strategy.coordinator.create_per_worker_dataset(source).build()
    return datasets, spec


def _run_shards(strategy, function, datasets, shards, callbacks, mode: str):
    """Schedules every shard; returns when all have finished (retries
    included). Callbacks see one batch per shard, in shard order."""
    done = [
        strategy.coordinator.schedule(function, args=(
            datasets, tf.constant(shards, tf.int64), tf.constant(i, tf.int64)))
        for i in range(shards)
    ]
    for i, remote in enumerate(done):
        getattr(callbacks, f"on_{mode}_batch_begin")(i)
        remote.fetch()  # no value: waits for shard i (nothing is read from the worker)
        getattr(callbacks, f"on_{mode}_batch_end")(i, {})
    strategy.coordinator.join()


def evaluate(strategy, model, x=None, y=None, batch_size=None, verbose="auto",
             sample_weight=None, steps=None, callbacks=None, return_dict=False,
             **kwargs):
    """``model.evaluate`` sharded over the workers (see the module docstring)."""
    _keras_fit.assert_compile_called(model, "evaluate")
    kwargs.pop("_use_cached_eval_dataset", None)
    if kwargs:
        raise ValueError(f"Arguments not recognized: {kwargs}")
    strategy.check_model(model, "evaluate")
    source = _worker_source(x, y, sample_weight, batch_size, steps, "evaluate")
    strategy.coordinator.join()  # results reflect every scheduled training step
    datasets, spec = _prepare(strategy, model, source)
    shards = num_shards(strategy.evaluation_shards, strategy.num_workers)
    function, results = strategy._worker_evaluation(model).function("evaluate", spec, shards)
    callbacks = _callbacks(model, callbacks, verbose, shards)
    callbacks.on_test_begin()
    _run_shards(strategy, function, datasets, shards, callbacks, "test")
    per_shard = [[np.asarray(v, np.float64) for v in row] for row in results.read()]
    totals = [sum(values) for values in zip(*per_shard)]
    model.reset_metrics()
    for variable, total in zip(model.metrics_variables, totals):
        variable.assign(total.astype(variable.dtype))
    # As Keras' pythonify_logs: sorted keys, Python floats.
    logs = {k: float(np.asarray(v)) for k, v in sorted(model.get_metrics_result().items())}
    callbacks.on_test_end(logs)
    if return_dict:
        return logs
    return _keras_fit.flatten_metrics_in_order(model, logs)


def predict(strategy, model, x, batch_size=None, verbose="auto", steps=None,
            callbacks=None):
    """``model.predict`` sharded over the workers, outputs in input order."""
    strategy.check_model(model, "predict")
    source = _worker_source(x, None, None, batch_size, steps, "predict")
    strategy.coordinator.join()
    datasets, spec = _prepare(strategy, model, source)
    shards = num_shards(strategy.evaluation_shards, strategy.num_workers)
    function, results, structure = strategy._worker_evaluation(model).function(
        "predict", spec, shards)
    callbacks = _callbacks(model, callbacks, verbose, shards)
    callbacks.on_predict_begin()
    _run_shards(strategy, function, datasets, shards, callbacks, "predict")
    per_shard = []
    for row in results.read():
        *outputs, rows = [tf.io.parse_tensor(v, dtype).numpy()
                          for v, dtype in zip(row, results.dtypes)]
        splits = np.cumsum(rows)[:-1]
        per_shard.append([np.split(o, splits) if len(rows) else [] for o in outputs])
    callbacks.on_predict_end()
    # Batch b went to shard b % S as its (b // S)-th batch.
    batches = sum(len(s[0]) for s in per_shard)
    if not batches:
        raise ValueError("`x` of `predict` is empty: no batch to predict.")
    flat = [
        np.concatenate([per_shard[b % shards][k][b // shards] for b in range(batches)])
        for k in range(len(tf.nest.flatten(structure)))
    ]
    return tf.nest.pack_sequence_as(structure, flat)
