"""Fused cross-device transfers (tf_async/strategies/_fused_transfer.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_async.strategies import _fused_transfer

DTYPES = [
    tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32,
    tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64, tf.complex64, tf.bool,
]


def _value(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=shape) * 100
    if dtype == tf.bool:
        return tf.constant(raw > 0)
    if dtype.is_complex:
        return tf.complex(tf.constant(raw, tf.float32), tf.constant(-raw, tf.float32))
    if dtype.is_integer:
        raw = np.abs(raw) if dtype.is_unsigned else raw
        return tf.cast(tf.constant(raw.astype(np.int64)), dtype)
    return tf.cast(tf.constant(raw), dtype)


def test_pack_unpack_round_trips_every_dtype_and_shape_bit_exactly():
    shapes = [(), (1,), (3,), (2, 3), (4, 1, 5)]
    tensors = [_value(d, s, i) for i, (d, s) in enumerate(
        (d, shapes[i % len(shapes)]) for i, d in enumerate(DTYPES * 2))]

    @tf.function
    def round_trip(tensors):
        buffer = _fused_transfer.pack(tensors)
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in tensors]
        return buffer, _fused_transfer.unpack(buffer, specs)

    buffer, out = round_trip(tensors)
    assert buffer.dtype == tf.uint8
    assert buffer.shape == (sum(int(np.prod(t.shape)) * t.dtype.size for t in tensors),)
    for original, back in zip(tensors, out):
        assert back.dtype == original.dtype and back.shape == original.shape
        np.testing.assert_array_equal(back.numpy(), original.numpy())


def test_send_fuses_small_tensors_per_route_and_keeps_order(logical_devices):
    source, destination = logical_devices[1], logical_devices[2]
    small = [_value(tf.float32, (3, 4), 0), _value(tf.int64, (), 1), _value(tf.bool, (5,), 2)]
    large = tf.zeros([_fused_transfer.FUSE_BYTES // 4 + 1], tf.float32)

    @tf.function
    def step():
        with tf.device(source):
            sent = [tf.identity(t) for t in small] + [tf.identity(large)]
        moved = _fused_transfer.send(sent, [destination] * len(sent))
        return moved

    graph = step.get_concrete_function().graph
    concats = [op for op in graph.get_operations() if op.type == "ConcatV2"]
    splits = [op for op in graph.get_operations() if op.type == "SplitV"]
    assert len(concats) == 1 and len(splits) == 1
    assert tf.DeviceSpec.from_string(concats[0].device) == tf.DeviceSpec.from_string(source)
    assert tf.DeviceSpec.from_string(splits[0].device) == tf.DeviceSpec.from_string(destination)
    # Only the small tensors are copied into the buffer; the large one goes alone.
    fused_bytes = sum(i.shape.num_elements() for i in concats[0].inputs[:-1])
    assert fused_bytes == sum(int(np.prod(t.shape)) * t.dtype.size for t in small)

    out = step()
    for original, back in zip(small + [large], out):
        np.testing.assert_array_equal(back.numpy(), original.numpy())


def test_send_passes_through_what_it_cannot_fuse():
    indexed = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([0, 4]), tf.constant([5, 3]))
    strings = tf.constant(["a", "b"])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def step(dynamic):
        tensors = [dynamic, strings, tf.constant(1.0)]
        return _fused_transfer.send(tensors, ["/cpu:1"] * 3)

    out = step(tf.constant([1.0, 2.0]))
    np.testing.assert_array_equal(out[0].numpy(), [1.0, 2.0])
    assert out[1].numpy().tolist() == [b"a", b"b"]
    assert _fused_transfer.send([indexed, None], ["/cpu:1", "/cpu:1"])[0] is indexed


def test_send_splits_buckets_at_bucket_bytes(monkeypatch):
    monkeypatch.setattr(_fused_transfer, "BUCKET_BYTES", 64)
    tensors = [tf.fill([8], float(i)) for i in range(5)]  # 32 bytes each

    @tf.function
    def step():
        with tf.device("/cpu:0"):
            sent = [tf.identity(t) for t in tensors]
        return _fused_transfer.send(sent, ["/cpu:1"] * 5)

    graph = step.get_concrete_function().graph
    # Buckets of 2, 2 and 1 tensors: two fused buffers, the last sent alone.
    assert len([op for op in graph.get_operations() if op.type == "ConcatV2"]) == 2
    for i, value in enumerate(step()):
        np.testing.assert_array_equal(value.numpy(), tensors[i].numpy())


def test_send_rejects_mismatched_destinations():
    with pytest.raises(ValueError, match="same length"):
        _fused_transfer.send([tf.constant(1.0)], [])
