from __future__ import annotations

import numpy as np

from medsegdiff.inference.windows import extract_patches, stitch, window_starts


def test_window_starts_by_hand():
    assert window_starts(10, 4) == [0, 2, 4, 6]
    assert window_starts(11, 4) == [0, 2, 4, 6, 7]  # last window flush with the border
    assert window_starts(3, 4) == [0]
    assert window_starts(8, 8) == [0]


def test_extract_then_stitch_is_identity_with_padding():
    rng = np.random.default_rng(0)
    vol = rng.random((2, 5, 9, 7)).astype(np.float32)  # (C, Z, H, W); Z smaller than the patch depth
    patches, starts, padded = extract_patches(vol, (8, 4, 4))
    assert padded == (8, 9, 7)
    assert patches.shape == (len(starts), 2, 8, 4, 4)
    assert len(starts) == 1 * 4 * 3  # z: [0]; y: [0, 2, 4, 5]; x: [0, 2, 3]
    # use the channels as "members": (M, N, D, h, w)
    back = stitch(patches.transpose(1, 0, 2, 3, 4), starts, padded, vol.shape[1:])
    np.testing.assert_allclose(back, vol, atol=1e-6)


def test_stitch_averages_overlaps():
    starts = [(0, 0, 0), (0, 0, 2)]
    patches = np.stack([np.zeros((1, 1, 4)), np.ones((1, 1, 4))])[None].astype(np.float32)  # (1, 2, 1, 1, 4)
    out = stitch(patches, starts, (1, 1, 6), (1, 1, 6))
    np.testing.assert_allclose(out[0, 0, 0], [0, 0, 0.5, 0.5, 1, 1])
