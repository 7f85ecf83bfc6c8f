"""The async PS step's commit: each step id commits at most once.

A fresh, finite step applies once; a step whose id is already marked done (a
closure the coordinator retried after its first attempt committed on the
parameter server) changes nothing; a fresh non-finite step is skipped, counted
once and marked done. Run without a cluster: ``TrainStep.replica_fn`` traced
and run under the default strategy (``_Local`` of test_embedding_step; its
"PS" is the local device, the graph is the step's), for the fully
asynchronous commit and the SSP one.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.test_embedding_step import _Local


def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])


class _Step:
    def __init__(self, max_staleness):
        keras.utils.set_random_seed(0)
        self.model = _model()
        self.model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        self._local = _Local(self.model, max_staleness)
        self.counters = self._local.counters

    def run(self, step_id, x, y):
        self._local.run(x, y, step_id=step_id)

    def state(self):
        return {
            "version": int(self.counters.version.numpy()),
            "iterations": int(self.model.optimizer.iterations.numpy()),
            "nonfinite": int(self.counters.nonfinite.numpy()),
            "weights": [w.copy() for w in self.model.get_weights()],
        }


def _same_weights(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a["weights"], b["weights"]))


@pytest.mark.parametrize("max_staleness", [None, 1], ids=["async", "ssp1"])
def test_each_step_id_commits_at_most_once(max_staleness):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    bad = x.copy()
    bad[0, 0] = np.nan
    step = _Step(max_staleness)
    initial = step.state()

    step.run(0, x, y)
    first = step.state()
    assert (first["version"], first["iterations"], first["nonfinite"]) == (1, 1, 0)
    assert not _same_weights(first, initial)

    step.run(0, x, y)  # retried after its first attempt committed: nothing
    again = step.state()
    assert (again["version"], again["iterations"], again["nonfinite"]) == (1, 1, 0)
    assert _same_weights(again, first)

    step.run(1, bad, y)  # fresh and non-finite: skipped, counted once
    skipped = step.state()
    assert (skipped["version"], skipped["iterations"], skipped["nonfinite"]) == (1, 1, 1)
    assert _same_weights(skipped, first)

    step.run(1, bad, y)  # its retry: not counted again
    assert step.state()["nonfinite"] == 1

    step.run(2, x, y)
    last = step.state()
    assert (last["version"], last["iterations"], last["nonfinite"]) == (2, 2, 1)
    assert not _same_weights(last, first)
