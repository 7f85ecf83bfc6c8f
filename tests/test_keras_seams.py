"""Pins every Keras/TF private attribute tf_async relies on (tf_async/_keras_fit.py).

If one of these fails after a Keras or TensorFlow upgrade, the seam moved:
update ``tf_async/_keras_fit.py`` (and its "written against" version) first.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_async import _keras_fit


def test_written_against_keras_3():
    assert keras.__version__.startswith("3."), keras.__version__
    assert _keras_fit.KERAS_VERSION_WRITTEN_AGAINST.startswith("3.")


def test_variable_key_matches_keras_optimizer_var_key():
    optimizer = keras.optimizers.Adam()
    assert hasattr(optimizer, "_var_key"), "Keras optimizer lost _var_key"
    v = keras.Variable(np.zeros(3, np.float32))
    assert _keras_fit.variable_key(v) == optimizer._var_key(v)
    assert _keras_fit.variable_key(v.value) == optimizer._var_key(v)


def test_variable_key_maps_mirrored_components_to_container(logical_devices):
    strategy = tf.distribute.MirroredStrategy(logical_devices)
    with strategy.scope():
        v = keras.Variable(np.zeros(3, np.float32))
        optimizer = keras.optimizers.Adam()
    container = v.value
    assert isinstance(container, tf.distribute.DistributedValues)
    keys = {_keras_fit.variable_key(c) for c in container.values}
    assert keys == {optimizer._var_key(v)}
