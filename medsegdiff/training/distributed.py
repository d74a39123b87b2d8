"""torchrun-aware distributed helpers: one code path for one process or many.

A process group is created only when ``WORLD_SIZE > 1`` (never for a single process, unlike
upstream improved-diffusion which needs MPI and a group even on one GPU). The backend is NCCL on
CUDA devices and gloo on the CPU. Every collective here is a no-op without a group, so the trainer
calls them unconditionally.

Leaving cleanly (issue #14: a rank sometimes aborted after training with "terminate called
without an active exception", exit -6). The cause: the gloo group outlived
``destroy_process_group()`` (a hidden reference taken by the first ``torch._dynamo`` import, which
DDP does), so its worker threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) were still running when
the interpreter shut down; a worker that then released the last reference to a Python-created
tensor of a finished collective (an all-gather's) needed the GIL during finalisation, and the
thread was torn down inside a C++ destructor, which calls ``std::terminate``. Now
:func:`init_distributed` imports ``torch._dynamo`` before the group exists and :func:`cleanup`
destroys the group after the DDP wrappers are gone, so the group dies in ``cleanup`` and its
threads are joined there.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medsegdiff.errors import ConfigError
from medsegdiff.utils.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and join the group if needed.

    Idempotent: when a group already exists it is reused (and not destroyed by :func:`cleanup`).

    Raises:
        ConfigError: bad environment or an unavailable device.
    """
    world = _env_int("WORLD_SIZE", 1)
    _env_int("RANK", 0)  # validated here; the group reports the rank
    local = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(0, 1, 0, dev, False)
    owns = False
    if not dist.is_initialized():
        _import_dynamo_before_group()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, owns)


def _import_dynamo_before_group() -> None:
    """Import ``torch._dynamo`` now, before the process group exists (see the module docstring).

    ``DistributedDataParallel.__init__`` imports it on first use. When that first import happens
    while a group exists, the group is never freed (torch 2.13, measured): after
    ``destroy_process_group()`` gloo's worker threads (``pt_gloo_runloop`` x 2, ``gloo_tcp_loop``)
    are still running at interpreter exit, and a rank that finishes first is sometimes killed by
    ``terminate called without an active exception`` (exit -6). Imported first, the group dies
    in ``destroy_process_group()`` and its threads are joined.
    """
    import torch._dynamo  # noqa: F401 - delayed: a heavy import needed only by multi-process runs


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it, joining its threads.

    Call it after dropping every ``DistributedDataParallel`` wrapper and data-loader iterator (the
    trainer does). Order matters (torch 2.13, seen in a hung rank's stacks): the group's gloo worker
    threads release the tensors of finished collectives lazily, and releasing a tensor that Python
    created takes the GIL. ``destroy_process_group()`` drops the group without holding the GIL, so
    its destructor can join those threads; a DDP reducer freed *after* it would be the group's last
    owner and destroy it while holding the GIL, and join a thread that waits for the GIL: a
    deadlock. Hence the collection here, while the group is still alive: it frees wrappers that
    are only held by reference cycles.
    """
    if ctx.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_max_flag(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (agreement without hangs)."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_max_flags(ctx: DistContext, flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a bool tensor over ranks (unchanged without a group)."""
    if not ctx.distributed:
        return flags
    t = flags.to(device=ctx.device, dtype=torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t > 0


def all_reduce_mean(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Mean of scalar logs across ranks (same keys on every rank)."""
    if not ctx.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= ctx.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: nn.Module, ctx: DistContext) -> DistributedDataParallel:
    """``module`` under DDP on this rank's device (unused parameters allowed, buffers not broadcast)."""
    return DistributedDataParallel(
        module,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=True,
        broadcast_buffers=False,
    )


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Per-rank micro-batch: global ``batch_size / world_size / grad_accum``.

    Raises:
        ConfigError: when the global batch does not split evenly.
    """
    denom = world_size * grad_accum
    if batch_size % denom:
        raise ConfigError(
            f"config key 'train.batch_size': got {batch_size}; it is the GLOBAL batch and must be divisible by "
            f"world_size x train.grad_accum = {world_size} x {grad_accum} = {denom}; change batch_size or grad_accum"
        )
    return batch_size // denom
