"""ShardedAdam under a 2-process × 2-device MultiWorkerMirroredStrategy (issue 16.2).

The workers (``tests/_sharded_adam_mwms_script.py``, run by
``tf_async.launch``) train Keras AdamW (amsgrad) and ShardedAdam side by side
under one 4-replica strategy; this test checks their report and restores the
4-replica checkpoint into 1 and 2 replicas here.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4-term gradient sums in a different order than Keras' all-reduce (all-to-all
# + local sum): last-bit differences, 10 steps.
TOLERANCE = 1e-6


@pytest.mark.slow
def test_two_workers_two_devices_shard_over_four_replicas(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    script = os.path.join(REPO, "tests", "_sharded_adam_mwms_script.py")
    proc = subprocess.run(
        [sys.executable, "-m", "tf_async.launch", "--workers", "2", "--ps", "0", "--",
         script, str(tmp_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", output)]
    assert sorted(r["task"] for r in results) == [0, 1], output[-4000:]
    for r in results:
        assert r["replicas"] == 4 and r["local_replicas"] == 2
        assert r["iterations"] == 10
        # Each local replica holds one slice per slot, of the limit's size.
        assert r["shard_size"] == -(-r["param_count"] // 4)
        assert r["slice_sizes"] == {
            slot: [r["shard_size"]] * 2 for slot in ("momentum", "velocity", "velocity_hat")
        }
        assert r["weight_diff"] <= TOLERANCE
        assert r["state_len"][0] == r["state_len"][1]
        assert r["state_diff"] <= TOLERANCE  # logical state gathered from both workers
        assert r["restored_diff"] <= TOLERANCE  # 4 -> 4 restore, each worker its slices

    expected = list(np.load(tmp_path / "adam_state.npz").values())
    weights = list(np.load(tmp_path / "sharded_weights.npz").values())
    restored = {}
    for num_replicas in (1, 2):
        restored[num_replicas] = _restore(str(tmp_path / "sharded"), weights, num_replicas)
        assert len(restored[num_replicas]) == len(expected)
        for e, g in zip(expected, restored[num_replicas]):
            np.testing.assert_allclose(g, e, atol=TOLERANCE, rtol=0)
    for a, b in zip(restored[1], restored[2]):
        np.testing.assert_array_equal(a, b)


def _restore(path, weights, num_replicas):
    import keras

    from tests.test_sharded_adam import strategy_for
    from tf_async.keras_optimizers import ShardedAdam

    strategy = strategy_for(num_replicas)
    with strategy.scope():
        variables = [keras.Variable(w) for w in weights]
        optimizer = ShardedAdam(0.01, weight_decay=0.05, amsgrad=True)
        optimizer.build(variables)
    tf.train.Checkpoint(optimizer=optimizer).read(path).assert_consumed()
    if num_replicas > 1:
        (group,) = optimizer._groups
        components = strategy.experimental_local_results(group.slots["momentum"])
        assert [int(c.shape[0]) for c in components] == [group.layout.shard_size] * 2
    return optimizer.logical_state()
