"""LocalUpdateStrategy over a 2-process MultiWorkerMirroredStrategy on localhost."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*flags):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    script = os.path.join(REPO, "tests", "_local_update_mwms_script.py")
    proc = subprocess.run(
        [sys.executable, "-m", "tf_async.launch", "--workers", "2", "--ps", "0", *flags,
         "--", script],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    return proc, proc.stdout + proc.stderr


@pytest.mark.slow
def test_collectives_pass_through_the_slow_link_relay():
    """Every cross-worker byte of MWMS goes through the relay and pays its latency."""
    proc, output = _launch("--link_latency_ms", "10", "--link_mbit", "200")
    assert proc.returncode == 0, output[-4000:]
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", output)]
    assert len(results) == 2 and results[0]["final"] == results[1]["final"], output[-4000:]
    assert results[0]["syncs"] == 3
    stats = json.loads(re.search(r"\[launch\] relay-stats (\[.*\])", output).group(1))
    links = {s["link"]: s for s in stats}
    assert set(links) == {"worker0->worker1", "worker1->worker0"}
    for link in links.values():
        assert link["bytes"] > 1000, link  # the collectives (and coordination) went through
        assert link["one_way_ms_min"] >= 10.0, link


@pytest.mark.slow
def test_two_workers_diverge_inside_period_and_agree_after_sync():
    proc, output = _launch()
    assert proc.returncode == 0, output[-4000:]
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", output)]
    assert len(results) == 2, output[-4000:]
    a, b = results
    assert a["replicas"] == b["replicas"] == 2
    assert len(a["per_step"]) == len(b["per_step"]) == 10
    for step, (sa, sb) in enumerate(zip(a["per_step"], b["per_step"]), start=1):
        if step in (4, 8):
            assert sa == sb, (step, a["per_step"], b["per_step"])
        else:
            assert sa != sb, (step, a["per_step"], b["per_step"])
    # Syncs at steps 4 and 8, and the forced one at the end of the epoch (10).
    assert a["syncs"] == b["syncs"] == 3
    assert a["final"] == b["final"]
    assert a["divergence"] > 0
    # The train step's logs are reduced over each worker's replicas, without a
    # collective: the only cross-worker reductions traced are the syncs
    # (the train step's periodic one and the flush traced by synchronize()).
    assert a["traced"]["reduce_to"] == b["traced"]["reduce_to"] == 0, (a, b)
    assert 1 <= a["traced"]["batch_reduce_to"] <= 3, a
    # Worker-local logs: each worker's own loss (different shards).
    assert a["loss"] != b["loss"]
