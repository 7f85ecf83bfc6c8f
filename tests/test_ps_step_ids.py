"""Step ids of the async fit loop (tf_async/strategies/_ps_step_ids.py)."""

from __future__ import annotations

import tensorflow as tf

from tf_async.strategies import _ps_step_ids


def test_ids_are_consecutive_and_unique_across_blocks():
    ids = _ps_step_ids.StepIds(first=5)
    count = 2 * _ps_step_ids.SLOTS + 7
    got = [int(_ps_step_ids.combine(*ids.take())) for _ in range(count)]
    assert got == list(range(5, 5 + count))
    assert ids.next_id == 5 + count


def test_tensors_are_reused_so_workers_keep_their_copies():
    ids = _ps_step_ids.StepIds()
    first_pass = [ids.take() for _ in range(_ps_step_ids.SLOTS)]
    second_pass = [ids.take() for _ in range(_ps_step_ids.SLOTS)]
    # One block tensor per SLOTS steps; each slot tensor is the same object.
    assert len({id(block) for block, _ in first_pass}) == 1
    assert first_pass[0][0] is not second_pass[0][0]
    assert all(a[1] is b[1] for a, b in zip(first_pass, second_pass))
    assert all(t.dtype == tf.int64 for pair in first_pass[:3] for t in pair)


def test_combine_works_inside_a_tf_function():
    @tf.function
    def step(block, slot):
        return _ps_step_ids.combine(block, slot)

    ids = _ps_step_ids.StepIds(first=3 * _ps_step_ids.SLOTS - 1)
    assert [int(step(*ids.take())) for _ in range(3)] == [
        3 * _ps_step_ids.SLOTS - 1, 3 * _ps_step_ids.SLOTS, 3 * _ps_step_ids.SLOTS + 1]
    assert step.experimental_get_tracing_count() == 1
