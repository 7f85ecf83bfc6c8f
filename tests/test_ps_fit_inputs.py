"""What ``fit``/``evaluate``/``predict`` accept under AsyncParameterServerStrategy
(issue 18; issue 17 items 3, 5, 6), each compared with Keras' own result
without a strategy where one exists.

Every cluster case runs in a spawned process; cases share one child.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

N = 4


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N)).astype("float32")
    y = (x.sum(1) > 0).astype("int32")
    return x, y


def _model():
    return keras.Sequential([keras.Input((N,)), keras.layers.Dense(2, activation="softmax")])


def _strategy(workers=2, ps=1, **kwargs):
    import tf_async

    return tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=workers, ps=ps), **kwargs
    )


def _error(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test checks type and text
        return f"{type(error).__name__}: {error}"
    return ""


def _warned(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def _reference(initial, compile_kwargs):
    model = _model()
    model.set_weights(initial)
    model.compile(**compile_kwargs)
    return model


def _child_chief_side():
    x, y = _data()
    keras.utils.set_random_seed(3)
    initial = _model().get_weights()
    strategy = _strategy()
    r = {}
    compiled = dict(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    # 18.3: evaluate before any fit, optimizer with slots (rmsprop) compiled in scope.
    with strategy.scope():
        model = _model()
        model.set_weights(initial)
        model.compile(optimizer="rmsprop", **compiled)
    r["eval_first"] = _error(lambda: r.setdefault(
        "eval_first_value", model.evaluate(x, y, verbose=0, return_dict=True)))
    r["eval_first_ref"] = _reference(initial, dict(optimizer="rmsprop", **compiled)).evaluate(
        x, y, verbose=0, return_dict=True)
    r["slot_devices"] = sorted({v.value.device for v in model.optimizer.variables})
    model.fit(ds.repeat(), steps_per_epoch=3, verbose=0)  # the slots it built are used
    r["iterations_after_fit"] = int(model.optimizer.iterations.numpy())

    # 18.2: jit_compile=True: fit, then evaluate/predict on the coordinator.
    with strategy.scope():
        jit = _model()
        jit.set_weights(initial)
        jit.compile(optimizer="sgd", jit_compile=True, **compiled)
    jit.fit(ds.repeat(), steps_per_epoch=4, verbose=0)
    reference = _model()
    reference.set_weights(jit.get_weights())
    reference.compile(optimizer="sgd", **compiled)
    r["jit_eval"] = _error(lambda: r.setdefault(
        "jit_eval_value", jit.evaluate(x, y, verbose=0, return_dict=True)))
    r["jit_eval_ref"] = reference.evaluate(x, y, verbose=0, return_dict=True)
    r["jit_predict"] = _error(lambda: r.setdefault("jit_predict_diff", float(np.abs(
        jit.predict(x, verbose=0) - reference.predict(x, verbose=0)).max())))
    r["jit_still_set"] = jit.jit_compile

    # 18.1: a dataset function as evaluate/predict x and as validation_data.
    def dataset_fn(input_context):
        assert input_context.num_input_pipelines == 1  # the whole data on the chief
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()

    def finite_fn():
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    r["fn_eval"] = _error(lambda: r.setdefault(
        "fn_eval_value", jit.evaluate(dataset_fn, steps=4, verbose=0, return_dict=True)))
    r["fn_eval_finite"] = _error(lambda: r.setdefault(
        "fn_eval_finite_value", jit.evaluate(finite_fn, verbose=0, return_dict=True)))
    r["fn_predict"] = _error(lambda: r.setdefault(
        "fn_predict_diff", float(np.abs(jit.predict(dataset_fn, steps=4, verbose=0)
                                        - reference.predict(x, verbose=0)).max())))
    r["fn_eval_no_steps"] = _error(lambda: jit.evaluate(dataset_fn, verbose=0))
    reference_val = _reference(jit.get_weights(), dict(optimizer="sgd", **compiled))
    r["fn_val_ref"] = reference_val.evaluate(x, y, verbose=0, return_dict=True)
    jit.optimizer.learning_rate.assign(0.0)  # the weights the validation sees
    r["fn_val"] = _error(lambda: r.setdefault("fn_val_history", jit.fit(
        ds.repeat(), steps_per_epoch=2, validation_data=dataset_fn, validation_steps=4,
        verbose=0).history))

    # 18.5: tf.distribute distributed datasets: a clear error saying what to pass.
    distributed = strategy.experimental_distribute_dataset(ds)
    per_worker = strategy.coordinator.create_per_worker_dataset(ds)
    r["dist_fit"] = _error(lambda: jit.fit(distributed, steps_per_epoch=2, verbose=0))
    r["dist_eval"] = _error(lambda: jit.evaluate(distributed, steps=2, verbose=0))
    r["dist_predict"] = _error(lambda: jit.predict(distributed, steps=2, verbose=0))
    r["per_worker_fit"] = _error(lambda: jit.fit(per_worker, steps_per_epoch=2, verbose=0))

    # 18.7: steps_per_epoch=-1 says what to pass.
    r["spe_minus_one"] = _error(lambda: jit.fit(ds, steps_per_epoch=-1, verbose=0))

    # 18.4: run_eagerly=True: a clear error at fit; evaluate honours it.
    with strategy.scope():
        eager = _model()
        eager.set_weights(initial)
        eager.compile(optimizer="sgd", run_eagerly=True, **compiled)
    r["eager_fit"] = _error(lambda: eager.fit(ds.repeat(), steps_per_epoch=2, verbose=0))
    r["eager_eval"] = eager.evaluate(x, y, verbose=0, return_dict=True)
    r["eager_eval_ref"] = _reference(initial, dict(optimizer="sgd", **compiled)).evaluate(
        x, y, verbose=0, return_dict=True)

    return r


@pytest.mark.slow
def test_chief_side_inputs_jit_slots_eager_and_distributed(fresh_process):
    r = fresh_process(_child_chief_side, timeout=300)
    # 18.3
    assert r["eval_first"] == ""
    for key in ("loss", "accuracy"):
        assert r["eval_first_value"][key] == pytest.approx(r["eval_first_ref"][key], rel=1e-6)
    assert r["slot_devices"] and all("/job:ps/" in d for d in r["slot_devices"]), \
        r["slot_devices"]
    assert r["iterations_after_fit"] == 3
    # 18.2
    assert r["jit_eval"] == "" and r["jit_predict"] == ""
    for key in ("loss", "accuracy"):
        assert r["jit_eval_value"][key] == pytest.approx(r["jit_eval_ref"][key], rel=1e-6)
    assert r["jit_predict_diff"] < 1e-6
    assert r["jit_still_set"] is True
    # 18.1
    assert r["fn_eval"] == "" and r["fn_eval_finite"] == "" and r["fn_predict"] == ""
    for key in ("loss", "accuracy"):
        assert r["fn_eval_value"][key] == pytest.approx(r["jit_eval_ref"][key], rel=1e-6)
        assert r["fn_eval_finite_value"][key] == pytest.approx(
            r["jit_eval_ref"][key], rel=1e-6)
    assert r["fn_predict_diff"] < 1e-6
    assert "`steps` is required" in r["fn_eval_no_steps"]
    assert r["fn_val"] == ""
    assert r["fn_val_history"]["val_loss"][-1] == pytest.approx(
        r["fn_val_ref"]["loss"], rel=1e-6)
    # 18.5
    for key in ("dist_fit", "dist_eval", "dist_predict", "per_worker_fit"):
        assert r[key].startswith("ValueError") and "Pass the tf.data.Dataset itself" in r[key], \
            r[key]
    # 18.7
    assert "`steps_per_epoch=None`" in r["spe_minus_one"], r["spe_minus_one"]
    # 18.4
    assert r["eager_fit"].startswith("ValueError") and "run_eagerly" in r["eager_fit"]
    assert r["eager_eval"]["loss"] == pytest.approx(r["eager_eval_ref"]["loss"], rel=1e-6)


# ------------------------------------------- 17.3: every order of calls


def _child_orders_of_calls():
    x, y = _data()
    keras.utils.set_random_seed(5)
    initial = _model().get_weights()
    def compiled():
        return dict(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")

    # Keras' own result, before this process joins a cluster.
    reference = _reference(initial, compiled())
    reference.fit(x, y, batch_size=16, shuffle=False, epochs=2, verbose=0)
    expected = reference.get_weights()

    before = [_model() for _ in range(3)]  # built before the strategy exists
    before[2].compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    early_dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    strategy = _strategy()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with strategy.scope():
        before[0].compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    before[1].compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    after_outside = _model()
    with strategy.scope():
        after_outside.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    r = {}
    for name, model in (("before/inside", before[0]), ("before/after", before[1]),
                        ("before/before", before[2]), ("outside/inside", after_outside)):
        r[name] = {
            "fit": _error(lambda: model.fit(ds, verbose=0)),
            "evaluate": _error(lambda: model.evaluate(ds, verbose=0)),
            "predict": _error(lambda: model.predict(x, verbose=0)),
        }
    # An unrelated plain Keras model made after the strategy trains normally
    # (and equals Keras' result from before the connection) ...
    plain = _reference(initial, compiled())
    r["plain_fit"] = _error(lambda: plain.fit(x, y, batch_size=16, shuffle=False, epochs=2,
                                              verbose=0))
    r["plain_diff"] = max(float(np.abs(a - b).max())
                          for a, b in zip(plain.get_weights(), expected))
    r["plain_device"] = plain.weights[0].value.device
    # ... but a dataset from before the connection is refused at the call.
    r["early_dataset"] = _error(lambda: plain.fit(early_dataset, verbose=0))
    r["early_dataset_validation"] = _error(lambda: plain.fit(
        x, y, validation_data=early_dataset, verbose=0))
    # Built inside the scope and compiled outside it still trains on the cluster.
    with strategy.scope():
        inside = _model()
    inside.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    r["inside/outside"] = _error(lambda: inside.fit(ds.repeat(), steps_per_epoch=3, verbose=0))
    r["inside_iterations"] = int(inside.optimizer.iterations.numpy())
    return r


@pytest.mark.slow
def test_model_built_outside_scope_every_order_and_plain_keras_still_trains(fresh_process):
    r = fresh_process(_child_orders_of_calls, timeout=300)
    for order in ("before/inside", "before/after", "before/before"):
        for method, error in r[order].items():
            assert error.startswith("ValueError"), (order, method, error)
            assert f"`{method}`: this model's variables were created before " \
                   "AsyncParameterServerStrategy connected" in error, (order, error)
            assert "/job:localhost" in error
    for method, error in r["outside/inside"].items():
        assert "not created under this AsyncParameterServerStrategy's scope()" in error, error
    assert r["plain_fit"] == ""
    assert r["plain_diff"] < 1e-6
    assert "/job:chief/" in r["plain_device"]
    for key in ("early_dataset", "early_dataset_validation"):
        assert "`fit`: this tf.data.Dataset was created before" in r[key], r[key]
    assert r["inside/outside"] == "" and r["inside_iterations"] == 3


# -------------------------------- 17.6: a short finite dataset, as Keras


def _child_short_finite_dataset():
    x, y = _data(64)
    keras.utils.set_random_seed(7)
    initial = _model().get_weights()
    finite = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 4 batches

    def compile_(model):
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss="sparse_categorical_crossentropy")

    cases = {  # name: fit arguments
        "cut_second_epoch": dict(x=finite, epochs=3, steps_per_epoch=3),
        "longer_than_data": dict(x=finite, epochs=2, steps_per_epoch=6),
        "arrays": dict(x=x, y=y, batch_size=16, shuffle=False, epochs=3, steps_per_epoch=3),
        "one_pass_per_epoch": dict(x=finite, epochs=2),
    }

    def run(model, kwargs):
        def fit():
            return model.fit(verbose=0, **kwargs).history
        history, caught = _warned(fit)
        return {
            "iterations": int(model.optimizer.iterations.numpy()),
            "loss": history["loss"],
            "ran_out": sum("Your input ran out of data" in w for w in caught),
            "weights": model.get_weights(),
        }

    def restart(model):  # one model per side (traced once): initial weights, step 0
        model.set_weights(initial)
        model.optimizer.iterations.assign(0)
        return model

    reference = _model()
    compile_(reference)
    expected = {name: run(restart(reference), kwargs) for name, kwargs in cases.items()}
    strategy = _strategy(workers=1)
    with strategy.scope():
        model = _model()
        compile_(model)
    r = {}
    for name, kwargs in cases.items():
        got = run(restart(model), kwargs)
        want = expected[name]
        r[name] = {
            "iterations": (got["iterations"], want["iterations"]),
            "ran_out": (got["ran_out"], want["ran_out"]),
            "loss": (got["loss"], want["loss"]),
            "diff": max(float(np.abs(a - b).max())
                        for a, b in zip(got["weights"], want["weights"])),
        }
    # A dataset function's finite dataset is repeated by each worker: one warning.
    with strategy.scope():
        model = _model()
        compile_(model)
    def finite_fn():
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    _, caught = _warned(lambda: model.fit(finite_fn, epochs=2, steps_per_epoch=3, verbose=0))
    r["fn_warnings"] = [w for w in caught if "finite dataset" in w]
    r["fn_iterations"] = int(model.optimizer.iterations.numpy())
    _, caught = _warned(lambda: model.fit(lambda: finite_fn().repeat(), epochs=2,
                                          steps_per_epoch=3, verbose=0))
    r["fn_repeated_warnings"] = [w for w in caught if "finite dataset" in w]

    # 17.5: logs refreshed every step (log_every_steps=1) show only measured
    # values: before the first step of an epoch finishes, none (no 0.0 loss).
    class Record(keras.callbacks.Callback):
        seen: list = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(dict(logs or {}))

    strategy._log_every_steps = 1  # test only: refresh after every batch
    with strategy.scope():
        fresh = _model()
        compile_(fresh)
    fresh.fit(finite.repeat(), epochs=2, steps_per_epoch=10, verbose=0, callbacks=[Record()])
    r["batch_logs"] = Record.seen

    # EMA: fit ends with finalize_variable_values, as Keras' fit (the weights
    # after fit are the averages); equal to Keras' own fit with one worker.
    def ema_fit(model):
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5),
                      loss="sparse_categorical_crossentropy")
        model.fit(finite.repeat(), epochs=1, steps_per_epoch=6, verbose=0)
        return model.get_weights()

    keras_ema = ema_fit(_model())
    with strategy.scope():
        got_ema = ema_fit(_model())
    r["ema_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(got_ema, keras_ema))

    # 18.6: no trainable weights: Keras' warning, and fit runs (moving statistics
    # and metrics); one worker: equal to Keras' fit.
    full = tf.data.Dataset.from_tensor_slices((x, x)).batch(64).repeat()

    def frozen():
        model = keras.Sequential([keras.Input((N,)),
                                  keras.layers.BatchNormalization(center=False, scale=False)])
        model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
        return model

    with strategy.scope():
        no_trainable = frozen()
    got, r["frozen_warnings"] = _warned(lambda: _error(lambda: r.setdefault(
        "frozen_history", no_trainable.fit(full, steps_per_epoch=5, verbose=0).history)))
    r["frozen_error"] = got
    keras_frozen = frozen()
    r["frozen_ref_history"], r["frozen_ref_warnings"] = _warned(
        lambda: keras_frozen.fit(full, steps_per_epoch=5, verbose=0).history)
    r["frozen_moving_mean_diff"] = float(np.abs(
        no_trainable.layers[0].moving_mean.numpy()
        - keras_frozen.layers[0].moving_mean.numpy()).max())
    r["frozen_moved"] = float(np.abs(keras_frozen.layers[0].moving_mean.numpy()).max())
    return r


@pytest.mark.slow
def test_short_finite_dataset_progress_logs_ema_and_no_trainable_weights_as_keras(fresh_process):
    r = fresh_process(_child_short_finite_dataset, timeout=300)
    assert r["cut_second_epoch"]["iterations"] == (7, 7)  # 3 + 1 (ran out) + 3
    assert r["cut_second_epoch"]["ran_out"] == (1, 1)
    assert r["longer_than_data"]["iterations"] == (8, 8)  # 4 + 4, warned twice
    assert r["longer_than_data"]["ran_out"] == (2, 2)
    assert r["arrays"]["iterations"] == (7, 7)
    assert r["one_pass_per_epoch"]["iterations"] == (8, 8)
    assert r["one_pass_per_epoch"]["ran_out"] == (0, 0)
    for name in ("cut_second_epoch", "longer_than_data", "arrays", "one_pass_per_epoch"):
        assert r[name]["diff"] < 1e-5, (name, r[name])
        np.testing.assert_allclose(*r[name]["loss"], rtol=1e-5)
    assert len(r["fn_warnings"]) == 1 and "each worker repeats" in r["fn_warnings"][0]
    assert r["fn_iterations"] == 6
    assert r["fn_repeated_warnings"] == []
    logs = r["batch_logs"]
    assert len(logs) == 20
    measured = [entry for entry in logs if entry]
    assert all(entry["loss"] > 0 for entry in measured), logs  # never a 0.0 placeholder
    assert r["ema_diff"] < 1e-5
    # 18.6
    assert r["frozen_error"] == ""
    message = "The model does not have any trainable weights."
    assert message in r["frozen_ref_warnings"]  # Keras' own warning ...
    assert r["frozen_warnings"].count(message) == 1  # ... once per fit here
    assert r["frozen_moved"] > 1e-3 and r["frozen_moving_mean_diff"] < 1e-6
    np.testing.assert_allclose(r["frozen_history"]["loss"], r["frozen_ref_history"]["loss"],
                               rtol=1e-5)
