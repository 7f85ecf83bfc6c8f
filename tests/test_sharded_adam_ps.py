"""ShardedAdam under tf.distribute.experimental.ParameterServerStrategy.

Each test runs in a fresh spawned process on ``tf_async.local_cluster``
(a process that connected to a cluster cannot go back; DESIGN.md §5).
"""

from __future__ import annotations

import pytest

STEPS = 12


def _ps_child(partitioned: bool) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_async import cluster
    from tf_async.keras_optimizers import ShardedAdam

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(STEPS, 8, 6)).astype("float32"))
    y = tf.constant(rng.normal(size=(STEPS, 8, 3)).astype("float32"))

    def make_model():
        keras.utils.set_random_seed(1)
        return keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
        )

    # Reference first, before this process connects to the cluster: plain
    # keras AdamW, no strategy (Keras' own optimizers cannot update
    # partitioned variables: "ShardedVariable doesn't support being used as a
    # reference").
    reference = make_model()
    reference_opt = keras.optimizers.Adam(0.01, weight_decay=0.01)
    for i in range(STEPS):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(reference(x[i]) - y[i]))
        reference_opt.apply(tape.gradient(loss, reference.trainable_variables),
                            reference.trainable_variables)
    expected = [v.numpy() for v in reference.trainable_variables]

    resolver = cluster.local_cluster(workers=1, ps=2)
    partitioner = (
        tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)
        if partitioned
        else None
    )
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=partitioner
    )
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)

    def train(make_optimizer):
        with strategy.scope():
            model = make_model()
            optimizer = make_optimizer()
            optimizer.build(model.trainable_variables)

        @tf.function
        def step(i):
            def replica_fn(i):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(model(x[i]) - y[i]))
                # Keras 3 Variables wrapping a ShardedVariable (and the
                # ShardedVariable itself) have no `handle` for the tape:
                # differentiate w.r.t. the shards and concatenate.
                sources = [
                    list(getattr(v.value, "variables", [v.value]))
                    for v in model.trainable_variables
                ]
                flat = tape.gradient(loss, [s for group in sources for s in group])
                grads, k = [], 0
                for group in sources:
                    parts, k = flat[k : k + len(group)], k + len(group)
                    grads.append(parts[0] if len(parts) == 1 else tf.concat(parts, 0))
                optimizer.apply(grads, model.trainable_variables)

            strategy.run(replica_fn, args=(i,))

        for i in range(STEPS):
            coordinator.schedule(step, args=(tf.constant(i),))
            coordinator.join()  # one worker, one step at a time: deterministic
        return model, optimizer

    model, optimizer = train(lambda: ShardedAdam(0.01, weight_decay=0.01))

    def devices(variable):
        variable = getattr(variable, "value", variable)
        if hasattr(variable, "variables"):  # ShardedVariable
            return [v.device for v in variable.variables]
        return [variable.device]

    colocated = []
    slot_devices = []
    for index, variable in enumerate(model.trainable_variables):
        for slots in (optimizer._momentums, optimizer._velocities):
            colocated.append(devices(slots[index]) == devices(variable))
            slot_devices.extend(devices(slots[index]))
    return {
        "max_diff": max(
            float(np.max(np.abs(a - b.numpy())))
            for a, b in zip(expected, model.trainable_variables)
        ),
        "iterations": int(optimizer.iterations.numpy()),
        "num_shards": optimizer.num_shards,
        "colocated": colocated,
        "slot_devices": slot_devices,
        "variable_devices": [d for v in model.trainable_variables for d in devices(v)],
    }


@pytest.mark.slow
@pytest.mark.parametrize("partitioned", [False, True])
def test_parameter_server_slots_beside_variables(fresh_process, partitioned):
    result = fresh_process(_ps_child, partitioned, timeout=300)
    assert result["max_diff"] <= 1e-6
    assert result["iterations"] == STEPS
    assert result["num_shards"] == 1
    assert all(result["colocated"]), result
    # Workers hold no optimizer state: every slot lives on a parameter server.
    assert all("/job:ps" in d for d in result["slot_devices"]), result["slot_devices"]
    if partitioned:
        assert {d for d in result["variable_devices"] if "/job:ps" in d} == {
            "/job:ps/replica:0/task:0/device:CPU:0",
            "/job:ps/replica:0/task:1/device:CPU:0",
        }


def _async_ps_fit_child() -> dict:
    """ShardedAdam compiled under AsyncParameterServerStrategy and trained by fit."""
    import keras
    import numpy as np

    import tf_async
    from tf_async.keras_optimizers import ShardedAdam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = (x[:, :3].argmax(1)).astype("int32")
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=1))
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=ShardedAdam(0.01), loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=16, epochs=3, steps_per_epoch=10, verbose=0)
    optimizer = model.optimizer
    slot_devices = sorted({v.value.device for v in optimizer._momentums + optimizer._velocities}
                          if hasattr(optimizer, "_momentums") else set())
    return {
        "losses": history.history["loss"],
        "iterations": int(optimizer.iterations.numpy()),
        "slot_devices": slot_devices,
    }


@pytest.mark.slow
def test_sharded_adam_under_async_parameter_server_fit(fresh_process):
    result = fresh_process(_async_ps_fit_child, timeout=300)
    # 256 samples / 16 = 16 batches per pass, steps_per_epoch=10: as Keras'
    # fit, epoch 2 runs out of data after 6 steps (10 + 6 + 10).
    assert result["iterations"] == 26
    assert result["losses"][-1] < result["losses"][0]
    assert result["slot_devices"], "no Adam slots found"
    assert all("/job:ps" in d for d in result["slot_devices"]), result["slot_devices"]


def _tables_child() -> dict:
    """ShardedAdam on embedding tables under AsyncParameterServerStrategy
    (1 worker: τ = 0), a plain table and one split over 2 PS."""
    import warnings

    import keras
    import numpy as np
    import tensorflow as tf

    import tf_async
    from tf_async import _rows
    from tf_async.keras_optimizers import LazyAdam, ShardedAdam

    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 40, size=(96, 8)), rng.integers(0, 50, size=(96, 8))],
                 axis=1).astype("int32")
    x[:, :, 1] = x[:, :, 0]  # repeated ids
    y = rng.normal(size=(96, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()

    def make_model():
        inputs = keras.Input((2, 8), dtype="int32")
        users = keras.layers.Embedding(60, 4, name="users")(inputs[:, 0])  # 960 B: whole
        items = keras.layers.Embedding(65, 4, name="items")(inputs[:, 1])  # 1040 B: 2 shards
        h = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling1D()(users),
                                        keras.layers.GlobalAveragePooling1D()(items)])
        h = keras.layers.Dense(8, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(1)(h))

    keras.utils.set_random_seed(2)
    reference = make_model()
    initial = reference.get_weights()
    reference.compile(optimizer=LazyAdam(0.05, weight_decay=0.01), loss="mse")
    reference.fit(data, epochs=1, steps_per_epoch=9, verbose=0)
    expected = reference.get_weights()

    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=1, ps=2),
        variable_partitioner=tf.distribute.experimental.partitioners.MinSizePartitioner(
            min_shard_bytes=1024, max_shards=2))
    with strategy.scope():
        model = make_model()
        model.set_weights(initial)
        model.compile(optimizer=ShardedAdam(0.05, weight_decay=0.01), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(data, epochs=1, steps_per_epoch=9, verbose=0)
    got = model.get_weights()
    return {
        "shards": {name: len(_rows.shards(model.get_layer(name).embeddings))
                   for name in ("users", "items")},
        "diff": [float(np.abs(a - b).max()) for a, b in zip(got, expected)],
        "untouched_moved": [float(np.abs(got[i][high:] - initial[i][high:]).max())
                            for i, high in ((0, 40), (1, 50))],
        "notices": [str(w.message) for w in caught if str(w.message).startswith("tf_async:")],
        "iterations": int(model.optimizer.iterations.numpy()),
    }


@pytest.mark.slow
def test_sharded_adam_updates_table_rows_lazily_under_async_ps(fresh_process):
    """Under the PS strategy a table's row gradient gets LazyAdam semantics
    (touched rows only, duplicates summed, decay of touched rows), equal to
    tf_async LazyAdam; dense variables get Keras Adam(W) exactly."""
    r = fresh_process(_tables_child, timeout=400)
    assert r["shards"] == {"users": 1, "items": 2}
    assert max(r["diff"]) < 1e-5, r["diff"]
    assert r["untouched_moved"] == [0.0, 0.0]
    assert r["notices"] == []  # no "updates every row" notice
    assert r["iterations"] == 9
