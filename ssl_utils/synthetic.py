"""Deterministic synthetic CT cohort: TCIA-Covid19-like unlabeled chest CT + BTCV-like 13-organ labeled abdomen.

The real data sets cannot be downloaded here, so this module paints CT-like volumes in Hounsfield units
(HU) from anatomical priors with per-subject variation, and writes them in the same on-disk layout and
datalist format as the reference tutorial:

    root/tcia/data/volume-synth-0000.nii.gz ...     root/tcia/dataset_split.json
    root/btcv/imagesTr/img0001.nii.gz ...           root/btcv/labelsTr/label0001.nii.gz ...
    root/btcv/dataset_0_init_{N}.json               root/cohort.json (generation parameters)

Kinds (``generate_subject(kind=...)``). "btcv": contrast-enhanced abdominal CT with labels. "tcia": the same
abdominal renderer, more variable (some non-contrast), unlabeled. "chest": non-contrast chest CT like
TCIA-Covid19 (what the reference pre-trains on), unlabeled: lungs with vessel and bronchial trees, airways,
heart, great vessels, chest wall, ribs, sternum, shoulder girdle and thoracic spine, COVID-19-like opacities
in about 45% of the subjects. ``make_synthetic_dataset(unlabeled_kind="chest" | "abdomen")`` renders the
unlabeled volumes with "chest" (default) or "tcia"; the labeled volumes are always "btcv".

Geometry. Arrays are indexed [X, Y, Z] with a positive-diagonal (RAS+) affine: index X grows towards the
patient's RIGHT (NIfTI RAS+), Y towards ANTERIOR, Z towards SUPERIOR. The liver, gallbladder, right kidney,
right adrenal and IVC therefore sit at high X; spleen, stomach, left kidney and left adrenal at low X
(as in real BTCV volumes after MONAI ``Orientationd(axcodes="RAS")``). For a radiological display
(patient's right on the viewer's left) show ``image[::-1, :, k].T`` with ``origin="lower"``.

Image formation: tissues are painted in HU (float32) with per-subject intensity jitter and per-voxel
texture, Gaussian-blurred (about 0.6-0.9 voxel), Gaussian noise (sd 10-20 HU) is added, and the result is
rounded to int16 and clipped to [-1024, 3071]. Labels use the BTCV indices in ``ORGANS``; organs are
painted in a fixed order (later ones overwrite earlier ones), and every one of the 13 organs is
guaranteed at least ``_MIN_ORGAN_VOXELS`` voxels (checked, enlarged if needed).

Code layout (abdomen). ``_render`` builds a ``_Scene`` (the ``_Canvas`` volumes plus the subject's body frame, tissue
HU values, random streams and shared masks), runs the unlabeled ``_STRUCTURE_PAINTERS`` in order, then the
labeled ``_ORGAN_PAINTERS`` (each organ: a sampler that draws its shape, a painter that draws it), and
finally blurs, adds noise and quantises. The order of every random draw is part of the output: a subject is
a bit-for-bit deterministic function of its seed, so painters must not be reordered.

Code layout (chest). ``_render_chest`` builds a ``_ChestScene`` (a ``_Scene`` with per-slice thoracic cavity
dimensions, the lung mask and landmarks; five random streams: parameters, geometry, vessel / airway trees,
opacities, texture), runs the ``_CHEST_PAINTERS`` in order (reusing the canvas primitives, ``paint_table``,
``paint_back_muscles`` and the vertebra painter ``_paint_vertebral_column``) and forms the image with the
same ``_form_image`` / ``_scanner_affine``. Chest template: z = 0 at the top of the right hemidiaphragm dome.
The chest code makes no draw from the abdominal streams, so "btcv" / "tcia" subjects do not depend on it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from dataclasses import replace as _dc_replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator
from tqdm.auto import tqdm

from .io import atomic_write, write_text
from .organs import ORGANS

__all__ = ["ORGANS", "generate_subject", "make_synthetic_dataset", "make_cohort_from_config"]

COHORT_VERSION = 1  # cohort.json also records unlabeled_kind; a cohort.json without it never matches (regenerated)
_MIN_ORGAN_VOXELS = 10  # every labeled organ gets at least this many voxels
_MIN_SEMI_VOX = 0.75  # minimum organ semi-axis / tube radius, in voxels along that direction
_RIGHT = 1.0  # +1: the patient's right lies at increasing X index (RAS+ with a positive affine diagonal)

# Reference body for the anatomical template (mm): half-width, anterior / posterior half-depth,
# subcutaneous fat (lateral, anterior, posterior) and muscle-wall thickness. Template coordinates:
# x (+ = patient right), y (+ = anterior), origin at the body centre; z (+ = superior), 0 = liver dome.
_REF = dict(A=150.0, B_ant=120.0, B_post=110.0, f_lat=20.0, f_ant=18.0, f_post=18.0, m=11.0)
_REF_CAV_A = _REF["A"] - _REF["f_lat"] - _REF["m"]  # 119 mm
_REF_CAV_ANT = _REF["B_ant"] - _REF["f_ant"] - _REF["m"]  # 91 mm
_REF_Y_VB = -30.0  # vertebral-body centre, template y (mm)


# ----------------------------------------------------------------------------------------------
# small geometry helpers
# ----------------------------------------------------------------------------------------------
def _rot(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx (angles in degrees); its columns are the local axes."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _other_axes(axis: int) -> tuple[int, int]:
    """The two coordinate axes other than ``axis``, in increasing order."""
    first, second = [a for a in range(3) if a != axis]
    return first, second


_OUTSIDE = np.float32(np.inf)  # the level returned by a primitive that misses the volume entirely
_Box = tuple[slice, slice, slice]  # voxel slices of an axis-aligned box in the volume


class _Canvas:
    """HU / label volumes plus coordinate bookkeeping and shape primitives for one subject.

    ``hu`` float32 [X, Y, Z] (HU, starts as air), ``labels`` uint8 [X, Y, Z] (BTCV indices), ``protected``
    bool [X, Y, Z] (voxels that organs must not overwrite: outside the cavity, muscle, bone);
    ``x_mm, y_mm, z_mm`` float32: anatomical coordinates (mm) of the voxel centres along each axis.
    Primitives return a level field on a voxel box, <= 1 inside the shape.
    """

    def __init__(self, nx, ny, nz, voxel_mm, shift_x, shift_y, z_bottom, texture_rng, warp_terms):
        self.shape = (nx, ny, nz)
        self.voxel_mm = np.asarray(voxel_mm, dtype=np.float64)  # (sx, sy, sz) mm
        sx, sy, sz = (float(v) for v in voxel_mm)
        self.x_mm = (_RIGHT * ((np.arange(nx) - (nx - 1) / 2.0) * sx - shift_x)).astype(np.float32)
        self.y_mm = ((np.arange(ny) - (ny - 1) / 2.0) * sy - shift_y).astype(np.float32)
        self.z_mm = (z_bottom + np.arange(nz) * sz).astype(np.float32)
        self.axes = (self.x_mm, self.y_mm, self.z_mm)
        self.texture_rng = texture_rng
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(self.shape, dtype=np.uint8)
        self.protected = np.zeros(self.shape, dtype=bool)
        self.label_boxes: dict[int, tuple[list[int], list[int]]] = {}  # voxel bbox of every painted label
        # low-rank smooth displacement field: d_c = sum_k fx[k](x) * fy[k](y) * fz[k](z)
        self.warp_factors: list[list[list[np.ndarray]]] = []
        self.warp_max = np.zeros(3)  # bound on |d_c| (mm)
        for comp in range(3):
            terms = []
            for amplitude, wavelengths, phases in warp_terms[comp]:
                factors = [
                    np.cos(2 * np.pi * coord / wavelengths[i] + phases[i]).astype(np.float32)
                    for i, coord in enumerate(self.axes)
                ]
                factors[0] = (factors[0] * amplitude).astype(np.float32)
                terms.append(factors)
                self.warp_max[comp] += abs(amplitude)
            self.warp_factors.append(terms)

    # -- coordinates -------------------------------------------------------------------------
    def box(self, lo, hi) -> _Box | None:
        """Voxel slices covering the anatomical box [lo, hi] (mm), or None if outside the volume."""
        slices = []
        for coord, low, high in zip(self.axes, lo, hi):
            idx = np.nonzero((coord >= low) & (coord <= high))[0]
            if idx.size == 0:
                return None
            slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(slices)

    def coords(self, box: _Box, warp: float = 0.0) -> list[np.ndarray]:
        """Anatomical (optionally smoothly warped) coordinates (mm) on a box: three float32 arrays
        (broadcastable 1-D views when ``warp == 0``)."""
        if warp == 0:
            x, y, z = self.x_mm[box[0]], self.y_mm[box[1]], self.z_mm[box[2]]
            return [x[:, None, None], y[None, :, None], z[None, None, :]]
        return [self.linear_field(box, warp, np.eye(3)[i]) for i in range(3)]

    def linear_field(self, box: _Box, warp: float, coef, const: float = 0.0) -> np.ndarray:
        """sum_i coef[i] * P_i + const on a box, P the warped coordinates (mm); one low-rank matmul.

        Every term is a product f(x) g(y) h(z), so the whole field is (n1*n2, K) @ (K, n3)."""
        x, y, z = self.x_mm[box[0]], self.y_mm[box[1]], self.z_mm[box[2]]
        n1, n2, n3 = len(x), len(y), len(z)
        cols = [np.float32(const) + np.float32(coef[0]) * x[:, None] + np.float32(coef[1]) * y[None, :]]
        rows = [np.ones(n3, dtype=np.float32)]
        if coef[2] != 0:
            cols.append(np.full((n1, n2), coef[2], dtype=np.float32))
            rows.append(z)
        if warp:
            for comp in range(3):
                if coef[comp] == 0:
                    continue
                for fx, fy, fz in self.warp_factors[comp]:
                    cols.append(np.float32(warp * coef[comp]) * fx[box[0]][:, None] * fy[box[1]][None, :])
                    rows.append(fz[box[2]])
        design = np.stack([np.broadcast_to(col, (n1, n2)) for col in cols], axis=-1).reshape(n1 * n2, len(cols))
        return (design.astype(np.float32) @ np.stack(rows).astype(np.float32)).reshape(n1, n2, n3)

    def margin(self, warp: float) -> np.ndarray:
        """Box padding (mm) that covers the warp displacement plus one voxel."""
        return warp * self.warp_max + self.voxel_mm

    # -- primitives --------------------------------------------------------------------------
    def ellipsoid(self, center, semi, rot=None, power=2.0, warp=1.0, min_semi=0.0):
        """Superellipsoid |u/a|^p + |v/b|^p + |w/c|^p <= 1 in local axes (columns of ``rot``).

        center (mm), semi (semi-axes, mm), min_semi (voxels). Returns (box, level) with level <= 1 inside,
        or (None, inf)."""
        center = np.asarray(center, dtype=np.float64)
        rot = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
        semi = np.asarray(semi, dtype=np.float64)
        if min_semi > 0:  # at least min_semi voxels along each local axis (voxel size projected)
            voxel_along_axes = np.sqrt(((rot * self.voxel_mm[:, None]) ** 2).sum(0))
            semi = np.maximum(semi, min_semi * voxel_along_axes)
        bound = np.abs(rot) @ semi
        pad = self.margin(warp)
        box = self.box(center - bound - pad, center + bound + pad)
        if box is None:
            return None, _OUTSIDE
        level = None
        for j in range(3):
            coef = rot[:, j] / semi[j]
            term = self.linear_field(box, warp, coef, -float(coef @ center))
            if power == 2:
                np.multiply(term, term, out=term)
            else:
                np.abs(term, out=term)
                np.power(term, np.float32(power), out=term)
            if level is None:
                level = term
            else:
                level += term
        return box, level

    def tube(self, axis, knots, centre1, centre2, radius1, radius2, warp=1.0, min_semi=0.0):
        """Generalised cylinder along a coordinate axis (0=x, 1=y, 2=z).

        ``knots`` are positions (mm, any order) along ``axis``; ``centre1, centre2`` the centre-line in the
        two other axes (in increasing axis order); ``radius1, radius2`` the radii (mm) there. Between knots
        everything is interpolated smoothly (PCHIP). Returns (box, level, axial): level <= 1 inside, axial
        the coordinate along ``axis`` (mm)."""
        knots = np.asarray(knots, dtype=np.float64)
        order = np.argsort(knots)
        knots = knots[order]
        centre1, centre2, radius1, radius2 = (
            np.broadcast_to(np.asarray(v, dtype=np.float64), knots.shape)[order]
            for v in (centre1, centre2, radius1, radius2)
        )
        o1, o2 = _other_axes(axis)
        t_fine = np.linspace(knots[0], knots[-1], 97)
        line1 = PchipInterpolator(knots, centre1)(t_fine)
        line2 = PchipInterpolator(knots, centre2)(t_fine)
        rad1 = np.maximum(PchipInterpolator(knots, radius1)(t_fine), 1e-3)
        rad2 = np.maximum(PchipInterpolator(knots, radius2)(t_fine), 1e-3)
        # an oblique centre-line cuts the axis-normal plane in a wider ellipse
        rad1 = rad1 * np.sqrt(1 + np.gradient(line1, t_fine) ** 2)
        rad2 = rad2 * np.sqrt(1 + np.gradient(line2, t_fine) ** 2)
        if min_semi > 0:
            rad1 = np.maximum(rad1, min_semi * self.voxel_mm[o1])
            rad2 = np.maximum(rad2, min_semi * self.voxel_mm[o2])
        lo, hi = np.zeros(3), np.zeros(3)
        lo[axis], hi[axis] = knots[0], knots[-1]
        lo[o1], hi[o1] = (line1 - rad1).min(), (line1 + rad1).max()
        lo[o2], hi[o2] = (line2 - rad2).min(), (line2 + rad2).max()
        pad = self.margin(warp)
        box = self.box(lo - pad, hi + pad)
        if box is None:
            return None, _OUTSIDE, _OUTSIDE
        axial = self.linear_field(box, warp, np.eye(3)[axis])
        idx = self._table_index(axial, knots)
        t_table = np.linspace(knots[0], knots[-1], _TUBE_TABLE)
        level = None
        for other, line, rad in ((o1, line1, rad1), (o2, line2, rad2)):
            line_t = np.interp(t_table, t_fine, line).astype(np.float32)
            inv_rad_t = (1.0 / np.interp(t_table, t_fine, rad)).astype(np.float32)
            term = self.linear_field(box, warp, np.eye(3)[other])
            term -= line_t[idx]
            term *= inv_rad_t[idx]
            np.multiply(term, term, out=term)
            if level is None:
                level = term
            else:
                level += term
        level[(axial < knots[0]) | (axial > knots[-1])] = np.inf
        return box, level, axial

    @staticmethod
    def _table_index(axial: np.ndarray, knots: np.ndarray) -> np.ndarray:
        """Nearest-entry index into a fine table along the tube axis (step < 0.5 mm for a 500 mm tube)."""
        idx = np.clip(axial, np.float32(knots[0]), np.float32(knots[-1]))
        idx -= np.float32(knots[0])
        idx *= np.float32((_TUBE_TABLE - 1) / max(knots[-1] - knots[0], 1e-6))
        return np.rint(idx).astype(np.intp)

    def label_count(self, label: int) -> int:
        """Voxels currently carrying ``label`` (searched within the boxes it was painted in)."""
        if label not in self.label_boxes:
            return 0
        lo, hi = self.label_boxes[label]
        return int(np.count_nonzero(self.labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == label))

    # -- painting ----------------------------------------------------------------------------
    def paint(self, box, mask, value, sd=0.0, label=None, allowed=None, only_label=None, protect=False) -> int:
        """Set HU = value + sd * N(0,1) (and the label) on ``mask`` within ``box``; return the voxel count.

        value / sd in HU; ``allowed`` a full-volume bool mask; ``only_label`` restricts to voxels already
        labeled so; ``protect`` marks the painted voxels as protected."""
        if box is None:
            return 0
        sub = self.hu[box]
        mask = np.broadcast_to(mask, sub.shape)
        if allowed is not None:
            mask = mask & allowed[box]
        if only_label is not None:
            mask = mask & (self.labels[box] == only_label)
        count = int(np.count_nonzero(mask))
        if count == 0:
            return 0
        v = np.broadcast_to(np.asarray(value, dtype=np.float32), sub.shape)[mask] if np.ndim(value) else value
        vals = np.float32(v) if np.ndim(v) == 0 else v
        if sd > 0:
            vals = vals + np.float32(sd) * self.texture_rng.standard_normal(count, dtype=np.float32)
        sub[mask] = vals
        if label is not None:
            self.labels[box][mask] = label
            self._grow_label_box(label, box)
        if protect:
            self.protected[box][mask] = True
        return count

    def _grow_label_box(self, label: int, box: _Box) -> None:
        lo = [s.start for s in box]
        hi = [s.stop for s in box]
        if label in self.label_boxes:
            lo0, hi0 = self.label_boxes[label]
            lo, hi = [min(a, b) for a, b in zip(lo, lo0)], [max(a, b) for a, b in zip(hi, hi0)]
        self.label_boxes[label] = (lo, hi)


_TUBE_TABLE = 1025  # entries of the fine centre-line / radius tables along a tube


# ----------------------------------------------------------------------------------------------
# subject parameters (drawn from their own stream, in this exact order)
# ----------------------------------------------------------------------------------------------
def _sample_params(rng: np.random.Generator, spacing, kind: str) -> dict[str, Any]:
    """Draw every per-subject random parameter (sizes in mm, intensities in HU).

    Keys: vox (jittered voxel size, mm), body outline A / B_ant / B_post / f_* / m and offsets bx / by (mm),
    s_z, margins and jitters (mm), warp (smooth-deformation terms), g (contrast enhancement factor),
    I (tissue -> HU), noise_sd (HU), blur (in-plane, through-plane sigma in voxels)."""
    uniform = rng.uniform
    params = _sample_body_params(uniform, spacing, kind)
    enhancement = _sample_contrast(uniform, kind)
    params["g"] = enhancement
    params["I"] = _sample_tissue_hu(uniform, enhancement)
    params["noise_sd"] = uniform(10, 20) if kind == "btcv" else uniform(10, 25)
    params["blur"] = (uniform(0.6, 0.9), uniform(0.55, 0.7))  # in-plane, through-plane sigma (voxels)
    return params


def _sample_body_params(u: Callable[..., Any], spacing, kind: str) -> dict[str, Any]:
    """Voxel size, body outline, field of view and smooth deformation (mm)."""
    p: dict[str, Any] = {}
    jit = u(0.9, 1.1)
    p["vox"] = (spacing[0] * jit, spacing[1] * jit, float(spacing[2]))
    body_size = u(0.9, 1.08)
    aspect = u(0.9, 1.1)  # AP / LR aspect
    p.update(
        A=_REF["A"] * body_size,
        B_ant=_REF["B_ant"] * body_size * aspect,
        B_post=_REF["B_post"] * body_size * aspect,
        f_lat=u(12, 32),
        f_ant=u(8, 28),
        f_post=u(10, 26),
        m=u(8, 14),
        bx=u(-8, 8),
        by=u(-12, 6),
    )
    p["s_z"] = 0.5 * body_size / 0.99 + 0.5 * u(0.9, 1.1)
    p["top_margin"] = u(20, 50) + (u(0, 90) if kind == "tcia" and u() < 0.5 else 0.0)
    p["bottom_margin"] = u(10, 35)
    p["crest_jit"] = u(-10, 10)
    p["dome_jit"] = u(-8, 8)
    # smooth deformation: per component two separable cosine products, amplitude a few mm (<= 10 mm)
    p["warp"] = [
        [(u(2.5, 5.0) * (1 if u() < 0.5 else -1), u(160, 400, size=3), u(0, 2 * np.pi, size=3)) for _ in range(2)]
        for _ in range(3)
    ]
    return p


def _sample_contrast(u: Callable[..., Any], kind: str) -> float:
    """Enhancement factor g: 0 = non-contrast, 1 = typical portal-venous phase."""
    if kind == "tcia" and u() < 0.3:
        return 0.0
    return u(0.85, 1.15) if kind == "btcv" else u(0.6, 1.2)


def _sample_tissue_hu(u: Callable[..., Any], g: float) -> dict[str, float]:
    """Mean HU of every tissue; enhancing tissues interpolate unenhanced -> enhanced by ``g``, +-8 HU jitter."""

    def hu(unenh, enh, j=8.0):
        return unenh + (enh - unenh) * g + u(-j, j)

    liver = hu(58, 110)
    return dict(
        air=-1000.0,
        subfat=u(-115, -90),
        visfat=u(-110, -85),
        muscle=hu(50, 58, 6),
        lung=u(-880, -820),
        liver=liver,
        spleen=liver + (-10 + 17 * g) + u(-7, 7),
        cortex=hu(35, 165),
        medulla=hu(33, 130),
        sinus=u(-40, 10),
        aorta=hu(42, 185),
        ivc_hi=hu(42, 165),
        ivc_lo=hu(42, 130),
        portal=hu(42, 180),
        pancreas=hu(42, 95),
        adrenal=hu(38, 62, 6),
        eso=hu(40, 48, 6),
        sto_wall=hu(40, 72),
        sto_content=u(15, 40),
        gall=u(5, 25),
        heart=hu(40, 140),
        bowel_wall=hu(40, 75),
        fluid=u(5, 25),
        cancellous=u(330, 450),
        cortical=u(780, 950),
        post_elem=u(600, 800),
        disc=u(70, 100),
        csf=u(5, 20),
        rib=u(550, 750),
        cartilage=u(90, 160),
        table=u(60, 160),
    )


# ----------------------------------------------------------------------------------------------
# the scene: canvas + body frame + shared state of one subject
# ----------------------------------------------------------------------------------------------
@dataclass
class _BodyFrame:
    """Subject body geometry (mm) and the template -> subject mapping (see ``_REF``)."""

    half_width: float  # body half-width
    half_depth_ant: float  # body half-depth, anterior
    half_depth_post: float  # body half-depth, posterior
    fat_lateral: float  # subcutaneous fat thickness
    fat_anterior: float
    fat_posterior: float
    muscle_wall: float  # abdominal-wall muscle thickness
    cavity_half_width: float  # abdominal cavity: half-width, anterior / posterior half-depth
    cavity_ant: float
    cavity_post: float
    scale_x: float  # template -> subject scale, lateral
    scale_y: float  # anterior-posterior
    scale_z: float  # cranio-caudal
    scale_organ: float  # isotropic organ-size scale
    y_vertebra: float  # vertebral-body centre, subject y (mm)
    crest_z: float  # iliac crest height (mm)
    z_top: float  # field of view (mm)
    z_bottom: float

    def to_mm(self, x_t, y_t, z_t) -> tuple:
        """Template coordinates -> subject anatomical coordinates (mm)."""
        return (x_t * self.scale_x, self.y_vertebra + (y_t - _REF_Y_VB) * self.scale_y, z_t * self.scale_z)


def _body_frame(p: dict[str, Any]) -> _BodyFrame:
    """The body frame of a subject from its parameters (no random draws)."""
    A, Ba, Bp, f_lat, f_ant, f_post, m = (p[k] for k in ("A", "B_ant", "B_post", "f_lat", "f_ant", "f_post", "m"))
    cav_A, cav_ant, cav_post = A - f_lat - m, Ba - f_ant - m, Bp - f_post - m
    scale_x = cav_A / _REF_CAV_A
    y_vb = -Bp + f_post + m + 50.0 * (cav_post / (_REF["B_post"] - _REF["f_post"] - _REF["m"])) ** 0.5
    scale_y = (cav_ant - y_vb) / (_REF_CAV_ANT - _REF_Y_VB)
    scale_z = p["s_z"]
    crest = -200.0 * scale_z + p["crest_jit"]
    return _BodyFrame(
        half_width=A,
        half_depth_ant=Ba,
        half_depth_post=Bp,
        fat_lateral=f_lat,
        fat_anterior=f_ant,
        fat_posterior=f_post,
        muscle_wall=m,
        cavity_half_width=cav_A,
        cavity_ant=cav_ant,
        cavity_post=cav_post,
        scale_x=scale_x,
        scale_y=scale_y,
        scale_z=scale_z,
        scale_organ=(scale_x * scale_y * scale_z) ** (1.0 / 3.0),
        y_vertebra=y_vb,
        crest_z=crest,
        z_top=p["top_margin"],
        z_bottom=crest - p["bottom_margin"],
    )


@dataclass
class _Spine:
    """Per-slice spine geometry (mm) and the voxel box around it (shared by back muscles and vertebrae)."""

    y_body: np.ndarray  # vertebral-body centre y, per slice [Z]
    half_width: np.ndarray  # vertebral-body semi-axes, per slice [Z]
    half_depth: np.ndarray
    y_canal: np.ndarray  # spinal-canal centre y, per slice [Z]
    canal_radius: float
    ring_thickness: float  # posterior-arch thickness around the canal
    spinous_length: float
    box: _Box
    x: np.ndarray  # coordinates on ``box`` (broadcastable)
    y: np.ndarray


@dataclass
class _Scene:
    """Everything the painters share for one subject: the canvas, the body frame, tissue HU values, the random
    streams and the masks built up while painting (all [X, Y, Z] bool unless noted)."""

    canvas: _Canvas
    frame: _BodyFrame
    params: dict[str, Any]
    tissue: dict[str, float]  # tissue -> mean HU
    geometry_rng: np.random.Generator  # shapes and positions
    bowel_rng: np.random.Generator  # bowel loops and pulmonary vessels
    texture_rng: np.random.Generator  # per-voxel texture and image noise
    min_voxel: float  # larger in-plane voxel size (mm)
    body: np.ndarray | None = None  # inside the skin
    wall: np.ndarray | None = None  # inside the subcutaneous fat (muscle wall and cavity)
    cavity: np.ndarray | None = None  # abdominal / thoracic cavity
    depth_wobble: np.ndarray | None = None  # per-slice scale of the body depth [Z]
    diaphragm_z: np.ndarray | None = None  # diaphragm height map [X, Y] float32 (mm)
    below_diaphragm: np.ndarray | None = None
    allowed_abdomen: np.ndarray | None = None  # where abdominal organs may be painted
    allowed_anywhere: np.ndarray | None = None  # where vessels may be painted (cavity, unprotected)
    spine: _Spine | None = None
    bifurcation_z: float = 0.0  # aortic bifurcation height (mm)
    group_shift: dict[str, np.ndarray] = field(default_factory=dict)  # position jitter of organ groups (mm)
    size_factor: dict[int, float] = field(default_factory=dict)  # per-organ size scale
    stomach_shift: np.ndarray | None = None  # the stomach's offset (mm), followed by the oesophagus

    def uniform(self, *args, **kwargs):
        return self.geometry_rng.uniform(*args, **kwargs)

    def normal(self, *args, **kwargs):
        return self.geometry_rng.normal(*args, **kwargs)

    def jitter(self, scale: float = 1.0) -> np.ndarray:
        """Position jitter (mm) of an organ or group: sd 5 mm in x, y and 8 mm in z, times ``scale``."""
        return np.array([self.normal(0, 5.0 * scale), self.normal(0, 5.0 * scale), self.normal(0, 8.0 * scale)])

    def jitter_axes(self, semi) -> np.ndarray:
        """Semi-axes (mm) with an independent +-5% jitter each."""
        return np.asarray(semi, dtype=np.float64) * self.uniform(0.95, 1.05, size=3)

    def point(self, x_t, y_t, z_t) -> np.ndarray:
        """Template point -> subject mm, as a float64 array."""
        return np.array(self.frame.to_mm(x_t, y_t, z_t))


def _new_scene(seed: int, shape, spacing, kind: str) -> _Scene:
    # independent streams, so that changing one part of the anatomy does not reshuffle the others
    r_par, r_geo, r_bow, r_tex = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    params = _sample_params(r_par, spacing, kind)
    frame = _body_frame(params)
    sx, sy, sz = params["vox"]
    nx, ny = int(shape[0]), int(shape[1])
    nz = max(8, int(round((frame.z_top - frame.z_bottom) / sz)))
    canvas = _Canvas(nx, ny, nz, params["vox"], params["bx"], params["by"], frame.z_bottom, r_tex, params["warp"])
    return _Scene(
        canvas=canvas,
        frame=frame,
        params=params,
        tissue=params["I"],
        geometry_rng=r_geo,
        bowel_rng=r_bow,
        texture_rng=r_tex,
        min_voxel=float(max(sx, sy)),
    )


# ----------------------------------------------------------------------------------------------
# unlabeled structures, painted in the order of _STRUCTURE_PAINTERS
# ----------------------------------------------------------------------------------------------
def paint_body(scene: _Scene) -> None:
    """Skin outline, subcutaneous fat, muscle wall and cavity: per-slice superellipses (flatter posteriorly).

    Sets ``scene.body / wall / cavity`` and protects everything outside the cavity."""
    canvas, frame = scene.canvas, scene.frame
    x_mm, y_mm, z_mm = canvas.x_mm, canvas.y_mm, canvas.z_mm
    phase = scene.uniform(0, 2 * np.pi, size=2)
    width_wobble = 1 + 0.03 * np.sin(2 * np.pi * z_mm / 180.0 + phase[0])
    hips = 1 + 0.08 * np.clip((frame.crest_z + 20 - z_mm) / 60.0, 0, 1)
    scene.depth_wobble = 1 + 0.025 * np.sin(2 * np.pi * z_mm / 150.0 + phase[1])

    # level = gx(x, z) + gy(y, z) <= 1 per layer (body, muscle wall, abdominal cavity); filled row by row
    width_scale = (width_wobble * hips).astype(np.float32)[None, :]
    depth_scale = scene.depth_wobble.astype(np.float32)[None, :]
    anterior = (y_mm >= 0)[:, None]
    y_abs = np.abs(y_mm)[:, None]
    layers = []
    for half_width, depth_ant, depth_post in (
        (frame.half_width, frame.half_depth_ant, frame.half_depth_post),
        (
            frame.half_width - frame.fat_lateral,
            frame.half_depth_ant - frame.fat_anterior,
            frame.half_depth_post - frame.fat_posterior,
        ),
        (frame.cavity_half_width, frame.cavity_ant, frame.cavity_post),
    ):
        gx = (x_mm[:, None] / (np.float32(half_width) * width_scale)) ** 2  # (nx, nz)
        yn = np.where(
            anterior, y_abs / (np.float32(depth_ant) * depth_scale), y_abs / (np.float32(depth_post) * depth_scale)
        )
        gy = np.where(anterior, yn * yn, yn ** np.float32(2.6))  # (ny, nz)
        layers.append((gx.astype(np.float32), gy.astype(np.float32)))
    _fill_body_layers(scene, layers)


def _fill_body_layers(scene: _Scene, layers) -> None:
    """Fill ``scene.body / wall / cavity`` from three ``(gx [X, Z], gy [Y, Z])`` superellipse levels (inside:
    gx + gy <= 1), row by row, paint air / subcutaneous fat / muscle / visceral fat and protect everything
    outside the cavity."""
    canvas, tissue = scene.canvas, scene.tissue
    scene.body, scene.wall, scene.cavity = (np.empty(canvas.shape, dtype=bool) for _ in range(3))
    v_air, v_sub, v_mus, v_vis = (np.float32(tissue[k]) for k in ("air", "subfat", "muscle", "visfat"))
    for i in range(canvas.shape[0]):
        for mask, (gx, gy) in zip((scene.body, scene.wall, scene.cavity), layers):
            np.less_equal(gx[i][None, :] + gy, 1, out=mask[i])
        canvas.hu[i] = np.where(
            scene.cavity[i], v_vis, np.where(scene.wall[i], v_mus, np.where(scene.body[i], v_sub, v_air))
        )
    np.logical_not(scene.cavity, out=canvas.protected)


def paint_table(scene: _Scene) -> None:
    """CT table: a shallow curved plate (6 mm) under the patient."""
    canvas = scene.canvas
    x_mm, y_mm = canvas.x_mm, canvas.y_mm
    y_top0 = -scene.frame.half_depth_post * float(scene.depth_wobble.min()) - scene.uniform(2, 10)
    y_top = y_top0 + 0.0006 * x_mm**2
    plate = (y_mm[None, :] <= y_top[:, None]) & (y_mm[None, :] > y_top[:, None] - 6.0)
    plate &= np.abs(x_mm)[:, None] < 0.42 * canvas.shape[0] * float(canvas.voxel_mm[0])
    canvas.hu[plate] = np.float32(scene.tissue["table"])  # (broadcast over z)


def map_diaphragm(scene: _Scene) -> None:
    """Diaphragm height map (mm), lower laterally and posteriorly; ``below_diaphragm`` and a first
    ``allowed_abdomen`` (refined once muscles and bones are protected)."""
    canvas, frame = scene.canvas, scene.frame
    xr = canvas.x_mm[:, None] / frame.cavity_half_width
    yr = canvas.y_mm[None, :] / frame.cavity_ant
    dome = -4.0 + 5.0 * np.tanh(canvas.x_mm[:, None] / 40.0) - 28.0 * xr**2 - 32.0 * (yr - 0.15) ** 2
    scene.diaphragm_z = (dome * frame.scale_z + scene.params["dome_jit"]).astype(np.float32)
    scene.below_diaphragm = canvas.z_mm[None, None, :] < scene.diaphragm_z[:, :, None]
    scene.allowed_abdomen = scene.cavity & scene.below_diaphragm


def _paint_hollow(scene: _Scene, box, level, wall_frac, content, content_sd, air_level=None, allowed=None) -> None:
    """A hollow viscus: bowel wall on ``level <= 1``, ``content`` (HU) in the lumen ``level <= wall_frac``, and
    an anterior gas cap ``air_level`` mm deep."""
    if box is None:
        return
    canvas = scene.canvas
    canvas.paint(box, level <= 1, scene.tissue["bowel_wall"], 8.0, allowed=allowed)
    lumen = level <= wall_frac
    canvas.paint(box, lumen, content, content_sd, allowed=allowed)
    if air_level is not None:
        y_box = canvas.y_mm[box[1]][None, :, None]
        ys = np.nonzero(np.broadcast_to(lumen, level.shape).any(axis=(0, 2)))[0]
        if ys.size:
            y_top = float(canvas.y_mm[box[1]][ys].max())
            canvas.paint(box, lumen & (y_box > y_top - air_level), -900.0, 25.0, allowed=allowed)


def paint_colon(scene: _Scene) -> None:
    """Ascending / descending and transverse colon (air-fluid levels, faeces), then the duodenal C-loop."""
    frame, ub, allowed = scene.frame, scene.bowel_rng.uniform, scene.allowed_abdomen
    s_org, szs = frame.scale_organ, frame.scale_z
    z_low = frame.z_bottom - 20
    for xt, yt, zt_top, radius in ((84, -8, -140, 22.0), (-88, -22, -95, 19.0)):  # right, left
        cx, cy, _ = frame.to_mm(xt, yt, 0)
        rr = radius * s_org * ub(0.85, 1.15)
        zz = [z_low, (z_low + zt_top * szs) / 2, zt_top * szs]
        box, level, _ = scene.canvas.tube(
            2, zz, [cx, cx + ub(-8, 8), cx], [cy, cy + ub(-8, 8), cy], [rr] * 3, [rr] * 3, warp=1.0
        )
        _paint_hollow(scene, box, level, (1 - 3.0 / rr) ** 2, ub(-150, 20), 60.0, air_level=ub(8, 30), allowed=allowed)
    xs = [frame.to_mm(x, 0, 0)[0] for x in (-86, -40, 0, 40, 84)]
    ys = [frame.to_mm(0, y, 0)[1] for y in (40, 62, 58, 60, 45)]
    zs = [z * szs for z in (-95, -150, -165, -150, -140)]
    rr = 20.0 * s_org * ub(0.85, 1.15)
    box, level, _ = scene.canvas.tube(0, xs, ys, [z + ub(-10, 10) for z in zs], [rr] * 5, [rr] * 5, warp=1.0)
    _paint_hollow(scene, box, level, (1 - 3.0 / rr) ** 2, ub(-150, 20), 60.0, air_level=ub(5, 25), allowed=allowed)
    # duodenum (C-loop beside the pancreatic head)
    dx, dy, _ = frame.to_mm(58, 12, 0)
    box, level, _ = scene.canvas.tube(
        2, [-150 * szs, -120 * szs, -92 * szs], [dx - 10, dx, dx - 8], [dy, dy - 4, dy + 4], [11] * 3, [11] * 3
    )
    _paint_hollow(scene, box, level, 0.55, scene.tissue["fluid"], 10.0, allowed=allowed)


def paint_small_bowel(scene: _Scene) -> None:
    """10-18 small-bowel loops: fluid-filled (60%), gas-filled (12%) or collapsed (28%)."""
    ub, tissue, allowed = scene.bowel_rng.uniform, scene.tissue, scene.allowed_abdomen
    for _ in range(int(scene.bowel_rng.integers(10, 19))):
        center = scene.frame.to_mm(ub(-80, 80), ub(-5, 80), ub(-245, -115))
        semi = ub(10, 20, size=3) * scene.frame.scale_organ
        rot = _rot(*ub(-90, 90, size=3))
        box, level = scene.canvas.ellipsoid(center, semi, rot, warp=1.0)
        loop_kind = ub()
        lumen_level = (1 - 3.0 / semi.min()) ** 2
        if loop_kind < 0.6:
            _paint_hollow(scene, box, level, lumen_level, tissue["fluid"] + ub(-5, 15), 10.0, allowed=allowed)
        elif loop_kind < 0.72:
            _paint_hollow(scene, box, level, lumen_level, -900.0, 25.0, allowed=allowed)
        else:
            scene.canvas.paint(box, level <= 1, tissue["bowel_wall"] - ub(0, 15), 12.0, allowed=allowed)


def map_spine(scene: _Scene) -> None:
    """Per-slice spine geometry with lumbar lordosis (no drawing, no random draws)."""
    canvas, frame = scene.canvas, scene.frame
    z_mm, s_org, szs = canvas.z_mm, frame.scale_organ, frame.scale_z
    lordosis = 0.07 * np.clip(-z_mm - 110 * szs, 0, None) - 0.05 * np.clip(z_mm + 40 * szs, 0, None)
    y_body = (frame.y_vertebra + lordosis).astype(np.float32)
    lumbar = np.clip((-z_mm - 40 * szs) / (160 * szs), 0, 1)
    half_depth = ((16 + 3 * lumbar) * s_org).astype(np.float32)
    canal_radius = 8.5 * s_org
    lo = (-70 * frame.scale_x, float(y_body.min()) - 120, -1e9)
    box = canvas.box(lo, (70 * frame.scale_x, float(y_body.max()) + 40, 1e9))
    x, y, _ = canvas.coords(box)
    scene.spine = _Spine(
        y_body=y_body,
        half_width=((20 + 5 * lumbar) * s_org).astype(np.float32),
        half_depth=half_depth,
        y_canal=y_body - half_depth - canal_radius,
        canal_radius=canal_radius,
        ring_thickness=max(5.5, 0.8 * scene.min_voxel),
        spinous_length=24.0 * s_org,
        box=box,
        x=x,
        y=y,
    )


def _on_spine_box(spine: _Spine, per_slice: np.ndarray) -> np.ndarray:
    """A per-slice array [Z] cut to the spine box, shaped (1, 1, z)."""
    return per_slice[spine.box[2]][None, None, :]


def paint_back_muscles(scene: _Scene) -> None:
    """Paraspinal muscles (protected) and the psoas, which grows inferiorly from about L1."""
    canvas, spine, s_org = scene.canvas, scene.spine, scene.frame.scale_organ
    box, x, y, muscle = spine.box, spine.x, spine.y, scene.tissue["muscle"]
    y_body, half_width, y_canal = (_on_spine_box(spine, a) for a in (spine.y_body, spine.half_width, spine.y_canal))
    paraspinal = [
        ((x - side * 27 * s_org) / (25 * s_org)) ** 2 + ((y - (y_canal - 20 * s_org)) / (22 * s_org)) ** 2 <= 1
        for side in (1, -1)
    ]
    canvas.paint(box, (paraspinal[0] | paraspinal[1]) & scene.wall[box], muscle, 8.0, protect=True)
    psoas_radius = np.clip(4 + 0.2 * (-100 * scene.frame.scale_z - canvas.z_mm), 0, 28) * s_org
    for side in (1, -1):
        radius = np.maximum(psoas_radius[box[2]], 1e-3)[None, None, :].astype(np.float32)
        level = ((x - side * (half_width + 0.8 * radius)) / radius) ** 2 + ((y - (y_body + 3)) / (0.9 * radius)) ** 2
        present = (psoas_radius[box[2]] > 0)[None, None, :]
        canvas.paint(box, (level <= 1) & present, muscle, 8.0, allowed=scene.cavity)


def paint_vertebrae(scene: _Scene) -> None:
    """Vertebral bodies (cancellous core, cortical rim), discs, posterior arch, spinous and transverse
    processes, and the CSF-filled canal; all protected. Lumbar levels: 34 mm (times the z scale)."""
    szs = scene.frame.scale_z
    level_height = 34.0 * szs
    _paint_vertebral_column(scene, level_height, scene.uniform(0, level_height), 8.0 * szs, -115 * szs)


def _paint_vertebral_column(scene: _Scene, level_height: float, offset: float, disc_height: float,
                            transverse_below: float) -> None:
    """The vertebral column along ``scene.spine``: levels ``level_height`` mm apart, a disc of ``disc_height``
    mm at ``offset + n * level_height`` (mm), transverse processes below ``transverse_below`` (mm)."""
    canvas, spine, tissue = scene.canvas, scene.spine, scene.tissue
    box, x, y, z_mm = spine.box, spine.x, spine.y, canvas.z_mm
    y_body, half_width, half_depth, y_canal = (
        _on_spine_box(spine, a) for a in (spine.y_body, spine.half_width, spine.half_depth, spine.y_canal)
    )
    cr, ring_t, sp_len = spine.canal_radius, spine.ring_thickness, spine.spinous_length
    pos = np.mod(z_mm - offset, level_height)  # position within a vertebral level
    disc = _on_spine_box(spine, pos < disc_height)
    transverse = (z_mm < transverse_below) & (pos > 0.35 * level_height) & (pos < 0.65 * level_height)
    body_level = (x / half_width) ** 2 + ((y - y_body) / half_depth) ** 2
    vertebral_body = body_level <= 1
    canal_r2 = x**2 + (y - y_canal) ** 2
    canal = canal_r2 <= cr**2
    ring = (canal_r2 <= (cr + ring_t) ** 2) & ~canal
    y_spinous = y_canal - cr - ring_t - sp_len / 2 + 3
    thin = max(3.5, 0.6 * scene.min_voxel)
    spinous = (x / thin) ** 2 + ((y - y_spinous) / (sp_len / 2)) ** 2 <= 1
    tproc = _on_spine_box(spine, transverse) & (np.abs(x) > cr) & (np.abs(x) < 45 * scene.frame.scale_organ)
    tproc = tproc & (np.abs(y - y_canal) <= thin)
    canvas.paint(box, ring | spinous | tproc, tissue["post_elem"], 60.0, protect=True)
    canvas.paint(box, vertebral_body & ~disc, tissue["cancellous"], 50.0, protect=True)
    canvas.paint(box, vertebral_body & ~disc & (body_level > 0.72), tissue["cortical"], 60.0, protect=True)
    canvas.paint(box, vertebral_body & disc, tissue["disc"], 10.0, protect=True)
    canvas.paint(box, canal, tissue["csf"], 8.0, protect=True)


def _rib_band(scene: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """In-plane pixels of the rib ring in the chest wall: (i, j, angle from posterior (rad), side sign)."""
    canvas, frame = scene.canvas, scene.frame
    x_mm, y_mm = canvas.x_mm, canvas.y_mm
    half_m = frame.muscle_wall / 2
    a_ring = frame.cavity_half_width + half_m
    b_ring = np.where(y_mm[None, :] >= 0, frame.cavity_ant + half_m, frame.cavity_post + half_m)
    xn = x_mm[:, None] / a_ring
    yn = y_mm[None, :] / b_ring
    radius = np.sqrt(xn**2 + yn**2)
    angle = np.arctan2(np.abs(xn), -yn)
    local_radius = np.sqrt((a_ring * np.sin(angle)) ** 2 + (b_ring * np.cos(angle)) ** 2)
    band = np.abs(radius - 1) * local_radius <= max(4.0, 0.6 * scene.min_voxel)
    band_i, band_j = np.nonzero(band)
    return band_i, band_j, angle[band_i, band_j], np.sign(x_mm[band_i])


def paint_ribs(scene: _Scene) -> None:
    """Ribs 7-12 (costal cartilage anteriorly): oblique bands in the chest wall, descending anteriorly; protected."""
    canvas, szs, u = scene.canvas, scene.frame.scale_z, scene.uniform
    band_i, band_j, band_angle, band_side = _rib_band(scene)
    rib_z0 = np.array([55, 30, 5, -20, -45, -68]) * szs + u(-10, 10)
    rib_max_angle = np.array([0.9, 0.88, 0.85, 0.8, 0.55, 0.38]) * np.pi
    half_height = max(6.0, 0.5 * float(canvas.voxel_mm[2]))
    for side in (1.0, -1.0):
        for z0, max_angle in zip(rib_z0, rib_max_angle):
            slope = 30.0 * szs * u(0.9, 1.1)
            z_rib = z0 + u(-4, 4) - slope * band_angle  # rib centre height at each band pixel
            on_rib = (band_side == side) & (band_angle >= 0.1 * np.pi) & (band_angle <= max_angle)
            hit = on_rib[:, None] & (np.abs(z_rib[:, None] - canvas.z_mm[None, :]) <= half_height)
            p_i, p_k = np.nonzero(hit)
            if p_i.size == 0:
                continue
            ii, jj = band_i[p_i], band_j[p_i]
            value = np.where(band_angle[p_i] > 0.72 * np.pi, scene.tissue["cartilage"], scene.tissue["rib"])
            noise = 50.0 * scene.texture_rng.standard_normal(p_i.size, dtype=np.float32)
            canvas.hu[ii, jj, p_k] = value.astype(np.float32) + noise
            canvas.protected[ii, jj, p_k] = True


def paint_pelvis(scene: _Scene) -> None:
    """Iliac wings (protected bone) and the iliacus muscle inside them, below the iliac crest."""
    canvas, frame, tissue = scene.canvas, scene.frame, scene.tissue
    z_mm, crest = canvas.z_mm, frame.crest_z
    low_slices = np.nonzero(z_mm < crest)[0]
    for side in (1.0, -1.0):
        cx, cy, _ = frame.to_mm(side * 60, _REF_Y_VB + 40, 0)
        a_w, b_w = 55 * frame.scale_x, 60 * frame.scale_y
        xn = (canvas.x_mm[:, None] - cx) / a_w
        yn = (canvas.y_mm[None, :] - cy) / b_w
        radius = np.sqrt(xn**2 + yn**2)
        phi = np.arctan2(side * xn, -yn)
        local_radius = np.sqrt((a_w * np.sin(phi)) ** 2 + (b_w * np.cos(phi)) ** 2)
        thickness = max(4.0, 0.6 * scene.min_voxel)
        for k in low_slices:
            depth = crest - z_mm[k]
            half_arc = min(0.45 * np.pi, 0.12 * np.pi + 0.015 * np.pi * depth)
            arc = (phi >= 0.3 * np.pi - half_arc) & (phi <= 0.3 * np.pi + half_arc)
            iliacus = arc & (radius < 1) & (radius > 0.45) & (phi >= 0) & (phi <= 0.55 * np.pi) & scene.cavity[:, :, k]
            slice_box = (slice(None), slice(None), slice(k, k + 1))
            canvas.paint(slice_box, iliacus[:, :, None], tissue["muscle"], 8.0)
            wing = arc & (np.abs(radius - 1) * local_radius <= thickness) & scene.body[:, :, k]
            canvas.paint(slice_box, wing[:, :, None], tissue["rib"], 60.0, protect=True)


def paint_lungs(scene: _Scene) -> None:
    """Above the diaphragm: its muscle (5 mm), the lungs (sparing the posterior mediastinum) and a few
    pulmonary vessels."""
    canvas, frame, tissue = scene.canvas, scene.frame, scene.tissue
    nz = canvas.shape[2]
    k0 = int(np.searchsorted(canvas.z_mm, scene.diaphragm_z.min()))
    if k0 >= nz:
        return
    thorax = (slice(None), slice(None), slice(k0, nz))
    z_thorax = canvas.z_mm[k0:][None, None, :]
    dome = scene.diaphragm_z[:, :, None]
    # posterior/middle mediastinum (fat around the aorta, oesophagus and spine)
    y_med = frame.y_vertebra + 22 * frame.scale_y
    mediastinum = (canvas.x_mm[:, None] / (38 * frame.scale_x)) ** 2 + (
        (canvas.y_mm[None, :] - y_med) / (52 * frame.scale_y)
    ) ** 2 <= 1
    free = scene.cavity[thorax] & ~canvas.protected[thorax]
    canvas.paint(thorax, free & (z_thorax >= dome) & (z_thorax < dome + 5.0), tissue["muscle"], 8.0)
    lung = free & (z_thorax >= dome + 5.0) & ~mediastinum[:, :, None]
    canvas.paint(thorax, lung, tissue["lung"], 25.0)
    _paint_pulmonary_vessels(scene, lung, k0)


def _paint_pulmonary_vessels(scene: _Scene, lung: np.ndarray, k0: int) -> None:
    """20-39 unlabeled soft-tissue rods (radius 1.5-3.5 mm) at random lung voxels (``lung`` starts at slice k0)."""
    canvas, rng = scene.canvas, scene.bowel_rng
    lung_idx = np.flatnonzero(lung)
    if not lung_idx.size:
        return
    for flat in lung_idx[rng.integers(0, lung_idx.size, int(rng.integers(20, 40)))]:
        i, j, k = np.unravel_index(flat, lung.shape)
        radius = rng.uniform(1.5, 3.5)
        center = (canvas.x_mm[i], canvas.y_mm[j], canvas.z_mm[k0 + k])
        box, level = canvas.ellipsoid(center, (radius, radius, 4 * radius), _rot(*rng.uniform(-60, 60, 3)), warp=0)
        if box is not None:
            canvas.paint(box, (level <= 1) & (canvas.hu[box] < -500), scene.tissue["heart"] - 40, 10.0)


def paint_heart(scene: _Scene) -> None:
    """The heart's inferior part, above the diaphragm."""
    canvas, s_org = scene.canvas, scene.frame.scale_organ
    semi = np.array([65, 50, 55]) * s_org * scene.uniform(0.9, 1.1)
    box, level = canvas.ellipsoid(scene.frame.to_mm(-15, 35, 40), semi, _rot(0, 0, scene.uniform(-15, 15)), warp=0)
    if box is not None:
        inside = (level <= 1) & ~scene.below_diaphragm[box] & scene.cavity[box] & ~canvas.protected[box]
        canvas.paint(box, inside, scene.tissue["heart"], 15.0)


def map_free_cavity(scene: _Scene) -> None:
    """Where organs (below the diaphragm) and vessels (anywhere) may be painted: cavity, not protected."""
    scene.allowed_abdomen = scene.cavity & scene.below_diaphragm & ~scene.canvas.protected
    scene.allowed_anywhere = scene.cavity & ~scene.canvas.protected


def _paint_vessel(scene: _Scene, axis: int, points, radii, value, warp=0.5, allowed=None, only_label=None) -> None:
    """A tube through ``points`` (mm, sorted along ``axis``) with radii (mm; one pair or one per point)."""
    points = np.asarray(points, dtype=np.float64)
    order = np.argsort(points[:, axis])
    points = points[order]
    o1, o2 = _other_axes(axis)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points), 2))[order]
    box, level, _ = scene.canvas.tube(
        axis, points[:, axis], points[:, o1], points[:, o2], radii[:, 0], radii[:, 1], warp=warp
    )
    if box is not None:
        scene.canvas.paint(box, level <= 1, value, 8.0, allowed=allowed, only_label=only_label)


def paint_abdominal_vessels(scene: _Scene) -> None:
    """Unlabeled vessels: SMA, SMV, common iliac arteries (sets ``bifurcation_z``), left renal vein."""
    to_mm, tissue, allowed = scene.frame.to_mm, scene.tissue, scene.allowed_anywhere
    sma = [to_mm(-4, 8, -95), to_mm(-4, 22, -130), to_mm(-2, 32, -180), to_mm(0, 34, -240)]
    _paint_vessel(scene, 2, sma, (4.0, 4.0), tissue["aorta"], allowed=allowed)
    smv = [to_mm(11, 16, -105), to_mm(12, 26, -140), to_mm(12, 36, -180), to_mm(14, 38, -240)]
    _paint_vessel(scene, 2, smv, (5.5, 5.5), tissue["portal"], allowed=allowed)
    szs = scene.frame.scale_z
    bif = -190 * szs + scene.uniform(-10, 10)
    scene.bifurcation_z = bif
    for side in (1, -1):
        z_t = bif / szs  # template height of the bifurcation
        iliac = [to_mm(side * 8, 2, z_t + 5), to_mm(side * 25, -2, z_t - 30), to_mm(side * 48, -10, z_t - 80)]
        _paint_vessel(scene, 2, iliac, (6.0, 6.0), tissue["aorta"], allowed=allowed)
    renal_vein = [to_mm(-48, -20, -124), to_mm(-12, 10, -120), to_mm(22, -2, -118)]
    _paint_vessel(scene, 0, renal_vein, (5.0, 4.0), tissue["ivc_hi"], allowed=allowed)


# the unlabeled anatomy, in painting order (later structures overwrite earlier ones where allowed)
_STRUCTURE_PAINTERS: tuple[Callable[[_Scene], None], ...] = (
    paint_body,
    paint_table,
    map_diaphragm,
    paint_colon,
    paint_small_bowel,
    map_spine,
    paint_back_muscles,
    paint_vertebrae,
    paint_ribs,
    paint_pelvis,
    paint_lungs,
    paint_heart,
    map_free_cavity,
    paint_abdominal_vessels,
)


# ----------------------------------------------------------------------------------------------
# labeled organs: a sampler draws each organ's shape (geometry stream, in _ORGAN_PAINTERS order), a painter
# draws it at a given scale; ``force`` ignores the anatomical clipping (used when an organ came out too small)
# ----------------------------------------------------------------------------------------------
_OrganShape = dict  # the sampled shape of one organ (centres / points / semi-axes in mm)

# hepatic veins: (tube axis, template points) for the right, middle, left and an inferior right branch
_HEPATIC_VEINS = (
    (0, [(22, 0, -12), (55, 5, -30), (90, 15, -45)]),
    (1, [(25, 2, -14), (35, 30, -35), (40, 60, -55)]),
    (0, [(-20, 40, -35), (5, 20, -25), (18, 4, -14)]),
    (0, [(30, 10, -95), (60, 18, -85), (85, 25, -80)]),
)


def _sample_organ_priors(scene: _Scene) -> None:
    """Group position jitters (organs of a group move together) and per-organ size factors."""
    for group in ("liver", "left upper quadrant", "right kidney", "left kidney", "pancreas"):
        scene.group_shift[group] = scene.jitter()
    scene.size_factor = {k: scene.uniform(0.85, 1.15) * scene.frame.scale_organ for k in range(1, 14)}


def _organ_allowed(scene: _Scene, force: bool, anywhere: bool = False) -> np.ndarray | None:
    if force:
        return None
    return scene.allowed_anywhere if anywhere else scene.allowed_abdomen


def _sample_liver(scene: _Scene) -> _OrganShape:
    u, shift, size = scene.uniform, scene.group_shift["liver"], scene.size_factor[6]
    right_center = scene.point(70, 5, -60) + shift
    right_semi = scene.jitter_axes([75, 95, 80]) * size
    right_rot = _rot(u(-6, 6), u(-6, 6), u(-8, 8))
    left_center = scene.point(-5, 55, -30) + shift + scene.jitter(0.4)
    left_semi = scene.jitter_axes([62, 30, 42]) * size
    left_rot = _rot(u(-8, 8), u(-10, 10), u(-15, 15))
    return {"lobes": ((right_center, right_semi, right_rot, 2.4), (left_center, left_semi, left_rot, 2.0))}


def paint_liver(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """6 liver: right lobe + left lobe (superellipsoids), below the diaphragm."""
    allowed = _organ_allowed(scene, force)
    for center, semi, rot, power in shape["lobes"]:
        box, level = scene.canvas.ellipsoid(center, semi * scale, rot, power=power, warp=1.0, min_semi=_MIN_SEMI_VOX)
        scene.canvas.paint(box, level <= 1, scene.tissue["liver"], 8.0, label=6, allowed=allowed)


def paint_hepatic_veins(scene: _Scene) -> None:
    """Hepatic veins: vessel HU inside the liver; the label stays 6 (painted once, after the liver)."""
    shift, radius = scene.group_shift["liver"], 4.5 * scene.frame.scale_organ
    for axis, template_points in _HEPATIC_VEINS:
        points = np.asarray([scene.point(*pt) + shift for pt in template_points])
        _paint_vessel(scene, axis, points, radius, scene.tissue["ivc_hi"] - 5, warp=1.0, only_label=6)


def _sample_spleen(scene: _Scene) -> _OrganShape:
    u, frame = scene.uniform, scene.frame
    center = scene.point(-90, -38, -55) + scene.group_shift["left upper quadrant"] + scene.jitter(0.4)
    normal = np.array([center[0] / frame.cavity_half_width**2, center[1] / frame.cavity_post**2])
    normal /= np.linalg.norm(normal) + 1e-9
    rot = _rot(0, 0, math.degrees(math.atan2(normal[1], normal[0]))) @ _rot(u(-15, 15), u(-10, 10), 0)
    return {"center": center, "rot": rot, "semi": scene.jitter_axes([24, 52, 50]) * scene.size_factor[1]}


def paint_spleen(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """1 spleen: long axis tangent to the posterolateral wall."""
    box, level = scene.canvas.ellipsoid(
        shape["center"], shape["semi"] * scale, shape["rot"], power=2.2, warp=1.0, min_semi=_MIN_SEMI_VOX
    )
    scene.canvas.paint(box, level <= 1, scene.tissue["spleen"], 8.0, label=1, allowed=_organ_allowed(scene, force))


def _sample_stomach(scene: _Scene) -> _OrganShape:
    u, p, size = scene.uniform, scene.frame.to_mm, scene.size_factor[7]
    offset = scene.group_shift["left upper quadrant"] + scene.jitter(0.5)
    scene.stomach_shift = offset
    body = np.array([p(-45, -15, 8), p(-50, -5, -20), p(-52, 15, -50), p(-48, 30, -80), p(-36, 42, -106)]) + offset
    body_r = np.array([[26, 26], [38, 38], [35, 32], [30, 26], [24, 22]]) * size
    antrum = np.array([p(-46, 40, -100), p(-20, 48, -108), p(10, 50, -110), p(35, 40, -100)]) + offset
    antrum_r = np.array([[22, 22], [20, 20], [16, 15], [9, 9]]) * size
    gas_depth = u(6, 25) if u() < 0.85 else 0.0
    return {"parts": ((2, body, body_r), (0, antrum, antrum_r)), "gas_depth": gas_depth}


def paint_stomach(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """7 stomach: fundus/body along z + antrum along x; wall, fluid contents, anterior gas cap."""
    canvas, tissue, allowed = scene.canvas, scene.tissue, _organ_allowed(scene, force)
    lumen_tops, parts = [], []
    for axis, points, radii in shape["parts"]:
        o1, o2 = _other_axes(axis)
        radii = radii * scale
        box, level, _ = canvas.tube(
            axis, points[:, axis], points[:, o1], points[:, o2], radii[:, 0], radii[:, 1],
            warp=1.0, min_semi=_MIN_SEMI_VOX,
        )
        if box is None:
            continue
        lumen_level = (1 - 4.0 / float(radii.mean())) ** 2
        canvas.paint(box, level <= 1, tissue["sto_wall"], 8.0, label=7, allowed=allowed)
        canvas.paint(box, level <= lumen_level, tissue["sto_content"], 8.0, label=7, allowed=allowed)
        parts.append((box, level, lumen_level))
        ys = np.nonzero(np.broadcast_to(level <= lumen_level, level.shape).any(axis=(0, 2)))[0]
        if ys.size:
            lumen_tops.append(float(canvas.y_mm[box[1]][ys].max()))
    if shape["gas_depth"] > 0 and lumen_tops:
        y_level = max(lumen_tops) - shape["gas_depth"]
        for box, level, lumen_level in parts:
            y_box = canvas.y_mm[box[1]][None, :, None]
            canvas.paint(box, (level <= lumen_level) & (y_box > y_level), -900.0, 25.0, label=7, allowed=allowed)


def _sample_kidney(scene: _Scene, label: int, side: int, center_t: tuple, group: str) -> _OrganShape:
    u, tissue = scene.uniform, scene.tissue
    center = scene.point(*center_t) + scene.group_shift[group] + scene.jitter(0.3)
    semi = scene.jitter_axes([28, 22, 55]) * scene.size_factor[label]
    rot = _rot(u(5, 15), side * -u(8, 16), side * -u(20, 40))
    hilum = center + rot @ np.array([-side * 0.55 * semi[0], 0, 0])
    cortex, medulla = tissue["cortex"] + u(-5, 5), tissue["medulla"] + u(-5, 5)
    return {"label": label, "center": center, "semi": semi, "rot": rot, "hilum": hilum, "hu": (cortex, medulla)}


def paint_kidney(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """2 / 3 kidneys: cortex, medulla (inner half) and the renal sinus fat at the hilum."""
    canvas, label, allowed = scene.canvas, shape["label"], _organ_allowed(scene, force)
    cortex, medulla = shape["hu"]
    semi = shape["semi"] * scale
    box, level = canvas.ellipsoid(shape["center"], semi, shape["rot"], warp=0.5, min_semi=_MIN_SEMI_VOX)
    canvas.paint(box, level <= 1, cortex, 8.0, label=label, allowed=allowed)
    canvas.paint(box, level <= 0.5, medulla, 8.0, label=label, allowed=allowed)
    sinus_semi = shape["semi"] * scale * np.array([0.4, 0.35, 0.4])
    box, level = canvas.ellipsoid(shape["hilum"], sinus_semi, shape["rot"], warp=0.5)
    canvas.paint(box, level <= 1, scene.tissue["sinus"], 10.0, only_label=label)


def _sample_pancreas(scene: _Scene) -> _OrganShape:
    p = scene.frame.to_mm
    points = np.array(
        [p(46, 12, -124), p(30, 16, -116), p(8, 24, -104), p(-20, 20, -100), p(-50, 4, -94), p(-78, -18, -84)]
    ) + scene.group_shift["pancreas"]
    radii = np.array([[10, 12], [16, 20], [9, 11], [11, 11], [10, 10], [7, 8]]) * scene.size_factor[11]
    radii[0] = radii[0] * 0.6
    return {"points": points, "radii": radii}


def paint_pancreas(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """11 pancreas: head (right) -> tail (splenic hilum), anterior to the aorta and splenic vein."""
    points, radii = shape["points"], shape["radii"] * scale
    box, level, _ = scene.canvas.tube(
        0, points[:, 0], points[:, 1], points[:, 2], radii[:, 0], radii[:, 1], warp=1.0, min_semi=_MIN_SEMI_VOX
    )
    scene.canvas.paint(box, level <= 1, scene.tissue["pancreas"], 14.0, label=11, allowed=_organ_allowed(scene, force))


def _sample_gallbladder(scene: _Scene) -> _OrganShape:
    u = scene.uniform
    center = scene.point(45, 55, -118) + scene.group_shift["liver"] + scene.jitter(0.4)
    semi = scene.jitter_axes([15, 16, 32]) * scene.size_factor[4]
    return {"center": center, "semi": semi, "rot": _rot(u(25, 45), u(-10, 10), u(-25, 25))}


def paint_gallbladder(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """4 gallbladder: at the inferior surface of the liver, fundus anterior-inferior."""
    box, level = scene.canvas.ellipsoid(
        shape["center"], shape["semi"] * scale, shape["rot"], power=2.0, warp=1.0, min_semi=_MIN_SEMI_VOX
    )
    scene.canvas.paint(box, level <= 1, scene.tissue["gall"], 6.0, label=4, allowed=_organ_allowed(scene, force))


def _sample_portal_veins(scene: _Scene) -> _OrganShape:
    p = scene.frame.to_mm
    points = np.array(
        [p(52, 6, -82), p(28, 8, -94), p(6, 10, -104), p(-22, 7, -100), p(-55, -8, -92), p(-86, -30, -80)]
    ) + (scene.group_shift["pancreas"] + scene.group_shift["liver"]) / 2
    radii = np.array([6.5, 7.0, 7.0, 5.0, 4.5, 4.0]) * (scene.size_factor[10] ** 0.5) * scene.frame.scale_organ**0.5
    return {"points": points, "radii": radii}


def paint_portal_veins(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """10 portal + splenic vein: liver hilum -> confluence behind the pancreatic neck -> splenic hilum."""
    points, radii = shape["points"], shape["radii"] * scale
    box, level, _ = scene.canvas.tube(
        0, points[:, 0], points[:, 1], points[:, 2], radii, radii, warp=1.0, min_semi=_MIN_SEMI_VOX
    )
    allowed = _organ_allowed(scene, force, anywhere=True)
    scene.canvas.paint(box, level <= 1, scene.tissue["portal"], 8.0, label=10, allowed=allowed)


def _sample_ivc(scene: _Scene) -> _OrganShape:
    p, n = scene.frame.to_mm, scene.normal
    points = np.array([p(22, -5, -260), p(24, -3, -150), p(26, 0, -100), p(26, 2, -60), p(20, 5, -20), p(15, 5, 6)])
    points += np.array([n(0, 2), n(0, 2), 0])
    radii = np.array([[13, 9], [13, 9], [14, 10], [13, 11], [12, 11], [8, 8]]) * scene.uniform(0.9, 1.1)
    radii = radii * scene.frame.scale_organ**0.5
    # brighter above the renal veins (mixing with enhanced renal return)
    below_renal = scene.canvas.z_mm < -120 * scene.frame.scale_z
    hu = np.where(below_renal, scene.tissue["ivc_lo"], scene.tissue["ivc_hi"]).astype(np.float32)[None, None, :]
    return {"points": points, "radii": radii, "hu": hu}


def paint_ivc(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """9 IVC: right of the aorta, flattened, into the liver's bare area; brighter above the renal veins."""
    points, radii = shape["points"], shape["radii"] * scale
    box, level, _ = scene.canvas.tube(
        2, points[:, 2], points[:, 0], points[:, 1], radii[:, 0], radii[:, 1], warp=0.3, min_semi=_MIN_SEMI_VOX
    )
    if box is not None:
        allowed = _organ_allowed(scene, force, anywhere=True)
        scene.canvas.paint(box, level <= 1, shape["hu"][:, :, box[2]], 8.0, label=9, allowed=allowed)


def _sample_aorta(scene: _Scene) -> _OrganShape:
    p, n = scene.frame.to_mm, scene.normal
    points = np.array([p(-30, -15, 120), p(-28, -14, 40), p(-20, -8, -20), p(-14, -2, -60), p(-11, 0, -120)])
    bifurcation = (p(-10, 2, 0)[0], p(-10, 2, 0)[1], scene.bifurcation_z)
    points = np.vstack([points, [p(-10, 2, -165)], [bifurcation]])
    points += np.array([n(0, 2), n(0, 2), 0])
    radii = np.array([12, 12, 11.5, 11, 10, 9, 7]) * scene.uniform(0.9, 1.1) * scene.frame.scale_organ**0.5
    return {"points": points, "radii": radii}


def paint_aorta(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """8 aorta: descending, left anterolateral to the spine, ends at the bifurcation."""
    radii = shape["radii"] * scale
    order = np.argsort(shape["points"][:, 2])
    points, radii = shape["points"][order], radii[order]
    box, level, _ = scene.canvas.tube(
        2, points[:, 2], points[:, 0], points[:, 1], radii, radii, warp=0.3, min_semi=_MIN_SEMI_VOX
    )
    allowed = _organ_allowed(scene, force, anywhere=True)
    scene.canvas.paint(box, level <= 1, scene.tissue["aorta"], 8.0, label=8, allowed=allowed)


def _sample_esophagus(scene: _Scene) -> _OrganShape:
    p, n, u, follow = scene.frame.to_mm, scene.normal, scene.uniform, scene.stomach_shift
    points = np.array([p(-36, 12, -34), p(-25, 10, -20), p(-15, 5, 0), p(-8, 0, 40), p(-5, -2, 130)]) + np.array(
        [n(0, 2), n(0, 2), 0]
    ) + np.array([follow[0] * 0.5, follow[1] * 0.5, 0])
    radii = np.array([[6, 6], [8, 7], [9, 7], [9, 7], [9, 7]]) * u(0.85, 1.15) * scene.frame.scale_organ**0.5
    return {"points": points, "radii": radii, "air": u() < 0.4}


def paint_esophagus(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """5 esophagus: mediastinum -> gastro-oesophageal junction (follows the stomach); sometimes an air lumen."""
    points, radii = shape["points"], shape["radii"] * scale
    box, level, _ = scene.canvas.tube(
        2, points[:, 2], points[:, 0], points[:, 1], radii[:, 0], radii[:, 1], warp=0.3, min_semi=_MIN_SEMI_VOX
    )
    allowed = _organ_allowed(scene, force, anywhere=True)
    scene.canvas.paint(box, level <= 1, scene.tissue["eso"], 8.0, label=5, allowed=allowed)
    if shape["air"] and box is not None:
        air = level <= (2.5 / float(radii.mean())) ** 2
        scene.canvas.paint(box, air, -900.0, 30.0, label=5, allowed=allowed)


def _sample_adrenal(scene: _Scene, label: int, center_t: tuple, group: str, angle_range: tuple) -> _OrganShape:
    u = scene.uniform
    angle = u(*angle_range)
    center = scene.point(*center_t) + scene.group_shift[group] + scene.jitter(0.3)
    semi = scene.jitter_axes([4, 16, 15]) * scene.size_factor[label]
    return {"label": label, "center": center, "semi": semi, "rot": _rot(u(-10, 10), u(-10, 10), angle)}


def paint_adrenal(scene: _Scene, shape: _OrganShape, scale: float = 1.0, force: bool = False) -> None:
    """12 / 13 adrenals: thin plates superomedial to the kidneys (the right one behind the IVC)."""
    semi = shape["semi"] * scale
    box, level = scene.canvas.ellipsoid(shape["center"], semi, shape["rot"], warp=0.5, min_semi=_MIN_SEMI_VOX)
    allowed = _organ_allowed(scene, force)
    scene.canvas.paint(box, level <= 1, scene.tissue["adrenal"], 8.0, label=shape["label"], allowed=allowed)


@dataclass(frozen=True)
class _OrganPainter:
    """One labeled organ: ``sample(scene) -> shape`` draws its shape, ``paint(scene, shape, scale, force)``
    draws it; ``then(scene)`` (optional) runs once after its first painting."""

    label: int
    sample: Callable[[_Scene], _OrganShape]
    paint: Callable[[_Scene, _OrganShape, float, bool], None]
    then: Callable[[_Scene], None] | None = None


def _kidney(label: int, side: int, center_t: tuple, group: str) -> _OrganPainter:
    """Kidney ``label`` on ``side`` (+1 right, -1 left) at template centre ``center_t``, moving with ``group``."""
    sample = partial(_sample_kidney, label=label, side=side, center_t=center_t, group=group)
    return _OrganPainter(label, sample, paint_kidney)


def _adrenal(label: int, center_t: tuple, group: str, angle_range: tuple) -> _OrganPainter:
    """Adrenal ``label`` at template centre ``center_t``, in-plane angle drawn from ``angle_range`` (degrees)."""
    sample = partial(_sample_adrenal, label=label, center_t=center_t, group=group, angle_range=angle_range)
    return _OrganPainter(label, sample, paint_adrenal)


# Sampled in this order, then painted in this order (later organs overwrite earlier ones).
_ORGAN_PAINTERS: tuple[_OrganPainter, ...] = (
    _OrganPainter(6, _sample_liver, paint_liver, then=paint_hepatic_veins),
    _OrganPainter(1, _sample_spleen, paint_spleen),
    _OrganPainter(7, _sample_stomach, paint_stomach),
    _kidney(2, 1, (70, -38, -145), "right kidney"),
    _kidney(3, -1, (-70, -35, -130), "left kidney"),
    _OrganPainter(11, _sample_pancreas, paint_pancreas),
    _OrganPainter(4, _sample_gallbladder, paint_gallbladder),
    _OrganPainter(10, _sample_portal_veins, paint_portal_veins),
    _OrganPainter(9, _sample_ivc, paint_ivc),
    _OrganPainter(8, _sample_aorta, paint_aorta),
    _OrganPainter(5, _sample_esophagus, paint_esophagus),
    _adrenal(12, (33, -20, -84), "right kidney", (50, 80)),
    _adrenal(13, (-35, -18, -80), "left kidney", (100, 130)),
)


def _paint_organs(scene: _Scene) -> None:
    """Sample and paint the 13 labeled organs, then enlarge any organ with fewer than ``_MIN_ORGAN_VOXELS``
    voxels (by 1.3x per try; from the third try on ignoring the anatomical clipping)."""
    _sample_organ_priors(scene)
    shapes = {organ.label: organ.sample(scene) for organ in _ORGAN_PAINTERS}
    for organ in _ORGAN_PAINTERS:
        organ.paint(scene, shapes[organ.label], 1.0, False)
        if organ.then is not None:
            organ.then(scene)
    tries = {organ.label: 0 for organ in _ORGAN_PAINTERS}
    for _ in range(6):
        missing = [o for o in _ORGAN_PAINTERS if scene.canvas.label_count(o.label) < _MIN_ORGAN_VOXELS]
        if not missing:
            break
        for organ in missing:
            tries[organ.label] += 1
            organ.paint(scene, shapes[organ.label], 1.3 ** tries[organ.label], tries[organ.label] >= 3)


# ----------------------------------------------------------------------------------------------
# kind="chest": a TCIA-Covid19-like non-contrast chest CT (unlabeled), painted in the order of _CHEST_PAINTERS
# ----------------------------------------------------------------------------------------------
# Chest template (mm): x (+ = patient right), y (+ = anterior) from the body centre, z (+ = superior) with
# 0 = top of the right hemidiaphragm dome. The thoracic cavity (inner surface of the ribs) of the reference
# subject at mid-chest: half-width cav_A, anterior / posterior half-depth cav_ant / cav_post; apex: height of
# the lung apices above the right dome.
_CHEST_REF = dict(cav_A=132.0, cav_ant=76.0, cav_post=82.0, apex=228.0)
_OPACITY_FRACTION = 0.45  # fraction of chest subjects with COVID-19-like opacities
_CONTRAST_FRACTION = 0.2  # fraction of chest subjects with (mild) intravenous contrast


def _sample_chest_params(rng: np.random.Generator, spacing) -> dict[str, Any]:
    """Every per-subject random parameter of a chest subject (mm, HU), drawn in this exact order.

    Keys: vox (mm), cav_A / cav_ant / cav_post (thoracic cavity at mid-chest), m_* (chest-wall muscle), f_*
    (subcutaneous fat), bx / by (offsets), s_z, apex (lung apex height above the right dome), left_dome (left
    dome height), top_margin / bottom_margin (field of view above the apex / below the right dome), kyphosis,
    warp, g (contrast enhancement, 0 = non-contrast), I (tissue -> HU), noise_sd (HU), blur (voxels)."""
    u = rng.uniform
    p: dict[str, Any] = {}
    jit = u(0.9, 1.1)
    p["vox"] = (spacing[0] * jit, spacing[1] * jit, float(spacing[2]))
    size, aspect = u(0.88, 1.06), u(0.85, 1.08)
    p.update(
        cav_A=_CHEST_REF["cav_A"] * size,
        cav_ant=_CHEST_REF["cav_ant"] * size * aspect,
        cav_post=_CHEST_REF["cav_post"] * size * aspect,
        m_lat=u(8, 14),
        m_ant=u(8, 16),
        m_post=u(18, 30),  # paraspinal / posterior chest-wall muscles
        f_lat=u(8, 32),
        f_ant=u(6, 28),
        f_post=u(6, 22),
        bx=u(-8, 8),
        by=u(-10, 6),
    )
    p["s_z"] = 0.5 * size / 0.97 + 0.5 * u(0.9, 1.1)
    p["apex"] = _CHEST_REF["apex"] * p["s_z"]
    p["left_dome"] = -u(8, 22)
    p["top_margin"] = u(10, 35)
    # 40%: the field of view reaches 40-80 mm below the right dome (liver dome, stomach, top of the spleen)
    p["bottom_margin"] = u(40, 80) if u() < 0.4 else u(10, 30)
    p["kyphosis"] = u(5, 14)
    p["warp"] = [
        [(u(2.5, 5.0) * (1 if u() < 0.5 else -1), u(160, 400, size=3), u(0, 2 * np.pi, size=3)) for _ in range(2)]
        for _ in range(3)
    ]
    g = u(0.35, 0.9) if u() < _CONTRAST_FRACTION else 0.0
    p["g"] = g
    p["I"] = _sample_chest_tissue_hu(u, g)
    p["noise_sd"] = u(12, 28)
    p["blur"] = (u(0.6, 0.9), u(0.55, 0.7))
    return p


def _sample_chest_tissue_hu(u: Callable[..., Any], g: float) -> dict[str, float]:
    """Mean HU of every chest tissue; blood-pool tissues interpolate non-contrast -> enhanced by ``g``."""

    def hu(unenh, enh, j=6.0):
        return unenh + (enh - unenh) * g + u(-j, j)

    muscle = u(42, 58)
    liver = hu(58, 100)
    return dict(
        air=-1000.0,
        subfat=u(-115, -90),
        visfat=u(-110, -85),
        muscle=muscle,
        lung=u(-880, -830),
        lung_gradient=u(30, 100),  # dependent (posterior) lung is denser by this much
        blood=hu(40, 230),  # aorta, heart chambers
        pa=hu(40, 250),  # pulmonary arteries (and the pulmonary vessels in the lung)
        vein=hu(40, 180),  # SVC, IVC, azygos, pulmonary veins
        myocardium=hu(44, 95),
        liver=liver,
        spleen=liver + u(-12, -3) + 15 * g,
        sto_wall=hu(40, 70),
        sto_content=u(10, 35),
        eso=u(38, 50),
        airway_wall=u(40, 90),
        cancellous=u(200, 330),
        cortical=u(700, 900),
        post_elem=u(500, 750),
        disc=u(70, 100),
        csf=u(5, 20),
        rib=u(450, 700),
        cartilage=u(80, 200),
        table=u(60, 160),
    )


@dataclass
class _ChestScene(_Scene):
    """A chest subject: the shared scene plus the per-slice thoracic cavity, the lung mask and landmarks."""

    opacity_rng: np.random.Generator | None = None  # COVID-19-like opacities (own stream)
    cavity_dims: np.ndarray | None = None  # [3, Z] cavity half-width, anterior / posterior half-depth (mm)
    lung: np.ndarray | None = None  # lung parenchyma [X, Y, Z] (pulmonary vessels inside it included)
    landmarks: dict[str, Any] = field(default_factory=dict)  # hila, carina, rib heads ... (mm)
    findings: dict[str, Any] = field(default_factory=dict)  # what paint_covid_opacities painted

    def cpoint(self, x_t, y_t, z_t) -> np.ndarray:
        """Chest template point -> subject mm (float64)."""
        f = self.frame
        return np.array([x_t * f.scale_x, y_t * f.scale_y, z_t * f.scale_z])

    def spine_at(self, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vertebral-body centre y, half-width and half-depth (mm) at height(s) z (mm): thoracic kyphosis
        (most posterior at mid-chest), bodies growing inferiorly."""
        p, f = self.params, self.frame
        z = np.asarray(z, dtype=np.float64)
        apex = p["apex"]
        bend = np.minimum(((z - 0.45 * apex) / (0.6 * apex)) ** 2, 1.5)
        low = np.clip((apex - z) / (apex + 60.0), 0, 1)
        return f.y_vertebra + p["kyphosis"] * bend, (13.5 + 7.0 * low) * f.scale_organ, (11.0 + 5.0 * low) * f.scale_organ

    def spine_front(self, z) -> float:
        """Anterior edge of the vertebral body (mm) at height z."""
        y_body, _, half_depth = self.spine_at(z)
        return float(y_body + half_depth)


def _new_chest_scene(seed: int, shape, spacing) -> _ChestScene:
    # own streams: parameters, geometry, vessel / airway trees, opacities, texture
    r_par, r_geo, r_tree, r_opa, r_tex = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    p = _sample_chest_params(r_par, spacing)
    cav_A, cav_ant, cav_post = p["cav_A"], p["cav_ant"], p["cav_post"]
    scale_x = cav_A / _CHEST_REF["cav_A"]
    scale_y = (cav_ant + cav_post) / (_CHEST_REF["cav_ant"] + _CHEST_REF["cav_post"])
    scale_z = p["s_z"]
    z_bottom, z_top = -p["bottom_margin"], p["apex"] + p["top_margin"]
    frame = _BodyFrame(
        half_width=cav_A + p["m_lat"] + p["f_lat"],
        half_depth_ant=cav_ant + p["m_ant"] + p["f_ant"],
        half_depth_post=cav_post + p["m_post"] + p["f_post"],
        fat_lateral=p["f_lat"],
        fat_anterior=p["f_ant"],
        fat_posterior=p["f_post"],
        muscle_wall=p["m_lat"],
        cavity_half_width=cav_A,
        cavity_ant=cav_ant,
        cavity_post=cav_post,
        scale_x=scale_x,
        scale_y=scale_y,
        scale_z=scale_z,
        scale_organ=(scale_x * scale_y * scale_z) ** (1.0 / 3.0),
        y_vertebra=-cav_post + 40.0 * scale_y,  # mid-chest vertebral body, 40 mm in front of the posterior cavity
        crest_z=z_bottom - 100.0,  # no pelvis in a chest field of view
        z_top=z_top,
        z_bottom=z_bottom,
    )
    sx, sy, sz = p["vox"]
    nx, ny = int(shape[0]), int(shape[1])
    nz = max(8, int(round((z_top - z_bottom) / sz)))
    canvas = _Canvas(nx, ny, nz, p["vox"], p["bx"], p["by"], z_bottom, r_tex, p["warp"])
    return _ChestScene(
        canvas=canvas,
        frame=frame,
        params=p,
        tissue=p["I"],
        geometry_rng=r_geo,
        bowel_rng=r_tree,
        texture_rng=r_tex,
        min_voxel=float(max(sx, sy)),
        opacity_rng=r_opa,
    )


# -- chest primitives ------------------------------------------------------------------------
def _frame_from_axis(axis, roll_deg: float = 0.0) -> np.ndarray:
    """Orthonormal local axes (columns) whose first column is ``axis``."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(u, helper)
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    c, s = math.cos(math.radians(roll_deg)), math.sin(math.radians(roll_deg))
    return np.stack([u, c * v + s * w, -s * v + c * w], axis=1)


def _capsule(canvas: _Canvas, p0, p1, r0: float, r1: float):
    """A tapered capsule (segment p0 -> p1, radius r0 -> r1, mm): (box, distance to the axis (mm), radius
    there (mm)) on the box, or (None, None, None)."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    pad = max(r0, r1) + canvas.voxel_mm
    box = canvas.box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if box is None:
        return None, None, None
    x, y, z = canvas.coords(box)
    d = (p1 - p0).astype(np.float32)
    dx, dy, dz = x - np.float32(p0[0]), y - np.float32(p0[1]), z - np.float32(p0[2])
    t = (dx * d[0] + dy * d[1] + dz * d[2]) / np.float32(max(float(d @ d), 1e-9))
    np.clip(t, 0, 1, out=t)
    dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
    return box, dist, np.float32(r0) + np.float32(r1 - r0) * t


def _curve_mask(canvas: _Canvas, points, radii, step: float):
    """Union of capsules along a smooth curve through ``points`` (mm, in order; PCHIP in chord length) with
    radii (mm, one per point): (box, mask) or (None, None)."""
    points = np.asarray(points, dtype=np.float64)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    n = max(2, int(math.ceil(chord[-1] / step)) + 1)
    t = np.linspace(0.0, chord[-1], n)
    curve = np.stack([PchipInterpolator(chord, points[:, i])(t) for i in range(3)], axis=1)
    rad = np.interp(t, chord, radii)
    pad = rad.max() + canvas.voxel_mm
    box = canvas.box(curve.min(0) - pad, curve.max(0) + pad)
    if box is None:
        return None, None
    mask = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    for a in range(n - 1):
        sub, dist, r = _capsule(canvas, curve[a], curve[a + 1], rad[a], rad[a + 1])
        if sub is None:
            continue
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box))
        mask[local] |= dist <= r
    return box, mask


def _paint_curve(scene: _ChestScene, points, radii, value, sd=8.0, allowed=None, wall=0.0, lumen=None) -> None:
    """A smooth tube (vessel, oesophagus, airway) through ``points`` (mm) with ``radii`` (mm); with ``wall`` > 0
    the tube is a wall of ``value`` around a lumen of HU ``lumen``."""
    step = max(3.0, scene.min_voxel)
    radii = np.asarray(radii, dtype=np.float64)
    box, mask = _curve_mask(scene.canvas, points, radii + wall, step)
    if box is None:
        return
    scene.canvas.paint(box, mask, value, sd, allowed=allowed)
    if wall > 0:
        box, mask = _curve_mask(scene.canvas, points, radii, step)
        scene.canvas.paint(box, mask, lumen, 20.0, allowed=allowed)


def _voxel_of(canvas: _Canvas, point) -> tuple[int, int, int] | None:
    """Nearest voxel index of a point (mm), or None outside the volume."""
    idx = []
    for axis, coord in zip(canvas.axes, point):
        step = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
        i = int(round((float(coord) - float(axis[0])) / step))
        if not 0 <= i < len(axis):
            return None
        idx.append(i)
    return tuple(idx)


def _cavity_level(scene: _ChestScene, x, y, k) -> np.ndarray:
    """Superellipse level of the thoracic cavity (< 1 inside) at in-plane mm (x, y) of slice(s) k."""
    a, b_ant, b_post = (scene.cavity_dims[i][k] for i in range(3))
    yn = np.where(y >= 0, np.abs(y) / b_ant, np.abs(y) / b_post)
    return (x / a) ** 2 + np.where(y >= 0, yn**2, yn**2.6)


# -- painters --------------------------------------------------------------------------------
def paint_chest_wall(scene: _ChestScene) -> None:
    """Skin outline, subcutaneous fat, chest-wall muscle and the thoracic cavity (filled with mediastinal fat):
    per-slice superellipses; the cavity narrows towards the thoracic inlet, the wall thickens there (shoulder
    girdle muscles). Sets ``body / wall / cavity / cavity_dims`` and protects everything outside the cavity."""
    canvas, frame, p = scene.canvas, scene.frame, scene.params
    x_mm, y_mm, z_mm = canvas.x_mm, canvas.y_mm, canvas.z_mm
    apex = p["apex"]
    phase = scene.uniform(0, 2 * np.pi, size=2)
    width_wobble = 1 + 0.025 * np.sin(2 * np.pi * z_mm / 170.0 + phase[0])
    depth_wobble = 1 + 0.02 * np.sin(2 * np.pi * z_mm / 150.0 + phase[1])
    upper = np.clip((z_mm - 0.4 * apex) / (0.6 * apex), 0, 1)  # 0 in the lower chest -> 1 at the apices
    narrowing = upper**1.5
    cav = np.stack(
        [
            frame.cavity_half_width * (1 - 0.42 * narrowing) * width_wobble,
            frame.cavity_ant * (1 - 0.25 * narrowing) * depth_wobble,
            frame.cavity_post * (1 - 0.12 * narrowing) * depth_wobble,
        ]
    ).astype(np.float32)
    scene.cavity_dims = cav
    wall = cav + np.stack(
        [
            p["m_lat"] + 0.8 * (frame.cavity_half_width * width_wobble - cav[0]),
            p["m_ant"] + 14.0 * upper + 0.6 * (frame.cavity_ant * depth_wobble - cav[1]),  # pectoral muscles
            p["m_post"] + 0.6 * (frame.cavity_post * depth_wobble - cav[2]),
        ]
    )
    body = wall + np.array([p["f_lat"], p["f_ant"], p["f_post"]])[:, None]
    scene.frame = _dc_replace(frame, half_depth_post=float(body[2].max()))
    scene.depth_wobble = np.ones(canvas.shape[2])
    anterior = (y_mm >= 0)[:, None]
    y_abs = np.abs(y_mm)[:, None]
    layers = []
    for half_width, depth_ant, depth_post in (body, wall, cav):
        gx = (x_mm[:, None] / half_width[None, :].astype(np.float32)) ** 2
        yn = np.where(anterior, y_abs / depth_ant[None, :].astype(np.float32), y_abs / depth_post[None, :].astype(np.float32))
        gy = np.where(anterior, yn * yn, yn ** np.float32(2.6))
        layers.append((gx.astype(np.float32), gy.astype(np.float32)))
    _fill_body_layers(scene, layers)


def map_chest_diaphragm(scene: _ChestScene) -> None:
    """Diaphragm height map (mm): two domes (the left lower), falling off laterally and steeply posteriorly
    (the costophrenic recesses); ``below_diaphragm``."""
    canvas, frame, p = scene.canvas, scene.frame, scene.params
    x, y = canvas.x_mm[:, None].astype(np.float64), canvas.y_mm[None, :].astype(np.float64)
    cav_A, ca, cp = frame.cavity_half_width, frame.cavity_ant, frame.cavity_post
    posterior = np.clip(-y / cp, 0, None)
    heights = []
    for side, top in ((1.0, 0.0), (-1.0, p["left_dome"])):
        r2 = ((x - side * 0.45 * cav_A) / (0.62 * cav_A)) ** 2 + ((y - 0.1 * ca) / (0.45 * (ca + cp))) ** 2
        heights.append(top - (60.0 * r2 + 35.0 * posterior**2) * frame.scale_z)
    scene.diaphragm_z = np.maximum(np.maximum(heights[0], heights[1]), -125.0 * frame.scale_z).astype(np.float32)
    scene.below_diaphragm = canvas.z_mm[None, None, :] < scene.diaphragm_z[:, :, None]


def map_chest_spine(scene: _ChestScene) -> None:
    """Per-slice thoracic spine geometry (``scene.spine``; kyphosis, see ``spine_at``); no random draws."""
    canvas, frame = scene.canvas, scene.frame
    s_org = frame.scale_organ
    y_body, half_width, half_depth = (a.astype(np.float32) for a in scene.spine_at(canvas.z_mm))
    canal_radius = 7.5 * s_org
    box = canvas.box(
        (-70 * frame.scale_x, float(y_body.min()) - 120, -1e9), (70 * frame.scale_x, float(y_body.max()) + 40, 1e9)
    )
    x, y, _ = canvas.coords(box)
    scene.spine = _Spine(
        y_body=y_body,
        half_width=half_width,
        half_depth=half_depth,
        y_canal=y_body - half_depth - canal_radius,
        canal_radius=canal_radius,
        ring_thickness=max(5.5, 0.8 * scene.min_voxel),
        spinous_length=28.0 * s_org,
        box=box,
        x=x,
        y=y,
    )


def paint_chest_vertebrae(scene: _ChestScene) -> None:
    """Thoracic vertebrae (24.5 mm levels, 5 mm discs) with the shared vertebra painter; records the disc
    heights (rib heads) in ``landmarks``."""
    level = 24.5 * scene.frame.scale_z
    offset = scene.uniform(0, level)
    scene.landmarks["spine_level"] = (level, offset)
    _paint_vertebral_column(scene, level, offset, 5.0 * scene.frame.scale_z, -1e9)


def paint_chest_ribs(scene: _ChestScene) -> None:
    """Ribs 1-12 on both sides: oblique bands just outside the thoracic cavity, heads at the discs (rib 1
    below the apex), descending anteriorly; costal cartilage anteriorly (ribs 1-10); rib necks to the
    vertebral bodies. All protected."""
    canvas, frame, p, tissue, u = scene.canvas, scene.frame, scene.params, scene.tissue, scene.uniform
    half_t = max(3.5, 0.6 * scene.min_voxel)
    half_h = max(5.5, 0.5 * float(canvas.voxel_mm[2]))
    level, offset = scene.landmarks["spine_level"]
    n1 = round((p["apex"] - 18.0 * frame.scale_z - offset) / level)
    heads = offset + (n1 - np.arange(12)) * level + 2.5 * frame.scale_z  # rib k+1 head height (mm)
    drops = np.array([38, 52, 64, 72, 78, 82, 84, 82, 78, 70, 40, 28]) * frame.scale_z  # fall to the tip (mm)
    max_angle = np.array([0.93, 0.93, 0.93, 0.92, 0.92, 0.9, 0.88, 0.8, 0.74, 0.66, 0.5, 0.38]) * np.pi
    cart_from = np.array([0.8] * 7 + [0.68, 0.63, 0.56, 9, 9]) * np.pi
    start = 0.12 * np.pi
    # the ring through the ribs' middle: the cavity outline pushed out by half a rib, slice by slice
    lo_z, hi_z = heads[-1] - 10.0, heads[0] + half_h + 5.0
    k_idx = np.nonzero((canvas.z_mm >= lo_z) & (canvas.z_mm <= hi_z))[0]
    if not k_idx.size:
        return
    ring = scene.cavity_dims[:, k_idx] + np.float32(half_t)
    x, y = canvas.x_mm[:, None, None], canvas.y_mm[None, :, None]
    yn = np.where(y >= 0, np.abs(y) / ring[1][None, None, :], np.abs(y) / ring[2][None, None, :])
    level_field = (x / ring[0][None, None, :]) ** 2 + np.where(y >= 0, yn**2, yn ** np.float32(2.6))
    radius = np.sqrt(level_field)
    near = np.abs(radius - 1) <= 1.2 * half_t / float(ring.min())
    bi, bj, bk = np.nonzero(near)
    xs, ys = canvas.x_mm[bi], canvas.y_mm[bj]
    a_, b_ = ring[0][bk], np.where(ys >= 0, ring[1][bk], ring[2][bk])
    xn, ynn = xs / a_, ys / b_
    angle = np.arctan2(np.abs(xn), -ynn)
    local_radius = np.sqrt((a_ * np.sin(angle)) ** 2 + (b_ * np.cos(angle)) ** 2)
    keep = np.abs(radius[bi, bj, bk] - 1) * local_radius <= half_t
    bi, bj, bk, xs, angle = bi[keep], bj[keep], bk[keep] + k_idx[0], xs[keep], angle[keep]
    z_band = canvas.z_mm[bk]
    side_of = np.sign(xs)
    for side in (1.0, -1.0):
        for r in range(12):
            slope = drops[r] / (max_angle[r] - start) * u(0.9, 1.1)
            z_head = heads[r] + u(-3, 3)
            z_rib = z_head - slope * np.clip(angle - start, 0, None)
            hit = (side_of == side) & (angle >= start) & (angle <= max_angle[r]) & (np.abs(z_rib - z_band) <= half_h)
            if not hit.any():
                continue
            value = np.where(angle[hit] > cart_from[r], tissue["cartilage"], tissue["rib"]).astype(np.float32)
            ii, jj, kk = bi[hit], bj[hit], bk[hit]
            canvas.hu[ii, jj, kk] = value + 50.0 * scene.texture_rng.standard_normal(ii.size, dtype=np.float32)
            canvas.protected[ii, jj, kk] = True
            # neck: from the ring back to the side of the vertebral body
            y_b, hw, hd = scene.spine_at(z_head)
            a0 = float(np.interp(z_head, canvas.z_mm, scene.cavity_dims[0])) + half_t
            b0 = float(np.interp(z_head, canvas.z_mm, scene.cavity_dims[2])) + half_t
            lam = 1.0 / math.sqrt((math.sin(start) / a0) ** 2 + (math.cos(start) / b0) ** 2)
            p_ring = (side * lam * math.sin(start), -lam * math.cos(start), z_head)
            p_head = (side * (float(hw) + 3.0), float(y_b - 0.4 * hd), z_head)
            box, dist, rad = _capsule(canvas, p_head, p_ring, 0.8 * half_t, 0.8 * half_t)
            if box is not None:
                canvas.paint(box, (dist <= rad) & (canvas.hu[box] < 200), tissue["rib"], 50.0, protect=True)


def paint_sternum(scene: _ChestScene) -> None:
    """Manubrium, body and xiphoid in the anterior chest wall (cancellous core, cortical rim), protected."""
    canvas, frame, p, tissue = scene.canvas, scene.frame, scene.params, scene.tissue
    s = frame.scale_organ
    z_notch = p["apex"] - 38.0 * frame.scale_z + scene.uniform(-6, 6)
    z_xiphoid = 15.0 * frame.scale_z + scene.uniform(-10, 10)
    scene.landmarks["sternal_notch_z"] = z_notch
    k_idx = np.nonzero((canvas.z_mm >= z_xiphoid) & (canvas.z_mm <= z_notch))[0]
    if not k_idx.size:
        return
    z = canvas.z_mm[k_idx]
    semi_x = np.where(z > z_notch - 50 * frame.scale_z, 26.0, np.where(z < z_xiphoid + 25, 8.0, 15.0)) * s
    semi_y = np.where(z > z_notch - 50 * frame.scale_z, 8.0, 6.0) * s
    semi_x = np.maximum(semi_x, 0.75 * float(canvas.voxel_mm[0]))
    semi_y = np.maximum(semi_y, 0.75 * float(canvas.voxel_mm[1]))
    y_c = scene.cavity_dims[1][k_idx] + semi_y
    box = canvas.box((-40 * s, float(y_c.min() - semi_y.max()) - 5, float(z[0])),
                     (40 * s, float(y_c.max() + semi_y.max()) + 5, float(z[-1])))
    if box is None:
        return
    x, y, _ = canvas.coords(box)
    kb = k_idx - box[2].start
    level = np.full(tuple(sl.stop - sl.start for sl in box), np.inf, dtype=np.float32)
    level[:, :, kb] = (x / semi_x) ** 2 + ((y - y_c) / semi_y) ** 2
    canvas.paint(box, level <= 1, tissue["cancellous"], 40.0, protect=True)
    canvas.paint(box, (level <= 1) & (level > 0.55), tissue["cortical"], 60.0, protect=True)


def paint_shoulder_girdle(scene: _ChestScene) -> None:
    """Clavicles (sternal notch -> laterally and posteriorly) and scapulae (thin posterolateral plates outside
    the ribs, narrowing to the inferior angle); protected bone."""
    canvas, frame, tissue, u = scene.canvas, scene.frame, scene.tissue, scene.uniform
    s, szs = frame.scale_organ, frame.scale_z
    z_notch = scene.landmarks["sternal_notch_z"]
    y_ant = float(np.interp(z_notch, canvas.z_mm, scene.cavity_dims[1]))
    for side in (1.0, -1.0):
        xs = side * np.array([18.0, 55.0, 95.0, 135.0]) * frame.scale_x
        ys = y_ant + np.array([10.0, 10.0, -8.0, -40.0]) * frame.scale_y
        zs = z_notch + np.array([4.0, 14.0, 24.0, 30.0]) * szs + u(-5, 5)
        rr = np.array([8.0, 7.0, 6.5, 8.0]) * s
        box, level, _ = canvas.tube(0, xs, ys, zs, rr, rr, warp=0.3, min_semi=_MIN_SEMI_VOX)
        if box is not None:
            canvas.paint(box, level <= 1, tissue["rib"] + 80.0, 60.0, allowed=scene.body, protect=True)
    # scapulae
    z_top, z_low = z_notch + 15.0 * szs, z_notch - 135.0 * szs + u(-10, 10)
    k_idx = np.nonzero((canvas.z_mm >= z_low) & (canvas.z_mm <= z_top))[0]
    if not k_idx.size:
        return
    gap = 20.0 + u(-4, 6)
    thick = max(3.0, 0.5 * scene.min_voxel)
    box = canvas.box((-1e9, -1e9, float(canvas.z_mm[k_idx[0]])), (1e9, 0.0, float(canvas.z_mm[k_idx[-1]])))
    if box is None:
        return
    x, y, _ = canvas.coords(box)
    kk = np.arange(box[2].start, box[2].stop)
    a = (scene.cavity_dims[0][kk] + gap)[None, None, :]
    b = (scene.cavity_dims[2][kk] + gap)[None, None, :]
    yn = np.abs(y) / b
    radius = np.sqrt((x / a) ** 2 + yn ** np.float32(2.6))
    angle = np.arctan2(np.abs(x) / a, yn)
    t = ((canvas.z_mm[kk] - z_low) / max(z_top - z_low, 1.0))[None, None, :]  # 0 inferior angle -> 1 top
    lo_ang, hi_ang = (0.3 - 0.16 * t) * np.pi, (0.34 + 0.12 * t) * np.pi
    plate = (np.abs(radius - 1) * b <= thick) & (angle >= lo_ang) & (angle <= hi_ang)
    canvas.paint(box, plate, tissue["rib"], 60.0, allowed=scene.wall, protect=True)


def paint_upper_abdomen(scene: _ChestScene) -> None:
    """The diaphragm (5 mm muscle over the dome) and, below it, the liver dome (right, with the left lobe
    anteriorly), the stomach (fundus with a gas cap) and the top of the spleen."""
    canvas, tissue, u = scene.canvas, scene.tissue, scene.uniform
    s = scene.frame.scale_organ
    free = scene.cavity & ~canvas.protected
    dome = scene.diaphragm_z[:, :, None]
    z = canvas.z_mm[None, None, :]
    canvas.paint((slice(None),) * 3, free & (z >= dome) & (z < dome + 5.0), tissue["muscle"], 8.0)
    allowed = free & scene.below_diaphragm
    scene.allowed_abdomen = allowed
    organs = (
        ("liver", (55, 0, -75), (110, 95, 100), 2.4, tissue["liver"]),
        ("liver", (-20, 40, -45), (60, 35, 35), 2.0, tissue["liver"]),
    )
    for _, center_t, semi, power, value in organs:
        center = scene.cpoint(*center_t) + scene.jitter(0.8)
        box, level = canvas.ellipsoid(center, np.asarray(semi) * s * u(0.9, 1.1, size=3),
                                      _rot(*u(-8, 8, size=3)), power=power, warp=1.0)
        canvas.paint(box, level <= 1, value, 8.0, allowed=allowed)
    # stomach: wall, fluid, anterior gas cap
    semi = np.array([42.0, 45.0, 55.0]) * s * u(0.85, 1.15, size=3)
    box, level = canvas.ellipsoid(scene.cpoint(-60, 5, -65) + scene.jitter(0.8), semi, _rot(*u(-10, 10, size=3)),
                                  warp=1.0)
    if box is not None:
        canvas.paint(box, level <= 1, tissue["sto_wall"], 8.0, allowed=allowed)
        lumen = level <= (1 - 4.0 / semi.min()) ** 2
        canvas.paint(box, lumen, tissue["sto_content"], 8.0, allowed=allowed)
        gas = u(10, 40)
        y_box = canvas.y_mm[box[1]][None, :, None]
        ys = np.nonzero(np.broadcast_to(lumen, level.shape).any(axis=(0, 2)))[0]
        if ys.size:
            y_top = float(canvas.y_mm[box[1]][ys].max())
            canvas.paint(box, lumen & (y_box > y_top - gas), -900.0, 25.0, allowed=allowed)
    center = scene.cpoint(-88, -48, -72) + scene.jitter(0.6)
    rot = _rot(u(-10, 10), u(-10, 10), u(30, 50))
    box, level = canvas.ellipsoid(center, np.array([25.0, 50.0, 48.0]) * s * u(0.85, 1.15), rot, power=2.2, warp=1.0)
    canvas.paint(box, level <= 1, tissue["spleen"], 8.0, allowed=allowed)


def paint_chest_lungs(scene: _ChestScene) -> None:
    """Lung parenchyma: the thoracic cavity above the diaphragm, below the two apical domes, sparing the
    mediastinum (a midline band, the posterior mediastinum in front of the spine and the paravertebral wedge);
    denser posteriorly (dependent lung). Sets ``scene.lung``."""
    canvas, frame, p, tissue = scene.canvas, scene.frame, scene.params, scene.tissue
    x, y, z = canvas.x_mm[:, None, None], canvas.y_mm[None, :, None], canvas.z_mm[None, None, :]
    s = frame.scale_organ
    apex = p["apex"]
    # apical domes (radius of curvature ~32 mm)
    apex_map = np.full(canvas.shape[:2], -np.inf, dtype=np.float32)
    for side in (1.0, -1.0):
        xa, ya = side * 0.36 * frame.cavity_half_width, -0.2 * frame.cavity_post
        r2 = (canvas.x_mm[:, None] - xa) ** 2 + (canvas.y_mm[None, :] - ya) ** 2
        apex_map = np.maximum(apex_map, apex + scene.uniform(-6, 6) - r2 / (2 * 32.0 * s))
    y_body, half_width, half_depth = (a.astype(np.float32)[None, None, :] for a in scene.spine_at(canvas.z_mm))
    # midline band: 14 mm half-width behind, narrowing to the anterior junction line behind the sternum
    ant = np.clip((canvas.y_mm - 0.2 * frame.cavity_ant) / (0.8 * frame.cavity_ant), 0, 1)[None, :, None]
    band = np.abs(x - np.float32(-4.0 * frame.scale_x)) < np.float32(s) * (14.0 - 9.0 * ant)
    wedge = (y < y_body + 0.5 * half_depth) & (np.abs(x) < half_width + 6.0 + 0.6 * np.maximum(y_body - y, 0))
    posterior_med = ((x + 4.0 * frame.scale_x) / (24.0 * s)) ** 2 + ((y - (y_body + half_depth + 14.0 * s)) / (20.0 * s)) ** 2 <= 1
    lung = scene.cavity & ~canvas.protected & (z >= scene.diaphragm_z[:, :, None] + 5.0)
    lung &= z <= apex_map[:, :, None]
    lung &= ~(band | wedge | posterior_med)
    depth = np.clip(0.5 - 0.5 * canvas.y_mm / frame.cavity_post, 0, 1).astype(np.float32)[None, :, None]
    canvas.paint((slice(None),) * 3, lung, np.float32(tissue["lung"]) + np.float32(tissue["lung_gradient"]) * depth, 25.0)
    scene.lung = lung


def paint_chest_heart(scene: _ChestScene) -> None:
    """Heart on the diaphragm, left-anterior-inferior long axis: pericardial fat, myocardium, ventricular
    cavities and both atria (blood; indistinguishable from the myocardium without contrast)."""
    canvas, tissue, u, frame = scene.canvas, scene.tissue, scene.uniform, scene.frame
    s = frame.scale_organ * u(0.9, 1.12)
    allowed = scene.cavity & ~canvas.protected & ~scene.below_diaphragm
    center = scene.cpoint(-22, 20, 50) + scene.jitter(0.6)
    axis = np.array([-0.62, 0.55, -0.5]) + u(-0.12, 0.12, size=3)
    rot = _frame_from_axis(axis, u(0, 180))
    semi = np.array([62.0, 46.0, 43.0]) * s
    box, level = canvas.ellipsoid(center, semi + u(3, 8), rot, warp=0.5)
    canvas.paint(box, level <= 1, tissue["visfat"], 12.0, allowed=allowed)
    box, level = canvas.ellipsoid(center, semi, rot, warp=0.5)
    canvas.paint(box, level <= 1, tissue["myocardium"], 10.0, allowed=allowed)
    lv = center + rot @ np.array([8.0, -10.0, 0.0]) * s
    box, level = canvas.ellipsoid(lv, semi * np.array([0.55, 0.42, 0.45]), rot, warp=0.5)
    canvas.paint(box, level <= 1, tissue["blood"], 12.0, allowed=allowed)
    rv = center + rot @ np.array([0.0, 22.0, 0.0]) * s + np.array([8.0, 10.0, 0.0]) * s
    box, level = canvas.ellipsoid(rv, semi * np.array([0.5, 0.32, 0.4]), rot, warp=0.5)
    canvas.paint(box, level <= 1, tissue["blood"], 12.0, allowed=allowed)
    z_la = 85.0 * frame.scale_z
    atria = (
        (scene.cpoint(32, 4, 62), (32.0, 30.0, 36.0)),  # right atrium: the right heart border
        (np.array([-5.0 * frame.scale_x, scene.spine_front(z_la) + 30.0 * s, z_la]), (38.0, 20.0, 24.0)),  # left
    )
    for c, sm in atria:
        box, level = canvas.ellipsoid(c + scene.jitter(0.4), np.asarray(sm) * s, _rot(*u(-10, 10, size=3)), warp=0.5)
        canvas.paint(box, level <= 1, tissue["blood"], 12.0, allowed=allowed)
    scene.landmarks["left_atrium"] = atria[1][0]


def paint_great_vessels(scene: _ChestScene) -> None:
    """Ascending aorta, arch (with its three branches), descending aorta beside the spine; pulmonary trunk,
    arteries to both hila (recorded in ``landmarks``) and pulmonary veins to the left atrium; SVC with the
    brachiocephalic veins, azygos arch and IVC."""
    canvas, frame, tissue, u = scene.canvas, scene.frame, scene.tissue, scene.uniform
    sx, szs = frame.scale_x, frame.scale_z
    s = frame.scale_organ**0.5 * u(0.9, 1.1)
    cp, front = scene.cpoint, scene.spine_front
    allowed = scene.cavity & ~canvas.protected
    top = canvas.z_mm[-1] + 10.0
    bottom = canvas.z_mm[0] - 10.0

    def at_spine(x_t, dy, z_t):
        z = z_t * szs
        return np.array([x_t * sx, front(z) + dy * frame.scale_y, z])

    aorta = [cp(2, 12, 82), cp(12, 22, 125), cp(10, 22, 150), cp(-2, 20, 166), at_spine(-18, 30, 171),
             at_spine(-25, 14, 160), at_spine(-25, 8, 135), at_spine(-21, 8, 60), at_spine(-14, 10, 0),
             at_spine(-8, 14, -110)]
    radii = np.array([15, 15, 14, 13, 12.5, 12, 11.5, 11, 10.5, 10]) * s
    _paint_curve(scene, aorta, radii, tissue["blood"], allowed=allowed)
    branches = (
        ([cp(2, 18, 166), cp(12, 15, 190), cp(18, 12, top / szs)], 6.5),  # brachiocephalic trunk
        ([cp(-8, 16, 168), cp(-14, 10, top / szs)], 4.5),  # left common carotid
        ([at_spine(-16, 26, 168), at_spine(-28, 24, 200), at_spine(-55, 20, 222)], 5.0),  # left subclavian
    )
    for pts, r in branches:
        _paint_curve(scene, pts, r * s, tissue["blood"], allowed=allowed)
    # pulmonary arteries
    hila = {"right": cp(52, -4, 108) + scene.jitter(0.4), "left": cp(-58, -5, 118) + scene.jitter(0.4)}
    scene.landmarks["hila"] = hila
    bifurcation = cp(-12, 12, 122)
    _paint_curve(scene, [cp(-10, 38, 95), cp(-14, 25, 112), bifurcation], 13.0 * s, tissue["pa"], allowed=allowed)
    _paint_curve(scene, [bifurcation, cp(-32, 2, 126), hila["left"]], 10.5 * s, tissue["pa"], allowed=allowed)
    _paint_curve(scene, [bifurcation, cp(8, 6, 118), cp(30, 0, 114), hila["right"]], 10.0 * s, tissue["pa"],
                 allowed=allowed)
    la = scene.landmarks["left_atrium"]
    for end in (cp(45, 10, 95), cp(45, -15, 70), cp(-50, 8, 100), cp(-50, -18, 75)):
        _paint_curve(scene, [end, la], 7.0 * s, tissue["vein"], allowed=allowed)
    # systemic veins
    _paint_curve(scene, [cp(28, 8, 88), cp(30, 12, 130), cp(30, 14, 175)], 10.0 * s, tissue["vein"], allowed=allowed)
    _paint_curve(scene, [cp(30, 14, 175), cp(38, 12, top / szs)], 7.0 * s, tissue["vein"], allowed=allowed)
    _paint_curve(scene, [cp(30, 14, 175), cp(0, 26, 182), cp(-40, 22, 190), cp(-70, 12, 200)], 6.5 * s,
                 tissue["vein"], allowed=allowed)
    _paint_curve(scene, [at_spine(12, 2, bottom / szs), at_spine(12, 2, 60), at_spine(12, 2, 115), cp(20, 0, 132),
                         cp(28, 10, 130)], 4.5 * s, tissue["vein"], allowed=allowed)
    _paint_curve(scene, [at_spine(22, 35, bottom / szs), cp(24, 2, -10), cp(28, 4, 40)], 12.0 * s, tissue["vein"],
                 allowed=allowed)


def paint_chest_esophagus(scene: _ChestScene) -> None:
    """Oesophagus behind the trachea and left atrium, in front of the spine, to the stomach; sometimes air."""
    canvas, frame, u = scene.canvas, scene.frame, scene.uniform
    szs, s = frame.scale_z, frame.scale_organ**0.5
    top = canvas.z_mm[-1] + 10.0
    pts = [np.array([-3 * frame.scale_x, scene.spine_front(z * szs) + 9 * s, z * szs]) for z in (top / szs, 150, 90, 30)]
    pts += [scene.cpoint(-22, 12, -25), scene.cpoint(-45, 12, -55)]
    radius = 8.0 * s * u(0.85, 1.15)
    allowed = scene.cavity & ~canvas.protected
    if u() < 0.45:
        _paint_curve(scene, pts, max(2.5, 0.3 * radius), scene.tissue["eso"], allowed=allowed, wall=radius - 2.5,
                     lumen=-900.0)
    else:
        _paint_curve(scene, pts, radius, scene.tissue["eso"], allowed=allowed)


def _grow_tree(scene: _ChestScene, start, direction, radius: float, r_min: float, inside, max_segments: int,
               origin=None) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A branching tree of segments (p0, p1, r0, r1) (mm) from ``start`` along ``direction``: each segment
    is 5-9 radii long, tapers 6%, then splits in two (Murray: r1^3 + r2^3 = r^3; the thinner child turns
    more) in a random plane, pulled away from ``origin``. A segment whose end leaves ``inside`` (bool volume;
    the first two generations may cross the mediastinum) is retried shorter and deflected (3 tries); a branch
    stops below ``r_min``. Breadth-first, so the thickest segments come first; at most ``max_segments``.
    Draws from the tree stream."""
    rng, canvas = scene.bowel_rng, scene.canvas
    origin = np.asarray(start if origin is None else origin, dtype=np.float64)
    queue = deque([(np.asarray(start, dtype=np.float64), np.asarray(direction, dtype=np.float64), float(radius), 0)])
    segments = []
    while queue and len(segments) < max_segments:
        p0, d, r, depth = queue.popleft()
        d = d / np.linalg.norm(d)
        length = r * rng.uniform(5.0, 9.0)
        p1, ok = p0 + d * length, False
        for attempt in range(4):
            if attempt:
                length *= 0.7
                bend = _frame_from_axis(d, rng.uniform(0, 360))[:, 1]
                d = d + rng.uniform(0.4, 0.9) * bend
                d /= np.linalg.norm(d)
            p1 = p0 + d * length
            idx = _voxel_of(canvas, p1)
            ok = depth < 2 or (idx is not None and bool(inside[idx]))
            if ok:
                break
        if not ok:
            continue
        r_end = 0.94 * r
        segments.append((p0, p1, r, r_end))
        if r_end * 0.78 < r_min:
            continue
        f1 = rng.uniform(0.79, 0.93)
        f2 = (1 - f1**3) ** (1 / 3)
        plane = _frame_from_axis(d, rng.uniform(0, 360))[:, 1]
        outward = p1 - origin
        outward = outward / (np.linalg.norm(outward) + 1e-9)
        for f, angle in ((f1, rng.uniform(12, 32)), (f2, -rng.uniform(35, 65))):
            a = math.radians(angle)
            child = math.cos(a) * d + math.sin(a) * plane + 0.2 * outward
            queue.append((p1, child, r_end * f, depth + 1))
    return segments


def _rasterise_segments(scene: _ChestScene, segments, values, allowed) -> None:
    """Thin (sub-voxel) segments as one-voxel lines: points every half voxel along each segment, each voxel
    raised to the largest value (HU) of the lines through it, within ``allowed``; plus texture."""
    canvas = scene.canvas
    if not segments:
        return
    p0 = np.array([sg[0] for sg in segments])
    p1 = np.array([sg[1] for sg in segments])
    step = 0.5 * float(canvas.voxel_mm.min())
    counts = np.maximum(2, np.ceil(np.linalg.norm(p1 - p0, axis=1) / step).astype(int) + 1)
    seg = np.repeat(np.arange(len(segments)), counts)
    t = np.concatenate([np.linspace(0, 1, c) for c in counts])[:, None]
    pts = p0[seg] + t * (p1 - p0)[seg]
    idx = []
    for a, axis in enumerate(canvas.axes):
        idx.append(np.rint((pts[:, a] - float(axis[0])) / float(canvas.voxel_mm[a])).astype(np.intp))
    inside = np.ones(len(pts), dtype=bool)
    for a in range(3):
        inside &= (idx[a] >= 0) & (idx[a] < canvas.shape[a])
    flat = np.ravel_multi_index(tuple(i[inside] for i in idx), canvas.shape)
    vals = np.asarray(values, dtype=np.float32)[seg[inside]]
    order = np.lexsort((-vals, flat))  # per voxel, the largest value first
    flat, vals = flat[order], vals[order]
    first = np.ones(flat.size, dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    flat, vals = flat[first], vals[first]
    hu = canvas.hu.reshape(-1)
    keep = allowed.reshape(-1)[flat] & (hu[flat] < vals)
    flat, vals = flat[keep], vals[keep]
    hu[flat] = vals + 6.0 * canvas.texture_rng.standard_normal(flat.size, dtype=np.float32)


def paint_pulmonary_vessels(scene: _ChestScene) -> None:
    """Pulmonary vessel trees, soft tissue in the lung, thinner towards the periphery: per lung 5 lobar and
    12 segmental arterial trunks from the hilum, 6 upper-lobe trunks above it and 8 venous trunks from below it. Branches thinner than half
    a voxel are drawn one voxel wide with a proportionally weaker contrast (partial volume)."""
    canvas, tissue, u = scene.canvas, scene.tissue, scene.bowel_rng.uniform
    if scene.lung is None or not scene.lung.any():
        return
    s = scene.frame.scale_organ
    r_eff_min = 0.55 * scene.min_voxel
    lung_hu = tissue["lung"] + 0.5 * tissue["lung_gradient"]
    lobar = ((0.25, 0.1, 1.0), (0.6, 0.7, -0.35), (1.0, 0.0, 0.1), (0.35, -0.45, -1.0), (0.35, -1.0, -0.15))
    thin, thin_values = [], []
    for name, side in (("right", 1.0), ("left", -1.0)):
        hilum = scene.landmarks["hila"][name]
        trunks = [(hilum, np.array(d), 5.0, tissue["pa"]) for d in lobar]
        for _ in range(12):
            trunks.append((hilum, np.array([abs(u(-1, 1)) + 0.3, u(-1, 1), u(-1, 1)]), 3.5, tissue["pa"]))
        upper_root = hilum + np.array([side * 8.0, 0.0, 30.0 * scene.frame.scale_z])  # upper-lobe artery
        for _ in range(6):
            trunks.append((upper_root, np.array([abs(u(-1, 1)) + 0.2, u(-1, 1), u(0.2, 1.2)]), 3.0, tissue["pa"]))
        vein_root = hilum + np.array([-side * 5.0, -8.0, -25.0 * scene.frame.scale_z])
        for _ in range(8):
            trunks.append((vein_root, np.array([abs(u(-1, 1)) + 0.3, u(-1, 0.6), u(-1, 0.5)]), 4.0, tissue["vein"]))
        for root, d, r, value_full in trunks:
            d = d * np.array([side, 1.0, 1.0]) + u(-0.15, 0.15, size=3)
            segs = _grow_tree(scene, root, d, r * s * u(0.85, 1.15), 0.6, scene.lung, 300, origin=root)
            for p0, p1, r0, r1 in segs:
                if r0 < r_eff_min:
                    thin.append((p0, p1))
                    thin_values.append(lung_hu + (value_full - lung_hu) * min(1.0, (0.5 * (r0 + r1) / r_eff_min) ** 2))
                    continue
                r_eff1 = max(r1, r_eff_min)
                box, dist, rad = _capsule(canvas, p0, p1, r0, r_eff1)
                if box is not None:
                    canvas.paint(box, dist <= rad, value_full, 10.0, allowed=scene.lung)
    _rasterise_segments(scene, thin, thin_values, scene.lung)


def paint_covid_opacities(scene: _ChestScene) -> None:
    """COVID-19-like opacities in ``_OPACITY_FRACTION`` of the subjects (own random stream): 1-14 patches,
    peripheral / subpleural, posterior and basal predominance, bilateral in ~70%; each patch 2-5 smoothly
    deformed lobules flattened along the pleural normal (subpleural bands / wedges, clipped by
    the pleura); ground glass (-720 to -470 HU, soft edges, textured, vessels kept) and, in half of the affected
    subjects, consolidations (-90 to +35 HU, over the vessels) with a ground-glass halo. Records
    ``scene.findings``."""
    canvas, rng = scene.canvas, scene.opacity_rng
    u = rng.uniform
    affected = u() < _OPACITY_FRACTION
    severity = u()
    n_patches = 1 + int(round(severity**1.3 * 13))
    bilateral = n_patches > 1 and u() < 0.7
    side = 1.0 if u() < 0.5 else -1.0
    consolidating = u() < 0.5
    scene.findings = {"opacities": 0, "severity": 0.0, "bilateral": False, "consolidations": 0}
    if not affected or scene.lung is None:
        return
    lung_idx = np.flatnonzero(scene.lung)
    if lung_idx.size == 0:
        return
    cand = lung_idx[rng.integers(0, lung_idx.size, 3000)]
    ci, cj, ck = np.unravel_index(cand, canvas.shape)
    cx, cy, cz = canvas.x_mm[ci], canvas.y_mm[cj], canvas.z_mm[ck]
    rho = _cavity_level(scene, cx, cy, ck)
    weight = np.exp(6.0 * (np.minimum(rho, 1) - 1)) * np.exp(-cy / (0.8 * scene.frame.cavity_post))
    weight *= np.exp(-(cz - cz.min()) / (0.6 * scene.params["apex"]))
    if not bilateral:
        weight = weight * (np.sign(cx) == side)
    if weight.sum() <= 0:
        return
    weight = weight / weight.sum()
    n_cons = 0
    cav_mid = scene.frame
    for _ in range(n_patches):
        c = int(rng.choice(cand.size, p=weight))
        centre = np.array([cx[c], cy[c], cz[c]], dtype=np.float64)
        # local frame: first axis along the outward normal of the pleura (in-plane), the patch flattened along it
        normal = np.array([cx[c] / cav_mid.cavity_half_width**2,
                           cy[c] / (cav_mid.cavity_ant if cy[c] >= 0 else cav_mid.cavity_post) ** 2, 0.0])
        normal = normal / (np.linalg.norm(normal) + 1e-12) if np.linalg.norm(normal) > 0 else np.array([1.0, 0, 0])
        rot = _frame_from_axis(normal + rng.normal(0, 0.2, 3), u(0, 360))
        is_cons = consolidating and u() < 0.25 + 0.4 * severity
        n_cons += int(is_cons)
        target = u(-720, -470)
        size = 0.7 + 0.8 * severity
        for _ in range(int(rng.integers(2, 6))):
            lobule = centre + rot @ (np.array([0.3, 1.0, 1.0]) * rng.normal(0, 14, 3))
            semi = np.array([u(7, 16), u(12, 35), u(12, 35)]) * size
            box, level = canvas.ellipsoid(lobule, semi, rot @ _rot(u(-15, 15), 0, 0), warp=1.0)
            if box is None:
                continue
            lung, hu = scene.lung[box], canvas.hu[box]
            # ground glass: soft edge, striated texture, only raises the parenchyma (vessels stay visible)
            x, y, z = canvas.coords(box)
            k = rng.normal(0, 1, 3)
            k *= 2 * np.pi / (np.linalg.norm(k) * u(8, 20))
            mod = 0.8 + 0.2 * np.cos(k[0] * x + k[1] * y + k[2] * z + u(0, 2 * np.pi))
            halo = 1.25 if is_cons else 1.0
            f = np.clip((halo - level) / (0.3 * halo), 0, 1) * mod
            ggo = hu + (np.float32(target) - hu) * f
            canvas.paint(box, lung & (level <= halo) & (hu < ggo - 1), ggo, 30.0)
            if is_cons:
                canvas.paint(box, lung & (level <= 0.7), u(-90, 35), 18.0)
    scene.findings = {"opacities": n_patches, "severity": float(severity), "bilateral": bool(bilateral),
                      "consolidations": n_cons}


def paint_chest_airways(scene: _ChestScene) -> None:
    """Trachea (~18 mm), carina, main and lobar bronchi and intrapulmonary bronchial trees: air lumen, thin
    soft-tissue wall (partial-volume weakened below a voxel); painted last (air bronchograms in consolidation)."""
    canvas, frame, tissue, u = scene.canvas, scene.frame, scene.tissue, scene.uniform
    szs, s = frame.scale_z, frame.scale_organ**0.5
    allowed = scene.cavity & ~canvas.protected
    top = canvas.z_mm[-1] + 10.0
    z_car = 125.0 * szs + u(-8, 8)
    y_car = scene.spine_front(z_car) + 22.0 * s
    carina = np.array([1.0 * frame.scale_x, y_car, z_car])
    scene.landmarks["carina"] = carina
    r_tr = 9.0 * s * u(0.85, 1.1)
    wall = 2.2
    trachea = [np.array([3.0 * frame.scale_x, scene.spine_front(z) + 26.0 * s, z]) for z in (top, 0.5 * (top + z_car))]
    _paint_curve(scene, trachea + [carina + np.array([0, 0, 8.0])], r_tr, tissue["airway_wall"], allowed=allowed,
                 wall=wall, lumen=-1000.0)

    def rel(dx, dy, dz):
        return carina + np.array([dx * frame.scale_x, dy * frame.scale_y, dz * szs])

    # (points, radius) of the central bronchi; the last point of the lobar ones seeds a tree (direction)
    central = [
        ([carina + np.array([0, 0, 8.0]), rel(18, -3, -12), rel(30, -6, -22)], 7.0),  # right main
        ([rel(30, -6, -22), rel(38, -9, -40)], 5.5),  # bronchus intermedius
        ([carina + np.array([0, 0, 8.0]), rel(-22, -4, -18), rel(-44, -8, -32)], 6.3),  # left main
    ]
    lobar = [
        ([rel(30, -6, -22), rel(52, -5, -8)], 4.5, (0.6, 0.0, 0.8)),  # right upper
        ([rel(38, -9, -40), rel(52, 16, -58)], 3.5, (0.4, 0.8, -0.4)),  # right middle
        ([rel(38, -9, -40), rel(48, -24, -78)], 4.5, (0.3, -0.5, -1.0)),  # right lower
        ([rel(-44, -8, -32), rel(-60, 6, -20)], 4.5, (-0.4, 0.2, 0.9)),  # left upper
        ([rel(-44, -8, -32), rel(-64, 18, -48)], 3.5, (-0.5, 0.8, -0.4)),  # lingula
        ([rel(-44, -8, -32), rel(-54, -24, -74)], 4.5, (-0.3, -0.5, -1.0)),  # left lower
    ]
    for pts, r in central:
        _paint_curve(scene, pts, r * s, tissue["airway_wall"], allowed=allowed, wall=1.8, lumen=-1000.0)
    for pts, r, _ in lobar:
        _paint_curve(scene, pts, r * s, tissue["airway_wall"], allowed=allowed, wall=1.5, lumen=-1000.0)
    if scene.lung is None:
        return
    half_voxel = 0.5 * scene.min_voxel
    lung_hu = tissue["lung"] + 0.5 * tissue["lung_gradient"]
    r_min = max(1.0, 0.35 * scene.min_voxel)
    for pts, r, d in lobar:
        segs = _grow_tree(scene, pts[-1], d, 0.85 * r * s, r_min, scene.lung, 40, origin=pts[0])
        for p0, p1, r0, r1 in segs:
            w = max(0.6, 0.15 * r0)
            shell = max(w, half_voxel)
            box, dist, rad = _capsule(canvas, p0, p1, r0, r1)
            if box is None:
                continue
            value = np.float32(lung_hu + (tissue["airway_wall"] - lung_hu) * w / shell)
            outer = (dist <= rad + np.float32(shell)) & (dist > rad)
            canvas.paint(box, outer & (canvas.hu[box] < value), value, 10.0, allowed=scene.lung)
            if r0 >= half_voxel:
                canvas.paint(box, dist <= rad, -1000.0, 20.0, allowed=scene.lung)


# the chest anatomy, in painting order (later structures overwrite earlier ones where allowed)
_CHEST_PAINTERS: tuple[Callable[[_ChestScene], None], ...] = (
    paint_chest_wall,
    paint_table,
    map_chest_diaphragm,
    map_chest_spine,
    paint_back_muscles,
    paint_chest_vertebrae,
    paint_chest_ribs,
    paint_sternum,
    paint_shoulder_girdle,
    paint_upper_abdomen,
    paint_chest_lungs,
    paint_chest_heart,
    paint_great_vessels,
    paint_chest_esophagus,
    paint_pulmonary_vessels,
    paint_covid_opacities,
    paint_chest_airways,
)


# ----------------------------------------------------------------------------------------------
# image formation and the renderer
# ----------------------------------------------------------------------------------------------
def _form_image(scene: _Scene) -> np.ndarray:
    """Blur the painted HU volume, add Gaussian noise, round and clip: int16 [X, Y, Z] (HU)."""
    canvas, params = scene.canvas, scene.params
    nx, ny, nz = canvas.shape
    sx, sy, sz = params["vox"]
    # sigma 0.6-0.9 voxel (0.55-0.7 through-plane) up to 3 mm (5 mm) voxels; for coarser voxels it shrinks so
    # that the physical blur stays <= ~2.7 mm (4 mm) and thin structures are not washed out
    sigma_xy = params["blur"][0] * min(1.0, 3.0 / max(sx, sy))
    sigma_z = params["blur"][1] * min(1.0, 5.0 / sz)
    img = canvas.hu
    ndimage.gaussian_filter(img, sigma=(sigma_xy, sigma_xy, sigma_z), truncate=3.0, output=img)  # in place
    noise_sd = np.float32(params["noise_sd"])
    rows = max(1, (1 << 20) // (ny * nz))  # add the noise in ~4 MB blocks of X rows
    buf = np.empty((rows, ny, nz), dtype=np.float32)
    for i0 in range(0, nx, rows):
        block = buf[: min(rows, nx - i0)]
        scene.texture_rng.standard_normal(dtype=np.float32, out=block)
        block *= noise_sd
        img[i0 : i0 + rows] += block
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.int16)


def _scanner_affine(scene: _Scene) -> np.ndarray:
    """RAS+ affine (4x4 float64, mm): positive diagonal, plausible scanner origin."""
    nx, ny, _ = scene.canvas.shape
    sx, sy, sz = scene.params["vox"]
    aff = np.diag([sx, sy, sz, 1.0]).astype(np.float64)
    aff[0, 3] = -(nx - 1) / 2.0 * sx + scene.uniform(-10, 10)
    aff[1, 3] = -(ny - 1) / 2.0 * sy + scene.uniform(-30, 30)
    aff[2, 3] = -scene.uniform(300, 700)
    return aff


def _render(seed: int, shape, spacing, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject: (image int16 HU [X,Y,Z], label uint8 [X,Y,Z], affine 4x4 float64)."""
    scene = _new_scene(seed, shape, spacing, kind)
    for paint in _STRUCTURE_PAINTERS:
        paint(scene)
    _paint_organs(scene)
    # free the masks before image formation (large volumes)
    scene.body = scene.wall = scene.cavity = scene.below_diaphragm = None
    scene.allowed_abdomen = scene.allowed_anywhere = scene.spine = None
    scene.canvas.protected = None
    image = _form_image(scene)
    scene.canvas.hu = None
    return image, scene.canvas.labels, _scanner_affine(scene)


def _render_chest(seed: int, shape, spacing) -> tuple[np.ndarray, np.ndarray, _ChestScene]:
    """One chest subject: (image int16 HU [X,Y,Z], affine 4x4 float64, the scene without its volumes)."""
    scene = _new_chest_scene(seed, shape, spacing)
    for paint in _CHEST_PAINTERS:
        paint(scene)
    scene.body = scene.wall = scene.cavity = scene.below_diaphragm = scene.lung = None
    scene.allowed_abdomen = scene.allowed_anywhere = scene.spine = None
    scene.canvas.protected = None
    scene.canvas.labels = None
    image = _form_image(scene)
    scene.canvas.hu = None
    return image, _scanner_affine(scene), scene


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def generate_subject(
    seed: int,
    shape: tuple[int, int] = (128, 128),
    spacing: tuple[float, float, float] = (3.0, 3.0, 5.0),
    with_label: bool = True,
    *,
    kind: str = "btcv",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Paint one synthetic CT.

    seed: any non-negative int (the whole subject is a deterministic function of it and of kind, shape and
    spacing).
    shape: in-plane voxels (X, Y); the number of slices varies per subject.
    spacing: nominal voxel size in mm (sx, sy, sz); in-plane spacing is jittered +-10% per subject.
    kind:
      "btcv": contrast-enhanced (portal-venous) abdominal CT with the 13 BTCV organ labels; z field of view
        ~200-300 mm from the lung bases to below the iliac crests.
      "tcia": the same abdominal renderer, more variable (30% non-contrast, some more lung); the unlabeled
        cohort of ``make_synthetic_dataset(unlabeled_kind="abdomen")``.
      "chest": TCIA-Covid19-like chest CT (unlabeled; ``with_label`` must be False): from just below the
        diaphragm (40% of subjects: 40-80 mm below the right dome, showing the liver dome, stomach and top of
        the spleen) to 10-35 mm above the lung apices, ~220-360 mm; lungs (~-850 HU, denser posteriorly) with
        pulmonary vessel and bronchial trees, trachea, carina and main / lobar bronchi, heart, great vessels,
        oesophagus, mediastinal fat, ribs 1-12 with costal cartilage, sternum, clavicles, scapulae and the
        thoracic spine. 80% non-contrast (blood ~40 HU), 20% mild contrast. 45% have COVID-19-like
        opacities: peripheral, posterior-basal ground glass (-720 to -470 HU) and, in half of those,
        consolidations (-90 to +35 HU); see ``paint_covid_opacities``.
    Returns (image int16 HU [X,Y,Z], label uint8 [X,Y,Z] with values 0..13 or None, affine 4x4 float64 RAS+);
    the label is None when ``with_label`` is False (always for "chest").
    """
    if kind not in ("btcv", "tcia", "chest"):
        raise ValueError(f"kind={kind!r}; expected 'btcv', 'tcia' or 'chest'")
    if kind == "chest" and with_label:
        raise ValueError("kind='chest' subjects have no labels; pass with_label=False")
    if len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"shape={shape!r}; expected two in-plane sizes >= 8 voxels")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={spacing!r}; expected three positive sizes in mm")
    shape, spacing = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    if kind == "chest":
        image, affine, _ = _render_chest(int(seed), shape, spacing)
        return image, None, affine
    image, label, affine = _render(int(seed), shape, spacing, kind)
    return image, (label if with_label else None), affine


def _subject_seed(seed: int, stream: int, index: int) -> int:
    """Independent per-subject seed (stream 0: unlabeled, 1: labeled)."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream), int(index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _save_nifti_atomic(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI volume (RAS affine in both qform and sform, mm) with ``ssl_utils.io``'s
    atomic writer; ``.nii.gz`` paths are gzip-compressed (level 1, no timestamp: reproducible)."""
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    atomic_write(path, lambda f: f.write(data), what="volume")


def _write_json_atomic(obj: Any, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n", what="datalist")


def _make_one(task: tuple) -> str:
    """Worker: generate and write one subject. task = (seed, shape, spacing, kind, image_path, label_path)."""
    seed, shape, spacing, kind, img_path, lab_path = task
    image, label, affine = generate_subject(seed, shape, spacing, with_label=lab_path is not None, kind=kind)
    _save_nifti_atomic(image, affine, Path(img_path))
    if lab_path is not None:
        _save_nifti_atomic(label, affine, Path(lab_path))
    return img_path


# ----------------------------------------------------------------------------------------------
# the on-disk cohort
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CohortLayout:
    """Paths of one cohort under ``root`` (datalist entries are relative to ``tcia_root`` / ``btcv_root``)."""

    root: Path
    tcia_root: Path
    btcv_root: Path
    tcia_json: Path
    btcv_json: dict[int, Path]  # N -> btcv/dataset_0_init_{N}.json
    unlabeled: list[str]  # data/volume-synth-XXXX.nii.gz
    labeled: list[dict[str, str]]  # {"image": imagesTr/..., "label": labelsTr/...}, training first

    @property
    def meta_path(self) -> Path:
        return self.root / "cohort.json"

    def all_files(self) -> list[Path]:
        files = [self.tcia_json, *self.btcv_json.values(), *(self.tcia_root / p for p in self.unlabeled)]
        return files + [self.btcv_root / e[k] for e in self.labeled for k in ("image", "label")]

    def result(self, reused: bool) -> dict:
        return {
            "root": str(self.root),
            "tcia_root": str(self.tcia_root),
            "tcia_json": str(self.tcia_json),
            "btcv_root": str(self.btcv_root),
            "btcv_json": {N: str(p) for N, p in self.btcv_json.items()},
            "reused": reused,
        }


_UNLABELED_KINDS = {"chest": "chest", "abdomen": "tcia"}  # make_synthetic_dataset(unlabeled_kind=...) -> kind


def _cohort_params(
    n_unlabeled, n_unlabeled_val, n_labeled_train, n_labeled_val, train_sizes, shape, spacing, seed, unlabeled_kind,
    n_labeled_tune=0, n_labeled_control=0,
) -> dict:
    """Validated generation parameters, as written to ``cohort.json`` (raises ValueError)."""
    if unlabeled_kind not in _UNLABELED_KINDS:
        raise ValueError(f"unlabeled_kind={unlabeled_kind!r}; expected one of {sorted(_UNLABELED_KINDS)}")
    sizes = sorted({int(s) for s in train_sizes})
    if n_unlabeled < 1 or not 0 <= n_unlabeled_val < n_unlabeled:
        raise ValueError(
            f"need n_unlabeled >= 1 and 0 <= n_unlabeled_val < n_unlabeled, got {n_unlabeled}, {n_unlabeled_val}"
        )
    if n_labeled_control < 0:
        raise ValueError(f"need n_labeled_control >= 0, got {n_labeled_control}")
    if n_labeled_train < 1 or n_labeled_val < 0 or n_labeled_tune < 0:
        raise ValueError(f"need n_labeled_train >= 1, n_labeled_tune >= 0 and n_labeled_val >= 0, got {n_labeled_train}, "
                         f"{n_labeled_tune}, {n_labeled_val}")
    if not sizes or sizes[0] < 1 or sizes[-1] > n_labeled_train:
        raise ValueError(f"train_sizes={tuple(train_sizes)} must lie in 1..n_labeled_train={n_labeled_train}")
    params = {
        "version": COHORT_VERSION,
        "n_unlabeled": int(n_unlabeled),
        "n_unlabeled_val": int(n_unlabeled_val),
        "n_labeled_train": int(n_labeled_train),
        "n_labeled_val": int(n_labeled_val),
        "train_sizes": sizes,
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
        "unlabeled_kind": str(unlabeled_kind),
    }
    if n_labeled_tune:  # recorded only when there is a tuning split (cohorts without one keep their cohort.json)
        params["n_labeled_tune"] = int(n_labeled_tune)
    if n_labeled_control:  # likewise the positive-control split
        params["n_labeled_control"] = int(n_labeled_control)
    return params


def _cohort_layout(root: Path, params: dict) -> _CohortLayout:
    tcia_root, btcv_root = root / "tcia", root / "btcv"
    n_lab = (params["n_labeled_train"] + params.get("n_labeled_tune", 0) + params["n_labeled_val"]
             + params.get("n_labeled_control", 0))
    return _CohortLayout(
        root=root,
        tcia_root=tcia_root,
        btcv_root=btcv_root,
        tcia_json=tcia_root / "dataset_split.json",
        btcv_json={N: btcv_root / f"dataset_0_init_{N}.json" for N in params["train_sizes"]},
        unlabeled=[f"data/volume-synth-{i:04d}.nii.gz" for i in range(params["n_unlabeled"])],
        labeled=[
            {"image": f"imagesTr/img{j:04d}.nii.gz", "label": f"labelsTr/label{j:04d}.nii.gz"}
            for j in range(1, n_lab + 1)
        ],
    )


def _is_complete(layout: _CohortLayout, params: dict) -> bool:
    """A previous cohort with identical parameters, marked complete, with every file present."""
    if not layout.meta_path.exists():
        return False
    try:
        old = json.loads(layout.meta_path.read_text())
    except (OSError, ValueError):
        return False
    return old == {**params, "complete": True} and all(p.exists() for p in layout.all_files())


def _prepare_folders(layout: _CohortLayout, params: dict) -> None:
    """Drop a previous cohort's folders (only if this module made them: cohort.json present), mark the new
    one as in progress and create its folders."""
    if layout.meta_path.exists():
        for d in (layout.tcia_root, layout.btcv_root):
            if d.is_dir():
                shutil.rmtree(d)
    layout.root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic({**params, "complete": False}, layout.meta_path)  # marks tcia/ and btcv/ as ours
    (layout.tcia_root / "data").mkdir(parents=True, exist_ok=True)
    (layout.btcv_root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (layout.btcv_root / "labelsTr").mkdir(parents=True, exist_ok=True)


def _write_volumes(layout: _CohortLayout, params: dict, progress: bool, workers: int) -> None:
    """Generate and write every subject (unlabeled: seed stream 0, kind from ``unlabeled_kind``; labeled:
    stream 1, kind "btcv")."""
    seed, shp, spc = params["seed"], tuple(params["shape"]), tuple(params["spacing"])
    tcia, btcv = layout.tcia_root, layout.btcv_root
    kind = _UNLABELED_KINDS[params["unlabeled_kind"]]
    tasks = [(_subject_seed(seed, 0, i), shp, spc, kind, str(tcia / p), None) for i, p in enumerate(layout.unlabeled)]
    tasks += [
        (_subject_seed(seed, 1, j), shp, spc, "btcv", str(btcv / e["image"]), str(btcv / e["label"]))
        for j, e in enumerate(layout.labeled)
    ]
    bar = tqdm(total=len(tasks), desc="synthetic cohort", unit="vol", disable=not progress)
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=int(workers)) as ex:
                for _ in ex.map(_make_one, tasks):
                    bar.update(1)
        else:
            for t in tasks:
                _make_one(t)
                bar.update(1)
    finally:
        bar.close()


def _write_datalists(layout: _CohortLayout, params: dict) -> None:
    """The TCIA train / validation split and one BTCV datalist per training-set size."""
    n_train_unl = params["n_unlabeled"] - params["n_unlabeled_val"]
    split = {
        "training": [{"image": p} for p in layout.unlabeled[:n_train_unl]],
        "validation": [{"image": p} for p in layout.unlabeled[n_train_unl:]],
    }
    _write_json_atomic(split, layout.tcia_json)
    labels = {"0": "background", **{str(k): v for k, v in ORGANS.items()}}
    n_train, n_tune = params["n_labeled_train"], params.get("n_labeled_tune", 0)
    n_val, n_control = params["n_labeled_val"], params.get("n_labeled_control", 0)
    train, tune = layout.labeled[:n_train], layout.labeled[n_train : n_train + n_tune]
    val = layout.labeled[n_train + n_tune : n_train + n_tune + n_val]
    control = layout.labeled[n_train + n_tune + n_val :]
    for N, path in layout.btcv_json.items():
        datalist = {
            "description": "synthetic btcv-like cohort",
            "labels": labels,
            "modality": {"0": "CT"},
            "name": "btcv-synthetic",
            "tensorImageSize": "3D",
            "numTraining": N,
            "training": train[:N],
            **({"tuning": tune} if n_tune else {}),
            "validation": val,
            **({"control": control} if n_control else {}),
        }
        _write_json_atomic(datalist, path)


def make_synthetic_dataset(
    root: str | os.PathLike,
    n_unlabeled: int = 32,
    n_unlabeled_val: int = 6,
    n_labeled_train: int = 6,
    n_labeled_val: int = 4,
    train_sizes: tuple[int, ...] = (2, 6),
    shape: tuple[int, int] = (128, 128),
    spacing: tuple[float, float, float] = (3.0, 3.0, 5.0),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    unlabeled_kind: str = "chest",
    n_labeled_tune: int = 0,
    n_labeled_control: int = 0,
) -> dict:
    """Write (or reuse) a synthetic TCIA-like + BTCV-like cohort under ``root``.

    n_unlabeled: unlabeled volumes in total, the last ``n_unlabeled_val`` of which form the validation split.
    unlabeled_kind: "chest" (default; TCIA-Covid19-like chest CT, ``generate_subject(kind="chest")``, as the
    reference pre-trains on) or "abdomen" (the abdominal renderer, ``kind="tcia"``); recorded in
    ``cohort.json``, so a cohort of the other kind is regenerated, not reused.
    n_labeled_train / n_labeled_tune / n_labeled_val: labeled subjects (img0001.. training first, then the tuning
    split, then validation). The tuning split (a ``"tuning"`` list in every datalist, when n_labeled_tune > 0) is
    what recipe choices are made on; the validation split only reports. n_labeled_control: subjects after the
    validation split, listed as ``"control"`` in every datalist (when > 0): the positive control's training set,
    disjoint from the three others.
    train_sizes: for each N a ``btcv/dataset_0_init_{N}.json`` with the first N training subjects (nested)
    and the shared validation list. shape: in-plane voxels; spacing: nominal voxel size (mm).
    A complete ``root/cohort.json`` with identical parameters and all files present means reuse (unless
    overwrite); otherwise the ``tcia/`` and ``btcv/`` folders of a previous cohort are replaced (nothing else
    under ``root`` is touched). ``workers`` > 1 writes
    subjects in parallel processes.
    Returns {"root", "tcia_root", "tcia_json", "btcv_root", "btcv_json": {N: path}, "reused"} (str paths).
    """
    params = _cohort_params(
        n_unlabeled, n_unlabeled_val, n_labeled_train, n_labeled_val, train_sizes, shape, spacing, seed, unlabeled_kind,
        n_labeled_tune, n_labeled_control,
    )
    layout = _cohort_layout(Path(root), params)
    if not overwrite and _is_complete(layout, params):
        return layout.result(reused=True)
    _prepare_folders(layout, params)
    _write_volumes(layout, params, progress, workers)
    _write_datalists(layout, params)
    _write_json_atomic({**params, "complete": True}, layout.meta_path)  # last: the cohort is complete
    return layout.result(reused=False)


def make_cohort_from_config(cfg: Mapping[str, Any] | str, root: str | os.PathLike, **kw: Any) -> dict:
    """``make_synthetic_dataset`` with sizes from a config: synth_unlabeled (total incl. validation),
    synth_unlabeled_val, synth_labeled_train, synth_labeled_tune, synth_labeled_val, synth_train_sizes, synth_shape (voxels),
    synth_spacing (mm), synth_seed, synth_unlabeled_kind ("chest" / "abdomen"). Keyword arguments (overwrite,
    progress, workers, ...) override."""
    from .config import get_config

    cfg = get_config(cfg)  # a preset name, a Config or flat settings (validated; missing ones default)
    args = dict(
        n_unlabeled=int(cfg["synth_unlabeled"]),
        n_unlabeled_val=int(cfg["synth_unlabeled_val"]),
        n_labeled_train=int(cfg["synth_labeled_train"]),
        n_labeled_val=int(cfg["synth_labeled_val"]),
        n_labeled_tune=int(cfg["synth_labeled_tune"]),
        n_labeled_control=int(cfg["synth_labeled_control"]),
        train_sizes=tuple(cfg["synth_train_sizes"]),
        shape=tuple(cfg["synth_shape"]),
        spacing=tuple(cfg["synth_spacing"]),
        seed=int(cfg["synth_seed"]),
        unlabeled_kind=str(cfg["synth_unlabeled_kind"]),
    )
    args.update(kw)
    return make_synthetic_dataset(root, **args)
