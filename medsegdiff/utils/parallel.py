"""Run independent calls in spawned worker processes and collect the results as they finish.

One pool helper for the package (cache preparation, the learning benchmark's runs). Workers are
started with the ``spawn`` method, so a worker never inherits a half-initialised torch or a held
lock from the parent, and each worker can be given its own CPU-thread count: ``k`` workers on ``n``
cores should each use ``n // k`` threads, or they fight for the cores (on a 2-core machine two
torch processes with 2 threads each run many times slower than with one thread each).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

import torch

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker(threads: int | None) -> None:
    if threads:
        for var in THREAD_VARS:
            os.environ[var] = str(threads)
        torch.set_num_threads(threads)


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """CPU threads for each of ``workers`` processes sharing ``cpus`` cores (default: all cores), at least 1."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, cpus // max(1, workers))


def run_parallel(fn: Callable[..., Any], calls: Sequence[tuple[Sequence[Any], dict[str, Any]]], *, workers: int,
                 threads: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(*args, **kwargs))`` for every ``calls[index]``, in the order they finish.

    Args:
        fn: a module-level function (it is pickled by reference).
        calls: ``(args, kwargs)`` per call; arguments must pickle.
        workers: processes (at most ``len(calls)`` are started).
        threads: CPU threads per worker (``OMP_NUM_THREADS`` and ``torch.set_num_threads``); None
            leaves the default.

    Raises:
        Whatever a call raised (the first one to fail); the calls not yet started are cancelled.
    """
    if not calls:
        return
    n = max(1, min(workers, len(calls)))
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {pool.submit(fn, *args, **kwargs): i for i, (args, kwargs) in enumerate(calls)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    index = pending.pop(fut)
                    yield index, fut.result()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


__all__ = ["run_parallel", "threads_per_worker"]
