"""The docs cannot drift: every Python block of README.md and docs/*.md runs.

How blocks are found, what their ``<!-- docs-test: ... -->`` directives mean
and the ``fit`` time budget: tests/_doc_blocks.py; the stand-ins for the
reader's ``make_model()`` / ``dataset`` / ...: tests/_doc_stand_ins.py. Blocks
that join a cluster run in a spawned process (and count as slow tests).
"""

import os
import traceback

import pytest

from tests import _doc_blocks, _doc_stand_ins

PARSED = _doc_blocks.collect()


def _params(blocks):
    return [
        pytest.param(block, id=block.id,
                     marks=[pytest.mark.slow] if block.fresh_process and not block.skip else [])
        for block in blocks
    ]


def test_every_doc_page_is_read():
    pages = _doc_blocks.doc_files()
    on_disk = {
        os.path.relpath(os.path.join(d, f), _doc_blocks.REPO)
        for d, _, files in os.walk(os.path.join(_doc_blocks.REPO, "docs"))
        for f in files if f.endswith(".md")
    }
    assert pages[0] == "README.md" and set(pages[1:]) == on_disk
    assert {"docs/README.md", "docs/async_parameter_server.md"} <= on_disk
    assert len(PARSED.blocks) >= 6  # README's Usage, one per mode page, staleness.md


def test_doc_directives_are_valid():
    assert not PARSED.errors, "\n".join(PARSED.errors)
    for block in PARSED.blocks:
        unknown = set(block.stand_ins) - set(_doc_stand_ins.STAND_INS)
        assert not unknown, (
            f"{block.id}: unknown stand-in(s) {sorted(unknown)}; "
            f"known: {sorted(_doc_stand_ins.STAND_INS)} (add one to tests/_doc_stand_ins.py)"
        )


HINT = ("If the block uses names the reader supplies, declare them on the line before "
        "its fence: <!-- docs-test: stand-ins make_model, dataset --> (known: {known}); "
        "if it cannot run on a CPU-only test machine: <!-- docs-test: skip REASON -->. "
        "See tests/_doc_blocks.py.")


@pytest.mark.parametrize("block", _params(PARSED.blocks))
def test_doc_block_runs(block, tmp_path, monkeypatch, fresh_process):
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    try:
        if block.fresh_process:
            fresh_process(_doc_blocks.run_block_in_child, block.code, block.stand_ins,
                          block.id, str(tmp_path), timeout=300)
        else:
            monkeypatch.chdir(tmp_path)
            _doc_blocks.run_block(block.code, block.stand_ins, block.id)
    except Exception:  # noqa: BLE001 - reported with the traceback and what to do
        pytest.fail(f"the Python block at {block.id} fails:\n{traceback.format_exc()}\n"
                    + HINT.format(known=", ".join(sorted(_doc_stand_ins.STAND_INS))))


# ------------------------------------------------------------- the parser itself

PAGE = """\
# A page

<!-- docs-test: stand-ins make_model, dataset -->
```python
model = make_model()
```

text

<!-- docs-test: skip needs a Cloud TPU -->

```python
tpu_only()
```

```python
import tf_async
resolver = tf_async.local_cluster(workers=1, ps=1)  # joins a cluster
```

```bash
echo not python
```

- a list item:

  ```python
  x = 1
  ```
"""


def test_parse_finds_blocks_and_directives():
    parsed = _doc_blocks.parse(PAGE, "page.md")
    assert not parsed.errors
    assert [b.line for b in parsed.blocks] == [4, 12, 16, 27]
    first, tpu, cluster, indented = parsed.blocks
    assert first.stand_ins == ("make_model", "dataset") and first.code == "model = make_model()\n"
    assert not first.fresh_process and first.skip is None
    assert tpu.skip == "needs a Cloud TPU" and tpu.stand_ins == ()
    assert cluster.fresh_process and cluster.stand_ins == ()  # local_cluster: own process
    assert indented.code == "x = 1\n"
    assert _doc_blocks.parse("<!-- docs-test: fresh-process -->\n```python\npass\n```\n"
                             ).blocks[0].fresh_process


@pytest.mark.parametrize("page, message", [
    ("<!-- docs-test: stand-ins dataset -->\ntext\n```python\npass\n```\n", "not right before"),
    ("<!-- docs-test: stand-ins dataset -->\n```bash\nls\n```\n", "not right before"),
    ("<!-- docs-test: skip -->\n```python\npass\n```\n", "bad docs-test directive 'skip'"),
    ("<!-- docs-test: standins x -->\n```python\npass\n```\n", "bad docs-test directive"),
])
def test_parse_reports_bad_directives(page, message):
    errors = _doc_blocks.parse(page, "page.md").errors
    assert len(errors) == 1 and message in errors[0], errors


def test_run_block_defines_only_declared_stand_ins_and_keeps_the_fit_budget(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NameError, match="make_model"):
        _doc_blocks.run_block("make_model()\n", ("dataset",))
    namespace = _doc_blocks.run_block(
        "model = make_model()\n"
        "model.compile(optimizer='sgd', loss='sparse_categorical_crossentropy')\n"
        "history = model.fit(dataset, epochs=50, steps_per_epoch=1000, verbose=0)\n",
        ("make_model", "dataset"))
    assert len(namespace["history"].epoch) == _doc_blocks.FIT_EPOCHS
    assert int(namespace["model"].optimizer.iterations.numpy()) == (
        _doc_blocks.FIT_EPOCHS * _doc_blocks.FIT_STEPS_PER_EPOCH)
    import keras

    assert "fit" not in keras.Model.__dict__  # the budget is undone afterwards
