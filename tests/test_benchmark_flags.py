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
    ("staleness_quality.py", "--seeds", "0", ">= 1"),
    ("chaos.py", "--steps", "0", ">= 1"),
    ("chaos.py", "--down", "-1", ">= 0"),
    ("embedding_scale.py", "--steps", "0", ">= 1"),
    ("embedding_scale.py", "--rows", "1e3", ">= 1"),
])
def test_bad_numeric_flag_is_named(script, flag, value, allowed):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), flag, value],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"argument {flag}: must be an int {allowed}, got '{value}'" in result.stderr
