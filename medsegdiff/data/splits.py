"""Subject-level train / validation / test splits and k folds, saved as JSON.

Every ISLES24 case is one subject (``sub-strokeNNNN``), so splitting the case ids keeps all slices
of a subject in exactly one set. The test set is held out first (a fixed fraction of the subjects);
the remaining subjects are split either by a validation fraction (``folds == 1``) or into ``folds``
folds of which fold ``fold`` is the validation set. Everything is fixed by ``split.seed``: the same
seed and case list give the same split on any machine (the ids are sorted before shuffling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.config.data import SplitConfig
from medsegdiff.errors import DataError
from medsegdiff.utils.io import atomic_write_json

SPLITS_FORMAT = 1


@dataclass
class Splits:
    """Case ids per set (each sorted). ``meta`` records how the split was made."""

    train: list[str]
    val: list[str]
    test: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def all_ids(self) -> list[str]:
        return [*self.train, *self.val, *self.test]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SPLITS_FORMAT, "train": list(self.train), "val": list(self.val),
                "test": list(self.test), "meta": dict(self.meta)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split atomically as JSON; :meth:`load` reads it back unchanged."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], known_ids: Iterable[str] | None = None) -> Splits:
        """Read a split saved by :meth:`save`.

        Args:
            path: the ``splits.json`` file.
            known_ids: if given, every id in the file must be one of these (the cached cases).

        Raises:
            DataError: missing or malformed file, a case in two sets, or an unknown case id.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: split file not found; fix data.split.file or leave it empty to derive a split")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a valid splits JSON ({err}); regenerate it or fix data.split.file") from None
        sets = {}
        for key in ("train", "val", "test"):
            ids = data.get(key) if isinstance(data, dict) else None
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise DataError(f"{path}: key '{key}' must be a list of case ids; regenerate the split file")
            sets[key] = list(ids)
        splits = cls(sets["train"], sets["val"], sets["test"], dict(data.get("meta") or {}))
        splits.check(str(path), known_ids)
        return splits

    def check(self, where: str, known_ids: Iterable[str] | None = None) -> None:
        """Raise :class:`DataError` if a case is in two sets or (given ``known_ids``) is unknown."""
        seen: dict[str, str] = {}
        for name in ("train", "val", "test"):
            for cid in getattr(self, name):
                if cid in seen:
                    raise DataError(f"{where}: case '{cid}' is in both '{seen[cid]}' and '{name}'; "
                                    "a subject may be in one set only")
                seen[cid] = name
        if known_ids is not None:
            known = set(known_ids)
            unknown = sorted(c for c in seen if c not in known)
            if unknown:
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                raise DataError(f"{where}: case '{unknown[0]}'{more} is not in the prepared cache; "
                                "re-run `medsegdiff prepare` on the data that contains it or fix the split file")


def make_splits(case_ids: Sequence[str], split_cfg: SplitConfig) -> Splits:
    """Derive a subject-level split from the case ids and ``data.split``.

    Steps: (1) sort the ids and shuffle them with ``split.seed``; (2) the first
    ``round(test_fraction * N)`` are the test set; (3) the rest is split into ``folds`` folds
    (``numpy.array_split`` of the shuffled order) and fold ``fold`` is the validation set, or, with
    ``folds == 1``, ``round(val_fraction * N)`` of them are the validation set.

    Args:
        case_ids: the available cases (one per subject), e.g. ``Manifest.case_ids``.
        split_cfg: ``data.split``.

    Returns:
        :class:`Splits` with sorted id lists.

    Raises:
        DataError: duplicate ids, or too few cases for the requested sets.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        dup = next(a for a, b in zip(ids, ids[1:]) if a == b)
        raise DataError(f"case id '{dup}' appears twice; case ids must be unique subjects")
    n = len(ids)
    if n == 0:
        raise DataError("no cases to split; run `medsegdiff prepare` on a data root that contains cases")
    order = [ids[i] for i in np.random.default_rng(split_cfg.seed).permutation(n)]
    n_test = int(round(split_cfg.test_fraction * n))
    if split_cfg.test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    test, rest = order[:n_test], order[n_test:]
    if split_cfg.folds > 1:
        if len(rest) < split_cfg.folds:
            raise DataError(f"data.split.folds={split_cfg.folds} needs at least {split_cfg.folds} non-test cases, "
                            f"got {len(rest)} of {n}; lower data.split.folds or data.split.test_fraction")
        folds = np.array_split(np.array(rest, dtype=object), split_cfg.folds)
        val = [str(c) for c in folds[split_cfg.fold]]
        train = [str(c) for k, f in enumerate(folds) if k != split_cfg.fold for c in f]
    else:
        n_val = int(round(split_cfg.val_fraction * n))
        if split_cfg.val_fraction > 0 and n_val == 0 and len(rest) >= 2:
            n_val = 1
        val, train = rest[:n_val], rest[n_val:]
    if not train:
        raise DataError(f"only {n} case(s): no training case is left after the test/validation split; "
                        "lower data.split.test_fraction / data.split.val_fraction or add cases")
    meta = {"seed": split_cfg.seed, "test_fraction": split_cfg.test_fraction,
            "val_fraction": split_cfg.val_fraction, "folds": split_cfg.folds, "fold": split_cfg.fold,
            "num_cases": n}
    splits = Splits(sorted(train), sorted(val), sorted(test), meta)
    splits.check("make_splits")
    return splits


def resolve_splits(case_ids: Sequence[str], split_cfg: SplitConfig) -> Splits:
    """The split to use: the file ``data.split.file`` if set (checked against ``case_ids``), else derived.

    Raises:
        DataError: see :meth:`Splits.load` and :func:`make_splits`.
    """
    if split_cfg.file:
        return Splits.load(split_cfg.file, known_ids=case_ids)
    return make_splits(case_ids, split_cfg)


__all__ = ["Splits", "make_splits", "resolve_splits"]
