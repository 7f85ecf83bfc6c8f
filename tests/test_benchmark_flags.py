"""Every benchmark rejects a bad numeric flag with an argparse error naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, flag, value, allowed", [
    ("straggler.py", "--hidden", "0", ">= 1"),
    ("straggler.py", "--layers", "-1", ">= 1"),
    ("straggler.py", "--delay_ms", "-5", ">= 0"),
    ("straggler.py", "--steps", "many", ">= 1"),
    ("local_sgd.py", "--batch", "0", ">= 1"),
    ("make_plots.py", "--steps", "0", ">= 1"),
    ("optimizer_overhead.py", "--hidden", "0", ">= 1"),
    ("sharded_adam.py", "--width", "0", ">= 1"),
    ("sharded_adam.py", "--steps", "1", ">= 2"),
    ("staleness_quality.py", "--seeds", "0", ">= 1"),
    ("staleness_quality.py", "--steps", "0", ">= 1"),
    ("staleness_quality.py", "--ps_workers", "-1", ">= 0"),
    ("chaos.py", "--steps", "0", ">= 1"),
    ("chaos.py", "--down", "-1", ">= 0"),
    ("embedding_scale.py", "--steps", "0", ">= 1"),
    ("embedding_scale.py", "--rows", "1e3", ">= 1"),
    ("embedding_scale.py", "--rounds", "0", ">= 1"),
    ("slow_link.py", "--steps", "0", ">= 1"),
    ("slow_link.py", "--workers", "0", ">= 1"),
    ("slow_link.py", "--eval_every", "x", ">= 1"),
    ("slow_link.py", "--batch", "0", ">= 1"),
    ("slow_link.py", "--warmup_steps", "-1", ">= 0"),
    ("slow_link.py", "--val_windows", "0", ">= 1"),
    ("worker_evaluation.py", "--workers", "0", ">= 1"),
])
def test_bad_numeric_flag_is_named(script, flag, value, allowed):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), flag, value],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"argument {flag}: must be an int {allowed}, got '{value}'" in result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--link_mbit", "0", "argument --link_mbit: must be a number > 0, got '0'"),
    ("--link_latency_ms", "-1", "argument --link_latency_ms: must be a number >= 0, got '-1'"),
    ("--modes", "sync,fast", "argument --modes: each must be one of"),
    ("--modes", "diloco_h64", "argument --modes: must include 'sync'"),
    ("--eval_every", "32", "argument --eval_every: must be a multiple of 64, got 32"),
    ("--outer_momentum", "1", "argument --outer_momentum: must be a number in [0, 1), got '1'"),
    ("--outer_learning_rate", "0", "argument --outer_learning_rate: must be a number > 0"),
    ("--weight_decay", "-0.1", "argument --weight_decay: must be a number >= 0, got '-0.1'"),
    ("--lr_schedule", "linear", "argument --lr_schedule: invalid choice: 'linear'"),
    ("--warmup_steps", "128", "argument --warmup_steps: must be < --steps (128), got 128"),
    ("--val_windows", "1", "argument --val_windows: must be >= --workers (2), got 1"),
])
def test_slow_link_bad_flags_are_named(flag, value, message):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "slow_link.py"), "--quick", flag,
         value],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--workers", "1,16", "argument --workers: must be comma-separated ints >= 2, got '1,16'"),
    ("--workers", "16,x", "argument --workers: must be comma-separated ints >= 2, got '16,x'"),
    ("--tasks", "mlp,rnn", "argument --tasks: each must be one of mlp, cnn, got 'mlp,rnn'"),
    ("--bases", "SGD", "argument --bases: each must be one of SGD-momentum, Adam, got 'SGD'"),
])
def test_staleness_quality_bad_flags_are_named(flag, value, message):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "staleness_quality.py"), flag, value],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


@pytest.mark.slow
def test_staleness_quality_tiny_run_follows_the_protocol():
    """Both tasks (Adam), 2 seeds, every grid printed with validation and test
    means, the PS comparison with 2 in-process workers, and the final line."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "staleness_quality.py"),
         "--steps", "10", "--seeds", "2", "--workers", "4", "--ps_workers", "2",
         "--bases", "Adam"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = result.stdout
    for task in ("mlp ", "cnn "):
        assert f"  {task} Adam         base                   sync   grid (val/test mean): " \
            "[lr 0.0003] " in out
        assert f"  {task} Adam         GapAware(DanaZeroAdam) M=4    grid (val/test mean): " in out
    assert "PS2    chosen [lr " in out and "staleness_mean" in out
    grids = [line for line in out.splitlines() if "GapAware(DanaZeroAdam)" in line and " grid " in line]
    assert len(grids) == 3 and all(line.count("[lr ") == 3 for line in grids), grids
    chosen = [line for line in out.splitlines() if " chosen [" in line]
    assert all(len(line.split("test per seed: ")[1].split(";")[0].split(", ")) == 2
               for line in chosen), chosen
    assert "Failed to remove function" not in result.stderr
    last = out.strip().splitlines()[-1]
    assert last.startswith("worst_gap_to_sync_points: ")
    float(last.split(": ")[1])


@pytest.mark.slow
def test_slow_link_quick_run_prints_the_goal_lines(tmp_path):
    """A tiny end-to-end run: sync and DiLoCo (the two the goal lines compare),
    2 worker processes each over the relay. Its cost is each launch's imports
    and tracing, not its 64 steps: local SGD (the same LocalUpdateStrategy path
    with the mean averager, through launch and the relay in
    test_local_update_mwms.py) is left out to save a third launch."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "slow_link.py"),
         "--modes", "sync,diloco_h64", "--steps", "64", "--eval_every", "64",
         "--local_steps_factor", "1", "--context", "8", "--width", "8", "--layers", "1",
         "--batch", "2", "--val_windows", "32", "--link_latency_ms", "2",
         "--link_mbit", "1000", "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = result.stdout
    assert "# diloco_h64 median step time per run: local " in out
    assert "# diloco_h64 run 0 drift: |outer step| / |mean delta| per outer step [1.33]" in out
    with open(tmp_path / "r.json") as f:
        runs = json.load(f)["runs"]
    assert [p["step"] for p in runs[0]["diloco_h64"]["curve"]] == [0, 64]
    assert runs[0]["diloco_h64"]["val_windows"] == 32
    lines = out.strip().splitlines()
    assert lines[-2].startswith("diloco_loss_gap_at_equal_steps: ")
    assert lines[-1].startswith("diloco_speedup_to_sync_loss: ")
    float(lines[-1].split(": ")[1])
    assert (tmp_path / "r.json").exists()
