"""Subject-level splits: disjoint, complete, reproducible, saved and reloaded."""

from __future__ import annotations

import json

import pytest

from medsegdiff.config.data import SplitConfig
from medsegdiff.data.splits import Splits, make_splits, resolve_splits
from medsegdiff.errors import DataError

IDS = [f"sub-stroke{i:04d}" for i in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)]


def _disjoint_and_complete(s: Splits, ids: list[str]) -> None:
    sets = [set(s.train), set(s.val), set(s.test)]
    assert sum(len(x) for x in sets) == len(ids)
    assert set().union(*sets) == set(ids)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_fractions_give_expected_sizes():
    s = make_splits(IDS, SplitConfig(seed=0, test_fraction=0.2, val_fraction=0.2))
    # 10 subjects: round(0.2 * 10) = 2 test, round(0.2 * 10) = 2 val, 6 train.
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 2)
    _disjoint_and_complete(s, IDS)
    assert s.train == sorted(s.train)


def test_same_seed_same_split_and_order_independent():
    a = make_splits(IDS, SplitConfig(seed=3))
    b = make_splits(list(reversed(IDS)), SplitConfig(seed=3))
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)


def test_different_seed_different_split():
    a = make_splits(IDS, SplitConfig(seed=0))
    b = make_splits(IDS, SplitConfig(seed=1))
    assert (a.train, a.val, a.test) != (b.train, b.val, b.test)


def test_k_folds_partition_the_non_test_subjects():
    folds = [make_splits(IDS, SplitConfig(seed=0, test_fraction=0.2, folds=4, fold=k)) for k in range(4)]
    test = folds[0].test
    assert all(f.test == test for f in folds)  # test held out first, identical in every fold
    vals = [set(f.val) for f in folds]
    rest = set(IDS) - set(test)
    assert set().union(*vals) == rest
    assert sum(len(v) for v in vals) == len(rest)  # every non-test subject validates exactly once
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2]
    for f in folds:
        _disjoint_and_complete(f, IDS)


def test_save_load_round_trip(tmp_path):
    s = make_splits(IDS, SplitConfig(seed=5, folds=3, fold=1))
    path = s.save(tmp_path / "splits.json")
    loaded = Splits.load(path, known_ids=IDS)
    assert (loaded.train, loaded.val, loaded.test) == (s.train, s.val, s.test)
    assert loaded.meta["fold"] == 1
    again = resolve_splits(IDS, SplitConfig(file=str(path), seed=99))  # the file wins over the seed
    assert again.val == s.val


def test_file_with_unknown_case_is_a_clear_error(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [IDS[0], "sub-stroke9999"], "val": [IDS[1]], "test": []}))
    with pytest.raises(DataError, match=r"case 'sub-stroke9999' is not in the prepared cache"):
        resolve_splits(IDS, SplitConfig(file=str(path)))


def test_file_with_case_in_two_sets_is_rejected(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [IDS[0]], "val": [IDS[0]], "test": []}))
    with pytest.raises(DataError, match=r"is in both 'train' and 'val'"):
        Splits.load(path)


def test_missing_file_and_too_few_cases():
    with pytest.raises(DataError, match=r"split file not found"):
        resolve_splits(IDS, SplitConfig(file="/nonexistent/splits.json"))
    with pytest.raises(DataError, match=r"needs at least 5 non-test cases"):
        make_splits(IDS[:4], SplitConfig(folds=5, fold=0))
    with pytest.raises(DataError, match=r"no cases to split"):
        make_splits([], SplitConfig())
