"""The set of three references scored beside every model."""

from __future__ import annotations

import pytest

from medsegdiff.baselines.references import REFERENCES, reference_label, write_references


def test_write_references_makes_one_prediction_folder_each(synth6, synth6_cache, tmp_path):
    folders = write_references(synth6, synth6_cache, tmp_path / "refs", progress=False)
    assert list(folders) == list(REFERENCES)
    for name, folder in folders.items():
        assert folder == tmp_path / "refs" / name / "predictions" and list(folder.glob("sub-stroke*.nii.gz")), name
    with pytest.raises(ValueError, match="unknown reference"):
        write_references(synth6, synth6_cache, tmp_path / "x", names=["oracle"], progress=False)


def test_labels():
    assert reference_label("tmax") == "Tmax > 9 s baseline"
    assert reference_label("tmax", 6) == "Tmax > 6 s baseline"
    assert reference_label("cbf_rule") == "Tmax > 6 s & CBF < 15 rule"
    assert reference_label("ceiling") == "resolution ceiling"
