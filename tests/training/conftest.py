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
