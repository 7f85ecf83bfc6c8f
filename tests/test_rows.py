"""tf_async._rows: rows of plain and partitioned variables, in the order asked."""

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import sharded_variable

from tf_async import _rows

TABLE = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
IDS = np.array([[6, 0], [3, 3], [1, 5]], np.int64)


def test_gather_plain_variable_in_order_of_ids():
    variable = keras.Variable(TABLE)
    np.testing.assert_array_equal(_rows.gather(variable, IDS), TABLE[IDS])
    assert _rows.shards(variable) == [variable.value]


def test_gather_sharded_variable_reassembles_rows_across_shards():
    # "div" partitioning of 7 rows over 3 shards: 3, 2, 2 rows.
    shards = [tf.Variable(TABLE[0:3]), tf.Variable(TABLE[3:5]), tf.Variable(TABLE[5:7])]
    table = sharded_variable.ShardedVariable(shards)

    @tf.function
    def lookup(ids):
        return _rows.gather(table, ids)

    np.testing.assert_array_equal(lookup(tf.constant(IDS)), TABLE[IDS])
    assert _rows.shards(table) == shards
