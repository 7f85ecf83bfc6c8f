"""The Python blocks of README.md and docs/*.md, and how tests/test_docs.py runs them.

Every fenced ```python block of README.md and of every Markdown file under
docs/ (found by glob, so new pages are picked up) runs as written. A block
may be preceded, on the line before its fence, by one directive comment::

    <!-- docs-test: stand-ins make_model, dataset -->
    <!-- docs-test: skip needs a Cloud TPU -->
    <!-- docs-test: stand-ins dataset; fresh-process -->

* ``stand-ins NAME, ...``: names the block uses without defining them (the
  reader's own model or data); tests/_doc_stand_ins.py defines each one.
* ``skip REASON``: the block cannot run on a CPU-only test machine (a TPU,
  several hosts, a real network); the reason is required and is reported.
* ``fresh-process``: run the block in its own spawned process. Blocks that
  create a parameter-server or multi-worker cluster (they name
  ``local_cluster``, ``AsyncParameterServerStrategy``,
  ``TFConfigClusterResolver``, ...) always do, as a process that connected to
  a cluster cannot disconnect.

Each block runs with a fresh namespace in an empty working directory, and
``model.fit`` runs at most ``FIT_EPOCHS`` epochs of ``FIT_STEPS_PER_EPOCH``
steps (a time budget: the docs show realistic step counts).
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import io
import os
import re
import tokenize
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Names whose use means the block joins a cluster: it must run in its own process.
CLUSTER_NAMES = frozenset({
    "local_cluster", "AsyncParameterServerStrategy", "ParameterServerStrategy",
    "ParameterServerStrategyV2", "ClusterCoordinator", "TFConfigClusterResolver",
    "MultiWorkerMirroredStrategy", "serve_forever_if_server_task",
})

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")


def doc_files(root: str = REPO) -> List[str]:
    """README.md and every Markdown page under docs/, relative to ``root``."""
    pages = glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True)
    return ["README.md"] + sorted(os.path.relpath(p, root) for p in pages)


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    line: int  # 1-based line of the opening fence
    code: str
    stand_ins: Tuple[str, ...] = ()
    skip: Optional[str] = None
    fresh_process: bool = False

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Parsed:
    blocks: List[Block] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


def _names(code: str) -> set:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return set()
    return {t.string for t in tokens if t.type == tokenize.NAME}


def _directive(body: str, where: str, errors: List[str]) -> dict:
    options = {"stand_ins": (), "skip": None, "fresh_process": False}
    for item in filter(None, (part.strip() for part in body.split(";"))):
        keyword, _, rest = item.partition(" ")
        rest = rest.strip()
        if keyword == "stand-ins" and rest:
            options["stand_ins"] = tuple(n.strip() for n in rest.split(",") if n.strip())
        elif keyword == "skip" and rest:
            options["skip"] = rest
        elif keyword == "fresh-process" and not rest:
            options["fresh_process"] = True
        else:
            errors.append(
                f"{where}: bad docs-test directive {item!r}; use `stand-ins A, B`, "
                "`skip REASON` or `fresh-process`, separated by `;`"
            )
    return options


def _closing(lines: List[str], start: int, ticks: str) -> int:
    """Index of the line closing the fence opened at ``start`` (or len(lines))."""
    closer = re.compile(rf"^\s*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$")
    for index in range(start + 1, len(lines)):
        if closer.match(lines[index]):
            return index
    return len(lines)


def parse(text: str, path: str = "<doc>") -> Parsed:
    """The Python blocks of one Markdown text, and any misplaced or bad directives."""
    parsed = Parsed()
    lines = text.splitlines()
    in_fences, used = set(), set()
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = _closing(lines, index, fence["ticks"])
        in_fences.update(range(index, end + 1))
        if fence["lang"].lower() in ("python", "py", "python3"):
            indent = fence["indent"]
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip()
                             for line in lines[index + 1:end]) + "\n"
            before = index - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            directive = _DIRECTIVE.match(lines[before]) if before >= 0 else None
            options = _directive(directive["body"] if directive else "",
                                 f"{path}:{before + 1}", parsed.errors)
            if directive:
                used.add(before)
            parsed.blocks.append(Block(
                path=path, line=index + 1, code=code, stand_ins=options["stand_ins"],
                skip=options["skip"],
                fresh_process=options["fresh_process"] or bool(_names(code) & CLUSTER_NAMES),
            ))
        index = end + 1
    for number, line in enumerate(lines):
        if _DIRECTIVE.match(line) and number not in used and number not in in_fences:
            parsed.errors.append(f"{path}:{number + 1}: docs-test directive that is not "
                                 "right before a ```python block")
    return parsed


def collect(root: str = REPO) -> Parsed:
    """All Python blocks (and directive errors) of README.md and docs/."""
    everything = Parsed()
    for path in doc_files(root):
        with open(os.path.join(root, path), encoding="utf-8") as page:
            parsed = parse(page.read(), path)
        everything.blocks += parsed.blocks
        everything.errors += parsed.errors
    return everything


# Time budget: ``fit`` runs at most this many epochs and steps per epoch, so the
# docs can show realistic numbers (``epochs=3, steps_per_epoch=500``) and the
# whole docs test still takes seconds. Every argument is still passed to Keras.
FIT_EPOCHS, FIT_STEPS_PER_EPOCH = 2, 20


@contextlib.contextmanager
def fit_budget():
    """Within: ``keras.Model.fit`` clamps ``epochs`` / ``steps_per_epoch`` to the budget."""
    import keras

    def fit(self, *args, **kwargs):
        # super() at call time: strategies may wrap the Trainer's fit lazily.
        parent_fit = super(keras.Model, self).fit
        bound = inspect.signature(parent_fit).bind(*args, **kwargs)
        arguments = bound.arguments
        first = arguments.get("initial_epoch", 0)
        arguments["epochs"] = min(arguments.get("epochs", 1), first + FIT_EPOCHS)
        steps = arguments.get("steps_per_epoch")
        arguments["steps_per_epoch"] = (FIT_STEPS_PER_EPOCH if steps is None
                                        else min(steps, FIT_STEPS_PER_EPOCH))
        return parent_fit(*bound.args, **bound.kwargs)

    assert "fit" not in keras.Model.__dict__, "keras.Model defines fit: update fit_budget"
    keras.Model.fit = fit
    try:
        yield
    finally:
        del keras.Model.fit


def run_block(code: str, stand_ins=(), filename: str = "<doc>",
              cwd: Optional[str] = None) -> dict:
    """Runs one block in a fresh namespace after its stand-ins; returns the namespace.

    Runs in ``cwd`` if given (for a spawned process; in-process callers chdir
    themselves), under ``fit_budget``.
    """
    from tests import _doc_stand_ins

    if cwd is not None:
        os.chdir(cwd)
    namespace = {"__name__": "__doc_block__"}
    namespace.update(_doc_stand_ins.provide(stand_ins))
    with fit_budget():
        exec(compile(code, filename, "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def run_block_in_child(code: str, stand_ins, filename: str, cwd: str) -> None:
    """``run_block`` for ``fresh_process`` (the namespace does not pickle)."""
    run_block(code, stand_ins, filename, cwd)
