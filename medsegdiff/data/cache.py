"""The preprocessed cache: ``manifest.json`` plus one folder of memory-mappable arrays per case.

Layout (written by :func:`medsegdiff.data.preprocess.prepare_dataset`)::

    <cache>/manifest.json          settings + hash, cases (geometry, lesion statistics), skipped cases
    <cache>/<case_id>/image.npy    float16 (C, Z, H, W), channels in ``manifest.modalities`` order
    <cache>/<case_id>/mask.npy     uint8 (Z, H, W) on the cache grid
    <cache>/<case_id>/native.npz   ``mask`` uint8 (Z, Y, X) native grid; ``tmax`` float32 if available
    <cache>/<case_id>/done         JSON marker written last: {"hash", "source", "record"}

A case folder without a ``done`` marker carrying the current hash is incomplete and is rebuilt by the
next ``prepare``. Reading never touches the NIfTI files: images and masks are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.config.data import DEFAULT_WINDOWS, DataConfig
from medsegdiff.data.loading import Geometry
from medsegdiff.errors import ConfigError, DataError

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
DONE = "done"
IMAGE = "image.npy"
MASK = "mask.npy"
NATIVE = "native.npz"


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Stable short hash (16 hex digits) of the preprocessing settings (canonical JSON, sorted keys)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def modality_window(data_cfg: DataConfig, modality: str) -> tuple[float, float]:
    """``data.windows[modality]``, falling back to the published default window of that modality.

    (A YAML ``data.windows: {cbf: [0, 70]}`` replaces the whole mapping, so the other modalities
    keep their defaults through this fallback.)

    Raises:
        ConfigError: no window given and no default for the modality.
    """
    window = data_cfg.windows.get(modality, DEFAULT_WINDOWS.get(modality))
    if window is None:
        raise ConfigError(f"config key 'data.windows.{modality}' is missing; give [low, high] for every "
                          "modality in data.modalities")
    return float(window[0]), float(window[1])


def cache_settings(data_cfg: DataConfig) -> dict[str, Any]:
    """The preprocessing settings that determine the cache content (their hash names the cache).

    Raises:
        ConfigError: a modality has no window.
    """
    windows = {m: list(modality_window(data_cfg, m)) for m in data_cfg.modalities}
    return {
        "format": CACHE_FORMAT,
        "modalities": list(data_cfg.modalities),
        "windows": windows,
        "equalize": bool(data_cfg.equalize),
        "brain_mask": bool(data_cfg.brain_mask),
        "brain_mask_source": data_cfg.brain_mask_source if data_cfg.brain_mask else None,
        "mask_resample": data_cfg.mask_resample,
        "image_size": int(data_cfg.image_size),
        "grid_tolerance": float(data_cfg.grid_tolerance),
        "layout": data_cfg.layout,
    }


def cache_key(data_cfg: DataConfig) -> str:
    """The manifest hash a cache prepared with ``data_cfg`` carries (:func:`settings_hash` of :func:`cache_settings`).

    Raises:
        ConfigError: a modality has no window.
    """
    return settings_hash(cache_settings(data_cfg))


def fitting_cache_keys(data_cfg: DataConfig) -> set[str]:
    """Every manifest hash whose cache fits ``data_cfg``: the on-disk layout of the source data does not
    change the cached arrays, so a cache prepared under any ``data.layout`` fits.

    Raises:
        ConfigError: a modality has no window.
    """
    settings = cache_settings(data_cfg)
    return {settings_hash({**settings, "layout": layout}) for layout in ("auto", "zenodo", "challenge2024")}


def cache_dir_name(data_cfg: DataConfig, data_root: str | os.PathLike[str]) -> str:
    """Folder name of the cache of ``data_root`` under ``data_cfg`` (the pipeline's ``<run_root>/cache/<name>``).

    Raises:
        ConfigError: a modality has no window.
    """
    return settings_hash({"settings": cache_settings(data_cfg), "root": str(Path(data_root).resolve())})


def read_done(case_dir: Path) -> dict[str, Any] | None:
    """The parsed ``done`` marker of a case folder, or None if absent or unreadable."""
    try:
        data = json.loads((case_dir / DONE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _prepare_hint(cache_dir: Path) -> str:
    return f"run `medsegdiff prepare DATA_ROOT --out {cache_dir}`"


class CachedCase:
    """One cached case. Arrays are opened lazily as read-only memory maps (cheap to pickle).

    Attributes:
        case_id: the subject id.
        dir: the case folder.
        record: the manifest entry (geometry, lesion statistics, shapes).
        modalities: channel names of :attr:`image`.
    """

    def __init__(self, case_dir: Path, record: Mapping[str, Any], modalities: list[str]) -> None:
        self.case_id = str(record["case_id"])
        self.dir = Path(case_dir)
        self.record = dict(record)
        self.modalities = list(modalities)
        self._image: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened in the other process
        state = dict(self.__dict__)
        state["_image"] = state["_mask"] = None
        state.pop("lesion_slices", None)
        return state

    def __repr__(self) -> str:
        return f"CachedCase({self.case_id!r}, shape={tuple(self.record['shape'])})"

    def _load(self, name: str) -> np.ndarray:
        path = self.dir / name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read cached array ({err}); {_prepare_hint(self.dir.parent)} "
                            "to rebuild the cache") from None

    @property
    def image(self) -> np.ndarray:
        """float16 memory map ``(C, Z, H, W)``."""
        if self._image is None:
            self._image = self._load(IMAGE)
        return self._image

    @property
    def mask(self) -> np.ndarray:
        """uint8 memory map ``(Z, H, W)`` in {0, 1} on the cache grid."""
        if self._mask is None:
            self._mask = self._load(MASK)
        return self._mask

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(C, Z, H, W)`` of :attr:`image`."""
        return tuple(int(s) for s in self.record["shape"])  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return self.shape[1]

    @property
    def native_geometry(self) -> Any:
        """:class:`~medsegdiff.data.loading.Geometry` of the original NCCT grid."""
        return Geometry.from_dict(self.record["native_geometry"])

    @property
    def cache_geometry(self) -> Any:
        """:class:`~medsegdiff.data.loading.Geometry` of the cache grid (same origin/direction/extent)."""
        return Geometry.from_dict(self.record["cache_geometry"])

    @cached_property
    def lesion_slices(self) -> np.ndarray:
        """bool ``(Z,)``: slices whose cache-grid mask has at least one lesion voxel."""
        flags = np.zeros(self.num_slices, dtype=bool)
        flags[np.asarray(self.record["lesion_slices"], dtype=np.int64)] = True
        return flags

    @property
    def lesion(self) -> dict[str, Any]:
        """Native-grid lesion statistics: ``voxels``, ``ml``, ``components`` (26-connectivity)."""
        return dict(self.record["lesion"])

    @property
    def has_mask(self) -> bool:
        """False for prediction inputs prepared without a reference mask (``mask.npy`` is then all 0)."""
        return bool(self.record.get("has_mask", True))

    @property
    def has_tmax(self) -> bool:
        return bool(self.record.get("has_tmax", False))

    def _native(self, key: str) -> np.ndarray | None:
        path = self.dir / NATIVE
        try:
            with np.load(path) as data:
                return np.array(data[key]) if key in data.files else None
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read ({err}); {_prepare_hint(self.dir.parent)} to rebuild") from None

    def native_mask(self) -> np.ndarray:
        """uint8 ``(Z, Y, X)`` lesion mask on the native grid (the scoring grid)."""
        out = self._native("mask")
        if out is None:
            raise DataError(f"{self.dir / NATIVE}: no native mask; {_prepare_hint(self.dir.parent)} to rebuild")
        return out

    def native_tmax(self) -> np.ndarray | None:
        """float32 ``(Z, Y, X)`` raw Tmax (s) on the native grid, or None if the case has no Tmax."""
        return self._native("tmax")


class Manifest:
    """The cache's ``manifest.json``: settings, hash, cases and skipped cases.

    Use :meth:`open`; ``Manifest.open(cache).case(case_id)`` gives a :class:`CachedCase`.
    """

    def __init__(self, cache_dir: Path, data: Mapping[str, Any]) -> None:
        self.cache_dir = Path(cache_dir)
        self.data = dict(data)
        self._records = {str(r["case_id"]): r for r in self.data.get("cases", [])}
        self._cases: dict[str, CachedCase] = {}
        self.last_run: dict[str, Any] = {}  # set by prepare_dataset: what this call prepared / reused

    @classmethod
    def open(cls, cache_dir: str | os.PathLike[str], *, expected_hash: str | None = None,
             data_cfg: Any = None) -> Manifest:
        """Open a prepared cache.

        Args:
            cache_dir: the folder given to ``medsegdiff prepare --out``.
            expected_hash: if given, the manifest hash must equal it.
            data_cfg: a ``DataConfig``; if given, the cache must have been prepared with the same
                preprocessing settings (hash of :func:`cache_settings`).

        Raises:
            DataError: missing, unreadable, stale (settings changed) or incomplete cache; the message
                says to run ``medsegdiff prepare``.
        """
        cache_dir = Path(cache_dir)
        path = cache_dir / MANIFEST
        hint = _prepare_hint(cache_dir)
        if not path.is_file():
            raise DataError(f"{path}: no prepared cache here (missing or interrupted); {hint}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: unreadable manifest ({err}); {hint} to rebuild it") from None
        if not isinstance(data, dict) or data.get("format_version") != CACHE_FORMAT:
            raise DataError(f"{path}: cache format {data.get('format_version') if isinstance(data, dict) else '?'} "
                            f"is not the current format {CACHE_FORMAT}; {hint} to rebuild it")
        if data_cfg is not None:
            expected_hash = cache_key(data_cfg)
        if expected_hash is not None and data.get("hash") != expected_hash:
            raise DataError(f"{path}: the cache is stale (prepared with settings {data.get('hash')}, the config "
                            f"needs {expected_hash}); {hint} with the current config to rebuild it")
        manifest = cls(cache_dir, data)
        for cid in manifest.case_ids:
            done = read_done(cache_dir / cid)
            if done is None or done.get("hash") != data.get("hash"):
                raise DataError(f"{cache_dir / cid}: cached case is incomplete or from other settings; {hint} "
                                "to finish the cache")
        return manifest

    @property
    def case_ids(self) -> list[str]:
        """Cached case ids, sorted."""
        return sorted(self._records)

    @property
    def settings(self) -> dict[str, Any]:
        """The preprocessing settings the cache was built with."""
        return dict(self.data.get("settings", {}))

    @property
    def hash(self) -> str:
        return str(self.data.get("hash", ""))

    @property
    def modalities(self) -> list[str]:
        """Channel order of every ``image.npy``."""
        return list(self.settings.get("modalities", []))

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Cases left out, each ``{"case_id", "reason"}``."""
        return [dict(s) for s in self.data.get("skipped", [])]

    @property
    def data_root(self) -> str:
        return str(self.data.get("data_root", ""))

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._records

    def record(self, case_id: str) -> dict[str, Any]:
        """The manifest entry of one case (see :class:`CachedCase.record`)."""
        if case_id not in self._records:
            raise DataError(f"{self.cache_dir / MANIFEST}: case '{case_id}' is not in the cache "
                            f"({len(self._records)} cases); check the case id or {_prepare_hint(self.cache_dir)}")
        return dict(self._records[case_id])

    def case(self, case_id: str) -> CachedCase:
        """The :class:`CachedCase` of ``case_id`` (one object per id and manifest).

        Raises:
            DataError: unknown case id.
        """
        if case_id not in self._cases:
            self._cases[case_id] = CachedCase(self.cache_dir / case_id, self.record(case_id), self.modalities)
        return self._cases[case_id]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cases"] = {}
        return state


__all__ = [
    "CACHE_FORMAT", "CachedCase", "Manifest", "cache_dir_name", "cache_key", "cache_settings", "modality_window",
    "read_done", "settings_hash",
]
