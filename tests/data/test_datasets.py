"""Datasets and sampler over a hand-made cache: items, 2.5D context, oversampling rate, resume, ranks."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader

from medsegdiff.config.data import AugmentConfig, SplitConfig
from medsegdiff.data.cache import CACHE_FORMAT, MANIFEST, Manifest
from medsegdiff.data.datasets import LesionOversamplingSampler, PatchDataset, SliceDataset
from medsegdiff.data.preprocess import write_case
from medsegdiff.data.splits import make_splits
from medsegdiff.errors import DataError
from medsegdiff.utils.io import atomic_write_json

C, H, W = 2, 8, 8


def make_cache(root, n_slices: dict[str, int], lesion_slices: dict[str, list[int]]) -> Manifest:
    """A cache whose image value at (c, z, y, x) is 100 * case_index + 10 * c + z (exact in float16)."""
    records = []
    for i, (cid, nz) in enumerate(n_slices.items()):
        image = np.zeros((C, nz, H, W), dtype=np.float16)
        for c in range(C):
            for z in range(nz):
                image[c, z] = 100 * i + 10 * c + z
        mask = np.zeros((nz, H, W), dtype=np.uint8)
        for z in lesion_slices.get(cid, []):
            mask[z, 2:5, 3:6] = 1
        record = {"case_id": cid, "native_geometry": {}, "cache_geometry": {}, "shape": [C, nz, H, W],
                  "lesion": {"voxels": int(mask.sum()), "ml": 0.0, "components": 1},
                  "lesion_slices": sorted(lesion_slices.get(cid, []))}
        write_case(root / cid, record, {"image": image, "mask": mask, "native_mask": mask},
                   settings_hash="h0", source="hand")
        records.append(record)
    atomic_write_json(root / MANIFEST, {"format_version": CACHE_FORMAT, "hash": "h0",
                                        "settings": {"modalities": ["cbf", "tmax"]}, "cases": records,
                                        "skipped": []})
    return Manifest.open(root)


@pytest.fixture()
def manifest(tmp_path):
    return make_cache(tmp_path, {"sub-a": 5, "sub-b": 3, "sub-c": 4}, {"sub-a": [1, 2], "sub-c": [3]})


def test_items_follow_the_contract(manifest):
    ds = SliceDataset(manifest, ["sub-a", "sub-b"])
    assert len(ds) == 8 and ds.in_channels == 2
    item = ds[6]  # sub-b, slice 1
    assert set(item) == {"image", "mask", "case_id", "slice"}
    assert item["case_id"] == "sub-b" and item["slice"] == 1
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, H, W)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, H, W)
    assert torch.all(item["image"][0] == 101) and torch.all(item["image"][1] == 111)
    assert ds.lesion_flags.tolist() == [False, True, True, False, False, False, False, False]
    assert ds[1]["mask"].sum() == 9 and ds[0]["mask"].sum() == 0


def test_context_slices_stack_the_right_neighbours_clamped_at_edges(manifest):
    ds = SliceDataset(manifest, ["sub-a"], context_slices=2)
    assert ds.in_channels == C * 5
    expected = {  # slice z -> neighbour slices z-2 .. z+2 clamped to [0, 4]
        0: [0, 0, 0, 1, 2],
        1: [0, 0, 1, 2, 3],
        4: [2, 3, 4, 4, 4],
    }
    for z, zs in expected.items():
        image = ds[z]["image"]
        values = image[:, 0, 0].tolist()
        # offset-major: channel j * C + c is modality c of slice zs[j]
        assert values == [10 * c + zz for zz in zs for c in range(C)], (z, values)
    vol = ds.volume("sub-a")
    assert vol.shape == (5, C * 5, H, W)
    for z in range(5):
        assert torch.equal(vol[z], ds[z]["image"])
    assert ds.mask_volume("sub-a").shape == (5, 1, H, W)


def test_dataset_reads_no_nifti_and_pickles(manifest, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("SimpleITK.ReadImage called while iterating the training set")

    monkeypatch.setattr(sitk, "ReadImage", forbidden)
    ds = SliceDataset(manifest, manifest.case_ids, context_slices=1, augment=AugmentConfig(), seed=3)
    ds = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive (memory maps reopened)
    sampler = LesionOversamplingSampler(ds.lesion_flags, rate=0.5, num_samples=24, seed=1)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0)
    batches = list(loader)
    assert len(batches) == 6 and batches[0]["image"].shape == (4, C * 3, H, W)
    assert isinstance(manifest.case("sub-a").image, np.memmap)


def test_augmentation_is_a_pure_function_of_the_sample_seed(manifest):
    ds = SliceDataset(manifest, manifest.case_ids, augment=AugmentConfig(rotate_prob=1.0, intensity_prob=1.0))
    a, b = ds[(1, 12345)], ds[(1, 12345)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    c = ds[(1, 999)]
    assert not torch.equal(a["image"], c["image"])


def test_unknown_case_is_a_data_error(manifest):
    with pytest.raises(DataError, match=r"case 'sub-zzz' is not in the cache"):
        SliceDataset(manifest, ["sub-zzz"])


def test_split_slices_never_cross(manifest):
    splits = make_splits(manifest.case_ids, SplitConfig(seed=0, test_fraction=0.34, val_fraction=0.34))
    seen = {}
    for name in ("train", "val", "test"):
        ids = getattr(splits, name)
        if not ids:
            continue
        ds = SliceDataset(manifest, ids)
        for i in range(len(ds)):
            cid = ds[i]["case_id"]
            assert seen.setdefault(cid, name) == name
    assert set(seen) == set(manifest.case_ids)


def test_sampler_hits_the_lesion_rate():
    flags = np.zeros(1000, dtype=bool)
    flags[::10] = True  # 10 % lesion slices
    n, rate = 4000, 0.6
    sampler = LesionOversamplingSampler(flags, rate=rate, num_samples=n, seed=0)
    drawn = [i for i, _ in sampler]
    frac = flags[drawn].mean()
    std = math.sqrt(rate * (1 - rate) / n)  # binomial standard deviation of the fraction
    assert abs(frac - rate) < 4 * std, (frac, std)
    lesion_draws = [i for i in drawn if flags[i]]
    assert len(set(lesion_draws)) == 100  # permutation cycling visits every lesion slice


def test_sampler_is_deterministic_per_epoch_and_resumes_exactly():
    flags = np.arange(50) % 7 == 0
    s = LesionOversamplingSampler(flags, rate=0.5, num_samples=40, seed=5)
    epoch0 = list(s)
    epoch1 = list(s)  # epoch advances automatically after a full pass
    assert epoch0 != epoch1
    s.set_epoch(0)
    assert list(s) == epoch0
    # interrupt after 13 samples of epoch 1, save, restore into a fresh sampler
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(13)]
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 13
    fresh = LesionOversamplingSampler(flags, rate=0.5, num_samples=40, seed=5)
    fresh.load_state_dict(state)
    assert head + list(fresh) == epoch1
    with pytest.raises(DataError, match=r"sampler state has num_samples=40"):
        LesionOversamplingSampler(flags, rate=0.5, num_samples=41, seed=5).load_state_dict(state)


def test_sampler_ranks_get_disjoint_shares_of_the_global_draw():
    flags = np.arange(30) % 3 == 0
    single = list(LesionOversamplingSampler(flags, rate=0.3, num_samples=12, seed=2))
    ranks = [list(LesionOversamplingSampler(flags, rate=0.3, num_samples=12, seed=2, rank=r, world_size=3))
             for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    # round-robin dealing of the same global sequence: positions are disjoint, seeds differ per sample
    assert [ranks[p % 3][p // 3] for p in range(12)] == single
    seeds = [sd for r in ranks for _, sd in r]
    assert len(set(seeds)) == 12


def test_rate_zero_switches_oversampling_off():
    flags = np.zeros(40, dtype=bool)
    flags[:4] = True
    drawn = [i for i, _ in LesionOversamplingSampler(flags, rate=0.0, num_samples=40, seed=1)]
    assert sorted(drawn) == list(range(40))  # one permutation of every slice, lesion slices included


def test_sampler_edge_cases():
    only_lesion = np.ones(5, dtype=bool)
    assert all(only_lesion[i] for i, _ in LesionOversamplingSampler(only_lesion, rate=0.2, seed=0))
    with pytest.raises(DataError, match=r"rate must be in \[0, 1\]"):
        LesionOversamplingSampler(only_lesion, rate=1.5)
    with pytest.raises(DataError, match=r"no slices"):
        LesionOversamplingSampler(np.zeros(0, dtype=bool), rate=0.5)


def test_patch_dataset_centres_on_lesions_and_pads(manifest):
    ds = PatchDataset(manifest, ["sub-a", "sub-c"], patch_size=(8, 4, 4), lesion_rate=1.0, samples_per_epoch=6)
    assert len(ds) == 6
    for i in range(6):
        item = ds[(i, 100 + i)]
        assert item["image"].shape == (C, 8, 4, 4) and item["mask"].shape == (1, 8, 4, 4)
        assert item["mask"].sum() > 0  # lesion-centred
        nz = 5 if item["case_id"] == "sub-a" else 4
        assert torch.all(item["image"][:, nz:] == 0)  # zero padding beyond the volume (Z < D)
    assert torch.equal(ds[(3, 7)]["image"], ds[(3, 7)]["image"])


def test_missing_and_stale_cache_errors(tmp_path, manifest):
    with pytest.raises(DataError, match=r"no prepared cache here.*run `medsegdiff prepare"):
        Manifest.open(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"the cache is stale.*medsegdiff prepare"):
        Manifest.open(manifest.cache_dir, expected_hash="other")
    (manifest.cache_dir / "sub-b" / "done").unlink()
    with pytest.raises(DataError, match=r"sub-b: cached case is incomplete"):
        Manifest.open(manifest.cache_dir)
