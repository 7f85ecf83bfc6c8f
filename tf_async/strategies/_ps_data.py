"""Training data → per-worker iterators for ``ClusterCoordinator.schedule``.

Accepted ``x`` (like tf-keras' parameter-server ``fit``):

* a ``tf.data.Dataset`` — serialized and rebuilt on every worker (each worker
  iterates its own copy, repeated);
* a dataset function ``fn()`` or ``fn(input_context)`` — called for each
  worker with ``InputContext(num_input_pipelines=#workers,
  input_pipeline_id=worker index)``, so it can shard;
* NumPy arrays / tensors ``x, y, sample_weight`` — sliced, shuffled and batched
  into a dataset (``batch_size``, default 32); ``validation_split`` takes the
  last fraction of them, before shuffling, as Keras does.

``class_weight`` becomes a per-sample weight inside each worker's pipeline.
"""

from __future__ import annotations

import inspect
import warnings
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


def split_validation(x, y, sample_weight, validation_split):
    """Keras' ``validation_split`` for arrays: the last fraction (unshuffled)
    becomes ``(x, y, sample_weight)`` of the validation data."""
    if isinstance(validation_split, bool) or not isinstance(
        validation_split, (int, float, np.floating)
    ) or not 0.0 < validation_split < 1.0:
        raise ValueError(
            f"`validation_split` must be a float in (0, 1), got {validation_split!r}."
        )
    if isinstance(x, tf.data.Dataset) or callable(x):
        raise ValueError(
            "`validation_split` is only supported when `x` is arrays (NumPy or "
            "tensors); with a dataset or dataset function pass `validation_data`."
        )
    arrays = (x, y, sample_weight)
    flat = [a for a in tf.nest.flatten(arrays) if a is not None]
    count = int(np.shape(flat[0])[0])
    split_at = int(count * (1.0 - validation_split))
    if split_at == 0 or split_at == count:
        raise ValueError(
            f"`validation_split`={validation_split} leaves no training or no "
            f"validation samples out of {count}."
        )

    def part(start, stop):
        return tf.nest.map_structure(
            lambda a: None if a is None else a[start:stop], arrays
        )

    return part(0, split_at), part(split_at, count)


def check_class_weight(class_weight) -> dict:
    """``{class index (int >= 0): weight (number)}`` or a clear ValueError."""
    if not isinstance(class_weight, dict) or not class_weight:
        raise ValueError(
            "`class_weight` must be a non-empty dict {class index: weight}, got "
            f"{class_weight!r}."
        )
    checked = {}
    for key, weight in class_weight.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"`class_weight` keys must be class indices (ints >= 0), got {key!r}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) \
                or not np.isfinite(weight) or weight < 0:
            raise ValueError(
                f"`class_weight`[{key}] must be a finite number >= 0, got {weight!r}."
            )
        checked[int(key)] = float(weight)
    return checked


def check_class_weight_applies(element_spec) -> None:
    """ValueError unless batches are ``(x, y)`` with one target tensor."""
    if not isinstance(element_spec, tuple) or len(element_spec) != 2:
        raise ValueError(
            "`class_weight` needs batches `(x, y)` with targets and no sample "
            "weights (Keras: you cannot use `class_weight` and `sample_weight` "
            "together)."
        )
    if not isinstance(element_spec[1], tf.TensorSpec):
        raise ValueError("`class_weight` needs a single target tensor `y`.")


def _weigh_by_class(dataset: tf.data.Dataset, class_weight: dict) -> tf.data.Dataset:
    """``(x, y)`` → ``(x, y, weight of y's class)``. One-hot ``y`` (last axis > 1)
    is argmaxed, as in Keras; classes missing from ``class_weight`` weigh 1."""
    size = max(class_weight) + 1
    table = tf.constant([class_weight.get(c, 1.0) for c in range(size)], tf.float32)

    def add_weight(x, y):
        classes = y
        if y.shape.rank is not None and y.shape.rank >= 2 and y.shape[-1] != 1:
            classes = tf.argmax(y, axis=-1)
        elif y.shape.rank is not None and y.shape.rank >= 2:
            classes = tf.squeeze(y, axis=-1)
        classes = tf.cast(tf.round(tf.cast(classes, tf.float32)), tf.int32)
        inside = (classes >= 0) & (classes < size)
        weights = tf.where(inside, tf.gather(table, tf.clip_by_value(classes, 0, size - 1)), 1.0)
        return x, y, weights

    return dataset.map(add_weight)


def cardinality(dataset: tf.data.Dataset) -> int:
    """Batches in ``dataset``; < 0 for infinite or unknown."""
    return int(dataset.cardinality().numpy())


_cardinality = cardinality


def check_not_distributed(x, method: str) -> None:
    """ValueError for a ``tf.distribute`` distributed dataset (or per-worker
    dataset): under AsyncParameterServerStrategy ``fit`` distributes the data
    itself, and ``evaluate``/``predict`` run on the coordinator."""
    if _keras_fit.is_distributed_data(x):
        raise ValueError(
            f"`x` of `{method}`: a distributed dataset ({type(x).__name__}, from "
            "`strategy.experimental_distribute_dataset`, "
            "`distribute_datasets_from_function` or "
            "`coordinator.create_per_worker_dataset`) cannot be passed to "
            "AsyncParameterServerStrategy's fit/evaluate/predict. Pass the "
            "tf.data.Dataset itself (each worker gets its own copy), or a "
            "dataset function `lambda input_context: make_dataset(input_context)` "
            "(one InputContext per worker, to shard), with `steps_per_epoch=` "
            "(fit) or `steps=` (evaluate/predict)."
        )


def call_dataset_fn(fn, num_input_pipelines: int, input_pipeline_id: int):
    """``fn(InputContext(...))`` or ``fn()``; the dataset it returns (checked)."""
    if takes_input_context(fn):
        dataset = fn(tf.distribute.InputContext(
            num_input_pipelines=num_input_pipelines, input_pipeline_id=input_pipeline_id))
    else:
        dataset = fn()
    return _returned_dataset(dataset)


def _arrays_to_dataset(x, y, sample_weight, batch_size, shuffle) -> tf.data.Dataset:
    tensors = tuple(t for t in (x, y, sample_weight) if t is not None)
    first = tf.nest.flatten(tensors[0])[0]
    count = int(np.shape(first)[0])
    dataset = tf.data.Dataset.from_tensor_slices(tensors)
    if shuffle:
        dataset = dataset.shuffle(count, reshuffle_each_iteration=True)
    return dataset.batch(batch_size or 32)


def with_class_weights(source, class_weight: Optional[dict]):
    """``source`` (a dataset or dataset function from :func:`steps_and_source`)
    whose batches also carry their class weights as sample weights."""
    if class_weight is None:
        return source
    if isinstance(source, tf.data.Dataset):
        check_class_weight_applies(source.element_spec)
        return _weigh_by_class(source, class_weight)
    takes_context = takes_input_context(source)

    def weighted(*context):
        dataset = _returned_dataset(source(*context))
        check_class_weight_applies(dataset.element_spec)
        return _weigh_by_class(dataset, class_weight)

    if takes_context:
        return lambda input_context: weighted(input_context)
    return lambda: weighted()


def steps_and_source(
    x, y, sample_weight, batch_size, steps_per_epoch: Optional[int], shuffle: bool
) -> Tuple[int, object]:
    """Validates the data; returns (steps_per_epoch, dataset or dataset_fn)."""
    check_not_distributed(x, "fit")
    if steps_per_epoch is not None:
        if isinstance(steps_per_epoch, bool) or not isinstance(
            steps_per_epoch, (int, np.integer)
        ) or steps_per_epoch < 1:
            raise ValueError(
                f"`steps_per_epoch` must be None or a positive int, got "
                f"{steps_per_epoch!r}. To run until the data ends "
                "(Keras' -1), pass `steps_per_epoch=None` with a finite "
                "tf.data.Dataset or arrays: one epoch is then one pass over them "
                "(their cardinality). An infinite dataset or a dataset function "
                "under AsyncParameterServerStrategy needs a positive int."
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


RAN_OUT_OF_DATA = (
    "Your input ran out of data; interrupting training. "
    "Make sure that your dataset or generator can generate "
    "at least `steps_per_epoch * epochs` batches. "
    "You may need to use the `.repeat()` "
    "function when building your dataset."
)  # Keras' EpochIterator warning, verbatim


def batches_per_pass(x, batch_size) -> Optional[int]:
    """Batches in one pass over a finite dataset or arrays ``x`` (Keras'
    ``num_batches``); ``None`` for infinite/unknown datasets and dataset
    functions (their epochs are ``steps_per_epoch`` long, repeated)."""
    if isinstance(x, tf.data.Dataset):
        count = cardinality(x)
        return count if count > 0 else None
    if callable(x) or x is None:
        return None
    first = tf.nest.flatten(x)[0]
    return -(-int(np.shape(first)[0]) // int(batch_size or 32))


def warn_if_fn_runs_short(source, num_workers: int, wanted: int) -> None:
    """One warning when a dataset function's dataset is finite and shorter than
    the ``wanted`` batches (workers repeat it, where Keras would run out)."""
    count = cardinality(call_dataset_fn(source, num_workers, 0))
    if 0 <= count and count * num_workers < wanted:
        warnings.warn(
            f"The dataset function returns a finite dataset ({count} batches for "
            f"worker 0 of {num_workers}) that cannot supply `steps_per_epoch * "
            f"epochs` = {wanted} batches: under AsyncParameterServerStrategy each "
            "worker repeats its dataset (Keras without a strategy would stop: "
            "'Your input ran out of data'). Add `.repeat()` to the dataset to "
            "silence this, or lower `steps_per_epoch`.",
            stacklevel=4,
        )


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


def _returned_dataset(dataset) -> tf.data.Dataset:
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            "`x`: the dataset function must return a tf.data.Dataset, got "
            f"{type(dataset).__name__}."
        )
    return dataset


def _repeated(dataset):
    return _returned_dataset(dataset).repeat()


def element_spec(source, num_workers: int):
    """The batch spec of a dataset or dataset function (called here once, with
    worker 0's ``InputContext``, so a bad function fails before scheduling)."""
    if isinstance(source, tf.data.Dataset):
        return source.element_spec
    return call_dataset_fn(source, num_workers, 0).element_spec
