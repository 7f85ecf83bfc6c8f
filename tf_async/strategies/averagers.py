"""Model averagers for ``LocalUpdateStrategy`` — one small class per rule.

Averaging is kept apart from the optimizer (as in PyTorch's
``torch.distributed.algorithms.model_averaging``): the replicas' own
optimizers take local steps, and every H steps the strategy packs each
replica's parameters into one flat vector ``w_i``, computes the replica mean
``w̄ = mean_i(w_i)`` with ONE all-reduce, and asks an averager for each
replica's new parameters. Averagers see only ``(w_i, w̄)`` per local replica,
so none of them needs a second collective.

* ``MeanAverager`` — local SGD / periodic model averaging (Lin et al., ICLR
  2020): ``w_i ← w̄``.
* ``EASGDAverager`` — elastic averaging SGD (Zhang, Choromanska, LeCun 2015):
  ``w_i ← w_i − α(w_i − w̃)``, ``w̃ ← w̃ + α Σ_i (w_i − w̃) = w̃ + αN(w̄ − w̃)``.
* ``DiLoCoAverager`` — DiLoCo (Douillard et al. 2023): the outer gradient
  ``Δ = w̃ − w̄`` drives an outer Nesterov SGD on the centre ``w̃``
  (``m ← μm + Δ``, ``w̃ ← w̃ − η(Δ + μm)``); every replica restarts from ``w̃``.

Centre / momentum state lives in flat variables created in the strategy's
scope (one copy per device, kept identical), built from the initial
parameters on first use.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import tensorflow as tf

__all__ = ["Averager", "MeanAverager", "EASGDAverager", "DiLoCoAverager", "get"]


class Averager:
    """Base class: ``build`` once, then ``average`` at every synchronisation."""

    name: str = "averager"

    def __init__(self) -> None:
        self._strategy: Optional[tf.distribute.Strategy] = None

    def build(self, initial: tf.Tensor, strategy: Optional[tf.distribute.Strategy] = None) -> None:
        """Creates the averager's state from the flat initial parameters."""
        self._strategy = strategy or tf.distribute.get_strategy()

    def variables(self) -> List[tf.Variable]:
        """State variables (checkpoint them to resume mid-training)."""
        return []

    def average(
        self, local: Sequence[tf.Tensor], mean: Sequence[tf.Tensor], num_replicas: int
    ) -> List[tf.Tensor]:
        """New flat parameters per local replica.

        Args:
          local: ``w_i`` for each replica on this worker (on its device).
          mean: ``w̄`` (the mean over ALL replicas), one copy per local device.
          num_replicas: N, replicas in sync over all workers.
        """
        raise NotImplementedError

    def _state(self, name: str, initial: tf.Tensor) -> tf.Variable:
        with tf.init_scope(), self._strategy.scope():
            return tf.Variable(initial, trainable=False, name=f"{self.name}_{name}")

    def _local(self, variable: tf.Variable, count: int) -> tuple:
        """``variable``'s copy on each of the ``count`` local replicas' devices."""
        copies = self._strategy.experimental_local_results(variable)
        return copies if len(copies) == count else tuple(copies[:1]) * count

    def get_config(self) -> dict:
        return {}


class MeanAverager(Averager):
    """Periodic model averaging: ``w_i ← mean_j(w_j)``."""

    name = "mean"

    def average(self, local, mean, num_replicas):
        return list(mean)


class EASGDAverager(Averager):
    """Elastic averaging SGD (Zhang, Choromanska & LeCun, NeurIPS 2015).

    ``alpha`` is the elastic coupling α. ``LocalUpdateStrategy`` accepts
    0 < α < 1; this class also accepts α = 0 (no coupling: replicas and centre
    never move — a degenerate case that exists for testing). The centre is
    stable for αN < 1 (the paper's β = αN ≈ 0.9).
    """

    name = "easgd"

    def __init__(self, alpha: float) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            raise ValueError(f"EASGDAverager `alpha` must be a float in [0, 1), got {alpha!r}.")
        self.alpha = float(alpha)
        self.centre: Optional[tf.Variable] = None

    def build(self, initial, strategy=None):
        super().build(initial, strategy)
        self.centre = self._state("centre", initial)

    def variables(self):
        return [self.centre]

    def average(self, local, mean, num_replicas):
        centres = self._local(self.centre, len(local))
        alpha = tf.constant(self.alpha, local[0].dtype)
        new = []
        for w, c in zip(local, centres):
            with tf.device(w.device):
                new.append(w - alpha * (w - c))
        with tf.device(mean[0].device):
            c0 = centres[0]
            self.centre.assign(c0 + alpha * float(num_replicas) * (mean[0] - c0))
        return new

    def get_config(self):
        return {"alpha": self.alpha}


class DiLoCoAverager(Averager):
    """DiLoCo outer step (Douillard et al., 2023): Nesterov SGD on the centre.

    ``Δ = w̃ − w̄``; ``m ← μm + Δ``; ``w̃ ← w̃ − η(Δ + μm)``; replicas ← ``w̃``.
    With η = 1 and μ = 0 this is exactly periodic averaging.
    """

    name = "diloco"

    def __init__(self, outer_learning_rate: float = 0.7, outer_momentum: float = 0.9) -> None:
        super().__init__()
        if isinstance(outer_learning_rate, bool) or not isinstance(
            outer_learning_rate, (int, float)
        ) or not outer_learning_rate > 0.0:
            raise ValueError(
                f"`outer_learning_rate` must be a float > 0, got {outer_learning_rate!r}."
            )
        if isinstance(outer_momentum, bool) or not isinstance(
            outer_momentum, (int, float)
        ) or not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"`outer_momentum` must be a float in [0, 1), got {outer_momentum!r}.")
        self.outer_learning_rate = float(outer_learning_rate)
        self.outer_momentum = float(outer_momentum)
        self.centre: Optional[tf.Variable] = None
        self.momentum: Optional[tf.Variable] = None

    def build(self, initial, strategy=None):
        super().build(initial, strategy)
        self.centre = self._state("centre", initial)
        self.momentum = self._state("momentum", tf.zeros_like(initial))

    def variables(self):
        return [self.centre, self.momentum]

    def average(self, local, mean, num_replicas):
        centres = self._local(self.centre, len(local))
        momenta = self._local(self.momentum, len(local))
        lr = tf.constant(self.outer_learning_rate, local[0].dtype)
        mu = tf.constant(self.outer_momentum, local[0].dtype)
        new = []
        new_m = None
        for d, (c, m, w_bar) in enumerate(zip(centres, momenta, mean)):
            with tf.device(w_bar.device):
                delta = c - w_bar
                m_next = mu * m + delta
                if self.outer_momentum:
                    step = delta + mu * m_next
                else:
                    step = delta
                new.append(c - lr * step)
                if d == 0:
                    new_m = m_next
        self.momentum.assign(new_m)
        self.centre.assign(new[0])
        return new

    def get_config(self):
        return {
            "outer_learning_rate": self.outer_learning_rate,
            "outer_momentum": self.outer_momentum,
        }


AVERAGING_NAMES = ("mean", "easgd", "diloco")


def get(
    averaging: str,
    alpha: float = 0.1,
    outer_learning_rate: float = 0.7,
    outer_momentum: float = 0.9,
) -> Averager:
    """The averager named ``averaging`` (one of ``AVERAGING_NAMES``)."""
    if averaging == "mean":
        return MeanAverager()
    if averaging == "easgd":
        return EASGDAverager(alpha)
    if averaging == "diloco":
        return DiLoCoAverager(outer_learning_rate, outer_momentum)
    raise ValueError(
        f"`averaging` must be one of {AVERAGING_NAMES}, got {averaging!r}."
    )
