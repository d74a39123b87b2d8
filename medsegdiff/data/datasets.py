"""Training / inference datasets over the prepared cache, and the lesion-oversampling sampler.

* :class:`SliceDataset`: 2D slices ``(C_in, H, W)``, optionally 2.5D with ``context_slices``
  neighbours on each side stacked as extra channels (clamped at the volume edges).
* :class:`PatchDataset`: 3D patches ``(C, D, H, W)``, lesion-centred with a given probability.
* :class:`LesionOversamplingSampler`: a fraction ``rate`` of the samples comes from lesion slices;
  deterministic per epoch, split across distributed ranks, resumable at the exact sample.

Both datasets read only the cache (read-only memory maps); they never open a NIfTI file. Items are
dicts ``{"image": float32 (C_in, *S), "mask": float32 (1, *S) in {0, 1}, "case_id": str,
"slice": int}``. An item can be requested by an int index or by an ``(index, sample_seed)`` tuple
(what the sampler yields): augmentation randomness then depends only on ``sample_seed``, so the
sample at a given (seed, epoch, position) is always the same.

Channel order with context slices is offset-major: channel ``j * C + c`` is modality ``c`` of slice
``z + j - context_slices`` (``j = 0 .. 2 * context_slices``); the centre slice's modalities are
channels ``context_slices * C .. (context_slices + 1) * C - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medsegdiff.config.data import AugmentConfig
from medsegdiff.data.augment import augment_sample, build_augment
from medsegdiff.data.cache import CachedCase, Manifest
from medsegdiff.errors import DataError

Key = int | tuple[int, int]


def _split_key(key: Any) -> tuple[int, int | None]:
    if isinstance(key, tuple):
        idx, seed = key
        return int(idx), int(seed)
    return int(key), None


def _derived_seed(seed: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, index)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(1)[0])


class _CacheDataset(Dataset):
    def __init__(self, manifest: Manifest, case_ids: Sequence[str], augment: AugmentConfig | None,
                 seed: int, spatial_dims: int) -> None:
        if not case_ids:
            raise DataError("dataset has no cases; check the split (data.split) and the prepared cache")
        self.manifest = manifest
        self.case_ids = list(case_ids)
        self.cases: list[CachedCase] = [manifest.case(c) for c in self.case_ids]  # DataError for unknown ids
        self.augment_cfg = augment if augment is not None and augment.enabled else None
        self.seed = int(seed)
        self.spatial_dims = spatial_dims
        self._transform: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_transform"] = None  # rebuilt lazily in each worker
        return state

    def _augment(self, sample: dict[str, Any], index: int, sample_seed: int | None) -> dict[str, Any]:
        if self.augment_cfg is None:
            return sample
        if self._transform is None:
            self._transform = build_augment(self.augment_cfg, spatial_dims=self.spatial_dims)
        seed = sample_seed if sample_seed is not None else _derived_seed(self.seed, index)
        return augment_sample(self._transform, sample, seed)


class SliceDataset(_CacheDataset):
    """Every slice of the given cases as one item (2D, or 2.5D with context slices).

    Args:
        manifest: the opened cache.
        case_ids: the cases of this set (e.g. ``splits.train``); all their slices are items.
        context_slices: neighbours on each side stacked as channels (clamped at the edges).
        augment: ``data.augment`` for training; None (or ``enabled: false``) for evaluation.
        seed: base seed for augmentation when an item is requested by a plain int index.

    Attributes:
        lesion_flags: bool ``(len(self),)``, True for slices with lesion voxels (cache grid).

    Raises:
        DataError: no cases, or a case id that is not in the cache.
    """

    def __init__(self, manifest: Manifest, case_ids: Sequence[str], *, context_slices: int = 0,
                 augment: AugmentConfig | None = None, seed: int = 0) -> None:
        super().__init__(manifest, case_ids, augment, seed, spatial_dims=2)
        if context_slices < 0:
            raise DataError(f"context_slices must be >= 0, got {context_slices}; fix data.context_slices")
        self.context_slices = int(context_slices)
        counts = [c.num_slices for c in self.cases]
        self._case_of = np.repeat(np.arange(len(self.cases), dtype=np.int64), counts)
        self._slice_of = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        self.lesion_flags = np.concatenate([c.lesion_slices for c in self.cases])
        self._first = {cid: int(s) for cid, s in zip(self.case_ids, np.cumsum([0, *counts[:-1]]))}

    @property
    def in_channels(self) -> int:
        """``C_in = len(modalities) * (1 + 2 * context_slices)``."""
        return len(self.manifest.modalities) * (1 + 2 * self.context_slices)

    def __len__(self) -> int:
        return int(self._case_of.shape[0])

    def index_of(self, case_id: str, z: int) -> int:
        """Dataset index of slice ``z`` of ``case_id``."""
        return self._first[case_id] + int(z)

    def _stack(self, case: CachedCase, zs: np.ndarray) -> np.ndarray:
        """float32 ``(len(zs), C_in, H, W)`` with neighbours stacked offset-major."""
        k = self.context_slices
        n_z = case.num_slices
        if k == 0:
            block = np.asarray(case.image[:, zs], dtype=np.float32)  # (C, N, H, W)
            return np.ascontiguousarray(block.transpose(1, 0, 2, 3))
        offsets = np.arange(-k, k + 1)
        idx = np.clip(zs[:, None] + offsets[None, :], 0, n_z - 1)  # (N, 2k+1)
        block = np.asarray(case.image[:, idx.reshape(-1)], dtype=np.float32)  # (C, N*(2k+1), H, W)
        c, _, h, w = block.shape
        block = block.reshape(c, len(zs), 2 * k + 1, h, w).transpose(1, 2, 0, 3, 4)
        return np.ascontiguousarray(block.reshape(len(zs), (2 * k + 1) * c, h, w))

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, sample_seed = _split_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"slice index {index} out of range for {len(self)} slices")
        index %= len(self)
        case = self.cases[int(self._case_of[index])]
        z = int(self._slice_of[index])
        image = self._stack(case, np.array([z]))[0]
        mask = np.asarray(case.mask[z], dtype=np.float32)[None]
        sample = {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
                  "case_id": case.case_id, "slice": z}
        return self._augment(sample, index, sample_seed)

    def volume(self, case_id: str) -> torch.Tensor:
        """All slices of one case for inference: float32 ``(Z, C_in, H, W)`` (no augmentation).

        Raises:
            DataError: ``case_id`` is not one of this dataset's cases.
        """
        case = self._case(case_id)
        return torch.from_numpy(self._stack(case, np.arange(case.num_slices)))

    def mask_volume(self, case_id: str) -> torch.Tensor:
        """The cache-grid mask of one case: float32 ``(Z, 1, H, W)``."""
        case = self._case(case_id)
        return torch.from_numpy(np.asarray(case.mask, dtype=np.float32)[:, None])

    def _case(self, case_id: str) -> CachedCase:
        if case_id not in self._first:
            raise DataError(f"case '{case_id}' is not in this dataset ({len(self.case_ids)} cases)")
        return self.cases[self.case_ids.index(case_id)]


class PatchDataset(_CacheDataset):
    """Random 3D patches ``(C, D, H, W)``, lesion-centred with probability ``lesion_rate``.

    Item ``i`` comes from case ``i % len(case_ids)``; the patch centre is drawn with a generator
    seeded by the sample seed (or by ``(seed, i)`` for a plain int index), so items are reproducible.
    Volumes smaller than the patch are zero-padded at the end. ``slice`` is the first patch slice.

    Args:
        manifest: the opened cache.
        case_ids: the cases of this set.
        patch_size: ``(D, H, W)``.
        lesion_rate: probability that the patch is centred on a random lesion voxel (cases with a
            lesion); otherwise the centre is uniform over the volume.
        augment: ``data.augment`` or None.
        seed: base seed.
        samples_per_epoch: dataset length; 0 = one patch per case.

    Raises:
        DataError: bad patch size, no cases, or unknown case ids.
    """

    def __init__(self, manifest: Manifest, case_ids: Sequence[str], *, patch_size: Sequence[int],
                 lesion_rate: float = 0.5, augment: AugmentConfig | None = None, seed: int = 0,
                 samples_per_epoch: int = 0) -> None:
        super().__init__(manifest, case_ids, augment, seed, spatial_dims=3)
        if len(patch_size) != 3 or any(int(s) < 1 for s in patch_size):
            raise DataError(f"patch_size must be three positive integers (D, H, W), got {list(patch_size)}; "
                            "fix data.patch_size")
        self.patch_size = tuple(int(s) for s in patch_size)
        self.lesion_rate = float(lesion_rate)
        self.length = int(samples_per_epoch) or len(self.cases)

    def __len__(self) -> int:
        return self.length

    @property
    def in_channels(self) -> int:
        return len(self.manifest.modalities)

    def _centre(self, case: CachedCase, rng: np.random.Generator) -> tuple[int, int, int]:
        _, n_z, n_h, n_w = case.shape
        lesion_z = np.flatnonzero(case.lesion_slices)
        if lesion_z.size and rng.random() < self.lesion_rate:
            z = int(lesion_z[rng.integers(lesion_z.size)])
            ys, xs = np.nonzero(np.asarray(case.mask[z]))
            j = int(rng.integers(ys.size))
            return z, int(ys[j]), int(xs[j])
        return int(rng.integers(n_z)), int(rng.integers(n_h)), int(rng.integers(n_w))

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, sample_seed = _split_key(key)
        case = self.cases[index % len(self.cases)]
        rng = np.random.default_rng(sample_seed if sample_seed is not None else _derived_seed(self.seed, index))
        centre = self._centre(case, rng)
        dims = case.shape[1:]
        starts = [min(max(c - p // 2, 0), max(n - p, 0)) for c, p, n in zip(centre, self.patch_size, dims)]
        region = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        image = np.asarray(case.image[(slice(None), *region)], dtype=np.float32)
        mask = np.asarray(case.mask[region], dtype=np.float32)[None]
        pad = [(0, p - n) for p, n in zip(self.patch_size, image.shape[1:])]
        if any(after for _, after in pad):
            image = np.pad(image, [(0, 0), *pad])
            mask = np.pad(mask, [(0, 0), *pad])
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image)),
                  "mask": torch.from_numpy(np.ascontiguousarray(mask)),
                  "case_id": case.case_id, "slice": int(starts[0])}
        return self._augment(sample, index, int(rng.integers(2**32)))


class LesionOversamplingSampler(Sampler):
    """Draws a fraction ``rate`` of the samples from lesion slices, the rest from the other slices.

    Each sample is a Bernoulli(``rate``) choice of pool; inside a pool the indices follow random
    permutations of the pool (repeated as needed), so every slice of a pool is visited before any
    repeats. ``rate == 0`` switches oversampling off: uniform over all slices (lesion or not). The
    draw of epoch ``e`` is a pure function of ``(seed, e)``: the global sequence of
    ``ceil(num_samples / world_size) * world_size`` samples is dealt round-robin, rank ``r`` taking
    positions ``r, r + world_size, ...`` (disjoint shares). Each sample carries its own 32-bit
    ``sample_seed`` for augmentation. If one pool is empty, all samples come from the other.

    Yields:
        ``(index, sample_seed)`` tuples for the datasets in this module.

    Resume: :meth:`state_dict` holds ``epoch`` and ``position`` (samples of this epoch already
    yielded on this rank); after :meth:`load_state_dict` iteration continues at exactly that sample.
    Behind a prefetching ``DataLoader`` the sampler runs ahead of the consumer; pass the number of
    samples actually consumed as ``state_dict(position=...)``.

    Args:
        lesion_flags: bool per dataset index (``SliceDataset.lesion_flags``).
        rate: fraction of samples from lesion slices, in [0, 1]; 0 = off (uniform over all slices).
        num_samples: samples per epoch over all ranks; 0 = ``len(lesion_flags)``.
        seed: base seed.
        rank: this process's rank.
        world_size: number of ranks.
        shuffle: if False, every epoch repeats epoch 0's draw.

    Raises:
        DataError: empty dataset, rate outside [0, 1] or a bad rank.
    """

    def __init__(self, lesion_flags: Sequence[bool] | np.ndarray, *, rate: float, num_samples: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        flags = np.asarray(lesion_flags, dtype=bool)
        if flags.ndim != 1 or flags.size == 0:
            raise DataError("the training set has no slices; check the split and the prepared cache")
        if not 0.0 <= rate <= 1.0:
            raise DataError(f"lesion oversampling rate must be in [0, 1], got {rate}; fix data.lesion_oversample")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0 .. world_size-1 = {world_size - 1}")
        self.lesion_pool = np.flatnonzero(flags)
        self.other_pool = np.flatnonzero(~flags)
        self.rate = float(rate)
        self.num_samples = int(num_samples) or int(flags.size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first sample."""
        self.epoch = int(epoch)
        self.position = 0

    @staticmethod
    def _cycle(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        reps = math.ceil(n / pool.size)
        return np.concatenate([pool[rng.permutation(pool.size)] for _ in range(reps)])[:n]

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(indices, sample_seeds)`` of ``epoch`` (int64 arrays of length ``len(self)``)."""
        total = len(self) * self.world_size
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**63, epoch if self.shuffle else 0]))
        if self.rate == 0.0:  # oversampling off: uniform over all slices
            pool = np.arange(self.lesion_pool.size + self.other_pool.size)
            indices = self._cycle(pool, total, rng)
            seeds = rng.integers(0, 2**32, size=total, dtype=np.int64)
            return indices[self.rank::self.world_size], seeds[self.rank::self.world_size]
        if self.lesion_pool.size and self.other_pool.size:
            from_lesion = rng.random(total) < self.rate
        else:
            from_lesion = np.full(total, self.lesion_pool.size > 0)
        indices = np.empty(total, dtype=np.int64)
        indices[from_lesion] = self._cycle(self.lesion_pool, int(from_lesion.sum()), rng)
        indices[~from_lesion] = self._cycle(self.other_pool, int((~from_lesion).sum()), rng)
        seeds = rng.integers(0, 2**32, size=total, dtype=np.int64)
        return indices[self.rank::self.world_size], seeds[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.draw(self.epoch)
        start = self.position
        for p in range(start, len(indices)):
            self.position = p + 1
            yield int(indices[p]), int(seeds[p])
        self.epoch += 1
        self.position = 0

    def state_dict(self, *, epoch: int | None = None, position: int | None = None) -> dict[str, int]:
        """``{"epoch", "position", "seed", "num_samples", "world_size"}``; override epoch/position if known."""
        return {"epoch": self.epoch if epoch is None else int(epoch),
                "position": self.position if position is None else int(position),
                "seed": self.seed, "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state["epoch"]``, ``state["position"]``.

        Raises:
            DataError: the state was saved with another seed, epoch size or world size.
        """
        for key in ("seed", "num_samples", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}; "
                                "resume with the same data.samples_per_epoch, seed and number of processes")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


__all__ = ["LesionOversamplingSampler", "PatchDataset", "SliceDataset"]
