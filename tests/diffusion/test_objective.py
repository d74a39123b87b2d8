"""SegmentationObjective: terms, gradients, anchor, determinism, oracle Dice, baseline path."""

from __future__ import annotations

import math

import pytest
import torch

from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.diffusion.objective import SELF_COND_PROB, ObjectiveOutput, SegmentationObjective
from medsegdiff.errors import ConfigError


def setup(stubs, **sections):
    sections.setdefault("diffusion", {"steps": 100})
    cfg = stubs["cfg"](**sections)
    diffusion = build_diffusion(cfg.diffusion, "")
    return cfg, diffusion, SegmentationObjective(cfg, diffusion)


@pytest.mark.parametrize(
    "diff",
    [
        {"steps": 100},
        {"steps": 100, "learn_sigma": True, "rescale_learned_sigmas": True},
        {"steps": 100, "predict_xstart": True},
        {"steps": 100, "use_kl": True, "learn_sigma": True},
        {"steps": 50, "noise_schedule": "cosine", "schedule_sampler": "loss-second-moment"},
    ],
)
def test_loss_finite_and_backpropagates(stubs, diff):
    torch.manual_seed(0)
    cfg, diffusion, obj = setup(stubs, diffusion=diff)
    model = stubs["diffusion"](out_ch=2 if diff.get("learn_sigma") else 1)
    out = obj(model, stubs["batch"](), step=0)
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.net.weight.grad is not None and model.net.weight.grad.abs().sum() > 0
    for name in ("diffusion", "dice", "bce"):
        assert name in out.terms and f"w_{name}" in out.terms and f"weight_{name}" in out.terms
        assert not out.terms[name].requires_grad
    assert "anchor" not in out.terms
    if diff.get("learn_sigma") and not diff.get("use_kl"):
        assert {"diffusion_mse", "diffusion_vb"} <= set(out.terms)


def test_fixed_total_is_sum_of_weighted_terms(stubs):
    cfg, diffusion, obj = setup(stubs, loss={"dice_weight": 0.5, "bce_weight": 2.0, "diffusion_weight": 1.0})
    model = stubs["diffusion"](anchor=True)
    out = obj(model, stubs["batch"](), step=3, t=torch.tensor([5, 60]), noise=torch.randn(2, 1, 8, 8))
    parts = ["diffusion", "dice", "bce", "anchor"]
    assert out.loss.item() == pytest.approx(sum(out.terms[f"w_{p}"].item() for p in parts), rel=1e-5)
    assert out.terms["w_dice"].item() == pytest.approx(0.5 * out.terms["dice"].item(), rel=1e-6)
    assert out.terms["w_bce"].item() == pytest.approx(2.0 * out.terms["bce"].item(), rel=1e-6)


def test_anchor_term_only_with_anchor(stubs):
    cfg, diffusion, obj = setup(stubs)
    batch = stubs["batch"]()
    with_anchor = stubs["diffusion"](anchor=True)
    out = obj(with_anchor, batch, step=0)
    assert {"anchor", "w_anchor", "anchor_dice", "anchor_bce"} <= set(out.terms)
    out.loss.backward()
    assert with_anchor.anchor_head.weight.grad.abs().sum() > 0
    out = obj(stubs["diffusion"](anchor=False), batch, step=0)
    assert "anchor" not in out.terms and "w_anchor" not in out.terms


def test_explicit_t_and_noise_are_deterministic(stubs):
    cfg, diffusion, obj = setup(stubs)
    torch.manual_seed(1)
    model = stubs["diffusion"]()
    batch = stubs["batch"]()
    t, noise = torch.tensor([3, 77]), torch.randn(2, 1, 8, 8)
    a = obj(model, batch, step=0, t=t, noise=noise)
    torch.randn(5)  # disturb the global RNG
    b = obj(model, batch, step=0, t=t, noise=noise)
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        assert torch.equal(a.terms[k], b.terms[k]), k
    c = obj(model, batch, step=0, t=torch.tensor([50, 50]), noise=noise)
    assert not torch.equal(a.terms["diffusion"], c.terms["diffusion"])


@pytest.mark.parametrize("kind, diff", [("eps", {"steps": 100}), ("x0", {"steps": 100, "predict_xstart": True}),
                                        ("eps", {"steps": 100, "learn_sigma": True}),
                                        ("v", {"steps": 100, "predict_v": True}),
                                        ("v", {"steps": 100, "predict_v": True, "zero_terminal_snr": True})])
def test_dice_zero_for_oracle_and_large_for_opposite(stubs, kind, diff):
    cfg, diffusion, obj = setup(stubs, diffusion=diff, loss={"timestep_weighting": "none"})
    batch = stubs["batch"]()
    t, noise = torch.tensor([2, 40]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    learn = diff.get("learn_sigma", False)
    good = stubs["oracle"](diffusion.alphas_cumprod, kind=kind, learn_sigma=learn)
    out = obj(good, batch, step=0, t=t, noise=noise)
    assert out.terms["dice"].item() < 1e-3
    assert out.terms["bce"].item() < 1e-3
    if not learn:
        assert out.terms["diffusion"].item() < 1e-6
    bad = stubs["oracle"](diffusion.alphas_cumprod, kind=kind, sign=-1.0, learn_sigma=learn)
    out = obj(bad, batch, step=0, t=t, noise=noise)
    assert out.terms["dice"].item() > 0.99
    assert out.terms["bce"].item() > -math.log(1e-5)


def test_snr_weighting_downweights_noisy_steps(stubs):
    cfg, diffusion, obj = setup(stubs, loss={"timestep_weighting": "snr"})
    bad = stubs["oracle"](diffusion.alphas_cumprod, sign=-1.0)
    batch = stubs["batch"]()
    noise = torch.randn(2, 1, 8, 8)
    low = obj(bad, batch, step=0, t=torch.tensor([1, 1]), noise=noise).terms["dice"].item()
    high = obj(bad, batch, step=0, t=torch.tensor([99, 99]), noise=noise).terms["dice"].item()
    abar = diffusion.alphas_cumprod[99]
    assert low == pytest.approx(1.0, abs=1e-3)  # SNR >= 1: full weight
    assert high == pytest.approx(abar / (1 - abar), rel=1e-2)  # min(SNR, 1) at t = 99


def test_3d_batch(stubs):
    cfg, diffusion, obj = setup(stubs)
    model = stubs["diffusion"](dims=3, anchor=True)
    out = obj(model, stubs["batch"](size=4, dims=3), step=0)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_loss_second_moment_sampler_state_travels_with_objective(stubs):
    cfg, diffusion, obj = setup(stubs, diffusion={"steps": 30, "schedule_sampler": "loss-second-moment"})
    model = stubs["diffusion"]()
    for _ in range(3):
        obj(model, stubs["batch"](), step=0)
    counts = obj.schedule_sampler._loss_counts.copy()
    assert counts.sum() == 6
    state = obj.state_dict()
    cfg2, diffusion2, obj2 = setup(stubs, diffusion={"steps": 30, "schedule_sampler": "loss-second-moment"})
    obj2.load_state_dict(state)
    assert (obj2.schedule_sampler._loss_counts == counts).all()


def test_uncertainty_strategy_has_learnable_weights(stubs):
    cfg, diffusion, obj = setup(stubs, loss={"strategy": "uncertainty"})
    params = list(obj.parameters())
    assert len(params) == 4  # one log-variance per term
    out = obj(stubs["diffusion"](), stubs["batch"](), step=0)
    out.loss.backward()
    assert all(p.grad is not None for p in params[:3])


def test_discriminative_baseline(stubs):
    cfg = stubs["cfg"](model={"name": "dynunet"}, loss={"strategy": "warmup", "warmup_steps": 100})
    obj = SegmentationObjective(cfg, None)
    model = stubs["baseline"]()
    out = obj(model, stubs["batch"](), step=0)
    assert set(out.terms) >= {"dice", "bce", "w_dice", "w_bce"} and "diffusion" not in out.terms
    assert out.loss.item() == pytest.approx(out.terms["dice"].item() + out.terms["bce"].item(), rel=1e-5)
    out.loss.backward()
    assert model.net.weight.grad.abs().sum() > 0


def test_model_kind_mismatch(stubs):
    cfg, diffusion, obj = setup(stubs)
    with pytest.raises(ConfigError, match="built for a diffusion model but got a discriminative model"):
        obj(stubs["baseline"](), stubs["batch"](), step=0)
    cfg = stubs["cfg"](model={"name": "medsegdiff_v1"})
    with pytest.raises(ConfigError, match="no diffusion process was given"):
        SegmentationObjective(cfg, None)


def test_mask_shape_checked(stubs):
    cfg, diffusion, obj = setup(stubs)
    batch = stubs["batch"]()
    batch["mask"] = batch["mask"][:, 0]
    with pytest.raises(ValueError, match=r"batch\['mask'\] \(2, 8, 8\) must be \(B, 1, \*S\)"):
        obj(stubs["diffusion"](), batch, step=0)


def test_bf16_autocast_gives_float32_loss(stubs):
    cfg, diffusion, obj = setup(stubs, diffusion={"steps": 100, "learn_sigma": True})
    model = stubs["diffusion"](out_ch=2, anchor=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(model, stubs["batch"](), step=0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(model.net.weight.grad).all()


def test_objective_state_loads_with_weights_only(stubs, tmp_path):
    cfg, diffusion, obj = setup(stubs, diffusion={"steps": 30, "schedule_sampler": "loss-second-moment"})
    obj(stubs["diffusion"](), stubs["batch"](), step=0)
    torch.save(obj.state_dict(), tmp_path / "o.pt")
    state = torch.load(tmp_path / "o.pt", weights_only=True)
    cfg2, diffusion2, obj2 = setup(stubs, diffusion={"steps": 30, "schedule_sampler": "loss-second-moment"})
    obj2.load_state_dict(state)
    assert obj2.schedule_sampler._loss_counts.sum() == 2


# ----------------------------------------------------------------------- min-SNR-gamma weighting


@pytest.mark.parametrize("mode", ["min_snr", "snr_plus_one"])
@pytest.mark.parametrize("diff", [{"steps": 100}, {"steps": 100, "predict_xstart": True},
                                  {"steps": 100, "predict_v": True}])
def test_min_snr_weights_the_diffusion_mse(stubs, diff, mode):
    # both samples at the same t: the weighted term is w(t) times the unweighted one
    gamma = 5.0
    _, diffusion, plain = setup(stubs, diffusion=diff, loss={"diffusion_weighting": "none"})
    _, _, weighted = setup(stubs, diffusion=diff, loss={"diffusion_weighting": mode, "min_snr_gamma": gamma})
    torch.manual_seed(3)
    model = stubs["diffusion"]()
    batch = stubs["batch"]()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    for step_t in (2, 95):
        t = torch.tensor([step_t, step_t])
        a = plain(model, batch, 0, t=t, noise=noise).terms["diffusion"].item()
        b = weighted(model, batch, 0, t=t, noise=noise).terms["diffusion"].item()
        abar = diffusion.alphas_cumprod[step_t]
        snr = abar / (1 - abar)
        x0_weight = min(snr, gamma) if mode == "min_snr" else snr + 1  # the weight in x0 terms
        w = {False: x0_weight / snr, True: x0_weight}[diff.get("predict_xstart", False)]
        if diff.get("predict_v"):
            w = x0_weight / (snr + 1)
        assert b == pytest.approx(w * a, rel=1e-5)


def test_min_snr_refuses_the_variational_bound(stubs):
    cfg = stubs["cfg"](diffusion={"steps": 100, "use_kl": True}, loss={"diffusion_weighting": "min_snr"})
    with pytest.raises(ConfigError, match="loss.diffusion_weighting.*use_kl"):
        SegmentationObjective(cfg, build_diffusion(cfg.diffusion, ""))


# ----------------------------------------------------------------- MedSegDiff-V2 anchor interval


def test_anchor_applied_exactly_every_alpha_steps(stubs):
    alpha, beta = 3, 0.25
    _, _, obj = setup(stubs, loss={"anchor_every": alpha, "anchor_bce_weight": beta})
    torch.manual_seed(5)
    model = stubs["diffusion"](anchor=True)
    batch = stubs["batch"]()
    t, noise = torch.tensor([10, 50]), torch.randn(2, 1, 8, 8)
    applied = []
    for step in range(8):
        model.zero_grad()
        out = obj(model, batch, step, t=t, noise=noise)
        out.loss.backward()
        on = "anchor" in out.terms
        applied.append(on)
        assert out.terms["anchor_applied"].item() == float(on)
        grad = model.anchor_head.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == on  # the head learns only on those steps
        if on:
            expected = out.terms["anchor_dice"] + beta * out.terms["anchor_bce"]
            assert out.terms["anchor"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert applied == [step % alpha == 0 for step in range(8)]


def test_v2_paper_preset_is_noise_loss_plus_anchor(stubs, tmp_path):
    # configs/loss/v2_paper.yaml: L = L_noise + 1[step = 0 mod alpha] (Dice + beta CE) (Wu et al. 2024)
    from medsegdiff.config import load_config

    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults:\n  - loss/v2_paper\ndiffusion:\n  steps: 100\n  respacing: ddim10\n"
                   "train:\n  validation:\n    respacing: ddim10\n")
    cfg = load_config(exp)
    alpha = cfg.loss.anchor_every
    assert alpha > 1 and cfg.loss.dice_weight == 0.0 and cfg.loss.bce_weight == 0.0
    assert not cfg.diffusion.predict_xstart and cfg.loss.diffusion_weighting == "none"
    obj = SegmentationObjective(cfg, build_diffusion(cfg.diffusion, ""))
    model = stubs["diffusion"](anchor=True)
    t, noise = torch.tensor([10, 50]), torch.randn(2, 1, 8, 8)
    for step in (0, 1, alpha):
        out = obj(model, stubs["batch"](), step, t=t, noise=noise)
        expected = out.terms["diffusion"] + (out.terms["anchor"] if step % alpha == 0 else 0.0)
        assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------------ self-conditioning


def test_self_conditioning_second_pass_sees_detached_first_estimate(stubs):
    _, diffusion, obj = setup(stubs, diffusion={"steps": 100, "self_condition": True})
    torch.manual_seed(6)
    model = stubs["diffusion"](self_condition=True)
    batch = stubs["batch"]()
    t, noise = torch.tensor([30, 70]), torch.randn(2, 1, 8, 8)
    out = obj(model, batch, 0, t=t, noise=noise, self_cond=True)
    assert len(model.seen_x) == 2 and out.terms["self_cond"].item() == 1.0
    first, second = model.seen_x
    assert torch.all(first[:, 1] == 0)  # Algorithm 1: the first pass sees a zero estimate
    x_t = diffusion.q_sample(2 * batch["mask"] - 1, t, noise)
    torch.testing.assert_close(first[:, :1], x_t)
    torch.testing.assert_close(second[:, :1], x_t)
    with torch.no_grad():
        expected = diffusion.predict_xstart_from_output(x_t, t, model.net(torch.cat([first, batch["image"]], 1)))
    torch.testing.assert_close(second[:, 1:], expected.clamp(-1, 1))
    assert not second.requires_grad or not second[:, 1:].requires_grad
    assert second[:, 1:].abs().sum() > 0
    out.loss.backward()  # the gradient flows only through the second pass
    assert model.net.weight.grad.abs().sum() > 0
    model.seen_x.clear()
    out = obj(model, batch, 0, t=t, noise=noise, self_cond=False)
    assert len(model.seen_x) == 1 and torch.all(model.seen_x[0][:, 1] == 0)
    assert out.terms["self_cond"].item() == 0.0


def test_self_conditioning_half_of_the_batches(stubs):
    _, _, obj = setup(stubs, diffusion={"steps": 100, "self_condition": True})
    model = stubs["diffusion"](self_condition=True)
    batch = stubs["batch"](b=1, size=4)
    torch.manual_seed(7)
    flags = []
    for _ in range(200):
        model.seen_x.clear()
        out = obj(model, batch, 0)
        flags.append(out.terms["self_cond"].item())
        assert len(model.seen_x) == (2 if flags[-1] else 1)
        if not flags[-1]:
            assert torch.all(model.seen_x[0][:, 1] == 0)
    assert SELF_COND_PROB == 0.5
    assert 0.4 < sum(flags) / len(flags) < 0.6
