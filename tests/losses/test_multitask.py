"""Timestep weights and loss-combination strategies behave as documented."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from improved_diffusion.gaussian_diffusion import ModelMeanType
from medsegdiff.losses.multitask import LossCombiner, min_snr_weights, snr_plus_one_weights, timestep_weights


def schedule():
    # betas 0.1, 0.5, 0.6 -> alphas 0.9, 0.5, 0.4 -> abar 0.9, 0.45, 0.18 (float64 like improved_diffusion)
    betas = np.array([0.1, 0.5, 0.6], dtype=np.float64)
    return SimpleNamespace(alphas_cumprod=np.cumprod(1.0 - betas))


def test_snr_weights_are_min_snr_1_by_hand():
    t = torch.tensor([0, 1, 2, 1])
    w = timestep_weights(schedule(), t, "snr")
    # SNR = abar / (1 - abar): 9, 0.45/0.55, 0.18/0.82 -> clipped at 1
    expected = torch.tensor([1.0, 0.45 / 0.55, 0.18 / 0.82, 0.45 / 0.55])
    assert w.dtype == torch.float32 and w.shape == (4,)
    torch.testing.assert_close(w, expected)


def test_alpha_bar_and_none_weights():
    t = torch.tensor([2, 0])
    torch.testing.assert_close(timestep_weights(schedule(), t, "alpha_bar"), torch.tensor([0.18, 0.9]))
    torch.testing.assert_close(timestep_weights(schedule(), t, "none"), torch.ones(2))


def test_unknown_weighting_mode_message():
    with pytest.raises(ValueError, match="mode 'foo' is unknown; allowed: none, snr, alpha_bar"):
        timestep_weights(schedule(), torch.tensor([0]), "foo")


def terms(**values):
    return {k: torch.tensor(float(v), requires_grad=True) for k, v in values.items()}


def test_fixed_is_weighted_sum_and_logs_everything():
    comb = LossCombiner("fixed", ["diffusion", "dice", "bce"], weights={"diffusion": 1.0, "dice": 2.0, "bce": 0.5})
    total, logged = comb(terms(diffusion=0.3, dice=0.4, bce=1.0), step=0)
    assert total.item() == pytest.approx(0.3 + 2.0 * 0.4 + 0.5 * 1.0)
    assert logged["dice"].item() == pytest.approx(0.4)
    assert logged["w_dice"].item() == pytest.approx(0.8)
    assert logged["weight_dice"].item() == pytest.approx(2.0)
    assert not logged["w_dice"].requires_grad and total.requires_grad


def test_zero_weight_term_is_logged_not_added_and_absent_terms_are_skipped():
    comb = LossCombiner("fixed", ["diffusion", "dice", "anchor"], weights={"dice": 0.0})
    total, logged = comb(terms(diffusion=0.3, dice=5.0), step=0)  # no anchor (V1)
    assert total.item() == pytest.approx(0.3)
    assert logged["dice"].item() == 5.0 and logged["w_dice"].item() == 0.0
    assert "anchor" not in logged


def test_unknown_term_message():
    comb = LossCombiner("fixed", ["diffusion"])
    with pytest.raises(ValueError, match=r"unknown loss terms \['dice'\]; configured terms: \['diffusion'\]"):
        comb(terms(diffusion=1.0, dice=1.0), step=0)


@pytest.mark.parametrize(("step", "factor"), [(0, 0.0), (50, 0.5), (100, 1.0), (400, 1.0)])
def test_warmup_ramps_auxiliary_terms_linearly(step, factor):
    comb = LossCombiner("warmup", ["diffusion", "dice"], weights={"diffusion": 1.0, "dice": 2.0}, warmup_steps=100)
    total, logged = comb(terms(diffusion=0.5, dice=1.0), step=step)
    assert logged["weight_diffusion"].item() == 1.0  # main term always full
    assert logged["weight_dice"].item() == pytest.approx(2.0 * factor)
    assert total.item() == pytest.approx(0.5 + 2.0 * factor * 1.0)


def test_uncertainty_log_variances_converge_to_log_loss():
    comb = LossCombiner("uncertainty", ["diffusion", "dice"])
    assert sorted(n for n, _ in comb.named_parameters()) == ["log_vars.dice", "log_vars.diffusion"]
    fixed = {"diffusion": torch.tensor(4.0), "dice": torch.tensor(0.25)}
    opt = torch.optim.Adam(comb.parameters(), lr=0.05)
    first = None
    for _ in range(400):
        total, logged = comb(fixed, step=0)
        first = total.item() if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    total, logged = comb(fixed, step=0)
    assert first == pytest.approx(4.25)  # s = 0 at start
    # optimum of exp(-s) L + s is s = log L, where the total is sum(1 + log L_i) = 2 + 0 = 2
    assert comb.log_vars["diffusion"].item() == pytest.approx(math.log(4.0), abs=1e-2)
    assert comb.log_vars["dice"].item() == pytest.approx(math.log(0.25), abs=1e-2)
    assert total.item() == pytest.approx(2.0, abs=1e-3) and total.item() < first
    assert logged["weight_diffusion"].item() == pytest.approx(0.25, abs=1e-2)
    assert logged["w_dice"].item() == pytest.approx(1.0, abs=1e-2)


def test_bad_strategy_message():
    with pytest.raises(ValueError, match="strategy 'magic' is unknown; allowed: fixed, warmup, uncertainty"):
        LossCombiner("magic", ["diffusion"])


def test_snr_weights_on_the_real_diffusion_schedule():
    from medsegdiff.config.diffusion import DiffusionConfig
    from medsegdiff.diffusion.factory import build_diffusion

    diffusion = build_diffusion(DiffusionConfig(), respacing="")
    abar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    t = torch.tensor([0, len(abar) // 2, len(abar) - 1])
    expected = np.minimum(abar[t.numpy()] / (1.0 - abar[t.numpy()]), 1.0)
    torch.testing.assert_close(timestep_weights(diffusion, t, "snr"), torch.from_numpy(expected).float())
    w = timestep_weights(diffusion, torch.arange(len(abar)), "snr")
    assert w[0] == 1.0 and w[-1] < 1e-3  # pure-noise steps barely count
    assert bool((w[1:] <= w[:-1]).all())  # monotone in t


def test_snr_cap_scales_the_snr_weights_by_hand():
    # SNR 9, 0.818, 0.2195; cap 4 -> min(SNR, 4) / 4
    w = timestep_weights(schedule(), torch.tensor([0, 1, 2]), "snr", snr_cap=4.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.45 / 0.55 / 4, 0.18 / 0.82 / 4]))
    with pytest.raises(ValueError, match="snr_cap must be > 0"):
        timestep_weights(schedule(), torch.tensor([0]), "snr", snr_cap=0.0)


@pytest.mark.parametrize(
    "mean, expected",
    [
        # SNR = 9, 0.45/0.55, 0.18/0.82; gamma = 2 (Hang et al. 2023, Sec. 3.4)
        (ModelMeanType.EPSILON, [2 / 9, 1.0, 1.0]),
        (ModelMeanType.START_X, [2.0, 0.45 / 0.55, 0.18 / 0.82]),
        (ModelMeanType.VELOCITY, [2 / 10, (0.45 / 0.55) / (0.45 / 0.55 + 1), (0.18 / 0.82) / (0.18 / 0.82 + 1)]),
    ],
)
def test_min_snr_weights_per_parametrisation_by_hand(mean, expected):
    d = SimpleNamespace(alphas_cumprod=schedule().alphas_cumprod, model_mean_type=mean)
    w = min_snr_weights(d, torch.tensor([0, 1, 2]), gamma=2.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32))


def test_min_snr_weights_on_the_linear_schedule_and_errors():
    from improved_diffusion.script_util import create_gaussian_diffusion

    d = create_gaussian_diffusion(steps=1000)  # linear: beta_0 = 1e-4, so SNR(0) = (1 - 1e-4) / 1e-4
    w = min_snr_weights(d, torch.tensor([0, 999]), gamma=5.0)
    snr0 = (1 - 1e-4) / 1e-4
    assert w[0].item() == pytest.approx(5.0 / snr0, rel=1e-6) and w[1].item() == 1.0
    v = create_gaussian_diffusion(steps=1000, predict_v=True, zero_terminal_snr=True)
    wv = min_snr_weights(v, torch.tensor([0, 999]), gamma=5.0)
    assert wv[0].item() == pytest.approx(5.0 / (snr0 + 1), rel=1e-6) and wv[1].item() == 0.0  # SNR_T = 0
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weights(d, torch.tensor([0]), gamma=0.0)
    prev = SimpleNamespace(alphas_cumprod=schedule().alphas_cumprod, model_mean_type=ModelMeanType.PREVIOUS_X)
    with pytest.raises(ValueError, match="min_snr_weights: no weighting for"):
        min_snr_weights(prev, torch.tensor([0]))


@pytest.mark.parametrize(
    "mean, expected",
    [
        # x0 weight SNR + 1 (Salimans & Ho 2022, Sec. 4); SNR = 9, 9/11, 9/41
        (ModelMeanType.EPSILON, [10 / 9, (9 / 11 + 1) / (9 / 11), (9 / 41 + 1) / (9 / 41)]),
        (ModelMeanType.START_X, [10.0, 9 / 11 + 1, 9 / 41 + 1]),
        (ModelMeanType.VELOCITY, [1.0, 1.0, 1.0]),
    ],
)
def test_snr_plus_one_weights_by_hand(mean, expected):
    d = SimpleNamespace(alphas_cumprod=schedule().alphas_cumprod, model_mean_type=mean)
    w = snr_plus_one_weights(d, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32))
