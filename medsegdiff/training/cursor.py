"""The resume cursor: micro-batches of sampler keys together with the exact sampler position.

The trainer feeds a ``DataLoader`` through :class:`BatchCursor` (as its ``batch_sampler``); the
position saved in a checkpoint is the one right after the last CONSUMED batch, so a resumed run
continues with exactly the batch an uninterrupted run would have drawn next.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from medsegdiff.errors import TrainingError


class BatchCursor:
    """Micro-batches of sampler keys, with the sampler state right after each one.

    DataLoader workers prefetch, so the sampler runs ahead of training; the state recorded after
    pulling a batch is released only when that batch is consumed (:meth:`consumed`), which gives
    the exact position to resume from.

    Args:
        sampler: iterable of dataset keys; optionally ``state_dict()`` / ``load_state_dict()``
            (exact position), ``epoch`` and ``set_epoch(e)``.
        micro: keys per micro-batch.
    """

    def __init__(self, sampler: Any, micro: int) -> None:
        self.sampler = sampler
        self.micro = micro
        self.pending: collections.deque[Any] = collections.deque()
        self.state: Any = self.snapshot()

    def snapshot(self) -> Any:
        """The sampler's current position (None for a sampler without ``state_dict``)."""
        fn = getattr(self.sampler, "state_dict", None)
        return fn() if callable(fn) else None

    def load_state_dict(self, state: Any) -> None:
        """Move the sampler to a saved position (ignored by a sampler without ``load_state_dict``)."""
        fn = getattr(self.sampler, "load_state_dict", None)
        if callable(fn):
            fn(state)
            self.state = state

    def __iter__(self) -> Iterator[list[Any]]:
        buf: list[Any] = []
        empty_passes = 0
        while True:
            got = False
            epoch_before = getattr(self.sampler, "epoch", None)
            for key in self.sampler:
                got = True
                buf.append(key)
                if len(buf) == self.micro:
                    self.pending.append(self.snapshot())
                    yield buf
                    buf = []
            # An empty pass is normal once (resumed exactly at the end of an epoch), never twice.
            empty_passes = 0 if got else empty_passes + 1
            if empty_passes >= 2:
                raise TrainingError("the training sampler yields no samples; check the training split and data")
            # Samplers that do not move to the next epoch by themselves are told to.
            set_epoch = getattr(self.sampler, "set_epoch", None)
            if callable(set_epoch) and epoch_before is not None and self.sampler.epoch == epoch_before:
                set_epoch(int(epoch_before) + 1)

    def consumed(self) -> None:
        """The oldest pulled batch was trained on: its position becomes the resume position."""
        self.state = self.pending.popleft()
