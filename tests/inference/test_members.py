from __future__ import annotations

import numpy as np
import pytest

from medsegdiff.inference.members import (
    brain_region,
    members_path,
    native_members,
    read_members,
    write_members,
)


def test_members_file_round_trip_bit_packed(tmp_path):
    rng = np.random.default_rng(0)
    members = rng.random((3, 4, 5, 7)) < 0.2
    brain = rng.random((4, 5, 7)) < 0.7
    path = write_members(members_path(tmp_path, "sub-stroke0001"), members, brain)
    assert path.name == "sub-stroke0001_members.npz"
    got_m, got_b = read_members(path)
    np.testing.assert_array_equal(got_m, members)
    np.testing.assert_array_equal(got_b, brain)
    with pytest.raises(ValueError, match="must be"):
        write_members(tmp_path / "x.npz", members, brain[0])


def test_brain_region_is_the_filled_support_of_the_inputs():
    img = np.zeros((2, 1, 5, 5), np.float32)
    img[0, 0, 1:4, 1:4] = 1.0
    img[0, 0, 2, 2] = 0.0  # a hole inside: filled
    img[1, 0, 0, 0] = 0.5  # another channel adds its support
    region = brain_region(img)
    expected = np.zeros((1, 5, 5), bool)
    expected[0, 1:4, 1:4] = True
    expected[0, 0, 0] = True
    np.testing.assert_array_equal(region, expected)


def test_native_members_on_the_same_grid_is_thresholding():
    from medsegdiff.data.loading import Geometry

    geo = Geometry(size=(4, 3, 2), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                   direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    probs = np.random.default_rng(1).random((2, 2, 3, 4)).astype(np.float32)
    image = np.ones((1, 2, 3, 4), np.float32)
    masks, brain = native_members(probs, image, 0.5, geo, geo)
    np.testing.assert_array_equal(masks, probs >= 0.5)
    assert brain.all()
