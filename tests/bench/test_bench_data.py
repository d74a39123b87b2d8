"""`medsegdiff bench data` runs end to end on a tiny synthetic case and reports what it promises."""

from __future__ import annotations

import json

from medsegdiff.cli import main


def test_bench_data_reports_prepare_memory_and_throughput(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--output", str(out), "data", "--cases", "1", "--samples", "60", "--naive-samples", "2",
                 "--image-size", "16", "--workdir", str(tmp_path / "work")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    prep = result["prepare"]
    assert prep["per_case"][0]["status"] == "ok" and prep["seconds_per_case"] > 0
    assert prep["peak_rss_mb_max"] >= prep["worker_idle_rss_mb"] > 0
    speed = result["slices_per_second"]
    assert speed["cache"] > speed["naive_nifti_per_slice"] > 0
