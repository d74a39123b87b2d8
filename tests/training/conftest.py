"""Fixtures for trainer tests: tiny stand-in components (see ``_train_stubs.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).with_name("_train_stubs.py")


def _load_stubs():
    name = "medsegdiff_train_stubs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def stubs():
    return _load_stubs()


@pytest.fixture(scope="session")
def stub_script() -> Path:
    return _PATH


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``(data_root, cache_dir)``: 4 tiny synthetic cases, prepared at 16 x 16 (session-wide)."""
    from medsegdiff.config import load_config
    from medsegdiff.data.preprocess import prepare_dataset
    from medsegdiff.data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("train_data")
    root, cache = base / "data", base / "cache"
    generate_dataset(root, cases=4, seed=1, shape="tiny")
    cfg = load_config(None, ["data.image_size=16"])
    prepare_dataset(root, cache, cfg.data, workers=1, progress=False)
    return root, cache
