"""The non-finite guard (``on_nonfinite``) of the async PS strategy.

One worker's first 10 batches carry NaN/Inf; every other batch is the same
clean batch. The guard must skip exactly those 10 steps and apply everything
else, so the final weights equal (to 1e-6) a run where the bad batches never
existed: Keras' own fit of the clean steps only. Fully asynchronous steps on 3
workers use a model whose gradient does not depend on the weights (a linear
loss), so the result is independent of the interleaving; under SSP with
k = 0 the updates are sequential, so any model is exact (an Embedding gives
an ``IndexedSlices`` gradient). ``on_nonfinite="raise"`` stops fit naming the
step and worker, without hanging the SSP ticket lock.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_async.strategies import _nonfinite

BAD_STEPS = 10
N = 64


def _features(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 20, size=(N, 4)).astype("int32")
    x = rng.normal(size=(N, 8)).astype("float32")
    y = rng.normal(size=(N, 2)).astype("float32")
    return ids, x, y


def _poisoned(x):
    """A copy of ``x`` with a NaN and an Inf in it."""
    bad = x.copy()
    bad[0, 1] = np.nan
    bad[-1, 5] = np.inf
    return bad


def _dataset_fn(make_clean, make_bad, bad_worker=1, bad_steps=BAD_STEPS):
    def dataset_fn(input_context):
        clean = tf.data.Dataset.from_tensors(make_clean()).repeat()
        if input_context.input_pipeline_id != bad_worker:
            return clean
        return tf.data.Dataset.from_tensors(make_bad()).repeat(bad_steps).concatenate(clean)

    return dataset_fn


def _linear_loss(y_true, y_pred):
    """Linear in the weights' output: the gradient does not depend on them."""
    return tf.reduce_mean(y_true * y_pred, axis=-1)


def _linear_model():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])


def _max_diff(a_list, b_list):
    return max(float(np.abs(a - b).max()) for a, b in zip(a_list, b_list))


def _fits(model, strategy, compile_, dataset_fn, epochs, steps):
    """One fit per ``steps_per_execution`` in (1, 4), recompiling in between."""
    results = []
    for steps_per_execution in (1, 4):
        with strategy.scope():
            compile_(model, steps_per_execution)
        history = model.fit(dataset_fn, epochs=epochs, steps_per_epoch=steps, verbose=0)
        results.append({
            "nonfinite_skipped": history.history["nonfinite_skipped"],
            "staleness_max": history.history["staleness_max"],
            "loss": history.history["loss"],
            "iterations": int(model.optimizer.iterations.numpy()),
            "version": strategy.global_version,
        })
    return results


def _child_full_async(epochs, steps):
    import tf_async

    _, x, y = _features()
    clean = tf.data.Dataset.from_tensors((x, y)).repeat()

    def compile_(model, steps_per_execution=1):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=_linear_loss,
                      steps_per_execution=steps_per_execution)

    keras.utils.set_random_seed(1)
    reference = _linear_model()
    initial = reference.get_weights()
    compile_(reference)
    reference.fit(clean, epochs=1, steps_per_epoch=2 * (epochs * steps - BAD_STEPS), verbose=0)
    expected = reference.get_weights()  # read before joining the cluster

    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=3, ps=1))
    with strategy.scope():
        model = _linear_model()
        model.set_weights(initial)
    dataset_fn = _dataset_fn(lambda: (x, y), lambda: (_poisoned(x), y))
    fits = _fits(model, strategy, compile_, dataset_fn, epochs, steps)
    weights = model.get_weights()
    return {
        "fits": fits,
        "finite": all(np.isfinite(w).all() for w in weights),
        "max_diff": _max_diff(weights, expected),
        "moved": _max_diff(weights, initial),
    }


def _check_fits(fits, applied):
    for fit in fits:  # steps_per_execution 1, then 4
        assert sum(fit["nonfinite_skipped"]) == BAD_STEPS, fit
        assert fit["iterations"] == fit["version"] == applied, fit
        assert all(np.isfinite(fit["loss"])), fit


@pytest.mark.slow
def test_full_async_skips_nonfinite_steps_exactly(fresh_process):
    """3 workers, steps_per_execution 1 and 4 (a new dataset each fit: worker
    1 sends its 10 bad batches again)."""
    r = fresh_process(_child_full_async, 2, 35, timeout=300)
    _check_fits(r["fits"], 70 - BAD_STEPS)
    assert r["finite"] and r["moved"] > 1e-2
    assert r["max_diff"] < 1e-6, r["max_diff"]


def _embedding_model():
    ids = keras.Input((4,), dtype="int32")
    features = keras.Input((8,))
    h = keras.layers.Flatten()(keras.layers.Embedding(20, 3)(ids))  # IndexedSlices grad
    h = keras.layers.Concatenate()([h, features])
    h = keras.layers.Dense(16, activation="tanh")(h)
    return keras.Model([ids, features], keras.layers.Dense(2)(h))


def _child_ssp():
    import tf_async

    ids, x, y = _features()
    clean = tf.data.Dataset.from_tensors(((ids, x), y)).repeat()

    def compile_(model, steps_per_execution=1):
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5), loss="mse",
                      steps_per_execution=steps_per_execution)

    keras.utils.set_random_seed(2)
    reference = _embedding_model()
    initial = reference.get_weights()
    for _ in range(2):  # two fits, each with a newly compiled optimizer
        compile_(reference)
        reference.fit(clean, epochs=1, steps_per_epoch=60 - BAD_STEPS, verbose=0)
    expected = reference.get_weights()  # read before joining the cluster

    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=1), max_staleness=0)
    with strategy.scope():
        model = _embedding_model()
        model.set_weights(initial)
    dataset_fn = _dataset_fn(lambda: ((ids, x), y), lambda: ((ids, _poisoned(x)), y))
    fits = _fits(model, strategy, compile_, dataset_fn, 2, 30)
    weights = model.get_weights()
    return {
        "fits": fits,
        "finite": all(np.isfinite(w).all() for w in weights),
        "max_diff": _max_diff(weights, expected),
        "embedding_moved": float(np.abs(weights[0] - initial[0]).max()),
    }


@pytest.mark.slow
def test_bounded_staleness_skips_nonfinite_steps_exactly(fresh_process):
    """Skipped steps pass their turn on (no deadlock) and do not count as
    updates: τ stays 0 and the version equals the applied steps."""
    r = fresh_process(_child_ssp, timeout=300)
    _check_fits(r["fits"], 60 - BAD_STEPS)
    assert all(max(fit["staleness_max"]) == 0 for fit in r["fits"])
    assert r["finite"] and r["embedding_moved"] > 1e-3
    assert r["max_diff"] < 1e-6, r["max_diff"]


def _child_raise(max_staleness):
    import tf_async

    _, x, y = _features()
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=1), max_staleness=max_staleness,
        on_nonfinite="raise")
    with strategy.scope():
        model = _linear_model()
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=_linear_loss)
    # Worker 1's 6th batch is the first bad one (its earlier ones are clean).
    def dataset_fn(input_context):
        clean = tf.data.Dataset.from_tensors((x, y)).repeat()
        if input_context.input_pipeline_id != 1:
            return clean
        bad = tf.data.Dataset.from_tensors((_poisoned(x), y)).repeat()
        return clean.take(5).concatenate(bad)

    try:
        model.fit(dataset_fn, epochs=1, steps_per_epoch=200, verbose=0)
    except tf_async.strategies.NonFiniteStepError as error:
        result = {"message": str(error), "step": error.step, "worker": error.worker,
                  "type": type(error).__mro__[1].__name__}
    else:
        result = {"message": None}
    strategy.coordinator.join()  # must not hang: the turn was passed on
    result["iterations"] = int(model.optimizer.iterations.numpy())
    result["finite"] = all(np.isfinite(w).all() for w in model.get_weights())
    return result


@pytest.mark.slow
@pytest.mark.parametrize("max_staleness", [None, 1])
def test_raise_stops_fit_naming_step_and_worker(fresh_process, max_staleness):
    r = fresh_process(_child_raise, max_staleness, timeout=300)
    assert r["message"] is not None, "fit did not raise"
    assert r["worker"] == 1 and 0 <= r["step"] < 200, r
    assert f"step {r['step']} (worker 1)" in r["message"]
    assert "on_nonfinite='raise'" in r["message"] and r["type"] == "FloatingPointError"
    assert r["finite"] and r["iterations"] < 200


# ---------------------------------------------------------- no cluster


def test_on_nonfinite_is_validated():
    import tf_async

    spec = tf.train.ClusterSpec({"worker": ["localhost:1"], "ps": ["localhost:2"]})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")
    with pytest.raises(ValueError, match=r"`on_nonfinite` must be one of \('skip', 'raise'\)"):
        tf_async.strategies.AsyncParameterServerStrategy(resolver, on_nonfinite="ignore")


def test_check_covers_indexed_slices_values_updates_and_loss():
    finite = tf.constant([[1.0, 2.0]])
    rows = tf.IndexedSlices(tf.constant([[0.0, np.nan]]), tf.constant([3]), tf.constant([5, 2]))
    assert bool(_nonfinite.all_finite([finite, None, tf.constant([1, 2])]))
    assert not bool(_nonfinite.all_finite([finite, rows]))
    assert not bool(_nonfinite.all_finite([finite, tf.constant([np.inf])]))
    assert bool(_nonfinite.all_finite([]))
    # The loss folded into the first float gradient: exact when finite, NaN if not.
    clean = [tf.IndexedSlices(tf.constant([[0.5, -0.0]]), rows.indices, rows.dense_shape),
             finite]
    folded = _nonfinite.fold_loss_into([None] + clean, tf.constant(-3.0))
    np.testing.assert_array_equal(folded[1].values.numpy(), clean[0].values.numpy())
    np.testing.assert_array_equal(folded[1].indices.numpy(), [3])
    assert folded[2] is finite
    assert bool(_nonfinite.all_finite(folded))
    for loss in (np.nan, np.inf, -np.inf):
        assert not bool(_nonfinite.all_finite(
            _nonfinite.fold_loss_into([None] + clean, tf.constant(loss))))


def test_error_from_tf_assertion_names_step_and_worker():
    @tf.function
    def check(finite):
        _nonfinite.assert_finite(finite, tf.constant(41, tf.int64), tf.constant(2, tf.int64))
        return tf.constant(0)

    check(tf.constant(True))
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        check(tf.constant(False))
    error = _nonfinite.from_tf_error(info.value)
    assert (error.step, error.worker) == (41, 2)
    assert "step 41 (worker 2)" in str(error)
    assert _nonfinite.from_tf_error(ValueError("other")) is None


# ------------------------------------------------ SimulatedAsyncStrategy


def _simulated_fit(batches, jit_compile=False, steps_per_execution=1, on_nonfinite="skip"):
    from tf_async.strategies import SimulatedAsyncStrategy

    strategy = SimulatedAsyncStrategy(3, on_nonfinite=on_nonfinite)
    keras.utils.set_random_seed(4)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.BatchNormalization(), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse",
                      metrics=["mae"], jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.stack(b) for b in zip(*batches)))
    history = model.fit(dataset, epochs=1, verbose=0)
    return model, history.history


@pytest.mark.parametrize("jit_compile, steps_per_execution", [(False, 1), (True, 1), (False, 4)])
def test_simulated_async_skips_nonfinite_steps_as_if_absent(jit_compile, steps_per_execution):
    """10 poisoned batches among 12 clean ones: weights, optimizer state, BatchNorm
    statistics, τ sequence, iterations and metrics equal the clean run's."""
    _, x, y = _features()
    clean = [(x[i::12][:4], y[i::12][:4]) for i in range(12)]
    poisoned = []
    for i, batch in enumerate(clean):
        poisoned.append(batch)
        if i < BAD_STEPS:
            poisoned.append((_poisoned(batch[0]), batch[1]))
    assert len(poisoned) == 22
    reference, expected = _simulated_fit(clean, jit_compile, steps_per_execution)
    model, got = _simulated_fit(poisoned, jit_compile, steps_per_execution)
    assert got["nonfinite_skipped"] == [10.0] and expected["nonfinite_skipped"] == [0.0]
    assert int(model.optimizer.iterations.numpy()) == 12
    assert _max_diff(model.get_weights(), reference.get_weights()) < 1e-6
    assert _max_diff([v.numpy() for v in model.optimizer.variables],
                     [v.numpy() for v in reference.optimizer.variables]) < 1e-6
    for key in ("loss", "mae", "staleness_mean", "staleness_max"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)


def test_simulated_async_raise_names_step_and_worker():
    from tf_async.strategies import NonFiniteStepError

    _, x, y = _features()
    batches = [(x[:4], y[:4])] * 5 + [(_poisoned(x[:4]), y[:4])] * 3
    with pytest.raises(NonFiniteStepError, match=r"step 5 \(worker 2 of 3 simulated\)") as info:
        _simulated_fit(batches, on_nonfinite="raise")
    assert (info.value.step, info.value.worker) == (5, 2)
    from tf_async.strategies import SimulatedAsyncStrategy

    with pytest.raises(ValueError, match="`on_nonfinite` must be one of"):
        SimulatedAsyncStrategy(2, on_nonfinite=True)


def test_lost_parameter_server_message_says_what_happened_and_what_to_do():
    """What fit raises when a PS dies (measured by benchmarks/chaos.py: within
    seconds, no hang): an UnavailableError naming the task and the way back."""
    from tf_async.strategies.async_parameter_server import _cluster_lost_message

    error = tf.errors.UnavailableError(None, None, (
        "Graph execution error:\n\nDetected at node concat/_6\n  (0) UNAVAILABLE:  "
        "recvmsg:Connection reset by peer\nAdditional GRPC error information from "
        "remote target /job:ps/replica:0/task:1 while calling /tensorflow.eager"))
    message = _cluster_lost_message(error)
    assert "parameter server task 1" in message
    assert "BackupAndRestore" in message and "Connection reset by peer" in message
    assert "a parameter server (or" in _cluster_lost_message(
        tf.errors.UnavailableError(None, None, "Socket closed"))


def test_nonfinite_skipped_reaches_tensorboard_and_the_progress_bar(tmp_path, capsys):
    from tf_async.strategies import SimulatedAsyncStrategy

    _, x, y = _features()
    batches = [(x[:4], y[:4]), (_poisoned(x[:4]), y[:4]), (x[4:8], y[4:8])]
    strategy = SimulatedAsyncStrategy(2)
    with strategy.scope():
        model = _linear_model()
        model.compile(optimizer="sgd", loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.stack(b) for b in zip(*batches)))
    model.fit(dataset, epochs=1, verbose=1,
              callbacks=[keras.callbacks.TensorBoard(str(tmp_path))])
    assert "nonfinite_skipped: 1.0000" in capsys.readouterr().out
    values = [
        float(tf.make_ndarray(value.tensor))
        for path in tmp_path.glob("train/events.out.tfevents.*")
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value if value.tag == "epoch_nonfinite_skipped"
    ]
    assert values == [1.0]
