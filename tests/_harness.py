"""Helpers shared by tests, importable from spawned child processes."""

from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from typing import Any, Callable

NUM_LOGICAL_DEVICES = 4
DEFAULT_TIMEOUT = 600


def split_cpu(count: int = NUM_LOGICAL_DEVICES) -> None:
    """Splits the physical CPU into ``count`` logical devices (before TF init)."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:
        # TF already initialised in this process: keep what exists, but say so.
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != count:
            raise


class _FreshCollectiveKeyBase:
    """A class attribute whose every read is a new collective-key base.

    Each ``MirroredStrategy`` / ``MultiWorkerMirroredStrategy`` starts its
    collective group and instance keys from ``1 + _collective_key_base``; two
    strategies over the same devices in one process therefore reuse keys, and
    TF aborts every collective in the process ("Shape mismatch in the
    collective instance 100") once their models differ. TF's own tests bump
    the base by 100000 per strategy (``strategy_combinations.py``); this does
    the same at every construction.
    """

    def __init__(self) -> None:
        self._next = 0

    def __get__(self, obj, owner) -> int:
        self._next += 100000
        return self._next


def give_each_strategy_its_own_collective_keys() -> None:
    from tensorflow.python.distribute import collective_all_reduce_strategy, mirrored_strategy

    for cls in (mirrored_strategy.MirroredStrategy,
                collective_all_reduce_strategy.CollectiveAllReduceStrategy):
        if not isinstance(cls.__dict__.get("_collective_key_base"), _FreshCollectiveKeyBase):
            cls._collective_key_base = _FreshCollectiveKeyBase()


def _child(result_queue, fn, args, kwargs) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        result_queue.put(("ok", fn(*args, **kwargs)))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        result_queue.put(("error", traceback.format_exc()))


def run_in_fresh_process(
    fn: Callable[..., Any], *args, timeout: float = DEFAULT_TIMEOUT, **kwargs
) -> Any:
    """Runs ``fn(*args, **kwargs)`` in a spawned process; returns its result."""
    context = multiprocessing.get_context("spawn")
    result_queue = context.Queue()
    process = context.Process(
        target=_child, args=(result_queue, fn, args, kwargs), daemon=True
    )
    process.start()
    try:
        status, payload = result_queue.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(
            f"{getattr(fn, '__name__', fn)} did not finish within {timeout}s "
            f"(child exit code {process.exitcode})."
        ) from None
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    if status == "error":
        raise AssertionError(f"child process failed:\n{payload}")
    return payload


def fit_interrupted_then_resumed(model, data, backup_dir: str, epochs: int,
                                 steps_per_epoch: int, interrupt_epoch: int = 1) -> dict:
    """``fit`` with ``BackupAndRestore`` stopped by an error after epoch
    ``interrupt_epoch``, then fit again to resume; returns what a test checks."""
    import keras

    class InterruptAfterEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == interrupt_epoch:
                raise RuntimeError("simulated interruption")

    results = {}
    try:
        model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup_dir),
                             InterruptAfterEpoch()])
    except RuntimeError as error:
        results["interrupted"] = str(error)
    results["iterations_at_interrupt"] = int(model.optimizer.iterations.numpy())
    history = model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(backup_dir)])
    results["resumed_epochs"] = history.epoch
    results["iterations_after_resume"] = int(model.optimizer.iterations.numpy())
    return results


def split_cpu_for_multi_worker(count: int) -> None:
    """This worker's CPU as ``count`` logical devices, all of them used by
    ``MultiWorkerMirroredStrategy`` (the stand-in for a host with ``count``
    GPUs). Call before TensorFlow initialises. TF 2.21 gives a CPU worker one
    device (``CollectiveAllReduceExtended._initialize_local_devices``); that
    method is overridden here. Used by tests/_sharded_adam_mwms_script.py and
    benchmarks/sharded_adam.py."""
    from tensorflow.python.distribute import collective_all_reduce_strategy as cars

    split_cpu(count)

    def local_devices(self, cluster_resolver, worker_device):
        return tuple(f"{worker_device}/device:CPU:{i}" for i in range(count)), "CPU"

    cars.CollectiveAllReduceExtended._initialize_local_devices = local_devices


def apply_step(strategy, model, optimizer, loss_fn):
    """A custom-loop train step, ``step(x, y)``: under ``strategy.run``, the
    gradients of ``loss_fn(model(x), y)`` and ``optimizer.apply``."""
    import tensorflow as tf

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(model(x), y)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_fn, args=(x, y))

    return step
