"""Timestep samplers: importance weights and the second-moment rule (iDDPM Sec. 3.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from improved_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from improved_diffusion.script_util import create_gaussian_diffusion


@pytest.fixture
def diffusion():
    return create_gaussian_diffusion(steps=100, timestep_respacing="ddim4")  # T' = 4


def test_uniform_sampler(diffusion):
    s = create_named_schedule_sampler("uniform", diffusion)
    assert isinstance(s, UniformSampler)
    t, w = s.sample(64, "cpu", generator=np.random.default_rng(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 3
    assert torch.all(w == 1.0) and w.dtype == torch.float32
    t2, _ = s.sample(64, "cpu", generator=np.random.default_rng(0))
    assert torch.equal(t, t2)


def test_second_moment_weights(diffusion):
    s = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(s, LossSecondMomentResampler)
    s = LossSecondMomentResampler(diffusion, history_per_term=2, uniform_prob=0.1)
    np.testing.assert_array_equal(s.weights(), np.ones(4))  # not warmed up
    s.update_with_local_losses(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2, 3, 4, 1, 2, 3]))
    np.testing.assert_array_equal(s.weights(), np.ones(4))  # step 3 has one loss only
    s.update_with_all_losses([3, 3], [8.0, 4.0])  # history of step 3 shifts: [4, 8] -> [8, 4]
    rms = np.array([1.0, 2.0, 3.0, np.sqrt((64 + 16) / 2)])
    expected = rms / rms.sum() * 0.9 + 0.1 / 4
    np.testing.assert_allclose(s.weights(), expected)
    _, w = s.sample(10, "cpu", generator=np.random.default_rng(1))
    assert torch.all(w > 0)
    state = s.state_dict()
    s2 = LossSecondMomentResampler(diffusion, history_per_term=2, uniform_prob=0.1)
    s2.load_state_dict(state)
    np.testing.assert_allclose(s2.weights(), expected)


def test_unknown_sampler(diffusion):
    with pytest.raises(NotImplementedError, match="unknown schedule sampler: 'x'"):
        create_named_schedule_sampler("x", diffusion)
