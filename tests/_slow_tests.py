"""Slow tests (``@pytest.mark.slow``: multi-process or long) are opt-in locally.

``python -m pytest -q tests`` runs the fast tests and reports the slow ones as
skipped, unless one of these asks for them:

* ``CI`` is set to a true value (CI systems set ``CI=true``; ``.ci/run`` runs
  the README's test command there, so CI runs every test);
* ``TF_ASYNC_SLOW_TESTS=1`` (a developer's opt-in);
* a ``-m`` expression that names ``slow`` (``-m slow`` runs only them);
* the test is named on the command line (``tests/test_x.py::test_y``).

Imports nothing but the standard library, so it can be tested on its own.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

OPT_IN = "TF_ASYNC_SLOW_TESTS"
SKIP_REASON = (
    f"slow (multi-process or long): runs in CI; set {OPT_IN}=1 to run it here"
)
_FALSE = ("", "0", "false", "no", "off")


def _is_true(value: str) -> bool:
    return value.strip().lower() not in _FALSE


def run_all(environ: Mapping[str, str], markexpr: str = "") -> bool:
    """Whether every slow test runs: in CI, with the opt-in, or ``-m`` naming ``slow``."""
    return (
        _is_true(environ.get("CI", ""))
        or _is_true(environ.get(OPT_IN, ""))
        or "slow" in markexpr
    )


def _named_node_ids(args: Iterable[str], rootdir: str) -> list:
    """Command-line arguments that name tests (``path::name``), as node ids."""
    named = []
    for arg in args:
        path, sep, rest = arg.partition("::")
        if not sep:
            continue
        path = os.path.relpath(os.path.abspath(path), rootdir).replace(os.sep, "/")
        named.append(f"{path}::{rest}")
    return named


def skip_unless_asked(config, items) -> None:
    """``pytest_collection_modifyitems`` body: marks unrequested slow tests skipped."""
    import pytest

    if run_all(os.environ, config.getoption("markexpr", "") or ""):
        return
    named = _named_node_ids(config.args, str(config.rootpath))
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "slow" not in item.keywords:
            continue
        if any(item.nodeid == n or item.nodeid.startswith((n + "[", n + "::"))
               for n in named):
            continue
        item.add_marker(skip)
