"""Shared test fixtures. Tests use tiny synthetic data only; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: keep intra-op threads bounded so parallel helpers do not oversubscribe.
torch.set_num_threads(int(os.environ.get("MEDSEGDIFF_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``(data_root, cache_dir)``: 4 tiny synthetic cases, prepared at 16 x 16 (session-wide; training and stages tests)."""
    from medsegdiff.config import load_config
    from medsegdiff.data.preprocess import prepare_dataset
    from medsegdiff.data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("train_data")
    root, cache = base / "data", base / "cache"
    generate_dataset(root, cases=4, seed=1, shape="tiny")
    cfg = load_config(None, ["data.image_size=16"])
    prepare_dataset(root, cache, cfg.data, workers=1, progress=False)
    return root, cache


def save_tiny_checkpoint(run_dir, modalities, *, data=None, inference=None):
    """A tiny real checkpoint ``<run_dir>/checkpoints/best.pt`` (MedSegDiff-V1, 16 px, DDIM 2).

    ``data`` / ``inference`` are merged into those config sections (e.g. ``{"layout": "zenodo"}``).
    """
    from medsegdiff.config.base import to_dict
    from medsegdiff.config.loader import config_from_dict
    from medsegdiff.nets.registry import build_model
    from medsegdiff.training.checkpoint import save_checkpoint

    cfg = config_from_dict({
        "model": {"base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "attention_resolutions": []},
        "data": {"image_size": 16, "modalities": list(modalities), "prepare_workers": 1, **(data or {})},
        "diffusion": {"respacing": "ddim2"},
        "inference": {"ensemble": 2, "batch_size": 16, **(inference or {})},
    })
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    return save_checkpoint(run_dir / "checkpoints" / "best.pt",
                           {"model": state, "ema": state, "step": 0, "config": to_dict(cfg)})


@pytest.fixture(scope="session")
def tiny_checkpoint_factory():
    """:func:`save_tiny_checkpoint`, for tests in any folder."""
    return save_tiny_checkpoint


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """``make(folder, *, cases, seed, **options) -> root``: a tiny synthetic ISLES24 look-alike.

    Written by :func:`medsegdiff.data.synthetic.generate_dataset` (``options``: ``layout``, ``shape``,
    ...) into ``<new temporary folder named folder>/data``, for module fixtures in any folder.
    """
    from medsegdiff.data.synthetic import generate_dataset

    def make(folder, *, cases, seed, **options):
        root = tmp_path_factory.mktemp(folder) / "data"
        generate_dataset(root, cases=cases, seed=seed, **options)
        return root

    return make
