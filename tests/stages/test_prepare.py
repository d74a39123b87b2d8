"""The prepare stage: data-root checks (the cache and split rules run end to end in tests/pipeline)."""

from __future__ import annotations

import pytest

from medsegdiff.config import load_config
from medsegdiff.errors import ConfigError, DataError
from medsegdiff.stages.prepare import ensure_dataset


def test_data_root_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'data.root' is empty; point it at the extracted ISLES24"):
        ensure_dataset(load_config(None, []))
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"nope: data.root does not exist; .*data.synthetic.generate=true"):
        ensure_dataset(load_config(None, [f"data.root={missing}"]))
    assert not missing.exists()
