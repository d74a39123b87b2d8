"""Tiny V1, V2 and the baseline overfit a handful of synthetic image -> mask slices on the CPU.

The problem: 8 slices of 16 x 16, two channels; channel 0 shows a disc (the lesion) in noise,
channel 1 is pure noise; the mask is the disc. The diffusion models train the epsilon-MSE objective
of :mod:`improved_diffusion` (linear schedule, T = 1000, full-schedule timesteps drawn from a fixed
set) and the V2 anchor head with BCE; the baseline trains BCE + soft Dice on its logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from improved_diffusion.script_util import create_gaussian_diffusion
from medsegdiff.nets.registry import build_model


def _problem(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs, masks = [], []
    for _ in range(n):
        cy, cx = torch.randint(3, size - 3, (2,), generator=g)
        r = 2 + 3 * torch.rand((), generator=g)
        m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
        imgs.append(torch.stack([2 * m - 1 + 0.3 * torch.randn(size, size, generator=g),
                                 torch.randn(size, size, generator=g)]))
        masks.append(m[None])
    return torch.stack(imgs), torch.stack(masks)


def _train_diffusion(name, h, steps=60, size=16):
    img, mask = _problem(size=size)
    x0 = 2 * mask - 1
    torch.manual_seed(0)
    model = build_model(h.tiny_config(name, "data.modalities=[cbf,tmax]", size=size))
    diffusion = create_gaussian_diffusion(steps=1000)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ts = torch.tensor([50, 150, 300, 500])
    mse, anchor_bce = [], []
    for _ in range(steps):
        t = ts[torch.randint(0, len(ts), (len(img),))]
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise=noise)
        eps, anchor = model(x_t, t, image=img, return_anchor=True)
        loss = F.mse_loss(eps, noise)
        mse.append(loss.item())
        if anchor is not None:
            bce = F.binary_cross_entropy_with_logits(anchor, mask)
            anchor_bce.append(bce.item())
            loss = loss + bce
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mse, anchor_bce, _dice_at_t300(model.eval(), diffusion, img, mask), model


def _dice_at_t300(model, diffusion, img, mask):
    """Dice of the clean mask recovered from the predicted noise at t = 300."""
    x0 = 2 * mask - 1
    with torch.no_grad():
        t = torch.full((len(img),), 300)
        x_t = diffusion.q_sample(x0, t)
        x0_hat = diffusion._predict_xstart_from_eps(x_t, t, model(x_t, t, image=img))
    pred = (x0_hat > 0).float()
    return (2 * (pred * mask).sum() / (pred.sum() + mask.sum())).item()


def _mean(xs):
    return sum(xs) / len(xs)


def test_v1_learns_and_the_trained_model_runs_at_twice_its_size(h):
    mse, _, dice, model = _train_diffusion("medsegdiff_v1", h)
    assert _mean(mse[-10:]) < _mean(mse[:5]) / 3, (mse[:5], mse[-10:])
    assert dice > 0.8
    # built and trained at 16 px, the same weights denoise new 32 px cases (FF-Parser weights are a
    # function of normalised frequency); the slow test below does 32 -> 64 px with a full sampling loop
    img, mask = _problem(n=4, size=32, seed=1)
    assert _dice_at_t300(model, create_gaussian_diffusion(steps=1000), img, mask) > 0.8


def test_v2_learns_with_anchor(h):
    mse, bce, dice, _ = _train_diffusion("medsegdiff_v2", h)
    assert _mean(mse[-10:]) < _mean(mse[:5]) / 3, (mse[:5], mse[-10:])
    assert _mean(bce[-10:]) < _mean(bce[:5]) / 3, (bce[:5], bce[-10:])
    assert dice > 0.8


@pytest.mark.slow  # ~1-2 CPU minutes; the default run checks 16 -> 32 px in test_v1_learns_...
def test_v1_trained_at_32_px_samples_at_64_px(h):
    _, _, dice32, model = _train_diffusion("medsegdiff_v1", h, size=32)
    assert dice32 > 0.8
    img, mask = _problem(n=4, size=64, seed=1)  # new cases, twice the size the model was built for
    # the denoiser transfers: the clean mask recovered at t = 300 still matches the lesions
    dice64 = _dice_at_t300(model, create_gaussian_diffusion(steps=1000), img, mask)
    assert dice64 > 0.8, (dice32, dice64)
    # and the full reverse process runs at 64 px (DDIM-10 through the core's sampling loop)
    torch.manual_seed(0)
    with torch.no_grad():
        x0 = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim10").ddim_sample_loop(
            model, (4, 1, 64, 64), model_kwargs={"image": img}
        )
    assert x0.shape == (4, 1, 64, 64) and torch.isfinite(x0).all()


def test_baseline_learns(h):
    img, mask = _problem()
    torch.manual_seed(0)
    model = build_model(h.tiny_config("dynunet", "data.modalities=[cbf,tmax]"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(img)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, mask) + dice
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _mean(losses[-5:]) < _mean(losses[:3]) / 3, (losses[:3], losses[-5:])
