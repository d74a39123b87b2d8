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
