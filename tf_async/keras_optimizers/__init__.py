"""Keras 3 optimizers for asynchronous and memory-lean training.

Every optimizer here is a ``keras.optimizers.Optimizer`` subclass, registered
as Keras-serializable, that reads staleness from ``tf_async.staleness`` and
equals its base optimizer when τ = 0.
"""

__all__: list = []
from tf_async.keras_optimizers.delay_compensated import DCSGD, DCAdam, AdamAsync  # noqa: E402
__all__ += ["DCSGD", "DCAdam", "AdamAsync"]
from tf_async.keras_optimizers.staleness_scaled import StalenessScaled  # noqa: E402
__all__ += ["StalenessScaled"]

from tf_async.keras_optimizers.sharded_adam import ShardedAdam  # noqa: E402

__all__ += ["ShardedAdam"]
from tf_async.keras_optimizers.lazy import LazyAdam, LazyAdamW, LazySGD  # noqa: E402

__all__ += ["LazyAdam", "LazyAdamW", "LazySGD"]
from tf_async.keras_optimizers.gap_aware import GapAware  # noqa: E402

__all__ += ["GapAware"]
from tf_async.keras_optimizers.look_ahead import DanaAdam, DanaSGD  # noqa: E402

__all__ += ["DanaSGD", "DanaAdam"]
from tf_async.keras_optimizers.dana_zero import DanaZeroAdam, DanaZeroSGD  # noqa: E402

__all__ += ["DanaZeroSGD", "DanaZeroAdam"]
