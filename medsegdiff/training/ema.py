"""Exponential moving average of model weights (``torch._foreach_lerp_``, one fused call per step).

``ema = rate * ema + (1 - rate) * param``, i.e. ``lerp_(ema, param, 1 - rate)``. Buffers (e.g.
normalisation statistics) are copied. The EMA weights are used for validation, best-checkpoint
selection and inference (upstream improved-diffusion keeps them but the researcher's own codebase
never used them).

Shared (aliased) tensors: a module registered under two names (MONAI's DynUNet keeps its encoder
both as ``input_block``/``downsamples`` and inside the recursive ``skip_layers``) has one
parameter under several ``state_dict`` keys. ``named_parameters()`` lists it once, so the shadow
holds one copy per *tensor*, and :meth:`EMA.state_dict` writes it under *every* key of
``model.state_dict()``, so the EMA weights load into the model with ``strict=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _alias_map(model: nn.Module, tensors: list[torch.Tensor]) -> dict[str, int]:
    """``{state_dict key: index into tensors}`` for every key whose tensor is one of ``tensors``."""
    index = {id(t): i for i, t in enumerate(tensors)}
    return {k: index[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in index}


class EMA:
    """EMA shadow of ``model``'s floating-point parameters and buffers.

    Args:
        model: the (unwrapped) network.
        rate: decay in [0, 1); 0 copies the weights each step.
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.rate = float(rate)
        params = list(model.parameters())  # each shared tensor once
        buffers = list(model.buffers())
        self.shadow = [p.detach().clone() for p in params]
        self.buffers = [b.detach().clone() for b in buffers]
        self.names = [n for n, _ in model.named_parameters()]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        # every state_dict key, aliases included, in model.state_dict() order
        self.param_keys = _alias_map(model, params)
        self.buffer_keys = _alias_map(model, buffers)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        floats = [(s, p) for s, p in zip(self.shadow, params) if s.is_floating_point()]
        if floats:
            torch._foreach_lerp_([s for s, _ in floats], [p for _, p in floats], 1.0 - self.rate)
        for s, b in zip(self.buffers, model.buffers()):
            s.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Same keys as ``model.state_dict()`` (aliased keys included): loadable straight into the model."""
        out = {k: self.shadow[i] for k, i in self.param_keys.items()}
        out.update({k: self.buffers[i] for k, i in self.buffer_keys.items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict` (only the first key of each shared tensor is needed).

        Raises:
            KeyError: a parameter or buffer of the model has no key in ``state``.
        """
        for n, s in zip(self.names, self.shadow):
            s.copy_(state[n])
        for n, s in zip(self.buffer_names, self.buffers):
            s.copy_(state[n])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s)
        for s, b in zip(self.buffers, model.buffers()):
            b.copy_(s)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (restored on exit)."""
        backup = [p.detach().clone() for p in model.parameters()]
        backup_b = [b.detach().clone() for b in model.buffers()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for b, p in zip(backup, model.parameters()):
                    p.copy_(b)
                for b, s in zip(backup_b, model.buffers()):
                    s.copy_(b)
