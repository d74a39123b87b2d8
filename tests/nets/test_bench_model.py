"""``medsegdiff bench model`` (medsegdiff.bench.model) runs and reports what it promises."""

from __future__ import annotations

import argparse

from medsegdiff.bench import model as bench_model


def test_bench_model_smoke():
    p = argparse.ArgumentParser()
    bench_model.add_arguments(p)
    args = p.parse_args(["--presets", "tiny", "--models", "medsegdiff_v2,dynunet", "--size", "16", "--batch", "2",
                         "--iters", "1", "--warmup", "0", "--steps", "2", "--members", "2", "--no-compile",
                         "--precisions", "fp32"])
    out = bench_model.run(args)
    v2 = out["results"]["tiny/medsegdiff_v2"]
    assert v2["params"] > 0 and v2["gflops_per_sample"] > 0
    # one step on cached features costs less than a step that re-encodes the image
    assert v2["gflops_step_cached"] < v2["gflops_per_sample"]
    gap = abs(v2["gflops_step_cached"] + v2["gflops_encode_image"] - v2["gflops_per_sample"])
    assert gap < 0.01 * v2["gflops_per_sample"] + 1e-3
    assert v2["fp32_eager"]["forward_samples_per_s"] > 0 and v2["fp32_eager"]["train_samples_per_s"] > 0
    assert v2["sampling_cache"]["steps"] == 2
    assert "sampling_cache" not in out["results"]["tiny/dynunet"]
    assert "v2_over_v1" not in out  # V1 not benchmarked: no overhead figure


def test_v2_overhead_ratios():
    v1 = {"params": 100, "gflops_per_sample": 2.0, "gflops_step_cached": 1.0,
          "fp32_eager": {"forward_samples_per_s": 10.0, "train_samples_per_s": 4.0}}
    v2 = {"params": 150, "gflops_per_sample": 3.0, "gflops_step_cached": 1.5,
          "fp32_eager": {"forward_samples_per_s": 5.0, "train_samples_per_s": 1.0}}
    assert bench_model.v2_overhead(v1, v2) == {
        "params": 1.5, "gflops_per_sample": 1.5, "gflops_step_cached": 1.5,
        "fp32_eager_forward_time": 2.0, "fp32_eager_train_time": 4.0,
    }
    assert bench_model.v2_overhead(None, v2) == {}
