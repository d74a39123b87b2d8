"""Spawned worker processes: results by index, thread counts, errors propagate."""

from __future__ import annotations

import os

import pytest
import torch

from medsegdiff.utils.parallel import run_parallel, threads_per_worker


def _probe(x: int, *, scale: int = 1) -> tuple[int, int, str | None, int]:
    return x * scale, os.getpid(), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


def _fail(x: int) -> None:
    raise ValueError(f"bad {x}")


def test_results_come_back_by_index_from_worker_processes_with_their_thread_count():
    calls = [((i,), {"scale": 10}) for i in range(4)]
    got = dict(run_parallel(_probe, calls, workers=2, threads=1))
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[i][0] for i in range(4)] == [0, 10, 20, 30]
    assert all(pid != os.getpid() for _, pid, _, _ in got.values())
    assert len({pid for _, pid, _, _ in got.values()}) <= 2
    assert all(env == "1" and n == 1 for _, _, env, n in got.values())
    assert list(run_parallel(_probe, [], workers=2)) == []


def test_a_failing_call_raises_its_error_in_the_caller():
    with pytest.raises(ValueError, match="bad 1"):
        list(run_parallel(_fail, [((1,), {})], workers=1))


def test_threads_per_worker_shares_the_cores():
    assert threads_per_worker(2, cpus=2) == 1
    assert threads_per_worker(4, cpus=16) == 4
    assert threads_per_worker(8, cpus=2) == 1
    assert threads_per_worker(0, cpus=3) == 3
