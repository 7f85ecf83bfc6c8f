"""docs/bad_input.md, row by row: each documented call is rejected with the
documented exception and a message containing the documented text."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

import keras
import pytest
import tensorflow as tf

import tf_async
from tf_async import cluster, launch
from tf_async.keras_optimizers import (
    DCAdam,
    DCSGD,
    LazyAdam,
    LazyAdamW,
    LazySGD,
    ShardedAdam,
    StalenessScaled,
)
from tf_async.strategies import (
    AsyncParameterServerStrategy,
    LocalUpdateStrategy,
    SimulatedAsyncStrategy,
)

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "docs", "bad_input.md")
ROW = re.compile(r"^\| (\d+) \| `(.+?)` \| ([\w ]+) \| (?:`` (.+?) ``|`(.+?)`) \|$")


class UsageError(Exception):
    """``python -m tf_async.launch`` exited with code 2 (argparse usage error)."""


def launch_cli(args: str):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            launch.main(shlex.split(args))
        except SystemExit as exit_:
            if exit_.code == 2:
                raise UsageError(stderr.getvalue()) from None
            raise
    raise AssertionError(f"launch {args!r} was accepted")


def _rows():
    with open(DOC) as f:
        rows = [ROW.match(line.rstrip("\n")) for line in f]
    return [(int(m.group(1)), m.group(2), m.group(3), m.group(4) or m.group(5))
            for m in rows if m]


ROWS = _rows()
EXCEPTIONS = {"ValueError": ValueError, "TypeError": TypeError, "usage error": UsageError}


def _namespace():
    def resolver_of(jobs):
        return tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(jobs), rpc_layer="grpc")

    from tf_async.strategies import _ps_data

    dataset = tf.data.Dataset.from_tensor_slices(([[1.0]], [0])).batch(1)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")

    def fit_data(x, steps_per_epoch=None):
        return _ps_data.steps_and_source(x, None, None, None, steps_per_epoch, True)

    return {
        "fit_data": fit_data, "dataset": dataset,
        "distributed": one_device.experimental_distribute_dataset(dataset),
        "tf_async": tf_async, "keras": keras, "tf": tf, "cluster": cluster,
        "local_cluster": cluster.local_cluster, "launch_cli": launch_cli,
        "AsyncParameterServerStrategy": AsyncParameterServerStrategy,
        "SimulatedAsyncStrategy": SimulatedAsyncStrategy,
        "LocalUpdateStrategy": LocalUpdateStrategy,
        "DCSGD": DCSGD, "DCAdam": DCAdam, "StalenessScaled": StalenessScaled,
        "ShardedAdam": ShardedAdam,
        "LazyAdam": LazyAdam, "LazyAdamW": LazyAdamW, "LazySGD": LazySGD,
        "resolver": resolver_of({"worker": ["localhost:1"], "ps": ["localhost:2"]}),
        "no_ps": resolver_of({"worker": ["localhost:1"]}),
        "mirrored": tf.distribute.MirroredStrategy(["/cpu:0"]),
        "one_device": one_device,
    }


def test_table_has_at_least_30_numbered_rows_across_every_area():
    assert len(ROWS) >= 30
    assert [n for n, *_ in ROWS] == list(range(1, len(ROWS) + 1))
    calls = " ".join(call for _, call, _, _ in ROWS)
    for area in ("AsyncParameterServerStrategy", "SimulatedAsyncStrategy",
                 "LocalUpdateStrategy", "DCSGD", "DCAdam", "StalenessScaled",
                 "ShardedAdam", "LazyAdam", "LazySGD", "variable_partitioner", "local_cluster", "parse_tf_config", "launch_cli"):
        assert area in calls, area


@pytest.mark.parametrize("number, call, raises, message", ROWS, ids=[str(r[0]) for r in ROWS])
def test_documented_rejection(number, call, raises, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # launch_cli: "train.py" exists, "missing.py" does not
    (tmp_path / "train.py").write_text("")
    with pytest.raises(EXCEPTIONS[raises]) as info:
        eval(call, _namespace())  # noqa: S307 - the documented call, verbatim
    assert message in str(info.value), f"row {number}: {info.value}"
