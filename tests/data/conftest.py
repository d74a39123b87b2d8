"""Shared data fixtures: tiny synthetic ISLES24 look-alike datasets (session-scoped, written once).

* ``synth_root``: 8 cases, Zenodo layout, seed 0 (``synthetic_manifest.json`` at the root lists
  the quirks per case: empty mask at index 2, 0/65535 scaled masks at i % 3 == 1, stray ``.nii``
  mask at index 0, no CTA for the last case).
* ``synth_root_2024``: 6 cases, 2024 challenge layout (``batch_*/``), seed 1.
* ``synth_manifest``: the parsed manifest of ``synth_root``.

Treat these folders as read-only; copy them (``copy_dataset``) before damaging files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medsegdiff.data.synthetic import MANIFEST_NAME, generate_dataset


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "zenodo"
    generate_dataset(root, cases=8, seed=0, layout="zenodo", shape="tiny")
    return root


@pytest.fixture(scope="session")
def synth_root_2024(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth2024") / "challenge"
    generate_dataset(root, cases=6, seed=1, layout="challenge2024", shape="tiny")
    return root


@pytest.fixture(scope="session")
def synth_manifest(synth_root: Path) -> dict:
    return json.loads((synth_root / MANIFEST_NAME).read_text())


@pytest.fixture()
def copy_dataset(tmp_path: Path):
    """``copy_dataset(root) -> Path``: a private writable copy of a fixture dataset."""

    def _copy(root: Path) -> Path:
        dst = tmp_path / root.name
        shutil.copytree(root, dst)
        return dst

    return _copy
