"""Learning benchmark methods: the methods file (forms, errors) and the shipped methods files."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsegdiff.bench.learn import LearnBenchSettings, load_method_config
from medsegdiff.bench.learn_methods import DEFAULT_METHODS, load_methods_file, select_methods
from medsegdiff.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_methods_file_forms_and_errors(tmp_path):
    good = tmp_path / "methods.yaml"
    good.write_text("methods:\n  v1_vpred: [diffusion.predict_xstart=false]\n"
                    "  v2_lr: {model.name: medsegdiff_v2, optim.lr: 3.0e-4}\n"
                    "reference: cbf_rule\noverrides: [train.batch_size=8]\n")
    loaded = load_methods_file(good)
    assert loaded["methods"] == {"v1_vpred": ["diffusion.predict_xstart=false"],
                                 "v2_lr": ['model.name="medsegdiff_v2"', "optim.lr=0.0003"]}
    assert loaded["reference"] == ["cbf_rule"] and loaded["overrides"] == ["train.batch_size=8"]
    assert list(select_methods(DEFAULT_METHODS, loaded["methods"], None)) == [*DEFAULT_METHODS, "v1_vpred", "v2_lr"]
    assert list(select_methods(DEFAULT_METHODS, loaded["methods"], ["v2_lr", "v1_x0"])) == ["v2_lr", "v1_x0"]
    with pytest.raises(ConfigError, match=r"--methods: unknown method\(s\) nope; known: v1_x0"):
        select_methods(DEFAULT_METHODS, None, ["nope"])
    cases = {
        "methodz: {}\n": r"expected a mapping with a 'methods' key",
        "methods: {a: [x=1]}\nrefrence: a\n": r"unknown key\(s\) refrence; allowed: methods, only, reference",
        "methods: {'a b': [x=1]}\n": r"method name 'a b' is not allowed",
        "methods: {a: [optim.lr]}\n": r"methods.a: expected a list of 'key=value' overrides",
        "methods: {a: [x=1]}\n: [\n": r"cannot be read",
    }
    for i, (text, pattern) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            load_methods_file(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_methods_files_load_and_every_method_config_is_valid(path, tmp_path):
    loaded = load_methods_file(path)
    methods = select_methods(DEFAULT_METHODS, loaded["methods"], loaded["only"])
    settings = LearnBenchSettings(out_dir=tmp_path, methods=methods, references=loaded["reference"] or [])
    for name in methods:
        cfg = load_method_config(settings, name, 0, None)
        assert cfg.model.name in ("medsegdiff_v1", "medsegdiff_v2", "dynunet")
    if path.name == "v2_ablation.yaml":  # the two ablations switch off one V2 part each
        v2 = {n: load_method_config(settings, n, 0, None).model for n in ("v2_x0", "v2_anchor_only", "v2_ssformer_only")}
        assert (v2["v2_x0"].anchor, v2["v2_x0"].ssformer_depth > 0) == (True, True)
        assert (v2["v2_anchor_only"].anchor, v2["v2_anchor_only"].ssformer_depth) == (True, 0)
        assert (v2["v2_ssformer_only"].anchor, v2["v2_ssformer_only"].ssformer_depth > 0) == (False, True)
    # every method of a shipped file says its objective, like the defaults (the base may change)
    for name in methods:
        d = load_method_config(settings, name, 0, None).diffusion
        assert (d.predict_xstart, d.predict_v, d.self_condition) in ((True, False, False), (False, False, False),
                                                                     (False, True, True)), name
        assert any(o.startswith("diffusion.predict_xstart=") for o in methods[name]), name
