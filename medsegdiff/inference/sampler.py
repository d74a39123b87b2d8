"""Batched ensemble sampling of lesion probabilities (DDIM / ancestral DDPM).

The official MedSegDiff sampler runs one image and one ensemble member at a time, re-encodes the
image at every one of its 1000 steps and saves each member as a JPEG. Here:

* the diffusion object passed in is already respaced (``build_diffusion(cfg.diffusion,
  "ddim250")``), so DDIM-250 costs 250 network calls and the network still sees original-scale
  timesteps (iDDPM, Nichol & Dhariwal 2021, arXiv:2102.09672, section 4; DDIM, Song et al. 2021,
  arXiv:2010.02502, eq. 12);
* all slices of a volume and all ensemble members go through the network together, up to
  ``batch_size`` (slice, member) pairs per call;
* the image encoder runs once per slice (:meth:`model.encode_image`) and its features are repeated
  member-wise (:func:`medsegdiff.nets.blocks.repeat_features`) for every step and every member;
* the step loop has no host synchronisation (no ``.item()``/``.cpu()``): per-step coefficients
  are Python floats computed before the loop;
* noise is counter-based: the noise of member ``m`` at step ``k`` is drawn from a generator seeded
  by ``(base_seed, m, k)`` over the whole volume, so batching, chunking and the naive
  member-by-member / slice-by-slice loop produce the same numbers;
* a self-conditioned network (``model.self_condition``; Chen et al. 2022, arXiv:2208.04202,
  Algorithm 2) gets the previous step's ``x0`` estimate (zeros at the first step) through
  :func:`medsegdiff.diffusion.self_condition.concat_self_cond`.

The probability of lesion is ``(x0_hat + 1) / 2`` clamped to [0, 1] (masks live in [-1, 1]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from medsegdiff.diffusion.self_condition import concat_self_cond

SamplerName = Literal["ddim", "ddpm"]


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _seed_for(base_seed: int, member: int, key: int) -> int:
    """A 63-bit seed for (base_seed, member, key); ``key`` 0 = initial noise, k + 1 = step k."""
    state = np.random.SeedSequence([base_seed, member, key]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def member_noise(
    base_seed: int, member: int, key: int, shape: Sequence[int], device: torch.device
) -> Tensor:
    """Standard normal noise of one ensemble member for the whole volume.

    Args:
        base_seed: seed of this sampling call (drawn once from the caller's generator).
        member: ensemble member index.
        key: 0 for the initial ``x_T``, ``k + 1`` for the noise added at loop index ``k``.
        shape: ``(N, 1, *S)`` for the whole volume (callers slice the rows they need).
        device: where the noise is drawn.

    Returns:
        ``Tensor[N, 1, *S]`` float32, identical whatever the batching.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_for(base_seed, member, key))
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


class _StepTables:
    """How many reverse steps the (respaced) diffusion has, and whether they draw noise."""

    def __init__(self, diffusion: Any, sampler: str, eta: float) -> None:
        self.num_steps = int(diffusion.num_timesteps)
        self.stochastic = sampler == "ddpm" or eta > 0.0
        self.eta = float(eta)


def _step(
    diffusion: Any,
    model_fn: Callable[..., Tensor],
    tables: _StepTables,
    sampler: str,
    x: Tensor,
    k: int,
    model_kwargs: dict[str, Any],
    clip_denoised: bool,
    noise: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One reverse step ``x_k -> x_{k-1}`` (respaced index ``k``) for a batch ``x`` ``(B, 1, *S)``.

    Returns:
        ``(x_{k-1}, x0 estimate)``, both float32 ``(B, 1, *S)``.
    """
    t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
    # The step itself is the core's (improved_diffusion): ancestral p_sample (Ho et al. 2020,
    # Algorithm 2) or ddim_sample (Song et al. 2021, eq. 12, eps re-derived from the clipped x0).
    # Counter-based noise is passed in explicitly; zeros where no noise is added (t = 0 or eta = 0).
    z = noise if noise is not None else torch.zeros_like(x)
    if sampler == "ddpm":
        out = diffusion.p_sample(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, noise=z)
    else:
        out = diffusion.ddim_sample(
            model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=tables.eta, noise=z
        )
    return out["sample"].float(), out["pred_xstart"].float()


def _make_model_fn(model: torch.nn.Module, device: torch.device, precision: str) -> Callable[..., Tensor]:
    self_condition = bool(getattr(model, "self_condition", False))

    def model_fn(x: Tensor, ts: Tensor, x0_prev: Tensor | None = None, **kwargs: Any) -> Tensor:
        if self_condition:
            x = concat_self_cond(x, x0_prev)
        with _autocast(device, precision):
            out = model(x, ts, **kwargs)
        return out.float()

    return model_fn


def _initial_noise(
    noise: Tensor | None, base_seed: int, members: int, shape: tuple[int, ...], device: torch.device
) -> Tensor:
    """``x_T`` as ``Tensor[members, N, 1, *S]``."""
    if noise is not None:
        if noise.dim() == len(shape):  # (members, N, *S) without the channel
            noise = noise.unsqueeze(2)
        if tuple(noise.shape) != (members, *shape):
            raise ValueError(f"noise must have shape {(members, *shape)}, got {tuple(noise.shape)}")
        return noise.to(device=device, dtype=torch.float32)
    return torch.stack([member_noise(base_seed, m, 0, shape, device) for m in range(members)])


def _draw_base_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def sample_probabilities(
    model: torch.nn.Module,
    diffusion: Any,
    images: Tensor,
    *,
    members: int = 1,
    sampler: SamplerName = "ddim",
    eta: float = 0.0,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
    precision: str = "fp32",
    clip_denoised: bool = True,
    naive: bool = False,
    desc: str = "sampling",
) -> Tensor:
    """Sample ``members`` lesion-probability maps for every image (slice) of a volume.

    Args:
        model: a MedSegDiff network (``encode_image`` + ``forward(x_t, t, image_features=...)``)
            or the discriminative baseline (``is_diffusion = False``: ``sigmoid(model(image))``,
            one member).
        diffusion: the (respaced) ``SpacedDiffusion`` that defines the reverse steps; its
            ``num_timesteps`` is the number of network calls per member.
        images: ``(N, C_in, *S)`` conditioning images (``S = (H, W)`` or ``(D, H, W)``), on the
            model's device.
        members: ensemble size.
        sampler: ``"ddim"`` (``eta`` controls the noise) or ``"ddpm"`` (ancestral sampling of the
            respaced chain, Ho et al. 2020 Algorithm 2).
        eta: DDIM eta; 0 = deterministic given ``x_T``.
        batch_size: most (slice, member) pairs per network call (the memory budget).
        generator: source of the base seed (global RNG when None).
        noise: optional ``x_T`` of shape ``(members, N, 1, *S)`` (or ``(members, N, *S)``).
        progress: show a tqdm bar over the steps.
        precision: ``"fp32"``, ``"bf16"`` (autocast around the network only; the diffusion
            arithmetic stays fp32) or ``"auto"`` (bf16 on CUDA).
        clip_denoised: clamp the predicted ``x0`` to [-1, 1] at every step.
        naive: the slow reference path (one slice and one member at a time, the image
            re-encoded at every step via ``forward(image=...)``); same numbers, for tests and
            ``medsegdiff bench sample``.
        desc: label of the progress bar (e.g. the case id).

    Returns:
        ``Tensor[members, N, *S]`` float32 probabilities in [0, 1] (``members = 1`` for the
        discriminative baseline).

    Raises:
        ValueError: bad ``sampler``/``members``/``batch_size``/``noise`` shape (programming errors).
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if members < 1 or batch_size < 1:
        raise ValueError(f"members and batch_size must be >= 1, got {members}, {batch_size}")
    device = images.device
    precision = _resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            images = images.float()
            if not getattr(model, "is_diffusion", True):
                return _discriminative(model, images, batch_size, device, precision)
            base_seed = _draw_base_seed(generator)
            if naive:
                return _sample_naive(model, diffusion, images, members, sampler, eta, base_seed,
                                     noise, progress, precision, clip_denoised, desc)
            return _sample_fast(model, diffusion, images, members, sampler, eta, batch_size, base_seed,
                                noise, progress, precision, clip_denoised, desc)
    finally:
        model.train(was_training)


def _discriminative(
    model: torch.nn.Module, images: Tensor, batch_size: int, device: torch.device, precision: str
) -> Tensor:
    outs = []
    for s0 in range(0, images.shape[0], batch_size):
        with _autocast(device, precision):
            logits = model(images[s0 : s0 + batch_size])
        if isinstance(logits, (list, tuple)):  # deep supervision: first head is full resolution
            logits = logits[0]
        outs.append(torch.sigmoid(logits.float())[:, 0])
    return torch.cat(outs).unsqueeze(0)


def _sample_fast(
    model: torch.nn.Module,
    diffusion: Any,
    images: Tensor,
    members: int,
    sampler: str,
    eta: float,
    batch_size: int,
    base_seed: int,
    noise: Tensor | None,
    progress: bool,
    precision: str,
    clip_denoised: bool,
    desc: str,
) -> Tensor:
    from medsegdiff.nets.blocks import repeat_features

    device = images.device
    n, spatial = images.shape[0], tuple(images.shape[2:])
    vol_shape = (n, 1, *spatial)
    tables = _StepTables(diffusion, sampler, eta)
    model_fn = _make_model_fn(model, device, precision)
    x_T = _initial_noise(noise, base_seed, members, vol_shape, device)
    out = torch.empty((members, n, *spatial), device=device, dtype=torch.float32)

    slices_per_chunk = max(1, batch_size // members)
    members_per_chunk = min(members, batch_size)
    chunks = [
        (s0, min(n, s0 + slices_per_chunk), m0, min(members, m0 + members_per_chunk))
        for s0 in range(0, n, slices_per_chunk)
        for m0 in range(0, members, members_per_chunk)
    ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * tables.num_steps, desc=desc, unit="step", leave=False)
    feats, feats_for = None, None
    for s0, s1, m0, m1 in chunks:
        ns, nm = s1 - s0, m1 - m0
        if feats_for != (s0, s1):  # encode each slice once, reuse for all steps and members
            with _autocast(device, precision):
                feats = list(model.encode_image(images[s0:s1]))
            feats_for = (s0, s1)
        kwargs = {"image_features": repeat_features(feats, nm)}
        # Batch order is slice-major (slice i member m at i * nm + m), matching repeat_interleave.
        x = x_T[m0:m1, s0:s1].transpose(0, 1).reshape(ns * nm, 1, *spatial)
        kwargs.pop("x0_prev", None)
        for k in reversed(range(tables.num_steps)):
            z = None
            if tables.stochastic and k > 0:
                z = torch.stack(
                    [member_noise(base_seed, m, k + 1, vol_shape, device)[s0:s1] for m in range(m0, m1)]
                ).transpose(0, 1).reshape(ns * nm, 1, *spatial)
            x, kwargs["x0_prev"] = _step(diffusion, model_fn, tables, sampler, x, k, kwargs, clip_denoised, z)
            if bar is not None:
                bar.update(1)
        prob = ((x + 1.0) * 0.5).clamp_(0.0, 1.0).reshape(ns, nm, *spatial).transpose(0, 1)
        out[m0:m1, s0:s1] = prob
    if bar is not None:
        bar.close()
    return out


def _sample_naive(
    model: torch.nn.Module,
    diffusion: Any,
    images: Tensor,
    members: int,
    sampler: str,
    eta: float,
    base_seed: int,
    noise: Tensor | None,
    progress: bool,
    precision: str,
    clip_denoised: bool,
    desc: str,
) -> Tensor:
    device = images.device
    n, spatial = images.shape[0], tuple(images.shape[2:])
    vol_shape = (n, 1, *spatial)
    tables = _StepTables(diffusion, sampler, eta)
    model_fn = _make_model_fn(model, device, precision)
    x_T = _initial_noise(noise, base_seed, members, vol_shape, device)
    out = torch.empty((members, n, *spatial), device=device, dtype=torch.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=members * n * tables.num_steps, desc=f"{desc} (naive)", unit="step", leave=False)
    for m in range(members):
        for i in range(n):
            kwargs = {"image": images[i : i + 1]}  # re-encoded inside forward at every step
            x = x_T[m, i : i + 1]
            for k in reversed(range(tables.num_steps)):
                z = None
                if tables.stochastic and k > 0:
                    z = member_noise(base_seed, m, k + 1, vol_shape, device)[i : i + 1]
                x, kwargs["x0_prev"] = _step(diffusion, model_fn, tables, sampler, x, k, kwargs, clip_denoised, z)
                if bar is not None:
                    bar.update(1)
            out[m, i] = ((x[0, 0] + 1.0) * 0.5).clamp(0.0, 1.0)
    if bar is not None:
        bar.close()
    return out


class NaiveSampler:
    """The official-code way, kept as a reference: ``sample_probabilities(..., naive=True)``."""

    def __init__(self, model: torch.nn.Module, diffusion: Any, **kwargs: Any) -> None:
        self.model, self.diffusion, self.kwargs = model, diffusion, kwargs

    def __call__(self, images: Tensor, *, members: int = 1, **kwargs: Any) -> Tensor:
        """``Tensor[members, N, *S]``, see :func:`sample_probabilities`."""
        return sample_probabilities(
            self.model, self.diffusion, images, members=members, naive=True, **{**self.kwargs, **kwargs}
        )


__all__ = ["NaiveSampler", "member_noise", "sample_probabilities"]
