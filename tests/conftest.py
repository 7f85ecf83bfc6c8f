"""Test harness: logical CPU devices and fresh-process cluster runs.

* The CPU is split into ``NUM_LOGICAL_DEVICES`` logical devices before
  TensorFlow initialises, so ``MirroredStrategy()`` has 4 replicas here.
* Every MirroredStrategy / MultiWorkerMirroredStrategy built in the test
  process gets its own collective keys (``_harness``): stock TF reuses them
  across strategies on the same devices, which aborts collectives.
* ``fresh_process`` runs a module-level function in a spawned Python process:
  a process that connected to a parameter-server cluster cannot disconnect, so
  every cluster test runs in its own process (DESIGN.md §5). The child builds
  its cluster with ``tf_async.local_cluster``; everything it started dies with
  it.
* Slow tests (``@pytest.mark.slow``) run in CI (``CI=true``) and locally only
  when asked (``TF_ASYNC_SLOW_TESTS=1``, ``-m slow``, or named): see
  ``_slow_tests``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests import _harness, _slow_tests  # noqa: E402

NUM_LOGICAL_DEVICES = _harness.NUM_LOGICAL_DEVICES

_harness.split_cpu(NUM_LOGICAL_DEVICES)
_harness.give_each_strategy_its_own_collective_keys()


def pytest_collection_modifyitems(config, items):
    _slow_tests.skip_unless_asked(config, items)


@pytest.fixture
def logical_devices():
    """Names of the logical CPU devices (``/cpu:0`` ... ``/cpu:N-1``)."""
    return [d.name for d in tf.config.list_logical_devices("CPU")]


@pytest.fixture
def fresh_process():
    """``fresh_process(fn, *args, timeout=...)`` runs ``fn`` in a spawned process.

    ``fn`` must be importable (module level). Returns its (picklable) result,
    or fails the test with the child's traceback.
    """
    return _harness.run_in_fresh_process
