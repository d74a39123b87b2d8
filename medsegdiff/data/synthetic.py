"""Synthetic ISLES24 look-alike: a real directory tree of real ``.nii.gz`` files.

The generator writes either on-disk layout of the ISLES'24 training data (reference note
``isles24_dataset.md`` sections 4.1 / 4.2) with the quirks of the real release, and images that
carry a *learnable but non-trivial* lesion signal, so that the whole pipeline (discovery, loading,
preprocessing, training, sampling, official metrics) can be exercised end to end without the
100 GB archive.

Generative model (one case; all lengths in mm, arrays in SimpleITK order ``(Z, Y, X)``)
-------------------------------------------------------------------------------------------------
Smooth random fields ``F(scale)`` (unit variance, correlation length ``scale`` mm) are built
separably: i.i.d. normals on a coarse node grid, interpolated with Gaussian weights along each
axis (three small matrix products, so a full 512 x 600 x 70 field costs well under a second).
Voxel noise terms are differently shifted views of one block of normals (cheap at full size).

* **Head.** Brain = ellipsoid (radii ~65 x 83 x 58 mm) whose boundary is modulated by
  ``F(30)``; skull = shell of ~7 mm outside it (500-1900 HU in NCCT/CTA), thin scalp, air
  (-1000 HU). CSF = two ventricle ellipsoids plus sulcal pockets (low tail of ``F(8)``).
  Grey-matter fraction ``g = clip(0.5 + 0.35 F(8) + 0.45 [near cortex], 0, 1)``.
* **Hypoperfused region** (the "penumbra + core"): one hemisphere, a noisy ellipsoid score
  ``h_score = ||(p - c) / r|| + 0.25 F(15)``, thresholded at the quantile that gives the target
  volume ``V_hypo = V_lesion / c`` with ``c ~ U(0.2, 0.35)``; flattened in z so that most of it
  lies inside the perfusion slab.
* **Core = ground-truth lesion**: the voxels of the hypoperfused region with the lowest
  ``h_score + 0.45 F(8)`` (irregular, often several components), volume ``V_lesion`` drawn
  log-normal (median 12 mL, sigma 0.9, clipped to 1-120 mL). Only the lowest ``1 / (1 + u)``
  of it (``u ~ U(0.1, 0.35)``) is the *acute core* visible in CBF/CBV; the rest is infarct
  growth into the penumbra that no acute map shows (a ceiling below 1 for every model). Soft
  memberships ``h, k`` in [0, 1] (the binary regions blurred by a 1 mm Gaussian) drive the
  image values; the mask is the hard lesion.
* **Perfusion maps** (icobrain-like units; 0 outside the brain and outside a slab of
  ``~32 mm`` = 16 slices at full size, at least 8 slices on small grids, centred near the lesion):

  ========  ======================  =========================  ======================
  map       normal tissue            penumbra (h = 1)            core (k = 1)
  ========  ======================  =========================  ======================
  Tmax (s)  1-2                      10.5-13                     +3-6 on top
  MTT (s)   ~4                       +4-7                        +2-4 on top
  CBF       35 (WM) - 55 (GM)        x ~0.6-0.75 (smoothly       x ~0.15-0.35 on top
                                     varying, 0.3-0.95)          (smoothly varying)
  CBV       1.8 (WM) - 4.5 (GM)      x 1.15                      x 0.2-0.4 on top
  ========  ======================  =========================  ======================

  plus smooth and voxel noise, CSF with low flow, vessels (intersections of the zero sets of
  two ``F(20)`` fields; high CBF/CBV, short Tmax/MTT, bright in CTA, attenuated in the
  hypoperfused territory), an optional *distractor* region with Tmax 8.5-12 s but normal CBF/CBV
  (benign oligaemia; fools the Tmax rule), rare outliers (CBF x3-8, negative CBV/MTT).
* **NCCT / CTA** int16 HU: grey 38 / white 28 HU, CSF 6 HU, core 2-5 HU darker (early ischaemic
  hypodensity), noise ~3 HU; CTA brain ~40 HU, vessels 150-400 HU.

Why this is learnable but not trivial: the official baseline ``Tmax > 9 s`` captures the whole
hypoperfused region (and the distractor), so its Dice is about ``2c / (1 + c)`` = 0.3-0.5,
whereas a rule that also looks at CBF (``Tmax > 6 & CBF < 15``) separates the core
(CBF ~5-12) from the penumbra (CBF ~25-40) and reaches a clearly higher Dice; infarct growth,
noise, vessels, CSF, parts of the lesion outside the slab and soft boundaries keep both below 1.
Measured on 8 tiny cases (7 non-empty masks) for seeds 0-3: baseline mean Dice 0.35-0.42, the
CBF rule 0.71-0.77 (``tests/data/test_synthetic.py`` asserts this on the seed-0 fixture).

Quirks of the real release reproduced (reference sections 3-5, 7), assigned by case index ``i``
of ``n`` (listed per case in ``synthetic_manifest.json`` at the root):

* IDs ``sub-strokeNNNN`` drawn (sorted) from the real Zenodo training IDs, so they have gaps.
* Grid: ``full`` = 512 x (512-686) x (34-48 or 64-89) voxels, spacing ~0.37-0.56 mm in-plane and
  2 mm between slices; ``tiny`` = 48 x (48-60) x (10-14) voxels; an explicit ``(x, y, z)`` is used
  as is. Off ``full`` the spacing is scaled so the physical extent stays that of a head
  (~220 mm in-plane, ~140 mm in z; the grid stays anisotropic).
* Direction: the real NIfTI affine has a negative x/y diagonal (RAS storage of an LPS grid, i.e.
  SimpleITK direction = identity); ``i % 4 == 1`` uses SimpleITK direction ``diag(-1, -1, 1)``
  and ``i % 4 == 3`` an oblique (gantry tilt, rotation of 5-12 degrees about x) direction.
* Every derivative (CTA, maps, mask) has its origin perturbed by ~1e-4 mm and its direction by
  ~1e-5 relative to the NCCT: below ``data.grid_tolerance``, to be snapped.
* Masks are uint16 {0, 1}; ``i % 3 == 1`` stores raw {0, 65535} with ``scl_slope = 1/65535``.
* Case ``i == 2`` (n >= 3) has an empty mask (its hypoperfused region has no core).
* Case ``i == 0`` (n >= 2) has a stray uncompressed duplicate ``...lesion-msk.nii`` mask.
* Case ``i == n - 1`` (n >= 6) has no CTA.
* Clinical tables: per-case ``.xlsx`` (Zenodo) or ``.csv`` (2024) with the section-8 columns;
  the ``.xlsx`` files are minimal valid Office Open XML written with ``zipfile`` (inline strings).

Beyond the release: ``synthetic_truth/<case>_acute-core.nii.gz`` (:func:`acute_core_path`) holds each
case's acute core, so that a benchmark can show how much of the lesion the acute images carry.

Not reproduced: native-space ``raw_data`` copies of CTA/CTP/maps, CTP (unless ``ctp=True``),
follow-up DWI/ADC, LVO / Circle-of-Willis masks.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from medsegdiff.errors import DataError
from medsegdiff.utils.io import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text

Layout = Literal["zenodo", "challenge2024"]
ShapeSpec = str | Sequence[int]

MANIFEST_NAME = "synthetic_manifest.json"
GENERATOR_VERSION = 1
TRUTH_DIR = "synthetic_truth"
ACUTE_CORE_SUFFIX = "_acute-core.nii.gz"
MAPS = ("tmax", "mtt", "cbf", "cbv")

# Real Zenodo training IDs (reference section 2): 1-189 without the hidden-test IDs and 160.
_TEST_IDS = {18, 23, 29, 31, 32, 34, 35, 39, 41, 42, 46, 50, 51, 56, 58, 59, 60, 61, 63, 64, 65, 67,
             69, 72, *range(120, 133)}
REAL_TRAIN_IDS = tuple(i for i in range(1, 190) if i not in _TEST_IDS and i not in (24, 44, 160))

BASELINE_COLUMNS = (
    "Center", "Sex", "Age", "Atrial fibrillation", "Hypertension", "Diabetes", "Hyperlipidemia",
    "Anticoagulation", "Lipid lowering drugs", "PAIs", "Glucose", "Leucocytes", "CRP", "INR",
    "Wake-up", "In-House", "Referral", "Onset to door", "Alert to door", "NIHSS at admission",
    "mRS at admission", "mRS premorbid", "Door to imaging", "Door to groin", "Door to first series",
    "Time of intervention", "Door to recanalization", "Statins",
)
OUTCOME_COLUMNS = ("mRS 3 months", "mRS discharge", "TICI postinterventional")
_FLAGS = ("Atrial fibrillation", "Hypertension", "Diabetes", "Hyperlipidemia", "Anticoagulation",
          "Lipid lowering drugs", "PAIs", "Wake-up", "In-House", "Referral", "Statins")
_TIMES = ("Onset to door", "Alert to door", "Door to imaging", "Door to groin", "Door to first series",
          "Time of intervention", "Door to recanalization")

TINY_X = 48
FULL_X = 512


@dataclass
class CaseSpec:
    """Per-case choices (geometry and quirks); recorded in the manifest."""

    case_id: str
    index: int
    size: tuple[int, int, int]  # (x, y, z)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    empty_mask: bool = False
    mask_scaled_uint16: bool = False
    stray_nii_mask: bool = False
    missing: list[str] = field(default_factory=list)
    oblique: bool = False
    batch: int = 1
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- smooth random fields


def _interp_matrix(n: int, spacing: float, scale: float) -> np.ndarray:
    """(n, m) Gaussian interpolation weights from coarse nodes (every ``scale`` mm) to ``n`` voxels."""
    extent = n * spacing
    m = int(math.ceil(extent / scale)) + 3
    nodes = (np.arange(m) - 1.0) * scale
    pos = (np.arange(n) + 0.5) * spacing
    w = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) / (0.8 * scale)) ** 2)
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True))  # unit variance for i.i.d. unit normals
    return w.astype(np.float32)


def smooth_field(rng: np.random.Generator, shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                 scale: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field with correlation length ~``scale`` mm.

    Args:
        rng: random generator.
        shape_zyx: output shape ``(Z, Y, X)``.
        spacing_zyx: voxel spacing in mm, same order.
        scale: correlation length in mm.

    Returns:
        float32 array of ``shape_zyx``.
    """
    wz, wy, wx = (_interp_matrix(n, s, scale) for n, s in zip(shape_zyx, spacing_zyx))
    coarse = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]), dtype=np.float32)
    f = coarse @ wx.T  # (mz, my, X)
    f = wy @ f  # (mz, Y, X)
    mz, ny, nx = f.shape
    f = (wz @ f.reshape(mz, ny * nx)).reshape(len(wz), ny, nx)
    return f


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _soften(mask: np.ndarray, spacing_zyx: Sequence[float], sigma_mm: float = 1.0) -> np.ndarray:
    """Soft membership in [0, 1]: the binary ``mask`` blurred by a Gaussian of ``sigma_mm`` (bounding box only)."""
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    sig = [sigma_mm / s for s in spacing_zyx]
    pad = [int(math.ceil(3 * s)) + 1 for s in sig]
    box = []
    for ax, p in enumerate(pad):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(0, idx[0] - p), min(mask.shape[ax], idx[-1] + p + 1)))
    out[tuple(box)] = gaussian_filter(mask[tuple(box)].astype(np.float32), sig, mode="nearest")
    return out


def _lowest(score: np.ndarray, eligible: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """Boolean mask of the ``count`` eligible voxels with the lowest score, and the threshold."""
    vals = score[eligible]
    if count <= 0 or vals.size == 0:
        return np.zeros(score.shape, bool), -np.inf
    count = min(count, vals.size)
    thr = float(np.partition(vals, count - 1)[count - 1])
    return eligible & (score <= thr), thr


# --------------------------------------------------------------------------- geometry / specs


def parse_shape(shape: ShapeSpec) -> str | tuple[int, int, int]:
    """``"tiny"``, ``"full"``, ``"XxYxZ"`` or a sequence of three ints -> ``"tiny" | "full" | (x, y, z)``.

    Raises:
        DataError: for anything else.
    """
    if isinstance(shape, str):
        s = shape.strip().lower()
        if s in ("tiny", "full"):
            return s
        parts = s.split("x")
        if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
            shape = [int(p) for p in parts]
        else:
            raise DataError(f"synthetic shape {shape!r} is not understood; use tiny, full or XxYxZ (e.g. 64x72x12)")
    vals = list(shape)
    if len(vals) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 4 for v in vals):
        raise DataError(f"synthetic shape {shape!r} must be three integers >= 4 (x, y, z)")
    return int(vals[0]), int(vals[1]), int(vals[2])


def _rotation_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _case_spec(index: int, n: int, case_id: str, shape: str | tuple[int, int, int],
               rng: np.random.Generator) -> CaseSpec:
    if shape == "full":
        x = FULL_X
        y = int(rng.integers(512, 687))
        z = int(rng.integers(34, 49)) if rng.random() < 0.4 else int(rng.integers(64, 90))
        sxy = float(rng.uniform(0.37, 0.5625))
        sz = 2.0
    else:
        if shape == "tiny":
            x, y, z = TINY_X, int(rng.choice([48, 52, 56, 60])), int(rng.integers(10, 15))
        else:
            x, y, z = shape
        sxy = 0.43 * 512.0 / x * float(rng.uniform(0.9, 1.1))
        sz = 2.0 * 70.0 / z
    if index % 4 == 1:
        direction = np.diag([-1.0, -1.0, 1.0])
    elif index % 4 == 3:
        direction = _rotation_x(float(rng.uniform(5, 12)) * (1 if rng.random() < 0.5 else -1))
    else:
        direction = np.eye(3)
    extent = np.array([x * sxy, y * sxy, z * sz])
    # centre the grid on the head (physical centre ~ (0, 0, zc)), origin = first voxel centre
    centre = np.array([rng.uniform(-5, 5), rng.uniform(-10, 10), rng.uniform(-330, -250)])
    origin = centre - direction @ (extent / 2 - np.array([sxy, sxy, sz]) / 2)
    spec = CaseSpec(
        case_id=case_id,
        index=index,
        size=(x, y, z),
        spacing=(sxy, sxy, sz),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction.ravel()),
        empty_mask=(n >= 3 and index == 2),
        mask_scaled_uint16=(index % 3 == 1),
        stray_nii_mask=(n >= 2 and index == 0),
        missing=["cta"] if (n >= 6 and index == n - 1) else [],
        oblique=(index % 4 == 3),
        batch=1 + (index * 3) // max(n, 1),
    )
    return spec


def _case_ids(n: int, rng: np.random.Generator) -> list[str]:
    pool = list(REAL_TRAIN_IDS)
    if n > len(pool):  # continue the numbering with gaps
        nxt = 190
        while len(pool) < n:
            pool.append(nxt)
            nxt += 1 + int(rng.integers(0, 3))
    chosen = sorted(int(v) for v in rng.choice(pool, size=n, replace=False))
    return [f"sub-stroke{v:04d}" for v in chosen]


# --------------------------------------------------------------------------- image synthesis


def synthesize_case(spec: CaseSpec, rng: np.random.Generator, *, ctp: bool = False) -> dict[str, np.ndarray]:
    """Images and mask of one case, arrays ``(Z, Y, X)`` (see the module docstring for the model).

    Returns:
        dict with ``ncct``/``cta`` int16 HU, ``tmax``/``mtt``/``cbf``/``cbv`` float32,
        ``mask`` uint8 {0, 1} and optionally ``ctp`` int16 ``(T, Z, Y, X)``; ``spec.stats`` is filled.
    """
    nx, ny, nz = spec.size
    sxy, _, sz = spec.spacing
    shape = (nz, ny, nx)
    spz = (sz, sxy, sxy)
    f32 = np.float32

    def F(scale: float, n_z: int = nz) -> np.ndarray:
        return smooth_field(rng, (n_z, ny, nx), spz, scale)

    # one bank of normals; each noise() call is a differently shifted view (cheap at full size)
    bank = rng.standard_normal((nz + 2, ny + 8, nx + 8), dtype=f32)
    offsets = [(a, b, c) for a in range(3) for b in range(8) for c in range(8)]
    order = rng.permutation(len(offsets))
    calls = [0]

    def noise(sigma: float, z0: int = 0, z1: int = nz) -> np.ndarray:
        dz, dy, dx = offsets[order[calls[0] % len(offsets)]]
        calls[0] += 1
        return bank[dz + z0:dz + z1, dy:dy + ny, dx:dx + nx] * f32(sigma)

    zc = ((np.arange(nz, dtype=f32) - (nz - 1) / 2) * sz)[:, None, None]
    yc = ((np.arange(ny, dtype=f32) - (ny - 1) / 2) * sxy)[None, :, None]
    xc = ((np.arange(nx, dtype=f32) - (nx - 1) / 2) * sxy)[None, None, :]

    # ---- head
    ax, ay, az = rng.uniform(60, 70), rng.uniform(76, 90), rng.uniform(52, 62)
    oz = rng.uniform(-0.1, 0.1) * nz * sz
    rho = np.sqrt((xc / ax) ** 2 + (yc / ay) ** 2 + ((zc - oz) / az) ** 2) + 0.025 * F(30.0)
    brain = rho < 1.0
    skull = (rho >= 1.0) & (rho < 1.0 + 7.0 / ax)
    scalp = (rho >= 1.0 + 7.0 / ax) & (rho < 1.0 + 12.0 / ax)
    tex = F(8.0)
    vent = np.zeros(shape, bool)
    for side in (-1, 1):
        vent |= (((xc - side * 9.0) / 6.0) ** 2 + ((yc + 5.0) / 24.0) ** 2 + ((zc - oz - 8.0) / 11.0) ** 2) < 1.0
    csf = brain & (vent | (tex < -1.9))
    tissue = brain & ~csf
    g = np.clip(0.5 + 0.35 * tex + 0.45 * (rho > 0.86), 0.0, 1.0).astype(f32)  # grey-matter fraction

    # ---- slab: ~32 mm (16 slices at 2 mm), >= 8 slices on small grids
    n_slab = min(nz, max(int(round(32.0 / sz)), 8))

    # ---- lesion volumes (mL) and hypoperfused region
    voxel_ml = sxy * sxy * sz / 1000.0
    frac = float(rng.uniform(0.2, 0.35))
    v_les = float(np.clip(rng.lognormal(math.log(12.0), 0.9), 1.0, 120.0))
    v_hypo = min(v_les / frac, 260.0)
    v_les = frac * v_hypo
    side = 1.0 if rng.random() < 0.5 else -1.0
    r = (3 * v_hypo * 1000 / (4 * math.pi)) ** (1 / 3)
    hx = side * rng.uniform(0.25, 0.5) * ax
    hy = rng.uniform(-0.45, 0.45) * ay
    zmax = max(0.0, min(0.5 * nz * sz - 0.5 * n_slab * sz, 25.0))
    hz = oz + rng.uniform(-0.5, 0.5) * min(zmax, az * 0.5)
    hz = float(np.clip(hz, -(nz - 1) / 2 * sz, (nz - 1) / 2 * sz))
    h_score = np.sqrt(((xc - hx) / (1.1 * r)) ** 2 + ((yc - hy) / (1.25 * r)) ** 2
                      + ((zc - hz) / (0.55 * r)) ** 2) + 0.25 * F(15.0)
    hemi = (xc * side) > 3.0
    hypo, _ = _lowest(h_score, tissue & hemi, int(round(v_hypo / voxel_ml)))
    c_score = h_score + 0.45 * F(8.0)
    n_les = max(1, int(round(v_les / voxel_ml)))
    if spec.empty_mask:
        core = lesion = np.zeros(shape, bool)
    else:
        # the follow-up lesion = the CBF/CBV core plus some infarct growth into the penumbra that
        # no acute map shows (an upper bound below 1 for any model)
        growth = float(rng.uniform(0.1, 0.35))
        lesion, _ = _lowest(c_score, hypo, n_les)
        core, _ = _lowest(c_score, hypo, max(1, int(round(n_les / (1.0 + growth)))))
    del h_score, c_score
    h = _soften(hypo, spz)
    k = _soften(core, spz)

    # ---- slab position: centred on the lesion (hypoperfused region), jittered
    zi = int(round(hz / sz + (nz - 1) / 2))
    lo = int(np.clip(zi - n_slab // 2 + rng.integers(-1, 2), 0, nz - n_slab))
    hi = lo + n_slab
    zs = slice(lo, hi)

    # ---- vessels (full volume, for CTA)
    fv = F(20.0)
    vessel = brain & (np.abs(fv) < 0.09) & (np.abs(F(20.0)) < 0.09)
    vessel_w = vessel.astype(f32) * (1.0 - 0.7 * h)

    # ---- perfusion maps, computed on the slab only (0 elsewhere)
    hs, ks, gs, csf_s, ves_s = h[zs], k[zs], g[zs], csf[zs], vessel[zs]
    vw_s, brain_s, tissue_s = vessel_w[zs], brain[zs], tissue[zs]
    distract = np.zeros(hs.shape, f32)  # raised Tmax, normal flow (benign oligaemia)
    if rng.random() < 0.7:
        d_vol = v_hypo * rng.uniform(0.15, 0.4)
        rd = (3 * d_vol * 1000 / (4 * math.pi)) ** (1 / 3)
        dx, dy = -side * rng.uniform(0.2, 0.5) * ax, rng.uniform(-0.5, 0.5) * ay
        d_score = (np.sqrt(((xc - dx) / rd) ** 2 + ((yc - dy) / rd) ** 2 + ((zc[zs] - hz) / (0.6 * rd)) ** 2)
                   + 0.2 * F(15.0, n_slab))
        dmask, _ = _lowest(d_score, tissue_s & ~hypo[zs], int(round(d_vol / voxel_ml)))
        distract = _soften(dmask, spz)

    def nz_(sigma: float) -> np.ndarray:
        return noise(sigma, lo, hi)

    t_pen = rng.uniform(10.5, 13.0)
    tmax = 1.0 + 0.5 * np.abs(F(12.0, n_slab)) + 0.8 * F(10.0, n_slab) * hs
    tmax = tmax + hs * (t_pen - tmax) + ks * rng.uniform(3.0, 6.0) + distract * rng.uniform(7.5, 10.0) + nz_(1.0)
    tmax = np.where(csf_s, 1.0 + 1.5 * np.abs(nz_(1.0)), tmax)
    tmax = np.where(ves_s, 0.5 + np.abs(nz_(0.5)), tmax)
    tmax = np.clip(tmax, 0.0, 25.0)

    mtt = (4.0 + 0.5 * F(12.0, n_slab) + hs * rng.uniform(4.0, 7.0) + ks * rng.uniform(2.0, 4.0) + 2.0 * distract
           + nz_(0.8))
    mtt = np.where(csf_s, 1.0 + np.abs(nz_(1.5)), mtt)
    mtt = np.where(ves_s, 2.0 + np.abs(nz_(0.5)), mtt)

    pen_drop = np.clip(rng.uniform(0.25, 0.4) + 0.15 * F(15.0, n_slab), 0.05, 0.7)
    core_drop = np.clip(rng.uniform(0.65, 0.85) + 0.12 * F(10.0, n_slab), 0.3, 0.95)
    cbf = (35.0 + 20.0 * gs) * (1.0 - hs * pen_drop) * (1.0 - ks * core_drop)
    cbf = cbf * (1.0 + 0.08 * F(12.0, n_slab)) + nz_(5.0)
    cbf = np.where(csf_s, np.abs(nz_(3.0)), cbf) + vw_s * rng.uniform(50.0, 90.0)

    cbv = (1.8 + 2.7 * gs) * (1.0 + 0.15 * hs) * (1.0 - ks * rng.uniform(0.6, 0.8)) + nz_(0.35)
    cbv = np.where(csf_s, 0.3 + nz_(0.2), cbv) + vw_s * rng.uniform(4.0, 7.0)

    out: dict[str, np.ndarray] = {}
    n_in = int(brain_s.sum())
    n_out = max(1, n_in // 1000) if n_in else 0
    idx = np.flatnonzero(brain_s.ravel()) if n_out else None
    for name, arr in (("tmax", tmax), ("mtt", mtt), ("cbf", cbf), ("cbv", cbv)):
        slab_arr = np.where(brain_s, arr, 0.0).astype(f32)
        if idx is not None and name != "tmax":  # rare outliers and negative values (reference section 6)
            lo_v, hi_v = {"cbf": (3.0, 8.0), "cbv": (-3.0, 5.0), "mtt": (-4.0, 3.0)}[name]
            sel = rng.choice(idx, size=n_out, replace=False)
            flat = slab_arr.reshape(-1)
            flat[sel] = flat[sel] * rng.uniform(lo_v, hi_v, size=n_out).astype(f32)
        full = np.zeros(shape, f32)
        full[zs] = slab_arr
        out[name] = full

    # ---- NCCT and CTA (HU)
    skull_hu = np.clip(1100.0 + 400.0 * fv, 500.0, 1900.0)  # fv is only used inside the brain elsewhere
    brain_hu = 28.0 + 10.0 * g - k * rng.uniform(2.0, 5.0) + noise(3.0)
    ncct = np.where(scalp, 35.0 + noise(6.0), noise(8.0) - 1000.0)
    ncct = np.where(skull, skull_hu + noise(30.0), ncct)
    ncct = np.where(tissue, brain_hu, np.where(csf, 6.0 + noise(3.0), ncct))
    cta = np.where(tissue, brain_hu + 10.0 + vessel_w * rng.uniform(150.0, 350.0) + noise(2.0),
                   np.where(csf, 10.0 + noise(4.0), ncct))
    out["ncct"] = np.clip(np.rint(ncct), -1024, 3071).astype(np.int16)
    out["cta"] = np.clip(np.rint(cta), -1024, 3071).astype(np.int16)
    if ctp:
        frames = 32
        t = np.arange(frames, dtype=f32)[:, None, None, None]
        bolus = np.clip(t - (3.0 + out["tmax"][None]), 0, None)
        curve = bolus * np.exp(-bolus / 4.0) / 4.0  # gamma-variate-like bolus passage
        amp = out["cbv"][None] * 8.0
        out["ctp"] = np.clip(np.rint(out["ncct"][None] + amp * curve), -1024, 3071).astype(np.int16)

    mask = lesion.astype(np.uint8)
    out["mask"] = mask
    out["core"] = core.astype(np.uint8)  # generator truth, not an ISLES24 file (see acute_core_path)
    n_mask = int(mask.sum())
    spec.stats = {
        "lesion_voxels": n_mask,
        "lesion_ml": round(n_mask * voxel_ml, 3),
        "hypoperfused_ml": round(float(hypo.sum()) * voxel_ml, 3),
        "core_ml": round(float(core.sum()) * voxel_ml, 3),
        "lesion_in_slab_fraction": round(float(mask[zs].sum()) / max(1, n_mask), 3),
        "slab": [lo, hi],
        "hemisphere": "left" if side > 0 else "right",
        "distractor": bool(distract.any()),
    }
    return out


# --------------------------------------------------------------------------- writing


def _perturbed(spec: CaseSpec, rng: np.random.Generator) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Origin / direction of a derivative: NCCT geometry perturbed by ~1e-4 mm / ~1e-5."""
    origin = tuple(float(o + rng.uniform(-1e-4, 1e-4)) for o in spec.origin)
    direction = tuple(float(d + rng.uniform(-1e-5, 1e-5)) for d in spec.direction)
    return origin, direction


def _write_nifti(path: Path, arr: np.ndarray, spec: CaseSpec, *, origin: Sequence[float] | None = None,
                 direction: Sequence[float] | None = None, scl_slope: float | None = None,
                 compression_level: int = 1) -> None:
    """Write ``arr`` (``(Z, Y, X)`` or ``(T, Z, Y, X)``) as NIfTI-1 (``.nii.gz`` or ``.nii``).

    ``scl_slope`` patches the header field (byte offset 112 of the uncompressed NIfTI-1 header)
    after SimpleITK wrote the file, since SimpleITK always writes slope 1.
    """
    is_vector = arr.ndim == 4
    if is_vector:  # 4-D CTP: (T, Z, Y, X) -> 4-D image (x, y, z, t)
        img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
        img.SetSpacing((*spec.spacing, 1.0))
        o = tuple(origin or spec.origin)
        img.SetOrigin((*o, 0.0))
        d = np.eye(4)
        d[:3, :3] = np.array(direction or spec.direction).reshape(3, 3)
        img.SetDirection(tuple(d.ravel()))
    else:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spec.spacing)
        img.SetOrigin(tuple(origin or spec.origin))
        img.SetDirection(tuple(direction or spec.direction))
    compressed = path.name.endswith(".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" + (".nii.gz" if compressed else ".nii"))
    try:
        sitk.WriteImage(img, str(tmp), compressed, compression_level if compressed else -1)
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    if scl_slope is not None:
        raw = gzip.decompress(data) if compressed else data
        raw = raw[:112] + struct.pack("<ff", float(scl_slope), 0.0) + raw[120:]
        data = gzip.compress(raw, compresslevel=max(1, compression_level), mtime=0) if compressed else raw
    atomic_write_bytes(path, data)


def _col_name(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        s = chr(65 + rem) + s
    return s


def write_xlsx(path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a minimal valid ``.xlsx`` (one sheet, inline strings; None/NaN cells left empty)."""
    def cell(ref: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if isinstance(v, (int, float, np.integer, np.floating)):
            return f'<c r="{ref}"><v>{v!r}</v></c>' if isinstance(v, float) else f'<c r="{ref}"><v>{int(v)}</v></c>'
        return f'<c r="{ref}" t="inlineStr"><is><t>{escape(str(v))}</t></is></c>'

    sheet_rows = []
    for r, values in enumerate([list(header), *[list(x) for x in rows]], start=1):
        cells = "".join(cell(f"{_col_name(c)}{r}", v) for c, v in enumerate(values))
        sheet_rows.append(f'<row r="{r}">{cells}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel_ns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    files = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            "</Types>"),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel_ns}/officeDocument" Target="xl/workbook.xml"/>'
            "</Relationships>"),
        "xl/workbook.xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<workbook {ns} xmlns:r="{rel_ns}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel_ns}/worksheet" Target="worksheets/sheet1.xml"/>'
            "</Relationships>"),
        "xl/worksheets/sheet1.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet {ns}><sheetData>'
            + "".join(sheet_rows) + "</sheetData></worksheet>"),
    }
    with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)


def _write_csv(path: Path, header: Sequence[str], row: Sequence[Any]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerow(["" if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in row])
    atomic_write_text(path, buf.getvalue())


def _clinical_rows(spec: CaseSpec, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    def hms(minutes: float) -> str:
        m = int(max(0, minutes))
        return f"{m // 60:02d}:{m % 60:02d}:{int(rng.integers(0, 60)):02d}"

    base: dict[str, Any] = {
        "Center": int(rng.integers(1, 3)),
        "Sex": "M" if rng.random() < 0.55 else "F",
        "Age": int(rng.integers(35, 95)),
        "Glucose": round(float(rng.normal(7.0, 2.0)), 1),
        "Leucocytes": round(float(rng.normal(8.5, 2.5)), 1),
        "CRP": round(float(abs(rng.normal(5, 8))), 1),
        "INR": round(float(rng.normal(1.05, 0.1)), 2),
        "NIHSS at admission": int(rng.integers(0, 30)),
        "mRS at admission": int(rng.integers(0, 6)),
        "mRS premorbid": int(rng.integers(0, 4)),
    }
    for f in _FLAGS:
        base[f] = float(rng.random() < 0.35)
    base["Hyperlipidemia"] = float(rng.choice([0.0, 1.0, 2.0]))  # values above 1 occur (section 8)
    for t in _TIMES:
        base[t] = hms(rng.uniform(10, 400))
    row = [base.get(c) for c in BASELINE_COLUMNS]
    for i in rng.choice(len(row), size=3, replace=False):  # some NaNs
        if BASELINE_COLUMNS[i] not in ("Center", "Sex", "Age"):
            row[i] = float("nan")
    outcome = [int(rng.integers(0, 7)), int(rng.integers(0, 7)), str(rng.choice(["0", "1", "2a", "2b", "3"]))]
    return row, outcome


def acute_core_path(root: str | os.PathLike[str], case_id: str) -> Path:
    """Where the generator writes a case's acute core: ``<root>/synthetic_truth/<case>_acute-core.nii.gz``.

    The acute core is the part of the follow-up lesion that the acute maps show (the rest is
    infarct growth, see the module docstring), on the NCCT grid. It lies outside the ISLES24 layout
    (discovery never reads it) and exists only for synthetic data: it is the information bound that
    ``medsegdiff.baselines.acute_core`` scores beside the models.
    """
    return Path(root) / TRUTH_DIR / f"{case_id}{ACUTE_CORE_SUFFIX}"


def _write_acute_core(root: Path, spec: CaseSpec, core: np.ndarray, compression_level: int = 1) -> Path:
    """Write the acute core on the mask's grid without its perturbation (draws nothing from an rng)."""
    path = acute_core_path(root, spec.case_id)
    _write_nifti(path, core, spec, compression_level=compression_level)
    return path


def _case_paths(root: Path, spec: CaseSpec, layout: Layout) -> dict[str, Path]:
    sid = spec.case_id
    base = root / f"batch_{spec.batch}" if layout == "challenge2024" else root
    der1 = base / "derivatives" / sid / "ses-01"
    paths = {
        "ncct": base / "raw_data" / sid / "ses-01" / f"{sid}_ses-01_ncct.nii.gz",
        "cta": der1 / f"{sid}_ses-01_space-ncct_cta.nii.gz",
        "ctp": der1 / f"{sid}_ses-01_space-ncct_ctp.nii.gz",
    }
    for m in MAPS:
        paths[m] = der1 / "perfusion-maps" / f"{sid}_ses-01_space-ncct_{m}.nii.gz"
    if layout == "challenge2024":
        paths["mask"] = base / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_lesion-msk.nii.gz"
        paths["baseline"] = base / "phenotype" / sid / "ses-01" / f"{sid}_ses-01_demographic_baseline.csv"
        paths["outcome"] = base / "phenotype" / sid / "ses-02" / f"{sid}_ses-01_outcome.csv"
    else:
        paths["mask"] = base / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz"
        paths["baseline"] = base / "phenotype" / sid / "ses-01" / f"{sid}_ses-01_demographic_baseline.xlsx"
        paths["outcome"] = base / "phenotype" / sid / "ses-02" / f"{sid}_ses-02_outcome.xlsx"
    return paths


def write_case(root: Path, spec: CaseSpec, images: dict[str, np.ndarray], layout: Layout,
               rng: np.random.Generator, *, compression_level: int = 1) -> dict[str, Path]:
    """Write one synthesized case into ``root`` in ``layout``; returns the written paths."""
    paths = _case_paths(root, spec, layout)
    written: dict[str, Path] = {}
    _write_nifti(paths["ncct"], images["ncct"], spec, compression_level=compression_level)
    written["ncct"] = paths["ncct"]
    for name in ("cta", *MAPS, "ctp", "mask"):
        if name not in images or name in spec.missing:
            continue
        origin, direction = _perturbed(spec, rng)
        arr, slope = images[name], None
        if name == "mask":
            arr = arr.astype(np.uint16)
            if spec.mask_scaled_uint16:
                arr, slope = arr * np.uint16(65535), 1.0 / 65535.0
        _write_nifti(paths[name], arr, spec, origin=origin, direction=direction, scl_slope=slope,
                     compression_level=compression_level)
        written[name] = paths[name]
    if "core" in images:
        written["core"] = _write_acute_core(root, spec, images["core"], compression_level)
    if spec.stray_nii_mask:
        stray = paths["mask"].with_name(paths["mask"].name[: -len(".gz")])
        origin, direction = _perturbed(spec, rng)
        _write_nifti(stray, images["mask"].astype(np.uint16), spec, origin=origin, direction=direction)
        written["stray_mask"] = stray
    baseline, outcome = _clinical_rows(spec, rng)
    if layout == "challenge2024":
        _write_csv(paths["baseline"], BASELINE_COLUMNS, baseline)
        _write_csv(paths["outcome"], OUTCOME_COLUMNS, outcome)
    else:
        write_xlsx(paths["baseline"], BASELINE_COLUMNS, [baseline])
        write_xlsx(paths["outcome"], OUTCOME_COLUMNS, [outcome])
    written["baseline"], written["outcome"] = paths["baseline"], paths["outcome"]
    return written


# --------------------------------------------------------------------------- entry point


def _synthesized(cases: int, seed: int, shape: str | tuple[int, int, int], ctp: bool,
                 progress: bool) -> Iterator[tuple[CaseSpec, dict[str, np.ndarray], np.random.Generator]]:
    """Each case's spec, images and the rng that ``write_case`` goes on drawing from, in order."""
    ids = _case_ids(cases, np.random.default_rng([seed, 0x15E5]))
    for i in tqdm(range(cases), desc="synth", unit="case", disable=not progress):
        rng = np.random.default_rng([seed, i + 1])
        spec = _case_spec(i, cases, ids[i], shape, rng)
        yield spec, synthesize_case(spec, rng, ctp=ctp), rng


def generate_dataset(
    out_dir: str | os.PathLike[str],
    *,
    cases: int,
    seed: int,
    layout: Layout = "zenodo",
    shape: ShapeSpec = "tiny",
    ctp: bool = False,
    progress: bool = False,
) -> list[str]:
    """Write a synthetic ISLES24 look-alike dataset (see the module docstring).

    A folder that already holds a complete dataset generated with the same arguments is reused
    (its ``synthetic_manifest.json`` is written last and records them); one written before the
    acute cores were (``synthetic_truth/``) gets them added, its images untouched.

    Args:
        out_dir: dataset root to create (must be absent or empty).
        cases: number of cases (>= 1).
        seed: random seed; the same arguments give byte-identical images.
        layout: ``"zenodo"`` (2025 release) or ``"challenge2024"`` (``batch_*/`` folders).
        shape: ``"tiny"`` (48 x 48-60 x 10-14), ``"full"`` (512 x 512-686 x 34-89) or ``(x, y, z)``
            / ``"XxYxZ"``.
        ctp: also write a 4-D CTP (32 frames) on the NCCT grid.
        progress: show a progress bar.

    Returns:
        The case IDs (``sub-strokeNNNN``), sorted.

    Raises:
        DataError: bad arguments, or ``out_dir`` is a non-empty folder from something else.
    """
    if not isinstance(cases, int) or cases < 1:
        raise DataError(f"synthetic cases must be an integer >= 1, got {cases!r}")
    if layout not in ("zenodo", "challenge2024"):
        raise DataError(f"synthetic layout {layout!r} is not known; use zenodo or challenge2024")
    parsed = parse_shape(shape)
    root = Path(out_dir)
    params = {"version": GENERATOR_VERSION, "cases": cases, "seed": int(seed), "layout": layout,
              "shape": parsed if isinstance(parsed, str) else list(parsed), "ctp": bool(ctp)}
    manifest_path = root / MANIFEST_NAME
    if root.exists() and not root.is_dir():
        raise DataError(f"synthetic output {root} exists and is not a folder; choose another path")
    if root.is_dir() and any(root.iterdir()):
        if manifest_path.is_file():
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("params") == params:
                ids = [c["case_id"] for c in old.get("cases", [])]
                if not all(acute_core_path(root, c).is_file() for c in ids):  # older dataset: add the cores
                    # (ctp=False: the CTP frames come after the core and draw nothing from rng)
                    for spec, images, _rng in _synthesized(cases, int(seed), parsed, False, progress):
                        _write_acute_core(root, spec, images["core"])
                return ids
        raise DataError(f"synthetic output folder {root} is not empty; choose a new folder or delete it")
    root.mkdir(parents=True, exist_ok=True)

    specs = []
    for spec, images, rng in _synthesized(cases, int(seed), parsed, ctp, progress):
        write_case(root, spec, images, layout, rng)
        specs.append(spec)
        del images

    description = [(c, "synthetic clinical variable (medsegdiff look-alike)") for c in (*BASELINE_COLUMNS, *OUTCOME_COLUMNS)]
    if layout == "zenodo":
        write_xlsx(root / "clinical_data-description.xlsx", ("Variable", "Description"), description)
    manifest = {
        "generator": "medsegdiff.data.synthetic",
        "params": params,
        "cases": [
            {"case_id": s.case_id, "size": list(s.size), "spacing": list(s.spacing), "origin": list(s.origin),
             "direction": list(s.direction), "batch": s.batch if layout == "challenge2024" else None,
             "quirks": {"empty_mask": s.empty_mask, "mask_scaled_uint16": s.mask_scaled_uint16,
                        "stray_nii_mask": s.stray_nii_mask, "missing": s.missing, "oblique": s.oblique},
             **s.stats}
            for s in specs
        ],
    }
    atomic_write_json(manifest_path, manifest)
    return [s.case_id for s in specs]
