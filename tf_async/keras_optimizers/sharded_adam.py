"""ShardedAdam: Adam / AdamW with ZeRO-1 partitioned optimizer state.

ZeRO stage 1 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC 2020): with N data-parallel replicas, replica r
keeps only a contiguous 1/N slice of the flattened Adam moments m and v. Per
step, in replica r (``_sharded_step``):

    g_r   = Σ_replicas g_replica[slice r]              (reduce-scatter)
    m_r  ← m_r + (g_r − m_r)(1 − β1)                   (slice r only)
    v_r  ← v_r + (g_r² − v_r)(1 − β2)
    α_t   = lr · sqrt(1 − β2^t) / (1 − β1^t)
    w_r  ← w_r − λ·lr·w_r  (AdamW decay, if weight_decay=λ)
    w_r  ← w_r − α_t · m_r / (sqrt(v_r) + ε)
    w     = all_gather_r(w_r)                           (every replica)

The gradient is never all-reduced: each replica receives only the sum of its
own slice, and the new parameters are all-gathered once, so a replica moves
what one all-reduce of the gradient moves (ZeRO-1's communication volume;
``_zero_collectives``: an all-to-all collective plus a local sum and
``all_gather_v2`` under ``CollectiveAllReduce``, the strategy's own
``batch_reduce_to`` per block otherwise). The update is Keras' Adam, element
for element (same ops, same order), so results match
``keras.optimizers.Adam`` / ``AdamW`` (bit for bit where the summation order
is the same, else to ~1e-6). The replica id may be a tensor (TPU): slices
have static sizes and dynamic offsets. With ``use_ema`` the moving average is
a third sharded slot. Model variables are grouped by dtype; each group is
flattened and padded by at most N − 1 elements (``_flat_layout.FlatLayout``).

State placement by strategy:
  * no strategy / default / ``OneDeviceStrategy`` / ``MirroredStrategy`` /
    ``MultiWorkerMirroredStrategy`` / ``TPUStrategy``: the sharded scheme
    above (N = number of replicas in sync; N = 1 is plain Adam). The slices
    are ``ON_READ`` / ``NONE`` variables: one component per replica device,
    each holding only that replica's slice. Under MultiWorkerMirrored a
    worker holds its own replicas' slices (global shard = replica id in sync);
    reading the logical state all-gathers the others (``_shard_values``).
    TPUStrategy is untested (no TPU); its dynamic replica id is tested on CPU.
  * ``tf.distribute.experimental.ParameterServerStrategy`` (and subclasses):
    per-variable slots created beside their variable on the parameter servers
    (Keras colocates them), so workers hold no optimizer state. A gradient
    that arrives as rows (``tf.IndexedSlices``: an embedding table under the
    row-sparse step of ``AsyncParameterServerStrategy``, also one split over
    several parameter servers) updates only those rows, with LazyAdam
    semantics (``lazy.adam_rows``: duplicate ids summed, m, v and w of the
    touched rows only, bias correction at ``iterations + 1`` as Keras Adam);
    dense gradients get Keras Adam exactly.

Checkpoints (``tf.train.Checkpoint`` and ``model.save``) hold the *logical*
per-variable m and v (full shapes, Adam's order), so they restore into any N.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_async import _keras_fit
from tf_async.keras_optimizers._arguments import check_adam_arguments
from tf_async.keras_optimizers import _sparse_rows, _zero_collectives, lazy
from tf_async.keras_optimizers._flat_layout import FlatLayout

_MODE_SHARDED = "sharded"
_MODE_PARAMETER_SERVER = "parameter_server"


def _strategy_mode(strategy: tf.distribute.Strategy) -> str:
    """``"sharded"`` or ``"parameter_server"``; ValueError for anything else."""
    if _is_local_update(strategy):
        raise ValueError(
            "ShardedAdam cannot run under tf_async LocalUpdateStrategy: ZeRO-1 "
            "splits Adam's m and v because every replica applies the same summed "
            "gradient, so replica r needs only slice r of the state. Under local "
            "updates each replica applies its own gradient to its own copy of all "
            "parameters and needs its own full m and v. Use keras.optimizers.Adam "
            "there (per-replica state; average_optimizer_state=True averages it)."
        )
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return _MODE_SHARDED
    if isinstance(
        strategy,
        (
            tf.distribute.MirroredStrategy,
            tf.distribute.OneDeviceStrategy,
            tf.distribute.MultiWorkerMirroredStrategy,
            tf.distribute.TPUStrategy,
            tf.distribute.experimental.TPUStrategy,
        ),
    ):
        return _MODE_SHARDED
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        return _MODE_PARAMETER_SERVER
    if type(strategy).__name__ == "AsyncParameterServerStrategy":
        return _MODE_PARAMETER_SERVER
    name = f"{type(strategy).__module__}.{type(strategy).__name__}"
    if isinstance(strategy, tf.distribute.experimental.CentralStorageStrategy):
        raise ValueError(
            f"ShardedAdam does not support {name}: it keeps every variable, the "
            "optimizer state included, on one central device, so there is no "
            "per-replica copy of m and v to split. Use keras.optimizers.Adam there."
        )
    raise ValueError(
        f"ShardedAdam does not support the distribution strategy {name}: it "
        "splits Adam's state by the strategy's replicas and must know how that "
        "strategy places per-replica variables and runs collectives, which it "
        "knows only for: no strategy, tf.distribute.OneDeviceStrategy, "
        "MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy, "
        "tf.distribute.experimental.ParameterServerStrategy and tf_async "
        "AsyncParameterServerStrategy. Use keras.optimizers.Adam there."
    )


def _is_local_update(strategy: tf.distribute.Strategy) -> bool:
    from tf_async.strategies.local_update import LocalUpdateStrategy

    return isinstance(strategy, LocalUpdateStrategy)


class _ShardGroup:
    """Flat layout and sharded slots of all model variables of one dtype.

    A plain (non-trackable) object on purpose: the per-replica slices are not
    checkpointed as such; the logical tensors are (``CheckpointedTensor``).
    """

    def __init__(
        self,
        dtype: tf.DType,
        indices: List[int],
        layout: FlatLayout,
        slots: Dict[str, tf.Variable],
    ) -> None:
        self.dtype = dtype
        self.indices = indices  # optimizer variable indices, in flat order
        self.layout = layout
        self.slots = slots  # slot name -> ON_READ variable, one slice per replica


@keras.saving.register_keras_serializable(package="tf_async")
class ShardedAdam(keras.optimizers.Adam):
    """Adam (AdamW with ``weight_decay``) whose m, v are split over replicas.

    Same arguments and results as ``keras.optimizers.Adam``; under
    ``MirroredStrategy`` with N replicas each replica stores 1/N of the
    optimizer state (ZeRO-1). See the module docstring for the formula.

    Args:
        learning_rate: float >= 0, a ``LearningRateSchedule`` or a callable.
        beta_1: decay of the first moment, in [0, 1).
        beta_2: decay of the second moment, in [0, 1).
        epsilon: > 0, added to sqrt(v).
        amsgrad: bool, keep the running maximum of v (AMSGrad).
        weight_decay: None or >= 0; decoupled decay (AdamW).
        **kwargs: the other ``keras.optimizers.Optimizer`` arguments
            (clipnorm, clipvalue, global_clipnorm, loss_scale_factor, name).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: Optional[float] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        learning_rate = check_adam_arguments(
            learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay,
            zero_learning_rate=True, tensor_betas=False,
        )
        if kwargs.get("gradient_accumulation_steps"):
            raise ValueError(
                "ShardedAdam does not support `gradient_accumulation_steps` (its "
                "accumulators would not be sharded). Received: "
                f"gradient_accumulation_steps={kwargs['gradient_accumulation_steps']!r}"
            )
        mode = _strategy_mode(tf.distribute.get_strategy())
        if mode == _MODE_PARAMETER_SERVER and kwargs.get("use_ema"):
            raise ValueError(
                "ShardedAdam does not support `use_ema` under a parameter-server "
                "strategy (the asynchronous step does not maintain the average). "
                "Received: use_ema=True"
            )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self._mode = mode
        self._groups: tuple = ()
        self._logical_order: tuple = ()

    # ------------------------------------------------------------------ build
    @property
    def num_shards(self) -> int:
        """N: replicas the state is split over (1 under a PS strategy)."""
        if self._mode != _MODE_SHARDED:
            return 1
        return self._distribution_strategy.num_replicas_in_sync

    def _slot_names(self) -> List[str]:
        return (
            ["momentum", "velocity"]
            + (["velocity_hat"] if self.amsgrad else [])
            + (["average"] if self.use_ema else [])
        )

    def build(self, var_list: Sequence[Any]) -> None:
        """Creates the state: per-replica flat slices, or PS-colocated slots."""
        if self.built:
            return
        if self._mode == _MODE_PARAMETER_SERVER:
            super().build(var_list)
            return
        current = tf.distribute.get_strategy()
        if tf.distribute.has_strategy() and current is not self._distribution_strategy:
            raise ValueError(
                "ShardedAdam must be created inside the same strategy scope it is "
                f"built in; it was created under {type(self._distribution_strategy).__name__}"
                f" but is built under {type(current).__name__}. Construct it inside "
                "`strategy.scope()`."
            )
        # The strategy may have become a LocalUpdateStrategy since __init__.
        _strategy_mode(self._distribution_strategy)
        # Indices and iterations; not the full-size EMA copies (sharded below).
        use_ema, self.use_ema = self.use_ema, False
        try:
            keras.optimizers.Optimizer.build(self, var_list)
        finally:
            self.use_ema = use_ema
        strategy = self._distribution_strategy
        num_shards = self.num_shards
        by_dtype: Dict[tf.DType, List[int]] = {}
        for index, variable in enumerate(var_list):
            if getattr(variable, "overwrite_with_gradient", False):
                continue
            by_dtype.setdefault(tf.as_dtype(variable.dtype), []).append(index)
        groups = []
        # Enter the scope if built from outside it (cross-replica context);
        # a lazy build inside `strategy.run` is already under it.
        scope = (
            strategy.scope()
            if tf.distribute.in_cross_replica_context()
            else contextlib.nullcontext()
        )
        with scope, tf.init_scope():
            for dtype, indices in by_dtype.items():
                sizes = [int(np.prod(var_list[i].shape)) for i in indices]
                layout = FlatLayout(sizes, num_shards)
                slots = {
                    slot: tf.Variable(
                        tf.zeros([layout.shard_size], dtype),
                        trainable=False,
                        name=f"{self.name}/{slot}_shard_{dtype.name}",
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.NONE,
                    )
                    for slot in self._slot_names()
                }
                groups.append(_ShardGroup(dtype, indices, layout, slots))
        self._groups = tuple(groups)
        # Logical state in keras.optimizers.Adam's order: average_0, ... (EMA),
        # m_0, v_0, m_1, v_1, ..., then v_hat_0, v_hat_1, ... (amsgrad).
        locate = {}
        for group in self._groups:
            for position, index in enumerate(group.indices):
                locate[index] = (group, position)
        order = []
        if self.use_ema:
            for index in sorted(locate):
                order.append(("average", index, *locate[index]))
        for index in sorted(locate):
            for slot in ("momentum", "velocity"):
                order.append((slot, index, *locate[index]))
        if self.amsgrad:
            for index in sorted(locate):
                order.append(("velocity_hat", index, *locate[index]))
        self._logical_order = tuple(order)
        self._logical_slots = [
            _keras_fit.CheckpointedTensor(
                self._make_reader(slot, group, position, var_list[index]),
                self._make_writer(slot, group, position),
            )
            for slot, index, group, position in order
        ]
        if self.use_ema:
            # Keras' name for the EMA copies, as logical (unsharded) values.
            self._model_variables_moving_average = [
                _LogicalValue(slot._read_fn)
                for slot, (name, *_) in zip(self._logical_slots, order)
                if name == "average"
            ]

    # ------------------------------------------------ logical (unsharded) state
    def _local_components(self, group: _ShardGroup, slot: str) -> tuple:
        """This worker's components of a slot, in local replica order."""
        return tuple(self._distribution_strategy.experimental_local_results(group.slots[slot]))

    def _shard_values(self, group: _ShardGroup, slot: str) -> list:
        """Every replica's slice of a slot, indexed by global shard (replica id).

        On one worker these are the local components. Under a multi-worker
        strategy (MultiWorkerMirrored) the other workers' slices are fetched
        with ``strategy.gather`` (an all-gather collective), so every worker
        must read the logical state at the same point (TF's multi-worker
        checkpointing has every worker save).
        """
        local = self._local_components(group, slot)
        num_shards = self.num_shards
        if len(local) == num_shards:
            return list(local)
        strategy = self._distribution_strategy
        values = []
        for component in local:
            with tf.device(component.device):
                values.append(tf.identity(component.read_value()))
        gathered = strategy.gather(_keras_fit.per_replica(values), axis=0)
        return tf.unstack(tf.reshape(gathered, [num_shards, group.layout.shard_size]))

    def _writable_shards(self, group: _ShardGroup, slot: str) -> dict:
        """Global shard -> this worker's component holding it (local replicas only)."""
        local = self._local_components(group, slot)
        first = (
            0
            if len(local) == self.num_shards
            else _keras_fit.first_local_replica_id(self._distribution_strategy)
        )
        return {first + i: component for i, component in enumerate(local)}

    def _make_reader(self, slot: str, group: _ShardGroup, position: int, reference):
        shape = tuple(reference.shape)

        def read() -> tf.Tensor:
            shards = self._shard_values(group, slot)
            parts = [
                tf.convert_to_tensor(shards[p.shard])[
                    p.shard_offset : p.shard_offset + p.size
                ]
                for p in group.layout.parts(position)
            ]
            if not parts:
                return tf.zeros(shape, group.dtype)
            flat = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
            return tf.reshape(flat, shape)

        return read

    def _make_writer(self, slot: str, group: _ShardGroup, position: int):
        def write(value) -> Any:
            flat = tf.reshape(tf.cast(value, group.dtype), [-1])
            size = group.layout.sizes[position]
            if flat.shape[0] is not None and flat.shape[0] != size:
                raise ValueError(
                    f"Cannot restore ShardedAdam slot {slot!r}: saved tensor has "
                    f"{flat.shape[0]} elements, the variable has {size}."
                )
            # Each worker writes the slices its own replicas hold.
            components = self._writable_shards(group, slot)
            ops_ = [
                components[p.shard][
                    p.shard_offset : p.shard_offset + p.size
                ].assign(flat[p.start : p.stop])
                for p in group.layout.parts(position)
                if p.shard in components
            ]
            return tf.group(ops_)

        return write

    def state_variables(self) -> List[tf.Variable]:
        """Every variable holding optimizer state (per-replica slices included)."""
        result = [v.value for v in self.variables]
        for group in self._groups:
            result.extend(group.slots.values())
        return result

    def logical_state(self) -> List[np.ndarray]:
        """The unsharded optimizer state, as ``keras.optimizers.Adam.variables`` has it."""
        values = [np.asarray(v.numpy()) for v in self.variables]
        if self._mode == _MODE_SHARDED:
            slots = getattr(self, "_logical_slots", [])
            values += [np.asarray(s._read_fn().numpy()) for s in slots]
        return values

    def save_own_variables(self, store) -> None:
        """Saves the logical state in ``keras.optimizers.Adam``'s layout."""
        for i, value in enumerate(self.logical_state()):
            store[str(i)] = value

    def load_own_variables(self, store) -> None:
        """Loads a state saved by ShardedAdam (any N) or ``keras.optimizers.Adam``."""
        if self._mode != _MODE_SHARDED:
            return super().load_own_variables(store)
        if not self.built:
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}': it has not "
                "been built yet (call `optimizer.build(trainable_variables)` first).",
                stacklevel=2,
            )
            return
        own = list(self.variables)
        expected = len(own) + len(self._logical_slots)
        if len(store.keys()) != expected:
            raise ValueError(
                f"Cannot load optimizer '{self.name}': it has {expected} logical "
                f"variables (built={self.built}) but the saved optimizer has "
                f"{len(store.keys())}."
            )
        for i, variable in enumerate(own):
            variable.assign(store[str(i)])
        for j, slot in enumerate(self._logical_slots):
            slot._write_fn(tf.convert_to_tensor(store[str(len(own) + j)]))

    # ------------------------------------------- parameter-server placement
    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        """A slot beside its variable; partitioned like it if the variable is."""
        if _keras_fit.variable_shards(reference_variable) is None:
            return super().add_variable_from_reference(
                reference_variable, name=name, initializer=initializer
            )
        # Keras' colocation cannot take a ShardedVariable. Created in the
        # strategy scope, the slot goes through the same variable_partitioner
        # (same shape and dtype, so the same split, on the same servers).
        path = getattr(reference_variable, "path", reference_variable.name)
        return self.add_variable(
            shape=reference_variable.shape,
            initializer=initializer,
            dtype=reference_variable.dtype,
            name=f"{path.replace('/', '_')}_{name or 'var'}",
        )

    @property
    def updates_only_touched_rows(self) -> bool:
        """Under a parameter-server strategy: a table's rows not in the batch
        keep their weights and slots (LazyAdam semantics for row gradients)."""
        return self._mode == _MODE_PARAMETER_SERVER

    def _update_rows(self, gradient, variable, learning_rate) -> None:
        """LazyAdam on the rows of an ``IndexedSlices`` gradient (PS mode),
        on the variable's device(s); ``ShardedVariable`` scatters split the rows
        over the shards."""
        ids, rows = _sparse_rows.unique_rows(gradient, variable.dtype)
        lazy.decay(self, variable, learning_rate, ids)
        lazy.adam_rows(self, ids, rows, variable, learning_rate, self.iterations + 1)

    def _update_partitioned(self, gradient, variable, learning_rate) -> None:
        """Keras Adam's update_step, run shard by shard on the parameter servers."""
        shards = _keras_fit.variable_shards(variable)
        index = self._get_variable_index(variable)
        slots = [self._momentums[index], self._velocities[index]]
        if self.amsgrad:
            slots.append(self._velocity_hats[index])
        slot_shards = [_keras_fit.variable_shards(s) for s in slots]
        sizes = [int(s.shape[0]) for s in shards]
        if any(ss is None or [int(x.shape[0]) for x in ss] != sizes for ss in slot_shards):
            raise ValueError(
                f"ShardedAdam: slots of {variable.path} are not partitioned like it."
            )
        dtype = variable.dtype
        gradient = tf.convert_to_tensor(gradient)
        pieces = tf.split(ops.cast(gradient, dtype), sizes, axis=0)
        lr = ops.cast(learning_rate, dtype)
        decay = self.weight_decay is not None and _keras_fit.uses_weight_decay(self, variable)
        alpha = lazy.adam_alpha(self, dtype, learning_rate, self.iterations + 1)
        for i, (shard, g) in enumerate(zip(shards, pieces)):
            m, v = slot_shards[0][i], slot_shards[1][i]
            with tf.device(shard.device):
                if decay:
                    shard.assign_sub(shard * ops.cast(self.weight_decay, dtype) * lr)
                m.assign_add(ops.multiply(ops.subtract(g, m), 1 - self.beta_1))
                v.assign_add(ops.multiply(ops.subtract(ops.square(g), v), 1 - self.beta_2))
                if self.amsgrad:
                    v_hat = slot_shards[2][i]
                    v_hat.assign(ops.maximum(v_hat, v))
                    v = v_hat
                shard.assign_sub(
                    ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon))
                )

    # ------------------------------------------------------------------ EMA
    def _update_model_variables_moving_average(self, trainable_variables) -> None:
        # Sharded mode updates the EMA slices inside its step.
        if self._mode != _MODE_SHARDED:
            super()._update_model_variables_moving_average(trainable_variables)

    def _overwrite_model_variables_with_average_value(self, trainable_variables) -> None:
        # Sharded mode overwrites through its all-gather (ema_overwrite_frequency).
        if self._mode != _MODE_SHARDED:
            super()._overwrite_model_variables_with_average_value(trainable_variables)

    def finalize_variable_values(self, var_list) -> None:
        """With ``use_ema``: sets the model variables to their moving averages."""
        if self._mode != _MODE_SHARDED or not self.use_ema:
            return super().finalize_variable_values(var_list)
        for variable in var_list:
            index = self._get_variable_index(variable)
            average = self._model_variables_moving_average[index]
            variable.assign(tf.convert_to_tensor(average))

    # ----------------------------------------------------------- the update
    def _apply_weight_decay(self, variables) -> None:
        # Sharded mode folds the (decoupled) decay into the sliced update.
        # Parameter-server mode decays each variable in `_backend_update_step`
        # (dense: all of it, as Keras; rows: only the touched ones).
        del variables

    def _backend_update_step(self, grads, trainable_variables, learning_rate) -> None:
        if self._mode != _MODE_SHARDED:
            plain = [
                (g, v)
                for g, v in zip(grads, trainable_variables)
                if _keras_fit.variable_shards(v) is None and not _is_rows(g)
            ]
            for _, v in plain:  # Keras' _apply_weight_decay, variable by variable
                lazy.decay(self, v, learning_rate)
            if plain:
                super()._backend_update_step(
                    [g for g, _ in plain], [v for _, v in plain], learning_rate
                )
            for g, v in zip(grads, trainable_variables):
                if _is_rows(g):
                    self._update_rows(g, v, learning_rate)
                elif _keras_fit.variable_shards(v) is not None:
                    self._update_partitioned(g, v, learning_rate)
            return
        context = tf.distribute.get_replica_context()
        if context is None:
            # Cross-replica `apply` (gradients already total): run every replica.
            self._distribution_strategy.run(
                lambda: self._sharded_step(
                    grads, trainable_variables, learning_rate, reduce=False
                )
            )
        else:
            self._sharded_step(grads, trainable_variables, learning_rate, reduce=True)

    def _sharded_step(self, grads, trainable_variables, learning_rate, reduce: bool) -> None:
        """ZeRO-1 Adam step for this replica (runs in replica context).

        Per dtype group: flatten the gradients (padded to N·S), reduce-scatter
        them (``reduce=False``: they are totals already, take this replica's
        block), update this replica's slice of m, v (and EMA) and of the
        parameters, all-gather the new parameters, write them back. The
        replica id may be dynamic (TPU): slices have static sizes.
        """
        context = tf.distribute.get_replica_context()
        num_shards = self.num_shards
        replica = _zero_collectives.replica_id(context)
        # IndexedSlices gradients (embedding lookups) are densified here, before
        # the reduce-scatter. Keeping them sparse would mean, per step, an
        # all-gather of every replica's (indices, rows) of a dynamic count —
        # what TF itself does for IndexedSlices under Mirrored/Collective
        # ops — followed by each replica summing the rows that fall into its
        # contiguous slice (slices of the flat layout cut through rows). That
        # moves (N−1)·nnz·(row + index bytes) per replica instead of the dense
        # (N−1)/N·table bytes, a win only while N·nnz < rows, and the
        # dynamic sizes need padding to a static bound for the all-to-all and
        # for XLA/TPU. The update itself stays dense either way: Keras' Adam
        # decays every element of m and v every step (a sparse gradient is
        # zero elsewhere, not absent). Not implemented; see
        # docs/sharded_adam.md.
        grad_of = {
            self._get_variable_index(v): (
                tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
            )
            for g, v in zip(grads, trainable_variables)
            if g is not None
        }
        variables = self._trainable_variables
        writes = []
        for group in self._groups:
            layout = group.layout
            size = layout.shard_size
            flat_g = self._flatten(group, [grad_of.get(i) for i in group.indices])
            if num_shards == 1:
                g = flat_g
            elif reduce:
                g = _zero_collectives.reduce_scatter(context, flat_g, num_shards)
            else:
                g = _zero_collectives.block(flat_g, replica, size)
            flat_w = self._flatten(group, [variables[i].value for i in group.indices])
            w = _zero_collectives.block(flat_w, replica, size)
            has_grad = [i in grad_of for i in group.indices]
            decays = [
                self.weight_decay is not None
                and i in grad_of
                and _keras_fit.uses_weight_decay(self, variables[i])
                for i in group.indices
            ]
            w_new = self._update_slice(
                group, replica, g, w, learning_rate,
                self._mask(group, has_grad, replica), self._mask(group, decays, replica),
            )
            flat_new = (
                _zero_collectives.all_gather(context, w_new, num_shards)
                if num_shards > 1
                else w_new
            )
            for position, index in enumerate(group.indices):
                offset, count = layout.offsets[position], layout.sizes[position]
                variable = variables[index]
                writes.append(
                    (variable.value, tf.reshape(flat_new[offset : offset + count], variable.shape))
                )
        tf.__internal__.distribute.interim.maybe_merge_call(
            _assign_all, self._distribution_strategy, writes
        )

    @staticmethod
    def _flatten(group: _ShardGroup, tensors) -> tf.Tensor:
        """``tensors`` (None: zeros) flattened back to back, padded to N·S."""
        layout = group.layout
        parts = [
            tf.zeros([size], group.dtype)
            if t is None
            else tf.reshape(ops.cast(t, group.dtype), [-1])
            for t, size in zip(tensors, layout.sizes)
        ]
        if layout.padding:
            parts.append(tf.zeros([layout.padding], group.dtype))
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

    @staticmethod
    def _mask(group: _ShardGroup, flags: Sequence[bool], replica):
        """This replica's block of a per-variable flag, or None if all set."""
        if all(flags):
            return None
        layout = group.layout
        full = np.zeros([layout.padded_total], bool)
        for position, flag in enumerate(flags):
            offset = layout.offsets[position]
            full[offset : offset + layout.sizes[position]] = flag
        return _zero_collectives.block(tf.constant(full), replica, layout.shard_size)

    def _update_slice(self, group, replica, g, w, learning_rate, keep, decay):
        """Adam on this replica's slice; returns the slice to all-gather.

        ``keep``: elements whose variable has a gradient (None: all); the
        others keep their value and state, as in Keras Adam. ``decay``:
        elements under AdamW's decoupled decay (None: all, if any decay).
        """
        dtype = group.dtype
        lr = ops.cast(learning_rate, dtype)
        w_old = w
        if self.weight_decay is not None:
            decayed = w - w * ops.cast(self.weight_decay, dtype) * lr
            w = decayed if decay is None else tf.where(decay, decayed, w)

        alpha = lazy.adam_alpha(self, dtype, learning_rate, self.iterations + 1)

        m_var, v_var = group.slots["momentum"], group.slots["velocity"]
        m_old, v_old = m_var.read_value(), v_var.read_value()
        m = m_old + ops.multiply(ops.subtract(g, m_old), 1 - self.beta_1)
        v = v_old + ops.multiply(ops.subtract(ops.square(g), v_old), 1 - self.beta_2)
        v_used = v
        v_hat = None
        if self.amsgrad:
            v_hat_old = group.slots["velocity_hat"].read_value()
            v_hat = ops.maximum(v_hat_old, v)
            v_used = v_hat
        w_new = w - ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v_used), self.epsilon))

        if keep is not None:
            m = tf.where(keep, m, m_old)
            v = tf.where(keep, v, v_old)
            w_new = tf.where(keep, w_new, w_old)
            if v_hat is not None:
                v_hat = tf.where(keep, v_hat, v_hat_old)
        m_var.assign(m)
        v_var.assign(v)
        if v_hat is not None:
            group.slots["velocity_hat"].assign(v_hat)
        if not self.use_ema:
            return w_new
        # Keras' EMA (BaseOptimizer._update_model_variables_moving_average),
        # on the slice: the first step copies, then momentum-averages.
        average = group.slots["average"]
        not_first_step = ops.not_equal(self.iterations, 0)
        momentum = ops.multiply(ops.cast(not_first_step, dtype), self.ema_momentum)
        new_average = ops.add(
            ops.multiply(momentum, average.read_value()),
            ops.multiply(ops.subtract(1, momentum), w_new),
        )
        average.assign(new_average)
        if self.ema_overwrite_frequency:
            overwrite = (self.iterations + 1) % self.ema_overwrite_frequency == 0
            w_new = tf.where(overwrite, new_average, w_new)
        return w_new


class _LogicalValue:
    """Read-only view of one variable's unsharded EMA (assembled from slices)."""

    def __init__(self, read_fn) -> None:
        self._read_fn = read_fn

    def value(self) -> tf.Tensor:
        return self._read_fn()

    def numpy(self) -> np.ndarray:
        return np.asarray(self._read_fn().numpy())

    def __array__(self, dtype=None, copy=None):
        value = self.numpy()
        return value if dtype is None else value.astype(dtype)

    @property
    def shape(self):
        return self._read_fn().shape


tf.register_tensor_conversion_function(
    _LogicalValue, lambda value, dtype=None, name=None, as_ref=False: value.value()
)


def _assign_all(distribution, writes) -> None:
    """Writes each (variable, value) on every replica's copy (Keras' pattern)."""
    for variable, value in writes:
        distribution.extended.update(variable, _assign, args=(value,), group=False)


def _assign(variable, value):
    return variable.assign(value)


def _is_rows(gradient) -> bool:
    return isinstance(gradient, tf.IndexedSlices)
