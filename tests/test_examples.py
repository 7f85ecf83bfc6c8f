"""Every example runs end to end in a quick mode, so none of them can rot.

Each run is a fresh subprocess (parameter-server runs connect to a cluster) on
the offline datasets, a few steps only; the assertion is on the example's own
final ``test_accuracy:`` line (and on resume / staleness output where relevant).
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--epochs=2", "--steps_per_epoch=15", "--batch_size=32"]


def _run(script, *flags, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", script), *flags],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # A normal run's output carries no TF shutdown noise (issue 17.5).
    noise = re.search(r"^.*(?:[Rr]endezvous is aborting|\bABORTED\b).*$", output, re.M)
    assert noise is None, noise.group(0)
    match = re.search(r"^test_accuracy: ([0-9.]+)$", result.stdout, re.M)
    assert match, output[-4000:]
    return float(match.group(1)), result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [
    ("async_ps", ["--workers=2", "--ps=1"]),
    ("local_sgd", ["--cpu_devices=2", "--sync_every=4"]),
    ("sharded", ["--cpu_devices=2"]),
    ("simulated", ["--workers=4", "--optimizer=dcadam"]),
    ("sync", ["--cpu_devices=2"]),
])
def test_mnist_example_modes(mode, extra):
    accuracy, out = _run("mnist.py", f"--mode={mode}", "--dataset=digits", *QUICK, *extra)
    assert accuracy > 0.3, out  # 10 classes: chance is 0.1
    if mode in ("async_ps", "simulated"):
        assert re.search(r"^staleness_max: ", out, re.M), out
    if mode == "local_sgd":
        assert re.search(r"^local_divergence: ", out, re.M), out


@pytest.mark.slow
def test_mnist_example_checkpoint_and_resume(tmp_path):
    flags = ["--mode=async_ps", "--dataset=digits", "--epochs=1", "--steps_per_epoch=10",
             f"--model_dir={tmp_path}"]
    _run("mnist.py", *flags)
    assert list((tmp_path / "ckpt").glob("ckpt-*.index")), "no checkpoint written"
    assert (tmp_path / "logs").is_dir(), "no TensorBoard logs"
    _, out = _run("mnist.py", *flags, "--resume")
    assert re.search(r"resumed from .*ckpt-1 at epoch 1 \(optimizer step 10\)", out), out
    assert "Epoch 2/2" in out


def _synthetic_cifar10_majority_rate():
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import example_data
    finally:
        sys.path.pop(0)
    _, _, _, y_test, _ = example_data.synthetic_cifar10()
    return np.bincount(y_test).max() / len(y_test)


@pytest.mark.slow
def test_cifar10_example_learns_offline_synthetic_data():
    """100 async steps of the small ResNet learn the offline data (not the majority class)."""
    accuracy, out = _run("cifar10.py", "--mode=async_ps", "--dataset=synthetic", "--width=8",
                         "--epochs=2", "--steps_per_epoch=50", "--batch_size=32")
    assert "synthetic" in out
    majority = _synthetic_cifar10_majority_rate()
    assert majority <= 0.15  # balanced classes: predicting one class gets ~0.1
    assert accuracy >= majority + 0.4, (accuracy, majority, out[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local_sgd", "sharded"])
def test_cloud_tpu_example_on_cpu_stand_in(mode):
    accuracy, out = _run("cloud_tpu.py", "--tpu=local_cpu_test", f"--mode={mode}",
                         "--dataset=digits", *QUICK)
    assert "jit_compile=True" in out
    assert accuracy > 0.3, out


@pytest.mark.parametrize("flags, message", [
    (["--mode=bogus"], "--mode"),
    (["--epochs=0"], "epochs"),
    (["--workers=0"], "workers"),
    (["--sync_every=0"], "sync_every"),
    (["--cpu_devices=0"], "cpu_devices"),
    (["--max_staleness=-1"], "max_staleness"),
    (["--resume"], "--resume needs --model_dir"),
    (["--mode=sharded", "--optimizer=sgd"], "--mode=sharded trains with ShardedAdam"),
])
def test_example_rejects_bad_flags(flags, message):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "mnist.py"), "--dataset=digits", *flags],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Epoch 1/" not in result.stdout  # rejected before any training


_DEFINE = re.compile(r"flags\.DEFINE_\w+\(\s*[\"'](\w+)[\"']")
_LOCAL_IMPORT = re.compile(r"^import (\w+)", re.M)


def _defined_flags(script):
    """Flags DEFINEd in ``script`` and in the examples/ modules it imports."""
    names, todo, seen = set(), [script], set()
    while todo:
        path = os.path.join(REPO, "examples", todo.pop())
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        with open(path, encoding="utf-8") as source:
            text = source.read()
        names.update(_DEFINE.findall(text))
        todo += [f"{module}.py" for module in _LOCAL_IMPORT.findall(text)]
    return names


_APPS = sorted(name for name in os.listdir(os.path.join(REPO, "examples"))
               if name.endswith(".py") and "app.run(" in open(
                   os.path.join(REPO, "examples", name), encoding="utf-8").read())


@pytest.mark.parametrize("script", _APPS)
def test_example_help_lists_every_flag(script):
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", script), "--help"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", result.stdout, re.M))
    defined = _defined_flags(script)
    assert len(defined) > 2, defined
    assert not defined - listed, (sorted(defined - listed), result.stdout)
    assert "--helpfull" in result.stdout  # the TF/absl flags stay behind --helpfull


@pytest.mark.slow
def test_recommender_example_learns_synthetic_clicks():
    """The DLRM example (26 tables split over 2 PS, async fit) beats chance AUC clearly."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "recommender.py"), "--quick"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "synthetic" in result.stdout
    match = re.search(r"^test_auc: ([0-9.]+)$", result.stdout, re.M)
    assert match, output[-4000:]
    assert float(match.group(1)) > 0.6, output[-2000:]  # chance is 0.5


@pytest.mark.parametrize("flags, message", [
    (["--workers=0"], "workers"),
    (["--optimizer=adam"], "optimizer"),
    (["--embedding_dim=0"], "embedding_dim"),
    (["--steps_per_epoch=0"], "steps_per_epoch"),
])
def test_recommender_rejects_bad_flags(flags, message):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "recommender.py"), "--quick", *flags],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Epoch 1/" not in result.stdout  # rejected before any training


def _recommender_module():
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import recommender
    finally:
        sys.path.pop(0)
    return recommender


def test_recommender_criteo_loader_reads_train_txt_lines(tmp_path):
    rec = _recommender_module()
    rows = rec.table_rows(1000)
    rng = np.random.default_rng(1)
    counts = rng.integers(-3, 500, size=(5, 13)).astype("float64")
    counts[1, 2] = counts[3, 12] = np.nan  # missing dense values
    cats = [[f"{rng.integers(1 << 32):08x}" for _ in range(26)] for _ in range(5)]
    cats[2][0] = cats[4][25] = None  # missing categorical values
    labels = np.array([1, 0, 0, 1, 0])
    path = tmp_path / "train.txt"
    rec.write_criteo_tsv(str(path), counts, cats, labels)
    assert path.read_text().splitlines()[1].count("\t") == 39

    dense, ids, y = rec.load_criteo([str(path)], rows, max_examples=4)
    assert y.tolist() == [1.0, 0.0, 0.0, 1.0]  # max_examples lines only
    expected_dense = np.log1p(np.maximum(np.nan_to_num(counts[:4], nan=0.0), 0.0))
    np.testing.assert_allclose(dense, expected_dense, rtol=1e-6)
    expected_ids = [[0 if c is None else 1 + int(c, 16) % (n - 1) if n > 1 else 0
                     for c, n in zip(line, rows)] for line in cats[:4]]
    assert ids.tolist() == expected_ids
    assert ids.dtype == np.int32 and (ids < np.array(rows)).all()

    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match=r"--data_path: .*bad.txt:1 has 3 tab-separated fields"):
        rec.load_criteo([str(bad)], rows, max_examples=10)
