"""The flat-slice layout behind ShardedAdam (pure Python, no TF)."""

import pytest

from tf_async.keras_optimizers._flat_layout import FlatLayout


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sizes", [[35, 5, 15, 3], [1], [7, 0, 2], [16, 16], [1, 1, 1]])
def test_shards_cover_every_element_once(sizes, num_shards):
    layout = FlatLayout(sizes, num_shards)
    assert layout.total == sum(sizes)
    assert 0 <= layout.padding <= num_shards - 1
    assert layout.padded_total == layout.shard_size * num_shards
    seen = set()
    for shard in range(num_shards):
        pieces = layout.pieces(shard)
        used = sum(p.size for p in pieces) + layout.shard_padding(shard)
        assert used == layout.shard_size
        cursor = 0
        for p in pieces:
            assert p.shard_offset == cursor  # contiguous, in flat order
            cursor += p.size
            for e in range(p.start, p.stop):
                assert (p.index, e) not in seen
                seen.add((p.index, e))
    assert seen == {(i, e) for i, n in enumerate(sizes) for e in range(n)}
    # `parts` is the inverse view of `pieces`.
    for index in range(len(sizes)):
        from_pieces = [
            (s, p.start, p.stop, p.shard_offset)
            for s in range(num_shards)
            for p in layout.pieces(s)
            if p.index == index
        ]
        from_parts = [(q.shard, q.start, q.stop, q.shard_offset) for q in layout.parts(index)]
        assert from_parts == from_pieces


def test_padding_only_on_last_shards():
    layout = FlatLayout([10], 4)  # S = 3, padded 12
    assert layout.shard_size == 3 and layout.padding == 2
    assert [layout.shard_padding(s) for s in range(4)] == [0, 0, 0, 2]
    layout = FlatLayout([2], 4)  # S = 1: shards 2 and 3 are all padding
    assert [layout.shard_padding(s) for s in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("sizes,num_shards", [([1], 0), ([-1], 2)])
def test_bad_layout_arguments(sizes, num_shards):
    with pytest.raises(ValueError):
        FlatLayout(sizes, num_shards)
