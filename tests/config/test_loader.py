"""Config mechanism: strict loading, messages, composition, overrides, YAML round-trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from medsegdiff.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    from_dict,
    load_config,
    option,
    save_config,
    to_dict,
)
from medsegdiff.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_suggests_nearest(tmp_path):
    p = write(tmp_path / "e.yaml", "train:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'\. Did you mean 'steps'\?"):
        load_config(p)


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    p = write(tmp_path / "e.yaml", "modle: {}\n")
    with pytest.raises(ConfigError, match=r"'modle'\. Did you mean 'model'\?.*Valid keys in the top level: .*data"):
        load_config(p)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=abc", r"config key 'train.steps': got 'abc'; expected an integer"),
        ("train.steps=1.5", r"config key 'train.steps': got 1.5; expected an integer"),
        ("train.deterministic=3", r"config key 'train.deterministic': got 3; expected true or false"),
        ("optim.lr=-1", r"config key 'optim.lr': got -1.0; allowed: a value > 0.0"),
        ("data.augment.flip_prob=1.5", r"'data.augment.flip_prob': got 1.5; allowed: a value >= 0.0 and <= 1.0"),
        ("model.name=unet", r"'model.name': got 'unet'; allowed: 'medsegdiff_v1', 'medsegdiff_v2', 'dynunet'"),
        ("data.modalities=[cbf,adc]", r"'data.modalities\[1\]': got 'adc'; allowed: ncct, cta"),
        ("train.grad_accum=3", r"'train.grad_accum': got 3; allowed: a divisor of batch_size \(8\)"),
        ("data.windows.tmax=[7,0]", r"'data.windows.tmax': got \[7.0, 0.0\]; allowed: \[low, high\] with low < high"),
        ("data.split.fold=2", r"'data.split.fold': got 2; allowed: 0 .. folds-1 = 0"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.steps=true"])
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(None, ["train.steps=7", "data.modalities=[tmax, cbf]", "tracking.tags=[a,b]", "name=x y"])
    assert cfg.train.steps == 7
    assert cfg.data.modalities == ["tmax", "cbf"]
    assert cfg.tracking.tags == ["a", "b"]
    assert cfg.name == "x y"


def test_override_errors():
    with pytest.raises(ConfigError, match=r"expected key.sub=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = load_config(None, ["train.steps=3", "optim.betas=[0.5, 0.9]", "data.windows.cbf=[1, 30]"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_composition_order_blocks_then_file_then_overrides(tmp_path):
    write(tmp_path / "configs" / "train" / "short.yaml", "train:\n  steps: 5\n  batch_size: 4\n")
    write(tmp_path / "configs" / "optim" / "fast.yaml", "optim:\n  lr: 0.01\ntrain:\n  steps: 6\n")
    exp = write(
        tmp_path / "experiments" / "e.yaml",
        "defaults: [train/short, optim/fast]\ntrain:\n  batch_size: 2\n",
    )
    cfg = load_config(exp, ["optim.lr=0.5"])
    assert cfg.train.steps == 6  # later block wins over earlier
    assert cfg.train.batch_size == 2  # the file's own keys win over blocks
    assert cfg.optim.lr == 0.5  # overrides win over everything


def test_unknown_block_lists_where_it_looked(tmp_path):
    exp = write(tmp_path / "e.yaml", "defaults: [model/nope]\n")
    with pytest.raises(ConfigError, match=r"config block 'model/nope' not found; looked in: .*model/nope.yaml"):
        load_config(exp)


def test_block_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "defaults: [b]\n")
    write(tmp_path / "b.yaml", "defaults: [a]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path / "bad.yaml", "train: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        load_config(bad)
    top = write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(top)


@dataclass
class _Inner:
    k: int = option(1, ge=0)


@dataclass
class _Outer:
    mode: Literal["a", "b"] = "a"
    pair: tuple[int, float] = (1, 2.0)
    opt: int | None = None
    inner: _Inner = field(default_factory=_Inner)
    table: dict[str, list[int]] = option({"x": [1]})


def test_generic_types_and_defaults_are_not_shared():
    a = from_dict(_Outer, {"pair": [3, 4], "opt": None, "inner": {"k": 2}, "table": {"y": [2, 3]}})
    assert a.pair == (3, 4.0) and a.inner.k == 2 and a.table == {"y": [2, 3]}
    assert from_dict(_Outer, to_dict(a)) == a
    b, c = _Outer(), _Outer()
    b.table["x"].append(9)
    assert c.table == {"x": [1]}
    with pytest.raises(ConfigError, match=r"'pair': got \[1\]; expected a list of exactly 2 items"):
        from_dict(_Outer, {"pair": [1]})
    with pytest.raises(ConfigError, match=r"'inner.k': got -1; allowed: a value >= 0"):
        from_dict(_Outer, {"inner": {"k": -1}})
    with pytest.raises(ConfigError, match=r"'opt': got 'x'; expected int or null"):
        from_dict(_Outer, {"opt": "x"})


def test_defaults_validate():
    assert load_config(None) == ExperimentConfig()


def test_block_selection_on_the_command_line_swaps_a_defaults_entry(tmp_path):
    from medsegdiff.config.loader import select_blocks, split_block_selections

    write(tmp_path / "train" / "long.yaml", "train:\n  steps: 500\n  batch_size: 4\n")
    write(tmp_path / "train" / "quick.yaml", "train:\n  steps: 5\n")
    exp = write(tmp_path / "e.yaml", "defaults: [train/long]\ntrain:\n  batch_size: 2\n")
    assert load_config(exp).train.steps == 500
    cfg = load_config(exp, ["train=quick", "optim.lr=0.5"])
    assert cfg.train.steps == 5  # the block was swapped ...
    assert cfg.train.batch_size == 2  # ... the file's own keys still win over blocks ...
    assert cfg.optim.lr == 0.5  # ... and key overrides still apply
    assert cfg.model == load_config(exp).model
    # a group the experiment does not list is appended; names that are not groups stay key overrides
    assert load_config(exp, ["model=small"]).model.channel_mult == [1, 1, 2, 2, 4, 4]
    assert load_config(exp, ["name=x", "seed=3"]).name == "x"
    assert select_blocks(["model/tiny", "train/full"], {"train": "debug"}) == ["model/tiny", "train/debug"]
    assert split_block_selections(["train=debug", "train.steps=3", "name=x"]) == (
        {"train": "debug"}, ["train.steps=3", "name=x"])
    with pytest.raises(ConfigError, match=r"config block 'train/nope' not found; looked in: .*train/nope.yaml"):
        load_config(exp, ["train=nope"])
    two = write(tmp_path / "two.yaml", "defaults: [train/long, train/quick]\n")
    with pytest.raises(ConfigError, match=r"'train=long'.*several train blocks \(train/long, train/quick\)"):
        load_config(two, ["train=long"])
    assert load_config(None, ["train=debug"]).train.steps == 20  # packaged train/debug without a file


def test_blocks_ship_in_the_package_and_local_ones_take_precedence(tmp_path, monkeypatch):
    from medsegdiff.config.loader import block_search_path, packaged_configs_dir

    monkeypatch.delenv("MEDSEGDIFF_CONFIGS", raising=False)
    pkg = packaged_configs_dir()
    assert (pkg / "model" / "tiny.yaml").is_file() and pkg.parent.name == "medsegdiff"
    exp = write(tmp_path / "exp" / "e.yaml", "defaults: [model/tiny, train/debug]\n")
    assert load_config(exp).train.steps == 20  # found in the package, from anywhere
    env_dir = tmp_path / "mine"
    write(env_dir / "train" / "debug.yaml", "train:\n  steps: 7\n")
    monkeypatch.setenv("MEDSEGDIFF_CONFIGS", str(env_dir))
    assert block_search_path(exp.parent)[:3] == [exp.parent, env_dir, pkg]
    assert load_config(exp).train.steps == 7  # $MEDSEGDIFF_CONFIGS before the package
    write(exp.parent / "train" / "debug.yaml", "train:\n  steps: 9\n")
    assert load_config(exp).train.steps == 9  # next to the experiment before everything
    assert load_config(exp).model == load_config(None, ["model=tiny"]).model  # the rest still packaged
