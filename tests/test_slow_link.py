"""benchmarks/slow_link.py's summary: time to a loss, gaps at equal steps, step profile."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import slow_link  # noqa: E402


def _result(points, step_seconds=()):
    return {"curve": [{"step": s, "seconds": t, "val_loss": v} for s, t, v in points],
            "syncs": 1, "link": [], "step_seconds": list(step_seconds)}


def test_time_to_interpolates_between_evaluations():
    curve = _result([(0, 0.0, 5.0), (64, 10.0, 3.0), (128, 20.0, 2.0)])["curve"]
    assert slow_link._time_to(curve, 2.5) == pytest.approx(15.0)
    assert slow_link._time_to(curve, 3.0) == pytest.approx(10.0)
    assert slow_link._time_to(curve, 1.0) is None


def test_gaps_by_step_speedup_and_profile():
    sync = _result([(0, 0.0, 5.0), (64, 40.0, 3.0), (128, 80.0, 2.0)])
    # DiLoCo-like: H=64, a local step 0.1 s, a syncing step 1.0 s.
    times = [9.0] + [1.0 if k % 64 == 0 else 0.1 for k in range(2, 257)]
    diloco = _result([(0, 0.0, 5.0), (64, 7.0, 3.3), (128, 14.0, 2.2), (192, 21.0, 2.0),
                      (256, 28.0, 1.9)], times)
    (row,) = slow_link._summarise([{"sync": sync, "diloco_h64": diloco}], None)
    d = row["diloco_h64"]
    assert d["gap_by_step"] == pytest.approx({64: 0.1, 128: 0.1})
    assert d["gap_at_equal_steps"] == pytest.approx(0.1)
    assert d["time_to_sync_loss"] == pytest.approx(21.0)
    assert d["speedup_to_sync_loss"] == pytest.approx(80.0 / 21.0)
    assert d["local_step_seconds"] == pytest.approx(0.1)
    assert d["sync_step_seconds"] == pytest.approx(1.0)
    assert row["sync"]["local_step_seconds"] is None
