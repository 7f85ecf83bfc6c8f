"""Constructor argument checks shared by tf_async's optimizers.

Each raises ``TypeError`` for a non-number and ``ValueError`` for a number
outside the allowed range, naming the argument and the range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(name: str, value: Any, ok, allowed: str) -> None:
    if not is_number(value):
        raise TypeError(f"`{name}` must be a float {allowed}; received {name}={value!r}.")
    if not ok(value):
        raise ValueError(f"`{name}` must be {allowed}; received {name}={value}.")


def check_unit_interval(name: str, value: Any) -> None:
    """``value`` in [0, 1) (momenta, betas, decay factors)."""
    _check(name, value, lambda v: 0 <= v < 1, "in [0, 1)")


def check_positive(name: str, value: Any) -> None:
    """``value`` > 0 (epsilons)."""
    _check(name, value, lambda v: v > 0, "> 0")


def check_non_negative(name: str, value: Any) -> None:
    """``value`` >= 0 (compensation strengths)."""
    _check(name, value, lambda v: v >= 0, ">= 0")


def check_learning_rate(learning_rate: Any) -> Any:
    """A float > 0 (returned as float), or a schedule / callable (unchanged)."""
    if isinstance(learning_rate, bool):
        raise TypeError("`learning_rate` must be a float > 0, a schedule or a callable.")
    if isinstance(learning_rate, (int, float)):
        if not learning_rate > 0:
            raise ValueError(
                f"`learning_rate` must be > 0; received learning_rate={learning_rate}."
            )
        return float(learning_rate)
    return learning_rate


def check_weight_decay(weight_decay: Any) -> None:
    """``None`` or a finite float >= 0."""
    if weight_decay is None:
        return
    if not is_number(weight_decay):
        raise TypeError(
            f"`weight_decay` must be None or a float >= 0; received weight_decay={weight_decay!r}."
        )
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(
            f"`weight_decay` must be None or a float >= 0; received weight_decay={weight_decay}."
        )


def _check_learning_rate_non_negative(learning_rate: Any) -> Any:
    """A finite float >= 0 (as Keras Adam allows 0), a schedule or a callable."""
    import keras

    if is_number(learning_rate):
        if not math.isfinite(learning_rate) or learning_rate < 0:
            raise ValueError(
                "`learning_rate` must be a finite float >= 0, a LearningRateSchedule "
                f"or a callable. Received: learning_rate={learning_rate}"
            )
        return float(learning_rate)
    if not (
        callable(learning_rate)
        or isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    ):
        raise ValueError(
            "`learning_rate` must be a float >= 0, a LearningRateSchedule or a "
            f"callable. Received: learning_rate={learning_rate!r}"
        )
    return learning_rate


def check_adam_arguments(
    learning_rate: Any,
    beta_1: Any,
    beta_2: Any,
    epsilon: Any,
    amsgrad: Any,
    weight_decay: Any,
    *,
    zero_learning_rate: bool,
    tensor_betas: bool,
) -> Any:
    """Adam's arguments (ShardedAdam, LazyAdam/LazyAdamW); returns the learning
    rate (a float for a number).

    ``zero_learning_rate``: a learning rate of 0 is allowed (ShardedAdam, as
    Keras Adam; else it must be > 0). ``tensor_betas``: betas that are not
    Python numbers (tensors, callables, which Keras accepts) pass unchecked.
    """
    if zero_learning_rate:
        learning_rate = _check_learning_rate_non_negative(learning_rate)
    else:
        learning_rate = check_learning_rate(learning_rate)
    for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not tensor_betas or isinstance(value, numbers.Real):
            check_unit_interval(name, value)
    check_positive("epsilon", epsilon)
    import numpy as np

    if not isinstance(amsgrad, (bool, np.bool_)):
        raise TypeError(f"`amsgrad` must be a bool; received amsgrad={amsgrad!r}.")
    check_weight_decay(weight_decay)
    return learning_rate
