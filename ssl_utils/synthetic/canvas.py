"""The canvas the synthetic anatomy is painted on: voxel-grid geometry helpers and ``_Canvas``, whose
primitives (ellipsoids, tubes, boxes, ...) paint HU values and labels into the volume of one subject."""

from __future__ import annotations

import math

import numpy as np
from scipy.interpolate import PchipInterpolator

_RIGHT = 1.0  # +1: the patient's right lies at increasing X index (RAS+ with a positive affine diagonal)


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
