"""Every benchmark rejects a bad numeric flag with an argparse error naming it."""

from __future__ import annotations

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
    ("chaos.py", "--steps", "0", ">= 1"),
    ("chaos.py", "--down", "-1", ">= 0"),
    ("embedding_scale.py", "--steps", "0", ">= 1"),
    ("embedding_scale.py", "--rows", "1e3", ">= 1"),
    ("slow_link.py", "--steps", "0", ">= 1"),
    ("slow_link.py", "--workers", "0", ">= 1"),
    ("slow_link.py", "--eval_every", "x", ">= 1"),
    ("slow_link.py", "--batch", "0", ">= 1"),
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
])
def test_slow_link_bad_flags_are_named(flag, value, message):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "slow_link.py"), flag, value],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


@pytest.mark.slow
def test_slow_link_quick_run_prints_the_goal_lines(tmp_path):
    """A tiny end-to-end run: 3 modes x 2 worker processes over the relay."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "slow_link.py"),
         "--steps", "64", "--eval_every", "64", "--local_steps_factor", "1", "--context", "16",
         "--width", "16", "--layers", "1", "--batch", "2", "--link_latency_ms", "2",
         "--link_mbit", "1000", "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("diloco_loss_gap_at_equal_steps: ")
    assert lines[-1].startswith("diloco_speedup_to_sync_loss: ")
    float(lines[-1].split(": ")[1])
    assert (tmp_path / "r.json").exists()
