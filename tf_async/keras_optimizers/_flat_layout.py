"""Flat-slice layout of a group of tensors split evenly over N shards (ZeRO-1).

A group of tensors with sizes n_0 .. n_{k-1} is laid out back to back in one
flat vector of length L = Σ n_i, padded to N·S with S = ceil(L / N), so the
padding is at most N − 1 elements. Shard r owns the contiguous range
[r·S, (r+1)·S). Everything here is static Python arithmetic, done once at
trace time; no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of tensor ``index`` that lies in shard ``shard``.

    Elements ``[start, stop)`` of the flattened tensor sit at
    ``[shard_offset, shard_offset + stop - start)`` inside the shard.
    """

    index: int
    shard: int
    start: int
    stop: int
    shard_offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class FlatLayout:
    """Contiguous equal-size shards over the concatenation of flat tensors."""

    def __init__(self, sizes: Sequence[int], num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"`num_shards` must be >= 1. Received: {num_shards}")
        if any(int(s) < 0 for s in sizes):
            raise ValueError(f"Tensor sizes must be >= 0. Received: {list(sizes)}")
        self.sizes: List[int] = [int(s) for s in sizes]
        self.num_shards = int(num_shards)
        self.offsets: List[int] = []
        total = 0
        for size in self.sizes:
            self.offsets.append(total)
            total += size
        self.total = total
        self.shard_size = -(-total // self.num_shards)  # ceil
        self.padded_total = self.shard_size * self.num_shards
        self.padding = self.padded_total - self.total

    def shard_range(self, shard: int) -> tuple:
        """``[begin, end)`` of ``shard`` in the padded flat vector."""
        begin = shard * self.shard_size
        return begin, begin + self.shard_size

    def pieces(self, shard: int) -> List[Piece]:
        """Tensor parts inside ``shard``, in flat order (padding not included)."""
        return [
            piece
            for index in range(len(self.sizes))
            if (piece := self._piece(index, shard)) is not None
        ]

    def shard_padding(self, shard: int) -> int:
        """Padding elements at the end of ``shard`` (only the last ones have any)."""
        begin, end = self.shard_range(shard)
        return end - min(end, max(begin, self.total))

    def parts(self, index: int) -> List[Piece]:
        """Where tensor ``index`` lives: its pieces in each shard it touches."""
        offset, size = self.offsets[index], self.sizes[index]
        if size == 0 or self.shard_size == 0:
            return []
        first = offset // self.shard_size
        last = (offset + size - 1) // self.shard_size
        return [self._piece(index, shard) for shard in range(first, last + 1)]

    def _piece(self, index: int, shard: int) -> Optional[Piece]:
        """Intersection of tensor ``index`` with ``shard`` (None if empty)."""
        begin, end = self.shard_range(shard)
        offset, size = self.offsets[index], self.sizes[index]
        lo, hi = max(begin, offset), min(end, offset + size)
        if lo >= hi:
            return None
        return Piece(index, shard, lo - offset, hi - offset, lo - begin)
