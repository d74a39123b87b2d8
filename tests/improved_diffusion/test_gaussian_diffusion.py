"""GaussianDiffusion: closed-form tables, samplers with oracle models, every loss combination."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from improved_diffusion import gaussian_diffusion as gd
from improved_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
)
from improved_diffusion.script_util import create_gaussian_diffusion


def make(T=100, mean=ModelMeanType.EPSILON, var=ModelVarType.FIXED_LARGE, loss=LossType.MSE, **kw):
    return GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", T), model_mean_type=mean, model_var_type=var,
        loss_type=loss, **kw,
    )


def closed_form_tables(T):
    scale = 1000.0 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return betas, abar, abar_prev, post_var


def noisy_batch(T, seed, shape, t, span=2.0):
    """Seeded ``x0`` uniform in ``[-span/2, span/2]``, noise ``eps``, timesteps and ``x_t = q_sample``.

    Also returns the generator, for tests that draw more from the same stream.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g) * span - span / 2
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor(t)
    return x0, eps, t, make(T).q_sample(x0, t, eps), g


def test_q_sample_and_posterior_match_closed_form():
    T = 100
    d = make(T)
    betas, abar, abar_prev, post_var = closed_form_tables(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 37, 99])
    xt = d.q_sample(x0, t, noise)
    for b, ti in enumerate(t.tolist()):
        exp = math.sqrt(abar[ti]) * x0[b] + math.sqrt(1 - abar[ti]) * noise[b]
        torch.testing.assert_close(xt[b], exp, rtol=1e-5, atol=1e-6)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for b, ti in enumerate(t.tolist()):
        c1 = betas[ti] * math.sqrt(abar_prev[ti]) / (1 - abar[ti])
        c2 = (1 - abar_prev[ti]) * math.sqrt(1 - betas[ti]) / (1 - abar[ti])
        torch.testing.assert_close(mean[b], c1 * x0[b] + c2 * xt[b], rtol=1e-5, atol=1e-6)
        assert var[b].flatten()[0].item() == pytest.approx(post_var[ti], rel=1e-6)
        clipped = post_var[1] if ti == 0 else post_var[ti]
        assert logvar[b].flatten()[0].item() == pytest.approx(math.log(clipped), rel=1e-6)
    m, v, lv = d.q_mean_variance(x0, t)
    assert v[2].flatten()[0].item() == pytest.approx(1 - abar[99], rel=1e-6)


def test_tables_cached_on_device_and_reused():
    d = make(50 * 2)
    t = torch.tensor([1, 2])
    x = torch.zeros(2, 1, 2, 2)
    d.q_sample(x, t, torch.zeros_like(x))
    tables = d._device_tables[torch.device("cpu")]
    ac = tables["alphas_cumprod"]
    assert ac.dtype == torch.float64 and ac.device.type == "cpu"
    for _ in range(3):
        d.q_sample(x, t, torch.zeros_like(x))
        d.p_sample(lambda x, t: torch.zeros_like(x), x, t)
    assert len(d._device_tables) == 1
    assert d._tables(torch.device("cpu"))["alphas_cumprod"] is ac
    # _extract_into_tensor indexes the cached tensor as float32, like upstream's float64 -> float
    out = _extract_into_tensor(ac, t, (2, 1, 2, 2))
    assert out.dtype == torch.float32 and out.shape == (2, 1, 2, 2)
    assert out[1, 0, 0, 0].item() == np.float32(d.alphas_cumprod[2])


def test_sampling_makes_no_host_to_device_table_copies(monkeypatch, smooth_model):
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim10", learn_sigma=True)

    def model(x, t, **kw):
        return torch.cat([smooth_model(x, t), torch.zeros_like(x)], 1)

    d.ddim_sample_loop(model, (1, 1, 2, 2))  # warm-up builds the device tables once
    calls = []
    real_as_tensor, real_from_numpy = torch.as_tensor, torch.from_numpy
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: calls.append("as_tensor") or real_as_tensor(*a, **k))
    monkeypatch.setattr(torch, "from_numpy", lambda *a: calls.append("from_numpy") or real_from_numpy(*a))
    d.ddim_sample_loop(model, (1, 1, 2, 2))
    d.p_sample_loop(model, (1, 1, 2, 2))
    d.training_losses(model, torch.zeros(1, 1, 2, 2), torch.tensor([3]))
    assert calls == []


def test_extract_accepts_numpy_and_any_rank():
    arr = np.arange(5, dtype=np.float64) / 10
    out = _extract_into_tensor(arr, torch.tensor([4, 0]), (2, 3, 2, 2, 2))
    assert out.shape == (2, 3, 2, 2, 2)
    assert torch.all(out[0] == np.float32(0.4)) and torch.all(out[1] == 0)


@pytest.mark.parametrize("var", [ModelVarType.FIXED_LARGE, ModelVarType.FIXED_SMALL])
def test_fixed_variances(var):
    T = 100
    d = make(T, var=var)
    betas, _, _, post_var = closed_form_tables(T)
    x = torch.zeros(2, 1, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([0, 50]))
    v = out["variance"][:, 0, 0, 0].double().numpy()
    if var == ModelVarType.FIXED_LARGE:
        np.testing.assert_allclose(v, [post_var[1], betas[50]], rtol=1e-6)
    else:
        np.testing.assert_allclose(v, [post_var[0], post_var[50]], rtol=1e-6, atol=1e-12)


def test_learned_range_interpolates_in_log_space():
    T = 100
    d = make(T, var=ModelVarType.LEARNED_RANGE)
    betas, _, _, post_var = closed_form_tables(T)
    x = torch.zeros(3, 1, 2, 2)
    v = torch.tensor([1.0, -1.0, 0.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), v], 1), x, torch.tensor([10, 10, 10]))
    lv = out["log_variance"][:, 0, 0, 0].double().numpy()
    expected = [math.log(betas[10]), math.log(post_var[10]), 0.5 * (math.log(betas[10]) + math.log(post_var[10]))]
    np.testing.assert_allclose(lv, expected, rtol=1e-5)


def test_learned_variance_needs_two_channels():
    d = make(var=ModelVarType.LEARNED_RANGE)
    with pytest.raises(ValueError, match=r"learned variance needs a model output of shape \(2, 2, 2, 2\)"):
        d.p_mean_variance(lambda x, t: x, torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))


def test_predict_roundtrips():
    d = make(100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 3, 3, generator=g) * 2 - 1
    eps = torch.randn(2, 1, 3, 3, generator=g)
    t = torch.tensor([5, 80])
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d._predict_xstart_from_eps(xt, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d._predict_eps_from_xstart(xt, t, x0), eps, rtol=1e-4, atol=1e-4)
    mean = d.q_posterior_mean_variance(x0, xt, t)[0]
    torch.testing.assert_close(d._predict_xstart_from_xprev(xt, t, mean), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("respacing", ["", "ddim10", "25"])
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("loop", ["ddpm", "ddim"])
def test_oracle_model_samples_return_x0(oracle_cls, respacing, kind, loop):
    T = 100
    d = create_gaussian_diffusion(
        steps=T, predict_xstart=(kind == "x0"), predict_v=(kind == "v"), timestep_respacing=respacing
    )
    base_abar = np.cumprod(1 - gd.get_named_beta_schedule("linear", T))
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 1, 4, 4, generator=g) * 1.8 - 0.9
    model = oracle_cls(x0, base_abar, kind)
    if loop == "ddpm":
        out = d.p_sample_loop(model, x0.shape, generator=g)
    else:
        out = d.ddim_sample_loop(model, x0.shape, generator=g, eta=0.5)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_ddim_eta0_deterministic_and_eta1_stochastic(smooth_model):
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim20")
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    a = d.ddim_sample_loop(smooth_model, noise.shape, noise=noise.clone(), eta=0.0,
                           generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(smooth_model, noise.shape, noise=noise.clone(), eta=0.0,
                           generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(smooth_model, noise.shape, noise=noise.clone(), eta=1.0,
                           generator=torch.Generator().manual_seed(1))
    e = d.ddim_sample_loop(smooth_model, noise.shape, noise=noise.clone(), eta=1.0,
                           generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, e)


def test_ddim_eta1_step_matches_ddpm_fixed_small_variance(smooth_model):
    # DDIM with eta = 1 has sigma_t^2 = beta_tilde_t (DDIM Eq. 16).
    d = make(100, var=ModelVarType.FIXED_SMALL)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([40, 40])
    a = d.ddim_sample(smooth_model, x, t, eta=1.0, generator=torch.Generator().manual_seed(9))["sample"]
    b = d.p_sample(smooth_model, x, t, generator=torch.Generator().manual_seed(9))["sample"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, d.ddim_sample(smooth_model, x, t, eta=0.0)["sample"])


def test_ddim_reverse_then_forward_returns_start(oracle_cls):
    T = 100
    d = create_gaussian_diffusion(steps=T)
    abar = np.cumprod(1 - gd.get_named_beta_schedule("linear", T))
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    model = oracle_cls(x0, abar)
    start = d.q_sample(x0, torch.tensor([0, 0]), torch.randn(x0.shape, generator=g))
    x = start
    for i in range(T - 1):  # x_0-level -> x_{T-1}
        x = d.ddim_reverse_sample(model, x, torch.full((2,), i), clip_denoised=False)["sample"]
    steps = list(d.ddim_sample_loop_progressive(model, x.shape, noise=x, clip_denoised=False))
    # the step from t=1 lands on the t=0 level, i.e. back on the start
    torch.testing.assert_close(steps[-2]["sample"], start, rtol=1e-4, atol=1e-4)


def test_ddim_reverse_single_step_smooth_model(smooth_model):
    d = create_gaussian_diffusion(steps=1000)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([500, 500])
    fwd = d.ddim_reverse_sample(smooth_model, x, t, clip_denoised=False)["sample"]
    back = d.ddim_sample(smooth_model, fwd, t + 1, clip_denoised=False)["sample"]
    torch.testing.assert_close(back, x, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="needs eta == 0"):
        d.ddim_reverse_sample(smooth_model, x, t, eta=0.5)


MEANS = list(ModelMeanType)
VARS = list(ModelVarType)
LOSSES = list(LossType)


@pytest.mark.parametrize("mean, var, loss", list(itertools.product(MEANS, VARS, LOSSES)))
def test_training_losses_every_combination(mean, var, loss):
    T = 50
    d = make(T, mean=mean, var=var, loss=loss)
    torch.manual_seed(0)
    learned = var in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    conv = torch.nn.Conv2d(1, 2 if learned else 1, 3, padding=1)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1

    def model(x, t, **kw):
        assert kw == {} or set(kw) == {"cond"}
        return conv(x)

    out = d.training_losses(model, x0, torch.tensor([0, 1, T - 1]), model_kwargs={"cond": 1})
    if loss.is_vb():
        assert set(out) == {"loss"}
    else:
        assert set(out) == ({"loss", "mse", "vb"} if learned else {"loss", "mse"})
    assert out["loss"].shape == (3,)
    assert torch.isfinite(out["loss"]).all()
    out["loss"].mean().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_hybrid_vb_trains_only_variance_and_rescales():
    T = 100
    x0 = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(7)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([3, 60])
    outs = {}
    for loss in (LossType.MSE, LossType.RESCALED_MSE):
        d = make(T, var=ModelVarType.LEARNED_RANGE, loss=loss)
        param = torch.zeros(2, 2, 3, 3, requires_grad=True)
        out = d.training_losses(lambda x, t, p=param: p * 1.0, x0, t, noise=noise)
        g_vb = torch.autograd.grad(out["vb"].sum(), param, retain_graph=True)[0]
        assert torch.all(g_vb[:, 0] == 0) and g_vb[:, 1].abs().sum() > 0
        g_mse = torch.autograd.grad(out["mse"].sum(), param)[0]
        assert torch.all(g_mse[:, 1] == 0) and g_mse[:, 0].abs().sum() > 0
        # epsilon target, zero output: mse = mean(noise^2)
        torch.testing.assert_close(out["mse"], (noise**2).mean(dim=(1, 2, 3)))
        outs[loss] = out
    torch.testing.assert_close(outs[LossType.RESCALED_MSE]["vb"], outs[LossType.MSE]["vb"] * T / 1000)


def test_rescaled_kl_is_T_times_kl(smooth_model):
    T = 50
    x0 = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(7)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0, 30])
    kl = make(T, loss=LossType.KL).training_losses(smooth_model, x0, t, noise=noise)["loss"]
    rkl = make(T, loss=LossType.RESCALED_KL).training_losses(smooth_model, x0, t, noise=noise)["loss"]
    torch.testing.assert_close(rkl, kl * T)


def test_mse_targets_for_each_mean_type():
    T = 100
    x0 = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 90])
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    d = make(T, mean=ModelMeanType.START_X)
    torch.testing.assert_close(d.training_losses(zero, x0, t, noise=noise)["mse"], (x0**2).mean((1, 2, 3)))
    d = make(T, mean=ModelMeanType.PREVIOUS_X)
    target = d.q_posterior_mean_variance(x0, d.q_sample(x0, t, noise), t)[0]
    torch.testing.assert_close(d.training_losses(zero, x0, t, noise=noise)["mse"], (target**2).mean((1, 2, 3)))


def test_prior_bpd_closed_form():
    T = 100
    d = make(T)
    abar_T = closed_form_tables(T)[1][-1]
    x0 = torch.zeros(2, 1, 2, 2)
    # KL(N(0, 1 - abar) || N(0, 1)) = 0.5 * (-log(1 - abar) - 1 + (1 - abar)), in bits
    expected = 0.5 * (-math.log(1 - abar_T) - 1 + (1 - abar_T)) / math.log(2)
    assert d._prior_bpd(x0)[0].item() == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_calc_bpd_loop_shapes_and_vb_terms(oracle_cls):
    T = 6
    d = GaussianDiffusion(
        betas=gd.get_named_beta_schedule("cosine", T), model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.KL,
    )
    x0 = torch.rand(2, 1, 3, 3) * 2 - 1
    out = d.calc_bpd_loop(oracle_cls(x0, d.alphas_cumprod), x0, clip_denoised=False)
    assert out["vb"].shape == (2, T) and out["total_bpd"].shape == (2,)
    # the oracle predicts the true posterior: every KL term (t > 0) vanishes
    torch.testing.assert_close(out["vb"][:, :-1], torch.zeros(2, T - 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["xstart_mse"], torch.zeros(2, T), atol=1e-8, rtol=0)
    assert torch.isfinite(out["total_bpd"]).all()


def test_3d_tensors_train_and_sample(smooth_model):
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim5")
    x0 = torch.rand(2, 1, 3, 4, 4) * 2 - 1

    def model(x, t, **kw):
        return torch.cat([smooth_model(x, t), torch.zeros_like(x)], 1)

    out = d.training_losses(model, x0, torch.tensor([0, 4]))
    assert torch.isfinite(out["loss"]).all()
    s = d.ddim_sample_loop(model, x0.shape)
    assert s.shape == x0.shape and torch.isfinite(s).all()
    s = d.p_sample_loop(model, x0.shape)
    assert s.shape == x0.shape


def test_progress_bar(capsys, smooth_model):
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim4")
    d.ddim_sample_loop(smooth_model, (1, 1, 2, 2), progress=True)
    assert "sampling" in capsys.readouterr().err
    d.p_sample_loop(smooth_model, (1, 1, 2, 2), progress=False)
    assert capsys.readouterr().err == ""


def test_noise_shape_checked(smooth_model):
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim4")
    with pytest.raises(ValueError, match=r"noise shape \(1, 1, 2, 2\) != requested shape \(2, 1, 2, 2\)"):
        d.ddim_sample_loop(smooth_model, (2, 1, 2, 2), noise=torch.zeros(1, 1, 2, 2))


def test_denoised_fn_and_clip_applied():
    d = make(100, mean=ModelMeanType.START_X)
    x = torch.zeros(1, 1, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.full_like(x, 5.0), x, torch.tensor([3]))
    assert torch.all(out["pred_xstart"] == 1.0)
    out = d.p_mean_variance(lambda x, t: torch.full_like(x, 5.0), x, torch.tensor([3]),
                            clip_denoised=False, denoised_fn=lambda v: v * 0.1)
    torch.testing.assert_close(out["pred_xstart"], torch.full_like(x, 0.5))


def test_rescale_timesteps_unspaced():
    d = make(100, rescale_timesteps=True)
    seen = []
    d.p_sample(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.zeros(1, 1, 2, 2), torch.tensor([7]))
    assert seen[0].item() == pytest.approx(70.0)


def test_script_util_maps_flags():
    d = create_gaussian_diffusion(steps=100, use_kl=True)
    assert d.loss_type == LossType.RESCALED_KL
    d = create_gaussian_diffusion(steps=100, rescale_learned_sigmas=True, learn_sigma=True, predict_xstart=True)
    assert (d.loss_type, d.model_var_type, d.model_mean_type) == (
        LossType.RESCALED_MSE, ModelVarType.LEARNED_RANGE, ModelMeanType.START_X
    )
    d = create_gaussian_diffusion(steps=100, sigma_small=True)
    assert (d.loss_type, d.model_var_type, d.model_mean_type) == (
        LossType.MSE, ModelVarType.FIXED_SMALL, ModelMeanType.EPSILON
    )
    assert create_gaussian_diffusion(steps=100).model_var_type == ModelVarType.FIXED_LARGE
    assert LossType.KL.is_vb() and not LossType.RESCALED_MSE.is_vb()


@pytest.mark.gpu
def test_cuda_sampling_loop_never_synchronises(smooth_model):
    device = torch.device("cuda")
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim10", learn_sigma=True)

    def model(x, t, **kw):
        return torch.cat([smooth_model(x, t), torch.zeros_like(x)], 1)

    d.ddim_sample_loop(model, (2, 1, 4, 4), device=device)  # builds the device tables and map once
    assert d._tables(device)["alphas_cumprod"].dtype == torch.float64
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = d.ddim_sample_loop(model, (2, 1, 4, 4), device=device, eta=0.5)
        out = d.p_sample_loop(model, (2, 1, 4, 4), device=device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and torch.isfinite(out).all()


# ---------------------------------------------------------------- v-prediction (Salimans & Ho 2022)


def test_v_x0_eps_roundtrips():
    # v = a eps - s x0;  x0 = a x_t - s v;  eps = s x_t + a v  (a = sqrt(abar), s = sqrt(1 - abar))
    T = 100
    d = make(T, mean=ModelMeanType.VELOCITY)
    abar = closed_form_tables(T)[1]
    x0, eps, t, xt, _ = noisy_batch(T, 11, (3, 1, 4, 4), [0, 37, 99])
    a = torch.tensor(np.sqrt(abar[t.numpy()]), dtype=torch.float32).reshape(-1, 1, 1, 1)
    s = torch.sqrt(1 - a**2)
    v = d._predict_v(x0, t, eps)
    torch.testing.assert_close(v, a * eps - s * x0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.predict_xstart_from_output(xt, t, v), x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d._predict_eps_from_xstart(xt, t, d.predict_xstart_from_output(xt, t, v)), eps,
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s * xt + a * v, eps, rtol=1e-4, atol=1e-5)


def test_predict_xstart_from_output_every_mean_type(oracle_cls):
    T = 50
    abar = closed_form_tables(T)[1]
    x0, _, t, xt, _ = noisy_batch(T, 12, (2, 1, 3, 3), [4, 40])
    for mean, kind in ((ModelMeanType.EPSILON, "eps"), (ModelMeanType.START_X, "x0"), (ModelMeanType.VELOCITY, "v")):
        d = make(T, mean=mean)
        out = oracle_cls(x0, abar, kind)(xt, t)
        torch.testing.assert_close(d.predict_xstart_from_output(xt, t, out), x0, rtol=1e-4, atol=1e-4)
        # with a learned variance the extra channels are dropped
        d = make(T, mean=mean, var=ModelVarType.LEARNED_RANGE)
        both = torch.cat([out, torch.full_like(out, 7.0)], 1)
        torch.testing.assert_close(d.predict_xstart_from_output(xt, t, both), x0, rtol=1e-4, atol=1e-4)
    d = make(T, mean=ModelMeanType.PREVIOUS_X)
    mean_prev = d.q_posterior_mean_variance(x0, xt, t)[0]
    torch.testing.assert_close(d.predict_xstart_from_output(xt, t, mean_prev), x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit x_t"):
        make(T).predict_xstart_from_output(xt, t, torch.zeros(2, 2, 3, 3))


def test_v_mse_is_x0_mse_times_snr_plus_one():
    T = 100
    d = make(T, mean=ModelMeanType.VELOCITY)
    abar = closed_form_tables(T)[1]
    x0, noise, t, xt, g = noisy_batch(T, 13, (4, 1, 5, 5), [1, 20, 60, 99])
    v_hat = torch.randn(x0.shape, generator=g)  # an arbitrary prediction
    mse_v = d.training_losses(lambda x, ts: v_hat, x0, t, noise=noise)["mse"]
    x0_hat = d.predict_xstart_from_output(xt, t, v_hat)
    mse_x0 = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    snr = torch.tensor(abar[t.numpy()] / (1 - abar[t.numpy()]), dtype=torch.float32)
    torch.testing.assert_close(mse_v, mse_x0 * (snr + 1), rtol=1e-4, atol=1e-6)
    # the exact v has zero loss
    v = d._predict_v(x0, t, noise)
    assert d.training_losses(lambda x, ts: v, x0, t, noise=noise)["mse"].abs().max() < 1e-10


def test_v_through_p_mean_variance_clips_and_ddim_step_matches_eps(oracle_cls):
    # one DDIM step of a v-oracle equals the step of the eps-oracle on the same x_t
    T = 100
    abar = closed_form_tables(T)[1]
    x0, _, t, xt, _ = noisy_batch(T, 14, (2, 1, 3, 3), [70, 70], span=1.8)
    dv, de = make(T, mean=ModelMeanType.VELOCITY), make(T)
    a = dv.ddim_sample(oracle_cls(x0, abar, "v"), xt, t)["sample"]
    b = de.ddim_sample(oracle_cls(x0, abar, "eps"), xt, t)["sample"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out = dv.p_mean_variance(lambda x, ts: torch.full_like(x, -9.0), xt, t)
    assert out["pred_xstart"].max() <= 1.0 and out["pred_xstart"].min() >= -1.0


def test_predict_v_and_xstart_are_exclusive():
    with pytest.raises(ValueError, match="exclusive"):
        create_gaussian_diffusion(steps=100, predict_v=True, predict_xstart=True)
    assert create_gaussian_diffusion(steps=100, predict_v=True).model_mean_type == ModelMeanType.VELOCITY


# -------------------------------------------------------------- zero terminal SNR (Lin et al. 2023)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_schedule(schedule):
    T = 1000
    betas = gd.get_named_beta_schedule(schedule, T)
    new = gd.rescale_zero_terminal_snr(betas)
    abar_old, abar_new = np.cumprod(1 - betas), np.cumprod(1 - new)
    assert abar_new[-1] == 0.0 and new[-1] == 1.0
    assert abar_new[0] == pytest.approx(abar_old[0], rel=1e-12)
    assert np.all(np.diff(abar_new) < 0) and np.all((new > 0) & (new <= 1))
    # sqrt(abar) is an affine map of the old one: (s - s_T) * s_1 / (s_1 - s_T)
    s_old = np.sqrt(abar_old)
    expected = (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1])
    np.testing.assert_allclose(np.sqrt(abar_new), expected, rtol=1e-9, atol=1e-12)


def test_zero_terminal_snr_refuses_epsilon_and_samples_with_v(oracle_cls):
    T = 100
    with pytest.raises(ValueError, match="epsilon prediction is undefined"):
        create_gaussian_diffusion(steps=T, zero_terminal_snr=True)
    d = create_gaussian_diffusion(steps=T, zero_terminal_snr=True, predict_v=True, timestep_respacing="3")
    base = create_gaussian_diffusion(steps=T, zero_terminal_snr=True, predict_v=True)
    assert 99 in d.timestep_map  # "3" keeps both ends: sampling starts at t = T
    assert base.alphas_cumprod[-1] == 0.0 and d.alphas_cumprod[-1] == 0.0
    g = torch.Generator().manual_seed(15)
    x0 = torch.rand(2, 1, 3, 3, generator=g) * 1.8 - 0.9
    model = oracle_cls(x0, base.alphas_cumprod, "v")
    # at t = T the input is pure noise, and x0 = -v is still defined
    xT = torch.randn(x0.shape, generator=g)
    out = base.p_mean_variance(model, xT, torch.full((2,), T - 1))
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(v).all() for v in out.values())
    sample = d.ddim_sample_loop(model, x0.shape, noise=xT)
    torch.testing.assert_close(sample, x0, rtol=1e-4, atol=1e-4)
    loss = base.training_losses(model, x0, torch.tensor([T - 1, 0]))
    assert torch.isfinite(loss["loss"]).all() and loss["mse"].max() < 1e-8
