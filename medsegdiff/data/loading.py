"""Reading and checking ISLES'24 cases with SimpleITK: ``Geometry``, ``read_image``, ``load_case(s)``.

Every modality of a case must lie on the reference grid (the NCCT's; reference note section 5:
all derivatives are co-registered to the native NCCT). Differences up to ``data.grid_tolerance``
(mm for origin/spacing, cosine units for the direction) are *snapped* - the arrays are simply used
on the reference grid, which is what public loaders do with the ~1e-5 affine noise of the
release - while real mismatches (a different size, a 1 mm origin shift, another orientation) are
rejected with a message naming the case, the file, the property and both values.

Failures are :class:`CaseError` (a :class:`~medsegdiff.errors.DataError`) with one line naming the
case, the file and the problem. :func:`load_cases` applies ``data.on_error`` (skip or fail) and
``data.missing_modality`` (skip_case or fail) and returns every skipped case with its reason, so
nothing is dropped silently.

Non-finite voxels (NaN/inf) are replaced by 0, counted per modality and reported with a
``logging.warning`` (the count and the share); a map that is NaN/inf everywhere is refused as
such (not as "all voxels are 0"). ITK's NIfTI reader
already turns NaN into 0 without telling, so for float NIfTI files the count comes from one
streaming pass over the raw voxel data (:func:`count_nonfinite_nifti`; it also proves the gzip
stream complete). Truncated ``.nii.gz`` files, which SimpleITK reads silently with zeros past
the cut, are caught by comparing the gzip trailer's size with the size the NIfTI header implies.

Arrays follow SimpleITK order: ``(Z, Y, X)`` (4-D CTP: ``(T, Z, Y, X)``).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from medsegdiff.errors import DataError

if TYPE_CHECKING:
    import SimpleITK as sitk

    from medsegdiff.config.data import DataConfig
    from medsegdiff.data.discovery import CaseFiles

log = logging.getLogger(__name__)


class CaseError(DataError):
    """One case cannot be used. ``case_id``, ``path`` and ``kind`` identify what and why.

    ``kind`` is one of ``missing_modality``, ``missing_file``, ``unreadable``, ``empty``,
    ``grid_mismatch``.
    """

    def __init__(self, message: str, *, case_id: str = "", path: str | os.PathLike[str] | None = None,
                 kind: str = "unreadable") -> None:
        super().__init__(message)
        self.case_id = case_id
        self.path = None if path is None else Path(path)
        self.kind = kind


# --------------------------------------------------------------------------- geometry


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


@dataclass(frozen=True)
class Geometry:
    """A 3-D image grid exactly as SimpleITK reports it.

    Attributes:
        size: voxels ``(x, y, z)``.
        spacing: mm ``(x, y, z)``.
        origin: physical position of the first voxel centre (LPS, mm).
        direction: row-major 3 x 3 direction cosines (9 floats).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image | Any) -> Geometry:
        """The (spatial) grid of an image or of an ``ImageFileReader`` after ``ReadImageInformation``.

        For a 4-D image (CTP) the first three axes are taken.
        """
        size = tuple(int(v) for v in image.GetSize())
        dim = len(size)
        if dim < 3:
            raise DataError(f"image has {dim} dimensions; a 3-D volume is required")
        spacing = tuple(float(v) for v in image.GetSpacing())
        origin = tuple(float(v) for v in image.GetOrigin())
        d = np.array(image.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
        return cls(size=size[:3], spacing=spacing[:3], origin=origin[:3],  # type: ignore[arg-type]
                   direction=tuple(float(v) for v in d.ravel()))

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        try:
            geom = cls(size=tuple(int(v) for v in data["size"]),  # type: ignore[arg-type]
                       spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
                       origin=tuple(float(v) for v in data["origin"]),  # type: ignore[arg-type]
                       direction=tuple(float(v) for v in data["direction"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"geometry record {data!r} is invalid ({err}); expected size/spacing/origin/direction") from None
        if len(geom.size) != 3 or len(geom.spacing) != 3 or len(geom.origin) != 3 or len(geom.direction) != 9:
            raise DataError(f"geometry record {data!r} is invalid; expected 3 sizes/spacings/origins and 9 directions")
        return geom

    def reference_image(self, pixel_id: int | None = None) -> sitk.Image:
        """An all-zero image on this grid (default pixel type uint8), e.g. for resampling onto it."""
        img = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8 if pixel_id is None else pixel_id)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy this grid's spacing/origin/direction onto a 3-D ``image`` of the same size (snapping)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape of this grid in SimpleITK/numpy order ``(Z, Y, X)``."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (= product of the spacing in mm / 1000)."""
        return float(self.spacing[0] * self.spacing[1] * self.spacing[2]) / 1000.0

    def differences(self, other: Geometry, tolerance: float) -> tuple[list[str], list[str]]:
        """Compare ``other`` with this (reference) grid.

        Returns:
            ``(mismatches, snapped)``: one phrase per property that differs by more than
            ``tolerance`` (size: any difference), and the properties that differ by at most
            ``tolerance`` but not exactly (to be snapped).
        """
        mismatches, snapped = [], []
        if tuple(other.size) != tuple(self.size):
            mismatches.append(f"size {tuple(other.size)} != reference {tuple(self.size)}")
        for name, unit in (("spacing", " mm"), ("origin", " mm"), ("direction", "")):
            a, b = np.asarray(getattr(other, name), float), np.asarray(getattr(self, name), float)
            diff = float(np.max(np.abs(a - b)))
            if diff > tolerance:
                mismatches.append(f"{name} {_fmt(a)} != reference {_fmt(b)} (max difference {diff:.3g}{unit} "
                                  f"> tolerance {tolerance:g})")
            elif diff > 0:
                snapped.append(name)
        return mismatches, snapped


# --------------------------------------------------------------------------- reading


def _nifti1_expected_size(header: bytes) -> int | None:
    """Uncompressed byte size of a NIfTI-1 file from its header, or None if not NIfTI-1."""
    if len(header) < 348:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            ndim = dims[0]
            if not 1 <= ndim <= 7 or bitpix <= 0:
                return None
            n = math.prod(max(1, d) for d in dims[1 : ndim + 1])
            return int(vox_offset) + n * bitpix // 8
    return None


def _check_gzip(path: Path) -> None:
    """Detect a truncated / corrupt ``.nii.gz`` (SimpleITK silently reads zeros past the cut).

    Cheap path: the gzip trailer stores the uncompressed size (mod 2**32); compare it with the
    size the NIfTI header implies. Only if they differ is the whole stream decompressed to decide.
    """
    try:
        with gzip.open(path, "rb") as fh:
            header = fh.read(352)
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"image file {path} is not a valid gzip file ({err}); re-extract or re-download it") from None
    expected = _nifti1_expected_size(header)
    if expected is not None and expected % (1 << 32) == isize:
        return
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(decomp.decompress(chunk))
                if decomp.eof:
                    break
    except zlib.error as err:
        raise DataError(f"image file {path} is a corrupt gzip stream ({err}); re-extract or re-download it") from None
    if not decomp.eof:
        raise DataError(f"image file {path} is truncated (gzip stream ends early after {total} bytes); "
                        "re-extract or re-download it")
    if expected is not None and total < expected:
        raise DataError(f"image file {path} is truncated ({total} of {expected} bytes of image data); "
                        "re-extract or re-download it")


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """Read a medical image with SimpleITK, turning every failure into one clear line.

    Args:
        path: ``.nii.gz``, ``.nii``, ``.mha`` or anything SimpleITK reads.

    Returns:
        The image (scl_slope / scl_inter already applied by SimpleITK).

    Raises:
        DataError: missing file, 0-byte file, truncated or corrupt gzip, unreadable file, image
            with no voxels.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file {p} does not exist")
    nbytes = p.stat().st_size
    if nbytes == 0:
        raise DataError(f"image file {p} is empty (0 bytes); re-extract or re-download it")
    name = p.name.lower()
    if name.endswith(".gz"):
        _check_gzip(p)
    elif name.endswith(".nii"):
        with open(p, "rb") as fh:
            expected = _nifti1_expected_size(fh.read(352))
        if expected is not None and nbytes < expected:
            raise DataError(f"image file {p} is truncated ({nbytes} of {expected} bytes); re-extract or re-download it")
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()
        reason = next((ln.strip() for ln in reversed(detail) if ln.strip()), "unknown error")
        raise DataError(f"image file {p} cannot be read by SimpleITK ({reason[:200]})") from None
    if image.GetNumberOfPixels() == 0:
        raise DataError(f"image file {p} is an empty image (size {image.GetSize()})")
    return image


_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def count_nonfinite_nifti(path: str | os.PathLike[str]) -> int:
    """Number of NaN/inf voxels stored in a float NIfTI-1 file (0 for integer types).

    ITK's NIfTI reader silently turns NaN into 0, so the count must come from the raw voxel data:
    the file is streamed once (the whole gzip stream is decompressed, which also verifies it).

    Raises:
        DataError: the gzip stream is corrupt or truncated.
    """
    p = Path(path)
    gz = p.name.lower().endswith(".gz")
    opener = gzip.open if gz else open
    try:
        with opener(p, "rb") as fh:  # type: ignore[operator]
            header = fh.read(352)
            if len(header) < 348:
                return 0
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            if struct.unpack(endian + "i", header[:4])[0] != 348:
                return 0  # not NIfTI-1
            code = struct.unpack(endian + "h", header[70:72])[0]
            if code not in _NIFTI_FLOATS:
                return 0
            dtype = np.dtype(endian + _NIFTI_FLOATS[code])
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            fh.read(max(0, vox_offset - len(header)))
            count, rest = 0, b""
            chunk_elems = (1 << 22) // dtype.itemsize
            while True:
                data = fh.read(chunk_elems * dtype.itemsize)
                if not data:
                    break
                data = rest + data
                usable = len(data) - len(data) % dtype.itemsize
                rest = data[usable:]
                count += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype=dtype))))
            return count
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"image file {p} is truncated or corrupt ({err}); re-extract or re-download it") from None


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    """Grid of an image file from its header only (no voxel data is read)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file {p} does not exist")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise DataError(f"image file {p} cannot be read by SimpleITK ({(lines or ['?'])[-1][:200]})") from None
    return Geometry.from_image(reader)


# --------------------------------------------------------------------------- cases


@dataclass
class LoadedCase:
    """One case in memory, checked and on one grid.

    Attributes:
        case_id: subject ID.
        images: modality -> float32 ``(Z, Y, X)`` (CTP ``(T, Z, Y, X)``), in ``data.modalities`` order.
        mask: uint8 ``(Z, Y, X)`` in {0, 1}, or None without a mask.
        geometry: the reference grid (NCCT, or the first modality if there is no NCCT).
        nonfinite: per modality (and ``mask``) the number of NaN/inf voxels replaced by 0.
        files: what was read (modality or ``mask`` -> path).
        notes: one line per snapped file / other remark (not errors).
    """

    case_id: str
    images: dict[str, np.ndarray]
    mask: np.ndarray | None
    geometry: Geometry
    nonfinite: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _case_error(case_id: str, path: Path | None, err: DataError, kind: str) -> CaseError:
    return CaseError(f"case {case_id}: {err}", case_id=case_id, path=path, kind=kind)


def _kind_of(err: DataError) -> str:
    msg = str(err)
    if "does not exist" in msg:
        return "missing_file"
    if "empty" in msg:
        return "empty"
    return "unreadable"


def _reference(case: CaseFiles, modalities: Sequence[str]) -> tuple[Geometry, Path, list[str]]:
    notes: list[str] = []
    if case.ncct is not None:
        try:
            return read_geometry(case.ncct), case.ncct, notes
        except DataError as err:
            if "ncct" in modalities:
                raise _case_error(case.case_id, case.ncct, err, _kind_of(err)) from None
            notes.append(f"NCCT header unreadable ({err}); using the first modality's grid as reference")
    for m in modalities:
        if m in case.images:
            path = case.images[m]
            try:
                return read_geometry(path), path, notes
            except DataError as err:
                raise _case_error(case.case_id, path, err, _kind_of(err)) from None
    raise CaseError(f"case {case.case_id}: no image file to take the reference grid from",
                    case_id=case.case_id, kind="missing_modality")


def _read_checked(case_id: str, what: str, path: Path, ref: Geometry, ref_path: Path, tol: float,
                  notes: list[str]) -> np.ndarray:
    try:
        image = read_image(path)
    except DataError as err:
        raise _case_error(case_id, path, err, _kind_of(err)) from None
    if image.GetDimension() not in (3, 4):
        raise CaseError(f"case {case_id}: {what} file {path} has {image.GetDimension()} dimensions; "
                        "a 3-D volume (4-D for CTP) is required", case_id=case_id, path=path, kind="unreadable")
    geom = Geometry.from_image(image)
    mismatches, snapped = ref.differences(geom, tol)
    if mismatches:
        raise CaseError(f"case {case_id}: {what} file {path} is not on the reference grid of {ref_path.name}: "
                        + "; ".join(mismatches) + "; resample it onto the NCCT grid or raise data.grid_tolerance",
                        case_id=case_id, path=path, kind="grid_mismatch")
    if snapped:
        notes.append(f"{what}: {', '.join(snapped)} snapped to the reference grid (difference <= {tol:g})")
    return sitk.GetArrayFromImage(image)


def load_case(case: CaseFiles, data_cfg: DataConfig) -> LoadedCase:
    """Read every requested modality (and the mask) of one case, check and clean them.

    Args:
        case: files from :func:`medsegdiff.data.discovery.discover_cases`.
        data_cfg: uses ``modalities`` and ``grid_tolerance``.

    Returns:
        LoadedCase with float32 ``(Z, Y, X)`` images (NaN/inf -> 0, counted) and a uint8 mask
        binarised with ``> 0`` after SimpleITK applied the NIfTI scale slope.

    Raises:
        CaseError: missing modality or file, unreadable/truncated/empty file, an all-zero image,
            a grid mismatch beyond ``data.grid_tolerance``.
    """
    cid = case.case_id
    modalities = list(data_cfg.modalities)
    missing = [m for m in modalities if m not in case.images]
    if missing:
        raise CaseError(f"case {cid}: missing modality {', '.join(missing)} (no file found)",
                        case_id=cid, kind="missing_modality")
    tol = float(data_cfg.grid_tolerance)
    ref, ref_path, notes = _reference(case, modalities)
    images: dict[str, np.ndarray] = {}
    nonfinite: dict[str, int] = {}
    files: dict[str, Path] = {}
    for m in modalities:
        path = case.images[m]
        arr = _read_checked(cid, m, path, ref, ref_path, tol, notes).astype(np.float32, copy=False)
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        if n_bad:
            arr = np.where(bad, np.float32(0.0), arr)
        elif path.name.lower().endswith((".nii", ".nii.gz")):
            try:  # ITK already replaced NaN by 0 in NIfTI files: count them from the raw data
                n_bad = count_nonfinite_nifti(path)
            except DataError as err:
                raise _case_error(cid, path, err, "unreadable") from None
        nonfinite[m] = n_bad
        if n_bad >= arr.size:
            raise CaseError(f"case {cid}: {m} file {path} holds no number: all {arr.size} voxels are NaN or inf; "
                            "re-export the map (or drop this modality from data.modalities)",
                            case_id=cid, path=path, kind="empty")
        if n_bad:
            notes.append(f"{m}: {n_bad} non-finite voxels replaced by 0")
            log.warning("case %s: %s file %s: %d of %d voxels (%.1f%%) are NaN or inf; they are set to 0",
                        cid, m, path, n_bad, arr.size, 100.0 * n_bad / arr.size)
        if not np.any(arr):
            raise CaseError(f"case {cid}: {m} file {path} is an empty image (all voxels are 0)",
                            case_id=cid, path=path, kind="empty")
        images[m] = arr
        files[m] = path
    mask = None
    if case.mask is not None:
        raw = _read_checked(cid, "mask", case.mask, ref, ref_path, tol, notes)
        if raw.ndim != 3:
            raise CaseError(f"case {cid}: mask file {case.mask} is not a 3-D volume", case_id=cid,
                            path=case.mask, kind="unreadable")
        raw = raw.astype(np.float32, copy=False)
        nonfinite["mask"] = int((~np.isfinite(raw)).sum())
        if nonfinite["mask"]:
            log.warning("case %s: mask file %s: %d voxels are NaN or inf; they count as background",
                        cid, case.mask, nonfinite["mask"])
        mask = (np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0) > 0).astype(np.uint8)
        files["mask"] = case.mask
    return LoadedCase(case_id=cid, images=images, mask=mask, geometry=ref, nonfinite=nonfinite, files=files,
                      notes=notes)


def _skip_or_raise(cid: str, err: DataError, skip: bool, key: str, skip_value: str,
                   skipped: list[tuple[str, str]]) -> None:
    if not skip:
        raise DataError(f"{err}; stopping because data.{key}=fail (set data.{key}={skip_value} to skip such cases)")
    skipped.append((cid, str(err)))
    log.warning("skipping %s", err)


def iter_cases(cases: Iterable[CaseFiles], data_cfg: DataConfig, skipped: list[tuple[str, str]]) -> Iterator[LoadedCase]:
    """Load cases lazily, applying ``data.missing_modality`` and ``data.on_error``.

    Skipped cases are appended to ``skipped`` as ``(case_id, reason)`` while iterating.

    Raises:
        DataError: a case fails and the policy is ``fail``.
    """
    for case in cases:
        missing_mod = [m for m in case.missing if m != "mask"]
        if missing_mod or "mask" in case.missing:
            err = DataError(case.missing_message())
            if missing_mod:
                _skip_or_raise(case.case_id, err, data_cfg.missing_modality == "skip_case", "missing_modality",
                               "skip_case", skipped)
            else:
                _skip_or_raise(case.case_id, err, data_cfg.on_error == "skip", "on_error", "skip", skipped)
            continue
        try:
            loaded = load_case(case, data_cfg)
        except CaseError as err:
            if err.kind == "missing_modality":
                _skip_or_raise(case.case_id, err, data_cfg.missing_modality == "skip_case", "missing_modality",
                               "skip_case", skipped)
            else:
                _skip_or_raise(case.case_id, err, data_cfg.on_error == "skip", "on_error", "skip", skipped)
            continue
        yield loaded


def load_cases(cases: Iterable[CaseFiles], data_cfg: DataConfig, *, lazy: bool = False
               ) -> tuple[list[LoadedCase] | Iterator[LoadedCase], list[tuple[str, str]]]:
    """Load many cases; nothing is dropped silently.

    Args:
        cases: from discovery (complete or not).
        data_cfg: ``modalities``, ``grid_tolerance``, ``on_error`` (skip/fail) and
            ``missing_modality`` (skip_case/fail).
        lazy: return an iterator (``skipped`` fills up while iterating) instead of a list.

    Returns:
        ``(loaded, skipped)`` where ``skipped`` lists ``(case_id, one-line reason)``.

    Raises:
        DataError: a case fails and its policy is ``fail`` (when iterating, if lazy).
    """
    skipped: list[tuple[str, str]] = []
    it = iter_cases(cases, data_cfg, skipped)
    if lazy:
        return it, skipped
    return list(it), skipped


def skipped_summary(skipped: Sequence[tuple[str, str]]) -> str:
    """Multi-line summary of skipped cases for logs and reports ("" when none)."""
    if not skipped:
        return ""
    lines = [f"{len(skipped)} case(s) skipped:"] + [f"  {cid}: {reason}" for cid, reason in skipped]
    return "\n".join(lines)


__all__ = ["CaseError", "Geometry", "LoadedCase", "count_nonfinite_nifti", "iter_cases", "load_case", "load_cases", "read_geometry",
           "read_image", "skipped_summary"]
