"""The resolution ceiling as masks: the cached reference mask back on the native grid."""

from __future__ import annotations

import pytest

from medsegdiff.baselines.ceiling import ceiling_baseline
from medsegdiff.data.cache import Manifest
from medsegdiff.evaluation.evaluate import evaluate


def test_ceiling_masks_score_the_manifest_ceiling(synth6, synth6_cache, tmp_path):
    manifest = Manifest.open(synth6_cache)
    written = ceiling_baseline(synth6_cache, tmp_path / "ceiling", progress=False)
    assert len(written) == len(manifest.case_ids)
    report = evaluate(tmp_path / "ceiling", synth6, tmp_path / "eval", progress=False)
    by_case = {r["case_id"]: r["dice"] for r in report["cases"]}
    for cid in manifest.case_ids:  # the official scorer agrees with prepare's per-case ceiling
        assert by_case[cid] == pytest.approx(manifest.record(cid)["resolution_ceiling"])
    assert report["metrics"]["dice"]["mean"] == pytest.approx(manifest.data["resolution_ceiling"]["mean_dice"])
    assert report["metrics"]["dice"]["mean"] < 0.99  # 24-26 px native -> 12 px cache loses detail
