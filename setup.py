"""Installs tf_async.

Which TensorFlow wheel? TensorFlow ships as several PyPI distributions that all
provide the same ``tensorflow`` module (``tensorflow``, ``tensorflow-cpu``,
``tensorflow-macos``, ``tensorflow-intel``, ``tf-nightly``, ...). Installing two
of them breaks the installation, so tf_async never adds a second one:

1. If the target environment already has any TensorFlow distribution, the
   requirement names *that* distribution (``tensorflow-cpu>=2.16`` for a user
   who has ``tensorflow-cpu``), so pip keeps it.
2. Otherwise ``TF_ASYNC_TENSORFLOW`` chooses (e.g. ``tensorflow-cpu``), and the
   default is ``tensorflow`` (the GPU-capable wheel on Linux).
3. ``TF_ASYNC_TENSORFLOW=none`` leaves TensorFlow out entirely (for custom
   builds); ``import tf_async`` then checks the version at run time.

The target environment is inspected with a child interpreter started in
isolated mode, because pip's build isolation hides the environment's
site-packages from this file. tf_async is distributed as a source package for
this reason; a prebuilt wheel would freeze whichever choice was made when it
was built. (pip caches a wheel built from a directory whose name looks like
``name-version``; when switching TensorFlow distributions reinstall with
``pip install --no-cache-dir .``.)
"""

import os
import subprocess
import sys

from setuptools import find_packages, setup

TF_MIN = "2.16"
TF_DISTRIBUTIONS = (
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-gpu",
    "tensorflow-macos",
    "tensorflow-intel",
    "tensorflow-aarch64",
    "tensorflow-rocm",
    "tf-nightly",
    "tf-nightly-cpu",
)

_FIND_INSTALLED = """
import importlib.metadata as m, json, sys
found = []
for name in json.loads(sys.argv[1]):
    try:
        m.version(name)
    except m.PackageNotFoundError:
        continue
    found.append(name)
print(json.dumps(found))
"""


def installed_tensorflow_distributions(python=sys.executable):
    """TensorFlow distributions installed in ``python``'s own environment."""
    import json

    try:
        output = subprocess.run(
            [python, "-I", "-c", _FIND_INSTALLED, json.dumps(TF_DISTRIBUTIONS)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ.get("PATH", "")},
        ).stdout
        return json.loads(output.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return []


def tensorflow_requirement(installed, choice=None):
    """The TensorFlow requirement for ``install_requires`` (or None).

    ``installed``: distributions already present; ``choice``: the value of
    ``TF_ASYNC_TENSORFLOW`` (None when unset).
    """
    if installed:
        return f"{installed[0]}>={TF_MIN}"
    choice = (choice or "tensorflow").strip()
    if choice.lower() == "none":
        return None
    if choice not in TF_DISTRIBUTIONS:
        raise SystemExit(
            f"TF_ASYNC_TENSORFLOW={choice!r} is not a TensorFlow distribution; "
            f"use one of {', '.join(TF_DISTRIBUTIONS)} or 'none'."
        )
    return f"{choice}>={TF_MIN}"


def _requirements():
    requirement = tensorflow_requirement(
        installed_tensorflow_distributions(), os.environ.get("TF_ASYNC_TENSORFLOW")
    )
    base = ["keras>=3.0", "tensorflow-datasets>=4.9", "absl-py>=1.0", "numpy"]
    return ([requirement] if requirement else []) + base


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "README.md"), encoding="utf-8") as readme:
        long_description = readme.read()
    setup(
        name="tf_async",
        version="0.1.0",
        description=(
            "Asynchronous parameter-server, local-update and memory-lean "
            "training for Keras 3 model.fit on TensorFlow 2"
        ),
        long_description=long_description,
        long_description_content_type="text/markdown",
        packages=find_packages(include=["tf_async", "tf_async.*"]),
        python_requires=">=3.9",
        install_requires=_requirements(),
        extras_require={
            "test": ["pytest>=7", "portpicker>=1.5", "scikit-learn>=1.0", "matplotlib>=3.5",
                     "tensorboard>=2.16", "importlib_resources",
                     "pyyaml>=6"],  # docs/multi_machine.md's TFJob manifest is parsed
            "examples": ["scikit-learn>=1.0", "matplotlib>=3.5", "tensorboard>=2.16",
                         "importlib_resources"],  # tfds 4.9 needs it to download
        },
        license="Apache-2.0",
        classifiers=[
            "Programming Language :: Python :: 3",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
            "Intended Audience :: Science/Research",
        ],
    )
