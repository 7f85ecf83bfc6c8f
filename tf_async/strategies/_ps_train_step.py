"""The asynchronous parameter-server train step (one scheduled closure = one step).

Per step, on a worker (all state lives on the parameter servers):

1. once the batch has arrived, ``v_read`` ← global version (number of updates
   applied so far);
2. one snapshot ``w_read`` of every trainable value (each remote variable is
   read once), forward + backward pass on that snapshot (Keras
   ``StatelessScope``), so the gradient is exactly ∇L(w_read); with a
   weight-predicting optimizer (DANA look-ahead, ``staleness.predicts_weights``)
   the snapshot is the optimizer's prediction ``h`` updates ahead: for a
   dense, unsharded variable made where the read ran, for a sharded one on
   the worker after its shards arrive, for a table read by rows on the rows
   read (the optimizer's slot rows at the same ids);
   an optimizer with per-worker state (DANA-Zero, ``staleness.worker_slots``)
   also gets the worker's index, sent with the step id in the fused transfer
   and published with τ (``staleness.current_worker()``);
3. the step takes a ticket: its position in the global update order;
4. τ = (updates applied between the read and this apply); τ and ``w_read`` are
   published through :func:`tf_async.staleness.publish` around
   ``optimizer.apply`` so compensating optimizers (DC-ASGD, DC-Adam,
   staleness-scaled) see them;
5. Keras' metric updates (loss tracker, compiled metrics) are computed as this
   step's contribution and added atomically on the PS; the step id is marked
   done (and, under SSP, the version advanced) once the apply has finished.

Transfers are fused (:mod:`_fused_transfer`): the snapshot comes to the worker
as one buffer per PS, and gradients, non-trainable updates, metric
contributions and the step id go back as one buffer per PS. A step of a small
model costs a handful of RPCs instead of one per tensor.

Fully asynchronous (``max_staleness=None``): the ticket is the atomic
fetch-and-increment of the version (``ResourceCountUpTo``), τ = ticket − v_read,
and workers apply concurrently (Hogwild-style, as TF's ParameterServerStrategy).

Bounded staleness (``max_staleness=k``): tickets come from a second counter and
updates are applied in ticket order (a ticket lock built from two atomic
counters: a step waits until ``turns served == ticket``). At its turn nobody
else applies, so τ = version − v_read exactly (the version counts applied
updates; a turn whose step is skipped as non-finite is served but applies
nothing). A step with
τ > k is *not dropped*: it recomputes its gradient on the current weights
(τ = 0, nobody else can apply meanwhile) and applies that. So every applied
step has τ ≤ k, and k = 0 is sequential (synchronous) SGD.

Non-finite guard (:mod:`_nonfinite`): where the apply runs (on the PS in
the fully asynchronous mode, at the step's turn under SSP) the step's
gradients, non-trainable updates and loss are checked; a step holding NaN/Inf
takes no ticket, applies nothing and is counted in ``nonfinite_skipped`` (or,
with ``on_nonfinite="raise"``, fails the fit naming step and worker). The
version counts applied updates only, so under SSP the ticket lock has its own
"turns served" counter: a skipped step still passes its turn on.

Exactly-once accounting: each scheduled step carries a step id; a step whose id
is already marked done (a closure retried by the coordinator after a worker
failure, whose first attempt did complete on the parameter server) is skipped.
In the fully asynchronous mode the ticket is taken on the PS only once all of
the step's tensors have arrived there, and the apply and done mark follow on
the PS, so a worker lost mid-step has either committed its step or not touched
the counters. Under SSP the worker takes its ticket before the apply (it waits
for its turn); a worker lost while holding its turn stalls the ticket lock:
bounded staleness is not worker-failure tolerant.
"""

from __future__ import annotations

from typing import List, Optional

import keras
import numpy as np
import tensorflow as tf

from tf_async import _keras_fit, staleness
from tf_async.keras_optimizers import _sparse_rows, row_sparse
from tf_async.strategies import _fused_transfer, _nonfinite, _table_locks, _table_rows

_COUNT_LIMIT = 2**62


def _deps(values) -> list:
    """Tensors to wait for (``IndexedSlices`` gradients contribute their values)."""
    out = []
    for value in values:
        if isinstance(value, tf.IndexedSlices):
            value = value.values
        if value is not None:
            out.append(value)
    return out


def _batch_tensors(data) -> list:
    """The tensors of a batch (components of sparse/ragged ones included)."""
    return [
        t for t in tf.nest.flatten(data, expand_composites=True)
        if isinstance(t, tf.Tensor)
    ]


def _fetch_and_increment(variable: tf.Variable) -> tf.Tensor:
    """Atomic ``old = v; v += 1; return old`` on an int64 resource variable."""
    return tf.raw_ops.ResourceCountUpTo(
        resource=variable.handle, limit=_COUNT_LIMIT, T=tf.int64
    )


# Completed-step marks are kept in a ring of this many slots (slot = step id mod
# size, value = step id + 1): far more than steps in flight or being retried.
DONE_RING_SIZE = 1 << 16


class PSCounters:
    """Step accounting variables on the parameter servers (int64)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        with strategy.scope():
            self.version = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="tf_async_version"
            )
            with strategy.extended.colocate_vars_with(self.version):
                self.tickets = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="tf_async_tickets"
                )
                self.tau_sum = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="tf_async_tau_sum"
                )
                self.tau_max = tf.Variable(
                    [0], dtype=tf.int64, trainable=False, name="tf_async_tau_max"
                )
                self.steps = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="tf_async_steps"
                )
                # SSP ticket lock: turns served (skipped steps pass theirs on).
                self.turns = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="tf_async_turns"
                )
                self.nonfinite = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="tf_async_nonfinite"
                )
                self.done = tf.Variable(
                    tf.zeros([DONE_RING_SIZE], tf.int64),
                    trainable=False,
                    name="tf_async_done",
                )

    def start(self, version: int) -> None:
        """Before a fit: the version continues from ``optimizer.iterations``."""
        self.version.assign(version)
        self.tickets.assign(0)
        self.turns.assign(0)

    def is_done(self, step_id) -> tf.Tensor:
        return tf.equal(tf.gather(self.done, step_id % DONE_RING_SIZE), step_id + 1)

    def reset_epoch_stats(self) -> None:
        self.tau_sum.assign(0)
        self.tau_max.assign([0])
        self.steps.assign(0)
        self.nonfinite.assign(0)

    def epoch_tensors(self):
        """(τ sum, τ max, applied steps, non-finite skipped) of the current
        epoch, as tensors."""
        return (self.tau_sum.read_value(), self.tau_max.read_value()[0],
                self.steps.read_value(), self.nonfinite.read_value())

    @staticmethod
    def stats_from(tau_sum, tau_max, steps, nonfinite) -> dict:
        """``staleness_mean`` / ``staleness_max`` / ``nonfinite_skipped`` logs
        from ``epoch_tensors()``."""
        steps = int(steps)
        return {
            "staleness_mean": float(tau_sum) / max(steps, 1),
            "staleness_max": float(tau_max),
            "nonfinite_skipped": float(nonfinite),
        }


class TrainStep:
    """Builds the per-step replica function for one compiled Keras model."""

    def __init__(self, model: keras.Model, counters: PSCounters, max_staleness: Optional[int],
                 on_nonfinite: str = "skip", look_ahead_horizon: float = 0.0):
        self.model = model
        self.look_ahead_horizon = float(look_ahead_horizon)
        self.counters = counters
        self.max_staleness = max_staleness
        self.on_nonfinite = _nonfinite.check_on_nonfinite(on_nonfinite)
        self._updated_non_trainable: Optional[List[int]] = None
        self._row_tables: dict = {}  # input signature -> tables read as rows
        self._table_locks = _table_locks.TableLocks()

    # -- forward/backward on a snapshot ---------------------------------------
    def _loss(self, x, y, sample_weight):
        model = self.model
        if _keras_fit.call_has_training_arg(model):
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        loss = _keras_fit.compute_loss(model, x, y, y_pred, sample_weight)
        scaled = model.optimizer.scale_loss(loss) if model.optimizer else loss
        return y_pred, loss, scaled

    def _tables(self, x, y, sample_weight) -> dict:
        """The embedding tables snapshotted as rows (:mod:`_table_rows`),
        ``{id(variable): variable}``, decided once per input signature."""
        signature = repr(tf.nest.map_structure(_table_rows._spec, (x, y, sample_weight)))
        if signature not in self._row_tables:
            self._row_tables[signature] = _table_rows.tables_read_by_rows(
                self.model, x, y, sample_weight, self._loss
            )
        return self._row_tables[signature]

    def _forward_backward(self, values, x, y, sample_weight, after=()):
        """Forward + backward pass on the snapshot ``values`` (``None`` for a
        table read as rows: its rows are read during the pass, after ``after``).

        Returns ``(gradients, y_pred, loss, updates, row_reads)``; a table's
        gradient is ``IndexedSlices`` of the unique ids looked up and its
        ``row_reads`` entry the rows read (``IndexedSlices``, same ids).
        """
        model = self.model
        trainable = model.trainable_variables
        non_trainable = model.non_trainable_variables
        tables = self._tables(x, y, sample_weight)
        dense = [i for i, v in enumerate(trainable) if id(v) not in tables]
        dense_values = [values[i] for i in dense]

        predicting = []  # non-empty while the optimizer predicts a table's rows

        def guard(variable):
            # The optimizer's slot lookup resolves the table's Keras variable
            # (``_get_variable_index`` -> ``.value``): not a read of it.
            if id(variable) in tables and not predicting:
                raise RuntimeError(
                    f"tf_async: table {variable.path} was read whole inside the "
                    "step although the probe found only row lookups (a bug)."
                )

        predict = self._predictor()
        predict_rows = None
        if predict is not None:
            def predict_rows(table, rows, ids):
                predicting.append(True)
                try:
                    return predict(table, rows, ids=ids)
                finally:
                    predicting.pop()

        with tf.GradientTape() as tape:
            tape.watch(dense_values)
            table_rows = _table_rows.StepRows(tables, tape, after, predict=predict_rows)
            mapping = [(trainable[i], values[i]) for i in dense]
            with _keras_fit.embedding_lookup(table_rows.lookup), \
                    _keras_fit.VariableReadScope(mapping, on_read=guard) as scope:
                y_pred, loss, scaled = self._loss(x, y, sample_weight)
        sources = table_rows.sources()
        computed = tape.gradient(scaled, dense_values + sources)
        gradients: list = [None] * len(trainable)
        for i, gradient in zip(dense, computed[:len(dense)]):
            gradients[i] = gradient
        row_reads: list = [None] * len(trainable)
        by_table = table_rows.gradients_and_reads(computed[len(dense):])
        for i, variable in enumerate(trainable):
            if id(variable) in by_table:
                gradients[i], row_reads[i] = by_table[id(variable)]
        new_non_trainable = [scope.get_current_value(v) for v in non_trainable]
        if self._updated_non_trainable is None:
            self._updated_non_trainable = [
                i for i, value in enumerate(new_non_trainable) if value is not None
            ]
        updates = [new_non_trainable[i] for i in self._updated_non_trainable]
        return gradients, y_pred, loss, updates, row_reads

    def _predictor(self):
        """``predict(variable, value, ids=None)``: the optimizer's look-ahead
        ``look_ahead_horizon`` updates ahead, or None (no horizon, or an
        optimizer that does not predict weights)."""
        optimizer, horizon = self.model.optimizer, self.look_ahead_horizon
        if not (horizon > 0 and staleness.predicts_weights(optimizer)):
            return None

        def predict(variable, value, ids=None):
            return staleness.predicted_read(optimizer, variable, value, horizon, ids=ids)

        return predict

    def _read_variables(self, x, y, sample_weight, after=()):
        """One snapshot of every trainable variable (each read once), fused
        into one transfer per parameter server (:mod:`_fused_transfer`);
        tables read as rows are not read here (``None``): the forward pass
        reads their rows (:mod:`_table_rows`).

        Returns ``(commit_values, values)``: ``values`` is the snapshot on the
        worker (for the forward pass), ``commit_values`` the same snapshot where
        the reads ran (so optimizers that use ``w_read`` on the PS, such as
        DC-ASGD, cost no transfer back). The reads run after the ops ``after``.
        """
        tables = self._tables(x, y, sample_weight)
        predict = self._predictor()
        reads, shard_counts = [], []
        # Only the reads wait for ``after``: a control edge into the worker's
        # part of the graph would cost one more cross-device message.
        with tf.control_dependencies(after):
            for variable in self.model.trainable_variables:
                if id(variable) in tables:
                    shard_counts.append(0)
                    continue
                target = variable.value
                parts = getattr(target, "variables", None) or [target]  # shards
                for part in parts:
                    with tf.device(part.device):
                        read = part.read_value()
                        if predict is not None and len(parts) == 1:
                            # DANA look-ahead, where the read ran: the step's
                            # snapshot is the optimizer's prediction.
                            read = predict(variable, read)
                        reads.append(read)
                shard_counts.append(len(parts))
        received = _fused_transfer.send(reads, [None] * len(reads))
        values, commit_values = [], []
        first = 0
        for index, count in enumerate(shard_counts):
            if count == 0:  # a table: rows read in the forward pass
                values.append(None)
                commit_values.append(None)
            elif count == 1:
                values.append(received[first])
                commit_values.append(reads[first])
            else:  # a ShardedVariable: its shards concatenated on the worker
                value = tf.concat(received[first:first + count], axis=0)
                if predict is not None:  # the look-ahead of the whole variable
                    value = predict(self.model.trainable_variables[index], value)
                values.append(value)
                commit_values.append(value)
            first += count
        return commit_values, values

    @staticmethod
    def _with_rows(commit_values, row_reads) -> list:
        """The step's ``w_read``: the dense snapshot, a table's rows read."""
        return [rows if rows is not None else value
                for value, rows in zip(commit_values, row_reads)]

    def _apply(self, gradients, values, tau, worker=None) -> tf.Operation:
        """``optimizer.apply`` inside the StepContext; returns a group of its ops.

        A table's update (row-sparse gradient) runs holding the table's lock
        (:mod:`_table_locks`): concurrent steps never lose a row's increment.
        Automatic control dependencies order only ops on the same resource, so
        the group is what later counter updates wait for.
        """
        model = self.model
        trainable = model.trainable_variables
        tables = [v for g, v in zip(gradients, trainable) if isinstance(g, tf.IndexedSlices)]
        # A table read by rows (its w_read is the rows read) has a gradient
        # over the worker's unique ids: no second ``tf.unique`` on the PS.
        deduplicated = [g for g, value in zip(gradients, values)
                        if isinstance(g, tf.IndexedSlices) and isinstance(value, tf.IndexedSlices)]
        graph = tf.compat.v1.get_default_graph()
        first = len(graph.get_operations())
        with staleness.publish(tau, trainable, values, worker=worker), row_sparse.updates(
            model.optimizer, gradients, trainable
        ), self._table_locks.exclusive(tables), _sparse_rows.unique_indices(deduplicated):
            model.optimizer.apply(gradients, trainable)
        created = graph.get_operations()[first:]
        return tf.group(*created) if created else tf.no_op()

    # -- the replica function ---------------------------------------------------
    def replica_fn(self, step_id, data):
        """One training step; call in a replica context of the strategy."""
        counters = self.counters
        ps = counters.version.device
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Read once the batch is here: time spent waiting for input must not
        # make the gradient staler (straggler benchmark: mean τ 1.37 → 0.44,
        # same steps/s).
        with tf.control_dependencies(_batch_tensors(data)):
            with tf.device(ps):
                v_read = counters.version.read_value()
        commit_values, values = self._read_variables(x, y, sample_weight, after=[v_read])
        gradients, y_pred, loss, updates, row_reads = self._forward_backward(
            values, x, y, sample_weight, after=[v_read]
        )
        commit_values = self._with_rows(commit_values, row_reads)

        # Only "raise" names the worker (a per-call value sent to the PS).
        worker = self._worker_index()
        # An optimizer with per-worker state (DANA-Zero) is told whose step
        # this is: the worker index rides along with the step id.
        slot_worker = self._slot_worker()
        if self.max_staleness is None:
            # The commit runs on the PS. The worker sends the gradients, the
            # non-trainable updates, the metric contributions, the step id
            # (and the worker index) in one fused transfer per PS, and gets
            # nothing back.
            deltas = self._metric_deltas(x, y, y_pred, loss, sample_weight)
            gradients, updates, deltas, step_id, slot_worker = self._send_to_ps(
                _nonfinite.fold_loss_into(gradients, loss), updates, deltas, step_id,
                slot_worker,
            )

            def apply():
                with tf.control_dependencies(_deps(gradients)):
                    ticket = _fetch_and_increment(counters.version)
                tau = ticket - v_read
                with tf.control_dependencies([ticket]):
                    applied = self._apply(gradients, commit_values, tau, slot_worker)
                return self._finish(step_id, applied, updates, deltas, tau)

            # A closure retried by the coordinator after its first attempt
            # completed on the parameter servers is not applied twice. One
            # cond on the common path (a fresh, finite step applies): nesting
            # the finite check inside a "not done" cond cost ~10 % of a small
            # step (embedding_scale, 1 PS, 1e3 rows).
            with tf.device(ps):
                already_done = counters.is_done(step_id)
                finite = _nonfinite.all_finite(list(gradients) + list(updates))
                self._apply_if_finite(finite, apply, step_id, worker, already_done=already_done)
        else:
            def commit():  # recomputes on the worker
                return self._bounded_commit(
                    step_id, worker, v_read, gradients, commit_values, y_pred, loss,
                    updates, x, y, sample_weight, slot_worker,
                )

            with tf.device(ps):
                already_done = counters.is_done(step_id)  # a retried closure: as above
            tf.cond(already_done, lambda: tf.constant(False), commit)

    def _send_to_ps(self, gradients, updates, deltas, step_id, slot_worker=None):
        """Moves the step's results to the PS tasks that use them, fused
        (``slot_worker``, if not None, travels with the step id)."""
        ps = self.counters.version.device

        def home(variable):
            target = variable.value
            return ps if hasattr(target, "variables") else target.device  # shards: via ps

        non_trainable = self.model.non_trainable_variables
        extra = [] if slot_worker is None else [slot_worker]
        tensors = (
            list(gradients) + list(updates) + [flat for _, _, flat in deltas] + [step_id]
            + extra
        )
        destinations = (
            [home(v) for v in self.model.trainable_variables]
            + [home(non_trainable[i]) for i in self._updated_non_trainable]
            + [device or ps for device, _, _ in deltas]
            + [ps] + [ps] * len(extra)
        )
        moved = _fused_transfer.send(tensors, destinations)
        n_g, n_u, n_d = len(gradients), len(updates), len(deltas)
        gradients = moved[:n_g]
        updates = moved[n_g:n_g + n_u]
        deltas = [
            (device, targets, flat)
            for (device, targets, _), flat in zip(deltas, moved[n_g + n_u:n_g + n_u + n_d])
        ]
        step_id = moved[n_g + n_u + n_d]
        return gradients, updates, deltas, step_id, (moved[-1] if extra else None)

    def _finish(self, step_id, applied, updates, deltas, tau):
        """Metrics and staleness statistics (need not wait for the apply), then
        non-trainable updates and the done mark once the apply has finished."""
        self._add_metrics(deltas)
        self._record_staleness(tau)
        with tf.control_dependencies([applied]):
            for index, value in zip(self._updated_non_trainable, updates):
                self.model.non_trainable_variables[index].assign(value)
            self._mark_done(step_id, applied=True)
        return tf.constant(True)

    def _skip(self, step_id):
        """A non-finite step: counted and marked done, nothing else changes."""
        with tf.device(self.counters.version.device):
            self.counters.nonfinite.assign_add(tf.constant(1, tf.int64))
        self._mark_done(step_id, applied=False)
        return tf.constant(True)

    def _worker_index(self):
        if self.on_nonfinite != "raise":
            return None
        return tf.distribute.coordinator.experimental_get_current_worker_index()

    def _slot_worker(self):
        """This worker's index (int64) for an optimizer with per-worker state
        (``staleness.worker_slots``), else None."""
        if staleness.worker_slots(self.model.optimizer) is None:
            return None
        index = tf.distribute.coordinator.experimental_get_current_worker_index()
        return tf.cast(index, tf.int64)

    def _apply_if_finite(self, finite, apply, step_id, worker, release=None,
                         already_done=None):
        """``apply()`` if ``finite``, else ``_skip``; then ``release`` (SSP:
        the next turn may go) and, with ``on_nonfinite="raise"``, the check
        that fails the fit — after the release, so no other step waits forever.

        With ``already_done`` (a bool tensor: the step id is marked done, the
        closure is a retry whose first attempt committed) nothing happens for
        a done step: ``apply()`` iff not done and finite, ``_skip`` iff not
        done and not finite.
        """
        if already_done is None:
            done = tf.cond(finite, apply, lambda: self._skip(step_id))
            checked = finite
        else:
            fresh_and_finite = tf.logical_and(tf.logical_not(already_done), finite)
            done = tf.cond(fresh_and_finite, apply, lambda: tf.cond(
                already_done, lambda: tf.constant(False), lambda: self._skip(step_id)))
            checked = tf.logical_or(finite, already_done)
        if release is not None:
            done = release(done)
        if self.on_nonfinite == "raise":
            with tf.control_dependencies([done]):
                _nonfinite.assert_finite(checked, step_id, worker)
        return done

    def _bounded_commit(self, step_id, worker, v_read, gradients, values, y_pred, loss,
                        updates, x, y, sw, slot_worker=None):
        counters = self.counters
        with tf.control_dependencies(_deps(gradients)):
            ticket = _fetch_and_increment(counters.tickets)

        # Ticket lock: wait for our turn in the global update order (the turn
        # read is a loop variable, so what follows depends on its data).
        with tf.control_dependencies([ticket]):
            first_seen = counters.turns.read_value()
        _, seen = tf.while_loop(
            lambda i, seen: seen < ticket,
            lambda i, seen: (i + 1, counters.turns.read_value()),
            [tf.constant(0, tf.int64), first_seen],
            parallel_iterations=1,
        )
        # Our turn: nobody else applies until we pass it on, so the version
        # (updates applied) minus the read is exactly τ.
        with tf.control_dependencies([seen]):
            tau_read = counters.version.read_value() - v_read

        def fresh():
            fresh_commit_values, fresh_values = self._read_variables(x, y, sw)
            g, p, l, u, row_reads = self._forward_backward(fresh_values, x, y, sw)
            fresh_commit_values = self._with_rows(fresh_commit_values, row_reads)
            return g, fresh_commit_values, p, l, u, tf.constant(0, tf.int64)

        def stale():
            return gradients, values, y_pred, loss, updates, tau_read

        result = tf.cond(tau_read > self.max_staleness, fresh, stale)
        gradients, values, y_pred, loss, updates, tau = result
        gradients, updates = list(gradients), list(updates)

        def apply():
            applied = self._apply(gradients, list(values), tau, slot_worker)
            deltas = self._metric_deltas(x, y, y_pred, loss, sw)
            return self._finish(step_id, applied, updates, deltas, tau)

        def release(done):
            with tf.control_dependencies([done]), tf.device(counters.version.device):
                counters.turns.assign_add(tf.constant(1, tf.int64))
                return tf.identity(done)

        finite = _nonfinite.all_finite(gradients + updates + [loss])
        return self._apply_if_finite(finite, apply, step_id, worker, release)

    def _record_staleness(self, tau):
        counters = self.counters
        counters.tau_sum.assign_add(tau)
        tf.raw_ops.ResourceScatterMax(
            resource=counters.tau_max.handle,
            indices=tf.constant([0], tf.int32),
            updates=tf.reshape(tau, [1]),
        )
        counters.steps.assign_add(tf.constant(1, tf.int64))

    def _mark_done(self, step_id, applied: bool):
        """After the apply (or the skip): step ``step_id`` completed; under SSP
        an applied step also advances the version (updates applied)."""
        counters = self.counters
        with tf.device(counters.version.device):  # no round trip via the worker
            tf.raw_ops.ResourceScatterUpdate(
                resource=counters.done.handle,
                indices=tf.reshape(step_id % DONE_RING_SIZE, [1]),
                updates=tf.reshape(step_id + 1, [1]),
            )
            if applied and self.max_staleness is not None:
                counters.version.assign_add(tf.constant(1, tf.int64))

    def _metric_deltas(self, x, y, y_pred, loss, sample_weight):
        """This step's contribution to Keras' metric variables, grouped by PS.

        The updates run in a ``StatelessScope`` with every metric variable
        mapped to zero, so what they would write is this step's contribution
        (Keras' metric states are sums and counts: ``Mean`` total/count,
        confusion-matrix counts, ...). Contributions are concatenated per
        parameter server (one transfer); returns ``(device, targets, flat)``s.
        """
        model = self.model
        variables = list(model.metrics_variables)
        batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        zeros = [(v, tf.zeros(v.shape, v.dtype)) for v in variables]
        with keras.StatelessScope(state_mapping=zeros) as scope:
            _keras_fit.loss_tracker(model).update_state(loss, sample_weight=batch)
            metrics = _keras_fit.compile_metrics(model)
            if metrics is not None:
                metrics.update_state(y, y_pred, sample_weight=sample_weight)
        groups: dict = {}
        for v in variables:
            delta = scope.get_current_value(v)
            if delta is None:
                continue
            target = v.value  # the tf.Variable (or ShardedVariable) on the PS
            key = (getattr(target, "device", ""), target.dtype)
            groups.setdefault(key, []).append((target, tf.cast(delta, target.dtype)))
        return [
            (device, [t for t, _ in pairs],
             tf.concat([tf.reshape(d, [-1]) for _, d in pairs], axis=0))
            for (device, _), pairs in groups.items()
        ]

    @staticmethod
    def _add_metrics(deltas):
        """Adds ``_metric_deltas`` atomically on the PS (``AssignAddVariableOp``):
        concurrent workers never lose an update, even for metrics whose Keras
        code is ``assign(v + x)`` (e.g. Precision, AUC)."""
        for device, targets, flat in deltas:
            with tf.device(device or None):
                parts = tf.split(flat, [int(np.prod(t.shape)) for t in targets])
                for target, part in zip(targets, parts):
                    target.assign_add(tf.reshape(part, target.shape), read_value=False)
