"""Deterministic synthetic abdominal CT cohort (TCIA-Covid19-like unlabeled + BTCV-like 13-organ labeled).

The real data sets cannot be downloaded here, so this module paints CT-like volumes in Hounsfield units
(HU) from a shared anatomical prior with per-subject variation, and writes them in the same on-disk
layout and datalist format as the reference tutorial:

    root/tcia/data/volume-synth-0000.nii.gz ...     root/tcia/dataset_split.json
    root/btcv/imagesTr/img0001.nii.gz ...           root/btcv/labelsTr/label0001.nii.gz ...
    root/btcv/dataset_0_init_{N}.json               root/cohort.json (generation parameters)

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
"""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator
from tqdm.auto import tqdm

__all__ = ["ORGANS", "generate_subject", "make_synthetic_dataset", "make_cohort_from_config"]

ORGANS: dict[int, str] = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic veins",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}

COHORT_VERSION = 1
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


_OUTSIDE = np.float32(np.inf)  # the q returned by a primitive that misses the volume entirely


class _Canvas:
    """HU / label volumes plus coordinate bookkeeping and shape primitives for one subject."""

    def __init__(self, nx, ny, nz, vox, bx, by, z_bottom, rng, warp_terms):
        self.shape = (nx, ny, nz)
        self.vox = np.asarray(vox, dtype=np.float64)  # (sx, sy, sz) mm
        sx, sy, sz = (float(v) for v in vox)
        # anatomical coordinates (mm) of voxel centres along each axis
        self.xa = (_RIGHT * ((np.arange(nx) - (nx - 1) / 2.0) * sx - bx)).astype(np.float32)
        self.ya = ((np.arange(ny) - (ny - 1) / 2.0) * sy - by).astype(np.float32)
        self.za = (z_bottom + np.arange(nz) * sz).astype(np.float32)
        self.axes = (self.xa, self.ya, self.za)
        self.rng = rng
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(self.shape, dtype=np.uint8)
        self.protected = np.zeros(self.shape, dtype=bool)
        self.lab_box: dict[int, tuple[list[int], list[int]]] = {}  # voxel bbox of every painted label
        # low-rank smooth displacement field: d_c = sum_k fx[k](x) * fy[k](y) * fz[k](z)
        self.disp = []
        self.dmax = np.zeros(3)
        for c in range(3):
            terms = []
            for amp, lam, ph in warp_terms[c]:
                f = [np.cos(2 * np.pi * a / lam[i] + ph[i]).astype(np.float32) for i, a in enumerate(self.axes)]
                f[0] = (f[0] * amp).astype(np.float32)
                terms.append(f)
                self.dmax[c] += abs(amp)
            self.disp.append(terms)

    # -- coordinates -------------------------------------------------------------------------
    def bbox(self, lo, hi):
        """Voxel slices covering the anatomical box [lo, hi] (mm), or None if outside the volume."""
        sl = []
        for a, l, h in zip(self.axes, lo, hi):
            idx = np.nonzero((a >= l) & (a <= h))[0]
            if idx.size == 0:
                return None
            sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(sl)

    def coords(self, sl, warp=0.0):
        """Anatomical (optionally smoothly warped) coordinates (mm) on a bbox: three float32 arrays
        (broadcastable 1-D views when ``warp == 0``)."""
        if warp == 0:
            return [self.xa[sl[0]][:, None, None], self.ya[sl[1]][None, :, None], self.za[sl[2]][None, None, :]]
        return [self.lin(sl, warp, np.eye(3)[i]) for i in range(3)]

    def lin(self, sl, warp, coef, const=0.0):
        """sum_i coef[i] * P_i + const on a bbox, P the warped coordinates (mm); one low-rank matmul.

        Every term is a product f(x) g(y) h(z), so the whole field is (n1*n2, K) @ (K, n3)."""
        x, y, z = self.xa[sl[0]], self.ya[sl[1]], self.za[sl[2]]
        n1, n2, n3 = len(x), len(y), len(z)
        cols = [np.float32(const) + np.float32(coef[0]) * x[:, None] + np.float32(coef[1]) * y[None, :]]
        rows = [np.ones(n3, dtype=np.float32)]
        if coef[2] != 0:
            cols.append(np.full((n1, n2), coef[2], dtype=np.float32))
            rows.append(z)
        if warp:
            for c in range(3):
                if coef[c] == 0:
                    continue
                for fx, fy, fz in self.disp[c]:
                    cols.append(np.float32(warp * coef[c]) * fx[sl[0]][:, None] * fy[sl[1]][None, :])
                    rows.append(fz[sl[2]])
        M = np.stack([np.broadcast_to(c_, (n1, n2)) for c_ in cols], axis=-1).reshape(n1 * n2, len(cols))
        return (M.astype(np.float32) @ np.stack(rows).astype(np.float32)).reshape(n1, n2, n3)

    def margin(self, warp):
        return warp * self.dmax + self.vox

    # -- primitives --------------------------------------------------------------------------
    def ellipsoid(self, center, semi, R=None, p=2.0, warp=1.0, min_semi=0.0):
        """Superellipsoid |u/a|^p + |v/b|^p + |w/c|^p <= 1 in local axes (columns of R).

        Returns (slices, q) with q the normalised radius measure (q <= 1 inside), or (None, inf)."""
        c = np.asarray(center, dtype=np.float64)
        R = np.eye(3) if R is None else np.asarray(R, dtype=np.float64)
        semi = np.asarray(semi, dtype=np.float64)
        if min_semi > 0:  # at least min_semi voxels along each local axis (voxel size projected)
            vproj = np.sqrt(((R * self.vox[:, None]) ** 2).sum(0))
            semi = np.maximum(semi, min_semi * vproj)
        bound = np.abs(R) @ semi
        m = self.margin(warp)
        sl = self.bbox(c - bound - m, c + bound + m)
        if sl is None:
            return None, _OUTSIDE
        q = None
        for j in range(3):
            coef = R[:, j] / semi[j]
            u = self.lin(sl, warp, coef, -float(coef @ c))
            if p == 2:
                np.multiply(u, u, out=u)
            else:
                np.abs(u, out=u)
                np.power(u, np.float32(p), out=u)
            if q is None:
                q = u
            else:
                q += u
        return sl, q

    def tube(self, axis, t, c1, c2, r1, r2, warp=1.0, min_semi=0.0):
        """Generalised cylinder along a coordinate axis (0=x, 1=y, 2=z).

        ``t`` are knot positions (mm, any order) along ``axis``; ``c1, c2`` the centre-line in the two
        other axes (in increasing axis order); ``r1, r2`` the radii (mm) there. Between knots everything is
        interpolated smoothly (PCHIP). Returns (slices, q, T): q <= 1 inside, T the axial coordinate."""
        t = np.asarray(t, dtype=np.float64)
        order = np.argsort(t)
        t = t[order]
        c1, c2, r1, r2 = (np.broadcast_to(np.asarray(v, dtype=np.float64), t.shape)[order] for v in (c1, c2, r1, r2))
        o1, o2 = [a for a in range(3) if a != axis]
        td = np.linspace(t[0], t[-1], 97)
        C1 = PchipInterpolator(t, c1)(td)
        C2 = PchipInterpolator(t, c2)(td)
        R1 = np.maximum(PchipInterpolator(t, r1)(td), 1e-3)
        R2 = np.maximum(PchipInterpolator(t, r2)(td), 1e-3)
        # an oblique centre-line cuts the axis-normal plane in a wider ellipse
        R1 = R1 * np.sqrt(1 + np.gradient(C1, td) ** 2)
        R2 = R2 * np.sqrt(1 + np.gradient(C2, td) ** 2)
        if min_semi > 0:
            R1 = np.maximum(R1, min_semi * self.vox[o1])
            R2 = np.maximum(R2, min_semi * self.vox[o2])
        lo, hi = np.zeros(3), np.zeros(3)
        lo[axis], hi[axis] = t[0], t[-1]
        lo[o1], hi[o1] = (C1 - R1).min(), (C1 + R1).max()
        lo[o2], hi[o2] = (C2 - R2).min(), (C2 + R2).max()
        m = self.margin(warp)
        sl = self.bbox(lo - m, hi + m)
        if sl is None:
            return None, _OUTSIDE, _OUTSIDE
        T = self.lin(sl, warp, np.eye(3)[axis])
        # nearest-entry lookup in fine tables along the axis (table step < 0.5 mm for a 500 mm tube)
        nt = 1025
        tf = np.linspace(t[0], t[-1], nt)
        idx = np.clip(T, np.float32(t[0]), np.float32(t[-1]))
        idx -= np.float32(t[0])
        idx *= np.float32((nt - 1) / max(t[-1] - t[0], 1e-6))
        idx = np.rint(idx).astype(np.intp)
        q = None
        for o, C, Rr in ((o1, C1, R1), (o2, C2, R2)):
            Ct = np.interp(tf, td, C).astype(np.float32)
            Rinv = (1.0 / np.interp(tf, td, Rr)).astype(np.float32)
            v = self.lin(sl, warp, np.eye(3)[o])
            v -= Ct[idx]
            v *= Rinv[idx]
            np.multiply(v, v, out=v)
            if q is None:
                q = v
            else:
                q += v
        q[(T < t[0]) | (T > t[-1])] = np.inf
        return sl, q, T

    def label_count(self, label):
        """Voxels currently carrying ``label`` (searched within the boxes it was painted in)."""
        if label not in self.lab_box:
            return 0
        lo, hi = self.lab_box[label]
        return int(np.count_nonzero(self.lab[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == label))

    # -- painting ----------------------------------------------------------------------------
    def paint(self, sl, mask, value, sd=0.0, label=None, allowed=None, only_label=None, protect=False):
        """Set HU = value + sd * N(0,1) (and the label) on ``mask`` within ``sl``; return the voxel count."""
        if sl is None:
            return 0
        sub = self.hu[sl]
        mask = np.broadcast_to(mask, sub.shape)
        if allowed is not None:
            mask = mask & allowed[sl]
        if only_label is not None:
            mask = mask & (self.lab[sl] == only_label)
        n = int(np.count_nonzero(mask))
        if n == 0:
            return 0
        v = np.broadcast_to(np.asarray(value, dtype=np.float32), sub.shape)[mask] if np.ndim(value) else value
        vals = np.float32(v) if np.ndim(v) == 0 else v
        if sd > 0:
            vals = vals + np.float32(sd) * self.rng.standard_normal(n, dtype=np.float32)
        sub[mask] = vals
        if label is not None:
            self.lab[sl][mask] = label
            lo = [x.start for x in sl]
            hi = [x.stop for x in sl]
            if label in self.lab_box:
                lo0, hi0 = self.lab_box[label]
                lo, hi = [min(a, b) for a, b in zip(lo, lo0)], [max(a, b) for a, b in zip(hi, hi0)]
            self.lab_box[label] = (lo, hi)
        if protect:
            self.protected[sl][mask] = True
        return n


# ----------------------------------------------------------------------------------------------
# subject parameters
# ----------------------------------------------------------------------------------------------
def _sample_params(rng: np.random.Generator, spacing, kind: str) -> dict[str, Any]:
    """Draw every per-subject random parameter (sizes in mm, intensities in HU)."""
    u = rng.uniform
    p: dict[str, Any] = {}
    jit = u(0.9, 1.1)
    p["vox"] = (spacing[0] * jit, spacing[1] * jit, float(spacing[2]))
    bs = u(0.9, 1.08)  # body size
    asp = u(0.9, 1.1)  # AP / LR aspect
    p.update(
        A=_REF["A"] * bs,
        B_ant=_REF["B_ant"] * bs * asp,
        B_post=_REF["B_post"] * bs * asp,
        f_lat=u(12, 32),
        f_ant=u(8, 28),
        f_post=u(10, 26),
        m=u(8, 14),
        bx=u(-8, 8),
        by=u(-12, 6),
    )
    p["s_z"] = 0.5 * bs / 0.99 + 0.5 * u(0.9, 1.1)
    p["top_margin"] = u(20, 50) + (u(0, 90) if kind == "tcia" and u() < 0.5 else 0.0)
    p["bottom_margin"] = u(10, 35)
    p["crest_jit"] = u(-10, 10)
    p["dome_jit"] = u(-8, 8)
    # smooth deformation: per component two separable cosine products, amplitude a few mm (<= 10 mm)
    p["warp"] = [
        [(u(2.5, 5.0) * (1 if u() < 0.5 else -1), u(160, 400, size=3), u(0, 2 * np.pi, size=3)) for _ in range(2)]
        for _ in range(3)
    ]
    # contrast: enhancement factor g (0 = non-contrast), HU values jittered +-8 per organ
    if kind == "tcia" and u() < 0.3:
        g = 0.0
    else:
        g = u(0.85, 1.15) if kind == "btcv" else u(0.6, 1.2)
    p["g"] = g

    def hu(unenh, enh, j=8.0):
        return unenh + (enh - unenh) * g + u(-j, j)

    liver = hu(58, 110)
    p["I"] = dict(
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
    p["noise_sd"] = u(10, 20) if kind == "btcv" else u(10, 25)
    p["blur"] = (u(0.6, 0.9), u(0.55, 0.7))  # in-plane, through-plane sigma (voxels)
    return p


# ----------------------------------------------------------------------------------------------
# the renderer
# ----------------------------------------------------------------------------------------------
def _render(seed: int, shape, spacing, kind: str):
    # independent streams, so that changing one part of the anatomy does not reshuffle the others
    r_par, r_geo, r_bow, r_tex = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    u = r_geo.uniform
    n = r_geo.normal
    P = _sample_params(r_par, spacing, kind)
    I = P["I"]
    nx, ny = int(shape[0]), int(shape[1])
    sx, sy, sz = P["vox"]

    # --- body geometry (mm) ----------------------------------------------------------------
    A, Ba, Bp, f_lat, f_ant, f_post, m = (P[k] for k in ("A", "B_ant", "B_post", "f_lat", "f_ant", "f_post", "m"))
    cav_A, cav_ant, cav_post = A - f_lat - m, Ba - f_ant - m, Bp - f_post - m
    sxs = cav_A / _REF_CAV_A  # lateral scale of the anatomy
    y_vb = -Bp + f_post + m + 50.0 * (cav_post / (_REF["B_post"] - _REF["f_post"] - _REF["m"])) ** 0.5
    sys_ = (cav_ant - y_vb) / (_REF_CAV_ANT - _REF_Y_VB)  # anterior-posterior scale
    szs = P["s_z"]
    s_org = (sxs * sys_ * szs) ** (1.0 / 3.0)  # isotropic organ-size scale

    def X(x_t, y_t, z_t):  # template -> subject anatomical mm
        return (x_t * sxs, y_vb + (y_t - _REF_Y_VB) * sys_, z_t * szs)

    crest = -200.0 * szs + P["crest_jit"]
    z_top = P["top_margin"]
    z_bottom = crest - P["bottom_margin"]
    nz = max(8, int(round((z_top - z_bottom) / sz)))
    cv = _Canvas(nx, ny, nz, P["vox"], P["bx"], P["by"], z_bottom, r_tex, P["warp"])
    xa, ya, za = cv.xa, cv.ya, cv.za
    min_vox = float(max(sx, sy))

    # --- body outline: per-slice superellipses (flatter posteriorly) ---------------------------
    ph = u(0, 2 * np.pi, size=2)
    wob = 1 + 0.03 * np.sin(2 * np.pi * za / 180.0 + ph[0])
    hips = 1 + 0.08 * np.clip((crest + 20 - za) / 60.0, 0, 1)
    Az = A * wob * hips
    Bz = 1 + 0.025 * np.sin(2 * np.pi * za / 150.0 + ph[1])

    # rho = gx(x, z) + gy(y, z) <= 1 per layer (body, muscle wall, abdominal cavity); filled row by row
    sxz = (wob * hips).astype(np.float32)[None, :]
    syz = Bz.astype(np.float32)[None, :]
    ypos = (ya >= 0)[:, None]
    yabs = np.abs(ya)[:, None]
    layers = []
    for a_, b1, b2 in ((A, Ba, Bp), (A - f_lat, Ba - f_ant, Bp - f_post), (cav_A, cav_ant, cav_post)):
        gx = (xa[:, None] / (np.float32(a_) * sxz)) ** 2  # (nx, nz)
        yn = np.where(ypos, yabs / (np.float32(b1) * syz), yabs / (np.float32(b2) * syz))
        gy = np.where(ypos, yn * yn, yn ** np.float32(2.6))  # (ny, nz)
        layers.append((gx.astype(np.float32), gy.astype(np.float32)))
    body = np.empty(cv.shape, dtype=bool)
    wall = np.empty(cv.shape, dtype=bool)
    cavity = np.empty(cv.shape, dtype=bool)
    hu = cv.hu
    v_air, v_sub, v_mus, v_vis = (np.float32(v) for v in (I["air"], I["subfat"], I["muscle"], I["visfat"]))
    for i in range(nx):
        for arr, (gx, gy) in zip((body, wall, cavity), layers):
            np.less_equal(gx[i][None, :] + gy, 1, out=arr[i])
        hu[i] = np.where(cavity[i], v_vis, np.where(wall[i], v_mus, np.where(body[i], v_sub, v_air)))
    np.logical_not(cavity, out=cv.protected)

    # CT table: a shallow curved plate under the patient
    yt0 = -Bp * float(Bz.min()) - u(2, 10)
    ytab = yt0 + 0.0006 * xa**2
    tab2d = (ya[None, :] <= ytab[:, None]) & (ya[None, :] > ytab[:, None] - 6.0) & (np.abs(xa)[:, None] < 0.42 * nx * sx)
    hu[tab2d] = np.float32(I["table"])  # (broadcast over z)

    # diaphragm height map (mm), lower laterally and posteriorly
    xr = xa[:, None] / cav_A
    yr = ya[None, :] / cav_ant
    zd = (-4.0 + 5.0 * np.tanh(xa[:, None] / 40.0) - 28.0 * xr**2 - 32.0 * (yr - 0.15) ** 2) * szs + P["dome_jit"]
    zd = zd.astype(np.float32)
    below = za[None, None, :] < zd[:, :, None]
    allowed_abd = cavity & below  # updated below once muscles / bones are protected

    # --- bowel: colon (air-fluid levels, faeces) and small-bowel loops (unlabeled) ------------
    def hollow(sl, q, wall_frac, content, content_sd, air_level=None, allowed=None):
        if sl is None:
            return
        inside = q <= 1
        cv.paint(sl, inside, I["bowel_wall"], 8.0, allowed=allowed)
        lumen = q <= wall_frac
        cv.paint(sl, lumen, content, content_sd, allowed=allowed)
        if air_level is not None:
            yy = cv.ya[sl[1]][None, :, None]
            ys = np.nonzero(np.broadcast_to(lumen, q.shape).any(axis=(0, 2)))[0]
            if ys.size:
                ytop = float(cv.ya[sl[1]][ys].max())
                cv.paint(sl, lumen & (yy > ytop - air_level), -900.0, 25.0, allowed=allowed)

    ub = r_bow.uniform
    zc_lo = z_bottom - 20
    for side, (xt, yt, zt_top, r) in {1: (84, -8, -140, 22.0), -1: (-88, -22, -95, 19.0)}.items():
        cx, cy, _ = X(xt, yt, 0)
        rr = r * s_org * ub(0.85, 1.15)
        zz = [zc_lo, (zc_lo + zt_top * szs) / 2, zt_top * szs]
        sl, q, _ = cv.tube(2, zz, [cx, cx + ub(-8, 8), cx], [cy, cy + ub(-8, 8), cy], [rr] * 3, [rr] * 3, warp=1.0)
        hollow(sl, q, (1 - 3.0 / rr) ** 2, ub(-150, 20), 60.0, air_level=ub(8, 30), allowed=allowed_abd)
    xs_ = [X(x, 0, 0)[0] for x in (-86, -40, 0, 40, 84)]
    ys_ = [X(0, y, 0)[1] for y in (40, 62, 58, 60, 45)]
    zs_ = [z * szs for z in (-95, -150, -165, -150, -140)]
    rr = 20.0 * s_org * ub(0.85, 1.15)
    sl, q, _ = cv.tube(0, xs_, ys_, [z + ub(-10, 10) for z in zs_], [rr] * 5, [rr] * 5, warp=1.0)
    hollow(sl, q, (1 - 3.0 / rr) ** 2, ub(-150, 20), 60.0, air_level=ub(5, 25), allowed=allowed_abd)
    # duodenum (C-loop beside the pancreatic head)
    dx_, dy_, _ = X(58, 12, 0)
    sl, q, _ = cv.tube(
        2, [-150 * szs, -120 * szs, -92 * szs], [dx_ - 10, dx_, dx_ - 8], [dy_, dy_ - 4, dy_ + 4], [11] * 3, [11] * 3
    )
    hollow(sl, q, 0.55, I["fluid"], 10.0, allowed=allowed_abd)
    for _ in range(int(r_bow.integers(10, 19))):
        c = X(ub(-80, 80), ub(-5, 80), ub(-245, -115))
        semi = ub(10, 20, size=3) * s_org
        R = _rot(*ub(-90, 90, size=3))
        sl, q = cv.ellipsoid(c, semi, R, warp=1.0)
        kind_b = ub()
        if kind_b < 0.6:
            hollow(sl, q, (1 - 3.0 / semi.min()) ** 2, I["fluid"] + ub(-5, 15), 10.0, allowed=allowed_abd)
        elif kind_b < 0.72:
            hollow(sl, q, (1 - 3.0 / semi.min()) ** 2, -900.0, 25.0, allowed=allowed_abd)
        else:
            cv.paint(sl, q <= 1, I["bowel_wall"] - ub(0, 15), 12.0, allowed=allowed_abd)

    # --- muscles: paraspinal (protected), psoas, iliacus ---------------------------------------
    lord = 0.07 * np.clip(-za - 110 * szs, 0, None) - 0.05 * np.clip(za + 40 * szs, 0, None)
    yv = (y_vb + lord).astype(np.float32)  # vertebral-body centre per slice
    lum = np.clip((-za - 40 * szs) / (160 * szs), 0, 1)
    vrx = ((20 + 5 * lum) * s_org).astype(np.float32)
    vry = ((16 + 3 * lum) * s_org).astype(np.float32)
    cr = 8.5 * s_org  # spinal canal radius
    ring_t = max(5.5, 0.8 * min_vox)
    yc = yv - vry - cr  # canal centre
    sp_len = 24.0 * s_org
    sl = cv.bbox((-70 * sxs, float(yv.min()) - 120, -1e9), (70 * sxs, float(yv.max()) + 40, 1e9))
    Xs, Ys, _ = cv.coords(sl)
    yv3, vrx3, vry3, yc3 = (a[sl[2]][None, None, :] for a in (yv, vrx, vry, yc))
    mus = [((Xs - side * 27 * s_org) / (25 * s_org)) ** 2 + ((Ys - (yc3 - 20 * s_org)) / (22 * s_org)) ** 2 <= 1
           for side in (1, -1)]
    cv.paint(sl, (mus[0] | mus[1]) & wall[sl], I["muscle"], 8.0, protect=True)
    # psoas: grows inferiorly from about L1
    pr = np.clip(4 + 0.2 * (-100 * szs - za), 0, 28) * s_org
    for side in (1, -1):
        pr3 = np.maximum(pr[sl[2]], 1e-3)[None, None, :].astype(np.float32)
        q = ((Xs - side * (vrx3 + 0.8 * pr3)) / pr3) ** 2 + ((Ys - (yv3 + 3)) / (0.9 * pr3)) ** 2
        cv.paint(sl, (q <= 1) & (pr[sl[2]] > 0)[None, None, :], I["muscle"], 8.0, allowed=cavity)

    # --- bones --------------------------------------------------------------------------------
    lev_h = 34.0 * szs
    phase = u(0, lev_h)
    pos = np.mod(za - phase, lev_h)
    disc = pos < 8.0 * szs
    tp = (za < -115 * szs) & (pos > 0.35 * lev_h) & (pos < 0.65 * lev_h)
    qv = (Xs / vrx3) ** 2 + ((Ys - yv3) / vry3) ** 2
    vb = qv <= 1
    disc3 = disc[sl[2]][None, None, :]
    rc2 = Xs**2 + (Ys - yc3) ** 2
    canal = rc2 <= cr**2
    ring = (rc2 <= (cr + ring_t) ** 2) & ~canal
    ys_c = yc3 - cr - ring_t - sp_len / 2 + 3
    spin = (Xs / max(3.5, 0.6 * min_vox)) ** 2 + ((Ys - ys_c) / (sp_len / 2)) ** 2 <= 1
    tproc = tp[sl[2]][None, None, :] & (np.abs(Xs) > cr) & (np.abs(Xs) < 45 * s_org) & (
        np.abs(Ys - yc3) <= max(3.5, 0.6 * min_vox)
    )
    cv.paint(sl, ring | spin | tproc, I["post_elem"], 60.0, protect=True)
    cv.paint(sl, vb & ~disc3, I["cancellous"], 50.0, protect=True)
    cv.paint(sl, vb & ~disc3 & (qv > 0.72), I["cortical"], 60.0, protect=True)
    cv.paint(sl, vb & disc3, I["disc"], 10.0, protect=True)
    cv.paint(sl, canal, I["csf"], 8.0, protect=True)
    del qv, vb, rc2, canal, ring, spin, tproc, mus, Xs, Ys

    # ribs 7-12: oblique bands in the chest wall, descending anteriorly
    Ar, Bra, Brp = cav_A + m / 2, cav_ant + m / 2, cav_post + m / 2
    xn = xa[:, None] / Ar
    yb = np.where(ya[None, :] >= 0, Bra, Brp)
    yn = ya[None, :] / yb
    rr2 = np.sqrt(xn**2 + yn**2)
    th = np.arctan2(np.abs(xn), -yn)
    Rloc = np.sqrt((Ar * np.sin(th)) ** 2 + (yb * np.cos(th)) ** 2)
    band = np.abs(rr2 - 1) * Rloc <= max(4.0, 0.6 * min_vox)
    bi, bj = np.nonzero(band)
    bth = th[bi, bj]
    bside = np.sign(xa[bi])
    rib_z0 = np.array([55, 30, 5, -20, -45, -68]) * szs + u(-10, 10)
    rib_tmax = np.array([0.9, 0.88, 0.85, 0.8, 0.55, 0.38]) * np.pi
    hr = max(6.0, 0.5 * sz)
    for side in (1.0, -1.0):
        for z0, tmax in zip(rib_z0, rib_tmax):
            k = 30.0 * szs * u(0.9, 1.1)
            zt = z0 + u(-4, 4) - k * bth  # rib centre height at each band pixel
            hit = (bside == side)[:, None] & (bth >= 0.1 * np.pi)[:, None] & (bth <= tmax)[:, None]
            hit = hit & (np.abs(zt[:, None] - za[None, :]) <= hr)
            p_i, p_k = np.nonzero(hit)
            if p_i.size == 0:
                continue
            ii, jj = bi[p_i], bj[p_i]
            val = np.where(bth[p_i] > 0.72 * np.pi, I["cartilage"], I["rib"]).astype(np.float32)
            hu[ii, jj, p_k] = val + 50.0 * r_tex.standard_normal(p_i.size, dtype=np.float32)
            cv.protected[ii, jj, p_k] = True

    # pelvis: iliac wings (and iliacus) below the iliac crest
    low = np.nonzero(za < crest)[0]
    for side in (1.0, -1.0):
        cx, cy, _ = X(side * 60, _REF_Y_VB + 40, 0)
        a_w, b_w = 55 * sxs, 60 * sys_
        xn = (xa[:, None] - cx) / a_w
        yn = (ya[None, :] - cy) / b_w
        rr2 = np.sqrt(xn**2 + yn**2)
        phi = np.arctan2(side * xn, -yn)
        Rl = np.sqrt((a_w * np.sin(phi)) ** 2 + (b_w * np.cos(phi)) ** 2)
        t_w = max(4.0, 0.6 * min_vox)
        for k in low:
            d = crest - za[k]
            w = min(0.45 * np.pi, 0.12 * np.pi + 0.015 * np.pi * d)
            arc = (phi >= 0.3 * np.pi - w) & (phi <= 0.3 * np.pi + w)
            ili = arc & (rr2 < 1) & (rr2 > 0.45) & (phi >= 0) & (phi <= 0.55 * np.pi) & cavity[:, :, k]
            cv.paint((slice(None), slice(None), slice(k, k + 1)), ili[:, :, None], I["muscle"], 8.0)
            wing = arc & (np.abs(rr2 - 1) * Rl <= t_w) & body[:, :, k]
            cv.paint((slice(None), slice(None), slice(k, k + 1)), wing[:, :, None], I["rib"], 60.0, protect=True)

    # --- thorax: diaphragm, lungs, mediastinum, heart -----------------------------------------
    k0 = int(np.searchsorted(za, zd.min()))
    if k0 < nz:
        th_sl = (slice(None), slice(None), slice(k0, nz))
        zz = za[k0:][None, None, :]
        zdd = zd[:, :, None]
        # posterior/middle mediastinum (fat around the aorta, oesophagus and spine)
        med = (xa[:, None] / (38 * sxs)) ** 2 + ((ya[None, :] - (y_vb + 22 * sys_)) / (52 * sys_)) ** 2 <= 1
        cav_t = cavity[th_sl] & ~cv.protected[th_sl]
        cv.paint(th_sl, cav_t & (zz >= zdd) & (zz < zdd + 5.0), I["muscle"], 8.0)
        lung = cav_t & (zz >= zdd + 5.0) & ~med[:, :, None]
        cv.paint(th_sl, lung, I["lung"], 25.0)
        # a few pulmonary vessels (unlabeled soft-tissue rods inside the lungs)
        lidx = np.flatnonzero(lung)
        if lidx.size:
            for f in lidx[r_bow.integers(0, lidx.size, int(r_bow.integers(20, 40)))]:
                i, j, k = np.unravel_index(f, lung.shape)
                rv = r_bow.uniform(1.5, 3.5)
                sl, q = cv.ellipsoid((xa[i], ya[j], za[k0 + k]), (rv, rv, 4 * rv), _rot(*r_bow.uniform(-60, 60, 3)), warp=0)
                if sl is not None:
                    cv.paint(sl, (q <= 1) & (cv.hu[sl] < -500), I["heart"] - 40, 10.0)
        del cav_t, lung, lidx
    sl, q = cv.ellipsoid(X(-15, 35, 40), np.array([65, 50, 55]) * s_org * u(0.9, 1.1), _rot(0, 0, u(-15, 15)), warp=0)
    if sl is not None:
        cv.paint(sl, (q <= 1) & ~below[sl] & cavity[sl] & ~cv.protected[sl], I["heart"], 15.0)

    allowed_abd = cavity & below & ~cv.protected
    allowed_all = cavity & ~cv.protected

    # --- unlabeled vessels: SMA, SMV, iliac arteries, left renal vein ---------------------------
    def vtube(axis, pts, r, value, warp=0.5, label=None, allowed=allowed_all, sd=8.0, min_semi=0.0):
        pts = np.asarray(pts, dtype=np.float64)
        order = np.argsort(pts[:, axis])
        pts = pts[order]
        o1, o2 = [a for a in range(3) if a != axis]
        r = np.broadcast_to(np.asarray(r, dtype=np.float64), (len(pts), 2))[order]
        sl, q, _ = cv.tube(axis, pts[:, axis], pts[:, o1], pts[:, o2], r[:, 0], r[:, 1], warp=warp, min_semi=min_semi)
        if sl is not None:
            cv.paint(sl, q <= 1, value, sd, label=label, allowed=allowed)
        return sl, q

    vtube(2, [X(-4, 8, -95), X(-4, 22, -130), X(-2, 32, -180), X(0, 34, -240)], (4.0, 4.0), I["aorta"])
    vtube(2, [X(11, 16, -105), X(12, 26, -140), X(12, 36, -180), X(14, 38, -240)], (5.5, 5.5), I["portal"])
    bif = -190 * szs + u(-10, 10)
    for side in (1, -1):
        vtube(2, [X(side * 8, 2, bif / szs + 5), X(side * 25, -2, bif / szs - 30), X(side * 48, -10, bif / szs - 80)],
              (6.0, 6.0), I["aorta"])
    vtube(0, [X(-48, -20, -124), X(-12, 10, -120), X(22, -2, -118)], (5.0, 4.0), I["ivc_hi"])

    # --- labeled organs ---------------------------------------------------------------------------
    def J(scale=1.0):  # position jitter (mm) for a group
        return np.array([n(0, 5.0 * scale), n(0, 5.0 * scale), n(0, 8.0 * scale)])

    g_liver, g_luq, g_rk, g_lk, g_pan = J(), J(), J(), J(), J()
    sz_j = {k: u(0.85, 1.15) * s_org for k in range(1, 14)}

    def ax3(v):
        return np.asarray(v, dtype=np.float64) * u(0.95, 1.05, size=3)

    painters: dict[int, Callable[[float, bool], None]] = {}
    MS = _MIN_SEMI_VOX

    # 6 liver: right lobe + left lobe, below the diaphragm; hepatic veins inside (still label 6)
    liv_c = np.array(X(70, 5, -60)) + g_liver
    liv_s = ax3([75, 95, 80]) * sz_j[6]
    liv_R = _rot(u(-6, 6), u(-6, 6), u(-8, 8))
    ll_c = np.array(X(-5, 55, -30)) + g_liver + J(0.4)
    ll_s = ax3([62, 30, 42]) * sz_j[6]
    ll_R = _rot(u(-8, 8), u(-10, 10), u(-15, 15))
    hv = [
        (0, [(22, 0, -12), (55, 5, -30), (90, 15, -45)]),
        (1, [(25, 2, -14), (35, 30, -35), (40, 60, -55)]),
        (0, [(-20, 40, -35), (5, 20, -25), (18, 4, -14)]),
        (0, [(30, 10, -95), (60, 18, -85), (85, 25, -80)]),
    ]

    # hepatic veins: vessel HU inside the liver, label stays 6
    def paint_hepatic_veins():
        for axis, pts in hv:
            pts = np.asarray([np.array(X(*pt)) + g_liver for pt in pts])
            order = np.argsort(pts[:, axis])
            pts = pts[order]
            o1, o2 = [a for a in range(3) if a != axis]
            rv = 4.5 * s_org
            sl, q, _ = cv.tube(axis, pts[:, axis], pts[:, o1], pts[:, o2], [rv] * 3, [rv] * 3, warp=1.0)
            if sl is not None:
                cv.paint(sl, q <= 1, I["ivc_hi"] - 5, 8.0, only_label=6)

    def paint_liver(scale=1.0, force=False):
        al = None if force else allowed_abd
        for c, s, R, p_ in ((liv_c, liv_s, liv_R, 2.4), (ll_c, ll_s, ll_R, 2.0)):
            sl, q = cv.ellipsoid(c, s * scale, R, p=p_, warp=1.0, min_semi=MS)
            cv.paint(sl, q <= 1, I["liver"], 8.0, label=6, allowed=al)

    painters[6] = paint_liver

    # 1 spleen: long axis tangent to the posterolateral wall
    sp_c = np.array(X(-90, -38, -55)) + g_luq + J(0.4)
    nrm = np.array([sp_c[0] / cav_A**2, sp_c[1] / cav_post**2])
    nrm /= np.linalg.norm(nrm) + 1e-9
    sp_R = _rot(0, 0, math.degrees(math.atan2(nrm[1], nrm[0]))) @ _rot(u(-15, 15), u(-10, 10), 0)
    sp_s = ax3([24, 52, 50]) * sz_j[1]

    def paint_spleen(scale=1.0, force=False):
        sl, q = cv.ellipsoid(sp_c, sp_s * scale, sp_R, p=2.2, warp=1.0, min_semi=MS)
        cv.paint(sl, q <= 1, I["spleen"], 8.0, label=1, allowed=None if force else allowed_abd)

    painters[1] = paint_spleen

    # 7 stomach: fundus/body along z + antrum along x; wall, fluid contents, anterior gas cap
    st_off = g_luq + J(0.5)
    ss7 = sz_j[7]
    st1 = np.array([X(-45, -15, 8), X(-50, -5, -20), X(-52, 15, -50), X(-48, 30, -80), X(-36, 42, -106)]) + st_off
    st1_r = np.array([[26, 26], [38, 38], [35, 32], [30, 26], [24, 22]]) * ss7
    st2 = np.array([X(-46, 40, -100), X(-20, 48, -108), X(10, 50, -110), X(35, 40, -100)]) + st_off
    st2_r = np.array([[22, 22], [20, 20], [16, 15], [9, 9]]) * ss7
    gas_depth = u(6, 25) if u() < 0.85 else 0.0
    sto_content = I["sto_content"]

    def paint_stomach(scale=1.0, force=False):
        al = None if force else allowed_abd
        lum_y = []
        parts = []
        for axis, pts, rr in ((2, st1, st1_r), (0, st2, st2_r)):
            o1, o2 = [a for a in range(3) if a != axis]
            rr = rr * scale
            sl, q, _ = cv.tube(axis, pts[:, axis], pts[:, o1], pts[:, o2], rr[:, 0], rr[:, 1], warp=1.0, min_semi=MS)
            if sl is None:
                continue
            wf = (1 - 4.0 / float(rr.mean())) ** 2
            cv.paint(sl, q <= 1, I["sto_wall"], 8.0, label=7, allowed=al)
            cv.paint(sl, q <= wf, sto_content, 8.0, label=7, allowed=al)
            parts.append((sl, q, wf))
            ys = np.nonzero(np.broadcast_to(q <= wf, q.shape).any(axis=(0, 2)))[0]
            if ys.size:
                lum_y.append(float(cv.ya[sl[1]][ys].max()))
        if gas_depth > 0 and lum_y:
            ylev = max(lum_y) - gas_depth
            for sl, q, wf in parts:
                yy = cv.ya[sl[1]][None, :, None]
                cv.paint(sl, (q <= wf) & (yy > ylev), -900.0, 25.0, label=7, allowed=al)

    painters[7] = paint_stomach

    # 2 / 3 kidneys: cortex, medulla, sinus
    def kidney(label, side, c_t, g):
        c = np.array(X(*c_t)) + g + J(0.3)
        s = ax3([28, 22, 55]) * sz_j[label]
        R = _rot(u(5, 15), side * -u(8, 16), side * -u(20, 40))
        hil = c + R @ np.array([-side * 0.55 * s[0], 0, 0])
        ctx, med, sin_ = I["cortex"] + u(-5, 5), I["medulla"] + u(-5, 5), I["sinus"]

        def paint(scale=1.0, force=False):
            al = None if force else allowed_abd
            sl, q = cv.ellipsoid(c, s * scale, R, warp=0.5, min_semi=MS)
            cv.paint(sl, q <= 1, ctx, 8.0, label=label, allowed=al)
            cv.paint(sl, q <= 0.5, med, 8.0, label=label, allowed=al)
            sl2, q2 = cv.ellipsoid(hil, s * scale * np.array([0.4, 0.35, 0.4]), R, warp=0.5)
            cv.paint(sl2, q2 <= 1, sin_, 10.0, only_label=label)

        return paint

    painters[2] = kidney(2, 1, (70, -38, -145), g_rk)
    painters[3] = kidney(3, -1, (-70, -35, -130), g_lk)

    # 11 pancreas: head (right) -> tail (splenic hilum), anterior to the aorta and splenic vein
    pan_pts = np.array(
        [X(46, 12, -124), X(30, 16, -116), X(8, 24, -104), X(-20, 20, -100), X(-50, 4, -94), X(-78, -18, -84)]
    ) + g_pan
    pan_r = np.array([[10, 12], [16, 20], [9, 11], [11, 11], [10, 10], [7, 8]]) * sz_j[11]
    pan_r[0] = pan_r[0] * 0.6

    def paint_pancreas(scale=1.0, force=False):
        rr = pan_r * scale
        sl, q, _ = cv.tube(0, pan_pts[:, 0], pan_pts[:, 1], pan_pts[:, 2], rr[:, 0], rr[:, 1], warp=1.0, min_semi=MS)
        cv.paint(sl, q <= 1, I["pancreas"], 14.0, label=11, allowed=None if force else allowed_abd)

    painters[11] = paint_pancreas

    # 4 gallbladder: at the inferior surface of the liver, fundus anterior-inferior
    gb_c = np.array(X(45, 55, -118)) + g_liver + J(0.4)
    gb_s = ax3([15, 16, 32]) * sz_j[4]
    gb_R = _rot(u(25, 45), u(-10, 10), u(-25, 25))

    def paint_gall(scale=1.0, force=False):
        sl, q = cv.ellipsoid(gb_c, gb_s * scale, gb_R, p=2.0, warp=1.0, min_semi=MS)
        cv.paint(sl, q <= 1, I["gall"], 6.0, label=4, allowed=None if force else allowed_abd)

    painters[4] = paint_gall

    # 10 portal + splenic vein: liver hilum -> confluence behind the pancreatic neck -> splenic hilum
    pv_pts = np.array(
        [X(52, 6, -82), X(28, 8, -94), X(6, 10, -104), X(-22, 7, -100), X(-55, -8, -92), X(-86, -30, -80)]
    ) + (g_pan + g_liver) / 2
    pv_r = np.array([6.5, 7.0, 7.0, 5.0, 4.5, 4.0]) * (sz_j[10] ** 0.5) * s_org**0.5

    def paint_veins(scale=1.0, force=False):
        rr = pv_r * scale
        sl, q, _ = cv.tube(0, pv_pts[:, 0], pv_pts[:, 1], pv_pts[:, 2], rr, rr, warp=1.0, min_semi=MS)
        cv.paint(sl, q <= 1, I["portal"], 8.0, label=10, allowed=None if force else allowed_all)

    painters[10] = paint_veins

    # 9 IVC: right of the aorta, flattened, into the liver's bare area; brighter above the renal veins
    iv_pts = np.array([X(22, -5, -260), X(24, -3, -150), X(26, 0, -100), X(26, 2, -60), X(20, 5, -20), X(15, 5, 6)])
    iv_pts += np.array([n(0, 2), n(0, 2), 0])
    iv_r = np.array([[13, 9], [13, 9], [14, 10], [13, 11], [12, 11], [8, 8]]) * u(0.9, 1.1) * s_org**0.5
    ivc_val = np.where(za < -120 * szs, I["ivc_lo"], I["ivc_hi"]).astype(np.float32)[None, None, :]

    def paint_ivc(scale=1.0, force=False):
        rr = iv_r * scale
        sl, q, _ = cv.tube(2, iv_pts[:, 2], iv_pts[:, 0], iv_pts[:, 1], rr[:, 0], rr[:, 1], warp=0.3, min_semi=MS)
        if sl is not None:
            cv.paint(sl, q <= 1, ivc_val[:, :, sl[2]], 8.0, label=9, allowed=None if force else allowed_all)

    painters[9] = paint_ivc

    # 8 aorta: descending, left anterolateral to the spine, ends at the bifurcation
    ao_pts = np.array([X(-30, -15, 120), X(-28, -14, 40), X(-20, -8, -20), X(-14, -2, -60), X(-11, 0, -120)])
    ao_pts = np.vstack([ao_pts, [X(-10, 2, -165)], [(X(-10, 2, 0)[0], X(-10, 2, 0)[1], bif)]])
    ao_pts += np.array([n(0, 2), n(0, 2), 0])
    ao_r = np.array([12, 12, 11.5, 11, 10, 9, 7]) * u(0.9, 1.1) * s_org**0.5

    def paint_aorta(scale=1.0, force=False):
        rr = ao_r * scale
        order = np.argsort(ao_pts[:, 2])
        p_ = ao_pts[order]
        sl, q, _ = cv.tube(2, p_[:, 2], p_[:, 0], p_[:, 1], rr[order], rr[order], warp=0.3, min_semi=MS)
        cv.paint(sl, q <= 1, I["aorta"], 8.0, label=8, allowed=None if force else allowed_all)

    painters[8] = paint_aorta

    # 5 esophagus: mediastinum -> gastro-oesophageal junction; sometimes a small air lumen
    es_pts = np.array([X(-36, 12, -34), X(-25, 10, -20), X(-15, 5, 0), X(-8, 0, 40), X(-5, -2, 130)]) + np.array(
        [n(0, 2), n(0, 2), 0]
    ) + np.array([st_off[0] * 0.5, st_off[1] * 0.5, 0])
    es_r = np.array([[6, 6], [8, 7], [9, 7], [9, 7], [9, 7]]) * u(0.85, 1.15) * s_org**0.5
    es_air = u() < 0.4

    def paint_eso(scale=1.0, force=False):
        rr = es_r * scale
        sl, q, _ = cv.tube(2, es_pts[:, 2], es_pts[:, 0], es_pts[:, 1], rr[:, 0], rr[:, 1], warp=0.3, min_semi=MS)
        al = None if force else allowed_all
        cv.paint(sl, q <= 1, I["eso"], 8.0, label=5, allowed=al)
        if es_air and sl is not None:
            cv.paint(sl, q <= (2.5 / float(rr.mean())) ** 2, -900.0, 30.0, label=5, allowed=al)

    painters[5] = paint_eso

    # 12 / 13 adrenals: thin plates superomedial to the kidneys (right one behind the IVC)
    def adrenal(label, c_t, g, ang):
        c = np.array(X(*c_t)) + g + J(0.3)
        s = ax3([4, 16, 15]) * sz_j[label]
        R = _rot(u(-10, 10), u(-10, 10), ang)

        def paint(scale=1.0, force=False):
            sl, q = cv.ellipsoid(c, s * scale, R, warp=0.5, min_semi=MS)
            cv.paint(sl, q <= 1, I["adrenal"], 8.0, label=label, allowed=None if force else allowed_abd)

        return paint

    painters[12] = adrenal(12, (33, -20, -84), g_rk, u(50, 80))
    painters[13] = adrenal(13, (-35, -18, -80), g_lk, u(100, 130))

    order = (6, 1, 7, 2, 3, 11, 4, 10, 9, 8, 5, 12, 13)
    for lbl in order:
        painters[lbl](1.0, False)
        if lbl == 6:
            paint_hepatic_veins()

    # every organ must be present: enlarge (then ignore the anatomical clipping) if needed
    tries = dict.fromkeys(order, 0)
    for _ in range(6):
        missing = [lbl for lbl in order if cv.label_count(lbl) < _MIN_ORGAN_VOXELS]
        if not missing:
            break
        for lbl in missing:
            tries[lbl] += 1
            painters[lbl](1.3 ** tries[lbl], tries[lbl] >= 3)

    # --- image formation -----------------------------------------------------------------------
    del body, wall, cavity, below, allowed_abd, allowed_all
    cv.protected = None
    # sigma 0.6-0.9 voxel (0.55-0.7 through-plane) up to 3 mm (5 mm) voxels; for coarser voxels it shrinks so
    # that the physical blur stays <= ~2.7 mm (4 mm) and thin structures are not washed out
    sig_xy = P["blur"][0] * min(1.0, 3.0 / max(sx, sy))
    sig_z = P["blur"][1] * min(1.0, 5.0 / sz)
    img = cv.hu
    ndimage.gaussian_filter(img, sigma=(sig_xy, sig_xy, sig_z), truncate=3.0, output=img)  # in place
    sd = np.float32(P["noise_sd"])
    rows = max(1, (1 << 20) // (ny * nz))  # add the noise in ~4 MB blocks of X rows
    buf = np.empty((rows, ny, nz), dtype=np.float32)
    for i0 in range(0, nx, rows):
        b = buf[: min(rows, nx - i0)]
        r_tex.standard_normal(dtype=np.float32, out=b)
        b *= sd
        img[i0 : i0 + rows] += b
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    image = img.astype(np.int16)
    cv.hu = None

    # RAS+ affine, positive diagonal, plausible scanner origin
    aff = np.diag([sx, sy, sz, 1.0]).astype(np.float64)
    aff[0, 3] = -(nx - 1) / 2.0 * sx + u(-10, 10)
    aff[1, 3] = -(ny - 1) / 2.0 * sy + u(-30, 30)
    aff[2, 3] = -u(300, 700)
    return image, cv.lab, aff


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
    """Paint one synthetic contrast-enhanced abdominal CT.

    seed: any non-negative int (the whole subject is a deterministic function of it).
    shape: in-plane voxels (X, Y); the number of slices varies per subject (z field of view ~200-300 mm).
    spacing: nominal voxel size in mm (sx, sy, sz); in-plane spacing is jittered +-10% per subject.
    kind: "btcv" (portal-venous contrast) or "tcia" (more variable: some non-contrast, some more lung).
    Returns (image int16 HU [X,Y,Z], label uint8 [X,Y,Z] with values 0..13 or None, affine 4x4 float64 RAS+).
    """
    if kind not in ("btcv", "tcia"):
        raise ValueError(f"kind={kind!r}; expected 'btcv' or 'tcia'")
    if len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"shape={shape!r}; expected two in-plane sizes >= 8 voxels")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={spacing!r}; expected three positive sizes in mm")
    image, label, affine = _render(int(seed), tuple(int(s) for s in shape), tuple(float(s) for s in spacing), kind)
    return image, (label if with_label else None), affine


def _subject_seed(seed: int, stream: int, index: int) -> int:
    """Independent per-subject seed (stream 0: unlabeled, 1: labeled)."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream), int(index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _save_nifti_atomic(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _make_one(task: tuple) -> str:
    """Worker: generate and write one subject. task = (seed, shape, spacing, kind, image_path, label_path)."""
    seed, shape, spacing, kind, img_path, lab_path = task
    image, label, affine = generate_subject(seed, shape, spacing, with_label=lab_path is not None, kind=kind)
    _save_nifti_atomic(image, affine, Path(img_path))
    if lab_path is not None:
        _save_nifti_atomic(label, affine, Path(lab_path))
    return img_path


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
) -> dict:
    """Write (or reuse) a synthetic TCIA-like + BTCV-like cohort under ``root``.

    n_unlabeled: unlabeled volumes in total, the last ``n_unlabeled_val`` of which form the validation split.
    n_labeled_train / n_labeled_val: labeled subjects (img0001.. training first, validation after).
    train_sizes: for each N a ``btcv/dataset_0_init_{N}.json`` with the first N training subjects (nested)
    and the shared validation list. shape: in-plane voxels; spacing: nominal voxel size (mm).
    A complete ``root/cohort.json`` with identical parameters and all files present means reuse (unless
    overwrite); otherwise the ``tcia/`` and ``btcv/`` folders of a previous cohort are replaced (nothing else
    under ``root`` is touched). ``workers`` > 1 writes
    subjects in parallel processes.
    Returns {"root", "tcia_root", "tcia_json", "btcv_root", "btcv_json": {N: path}, "reused"} (str paths).
    """
    root = Path(root)
    sizes = sorted({int(s) for s in train_sizes})
    if n_unlabeled < 1 or not 0 <= n_unlabeled_val < n_unlabeled:
        raise ValueError(f"need n_unlabeled >= 1 and 0 <= n_unlabeled_val < n_unlabeled, got {n_unlabeled}, {n_unlabeled_val}")
    if n_labeled_train < 1 or n_labeled_val < 0:
        raise ValueError(f"need n_labeled_train >= 1 and n_labeled_val >= 0, got {n_labeled_train}, {n_labeled_val}")
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
    }
    tcia_root, btcv_root = root / "tcia", root / "btcv"
    tcia_json = tcia_root / "dataset_split.json"
    btcv_json = {N: btcv_root / f"dataset_0_init_{N}.json" for N in sizes}
    unl = [f"data/volume-synth-{i:04d}.nii.gz" for i in range(n_unlabeled)]
    n_lab = n_labeled_train + n_labeled_val
    lab_entries = [{"image": f"imagesTr/img{j:04d}.nii.gz", "label": f"labelsTr/label{j:04d}.nii.gz"} for j in range(1, n_lab + 1)]
    result = {
        "root": str(root),
        "tcia_root": str(tcia_root),
        "tcia_json": str(tcia_json),
        "btcv_root": str(btcv_root),
        "btcv_json": {N: str(p) for N, p in btcv_json.items()},
        "reused": False,
    }
    meta_path = root / "cohort.json"
    all_files = [tcia_json, *btcv_json.values(), *(tcia_root / p for p in unl)]
    all_files += [btcv_root / e[k] for e in lab_entries for k in ("image", "label")]

    old = None
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
    if not overwrite and old == {**params, "complete": True} and all(p.exists() for p in all_files):
        result["reused"] = True
        return result

    # (re)generate: drop a previous cohort's folders only if this module made them (cohort.json present)
    if meta_path.exists():
        for d in (tcia_root, btcv_root):
            if d.is_dir():
                shutil.rmtree(d)
    root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic({**params, "complete": False}, meta_path)  # marks tcia/ and btcv/ as ours
    (tcia_root / "data").mkdir(parents=True, exist_ok=True)
    (btcv_root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (btcv_root / "labelsTr").mkdir(parents=True, exist_ok=True)

    shp, spc = tuple(params["shape"]), tuple(params["spacing"])
    tasks = [(_subject_seed(seed, 0, i), shp, spc, "tcia", str(tcia_root / p), None) for i, p in enumerate(unl)]
    tasks += [
        (_subject_seed(seed, 1, j), shp, spc, "btcv", str(btcv_root / e["image"]), str(btcv_root / e["label"]))
        for j, e in enumerate(lab_entries)
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

    split = {
        "training": [{"image": p} for p in unl[: n_unlabeled - n_unlabeled_val]],
        "validation": [{"image": p} for p in unl[n_unlabeled - n_unlabeled_val :]],
    }
    _write_json_atomic(split, tcia_json)
    labels = {"0": "background", **{str(k): v for k, v in ORGANS.items()}}
    train, val = lab_entries[:n_labeled_train], lab_entries[n_labeled_train:]
    for N, path in btcv_json.items():
        _write_json_atomic(
            {
                "description": "synthetic btcv-like cohort",
                "labels": labels,
                "modality": {"0": "CT"},
                "name": "btcv-synthetic",
                "tensorImageSize": "3D",
                "numTraining": N,
                "training": train[:N],
                "validation": val,
            },
            path,
        )
    _write_json_atomic({**params, "complete": True}, meta_path)  # last: the cohort is complete
    return result


def make_cohort_from_config(cfg: dict, root: str | os.PathLike, **kw: Any) -> dict:
    """``make_synthetic_dataset`` with sizes from a config: synth_unlabeled (total incl. validation),
    synth_unlabeled_val, synth_labeled_train, synth_labeled_val, synth_train_sizes, synth_shape (voxels),
    synth_spacing (mm), synth_seed. Keyword arguments (overwrite, progress, workers, ...) override."""
    args = dict(
        n_unlabeled=int(cfg["synth_unlabeled"]),
        n_unlabeled_val=int(cfg["synth_unlabeled_val"]),
        n_labeled_train=int(cfg["synth_labeled_train"]),
        n_labeled_val=int(cfg["synth_labeled_val"]),
        train_sizes=tuple(cfg["synth_train_sizes"]),
        shape=tuple(cfg["synth_shape"]),
        spacing=tuple(cfg["synth_spacing"]),
        seed=int(cfg.get("synth_seed", 0)),
    )
    args.update(kw)
    return make_synthetic_dataset(root, **args)
