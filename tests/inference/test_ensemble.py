from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.inference.ensemble import (
    binarize,
    binary_entropy_bits,
    combine,
    combine_staple,
    official_staple,
    uncertainty,
)

# three members, four voxels
MEMBERS = np.array(
    [
        [0.2, 0.9, 0.5, 0.0],
        [0.4, 0.6, 0.5, 0.0],
        [0.9, 0.0, 0.2, 1.0],
    ],
    dtype=np.float32,
)


def test_mean_and_vote_by_hand():
    np.testing.assert_allclose(combine(MEMBERS, "mean"), [0.5, 0.5, 0.4, 1 / 3], atol=1e-6)
    # >= 0.5 votes: [0,1,1,0], [0,1,1,0], [1,0,0,1]
    np.testing.assert_allclose(combine(MEMBERS, "vote", 0.5), [1 / 3, 2 / 3, 2 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_array_equal(binarize(combine(MEMBERS, "vote", 0.5), 0.9, "vote"), [0, 1, 1, 0])


def test_vote_tie_counts_as_lesion():
    two = np.array([[0.9, 0.9, 0.1], [0.1, 0.9, 0.1]], dtype=np.float32)
    frac = combine(two, "vote", 0.5)
    np.testing.assert_allclose(frac, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(binarize(frac, 0.5, "vote"), [1, 1, 0])


def test_std_and_entropy_by_hand():
    # population std: sqrt(0.26/3), sqrt(0.42/3), sqrt(0.06/3), sqrt(2/9)
    np.testing.assert_allclose(uncertainty(MEMBERS, "std"),
                               [np.sqrt(0.26 / 3), np.sqrt(0.14), np.sqrt(0.02), np.sqrt(2 / 9)], atol=1e-6)
    # binary entropy of the mean, bits: H(.5) = 1, H(.4) = .970951, H(1/3) = .918296
    np.testing.assert_allclose(uncertainty(MEMBERS, "entropy"), [1.0, 1.0, 0.970951, 0.918296], atol=1e-6)
    np.testing.assert_array_equal(binary_entropy_bits(np.array([0.0, 1.0])), [0.0, 0.0])


def _noisy_members(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.zeros((6, 12, 12), dtype=np.uint8)
    truth[1:5, 3:9, 2:10] = 1
    members = []
    for i in range(n):
        flip = rng.random(truth.shape) < 0.04 + 0.04 * i  # raters of decreasing quality
        members.append(np.where(flip, 1 - truth, truth).astype(np.float32))
    return np.stack(members), truth


def test_staple_matches_simpleitk_and_is_not_mean_squared():
    members, truth = _noisy_members()
    ours = combine_staple(members, threshold=0.5)
    flt = sitk.STAPLEImageFilter()
    flt.SetForegroundValue(1.0)
    ref = sitk.GetArrayFromImage(flt.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in members]))
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # 3 of 5 votes: mean^2 = 0.36 (below 0.5), STAPLE weighs the better raters and is far from it
    mean_sq = official_staple(members)
    assert np.abs(ours - mean_sq).max() > 0.3
    # STAPLE recovers the truth better than thresholding mean^2 at 0.5
    assert ((ours >= 0.5) == truth).mean() > ((mean_sq >= 0.5) == truth).mean()


def test_staple_degenerate_inputs():
    empty = np.zeros((3, 2, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(combine_staple(empty), np.zeros((2, 4, 4)))
    one = np.zeros((1, 2, 4, 4), dtype=np.float32)
    one[0, 1, 1, 1] = 0.7
    assert combine_staple(one)[1, 1, 1] == 1.0


def test_unknown_methods_raise():
    with pytest.raises(ValueError, match="combine method"):
        combine(MEMBERS, "median")
    with pytest.raises(ValueError, match="uncertainty method"):
        uncertainty(MEMBERS, "variance")
