from __future__ import annotations

import json

import pytest


def test_bench_sample_smoke(capsys):
    from medsegdiff.cli import main

    rc = main(["bench", "sample", "--preset", "tiny", "--shape", "16x16x2", "--respacing", "ddim2",
               "--members", "2", "--batch-size", "2", "--naive-pairs", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["shape_hwz"] == [16, 16, 2]
    assert out["network_calls_per_volume_naive"] == 2 * 2 * 2
    assert out["network_calls_per_volume_fast"] == 2 * 2  # 2 steps x 2 chunks of (1 slice x 2 members)
    assert out["fast"]["fp32"]["seconds_per_volume"] > 0
    assert out["naive"]["pairs_timed"] == 1 and out["speedup_fp32"] > 0
    assert out["gflop_per_volume"] > 0


def test_bench_sample_bad_shape():
    from medsegdiff.bench.sample import _parse_shape
    from medsegdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="expected HxWxZ"):
        _parse_shape("64x64")
    with pytest.raises(ConfigError, match="H and W must be equal"):
        _parse_shape("64x32x8")
