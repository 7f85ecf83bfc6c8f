"""The examples' shared driver: flags, one strategy builder per mode, fit + resume.

Modes (``--mode``):
  sync        stock Keras synchronous training (``tf.distribute.MirroredStrategy``
              over the local devices) — the baseline.
  async_ps    ``tf_async.strategies.AsyncParameterServerStrategy``: the embedded
              ``tf_async.local_cluster(--workers, --ps)`` without TF_CONFIG, the
              real cluster with it (``python -m tf_async.launch``).
  local_sgd   ``tf_async.strategies.LocalUpdateStrategy`` (``--sync_every``,
              ``--averaging``) over MirroredStrategy, or MultiWorkerMirrored
              under TF_CONFIG without parameter servers.
  sharded     ``tf_async.keras_optimizers.ShardedAdam`` under MirroredStrategy.
  simulated   ``tf_async.strategies.SimulatedAsyncStrategy(--workers)``: the
              staleness of ``--workers`` async workers, on one device.

``--cpu_devices N`` splits the CPU into N logical devices first, so sync,
local_sgd and sharded have N replicas on a machine without accelerators.
``--model_dir`` gets TensorBoard logs and a ``tf.train.Checkpoint`` of model and
optimizer after every epoch; ``--resume`` restores the latest one and continues
(incremental training / warm start).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging

import tf_async

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "async_ps", ["sync", "async_ps", "local_sgd", "sharded", "simulated"],
                  "Training mode (see examples/training.py).")
flags.DEFINE_string("optimizer", "adam",
                    "adam | sgd | dcadam | dcsgd | sharded_adam | any keras.optimizers name.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_float("dc_lambda", 1.0, "lambda_ of dcsgd/dcadam.")
flags.DEFINE_integer("workers", 2, "async_ps: workers of the embedded cluster; simulated: M.",
                     lower_bound=1)
flags.DEFINE_integer("ps", 1, "async_ps: parameter servers of the embedded cluster.",
                     lower_bound=1)
flags.DEFINE_integer("max_staleness", None, "async_ps/simulated: bound on staleness.",
                     lower_bound=0)
flags.DEFINE_integer("sync_every", 8, "local_sgd: average every H steps.", lower_bound=1)
flags.DEFINE_enum("averaging", "mean", ["mean", "easgd", "diloco"], "local_sgd averaging.")
flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into this many logical devices.",
                     lower_bound=1)
flags.DEFINE_integer("epochs", 10, "Epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 50, "Steps (batches) per epoch.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Batch size per step.", lower_bound=1)
flags.DEFINE_string("model_dir", None, "TensorBoard logs and checkpoints go here.")
flags.DEFINE_bool("resume", False, "Warm-start from the latest checkpoint in --model_dir.")
flags.DEFINE_string("data_dir", None, "tensorflow_datasets data_dir.")


def _tf_config_task() -> Tuple[str, int, bool]:
    """(task type, index, cluster has ps) from TF_CONFIG; ("", 0, False) without."""
    if not os.environ.get("TF_CONFIG"):
        return "", 0, False
    config = tf_async.cluster.parse_tf_config()
    return config["task"]["type"], config["task"].get("index", 0), "ps" in config["cluster"]


def build_sync():
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def build_async_ps():
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    else:
        # Loopback-only network namespace (where the OS allows it): the
        # in-process servers are reachable from this process only.
        resolver = tf_async.local_cluster(workers=FLAGS.workers, ps=FLAGS.ps,
                                          private_network=True)
    return tf_async.strategies.AsyncParameterServerStrategy(
        resolver, max_staleness=FLAGS.max_staleness)


def build_local_sgd():
    import tensorflow as tf

    base = (tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG")
            else tf.distribute.MirroredStrategy())
    return tf_async.strategies.LocalUpdateStrategy(
        base, sync_every=FLAGS.sync_every, averaging=FLAGS.averaging)


def build_simulated():
    return tf_async.strategies.SimulatedAsyncStrategy(
        FLAGS.workers, max_staleness=FLAGS.max_staleness)


MODES: Dict[str, Callable] = {
    "sync": build_sync,
    "async_ps": build_async_ps,
    "local_sgd": build_local_sgd,
    "sharded": build_sync,  # + ShardedAdam, see make_optimizer
    "simulated": build_simulated,
}


def make_optimizer():
    import keras

    lr = FLAGS.learning_rate
    name = "sharded_adam" if FLAGS.mode == "sharded" else FLAGS.optimizer.lower()
    builders = {
        "sharded_adam": lambda: tf_async.keras_optimizers.ShardedAdam(lr),
        "dcadam": lambda: tf_async.keras_optimizers.DCAdam(lr, lambda_=FLAGS.dc_lambda),
        "dcsgd": lambda: tf_async.keras_optimizers.DCSGD(
            lr, momentum=0.9, lambda_=FLAGS.dc_lambda, adaptive=True),
    }
    if name in builders:
        return builders[name]()
    return keras.optimizers.get({"class_name": name, "config": {"learning_rate": lr}})


def split_cpu(count: int) -> None:
    import tensorflow as tf

    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def run(load_data: Callable, make_model: Callable, loss: str = "sparse_categorical_crossentropy"):
    """Builds the strategy for --mode, trains, checkpoints, prints test accuracy.

    ``load_data()`` -> (x_train, y_train, x_test, y_test, name);
    ``make_model(input_shape)`` -> an uncompiled keras.Model.
    """
    logging.set_verbosity(logging.WARNING)  # the coordinator logs every join at INFO
    if FLAGS.resume and not FLAGS.model_dir:
        raise ValueError("--resume needs --model_dir (where the checkpoint is).")
    if FLAGS.mode == "sharded" and FLAGS.optimizer.lower() not in ("adam", "sharded_adam"):
        raise ValueError(f"--mode=sharded trains with ShardedAdam; got --optimizer={FLAGS.optimizer}.")
    if FLAGS.mode == "async_ps":
        tf_async.cluster.serve_forever_if_server_task()  # worker/ps tasks stop here
    split_cpu(FLAGS.cpu_devices)
    import keras
    import tensorflow as tf

    x_train, y_train, x_test, y_test, name = load_data()
    print(f"dataset: {name} ({len(x_train)} train / {len(x_test)} test)")
    strategy = MODES[FLAGS.mode]()
    with strategy.scope():
        model = make_model(x_train.shape[1:])
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
        optimizer.build(model.trainable_variables)

    task_type, task_index, _ = _tf_config_task()
    writes_files = task_type in ("", "chief") or (task_type == "worker" and task_index == 0)
    model_dir = FLAGS.model_dir
    if model_dir and not writes_files:  # other MultiWorkerMirrored workers: scratch copies
        model_dir = tempfile.mkdtemp(prefix=f"{task_type}{task_index}_")
    callbacks, manager = [], None
    initial_epoch = 0
    if model_dir:
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         epoch=tf.Variable(0, dtype=tf.int64))
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, "ckpt"),
                                             max_to_keep=2)
        if FLAGS.resume:
            if manager.latest_checkpoint is None:
                raise ValueError(f"--resume: no checkpoint in {model_dir}/ckpt.")
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            initial_epoch = int(checkpoint.epoch.numpy())
            print(f"resumed from {manager.latest_checkpoint} at epoch {initial_epoch} "
                  f"(optimizer step {int(optimizer.iterations.numpy())})")

        class SaveEachEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                checkpoint.epoch.assign(epoch + 1)
                manager.save()

        callbacks += [SaveEachEpoch(),
                      keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"))]

    def dataset_fn(input_context=None):
        dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        if input_context is not None and input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines,
                                    input_context.input_pipeline_id)
        return dataset.shuffle(len(x_train), seed=0).repeat().batch(
            FLAGS.batch_size, drop_remainder=True)

    data = dataset_fn if FLAGS.mode == "async_ps" else dataset_fn()
    history = model.fit(data, epochs=initial_epoch + FLAGS.epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=FLAGS.steps_per_epoch, callbacks=callbacks, verbose=2)
    for key in ("staleness_mean", "staleness_max", "local_divergence"):
        if key in history.history:
            print(f"{key}: {history.history[key][-1]:.4f}")
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    print(f"test_accuracy: {accuracy:.4f}")
    return accuracy
