"""Device selection, seeding and mixed-precision helpers."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from medsegdiff.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = the local CUDA device (``LOCAL_RANK`` under torchrun) if present, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device': got {name!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': got {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device, key: str = "inference.precision") -> str:
    """The one place where ``"auto"`` precision is decided: bf16 on CUDA, fp32 elsewhere.

    Args:
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        device: where the network runs.
        key: the config key named in the error message.

    Returns:
        ``"fp32"`` or ``"bf16"``.

    Raises:
        ConfigError: any other value.
    """
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"config key '{key}': got {precision!r}; allowed: auto, fp32, bf16")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` in {fp32, bf16, fp16} (fp16 only on CUDA)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'train.precision': got 'fp16'; fp16 needs a CUDA device, use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
