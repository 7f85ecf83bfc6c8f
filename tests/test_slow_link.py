"""benchmarks/slow_link.py's summary: time to a loss, gaps at equal steps, step profile."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import slow_link  # noqa: E402


def _result(points, step_seconds=()):
    return {"curve": [{"step": s, "seconds": t, "step_clock": t, "val_loss": v}
                      for s, t, v in points],
            "syncs": 1, "link": [], "step_seconds": list(step_seconds)}


def test_time_to_interpolates_between_evaluations():
    curve = _result([(0, 0.0, 5.0), (64, 10.0, 3.0), (128, 20.0, 2.0)])["curve"]
    assert slow_link._time_to(curve, 2.5) == pytest.approx(15.0)
    assert slow_link._time_to(curve, 3.0) == pytest.approx(10.0)
    assert slow_link._time_to(curve, 1.0) is None
    for point in curve:
        point["profile"] = point["seconds"] / 10
    assert slow_link._time_to(curve, 2.5, "profile") == pytest.approx(1.5)


def test_gaps_by_step_speedup_and_profile():
    sync = _result([(0, 0.0, 5.0), (64, 40.0, 3.0), (128, 80.0, 2.0)])
    # DiLoCo-like: H=64, a local step 0.1 s, a syncing step 1.0 s.
    times = [9.0] + [1.0 if k % 64 == 0 else 0.1 for k in range(2, 257)]
    diloco = _result([(0, 0.0, 5.0), (64, 7.0, 3.3), (128, 14.0, 2.2), (192, 21.0, 2.0),
                      (256, 28.0, 1.9)], times)
    sync["step_seconds"] = [5.0] + [0.5] * 127  # profile: 0.5 s per sync step
    (row,) = slow_link._summarise([{"sync": sync, "diloco_h64": diloco}], None)
    d = row["diloco_h64"]
    assert d["gap_by_step"] == pytest.approx({64: 0.1, 128: 0.1})
    assert d["gap_at_equal_steps"] == pytest.approx(0.1)
    # Wall clock: DiLoCo crosses 2.0 at 21 s, sync at 80 s.
    assert d["time_to_sync_loss_by_clock"]["seconds"] == pytest.approx(21.0)
    assert d["speedup_by_clock"]["seconds"] == pytest.approx(80.0 / 21.0)
    # Profile clock (the final line's): 192 steps = 189 inner at 0.1 s + 3
    # outer at 1.0 s; sync 128 steps at 0.5 s.
    assert d["time_to_sync_loss"] == pytest.approx(189 * 0.1 + 3 * 1.0)
    assert d["speedup_to_sync_loss"] == pytest.approx(64.0 / 21.9)
    assert d["local_step_seconds"] == pytest.approx(0.1)
    assert d["sync_step_seconds"] == pytest.approx(1.0)
    assert row["sync"]["local_step_seconds"] is None
    assert row["sync"]["sync_step_seconds"] == pytest.approx(0.5)


def test_profile_clock_ignores_a_burst_of_load():
    """One slow stretch of steps moves the wall clock, not the profile clock."""
    calm = [0.1] * 128
    burst = [0.1] * 70 + [2.0] * 10 + [0.1] * 48
    points = [(0, 0.0, 5.0), (64, 6.4, 3.0), (128, 12.8, 2.0)]
    medians = [slow_link._kind_medians(_result(points, t), "local_sgd_h16") for t in (calm, burst)]
    assert medians[0] == medians[1] == pytest.approx({"inner": 0.1, "outer": 0.1})
    clock = slow_link._profile_clock(_result(points)["curve"], "local_sgd_h16", medians[1])
    assert [p["profile"] for p in clock] == pytest.approx([0.0, 6.4, 12.8])


def test_step_kinds():
    assert [slow_link._step_kind("diloco_h64", k) for k in (1, 63, 64, 65, 128)] == [
        "inner", "inner", "outer", "inner", "outer"]
    assert {slow_link._step_kind("sync", k) for k in range(1, 10)} == {"sync"}
    assert [slow_link._step_kind("local_sgd_h16", k) for k in (15, 16, 32)] == [
        "inner", "outer", "outer"]


def test_mode_order_rotates_between_runs():
    modes = ["sync", "local_sgd_h16", "diloco_h64"]
    orders = [slow_link._mode_order(modes, run) for run in range(4)]
    assert orders[0] == modes and orders[3] == modes
    assert [o[0] for o in orders[:3]] == modes  # each mode runs first once
    assert all(sorted(o) == sorted(modes) for o in orders)


def test_inner_learning_rate_schedules():
    import types

    args = types.SimpleNamespace(learning_rate=1e-2, lr_schedule="constant", warmup_steps=0)
    assert slow_link._inner_learning_rate(args, 100) == 1e-2
    args.warmup_steps = 10
    lr = slow_link._inner_learning_rate(args, 100)
    assert [float(lr(s)) for s in (0, 5, 10, 50, 100)] == pytest.approx(
        [0.0, 5e-3, 1e-2, 1e-2, 1e-2])
    args.lr_schedule = "cosine"
    lr = slow_link._inner_learning_rate(args, 100)
    # Warmup to the peak, then cosine to 10 % of it at the last step.
    assert [float(lr(s)) for s in (5, 10, 55, 100)] == pytest.approx(
        [5e-3, 1e-2, 5.5e-3, 1e-3], rel=1e-5)
    args.warmup_steps = 0
    lr = slow_link._inner_learning_rate(args, 100)
    assert [float(lr(s)) for s in (0, 50, 100)] == pytest.approx([1e-2, 5.5e-3, 1e-3], rel=1e-5)
