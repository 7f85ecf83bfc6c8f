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
