"""Batched ensemble sampling of lesion probabilities with the registered samplers.

The samplers are plain functions of :mod:`improved_diffusion.solvers` (DDIM with eta, ancestral
DDPM, DPM-Solver++ 2M / 3M, a one-step x0 sampler) registered by name in :data:`SAMPLERS`
(``inference.sampler``, also used by validation during training). The ensemble batching below is
a wrapper around whichever sampler is chosen, not an option inside it.

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
  member-by-member / slice-by-slice loop produce the same numbers.

The probability of lesion is ``(x0_hat + 1) / 2`` clamped to [0, 1] (masks live in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from improved_diffusion import solvers
from medsegdiff.diffusion.self_condition import concat_self_cond
from medsegdiff.nets.blocks import repeat_features
from medsegdiff.utils.runtime import autocast, resolve_precision


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: the core function and which options it takes.

    Attributes:
        fn: ``fn(model, x, timesteps, extra_args=None, callback=None, disable=None, **options)``
            from :mod:`improved_diffusion.solvers`.
        uses_eta: takes ``eta`` (DDIM); its noise is drawn only when ``eta > 0``.
        stochastic: always draws per-step noise (ancestral DDPM).
        one_call: makes one network call whatever the respacing (the one-step x0 sampler).
    """

    fn: Callable[..., Tensor]
    uses_eta: bool = False
    stochastic: bool = False
    one_call: bool = False

    def draws_noise(self, eta: float) -> bool:
        """Whether sampling adds noise after the steps (needs a noise sampler)."""
        return self.stochastic or (self.uses_eta and eta > 0.0)

    def nfe(self, diffusion: Any) -> int:
        """Network calls per member on ``diffusion`` (its number of respaced steps, or 1)."""
        return 1 if self.one_call else int(diffusion.num_timesteps)


#: The sampler registry (``inference.sampler``; ``train.validation`` samples with the same one).
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(solvers.sample_ddim, uses_eta=True),
    "ddpm": SamplerSpec(solvers.sample_ddpm, stochastic=True),
    "dpmpp_2m": SamplerSpec(solvers.sample_dpmpp_2m),
    "dpmpp_3m": SamplerSpec(solvers.sample_dpmpp_3m),
    "x0": SamplerSpec(solvers.sample_x0, one_call=True),
}


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    spec = SAMPLERS.get(name)
    if spec is None:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return spec


def sampler_name(cfg: Any) -> str:
    """The sampler of an experiment config: ``inference.sampler``, or ``diffusion.sampler`` when empty."""
    return cfg.inference.sampler or cfg.diffusion.sampler


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
        key: 0 for the initial ``x_T``, ``k + 1`` for the noise added at respaced index ``k``.
        shape: ``(N, 1, *S)`` for the whole volume (callers slice the rows they need).
        device: where the noise is drawn.

    Returns:
        ``Tensor[N, 1, *S]`` float32, identical whatever the batching.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_for(base_seed, member, key))
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def _make_model_fn(model: torch.nn.Module, device: torch.device, precision: str,
                   self_condition: bool) -> Callable[..., Tensor]:
    """The network as the core calls it; self-conditioned networks get ``concat_self_cond(x, x0_prev)``."""

    def model_fn(x: Tensor, ts: Tensor, x0_prev: Tensor | None = None, **kwargs: Any) -> Tensor:
        if self_condition:
            x = concat_self_cond(x, x0_prev)
        with autocast(device, precision):
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


@dataclass
class _Run:
    """What every path of one sampling call shares (the sampler, its options, the volume's noise)."""

    spec: SamplerSpec
    denoiser: solvers.Denoiser
    timesteps: list[int]
    eta: float
    base_seed: int
    vol_shape: tuple[int, ...]
    x_T: Tensor

    def sample(self, x: Tensor, extra_args: dict[str, Any], members: Sequence[int], rows: slice,
               callback: Callable[[dict[str, Any]], None] | None) -> Tensor:
        """Run the sampler on ``x`` (slice-major rows: slice i, member m at ``i * len(members) + m``)."""
        opts: dict[str, Any] = {}
        if self.spec.uses_eta:
            opts["eta"] = self.eta
        if self.spec.draws_noise(self.eta):
            device, spatial = x.device, x.shape[2:]

            def noise_sampler(k: int) -> Tensor:
                z = torch.stack([member_noise(self.base_seed, m, k + 1, self.vol_shape, device)[rows] for m in members])
                return z.transpose(0, 1).reshape(x.shape[0], 1, *spatial)

            opts["noise_sampler"] = noise_sampler
        return self.spec.fn(self.denoiser, x, self.timesteps, extra_args=extra_args, callback=callback,
                            disable=True, **opts)


def sample_probabilities(
    model: torch.nn.Module,
    diffusion: Any,
    images: Tensor,
    *,
    members: int = 1,
    sampler: str = "ddim",
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

    The batched ensemble path: a wrapper that runs the registered sampler (:data:`SAMPLERS`) on
    chunks of (slice, member) pairs with the image encoded once per chunk. ``naive=True`` runs
    the slow reference path instead (:func:`sample_reference`, same numbers).

    Args:
        model: a MedSegDiff network (``encode_image`` + ``forward(x_t, t, image_features=...)``)
            or the discriminative baseline (``is_diffusion = False``: ``sigmoid(model(image))``,
            one member). A network with ``self_condition = True`` is fed the previous step's
            ``x0`` through :func:`~medsegdiff.diffusion.self_condition.concat_self_cond`.
        diffusion: the (respaced) ``SpacedDiffusion`` that defines the reverse steps; its
            ``num_timesteps`` is the number of network calls per member (1 for ``"x0"``).
        images: ``(N, C_in, *S)`` conditioning images (``S = (H, W)`` or ``(D, H, W)``), on the
            model's device.
        members: ensemble size.
        sampler: a :data:`SAMPLERS` name: ``"ddim"`` (``eta`` controls the noise), ``"ddpm"``
            (ancestral), ``"dpmpp_2m"`` / ``"dpmpp_3m"`` (DPM-Solver++), ``"x0"`` (one step).
        eta: DDIM eta; 0 = deterministic given ``x_T``.
        batch_size: most (slice, member) pairs per network call (the memory budget).
        generator: source of the base seed (global RNG when None).
        noise: optional ``x_T`` of shape ``(members, N, 1, *S)`` (or ``(members, N, *S)``).
        progress: show a tqdm bar over the steps.
        precision: ``"fp32"``, ``"bf16"`` (autocast around the network only; the diffusion
            arithmetic stays fp32) or ``"auto"`` (:func:`~medsegdiff.utils.runtime.resolve_precision`).
        clip_denoised: clamp the predicted ``x0`` to [-1, 1] at every step.
        naive: the slow reference path (one slice and one member at a time, the image
            re-encoded at every step via ``forward(image=...)``); for tests and
            ``medsegdiff bench sample``.
        desc: label of the progress bar (e.g. the case id).

    Returns:
        ``Tensor[members, N, *S]`` float32 probabilities ``(x0 + 1) / 2`` in [0, 1]
        (``members = 1`` for the discriminative baseline).

    Raises:
        ValueError: unknown ``sampler``, bad ``members``/``batch_size``/``noise`` shape
            (programming errors).
        ConfigError: a ``precision`` other than auto/fp32/bf16.
    """
    spec = get_sampler(sampler)
    if members < 1 or batch_size < 1:
        raise ValueError(f"members and batch_size must be >= 1, got {members}, {batch_size}")
    device = images.device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            images = images.float()
            if not model.is_diffusion:
                return _discriminative(model, images, batch_size, device, precision)
            n, spatial = images.shape[0], tuple(images.shape[2:])
            vol_shape = (n, 1, *spatial)
            base_seed = _draw_base_seed(generator)
            self_cond = bool(model.self_condition)  # model contract (nets.registry sets it)
            model_fn = _make_model_fn(model, device, precision, self_cond)
            run = _Run(
                spec=spec,
                denoiser=solvers.Denoiser(diffusion, model_fn, clip_denoised=clip_denoised, self_condition=self_cond),
                timesteps=solvers.chain_timesteps(diffusion), eta=float(eta), base_seed=base_seed,
                vol_shape=vol_shape, x_T=_initial_noise(noise, base_seed, members, vol_shape, device),
            )
            if naive:
                return sample_reference(model, run, images, members, progress, desc)
            return _sample_batched(model, run, images, members, batch_size, precision, progress, desc)
    finally:
        model.train(was_training)


def _discriminative(
    model: torch.nn.Module, images: Tensor, batch_size: int, device: torch.device, precision: str
) -> Tensor:
    outs = []
    for s0 in range(0, images.shape[0], batch_size):
        with autocast(device, precision):
            logits = model(images[s0 : s0 + batch_size])
        if isinstance(logits, (list, tuple)):  # deep supervision: first head is full resolution
            logits = logits[0]
        outs.append(torch.sigmoid(logits.float())[:, 0])
    return torch.cat(outs).unsqueeze(0)


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _to_prob(x: Tensor) -> Tensor:
    return ((x + 1.0) * 0.5).clamp_(0.0, 1.0)


def _sample_batched(
    model: torch.nn.Module, run: _Run, images: Tensor, members: int, batch_size: int, precision: str,
    progress: bool, desc: str,
) -> Tensor:
    """Chunks of (slice, member) pairs, each chunk's images encoded once and repeated member-wise."""
    n, spatial = images.shape[0], tuple(images.shape[2:])
    out = torch.empty((members, n, *spatial), device=images.device, dtype=torch.float32)
    slices_per_chunk = max(1, batch_size // members)
    members_per_chunk = min(members, batch_size)
    chunks = [
        (s0, min(n, s0 + slices_per_chunk), m0, min(members, m0 + members_per_chunk))
        for s0 in range(0, n, slices_per_chunk)
        for m0 in range(0, members, members_per_chunk)
    ]
    bar = _bar(progress, len(chunks) * run.spec.nfe(run.denoiser.diffusion), desc)
    callback = (lambda _info: bar.update(1)) if bar is not None else None
    feats, feats_for = None, None
    for s0, s1, m0, m1 in chunks:
        ns, nm = s1 - s0, m1 - m0
        if feats_for != (s0, s1):  # encode each slice once, reuse for all steps and members
            with autocast(images.device, precision):
                feats = list(model.encode_image(images[s0:s1]))
            feats_for = (s0, s1)
        extra = {"image_features": repeat_features(feats, nm)}
        # Batch order is slice-major (slice i member m at i * nm + m), matching repeat_interleave.
        x = run.x_T[m0:m1, s0:s1].transpose(0, 1).reshape(ns * nm, 1, *spatial)
        x = run.sample(x, extra, range(m0, m1), slice(s0, s1), callback)
        out[m0:m1, s0:s1] = _to_prob(x.float()).reshape(ns, nm, *spatial).transpose(0, 1)
    if bar is not None:
        bar.close()
    return out


def sample_reference(
    model: torch.nn.Module, run: _Run, images: Tensor, members: int, progress: bool, desc: str
) -> Tensor:
    """The slow reference path (the official code's way): one slice and one member at a time.

    The image is re-encoded inside ``forward(image=...)`` at every step; the sampler, ``x_T`` and
    the counter-based noise are the batched path's, so the numbers are the same (test oracle).

    Returns:
        ``Tensor[members, N, *S]`` probabilities.
    """
    n, spatial = images.shape[0], tuple(images.shape[2:])
    out = torch.empty((members, n, *spatial), device=images.device, dtype=torch.float32)
    bar = _bar(progress, members * n * run.spec.nfe(run.denoiser.diffusion), f"{desc} (naive)")
    callback = (lambda _info: bar.update(1)) if bar is not None else None
    for m in range(members):
        for i in range(n):
            x = run.sample(run.x_T[m, i : i + 1], {"image": images[i : i + 1]}, [m], slice(i, i + 1), callback)
            out[m, i] = _to_prob(x[0, 0].float())
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


__all__ = [
    "SAMPLERS",
    "NaiveSampler",
    "SamplerSpec",
    "get_sampler",
    "member_noise",
    "sample_probabilities",
    "sample_reference",
    "sampler_name",
]
