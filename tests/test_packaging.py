"""setup.py never adds a second TensorFlow distribution; the package imports lazily."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    spec = importlib.util.spec_from_file_location("tf_async_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ != "__main__": setup() is not called
    return module


def test_existing_distribution_is_kept():
    setup = _load_setup()
    assert setup.tensorflow_requirement(["tensorflow-cpu"]) == "tensorflow-cpu>=2.16"
    assert setup.tensorflow_requirement(["tensorflow"], "tensorflow-cpu") == "tensorflow>=2.16"


def test_choice_when_nothing_installed():
    setup = _load_setup()
    assert setup.tensorflow_requirement([]) == "tensorflow>=2.16"
    assert setup.tensorflow_requirement([], "tensorflow-cpu") == "tensorflow-cpu>=2.16"
    assert setup.tensorflow_requirement([], "none") is None
    with pytest.raises(SystemExit, match="TF_ASYNC_TENSORFLOW='torch'"):
        setup.tensorflow_requirement([], "torch")


def test_detection_sees_this_environment():
    setup = _load_setup()
    found = setup.installed_tensorflow_distributions()
    assert found, "no TensorFlow distribution detected in the test environment"
    for name in found:
        importlib.metadata.version(name)


def test_environment_has_exactly_one_tensorflow_distribution():
    setup = _load_setup()
    found = setup.installed_tensorflow_distributions()
    assert len(found) == 1, f"more than one TensorFlow distribution installed: {found}"


def test_launcher_import_does_not_load_tensorflow():
    code = "import sys, tf_async.launch, tf_async; print('tensorflow' in sys.modules, tf_async.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    assert out[0] == "False"
    assert out[1].count(".") == 2


def test_public_api_is_reachable():
    import tf_async

    assert callable(tf_async.local_cluster)
    assert tf_async.StepContext is tf_async.staleness.StepContext
    assert tf_async.cluster.local_cluster is tf_async.local_cluster
    with pytest.raises(AttributeError):
        tf_async.no_such_name  # noqa: B018
