"""Slow tests are opt-in locally and always run in CI (tests/_slow_tests.py)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests import _slow_tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO = '''
import pytest

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_slow_param(n):
    pass

def test_fast():
    pass
'''


@pytest.mark.parametrize("environ, markexpr, expected", [
    ({}, "", False),
    ({"CI": "true"}, "", True),
    ({"CI": "1"}, "", True),
    ({"CI": "false"}, "", False),
    ({"CI": ""}, "", False),
    ({"TF_ASYNC_SLOW_TESTS": "1"}, "", True),
    ({"TF_ASYNC_SLOW_TESTS": "0"}, "", False),
    ({}, "slow", True),
])
def test_run_all(environ, markexpr, expected):
    assert _slow_tests.run_all(environ, markexpr) is expected


def _pytest(tmp_path, *args, **environ):
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        from tests import _slow_tests

        def pytest_collection_modifyitems(config, items):
            _slow_tests.skip_unless_asked(config, items)
    """))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    (tmp_path / "test_demo.py").write_text(DEMO)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", _slow_tests.OPT_IN)}
    env.update(environ, PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    return result.stdout + result.stderr


def _counts(output):
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|deselected)", output)}


@pytest.mark.parametrize("args, environ, expected", [
    ((), {}, {"passed": 1, "skipped": 3}),                     # a newcomer's default
    ((), {"CI": "true"}, {"passed": 4}),                       # CI runs everything
    ((), {"CI": "false"}, {"passed": 1, "skipped": 3}),
    ((), {"TF_ASYNC_SLOW_TESTS": "1"}, {"passed": 4}),         # local opt-in
    (("-m", "slow"), {}, {"passed": 3, "deselected": 1}),
    (("-m", "not slow"), {"CI": "true"}, {"passed": 1, "deselected": 3}),
    (("test_demo.py::test_slow",), {}, {"passed": 1}),         # named: runs
    (("test_demo.py::test_slow_param",), {}, {"passed": 2}),
    (("test_demo.py::test_slow_param[2]", "test_demo.py"), {}, {"passed": 2, "skipped": 2}),
])
def test_slow_tests_are_opt_in_locally_and_on_in_ci(tmp_path, args, environ, expected):
    output = _pytest(tmp_path, *args, **environ)
    assert _counts(output) == expected, output
    if "skipped" in expected:
        assert "TF_ASYNC_SLOW_TESTS=1" in output, output  # the reason says how to opt in


def test_this_suite_skips_its_slow_tests_without_ci(tmp_path):
    """The real conftest is wired: a slow test of this suite is skipped by default."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", _slow_tests.OPT_IN)}
    env["PYTHONPATH"] = REPO
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         os.path.join(REPO, "tests", "test_cluster.py"), "-k", "trains_with or round_trip"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    counts = _counts(output)
    assert (counts.get("passed"), counts.get("skipped")) == (1, 1), output
    assert _slow_tests.SKIP_REASON in output, output


def test_readme_test_command_keeps_every_test_in_ci():
    """.ci/run runs the README's 2nd set-up command: it must not deselect slow tests."""
    function = subprocess.run(
        ["sed", "-n", "/^readme_test_command()/,/^}/p", os.path.join(REPO, ".ci", "run")],
        capture_output=True, text=True, check=True).stdout
    assert function, ".ci/run has no readme_test_command()"
    all_commands = function.replace("| sed -n 2p", "")
    run = lambda body: subprocess.run(  # noqa: E731
        ["bash", "-c", body + "\nreadme_test_command"], cwd=REPO,
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(run(all_commands)) == 2, run(all_commands)  # exactly two set-up commands
    (command,) = run(function)
    assert "python -m pytest" in command, command
    assert "slow" not in command and " -m " not in command.split("pytest", 1)[1], command
