"""Worker script for tests/test_sharded_adam_mwms.py (run by tf_async.launch).

Each of 2 workers splits its CPU into 2 logical devices and trains, under one
MultiWorkerMirroredStrategy of 2 × 2 = 4 replicas, the same model twice:
once with ``keras.optimizers.Adam`` and once with ``ShardedAdam`` (same seed,
same data). It prints one ``RESULT {json}`` line (weight and state
differences, slice sizes) and writes, worker 0 to ``argv[1]`` (the others to
a scratch directory, as TF's multi-worker checkpointing has every worker
save), a ``tf.train.Checkpoint`` of the ShardedAdam and the reference state
as ``adam_state.npz``.

MultiWorkerMirroredStrategy gives a CPU worker one device; the two logical
CPUs are handed to it by ``_harness.split_cpu_for_multi_worker`` (the
stand-in for a host with 2 GPUs).
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests import _harness  # noqa: E402

LOCAL_DEVICES = 2
STEPS = 10
PER_REPLICA_BATCH = 4


def main():
    out_dir = sys.argv[1]
    _harness.split_cpu_for_multi_worker(LOCAL_DEVICES)
    import keras

    keras.config.disable_traceback_filtering()

    from tf_async.keras_optimizers import ShardedAdam

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = strategy.cluster_resolver.task_id
    replicas = strategy.num_replicas_in_sync
    global_batch = PER_REPLICA_BATCH * replicas
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * STEPS, 6)).astype("float32")
    y = rng.normal(size=(global_batch * STEPS, 3)).astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )

    def dataset():
        # The same sharded input for both optimizers (DATA auto-shard policy).
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
        return data.with_options(options)

    def train(make_optimizer):
        # A custom loop: Keras 3.15's fit cannot start under a multi-worker
        # strategy with more than one local device (its symbolic build calls
        # ``strategy.reduce`` on a tuple of PerReplica batches, which
        # CollectiveAllReduce cannot convert).
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = keras.Sequential(
                [
                    keras.Input((6,)),
                    keras.layers.Dense(5, activation="tanh"),
                    keras.layers.Dense(3),
                ]
            )
            optimizer = make_optimizer()
            optimizer.build(model.trainable_variables)

        def loss_fn(prediction, y):
            per_example = tf.reduce_mean(tf.square(prediction - y), axis=-1)
            return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)

        step = _harness.apply_step(strategy, model, optimizer, loss_fn)
        for batch in strategy.experimental_distribute_dataset(dataset()):
            step(*batch)
        return model, optimizer

    kwargs = dict(weight_decay=0.05, amsgrad=True)
    adam_model, adam = train(lambda: keras.optimizers.AdamW(0.01, **kwargs))
    sharded_model, sharded = train(lambda: ShardedAdam(0.01, **kwargs))

    weight_diff = max(
        float(np.max(np.abs(a.numpy() - b.numpy())))
        for a, b in zip(adam_model.trainable_weights, sharded_model.trainable_weights)
    )
    expected = [np.asarray(v.numpy()) for v in adam.variables]
    got = sharded.logical_state()  # every worker: it gathers the other slices
    state_diff = max(float(np.max(np.abs(e - g))) if e.size else 0.0
                     for e, g in zip(expected, got))
    (group,) = sharded._groups
    slice_sizes = {
        slot: [int(c.shape[0]) for c in strategy.experimental_local_results(var)]
        for slot, var in group.slots.items()
    }
    param_count = sum(int(np.prod(v.shape)) for v in adam_model.trainable_weights)

    target = out_dir if task == 0 else tempfile.mkdtemp()
    path = tf.train.Checkpoint(optimizer=sharded).write(os.path.join(target, "sharded"))
    # Restore into a fresh 4-replica ShardedAdam: each worker writes its slices.
    with strategy.scope():
        restored = ShardedAdam(0.01, **kwargs)
        restored.build(sharded_model.trainable_variables)
    chief_path = os.path.join(out_dir, "sharded")
    tf.train.Checkpoint(optimizer=restored).read(chief_path).assert_consumed()
    restored_diff = max(
        float(np.max(np.abs(e - g))) if e.size else 0.0
        for e, g in zip(expected, restored.logical_state())
    )
    if task == 0:
        np.savez(os.path.join(out_dir, "adam_state.npz"), *expected)
        np.savez(os.path.join(out_dir, "sharded_weights.npz"),
                 *[w.numpy() for w in sharded_model.trainable_weights])
    result = {
        "task": task,
        "replicas": replicas,
        "local_replicas": len(strategy.extended.worker_devices),
        "iterations": int(sharded.iterations.numpy()),
        "weight_diff": weight_diff,
        "state_diff": state_diff,
        "restored_diff": restored_diff,
        "state_len": [len(expected), len(got)],
        "slice_sizes": slice_sizes,
        "shard_size": group.layout.shard_size,
        "param_count": param_count,
        "checkpoint": path,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
