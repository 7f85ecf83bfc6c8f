"""Worker-side evaluate/predict (``AsyncParameterServerStrategy(evaluation_shards=...)``,
issue 18 item 1), compared with Keras' own ``evaluate``/``predict`` without a
strategy: every batch visited exactly once (uneven last shard, more shards than
batches), metrics to 1e-6, predictions in input order; a worker SIGKILLed
mid-evaluate does not change the result.

Cluster cases run in a spawned process (in-process cluster) or under
``tf_async.launch`` (worker kill).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4


def _child_worker_side():
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_async

    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, N)).astype("float32")  # 5 batches of 16, the last 6 rows
    y = (x.sum(1) + 0.5 * rng.normal(size=70) > 0).astype("float32")[:, None]
    weights = rng.uniform(0.2, 2.0, size=70).astype("float32")

    def make():
        return keras.Sequential([
            keras.Input((N,)), keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(), keras.layers.Dense(1, activation="sigmoid")])

    def compiled():
        return dict(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy",
                    metrics=["accuracy", keras.metrics.AUC(name="auc")],
                    weighted_metrics=[keras.metrics.BinaryAccuracy(name="w_acc")])

    keras.utils.set_random_seed(1)
    initial = make().get_weights()
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=1), evaluation_shards=3)
    with strategy.scope():
        model = make()
        model.set_weights(initial)
        model.compile(**compiled())
    r = {}
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    # Validation on the workers during fit (BatchNorm statistics move too).
    history = model.fit(ds.repeat(), steps_per_epoch=6, epochs=2, validation_data=(x, y),
                        validation_batch_size=16, verbose=0)
    reference = make()
    reference.set_weights(model.get_weights())
    reference.compile(**compiled())

    def both(method, *args, **kwargs):
        return (getattr(model, method)(*args, verbose=0, **kwargs),
                getattr(reference, method)(*args, verbose=0, **kwargs))

    r["val_loss"] = (history.history["val_loss"][-1],
                     reference.evaluate(x, y, batch_size=16, verbose=0))
    r["arrays"] = both("evaluate", x, y, batch_size=16, return_dict=True)
    # The metric states themselves (sums and counts: 70 samples, not a multiple).
    r["states"] = ([v.numpy() for v in model.metrics_variables],
                   [v.numpy() for v in reference.metrics_variables])
    r["state_names"] = [v.path for v in model.metrics_variables]
    r["weighted"] = both("evaluate", x, y, sample_weight=weights, batch_size=16,
                         return_dict=True)
    r["listed"] = both("evaluate", x, y, batch_size=16)
    r["dataset"] = both("evaluate", ds, return_dict=True)

    def dataset_fn(input_context):
        assert input_context.num_input_pipelines == 1  # the whole data, then sharded
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()

    r["fn_steps"] = (model.evaluate(dataset_fn, steps=7, verbose=0, return_dict=True),
                     reference.evaluate(dataset_fn(tf.distribute.InputContext()), steps=7,
                                        verbose=0, return_dict=True))
    r["predict"] = both("predict", x, batch_size=16)
    r["predict_dataset"] = both("predict", ds)
    strategy.evaluation_shards = "auto"  # 10 shards for 5 batches: some are empty
    r["auto"] = both("evaluate", x, y, batch_size=16, return_dict=True)
    r["auto_predict"] = both("predict", x, batch_size=16)
    strategy.evaluation_shards = 1
    r["one"] = both("evaluate", x, y, batch_size=16, return_dict=True)
    r["chief_unused"] = id(model) not in strategy._chief_functions
    r["no_steps"] = ""
    try:
        model.evaluate(dataset_fn, verbose=0)
    except ValueError as error:
        r["no_steps"] = str(error)
    strategy.evaluation_shards = None  # back to Keras' loop on the coordinator
    r["chief"] = both("evaluate", x, y, batch_size=16, return_dict=True)
    r["chief_used"] = id(model) in strategy._chief_functions
    return r


def _child_table_two_inputs_two_outputs():
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_async

    rng = np.random.default_rng(3)
    x = rng.normal(size=(70, N)).astype("float32")
    y = (x.sum(1) > 0).astype("float32")[:, None]
    r = {}
    # An embedding table on the PS (read as rows by the shards), split over
    # two parameter servers by the partitioner, two inputs and two outputs.
    ids = rng.integers(0, 50, size=(70, 3))

    def make_two():
        tokens = keras.Input((3,), dtype="int32", name="ids")
        dense = keras.Input((N,), name="dense")
        embedded = keras.layers.Flatten()(keras.layers.Embedding(50, 4)(tokens))
        joined = keras.layers.Concatenate()([embedded, dense])
        return keras.Model({"ids": tokens, "dense": dense}, {
            "p": keras.layers.Dense(1, activation="sigmoid", name="p")(joined),
            "v": keras.layers.Dense(3, name="v")(joined)})

    keras.utils.set_random_seed(2)
    two_initial = make_two().get_weights()
    sharded = tf_async.strategies.AsyncParameterServerStrategy(
        tf_async.local_cluster(workers=2, ps=2), evaluation_shards=4,
        variable_partitioner=tf.distribute.experimental.partitioners.MaxSizePartitioner(
            max_shard_bytes=400))
    two_compiled = dict(optimizer="sgd", loss={"p": "binary_crossentropy", "v": "mse"},
                        metrics={"p": ["accuracy"]})
    with sharded.scope():
        two = make_two()
        two.set_weights(two_initial)
        two.compile(**two_compiled)
    table = next(layer for layer in two.layers if isinstance(layer, keras.layers.Embedding))
    r["table_shards"] = len(getattr(table.embeddings.value, "variables", [0]))
    two_reference = make_two()
    two_reference.set_weights(two_initial)
    two_reference.compile(**two_compiled)
    inputs = {"ids": ids, "dense": x}
    targets = {"p": y, "v": np.tile(x[:, :1], (1, 3))}
    r["two_eval"] = (two.evaluate(inputs, targets, batch_size=16, verbose=0, return_dict=True),
                     two_reference.evaluate(inputs, targets, batch_size=16, verbose=0,
                                            return_dict=True))
    r["two_predict"] = (two.predict(inputs, batch_size=16, verbose=0),
                        two_reference.predict(inputs, batch_size=16, verbose=0))
    with sharded.scope():  # never compiled: predict only needs it built
        uncompiled = make_two()
        uncompiled.set_weights(two_initial)
    r["uncompiled_predict"] = uncompiled.predict(inputs, batch_size=32, verbose=0)
    return r


def _close(got: dict, want: dict):
    assert sorted(got) == sorted(want), (got, want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (key, got, want)


@pytest.mark.slow
def test_worker_side_evaluate_and_predict_equal_keras(fresh_process):
    import numpy as np

    r = fresh_process(_child_worker_side, timeout=400)
    assert r["val_loss"][0] == pytest.approx(r["val_loss"][1][0], rel=1e-6)
    for key in ("arrays", "weighted", "dataset", "fn_steps", "auto", "one", "chief"):
        _close(*r[key])
    assert r["weighted"][0]["w_acc"] != pytest.approx(r["weighted"][0]["accuracy"])
    np.testing.assert_allclose(r["listed"][0], r["listed"][1], rtol=1e-6)
    assert "loss/count" in r["state_names"]
    count = r["states"][0][r["state_names"].index("loss/count")]
    assert count == 70  # every sample once
    for name, got, want in zip(r["state_names"], *r["states"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
    for key in ("predict", "predict_dataset", "auto_predict"):
        got, want = r[key]
        assert got.shape == want.shape == (70, 1)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert r["chief_unused"] and r["chief_used"]
    assert "`steps` is required" in r["no_steps"], r["no_steps"]


@pytest.mark.slow
def test_worker_side_table_split_over_two_ps_dict_inputs_and_outputs(fresh_process):
    import numpy as np

    r = fresh_process(_child_table_two_inputs_two_outputs, timeout=400)
    assert r["table_shards"] == 2
    _close(*r["two_eval"])
    got, want = r["two_predict"]
    assert sorted(got) == ["p", "v"]
    for key in ("p", "v"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r["uncompiled_predict"][key], want[key], rtol=1e-6,
                                   atol=1e-6)


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    PID_DIR = os.environ["PID_DIR"]
    task = os.environ.get("TF_ASYNC_TASK", "")
    with open(os.path.join(PID_DIR, task.replace(":", "_") + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    import tf_async
    tf_async.cluster.serve_forever_if_server_task()

    import keras, numpy as np, tensorflow as tf
    strategy = tf_async.strategies.AsyncParameterServerStrategy(
        tf.distribute.cluster_resolver.TFConfigClusterResolver(), evaluation_shards=24)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 32)).astype("float32")
    y = (x.sum(1) > 0).astype("int32")

    def make():
        return keras.Sequential([keras.Input((32,)), keras.layers.Dense(256, activation="relu"),
                                 keras.layers.Dense(256, activation="relu"),
                                 keras.layers.Dense(2, activation="softmax")])

    keras.utils.set_random_seed(0)
    initial = make().get_weights()
    compiled = dict(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with strategy.scope():
        model = make()
        model.set_weights(initial)
        model.compile(optimizer="sgd", **compiled)
    reference = make()
    reference.set_weights(initial)
    reference.compile(optimizer="sgd", **compiled)
    want = reference.evaluate(x, y, batch_size=50, verbose=0, return_dict=True)

    class KillWorker(keras.callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            if batch == 0:  # shard 0 is back; 23 are queued or running
                with open(os.path.join(PID_DIR, "worker_1.pid")) as f:
                    pid = int(f.read())
                os.kill(pid, signal.SIGKILL)
                print("killed worker 1 pid", pid, flush=True)

    got = model.evaluate(x, y, batch_size=50, verbose=0, return_dict=True,
                         callbacks=[KillWorker()])
    for key in sorted(want):
        print(f"{key}: {got[key]!r} {want[key]!r}")
    # The states: sums and counts over 6000 samples, each counted once.
    for v, w in zip(model.metrics_variables, reference.metrics_variables):
        print(f"state {v.path}: {float(v.numpy())!r} {float(w.numpy())!r}")
    sys.stdout.flush()
    os._exit(0)  # the coordinator keeps reconnecting to the dead worker
''')


@pytest.mark.slow
def test_worker_side_evaluate_survives_killed_worker_exactly(tmp_path):
    """Shards lost with worker 1 run again elsewhere, from zero: the metrics
    still equal Keras' (nothing counted twice, nothing lost)."""
    script = tmp_path / "evaluate.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PID_DIR"] = str(tmp_path)
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "tf_async.launch", "--workers", "3", "--ps", "1",
         "--keep_going", "--", str(script)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    assert "killed worker 1" in out, out[-3000:]
    # A shard was running there: the coordinator saw it fail (and ran it again).
    assert "Worker /job:worker/replica:0/task:1 failed" in out, out[-3000:]
    values = dict((k, (float(a), float(b))) for k, a, b in re.findall(
        r"\[chief 0\] (loss|accuracy): (\S+) (\S+)", out))
    assert sorted(values) == ["accuracy", "loss"], out[-3000:]
    for key, (got, want) in values.items():
        assert got == pytest.approx(want, rel=1e-6), (key, got, want)
    states = re.findall(r"\[chief 0\] state (\S+): (\S+) (\S+)", out)
    assert len(states) == 4 and ("loss/count", "6000.0", "6000.0") in states, states
    for name, got, want in states:
        assert float(got) == pytest.approx(float(want), rel=1e-6), (name, got, want)
