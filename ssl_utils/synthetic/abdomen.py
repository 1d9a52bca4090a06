"""The abdominal renderer ("btcv" labeled, "tcia" unlabeled): subject parameters, the scene (body frame,
spine, shared masks), the unlabeled structures in painting order and the 13 labeled organs (a sampler and a
painter each). The order of every random draw is part of the output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from .canvas import _Box, _Canvas, _other_axes, _rot

_MIN_ORGAN_VOXELS = 10  # every labeled organ gets at least this many voxels
_MIN_SEMI_VOX = 0.75  # minimum organ semi-axis / tube radius, in voxels along that direction
# Reference body for the anatomical template (mm): half-width, anterior / posterior half-depth,
# subcutaneous fat (lateral, anterior, posterior) and muscle-wall thickness. Template coordinates:
# x (+ = patient right), y (+ = anterior), origin at the body centre; z (+ = superior), 0 = liver dome.
_REF = dict(A=150.0, B_ant=120.0, B_post=110.0, f_lat=20.0, f_ant=18.0, f_post=18.0, m=11.0)
_REF_CAV_A = _REF["A"] - _REF["f_lat"] - _REF["m"]  # 119 mm
_REF_CAV_ANT = _REF["B_ant"] - _REF["f_ant"] - _REF["m"]  # 91 mm
_REF_Y_VB = -30.0  # vertebral-body centre, template y (mm)


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
