"""Initial values of variables split over parameter servers, made shard by shard.

A table split by ``variable_partitioner`` ("div" partitioning along axis 0)
is a ``ShardedVariable``. TF's ``ParameterServerStrategy`` makes each shard's
initial value by calling the initial-value callable with
``partition_shape=`` / ``partition_offset=`` (the shard's rows), on the
shard's parameter server; a callable that does not take them is called for
the *whole* value, on the coordinator, and sliced -- a 1e7 x 32 table split
over 2 PS then peaks at 7 GB on the chief. Keras 3 initializers take only
``(shape, dtype)``, so every Keras table took that path.

:func:`initial_value` wraps a Keras initializer in a callable TF can ask for
one shard. Per initializer (the semantics of tf-keras' partition-aware
initializers, ``tf_keras/initializers/initializers.py``):

* ``Zeros``, ``Ones``, ``Constant(scalar)``: the shard's part of the same
  value (identical to the unsplit variable).
* ``RandomUniform``, ``RandomNormal``, ``TruncatedNormal`` and the
  ``VarianceScaling`` family (Glorot, He, Lecun) with an integer (or default)
  seed: each shard is drawn from the *same distribution* as the unsplit
  variable -- for ``VarianceScaling`` the scale comes from the full shape's
  fans -- with a seed derived from the initializer's seed and the shard's
  first row. Deterministic for a given seed and partitioning; the values
  differ from the same variable unsplit (as in tf-keras).
* Anything else (``Orthogonal``, ``Identity``, a ``SeedGenerator`` seed, a
  ``Constant`` array, custom callables): the full value, sliced by TF (the
  previous behaviour, exact but made whole on the coordinator).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import keras

_MASK = 0x7FFFFFFF


def _exact_type(initializer, cls) -> bool:
    return type(initializer).__call__ is cls.__call__ and isinstance(initializer, cls)


def shard_seed(seed: int, offset: Sequence[int]) -> int:
    """The seed of the shard starting at ``offset`` (deterministic across
    processes: Python's hash of a tuple of ints is not randomised)."""
    return hash((int(seed), tuple(int(o) for o in offset))) & _MASK


def _with_seed(initializer, config_changes: dict):
    config = dict(initializer.get_config(), **config_changes)
    return type(initializer).from_config(config)


def _variance_scaling_shard(initializer, shape, partition_offset):
    """A ``VarianceScaling`` drawing what ``initializer`` draws for ``shape``,
    for any shard: the full shape's scale, fans fixed to 1."""
    from tf_async import _keras_fit

    fan_in, fan_out = _keras_fit.initializer_fans(
        shape, initializer.input_axes, initializer.output_axes
    )
    fan = {"fan_in": fan_in, "fan_out": fan_out}.get(
        initializer.mode, (fan_in + fan_out) / 2.0
    )
    return keras.initializers.VarianceScaling(
        scale=initializer.scale / max(1.0, fan),
        mode="fan_in",
        distribution=initializer.distribution,
        seed=shard_seed(initializer.seed, partition_offset),
        input_axes=[],
        output_axes=[],  # fan_in = empty product = 1: the scale as given
    )


def shard_initializer(initializer, shape, partition_offset) -> Optional[Callable]:
    """An initializer whose value for the shard's shape is the shard starting
    at ``partition_offset`` of a variable of ``shape``; ``None`` if
    ``initializer`` can only make the whole value."""
    init = keras.initializers
    if _exact_type(initializer, init.Zeros) or _exact_type(initializer, init.Ones):
        return initializer
    if _exact_type(initializer, init.Constant):
        value = initializer.value
        if isinstance(value, (int, float, bool)) or getattr(value, "shape", None) == ():
            return initializer
        return None
    seed = getattr(initializer, "seed", None)
    if isinstance(seed, bool) or not isinstance(seed, int):
        return None  # SeedGenerator (stateful draws) or unknown
    if _exact_type(initializer, init.VarianceScaling):
        return _variance_scaling_shard(initializer, shape, partition_offset)
    for cls in (init.RandomUniform, init.RandomNormal, init.TruncatedNormal):
        if _exact_type(initializer, cls):
            return _with_seed(initializer, {"seed": shard_seed(seed, partition_offset)})
    return None


def initial_value(initializer, shape, dtype) -> Callable:
    """``initializer(shape, dtype)`` as an initial-value callable that TF's
    ``ParameterServerStrategy`` can also call for one shard
    (``partition_shape``, ``partition_offset``)."""
    shape = tuple(int(d) for d in shape)

    def value(partition_shape=None, partition_offset=None):
        if partition_shape is None:
            return initializer(shape, dtype=dtype)
        part = shard_initializer(initializer, shape, partition_offset)
        if part is None:
            return initializer(shape, dtype=dtype)  # TF slices the whole value
        return part(tuple(int(d) for d in partition_shape), dtype=dtype)

    value.shape = shape
    return value
