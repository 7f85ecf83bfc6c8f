"""Unique ids for scheduled training steps, cheap to send to the workers.

The async train step needs a unique id per scheduled step, so that a step the
coordinator retries after a worker failure is not applied twice. Passing a new
scalar tensor per step makes TF 2.21 copy it to the worker each time, and the
process grew by about 2 KB per step that way (30 MB over 12 000 steps of the
straggler benchmark's fit; 1 MB with the scheme here). Instead a step's id is
``block * SLOTS + slot``, passed as two tensors that are reused: the ``SLOTS``
slot tensors are created once and one block tensor per ``SLOTS`` steps. TF
keeps a tensor's copy on each remote device and reuses it (it drops such copies
when the cluster changes, e.g. a worker restarts), so after the first pass a
step sends no new tensor.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import tensorflow as tf

SLOTS = 1024


class StepIds:
    """Hands out ``(block, slot)`` int64 tensor pairs for consecutive ids."""

    def __init__(self, first: int = 0):
        self.next_id = first
        self._slots: List[Optional[tf.Tensor]] = [None] * SLOTS
        self._block_index = -1
        self._block: Optional[tf.Tensor] = None

    def take(self, count: int = 1) -> Tuple[tf.Tensor, tf.Tensor]:
        """The next id as ``(block, slot)`` tensors (see :func:`combine`); the
        ``count - 1`` ids after it are reserved for the same call."""
        block, slot = divmod(self.next_id, SLOTS)
        self.next_id += count
        if block != self._block_index:
            self._block = tf.constant(block, tf.int64)
            self._block_index = block
        if self._slots[slot] is None:
            self._slots[slot] = tf.constant(slot, tf.int64)
        return self._block, self._slots[slot]


def combine(block: tf.Tensor, slot: tf.Tensor) -> tf.Tensor:
    """The step id (int64) inside the step function."""
    return block * SLOTS + slot
