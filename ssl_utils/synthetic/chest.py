"""The chest renderer ("chest": TCIA-Covid19-like non-contrast chest CT, unlabeled): its parameters and
scene, the chest wall, spine, ribs, sternum, shoulder girdle, lungs with vessel and airway trees, heart,
great vessels and COVID-19-like opacities, in the order of ``_CHEST_PAINTERS``. It reuses the abdominal
scene and a few of its painters, and makes no draw from the abdominal streams."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from dataclasses import replace as _dc_replace
from typing import Any, Callable

import numpy as np
from scipy.interpolate import PchipInterpolator

from .canvas import _Canvas, _rot
from .abdomen import _BodyFrame, _MIN_SEMI_VOX, _Scene, _Spine, _fill_body_layers, _paint_vertebral_column, paint_back_muscles, paint_table


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
