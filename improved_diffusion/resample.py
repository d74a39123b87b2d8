"""Timestep samplers for training (importance sampling of the variational bound).

Provenance: API of ``improved_diffusion/resample.py`` in ``openai/improved-diffusion@1bc7bbb``
(MIT, Copyright (c) 2021 OpenAI; see ``improved_diffusion/LICENSE``). Written anew from iDDPM
Sec. 3.3 (arXiv:2102.09672): ``p_t ∝ sqrt(E[L_t^2])`` with a small uniform floor.

Local changes: plain ``int`` instead of ``np.int``; no MPI: losses are all-gathered only when a
``torch.distributed`` process group with more than one rank exists; an optional
``numpy.random.Generator`` may be passed to :meth:`ScheduleSampler.sample`;
``LossSecondMomentResampler`` has ``state_dict``/``load_state_dict`` for checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "ScheduleSampler",
    "UniformSampler",
    "create_named_schedule_sampler",
]


def create_named_schedule_sampler(name: str, diffusion: Any) -> ScheduleSampler:
    """Build a sampler by name: ``"uniform"`` or ``"loss-second-moment"``.

    Raises:
        NotImplementedError: unknown name.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name!r} (expected 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """A distribution over timesteps, with importance weights that keep the objective unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, one per diffusion step, ``(T,)``."""

    def sample(
        self, batch_size: int, device: torch.device | str, generator: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw timesteps ``t ~ p`` and their weights ``1 / (T p_t)``.

        Args:
            batch_size: number of timesteps.
            device: where the returned tensors live.
            generator: numpy generator (default: numpy's global RNG, as upstream).

        Returns:
            ``(indices (B,) long, weights (B,) float32)``.
        """
        w = self.weights()
        p = w / np.sum(w)
        rng = generator if generator is not None else np.random
        indices_np = rng.choice(len(p), size=(batch_size,), p=p)
        weights_np = 1.0 / (len(p) * p[indices_np])
        indices = torch.from_numpy(np.asarray(indices_np)).long().to(device)
        weights = torch.from_numpy(np.asarray(weights_np)).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Uniform over the ``num_timesteps`` of ``diffusion``."""

    def __init__(self, diffusion: Any) -> None:
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses observed so far."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this process's losses (gathered from all ranks when distributed).

        Args:
            local_ts: ``(B,)`` timesteps.
            local_losses: ``(B,)`` losses at those timesteps.
        """
        ts = local_ts.detach().reshape(-1)
        losses = local_losses.detach().reshape(-1).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            n = torch.tensor([ts.numel()], device=ts.device)
            sizes = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(sizes, n)
            max_n = int(max(s.item() for s in sizes))
            pad_ts = torch.zeros(max_n, dtype=ts.dtype, device=ts.device)
            pad_losses = torch.zeros(max_n, dtype=losses.dtype, device=losses.device)
            pad_ts[: ts.numel()] = ts
            pad_losses[: losses.numel()] = losses
            all_ts = [torch.zeros_like(pad_ts) for _ in range(world)]
            all_losses = [torch.zeros_like(pad_losses) for _ in range(world)]
            dist.all_gather(all_ts, pad_ts)
            dist.all_gather(all_losses, pad_losses)
            ts_list = [int(x) for s, y in zip(sizes, all_ts) for x in y[: int(s.item())].tolist()]
            loss_list = [float(x) for s, y in zip(sizes, all_losses) for x in y[: int(s.item())].tolist()]
        else:
            ts_list = [int(x) for x in ts.tolist()]
            loss_list = [float(x) for x in losses.tolist()]
        self.update_with_all_losses(ts_list, loss_list)

    @abstractmethod
    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Record losses from every process (identical on all ranks)."""


class LossSecondMomentResampler(LossAwareSampler):
    """``p_t ∝ sqrt(E[L_t^2])`` over the last ``history_per_term`` losses, plus a uniform floor.

    Uniform until every step has a full history (iDDPM Sec. 3.3).
    """

    def __init__(self, diffusion: Any, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        self.diffusion = diffusion
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._loss_history = np.zeros([diffusion.num_timesteps, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=int)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict[str, Any]:
        """Loss history as CPU tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.astype(np.int64)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors or arrays).

        Raises:
            ValueError: the history was saved for a different number of steps or history length.
        """

        def as_numpy(v: Any) -> np.ndarray:
            return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)

        history = as_numpy(state["loss_history"]).astype(np.float64)
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"loss history shape {history.shape} does not match this sampler {self._loss_history.shape}"
            )
        self._loss_history = history.copy()
        self._loss_counts = as_numpy(state["loss_counts"]).astype(int).copy()
