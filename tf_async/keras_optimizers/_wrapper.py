"""Shared plumbing of optimizers that wrap an ``inner`` Keras optimizer
(``StalenessScaled``, ``GapAware``): the inner's variables, learning rate,
iterations and loss scaling are the wrapper's; the wrapper's own slots are
added to ``variables`` so Keras saves them."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf


def check_inner(inner) -> None:
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise TypeError(
            "`inner` must be a keras.optimizers.Optimizer instance; received "
            f"inner={inner!r} of type {type(inner).__name__}."
        )


_BASE_DEFAULTS = {
    "learning_rate": None, "weight_decay": None, "clipnorm": None,
    "global_clipnorm": None, "clipvalue": None, "use_ema": False,
    "ema_momentum": 0.99, "ema_overwrite_frequency": None,
    "loss_scale_factor": None, "gradient_accumulation_steps": None,
}


def reject_base_arguments(cls_name: str, kwargs: dict) -> None:
    """Base-optimizer arguments belong to the inner optimizer; accept only
    their defaults (as written by older configs)."""
    for key in list(kwargs):
        if key in _BASE_DEFAULTS and kwargs[key] == _BASE_DEFAULTS[key]:
            kwargs.pop(key)
    if kwargs:
        raise ValueError(
            f"{cls_name} takes no base optimizer arguments (set them on "
            f"`inner`); received {sorted(kwargs)}."
        )


class InnerOptimizerWrapper(keras.optimizers.Optimizer):
    """Base class: ``self.inner_optimizer`` does the update."""

    def __init__(self, inner, name: Optional[str] = None):
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def predicts_weights(self) -> bool:
        """The inner optimizer's look-ahead (``tf_async.staleness``) is the wrapper's."""
        from tf_async import staleness

        return staleness.predicts_weights(self.inner_optimizer)

    @property
    def worker_slots(self):
        """The inner optimizer's per-worker state (``tf_async.staleness.worker_slots``)."""
        from tf_async import staleness

        return staleness.worker_slots(self.inner_optimizer)

    def predict_weights(self, variable, value, horizon, ids=None):
        from tf_async import staleness

        return staleness.predicted_read(self.inner_optimizer, variable, value, horizon, ids)

    def get_config(self) -> dict:
        """``name`` and the serialized ``inner``; subclasses add their own."""
        return {
            "name": self.name,
            "inner": keras.saving.serialize_keras_object(self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner"), custom_objects=custom_objects
        )
        return cls(inner, **config)

    def _build_on_first_apply(self, trainable_variables) -> None:
        if self.built:
            return
        if trainable_variables is None:
            raise ValueError(
                f"{type(self).__name__}.apply(): pass `trainable_variables` on the "
                "first call or build the optimizer first."
            )
        with keras.name_scope(self.name):
            self.build(list(trainable_variables))
        self.built = True


def in_cross_replica(fn) -> None:
    """Runs ``fn(distribution)`` in cross-replica context (a ``merge_call``
    from a replica), where ``distribution.extended.update`` places each
    variable's update on its device."""
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None:
        fn(tf.distribute.get_strategy())
    else:
        replica_context.merge_call(fn)
