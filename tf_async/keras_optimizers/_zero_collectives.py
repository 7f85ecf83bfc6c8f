"""ZeRO-1's two collectives on tf.distribute: reduce-scatter and all-gather.

With N replicas and a flat vector of N·S elements on every replica:

    reduce_scatter:  replica r receives  Σ_j flat_j[r·S : (r+1)·S]      ([S])
    all_gather:      every replica receives concat_j piece_j             ([N·S])

Per replica, a reduce-scatter moves (N−1)/N of the vector and an all-gather
(N−1)/N of the result: together exactly one all-reduce, 2(N−1)/N of the
vector (Rajbhandari et al., SC 2020, §7; what DeepSpeed and PyTorch's
ZeroRedundancyOptimizer do). Both run inside the replica function:

* ``CollectiveAllReduce`` cross-device ops (``MultiWorkerMirroredStrategy``;
  ``MirroredStrategy``'s default on CPU): collective ops with the strategy's
  own group and instance keys. The reduce-scatter is an all-to-all exchange of
  the N blocks followed by a local sum (TF 2.21 has no CPU kernel for
  ``CollectiveReduceScatterV2``); the all-gather is ``all_gather_v2``.
* any other cross-device ops (``ReductionToOneDevice``, NCCL /
  hierarchical copy), in a ``merge_call``: block r of every replica is
  sliced on that replica's device and reduced onto replica r's device with
  ``extended.batch_reduce_to`` (the strategy's own reduction, so the sums
  are the ones Keras' all-reduce computes); the all-gather copies the
  pieces to every device and concatenates them.
* ``TPUStrategy`` (no merge call): XLA's ``AllToAll`` and the replica
  context's ``all_gather``. Untested here (no TPU).

``count_bytes()`` records, at trace time, the bytes each replica hands to
these collectives and to ``ReplicaContext.all_reduce`` (what Keras'
optimizers use), for the benchmark and tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Dict, List

import tensorflow as tf

from tf_async import _keras_fit

ALL_REDUCE = "all_reduce"
REDUCE_SCATTER = "reduce_scatter"
ALL_GATHER = "all_gather"


def replica_id(context) -> tf.Tensor:
    """This replica's index in the sync group, as a tensor (not static on TPU)."""
    return context.replica_id_in_sync_group


def block(flat: tf.Tensor, index, size: int) -> tf.Tensor:
    """``flat[index·size : (index+1)·size]``: static size, offset maybe dynamic."""
    if isinstance(index, int):
        return flat[index * size : (index + 1) * size]
    begin = tf.reshape(tf.cast(index, tf.int32) * size, [1])
    return tf.slice(flat, begin, [size])


def reduce_scatter(context, flat: tf.Tensor, num_replicas: int) -> tf.Tensor:
    """Σ over replicas of this replica's block of ``flat`` (length N·S)."""
    _record(REDUCE_SCATTER, flat)
    strategy = context.strategy
    if _is_tpu(strategy):
        blocks = tf.raw_ops.AllToAll(
            input=tf.reshape(flat, [num_replicas, -1]),
            group_assignment=tf.constant([list(range(num_replicas))]),
            concat_dimension=0,
            split_dimension=0,
            split_count=num_replicas,
        )
        return tf.add_n(tf.unstack(blocks, num_replicas))
    return context.merge_call(_reduce_scatter_merge, args=(flat, num_replicas))


def all_gather(context, piece: tf.Tensor, num_replicas: int) -> tf.Tensor:
    """Every replica's ``piece`` (length S), concatenated in replica order."""
    _record(ALL_GATHER, piece)
    if _is_tpu(context.strategy):
        return context.all_gather(piece, axis=0)
    return context.merge_call(_all_gather_merge, args=(piece, num_replicas))


def _is_tpu(strategy) -> bool:
    return isinstance(
        strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)
    )


def _reduce_scatter_merge(strategy, flat, num_replicas: int):
    values = strategy.experimental_local_results(flat)
    launchers = _keras_fit.collective_launchers(strategy)
    outputs = []
    if launchers is not None:
        for launcher, value in zip(launchers, values):
            received = _keras_fit.collective_all_to_all(
                launcher, tf.reshape(value, [num_replicas, -1])
            )
            with tf.device(_keras_fit.launcher_device(launcher)):
                outputs.append(tf.add_n(tf.unstack(received, num_replicas)))
    else:
        # Block r of every replica, reduced onto replica r's device by the
        # strategy's own cross-device ops (the same sum Keras' all-reduce does).
        devices = strategy.extended.worker_devices
        size = int(values[0].shape[0]) // num_replicas
        pairs = []
        for r, device in enumerate(devices):
            parts = []
            for j, value in enumerate(values):
                with tf.device(devices[j]):
                    parts.append(block(value, r, size))
            pairs.append((_keras_fit.per_replica(parts), device))
        reduced = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, pairs)
        outputs = [strategy.experimental_local_results(v)[0] for v in reduced]
    return _keras_fit.per_replica(outputs)


def _all_gather_merge(strategy, piece, num_replicas: int):
    values = strategy.experimental_local_results(piece)
    launchers = _keras_fit.collective_launchers(strategy)
    if launchers is not None:
        outputs = [
            _keras_fit.collective_all_gather(launcher, value)
            for launcher, value in zip(launchers, values)
        ]
    else:
        outputs = []
        for device in strategy.extended.worker_devices:
            with tf.device(device):
                outputs.append(tf.concat(list(values), axis=0))
    return _keras_fit.per_replica(outputs)


# --------------------------------------------------------- byte accounting
@dataclasses.dataclass
class ByteCount:
    """Bytes handed to collectives, summed over the local replicas' traces."""

    local_replicas: int
    by_kind: Dict[str, int] = dataclasses.field(default_factory=dict)

    def per_replica(self, kind: str) -> float:
        return self.by_kind.get(kind, 0) / self.local_replicas

    def input_bytes(self) -> float:
        """Bytes entering collectives, per replica per step."""
        return sum(self.per_replica(kind) for kind in self.by_kind)

    def wire_bytes(self, num_replicas: int) -> float:
        """Bytes a replica sends per step with bandwidth-optimal algorithms.

        All-reduce of B bytes: 2(N−1)/N·B (ring); reduce-scatter of B:
        (N−1)/N·B; all-gather of a b-byte piece: (N−1)·b.
        """
        n = num_replicas
        return (
            2 * (n - 1) / n * self.per_replica(ALL_REDUCE)
            + (n - 1) / n * self.per_replica(REDUCE_SCATTER)
            + (n - 1) * self.per_replica(ALL_GATHER)
        )


_COUNTERS: List[ByteCount] = []


def _nbytes(values) -> int:
    total = 0
    for value in tf.nest.flatten(values, expand_composites=False):
        if isinstance(value, tf.IndexedSlices):
            parts = [value.values, value.indices]
        else:
            parts = [value]
        for part in parts:
            part = tf.convert_to_tensor(part)
            total += int(part.shape.num_elements()) * part.dtype.size
    return total


def _record(kind: str, values) -> None:
    if _COUNTERS:
        size = _nbytes(values)
        for counter in _COUNTERS:
            counter.by_kind[kind] = counter.by_kind.get(kind, 0) + size


@contextlib.contextmanager
def count_bytes(strategy):
    """Counts collective input bytes of everything traced inside the block.

    Trace a step once inside it (e.g. ``step.get_concrete_function(...)``);
    ``ReplicaContext.all_reduce`` (Keras' gradient all-reduce) is counted too.
    """
    counter = ByteCount(len(strategy.extended.worker_devices))
    replica_context = tf.distribute.ReplicaContext
    had_own = "all_reduce" in replica_context.__dict__
    original = replica_context.all_reduce
    nesting = threading.local()  # MirroredStrategy runs replicas in threads

    def counting_all_reduce(self, reduce_op, value, options=None):
        depth = getattr(nesting, "depth", 0)
        if depth == 0:
            _record(ALL_REDUCE, value)
        nesting.depth = depth + 1
        try:
            return original(self, reduce_op, value, options)
        finally:
            nesting.depth = depth

    replica_context.all_reduce = counting_all_reduce
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)
        if had_own:
            replica_context.all_reduce = original
        else:
            del replica_context.all_reduce
