"""LocalUpdateStrategy: local SGD / periodic model averaging, EASGD, DiLoCo.

``LocalUpdateStrategy(base, sync_every=H, averaging=...)`` turns a
``MirroredStrategy``, ``MultiWorkerMirroredStrategy`` or ``TPUStrategy`` into
a local-update strategy; ``model.compile`` + ``model.fit`` stay stock, with
any Keras optimizer.

How (Keras 3.15 + tf.distribute):

* Keras' TF optimizer all-reduces gradients with
  ``ReplicaContext.all_reduce(SUM, grads)`` (a ``merge_call`` into
  ``extended.batch_reduce_to``) and then applies them with
  ``extended.update(var, fn, args=(grad,))``, which calls ``fn`` on each
  device's component of the ``MirroredVariable`` with that device's slice of
  ``args``. Inside the train step this strategy answers the all-reduce
  LOCALLY: replica i gets ``N · g_i`` (Keras scaled the loss by 1/N, so this
  is replica i's own mean-batch gradient) — no communication. ``update`` then
  writes a different value into each replica's copy of the variable (and the
  optimizer's slots, also per-device), so the replicas diverge.
* After ``strategy.run`` returns (cross-replica context, same ``tf.function``)
  a step counter is advanced and, every H local steps, a ``tf.cond`` packs
  all locally-updated variables of each replica into one flat vector, runs
  ONE all-reduce (mean), and an averager (``averagers.py``) decides each
  replica's new parameters. No Python side effects and no host reads in the
  step.
* ``model.evaluate`` / ``predict`` steps first flush pending local updates
  (in-graph, only if any), so they see the averaged model. Reading metric
  results eagerly (what ``fit`` does at every epoch end, and ``evaluate`` at
  its end) goes through ``strategy.reduce``; this strategy flushes pending
  local updates there too, so epoch ends, the end of ``fit``, and
  ``model.save`` / ``get_weights`` after ``fit`` see the averaged model.
  ``strategy.synchronize()`` forces a sync at any time.

Limitations (Keras 3.15 / TF 2.21):

* ``train_on_batch`` resets metrics eagerly on every call, which flushes:
  it synchronises after every call. Use ``fit`` for local SGD.
* A callback that saves every N batches mid-period (``ModelCheckpoint``
  with an integer ``save_freq``) writes replica 0's weights; use
  ``strategy.checkpoint()`` in a ``tf.train.Checkpoint`` for exact resume.
* Under MultiWorkerMirrored, a local step's logs (loss, metrics,
  ``local_divergence`` as callbacks and ``History`` see them) are this
  worker's mean over its replicas: Keras would reduce each logged value
  across workers every step, a collective per value per step
  (``_worker_local_logs``). ``evaluate`` and metric results stay global.
* Only trainable variables (and, optionally, their optimizer slots) are
  local; non-trainable ones keep the base strategy's behaviour.
* TPUStrategy is supported by construction but untested here (no TPU); the
  periodic sync runs in the step's graph but outside the replicated
  computation.

The base strategy object itself becomes the local-update strategy (its class
is swapped for a subclass that also derives from ``LocalUpdateStrategy``), so
``isinstance(strategy, tf.distribute.MirroredStrategy)`` etc. still hold and
Keras keeps its per-strategy behaviour. Do not keep using the base strategy
for synchronous training.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from tf_async import _keras_fit
from tf_async.strategies import averagers as averagers_lib

__all__ = ["LocalUpdateStrategy"]

_SUPPORTED_BASES = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.TPUStrategy,
)

LOCAL_DIVERGENCE = "local_divergence"


def _check_number(name: str, value, low: float, high: float, low_open: bool, high_open: bool):
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be a number in {lo}{low}, {high}{hi}, got {value!r}.")


class _SyncGroup:
    """The variables one train step updates locally, and their averager."""

    def __init__(self, params: List[tf.Variable], slots: List[tf.Variable], averager) -> None:
        self.params = params
        self.slots = slots
        self.averager = averager
        self.traced = False  # False while only built ahead of fit's first step


class _Runtime:
    """Trace-time state of a LocalUpdateStrategy (never touched at run time)."""

    def __init__(self) -> None:
        self.local_mode = False
        self.updated: Dict[int, tf.Variable] = {}
        self.slots: Dict[int, List[tf.Variable]] = {}
        self.trainable: List[tf.Variable] = []  # created in scope, in order
        self.groups: Dict[Tuple[int, ...], _SyncGroup] = {}
        # The last local step's logs, already reduced over this worker's
        # replicas (id -> graph tensor, kept alive so ids stay unique):
        # ``reduce`` passes them through without a collective.
        self.worker_local_logs: Dict[int, tf.Tensor] = {}


class _BuildAveraging(keras.callbacks.Callback):
    """Builds a model's averaging state when ``fit`` begins (see ``_tf_async_fit``)."""

    def __init__(self, strategy, model):
        super().__init__()
        self._strategy = strategy
        self._target = model

    def on_train_begin(self, logs=None):
        self._strategy._build_averaging_for(self._target)


class _LocalUpdateExtendedMixin(_keras_fit.LocalUpdateExtendedSeams):
    """Makes the replica-context all-reduce local and records what diverges."""

    _lu_runtime: _Runtime

    def _lu_force_merge_call(self) -> bool:
        return self._lu_runtime.local_mode

    def _lu_variable_created(self, variable, colocate_with) -> None:
        if colocate_with is not None and isinstance(colocate_with, tf.Variable):
            key = _keras_fit.variable_key(colocate_with)
            self._lu_runtime.slots.setdefault(key, []).append(variable)
        elif getattr(variable, "trainable", False) and isinstance(
            variable, tf.distribute.DistributedValues
        ):
            self._lu_runtime.trainable.append(variable)

    def batch_reduce_to(self, reduce_op, value_destination_pairs, options=None):
        runtime = self._lu_runtime
        if not runtime.local_mode:
            return super().batch_reduce_to(reduce_op, value_destination_pairs, options)
        if isinstance(reduce_op, str):
            reduce_op = tf.distribute.ReduceOp(reduce_op.upper())
        scale = (
            float(self._lu_strategy().num_replicas_in_sync)
            if reduce_op == tf.distribute.ReduceOp.SUM
            else 1.0
        )
        return [self._lu_local_value(value, scale) for value, _ in value_destination_pairs]

    def _lu_local_value(self, value, scale: float):
        """What replica i gets from a local 'all-reduce': its own value × scale."""

        def scaled(component):
            with tf.device(component.device):
                if isinstance(component, tf.IndexedSlices):
                    return tf.IndexedSlices(
                        component.values * tf.cast(scale, component.values.dtype),
                        component.indices,
                        component.dense_shape,
                    )
                return component * tf.cast(scale, component.dtype)

        if isinstance(value, tf.distribute.DistributedValues):
            components = self._lu_strategy().experimental_local_results(value)
            return _keras_fit.per_replica([scaled(c) for c in components])
        return scaled(value)

    def update(self, var, fn, args=(), kwargs=None, group=True):
        runtime = self._lu_runtime
        # Keras applies (gradient, learning_rate) to each trainable variable;
        # weight decay passes no args, `iterations` is not trainable.
        if runtime.local_mode and args and getattr(var, "trainable", False):
            runtime.updated.setdefault(_keras_fit.variable_key(var), var)
        return super().update(var, fn, args, kwargs, group)


_STRATEGY_CLASSES: Dict[type, type] = {}
_EXTENDED_CLASSES: Dict[type, type] = {}


def _derived(cache: Dict[type, type], mixin: type, base: type) -> type:
    if base not in cache:
        cache[base] = type(f"LocalUpdate{base.__name__}", (mixin, base), {})
    return cache[base]


class LocalUpdateStrategy(tf.distribute.Strategy):
    """Local SGD over a Mirrored / MultiWorkerMirrored / TPU strategy.

    Between synchronisations every replica applies only its own gradients
    with its own copy of the optimizer state (no gradient all-reduce); every
    ``sync_every`` steps the replicas' parameters are combined with one packed
    all-reduce by the ``averaging`` rule:

    * ``"mean"``: ``w_i ← mean_j w_j`` (Lin et al., ICLR 2020). With
      ``sync_every=1`` and plain SGD this equals synchronous data-parallel SGD
      (averaging weights after one step = averaging gradients); with momentum
      or Adam it needs ``average_optimizer_state=True`` to be exact for
      momentum SGD (Adam's update is not linear in the gradient).
    * ``"easgd"``: elastic averaging with coupling ``alpha`` in (0, 1).
    * ``"diloco"``: outer Nesterov SGD (``outer_learning_rate``,
      ``outer_momentum``) on the centre with the outer gradient
      ``centre − mean``.

    ``average_optimizer_state=True`` also averages the optimizer slots
    (momentum, Adam's m and v) in the same packed all-reduce; by default each
    replica keeps its own. History gets ``local_divergence``: the mean over
    replicas of ‖w_i − w̄‖₂ measured at the most recent synchronisation
    (under MultiWorkerMirrored: over this worker's replicas).
    """

    def __new__(cls, base_strategy=None, *args, **kwargs):
        if cls is not LocalUpdateStrategy:  # a derived class being constructed
            return super().__new__(cls)
        if isinstance(base_strategy, LocalUpdateStrategy):
            raise ValueError("`base_strategy` is already a LocalUpdateStrategy.")
        if not isinstance(base_strategy, _SUPPORTED_BASES):
            raise ValueError(
                "`base_strategy` must be a tf.distribute.MirroredStrategy, "
                "MultiWorkerMirroredStrategy or TPUStrategy, got "
                f"{type(base_strategy).__name__}."
            )
        _validate(*args, **kwargs)
        base_strategy.__class__ = _derived(
            _STRATEGY_CLASSES, LocalUpdateStrategy, type(base_strategy)
        )
        return base_strategy

    def __init__(
        self,
        base_strategy: tf.distribute.Strategy,
        sync_every: int = 8,
        averaging: str = "mean",
        average_optimizer_state: bool = False,
        alpha: float = 0.1,
        outer_learning_rate: float = 0.7,
        outer_momentum: float = 0.9,
    ) -> None:
        # ``self`` IS ``base_strategy`` (see ``__new__``): already initialised.
        _validate(
            sync_every, averaging, average_optimizer_state, alpha,
            outer_learning_rate, outer_momentum,
        )
        self.sync_every = int(sync_every)
        self.averaging = averaging
        self.average_optimizer_state = bool(average_optimizer_state)
        self.alpha = float(alpha)
        self.outer_learning_rate = float(outer_learning_rate)
        self.outer_momentum = float(outer_momentum)
        self._lu_runtime = _Runtime()
        _keras_fit.install_trainer_dispatch()  # for _tf_async_fit
        extended = self.extended
        extended.__class__ = _derived(
            _EXTENDED_CLASSES, _LocalUpdateExtendedMixin, type(extended)
        )
        extended._lu_runtime = self._lu_runtime
        extended._lu_strategy = weakref.ref(self)
        with self.scope():
            # Identical on every replica; written only in cross-replica context.
            self.pending_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="local_update_pending_steps"
            )
            self.sync_count = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="local_update_sync_count"
            )
            self.local_divergence = tf.Variable(
                0.0, dtype=tf.float32, trainable=False, name="local_update_divergence"
            )
        self._sync_function = None
        self._checkpoint_module: Optional[tf.Module] = None

    # ------------------------------------------------------------------ API

    def state_variables(self) -> List[tf.Variable]:
        """Strategy state: position in the period, sync count, last
        divergence, and the averager's centre/momentum (once training began)."""
        state = [self.pending_steps, self.sync_count, self.local_divergence]
        for group in self._lu_runtime.groups.values():
            state.extend(group.averager.variables())
        return state

    def checkpoint(self) -> tf.Module:
        """A trackable for ``tf.train.Checkpoint`` next to the model and optimizer.

        It holds ``state_variables()`` and, once training has started, the
        per-replica copies (replicas 1..N-1; the model checkpoint holds
        replica 0) of every trainable variable created in this scope and of
        its optimizer slots, so a checkpoint taken in the middle of a period
        resumes exactly. When restoring into a fresh strategy, the replica
        copies and the averager's centre are attached — and so restored,
        by TF's deferred restoration — at the first train step, i.e. after
        ``checkpoint.restore`` has written replica 0's values everywhere.
        """
        if self._checkpoint_module is None:
            self._checkpoint_module = tf.Module(name="local_update_state")
            self._checkpoint_module.counters = [
                self.pending_steps, self.sync_count, self.local_divergence
            ]
        if self._lu_runtime.groups:
            self._attach_checkpoint_state()
        return self._checkpoint_module

    def _attach_checkpoint_state(self) -> None:
        module = self._checkpoint_module
        runtime = self._lu_runtime
        copies = []
        for variable in runtime.trainable:
            for v in [variable] + runtime.slots.get(_keras_fit.variable_key(variable), []):
                copies.append(list(self.experimental_local_results(v))[1:])
        with tf.init_scope():
            module.replica_copies = copies
            module.averagers = [g.averager.variables() for g in runtime.groups.values()]

    def synchronize(self) -> None:
        """Averages the replicas now (eagerly), if any local step is pending."""
        if not self._lu_runtime.groups:
            return
        if self._sync_function is None:
            self._sync_function = tf.function(self._flush_if_pending)
        self._sync_function()

    def _tf_async_fit(self, model, original, *args, **kwargs):
        """Keras' ``fit``, with the averaging state built before its first step.

        The averager's centre (and DiLoCo's momentum) are variables; created
        while the train step is traced, they make ``tf.function`` trace (and
        with ``jit_compile`` compile) the step a second time. ``fit`` builds
        them at ``on_train_begin`` instead: after Keras built the model and
        the optimizer, and after callbacks such as ``BackupAndRestore`` (or a
        ``checkpoint()`` restored before ``fit``) set the weights.
        """
        args, kwargs = _keras_fit.fit_with_callback(
            original, args, kwargs, _BuildAveraging(self, model))
        return original(*args, **kwargs)

    def _build_averaging_for(self, model) -> None:
        """The sync group of ``model``'s trainable variables, if all of them
        were created in this strategy's scope (else it is built when traced)."""
        runtime = self._lu_runtime
        params = [_keras_fit.raw_variable(v) for v in model.trainable_variables]
        local = {_keras_fit.variable_key(v) for v in runtime.trainable}
        if params and all(_keras_fit.variable_key(v) in local for v in params):
            self._group_for(params, traced=False)

    # ----------------------------------------------------- strategy hooks

    def run(self, fn, args=(), kwargs=None, options=None):
        runtime = self._lu_runtime
        if runtime.local_mode:  # nested run: already inside a local step
            return super().run(fn, args, kwargs, options)
        if _keras_fit.is_keras_inference_step(fn):
            self._flush_if_pending()
            return super().run(fn, args, kwargs, options)

        runtime.updated = {}
        runtime.worker_local_logs = {}
        runtime.local_mode = True
        try:
            outputs = super().run(self._wrap_step(fn), args, kwargs, options)
        finally:
            runtime.local_mode = False
        if runtime.updated:
            group = self._group_for(list(runtime.updated.values()))
            self._after_local_step(group)
            if self.num_replicas_in_sync > len(self.extended.worker_devices):
                outputs = self._worker_local_logs(outputs)
        return outputs

    def reduce(self, reduce_op, value, axis):
        if not tf.executing_eagerly() and id(value) in self._lu_runtime.worker_local_logs:
            return value  # a local step's log: already this worker's mean
        # Keras reads metric results eagerly through here at every epoch end
        # (and at the end of evaluate): flush pending local steps first.
        if (
            tf.executing_eagerly()
            and not self._lu_runtime.local_mode
            and self._lu_runtime.groups
            and int(self.pending_steps.numpy()) > 0
        ):
            self.synchronize()
        if not isinstance(value, tf.distribute.DistributedValues) and len(tf.nest.flatten(value)) > 1:
            # Reduce a structure leaf by leaf: MultiWorkerMirrored's eager
            # reduce of a tuple of PerReplica values (what Keras 3 fit does
            # in `_maybe_symbolic_build`) fails in TF 2.21 (keras#20585).
            parent = super()
            return tf.nest.map_structure(lambda v: parent.reduce(reduce_op, v, axis), value)
        if axis is not None:
            # Keras 3 reduces per-replica scalar logs with axis=0 under
            # MultiWorkerMirrored, which fails for rank 0: mean over replicas.
            first = self.experimental_local_results(value)[0]
            if getattr(first, "shape", None) is not None and first.shape.rank == 0:
                axis = None
        return super().reduce(reduce_op, value, axis)

    # ------------------------------------------------------------ internals

    def _wrap_step(self, fn):
        runtime = self._lu_runtime

        def local_step(*args, **kwargs):
            outputs = fn(*args, **kwargs)
            if runtime.updated and isinstance(outputs, dict):
                outputs = dict(outputs)
                outputs[LOCAL_DIVERGENCE] = tf.identity(self.local_divergence.read_value())
            return outputs

        return local_step

    def _worker_local_logs(self, outputs):
        """A local train step's scalar logs as this worker's mean over its replicas.

        Keras reduces every logged value of every step with
        ``strategy.reduce(MEAN, v, axis=0)``, which under MultiWorkerMirrored is
        one cross-worker collective per value per step: over a slow link that
        costs more than the local step it reports on. Between synchronisations
        the replicas' losses are each replica's own anyway, so the logs of a
        local step are reduced over this worker's replicas only (no
        communication); ``reduce`` returns them as they are.
        """
        runtime = self._lu_runtime

        def local_mean(value):
            if isinstance(value, tf.distribute.DistributedValues):
                components = self.experimental_local_results(value)
            elif isinstance(value, tf.Tensor):
                components = (value,)
            else:
                return value
            first = components[0]
            if first.shape.rank != 0 or not first.dtype.is_floating:
                return value
            with tf.device(first.device):
                mean = tf.add_n(list(components)) / float(len(components))
            runtime.worker_local_logs[id(mean)] = mean
            return mean

        return tf.nest.map_structure(local_mean, outputs)

    def _group_for(self, params: List[tf.Variable], traced: bool = True) -> _SyncGroup:
        """The sync group of ``params`` (built on first use). ``traced``: asked
        for by a train step being traced; a group built ahead of ``fit``
        (``traced=False``) that no step turned out to update is dropped."""
        runtime = self._lu_runtime
        key = tuple(_keras_fit.variable_key(v) for v in params)
        if traced and key not in runtime.groups:
            for other in [k for k, g in runtime.groups.items() if not g.traced]:
                del runtime.groups[other]
        if key not in runtime.groups:
            for v in params:
                if v.dtype not in (tf.float32, tf.float16, tf.bfloat16):
                    raise TypeError(
                        "LocalUpdateStrategy averages variables packed as float32; "
                        f"variable {v.name!r} has dtype {v.dtype.name} (supported: "
                        "float32, float16, bfloat16)."
                    )
            slots: List[tf.Variable] = []
            if self.average_optimizer_state:
                for k in key:
                    slots.extend(runtime.slots.get(k, []))
            averager = averagers_lib.get(
                self.averaging,
                alpha=self.alpha,
                outer_learning_rate=self.outer_learning_rate,
                outer_momentum=self.outer_momentum,
            )
            with tf.init_scope():
                initial = tf.concat(
                    [tf.reshape(tf.cast(v.read_value(), tf.float32), [-1]) for v in params], 0
                )
                averager.build(initial, self)
            runtime.groups[key] = _SyncGroup(params, slots, averager)
            self._sync_function = None  # retrace `synchronize` for the new group
            if self._checkpoint_module is not None:  # deferred restoration
                self._attach_checkpoint_state()
        group = runtime.groups[key]
        group.traced = group.traced or traced
        return group

    def _after_local_step(self, group: _SyncGroup) -> None:
        self.pending_steps.assign_add(1)
        pending = self.pending_steps.read_value()
        if self.sync_every == 1:
            self._sync(group)
            return

        def sync():
            self._sync(group)
            return tf.constant(True)

        tf.cond(pending >= self.sync_every, sync, lambda: tf.constant(False))

    def _flush_if_pending(self) -> None:
        groups = list(self._lu_runtime.groups.values())
        if not groups:
            return

        def sync():
            for group in groups:
                self._sync(group)
            return tf.constant(True)

        tf.cond(self.pending_steps.read_value() > 0, sync, lambda: tf.constant(False))

    def _sync(self, group: _SyncGroup) -> None:
        """One packed all-reduce, then the averager; cross-replica context."""
        variables = group.params + group.slots
        per_var = [self.experimental_local_results(v) for v in variables]
        num_local = len(per_var[0])
        sizes = [v.shape.num_elements() for v in variables]
        num_params = sum(sizes[: len(group.params)])
        flats = []
        for d in range(num_local):
            with tf.device(per_var[0][d].device):
                flats.append(
                    tf.concat(
                        [tf.reshape(tf.cast(pv[d], tf.float32), [-1]) for pv in per_var], 0
                    )
                )
        packed = _keras_fit.per_replica(flats)
        # The one collective (batch_reduce_to uses the strategy's configured
        # cross-device ops; MirroredExtended.reduce_to bypasses them on CPU).
        (mean,) = self.extended.batch_reduce_to(
            tf.distribute.ReduceOp.MEAN, [(packed, packed)]
        )
        means = list(self.experimental_local_results(mean))

        local_params = [f[:num_params] for f in flats]
        mean_params = [m[:num_params] for m in means]
        distances = []
        for w, w_bar in zip(local_params, mean_params):
            with tf.device(w.device):
                distances.append(tf.norm(w - w_bar))
        with tf.device(flats[0].device):
            self.local_divergence.assign(tf.add_n(distances) / float(num_local))
        new_params = group.averager.average(
            local_params, mean_params, self.num_replicas_in_sync
        )
        new_flats = []
        for d in range(num_local):
            with tf.device(flats[d].device):
                new_flats.append(tf.concat([new_params[d], means[d][num_params:]], 0))
        offset = 0
        for variable, size in zip(variables, sizes):
            pieces = []
            for d in range(num_local):
                with tf.device(new_flats[d].device):
                    pieces.append(
                        tf.cast(
                            tf.reshape(new_flats[d][offset : offset + size], variable.shape),
                            variable.dtype,
                        )
                    )
            offset += size
            value = _keras_fit.per_replica(pieces) if num_local > 1 else pieces[0]
            self.extended.update(variable, _assign, args=(value,), group=False)
        self.pending_steps.assign(0)
        self.sync_count.assign_add(1)


def _assign(variable, value):
    return variable.assign(value)


def _validate(
    sync_every=8,
    averaging="mean",
    average_optimizer_state=False,
    alpha=0.1,
    outer_learning_rate=0.7,
    outer_momentum=0.9,
) -> None:
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"`sync_every` must be an int >= 1, got {sync_every!r}.")
    if averaging not in averagers_lib.AVERAGING_NAMES:
        raise ValueError(
            f"`averaging` must be one of {averagers_lib.AVERAGING_NAMES}, got {averaging!r}."
        )
    if not isinstance(average_optimizer_state, bool):
        raise TypeError(
            f"`average_optimizer_state` must be a bool, got {average_optimizer_state!r}."
        )
    _check_number("alpha", alpha, 0.0, 1.0, True, True)
    _check_number("outer_learning_rate", outer_learning_rate, 0.0, float("inf"), True, True)
    _check_number("outer_momentum", outer_momentum, 0.0, 1.0, False, True)
