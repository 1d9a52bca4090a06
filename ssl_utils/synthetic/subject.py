"""One subject: the renderers run and the image formed (blur, noise, int16 HU) with its RAS affine;
``generate_subject``, the public entry point."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .abdomen import _STRUCTURE_PAINTERS, _Scene, _new_scene, _paint_organs
from .chest import _CHEST_PAINTERS, _ChestScene, _new_chest_scene


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
