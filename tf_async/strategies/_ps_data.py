"""Training data → per-worker iterators for ``ClusterCoordinator.schedule``.

Accepted ``x`` (like tf-keras' parameter-server ``fit``):

* a ``tf.data.Dataset`` — serialized and rebuilt on every worker (each worker
  iterates its own copy, repeated);
* a dataset function ``fn()`` or ``fn(input_context)`` — called for each
  worker with ``InputContext(num_input_pipelines=#workers,
  input_pipeline_id=worker index)``, so it can shard;
* NumPy arrays / tensors ``x, y, sample_weight`` — sliced, shuffled and batched
  into a dataset (``batch_size``, default 32).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from tf_async import _keras_fit

_FAIL_ON_EXTERNAL_STATE = 2  # tf.data.experimental.ExternalStatePolicy.FAIL


def takes_input_context(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return bool(positional)


def check_sendable(dataset: tf.data.Dataset) -> None:
    """ValueError if ``dataset`` holds state that cannot be shipped to workers."""
    try:
        tf.raw_ops.DatasetToGraphV2(
            input_dataset=dataset._variant_tensor,
            external_state_policy=_FAIL_ON_EXTERNAL_STATE,
        )
    except (tf.errors.OpError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            "`x`: this tf.data.Dataset cannot be sent to the parameter-server "
            "workers: it depends on state of this process (e.g. "
            "`Dataset.from_generator` or `tf.py_function`). Pass a dataset "
            "function instead (`x=lambda input_context: make_dataset()`), built "
            f"from TF ops only. ({first_line})"
        ) from None


def _cardinality(dataset: tf.data.Dataset) -> int:
    return int(dataset.cardinality().numpy())


def _arrays_to_dataset(x, y, sample_weight, batch_size, shuffle) -> tf.data.Dataset:
    tensors = tuple(t for t in (x, y, sample_weight) if t is not None)
    first = tf.nest.flatten(tensors[0])[0]
    count = int(np.shape(first)[0])
    dataset = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        dataset = dataset.shuffle(count, reshuffle_each_iteration=True)
    return dataset.batch(batch_size or 32)


def steps_and_source(
    x, y, sample_weight, batch_size, steps_per_epoch: Optional[int], shuffle: bool
) -> Tuple[int, object]:
    """Validates the data; returns (steps_per_epoch, dataset or dataset_fn)."""
    if steps_per_epoch is not None:
        if isinstance(steps_per_epoch, bool) or not isinstance(
            steps_per_epoch, (int, np.integer)
        ) or steps_per_epoch < 1:
            raise ValueError(
                f"`steps_per_epoch` must be a positive int, got {steps_per_epoch!r}."
            )
        steps_per_epoch = int(steps_per_epoch)
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "`y`/`sample_weight` must be None when `x` is a tf.data.Dataset."
            )
        check_sendable(x)
        cardinality = _cardinality(x)
        if steps_per_epoch is None:
            if cardinality < 0:
                raise ValueError(
                    "`steps_per_epoch` is required when `x` is an infinite or "
                    "unknown-size dataset (AsyncParameterServerStrategy: workers "
                    "read their own repeated copy)."
                )
            if cardinality == 0:
                raise ValueError("`x` is an empty dataset.")
            steps_per_epoch = cardinality
        return steps_per_epoch, x.repeat() if cardinality >= 0 else x
    if callable(x):
        if steps_per_epoch is None:
            raise ValueError(
                "`steps_per_epoch` is required when `x` is a dataset function "
                "(its size is unknown to the coordinator)."
            )
        return steps_per_epoch, x
    if x is None:
        raise ValueError("`x` is required: a tf.data.Dataset, a dataset function or arrays.")
    dataset = _arrays_to_dataset(x, y, sample_weight, batch_size, shuffle)
    if steps_per_epoch is None:
        steps_per_epoch = _cardinality(dataset)
    return steps_per_epoch, dataset.repeat()


def per_worker_iterator(strategy, coordinator, source):
    """A per-worker iterator (for ``schedule``) over ``source``."""
    if isinstance(source, tf.data.Dataset):
        return iter(coordinator.create_per_worker_dataset(source))
    num_workers = strategy.num_workers
    if not takes_input_context(source):

        def dataset_fn():
            return _repeated(source())

        return iter(coordinator.create_per_worker_dataset(dataset_fn))
    # One dataset function per worker so each gets its own InputContext.
    remote_values = []
    for index in range(num_workers):
        context = tf.distribute.InputContext(
            num_input_pipelines=num_workers,
            input_pipeline_id=index,
            num_replicas_in_sync=strategy.num_replicas_in_sync,
        )

        def dataset_fn(context=context):
            return _repeated(source(context))

        iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))
        remote_values.append(_keras_fit.per_worker_remote_values(iterator)[index])
    return _keras_fit.per_worker_iterator(remote_values)


def _repeated(dataset):
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "`x`: the dataset function must return a tf.data.Dataset, got "
            f"{type(dataset).__name__}."
        )
    return dataset.repeat()
