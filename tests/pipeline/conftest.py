"""Fixtures for the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A fresh folder, the working directory from first use until the module's tests are done.

    ``medsegdiff run`` writes relative paths (``runs/``, ``data/``) into the working directory.
    """
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield path
