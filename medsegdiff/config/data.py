"""Data section of the config: discovery, checking, preprocessing, datasets, augmentation, splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import bad_value, option

MODALITIES = ("ncct", "cta", "cbf", "cbv", "mtt", "tmax", "ctp")

# Clip windows per modality, chosen so that every threshold clinicians use stays INSIDE the window
# (CLINICAL_THRESHOLDS below; a value above the window's top is clipped and cannot be told apart
# from the top). The winning team's windows (KurtLab, ISLES'24: CBF 0-35, CBV 0-10, MTT 0-20,
# Tmax 0-7, CTA 0-90) clip Tmax at 7 s, which hides the official baseline's 9 s and the 10 s
# severe-hypoperfusion threshold, and CBF at 35, which clips normal grey matter (~50-80
# mL/100 g/min), the reference that relative CBF (rCBF < 30 %) is measured against. Wider windows
# cost little: the cache stores float16 in [0, 1] (Tmax 0-20 s: ~0.005 s resolution at 9 s).
DEFAULT_WINDOWS: dict[str, list[float]] = {
    "cbf": [0.0, 70.0],   # another published ISLES'24 window; keeps normal tissue for rCBF
    "cbv": [0.0, 10.0],
    "mtt": [0.0, 20.0],
    "tmax": [0.0, 20.0],
    "cta": [0.0, 90.0],
    "ncct": [0.0, 80.0],  # brain window (level 40, width 80)
    "ctp": [0.0, 200.0],
}

# Thresholds in the maps' own units that the default windows keep visible (tested):
# Tmax > 6 s (hypoperfusion / penumbra, DEFUSE 3), > 9 s (official ISLES'24 baseline), > 10 s
# (severe hypoperfusion, hypoperfusion-intensity ratio); rCBF < 30 % of normal tissue (core,
# RAPID), i.e. CBF ~15 for normal tissue at ~50 and the normal level itself (up to ~60); CBV
# < 2 mL/100 g (core) and normal grey matter ~4-5.
CLINICAL_THRESHOLDS: dict[str, list[float]] = {
    "tmax": [6.0, 9.0, 10.0],
    "cbf": [15.0, 60.0],
    "cbv": [2.0, 4.5],
}


@dataclass
class AugmentConfig:
    """MONAI augmentations applied identically to image and mask (training only)."""

    enabled: bool = option(True, doc="apply augmentation to training samples")
    flip_prob: float = option(0.5, ge=0.0, le=1.0, doc="probability of a left-right flip")
    rotate_deg: float = option(10.0, ge=0.0, le=180.0, doc="max in-plane rotation in DEGREES")
    rotate_prob: float = option(0.3, ge=0.0, le=1.0)
    scale: float = option(0.1, ge=0.0, lt=1.0, doc="max relative zoom (0.1 = +-10 %)")
    scale_prob: float = option(0.3, ge=0.0, le=1.0)
    intensity_shift: float = option(0.05, ge=0.0, doc="max additive intensity shift")
    intensity_scale: float = option(0.05, ge=0.0, doc="max multiplicative intensity jitter")
    intensity_prob: float = option(0.3, ge=0.0, le=1.0)


@dataclass
class SplitConfig:
    """Subject-level split: test fraction held out, the rest split into k folds (or a val fraction)."""

    seed: int = option(0, doc="seed that fixes the split")
    test_fraction: float = option(0.2, ge=0.0, lt=1.0)
    val_fraction: float = option(0.2, ge=0.0, lt=1.0, doc="used when folds == 1")
    folds: int = option(1, ge=1, doc="k-fold cross-validation over the non-test subjects")
    fold: int = option(0, ge=0, doc="which fold is the validation fold")
    file: str = option("", doc="reuse a saved split (splits.json); empty = derive from seed")

    def validate(self, prefix: str) -> None:
        if self.fold >= self.folds:
            raise bad_value(f"{prefix}.fold", self.fold, f"allowed: 0 .. folds-1 = {self.folds - 1}")
        if self.folds == 1 and not self.file and self.test_fraction + self.val_fraction >= 1.0:
            # both are fractions of ALL cases (data.splits.make_splits): nothing would be left to train on
            raise bad_value(
                f"{prefix}.val_fraction", self.val_fraction,
                f"allowed: test_fraction + val_fraction < 1 (test_fraction is {self.test_fraction}); lower one of them",
            )


@dataclass
class SyntheticConfig:
    """Synthetic ISLES24 look-alike made by `medsegdiff run` when ``data.root`` does not exist yet."""

    generate: bool = option(False, doc="generate a synthetic dataset at data.root when that folder is missing")
    cases: int = option(12, ge=2, doc="number of synthetic cases")
    seed: int = option(0, doc="seed of the synthetic dataset")
    shape: str = option("tiny", doc="volume size preset of the generator (tiny, small, ...)")
    layout: Literal["zenodo", "challenge2024"] = option("zenodo", doc="on-disk layout to imitate")


@dataclass
class DataConfig:
    root: str = option("", doc="ISLES24 data root (either release layout); empty = none")
    cache_dir: str = option("", doc="preprocessed cache; empty = <run_root>/cache/<hash>")
    layout: Literal["auto", "zenodo", "challenge2024"] = option("auto")
    modalities: list[str] = option(["cbf", "cbv", "mtt", "tmax", "cta"], doc="input channels")
    missing_modality: Literal["skip_case", "fail"] = option(
        "skip_case", doc="a case missing an input modality is skipped (and listed) or stops the run"
    )
    on_error: Literal["skip", "fail"] = option("skip", doc="bad case (unreadable, grid mismatch): skip or stop")
    grid_tolerance: float = option(1e-3, gt=0.0, doc="affine differences below this are snapped (mm / cosine)")
    windows: dict[str, list[float]] = option(DEFAULT_WINDOWS, doc="per-modality [low, high] clip window")
    equalize: bool = option(False, doc="histogram-equalise inside the positive mask after windowing")
    brain_mask: bool = option(False, doc="zero everything outside an NCCT-derived brain mask")
    brain_mask_source: Literal["auto", "ncct", "perfusion"] = option(
        "auto", doc="brain mask from NCCT 1-100 HU (needs ncct in modalities) or the perfusion-map support; auto = ncct if loaded"
    )
    mask_resample: Literal["soft", "nearest"] = option(
        "soft", doc="lesion mask to the cache grid: soft = anti-aliased linear then >= 0.5, or nearest"
    )
    image_size: int = option(64, ge=8, doc="in-plane size after resampling (H = W); keep the resolution "
                             "ceiling that `prepare` reports >= data.min_resolution_ceiling")
    min_resolution_ceiling: float = option(
        0.95, ge=0.0, le=1.0,
        doc="`prepare` warns when the mean Dice of the reference masks sent through the cache grid and back "
            "(the resolution ceiling) is below this; 0 = never")
    context_slices: int = option(0, ge=0, doc="neighbouring slices on each side as extra channels (2.5D)")
    dims: Literal[2, 3] = option(2, doc="2 = slice dataset, 3 = patch dataset")
    patch_size: list[int] = option([16, 64, 64], doc="3D patch (D, H, W) when dims == 3")
    lesion_oversample: float = option(0.5, ge=0.0, le=1.0, doc="fraction of training samples drawn from lesion slices (rest: slices without lesion); 0 = off, uniform over all slices")
    samples_per_epoch: int = option(0, ge=0, doc="training samples per epoch; 0 = number of slices")
    num_workers: int = option(0, ge=0, doc="DataLoader workers")
    prepare_workers: int = option(2, ge=1, doc="worker processes for `prepare`")
    augment: AugmentConfig = option(default_factory=AugmentConfig)
    split: SplitConfig = option(default_factory=SplitConfig)
    synthetic: SyntheticConfig = option(default_factory=SyntheticConfig)

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.modalities:
            raise bad_value(f"{p}modalities", self.modalities, "allowed: a non-empty list of " + ", ".join(MODALITIES))
        for i, m in enumerate(self.modalities):
            if m not in MODALITIES:
                raise bad_value(f"{p}modalities[{i}]", m, "allowed: " + ", ".join(MODALITIES))
        for m, w in self.windows.items():
            if m not in MODALITIES:
                raise bad_value(f"{p}windows.{m}", w, "allowed keys: " + ", ".join(MODALITIES))
            if len(w) != 2 or not w[0] < w[1]:
                raise bad_value(f"{p}windows.{m}", w, "allowed: [low, high] with low < high")
        if len(self.patch_size) != 3 or any(s < 1 for s in self.patch_size):
            raise bad_value(f"{p}patch_size", self.patch_size, "allowed: three positive integers [D, H, W]")

    @property
    def in_channels(self) -> int:
        """Image channels seen by the model: modalities x (1 + 2 x context slices)."""
        return len(self.modalities) * (1 + 2 * self.context_slices)
