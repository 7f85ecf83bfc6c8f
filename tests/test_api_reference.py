"""The docs' signatures are the code's: docs/README.md's API table and the other tables.

docs/README.md's "API reference" table is exact: each ``tf_async.X(params)`` in
its first column lists every parameter of ``inspect.signature`` (a class: of
its ``__init__``), in order, with the same kinds (``*``, ``*args``,
``**kwargs``) and defaults. A name the signature takes through ``**kwargs``
(``DCAdam``'s ``weight_decay``) may be listed just before ``**kwargs`` if a
base class's ``__init__`` names it with that default. ``.name(...)`` continues
the previous entry's module; a bare ``Name`` after an entry is an alias of it. Every public strategy and optimizer has a row,
and the ``python -m tf_async.launch`` row lists exactly the launcher's flags.

Every other table of README.md and docs/*.md whose first column shows a call
of a public name (``DCSGD(learning_rate=0.01, ...)``) may elide parameters
with ``...``, but each parameter it names exists with the default shown.
"""

import ast
import importlib
import inspect
import os
import re
from typing import List, NamedTuple, Optional

import pytest

import tf_async
from tests import _doc_blocks
from tf_async import launch

API_PAGE = os.path.join("docs", "README.md")
_SPAN = re.compile(r"`([^`]+)`")
_CALL = re.compile(r"^(?P<name>\.?[A-Za-z_][\w.]*)(?:\((?P<params>.*)\))?$")
_NO_DEFAULT = object()


class Param(NamedTuple):
    name: str
    kind: str  # "", "*", "**" (positional-or-keyword, var-positional, var-keyword) or "kw"
    default: object = _NO_DEFAULT


def _split_top_level(text: str) -> List[str]:
    """``text`` split on commas outside brackets and quotes."""
    pieces, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(current.strip())
            current = ""
            continue
        current += char
    if current.strip():
        pieces.append(current.strip())
    return pieces


def parse_params(text: str) -> List[Optional[Param]]:
    """A documented parameter list; ``None`` stands for a ``...`` elision."""
    params, keyword_only = [], False
    for piece in _split_top_level(text):
        if piece == "...":
            params.append(None)
        elif piece == "*":
            keyword_only = True
        elif piece.startswith("**"):
            params.append(Param(piece[2:], "**"))
        elif piece.startswith("*"):
            params.append(Param(piece[1:], "*"))
            keyword_only = True
        else:
            name, sep, default = piece.partition("=")
            value = ast.literal_eval(default.strip()) if sep else _NO_DEFAULT
            params.append(Param(name.strip(), "kw" if keyword_only else "", value))
    return params


_KINDS = {
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "",
    inspect.Parameter.POSITIONAL_ONLY: "",
    inspect.Parameter.KEYWORD_ONLY: "kw",
    inspect.Parameter.VAR_POSITIONAL: "*",
    inspect.Parameter.VAR_KEYWORD: "**",
}


def _signature(obj) -> inspect.Signature:
    if inspect.isclass(obj):  # what users call: __init__ (LocalUpdateStrategy has a __new__)
        signature = inspect.signature(obj.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])
    return inspect.signature(obj)


def actual_params(obj) -> List[Param]:
    return [
        Param(p.name, _KINDS[p.kind],
              _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
        for p in _signature(obj).parameters.values()
    ]


def _base_param(obj, name) -> Optional[Param]:
    """``name`` as the first base class ``__init__`` that names it takes it."""
    for base in inspect.getmro(obj)[1:] if inspect.isclass(obj) else ():
        if "__init__" in base.__dict__:
            for param in actual_params(base):
                if param.name == name:
                    return param
    return None


def _same(a, b) -> bool:
    if a is _NO_DEFAULT or b is _NO_DEFAULT:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


def _show(params) -> str:
    def one(p):
        if p is None:
            return "..."
        prefix = {"*": "*", "**": "**"}.get(p.kind, "")
        return prefix + p.name + ("" if p.default is _NO_DEFAULT else f"={p.default!r}")
    return ", ".join(one(p) for p in params)


def mismatches(obj, documented: List[Optional[Param]], exact: bool) -> List[str]:
    """What the documented list gets wrong about ``obj``'s signature."""
    actual = actual_params(obj)
    by_name = {p.name: p for p in actual}
    takes_kwargs = any(p.kind == "**" for p in actual)
    problems = []
    for param in filter(None, documented):
        real = by_name.get(param.name)
        if real is None:
            base = _base_param(obj, param.name) if takes_kwargs else None
            if base is None:
                problems.append(f"no parameter `{param.name}`")
            elif not _same(param.default, base.default):
                problems.append(f"`{param.name}` defaults to {base.default!r} (base class), "
                                f"documented {param.default!r}")
            continue
        if not _same(param.default, real.default):
            problems.append(f"`{param.name}` defaults to "
                            f"{'nothing' if real.default is _NO_DEFAULT else repr(real.default)}, "
                            f"documented {'nothing' if param.default is _NO_DEFAULT else repr(param.default)}")
        if param.kind != real.kind:
            problems.append(f"`{param.name}` is {real.kind or 'positional-or-keyword'}, "
                            f"documented {param.kind or 'positional-or-keyword'}")
    if exact:
        if None in documented:
            problems.append("`...` in the API table: list every parameter")
        own = [p for p in documented if p is not None and p.name in by_name]
        if [p.name for p in own] != [p.name for p in actual]:
            problems.append("parameters or their order differ")
        extra = [i for i, p in enumerate(documented) if p is not None and p.name not in by_name]
        kwargs_at = [i for i, p in enumerate(documented) if p is not None and p.kind == "**"]
        if extra and (not kwargs_at or extra != list(range(kwargs_at[0] - len(extra),
                                                              kwargs_at[0]))):
            problems.append("names taken through **kwargs go just before **kwargs")
    if problems:
        problems.append(f"the signature is ({_show(actual)})")
    return problems


def _resolve(dotted: str, module_hint: Optional[str] = None):
    if dotted.startswith("."):
        dotted = module_hint + dotted
    parts = dotted.split(".")
    if parts[0] != "tf_async":
        return None, None
    obj = tf_async
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj, dotted.rsplit(".", 1)[0]


# ------------------------------------------------------------------ tables

def _tables(path):
    """(line number, first cell) of every Markdown table row of ``path``."""
    with open(os.path.join(_doc_blocks.REPO, path), encoding="utf-8") as page:
        lines = page.read().splitlines()
    rows, section = [], None
    in_fence = False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        if in_fence:
            continue
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.append((number, section, cells[0]))
    return rows


def _api_rows():
    rows = [(n, cell) for n, section, cell in _tables(API_PAGE) if section == "API reference"]
    return rows[1:]  # the header row


def test_api_table_is_found():
    rows = _api_rows()
    assert len(rows) >= 10, rows
    assert any("launch" in cell for _, cell in rows)


@pytest.mark.parametrize("line, cell", _api_rows(), ids=[f"line{n}" for n, _ in _api_rows()])
def test_api_table_row_matches_the_code(line, cell):
    spans = _SPAN.findall(cell)
    assert spans, f"{API_PAGE}:{line}: no `code` in the first column"
    module = None
    for span in spans:
        if span.startswith("python -m tf_async.launch"):
            documented = set(re.findall(r"(--\w+)", span.split(" -- ")[0]))
            actual = {option for action in launch._parser()._actions
                      for option in action.option_strings if option.startswith("--")}
            actual.discard("--help")
            assert documented == actual, f"{API_PAGE}:{line}: launcher flags are {sorted(actual)}"
            continue
        if module and re.fullmatch(r"[A-Za-z_]\w*", span):  # (alias `AdamAsync`)
            assert getattr(importlib.import_module(module), span, None) is obj, (
                f"{API_PAGE}:{line}: `{span}` is not an alias of the row's name in {module}")
            continue
        match = _CALL.match(span)
        assert match, f"{API_PAGE}:{line}: cannot read `{span}`"
        obj, module = _resolve(match["name"], module)
        assert obj is not None, f"{API_PAGE}:{line}: `{span}` is not a tf_async name"
        if match["params"] is not None:
            problems = mismatches(obj, parse_params(match["params"]), exact=True)
            assert not problems, f"{API_PAGE}:{line}: `{span}`: " + "; ".join(problems)


def test_every_public_strategy_and_optimizer_has_a_row():
    table = " ".join(cell for _, cell in _api_rows())
    for package in ("strategies", "keras_optimizers"):
        module = importlib.import_module(f"tf_async.{package}")
        for name in module.__all__:
            assert re.search(rf"\b{name}\b", table), f"{API_PAGE}: no row for tf_async.{package}.{name}"


def _other_signature_cells():
    public = {}
    for package in ("strategies", "keras_optimizers"):
        module = importlib.import_module(f"tf_async.{package}")
        public.update({name: getattr(module, name) for name in module.__all__})
    found = []
    for path in _doc_blocks.doc_files():
        for line, section, cell in _tables(path):
            if path == API_PAGE and section == "API reference":
                continue
            for span in _SPAN.findall(cell):
                match = _CALL.match(span)
                if match and match["params"] is not None:
                    name = match["name"].rsplit(".", 1)[-1]
                    if name in public:
                        found.append(pytest.param(public[name], span,
                                                  id=f"{path}:{line}:{name}"))
    return found


@pytest.mark.parametrize("obj, span", _other_signature_cells())
def test_other_doc_tables_name_real_parameters(obj, span):
    problems = mismatches(obj, parse_params(_CALL.match(span)["params"]), exact=False)
    assert not problems, f"`{span}`: " + "; ".join(problems)


# ---------------------------------------------------------- the checker itself

def _example(learning_rate=0.01, momentum=0.0, *, name=None, **kwargs):
    pass


class _Base:
    def __init__(self, weight_decay=None, **kwargs):
        pass


class _Child(_Base):
    def __init__(self, lambda_=0.04, **kwargs):
        super().__init__(**kwargs)


@pytest.mark.parametrize("obj, documented, exact, problem", [
    (_example, "learning_rate=0.01, momentum=0.0, *, name=None, **kwargs", True, None),
    (_example, "lr=0.01, momentum=0.0, *, name=None, **kwargs", True, "no parameter `lr`"),
    (_example, "learning_rate=0.1, momentum=0.0, *, name=None, **kwargs", True,
     "`learning_rate` defaults to 0.01"),
    (_example, "learning_rate=0.01, momentum=0.0, name=None, **kwargs", True,
     "`name` is kw"),
    (_example, "learning_rate=0.01, *, name=None, **kwargs", True, "order differ"),
    (_example, "learning_rate=0.01, ..., **kwargs", True, "`...` in the API table"),
    (_example, "learning_rate=0.01, ...", False, None),
    (_example, "lr=0.01, ...", False, "no parameter `lr`"),
    (_Child, "lambda_=0.04, weight_decay=None, **kwargs", True, None),
    (_Child, "lambda_=0.04, weight_decay=0.1, **kwargs", True, "defaults to None (base"),
    (_Child, "weight_decay=None, lambda_=0.04, **kwargs", True, "just before **kwargs"),
    (_Child, "lambda_=0.04, bogus=1, **kwargs", True, "no parameter `bogus`"),
])
def test_signature_checker(obj, documented, exact, problem):
    problems = mismatches(obj, parse_params(documented), exact)
    if problem is None:
        assert not problems
    else:
        assert any(problem in p for p in problems), problems
