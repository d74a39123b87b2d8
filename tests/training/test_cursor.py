"""The resume cursor: the saved position is the one after the last CONSUMED micro-batch."""

from __future__ import annotations

import pytest

from medsegdiff.errors import TrainingError
from medsegdiff.training.cursor import BatchCursor


class _Counting:
    """Yields keys ``pos .. n-1`` of the current epoch; exact state; moves epochs only when told."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.pos = n, 0, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield (self.epoch, self.pos - 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def test_prefetched_batches_do_not_move_the_resume_position():
    cursor = BatchCursor(_Counting(5), micro=2)
    batches = iter(cursor)
    first, second = next(batches), next(batches)  # a prefetching loader pulled two batches
    assert first == [(0, 0), (0, 1)] and second == [(0, 2), (0, 3)]
    assert cursor.state == {"epoch": 0, "pos": 0}
    cursor.consumed()
    assert cursor.state == {"epoch": 0, "pos": 2}
    # an epoch of 5 keys with micro-batches of 2: the last key joins the next epoch's first
    cursor.consumed()
    assert next(batches) == [(0, 4), (1, 0)] and cursor.state == {"epoch": 0, "pos": 4}


def test_resuming_from_the_saved_state_continues_with_the_next_batch():
    a = BatchCursor(_Counting(6), micro=2)
    it = iter(a)
    next(it)
    a.consumed()
    b = BatchCursor(_Counting(6), micro=2)
    b.load_state_dict(a.state)
    assert next(iter(b)) == next(it) == [(0, 2), (0, 3)]


def test_a_sampler_without_samples_is_an_error():
    with pytest.raises(TrainingError, match="the training sampler yields no samples"):
        next(iter(BatchCursor(_Counting(0), micro=1)))
