"""A tiny synthetic ISLES24 look-alike shared by the reference-method tests (written once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsegdiff.data.synthetic import generate_dataset


@pytest.fixture(scope="session")
def synth6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baselines") / "zenodo"
    generate_dataset(root, cases=5, seed=4, shape="24x26x6")
    return root


@pytest.fixture(scope="session")
def synth6_cache(synth6: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsegdiff.config.data import DataConfig
    from medsegdiff.data.preprocess import prepare_dataset

    cache = tmp_path_factory.mktemp("baselines_cache") / "cache"
    prepare_dataset(synth6, cache, DataConfig(modalities=["cbf", "tmax"], image_size=12), workers=1, progress=False)
    return cache
