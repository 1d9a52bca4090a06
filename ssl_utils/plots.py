"""Plots shown inline in the notebooks and saved under ``figures/`` or a run's log folder.

Every function returns the matplotlib ``Figure`` and, when ``path`` is given, also saves it
(PNG, 120 dpi). Sections: data, pre-training, fine-tuning, study.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib.pyplot as plt  # notebooks keep their inline backend; scripts set MPLBACKEND=Agg
import numpy as np


def _save(fig, path: str | None):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


# ============================================================================================
# data
# ============================================================================================


def _pick_slices(label: np.ndarray) -> tuple[int, int]:
    """(axial k, coronal j): the slices with the most labeled voxels (the middle ones if unlabeled)."""
    fg = label > 0
    if not fg.any():
        return label.shape[2] // 2, label.shape[1] // 2
    return int(np.argmax(fg.sum(axis=(0, 1)))), int(np.argmax(fg.sum(axis=(0, 2))))


def _world_to_index(affine: np.ndarray, point: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    idx = np.linalg.solve(np.asarray(affine, float), np.append(point, 1.0))[:3]
    return np.clip(np.round(idx).astype(int), 0, np.asarray(shape) - 1)


def _extent(affine: np.ndarray, shape: Sequence[int], axes: tuple[int, int]) -> tuple[float, float, float, float]:
    """imshow extent in world mm of a slice spanning array ``axes`` (axis-aligned affine)."""
    out: list[float] = []
    for a in axes:
        step, origin = affine[a, a], affine[a, 3]
        ends = sorted((origin - step / 2, origin + step * (shape[a] - 0.5)))
        out += ends
    return out[0], out[1], out[2], out[3]


def plot_subject_views(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    tf_image: np.ndarray,
    tf_label: np.ndarray,
    tf_affine: np.ndarray,
    window: tuple[float, float] = (-175.0, 250.0),
    names: dict[int, str] | None = None,
    tf_description: str = "after the transforms",
    title: str | None = None,
    path: str | None = None,
):
    """A labeled CT volume as stored and after a transform chain: axial and coronal slices with
    the organ labels overlaid (one colour per organ), on one millimetre scale per column.

    ``image`` (HU) / ``label`` ``[X, Y, Z]`` with its 4x4 ``affine`` (mm, axis-aligned RAS);
    ``tf_image`` (the chain's output, e.g. window-scaled to [0, 1]) / ``tf_label`` with
    ``tf_affine`` (leading channel axes are dropped). The stored slices are the axial and coronal
    ones with the most labeled voxels; the transformed slices pass through the same point in
    space. Radiological convention: the patient's right on the viewer's left.
    """
    from matplotlib.patches import Patch

    image, label, tf_image, tf_label = (_volume(v) for v in (image, label, tf_image, tf_label))
    label, tf_label = label.round().astype(int), tf_label.round().astype(int)
    affine, tf_affine = np.asarray(affine, float), np.asarray(tf_affine, float)
    k, j = _pick_slices(label)
    point = (affine @ np.array([(label.shape[0] - 1) / 2, j, k, 1.0]))[:3]
    _, tj, tk = _world_to_index(tf_affine, point, tf_image.shape)
    n_classes = int(max(label.max(), tf_label.max(), 13)) + 1
    cmap = label_colormap(n_classes)
    rows = [
        ("as stored", image, label, affine, (k, j), window, f"HU, window [{window[0]:g}, {window[1]:g}]"),
        (tf_description, tf_image, tf_label, tf_affine, (tk, tj), (0.0, 1.0), "intensity 0..1"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.6), sharex="col")
    shown: set[int] = set()
    for r, (what, img, lab, aff, (kk, jj), (lo, hi), scale) in enumerate(rows):
        size = " x ".join(f"{v:.2g}" for v in np.linalg.norm(aff[:3, :3], axis=0))
        views = [
            ("axial", img[:, :, kk], lab[:, :, kk], (0, 1), f"z = {kk}"),
            ("coronal", img[:, jj, :], lab[:, jj, :], (0, 2), f"y = {jj}"),
        ]
        for c, (plane, sl, ov, ax_pair, where) in enumerate(views):
            ax = axes[r, c]
            ext = _extent(aff, img.shape, ax_pair)
            ax.imshow(sl.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=ext, interpolation="nearest")
            ax.imshow(np.ma.masked_equal(ov.T, 0), cmap=cmap, vmin=0, vmax=n_classes - 1, origin="lower", extent=ext,
                      interpolation="nearest", alpha=0.45)
            shown |= set(np.unique(ov).tolist())
            ax.set_title(f"{what}: {plane} slice {where}\n{img.shape[0]}x{img.shape[1]}x{img.shape[2]} voxels of "
                         f"{size} mm, {scale}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_ylabel("mm", fontsize=8)
            box = dict(facecolor="black", edgecolor="none", alpha=0.7, pad=1.5)
            ax.text(0.02, 0.03, "R", color="w", transform=ax.transAxes, fontsize=10, weight="bold", bbox=box)
            ax.text(0.98, 0.03, "L", color="w", transform=ax.transAxes, fontsize=10, weight="bold", ha="right", bbox=box)
    for c, (a, b) in enumerate(((0, 1), (0, 2))):  # one mm scale per column, right of the patient on the left
        e = _extent(affine, image.shape, (a, b))
        axes[0, c].set_xlim(e[1], e[0])
        for r in range(2):
            axes[r, c].set_ylim(e[2], e[3])
            axes[r, c].set_aspect("equal")
    present = sorted(shown - {0})
    handles = [Patch(color=cmap(v), alpha=0.7, label=(names or {}).get(v, f"label {v}")) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    return _save(fig, path)


def plot_ct_windows(
    image: np.ndarray,
    affine: np.ndarray,
    windows: Sequence[tuple[str, float, float]] = (("wide window", -1000.0, 400.0), ("pre-training window", -57.0, 164.0)),
    title: str | None = None,
    path: str | None = None,
):
    """An unlabeled CT volume (HU ``[X, Y, Z]`` with its affine) in several HU windows: one row per
    window, an axial slice through the middle of the volume and a coronal one, in the radiological
    display (patient's right on the viewer's left, anterior / superior up) on a millimetre scale.
    ``windows``: ``(name, low HU, high HU)``; values outside a window are clipped to its ends,
    which is what ``ScaleIntensityRanged(..., clip=True)`` does to the network's input."""
    image = _volume(image)
    ras = to_ras(image, affine)
    vox = _ras_zooms(affine)
    k, j = ras.shape[2] // 2, ras.shape[1] // 2
    axial = radiological_axial(ras, k)
    coronal = ras[::-1, j, :].T[::-1]  # rows superior -> inferior, columns patient right -> left
    fig, axes = plt.subplots(len(windows), 2, figsize=(9, 4.3 * len(windows)), squeeze=False)
    for r, (name, lo, hi) in enumerate(windows):
        for c, (plane, sl, aspect, where) in enumerate((("axial", axial, vox[1] / vox[0], f"slice {k} of {ras.shape[2]}"),
                                                        ("coronal", coronal, vox[2] / vox[0], f"slice {j} of {ras.shape[1]}"))):
            ax = axes[r, c]
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} [{lo:g}, {hi:g}] HU: {plane} {where}", fontsize=9)
            marks = ("A", "P") if plane == "axial" else ("S", "I")
            box = dict(facecolor="black", edgecolor="none", alpha=0.7, pad=1.0)
            for x, y, text, ha, va in ((0.03, 0.5, "R", "left", "center"), (0.97, 0.5, "L", "right", "center"),
                                       (0.5, 0.97, marks[0], "center", "top"), (0.5, 0.03, marks[1], "center", "bottom")):
                ax.text(x, y, text, color="w", transform=ax.transAxes, fontsize=8, weight="bold", ha=ha, va=va, bbox=box)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _ras_zooms(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the RAS-reoriented array axes of ``to_ras``."""
    import nibabel.orientations as nio

    affine = np.asarray(affine, float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    ornt = nio.io_orientation(affine)
    out = np.empty(3)
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = zooms[axis]
    return out


# ============================================================================================
# pre-training
# ============================================================================================


def _history_rows(history: Any) -> list[dict[str, Any]]:
    """Rows of a pre-training history: a list of per-epoch dicts, ``{"history": [...]}`` (what
    ``pretrain`` returns), a column dict ``{"epoch": [...], ...}`` or a path to ``history.json``."""
    if isinstance(history, (str, os.PathLike)):
        import json

        with open(history) as f:
            history = json.load(f)
    if (isinstance(history, dict) and "history" in history) or hasattr(history, "history"):
        history = history["history"]
    if isinstance(history, dict):  # columns -> rows
        n = len(history.get("epoch", []))
        history = [{k: v[i] for k, v in history.items() if i < len(v)} for i in range(n)]
    rows = [dict(r) for r in history]
    if not rows:
        raise ValueError("the pre-training history is empty: nothing to plot (did any epoch finish?)")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    e, v = zip(*pts)
    return np.asarray(e, dtype=float), np.asarray(v, dtype=float)


# what the loss panel draws for each pretext: its title, the curves (history key, label, style, colour; the
# first is training), the baselines on the same fixed validation crops (key, label, colour, line style; one
# level each) and the baseline the best validation loss is read against (key, its name in the annotation)
_LOSS_PANELS = {
    "views": dict(
        title="reconstruction L1 to the clean crop",
        curves=(("train_recon", "training (view 1)", "-", "tab:blue"),
                ("val_recon", "validation, view 1", "o-", "tab:orange"),
                ("val_recon_2", "validation, view 2", "s-", "tab:green")),
        baselines=(("val_const_l1", "predict the crop's mean", "tab:red", "--"),
                   ("val_copy_l1_1", "copy view 1", "tab:purple", ":"),
                   ("val_copy_l1_2", "copy view 2", "tab:brown", ":")),
        reference=("val_const_l1", "the constant"),
    ),
    "mae": dict(
        title="masked-patch loss (masked patches only)",
        curves=(("train_recon", "training (random masks)", "-", "tab:blue"),
                ("val_recon", "validation (fixed masks)", "o-", "tab:orange")),
        baselines=(("val_patch_mean", "each masked patch's own mean", "tab:red", "--"),
                   ("val_visible_mean", "the mean visible patch", "tab:purple", ":")),
        reference=("val_patch_mean", "each patch's own mean"),
    ),
}


def history_pretext(history: Any) -> str:
    """``"mae"`` or ``"views"``: the pretext a pre-training history comes from. An MAE history validates
    against ``val_patch_mean``, a two-view one against ``val_const_l1``; before its first validation an
    MAE history is the one whose contrastive term is 0 in every epoch (it has none)."""
    rows = _history_rows(history)
    if any("val_patch_mean" in r for r in rows):
        return "mae"
    if any("val_const_l1" in r for r in rows):
        return "views"
    return "mae" if all(r.get("train_contrastive") == 0 for r in rows) else "views"


def _plot_loss_panel(ax, rows: list[dict[str, Any]], pretext: str) -> None:
    spec = _LOSS_PANELS[pretext]
    for i, (key, label, style, colour) in enumerate(spec["curves"]):
        e, v = _series(rows, key)
        if i == 0:
            ax.plot(e, v, style, color=colour, label=label, marker="." if len(e) < 40 else None)
        elif len(e):
            ax.plot(e, v, style, color=colour, ms=3.5, label=label)
    for key, label, colour, style in spec["baselines"]:
        e, v = _series(rows, key)
        if len(e):  # the same fixed crops every time: one level per baseline
            ax.axhline(float(np.mean(v)), color=colour, ls=style, lw=1.2, label=f"baseline: {label} ({np.mean(v):.3f})")
    best = [r for r in rows if r.get("val_recon") is not None]
    if best:
        b = min(best, key=lambda r: r["val_recon"])
        text = f"best {b['val_recon']:.3f} (epoch {b['epoch']})"
        ref_key, ref_name = spec["reference"]
        if b.get(ref_key):
            text += f"\n= {b['val_recon'] / b[ref_key]:.2f} x {ref_name}"
        late = b["epoch"] > (rows[0]["epoch"] + rows[-1]["epoch"]) / 2
        ax.annotate(text, (b["epoch"], b["val_recon"]), textcoords="offset points", xytext=(-6 if late else 6, -28),
                    ha="right" if late else "left", fontsize=8, color="tab:orange")
    ax.set_ylim(bottom=0)
    ax.set_title(spec["title"])
    ax.legend(loc="best", fontsize=7, framealpha=0.85)


def _plot_probe_panel(ax, rows: list[dict[str, Any]]) -> None:
    e, v = _series(rows, "probe_dice")
    if not len(e):
        ax.text(0.5, 0.5, "probe monitor off\n(set probe_every > 0 to score the encoder\nfor segmentation while it trains)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("downstream: linear probe on the frozen encoder")
        return
    ax.plot(e, 100 * v, "o-", color="tab:green", ms=4, label="this encoder")
    init = [r["probe_dice_init"] for r in rows if r.get("probe_dice_init") is not None]
    if init:
        ax.axhline(100 * init[-1], color="gray", ls="--", lw=1.2, label=f"untrained encoder ({100 * init[-1]:.1f})")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("mean Dice (%)")
    ax.set_title("downstream: linear probe on the frozen encoder")
    ax.legend(loc="lower right", fontsize=7)


def plot_ssl_history(history: Any, path: str | None = None, pretext: str | None = None):
    """Pre-training curves against epoch, on linear axes.

    Two-view pretext (``pretext="views"``), four panels:

    1. reconstruction L1 ``r``: training (view 1, every epoch) and validation (view 1 and view 2,
       fixed views), with the baselines on the same views as horizontal lines: predicting each
       crop's mean intensity, and copying each corrupted view unchanged;
    2. the probe monitor's mean Dice (``probe_every`` > 0) against the untrained encoder's;
    3. the contrastive loss ``c``; 4. the total loss ``r + c*r``.

    Masked autoencoder (``"mae"``), two panels: the masked-patch loss, training (random masks) and
    validation (fixed masks), with its baselines on the same masks (each masked patch's own mean,
    the mean visible patch); and the probe monitor as above. An MAE has no contrastive term, and
    its total is its masked-patch loss.

    ``history``: ``pretrain(...)["history"]`` (a list of per-epoch dicts), the whole result, a
    column dict or a path to ``history.json``. ``pretext``: ``None`` reads it from the history
    (``history_pretext``). Returns the figure; saves it when ``path`` is given.
    """
    from matplotlib.ticker import MaxNLocator

    rows = _history_rows(history)
    pretext = pretext or history_pretext(rows)
    if pretext not in _LOSS_PANELS:
        raise ValueError(f"pretext={pretext!r}; expected one of {sorted(_LOSS_PANELS)}")
    if pretext == "mae":
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.9), squeeze=False)
    else:
        fig, axes = plt.subplots(2, 2, figsize=(12, 7.6))
    _plot_loss_panel(axes[0, 0], rows, pretext)
    _plot_probe_panel(axes[0, 1], rows)
    lower = (("train_contrastive", "val_contrastive", "contrastive  c"),
             ("train_total", "val_total", "total loss  r + c·r"))
    for ax, (tkey, vkey, title) in zip(axes[1], lower) if pretext == "views" else ():
        e, v = _series(rows, tkey)
        ax.plot(e, v, "-", color="tab:blue", label="training", marker="." if len(e) < 40 else None)
        e, v = _series(rows, vkey)
        if len(e):
            ax.plot(e, v, "o-", color="tab:orange", ms=3.5, label="validation (fixed views)")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.legend(loc="best", fontsize=7, framealpha=0.85)
    for ax in axes.flat:
        if ax.lines:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
    name = "masked autoencoder" if pretext == "mae" else "two corrupted views"
    fig.suptitle(f"Self-supervised pre-training ({name})", y=1.0)
    fig.tight_layout()
    return _save(fig, path)


def _first_crop(
    sample: Any, keys: Sequence[str] = ("gt_image", "image", "image_2")
) -> tuple[dict[str, Any], np.ndarray | None]:
    """One crop ``{key: [1, X, Y, Z] tensor}`` for ``keys`` (default: a two-view crop's), from a crop, a
    list of crops (what the pre-training dataset returns per volume) or a collated batch, and the
    crop's 4x4 affine when it carries one (a MONAI ``MetaTensor``), else ``None``."""
    if isinstance(sample, (list, tuple)):
        if not sample:
            raise ValueError(f"empty sample: expected a crop dict with {list(keys)}")
        sample = sample[0]
    missing = [k for k in keys if k not in sample]
    if missing:
        raise KeyError(f"sample has no {missing} (keys present: {sorted(sample)}); expected a pre-training crop")
    import torch

    from .datasets import plain_tensor

    affine = getattr(sample[keys[0]], "affine", None)
    if affine is not None:
        affine = np.asarray(affine, dtype=float)
        affine = affine[0] if affine.ndim == 3 else affine  # collated: one affine per crop
    out = {}
    for k in keys:
        t = torch.as_tensor(np.asarray(sample[k])) if not isinstance(sample[k], torch.Tensor) else sample[k]
        t = plain_tensor(t)  # MetaTensor -> Tensor
        if t.ndim == 5:  # collated batch: first crop
            t = t[0]
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"sample[{k!r}] has shape {tuple(t.shape)}; expected [1, X, Y, Z] or [B, 1, X, Y, Z]")
        out[k] = t.float()
    return out, affine


def to_ras(volume: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """``volume [X, Y, Z]`` with its array axes turned and flipped so that they run towards the
    patient's Right, Anterior and Superior (the nearest axis-aligned reorientation of
    ``affine``); ``affine=None`` means the array already is RAS."""
    if affine is None:
        return volume
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, float))
    return nio.apply_orientation(volume, ornt)


def radiological_axial(volume_ras: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of an RAS volume as an image for ``imshow`` (origin upper): the patient's
    right on the viewer's left, anterior at the top: the display of every figure here."""
    return volume_ras[::-1, ::-1, k].T


def _orientation_marks(ax) -> None:
    box = dict(facecolor="black", edgecolor="none", alpha=0.7, pad=1.0)
    for x, y, text, ha, va in ((0.03, 0.5, "R", "left", "center"), (0.97, 0.5, "L", "right", "center"),
                               (0.5, 0.97, "A", "center", "top"), (0.5, 0.03, "P", "center", "bottom")):
        ax.text(x, y, text, color="w", transform=ax.transAxes, fontsize=7, weight="bold", ha=ha, va=va, bbox=box)


def _device_autocast(precision_or_device: Any) -> tuple[Any, Any]:
    """``(device, autocast context factory)`` of a ``runtime.Precision``, or of a device (no autocast)."""
    import contextlib

    import torch

    if hasattr(precision_or_device, "autocast") and hasattr(precision_or_device, "device"):
        return precision_or_device.device, precision_or_device.autocast
    return torch.device(precision_or_device or "cpu"), contextlib.nullcontext


def _reconstruct(model: Any, crop: dict[str, Any], precision_or_device: Any) -> Any:
    import torch

    device, autocast = _device_autocast(precision_or_device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            out = model(torch.stack([crop["image"], crop["image_2"]]).to(device))
            return (out[0] if isinstance(out, (tuple, list)) else out).float().cpu()
    finally:
        model.train(was_training)


def plot_views_and_reconstructions(
    model: Any,
    sample: Any,
    precision_or_device: Any = "cpu",
    path: str | None = None,
    n_slices: int = 4,
):
    """One crop, slice by slice: the clean crop (``gt_image``), view 1, view 2, and the model's
    reconstructions of both views. Rows are images, columns ``n_slices`` evenly spaced axial
    slices, grayscale on the [0, 1] intensity scale, in the radiological display of every other
    figure (patient's right on the viewer's left, anterior up; R/L/A/P marked), worked out from
    the crop's affine. Each row is labelled with its L1 distance to the clean crop, and the title
    gives this crop's baselines: predicting its mean intensity, and copying each view.

    ``model``: a ``ViTAutoEnc`` (or DDP / compiled wrapper) taking ``[N, 1, roi^3]``; ``None``
    draws the three input rows only.
    ``sample``: one pre-training crop (dict with ``image``, ``image_2``, ``gt_image``, each
    ``[1, roi, roi, roi]``), a list of crops (what the dataset returns per volume), or a collated
    batch (its first crop is used).
    ``precision_or_device``: a ``runtime.Precision`` (its device and autocast are used), a
    ``torch.device`` or a device string. The model's train/eval mode is restored afterwards.
    Returns the figure; saves it (PNG) when ``path`` is given.
    """
    crop, affine = _first_crop(sample)
    gt = crop["gt_image"][0].numpy()
    images = [("clean crop (gt_image)", gt), ("view 1 (image)", crop["image"][0].numpy()),
              ("view 2 (image_2)", crop["image_2"][0].numpy())]
    if model is not None:
        recon = _reconstruct(model, crop, precision_or_device)
        images += [("reconstruction of view 1", recon[0, 0].numpy()), ("reconstruction of view 2", recon[1, 0].numpy())]
    l1 = [float(np.abs(vol - gt).mean()) for _, vol in images]
    constant = float(np.abs(gt - gt.mean()).mean())
    images = [(name, to_ras(vol, affine)) for name, vol in images]
    depth = images[0][1].shape[2]
    n_slices = max(1, min(int(n_slices), depth))
    zs = np.linspace(0, depth - 1, n_slices + 2)[1:-1].round().astype(int)
    fig, axes = plt.subplots(len(images), n_slices, figsize=(2.1 * n_slices, 2.2 * len(images)), squeeze=False)
    for i, (name, vol) in enumerate(images):
        for j, z in enumerate(zs):
            ax = axes[i, j]
            ax.imshow(radiological_axial(vol, z), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            _orientation_marks(ax)
            if i == 0:
                ax.set_title(f"axial slice {z} (of {depth}, inferior first)", fontsize=8)
        label = name if i == 0 else f"{name}\nL1 to clean {l1[i]:.3f}"
        if i >= 3:
            label += f"\n({l1[i] / constant:.2f} x constant)" if constant > 0 else ""
        axes[i, 0].set_ylabel(label, fontsize=8)
    title = "Two corrupted views of one crop" + (" and their reconstructions" if model is not None else "")
    title += (f"\nbaselines for this crop (L1 to clean): predict its mean {constant:.3f}, "
              f"copy view 1 {l1[1]:.3f}, copy view 2 {l1[2]:.3f}")
    fig.suptitle(title, y=1.0, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _mae_mask(n_tokens: int, ratio: float, seed: int) -> Any:
    """``[1, n_tokens]`` int, 1 = masked: the draw of MONAI's ``MaskedAutoEncoderViT._masking`` (it keeps
    ``int((1 - ratio) * n_tokens)`` patches) under ``seed``, the global random state left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        keep = torch.multinomial(torch.ones(1, n_tokens), int((1 - ratio) * n_tokens), replacement=False)
    mask = torch.ones(1, n_tokens, dtype=torch.int)
    mask[0, keep[0]] = 0
    return mask


def _mae_predict(model: Any, crop: Any, seed: int, precision_or_device: Any) -> tuple[Any, Any]:
    """The MAE's ``(prediction [1, tokens, voxels], mask [1, tokens])`` for one crop ``[1, 1, X, Y, Z]``,
    its mask drawn under ``seed`` (the global random state left as it was); eval mode, restored."""
    import torch

    device, autocast = _device_autocast(precision_or_device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), autocast():
            torch.manual_seed(seed)  # the mask's indices come from the CPU generator
            pred, mask = model(crop.to(device))
        return pred.float().cpu(), mask.cpu()
    finally:
        model.train(was_training)


def plot_masked_reconstruction(
    model: Any,
    sample: Any,
    cfg: Any,
    precision_or_device: Any = "cpu",
    path: str | None = None,
    n_slices: int = 4,
    seed: int | None = None,
):
    """The masked autoencoder on one crop, slice by slice: the clean crop, the encoder's input (the
    masked patches blanked, in blue), and, with a model, the baseline ``each masked patch at its own
    mean`` and the MAE's reconstruction (visible patches copied from the input, masked ones predicted).
    Rows are images, columns ``n_slices`` evenly spaced axial slices on the [0, 1] intensity scale, in
    the radiological display of every other figure. The baseline and the reconstruction are labelled
    with their masked-patch loss, in the loss's own space (``mae_loss`` on ``mae_target``), and the
    title gives the mean visible patch's.

    With ``mae_norm_target`` the network predicts each masked patch normalised to zero mean and unit
    variance; it is drawn at the true patch's mean and standard deviation, so the picture shows the
    structure it predicted inside each patch, not the patch's brightness, which it was never asked for.

    ``model``: a ``MaskedAutoEncoderViT`` (``ssl_utils.mae.build_mae``); ``None`` draws the first two
    rows only, with a mask drawn as the model draws it. ``sample``: one crop (``{"image": [1, roi^3]}``),
    a list of crops (what the dataset returns per volume) or a collated batch (its first crop).
    ``cfg``: ``patch_size``, ``mae_mask_ratio``, ``mae_norm_target``, ``mae_loss``; ``seed`` (default
    ``cfg["val_seed"]``) fixes the mask. Returns the figure; saves it (PNG) when ``path`` is given.
    """
    import torch

    from .mae import mae_baselines, mae_loss, mae_target, patchify, unpatchify

    crop, affine = _first_crop(sample, keys=("image",))
    x = crop["image"][None]  # [1, 1, X, Y, Z]
    p, ratio, kind = int(cfg["patch_size"]), float(cfg["mae_mask_ratio"]), cfg["mae_loss"]
    seed = int(cfg["val_seed"] if seed is None else seed)
    patches = patchify(x, p)  # [1, tokens, p^3], intensities
    n = patches.shape[1]
    if model is None:
        pred, mask = None, _mae_mask(n, ratio, seed)
    else:
        pred, mask = _mae_predict(model, x, seed, precision_or_device)
    hidden = mask.bool()[..., None]  # [1, tokens, 1]
    blanked = torch.where(hidden, torch.full_like(patches, float("nan")), patches)
    images = [("clean crop", x), (f"encoder input: {n - int(mask.sum())} of {n} patches\n(masked ones blanked)",
                                  unpatchify(blanked, p, x.shape))]
    title = f"Masked autoencoder: {int(mask.sum())} of {n} patches of {p}³ voxels masked"
    if pred is not None:
        target = mae_target(x, p, bool(cfg["mae_norm_target"]))
        own_mean, visible_mean = mae_baselines(target, mask, kind).tolist()
        loss = mae_loss(pred, target, mask, kind).item()
        shown = pred
        if cfg["mae_norm_target"]:  # back to intensities at each true patch's mean and sd
            mean = patches.mean(dim=-1, keepdim=True)
            sd = (patches.var(dim=-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
            shown = pred * sd + mean
        baseline = torch.where(hidden, patches.mean(dim=-1, keepdim=True).expand_as(patches), patches)
        recon = torch.where(hidden, shown, patches)
        ratio_text = f" ({loss / own_mean:.2f} x own mean)" if own_mean > 0 else ""
        images += [
            (f"baseline: each masked patch\nat its own mean, loss {own_mean:.3f}", unpatchify(baseline, p, x.shape)),
            (f"MAE reconstruction\nloss {loss:.3f}{ratio_text}", unpatchify(recon, p, x.shape)),
        ]
        title += (f"\nmasked-patch loss ({kind}{', per-patch-normalised targets' if cfg['mae_norm_target'] else ''}); "
                  f"the mean visible patch scores {visible_mean:.3f}")
        if cfg["mae_norm_target"]:
            title += "\npredicted patches drawn at their true mean and sd: the structure is the network's"
    images = [(name, to_ras(vol[0, 0].numpy(), affine)) for name, vol in images]
    depth = images[0][1].shape[2]
    n_slices = max(1, min(int(n_slices), depth))
    zs = np.linspace(0, depth - 1, n_slices + 2)[1:-1].round().astype(int)
    cmap = plt.get_cmap("gray").with_extremes(bad="#3b6ea8")  # blue: the blanked (masked) patches
    fig, axes = plt.subplots(len(images), n_slices, figsize=(2.1 * n_slices, 2.2 * len(images)), squeeze=False)
    for i, (name, vol) in enumerate(images):
        for j, z in enumerate(zs):
            ax = axes[i, j]
            ax.imshow(radiological_axial(vol, z), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            _orientation_marks(ax)
            if i == 0:
                ax.set_title(f"axial slice {z} (of {depth}, inferior first)", fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, y=1.0, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ============================================================================================
# fine-tuning
# ============================================================================================


def label_colormap(num_classes: int = 14):
    """A ``ListedColormap`` for label maps ``0..num_classes-1``: background transparent, each organ
    its own colour (BTCV's 13 organs get 13 distinct colours)."""
    from matplotlib.colors import ListedColormap

    base = plt.get_cmap("tab20").colors
    order = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    colours = [(0.0, 0.0, 0.0, 0.0)] + [(*base[order[(k - 1) % 20]], 1.0) for k in range(1, num_classes)]
    return ListedColormap(colours, name="organs")


def _label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _ft_result_parts(result: Any) -> tuple[list[dict[str, Any]], list[float]]:
    """(evaluation rows, per-iteration losses) from ``finetune``'s result dict or a run folder."""
    if isinstance(result, (str, os.PathLike)):
        import csv
        import json

        with open(os.path.join(result, "history.json")) as f:
            rows = json.load(f)
        losses: list[float] = []
        loss_csv = os.path.join(result, "train_loss.csv")
        if os.path.exists(loss_csv):
            with open(loss_csv) as f:
                losses = [float(r["loss"]) for r in csv.DictReader(f)]
        return rows, losses
    if isinstance(result, dict) or hasattr(result, "history"):  # a result dict or a FinetuneResult
        return list(result.get("history", [])), list(result.get("train_losses", []))
    return list(result), []


def plot_finetune_curves(result: Any, path: str | None = None, title: str | None = None):
    """Fine-tuning curves, two panels: the DiceCE training loss per iteration (faint) with its
    moving average, and the validation mean Dice (over the run's classes, e.g. BTCV's 13 organs;
    dashed: with background) at each evaluation.

    ``result``: what ``finetune`` returns, or its ``logdir`` (``history.json``, ``train_loss.csv``).
    """
    rows, losses = _ft_result_parts(result)
    if not rows and not losses:
        raise ValueError("nothing to plot: the fine-tuning run has no loss and no evaluation yet")
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(11, 3.8))
    if losses:
        it = np.arange(1, len(losses) + 1)
        ax_l.plot(it, losses, color="tab:blue", alpha=0.3, lw=0.8, label="per iteration")
        w = max(1, min(50, len(losses) // 10))
        if w > 1:
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax_l.plot(it[w - 1 :], smooth, color="tab:blue", lw=1.8, label=f"moving average ({w})")
        ax_l.legend(frameon=False)
    _label_axes(ax_l, "iteration", "DiceCE loss", "training loss")
    if rows:
        it = [r["iteration"] for r in rows]
        dice = [100 * r["val_mean_dice"] for r in rows]
        from .organs import count_label

        classes = [k[5:] for k in rows[-1] if k.startswith("dice_")]  # the run's foreground classes
        ax_d.plot(it, dice, "o-", color="tab:red", label=f"mean Dice, {count_label(classes)}" if classes else "mean Dice")
        if all("val_mean_dice_with_bg" in r for r in rows):
            ax_d.plot(it, [100 * r["val_mean_dice_with_bg"] for r in rows], "o--", color="tab:red", alpha=0.45,
                      label="with background")
        best = int(np.argmax(dice))
        ax_d.annotate(f"best {dice[best]:.1f}%", (it[best], dice[best]), textcoords="offset points", xytext=(0, 8),
                      ha="center", fontsize=9)
        ax_d.legend(frameon=False)
    _label_axes(ax_d, "iteration", "validation Dice (%)", "validation (sliding window)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _volume(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected a 3D volume [H, W, D] (or with leading singleton axes), got shape {x.shape}")
    return x


def plot_segmentation_slice(
    image: Any,
    label: Any,
    pred: Any,
    index: int | None = None,
    axis: int = 2,
    path: str | None = None,
    title: str | None = None,
    num_classes: int = 14,
    names: Sequence[str] | None = None,
):
    """One slice of a validation volume: image, ground truth and prediction side by side (organs
    as a colour overlay, one colour per class).

    ``image`` (intensities), ``label`` and ``pred`` (integer label maps): ``[H, W, D]`` arrays or
    tensors (leading singleton axes allowed), in RAS orientation. ``axis``: 2 = axial;
    ``index`` defaults to the slice with the most ground-truth organ voxels. Shown in the
    radiological convention (patient's right on the viewer's left).
    """
    img, lab, prd = _volume(image), _volume(label).round().astype(int), _volume(pred).round().astype(int)
    if not (img.shape == lab.shape == prd.shape):
        raise ValueError(f"image {img.shape}, label {lab.shape} and prediction {prd.shape} must have one shape")
    if index is None:
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax((lab > 0).sum(axis=other)))
    take = lambda v: np.take(v, index, axis=axis)  # noqa: E731
    show = lambda s: s[::-1, :].T  # noqa: E731  (x: patient right -> viewer left; y up with origin=lower)
    cmap = label_colormap(num_classes)
    if names is None:
        from .organs import organ_names

        names = organ_names(num_classes)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, overlay, name in zip(axes, (None, lab, prd), ("image", "ground truth", "prediction")):
        ax.imshow(show(take(img)), cmap="gray", origin="lower")
        if overlay is not None:
            ax.imshow(show(take(overlay)), cmap=cmap, vmin=0, vmax=num_classes - 1, origin="lower",
                      interpolation="nearest", alpha=0.55)
        ax.set_title(name)
        ax.axis("off")
    present = sorted((set(np.unique(take(lab)).tolist()) | set(np.unique(take(prd)).tolist())) - {0})
    from matplotlib.patches import Patch

    handles = [Patch(color=cmap(k), label=names[k - 1]) for k in present if 0 < k < num_classes]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), frameon=False, fontsize=8)
    fig.suptitle(title or f"slice {index} (axis {axis})")
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    return _save(fig, path)


def plot_batch_crops(batch: dict[str, Any], max_crops: int = 4, path: str | None = None, num_classes: int = 14):
    """The training crops of one batch (``batch["image"]``, ``batch["label"]``: ``[N, 1, H, W, D]``):
    for each crop its axial slice with the most organ voxels, with the labels as a colour overlay."""
    images, labels = batch["image"], batch["label"]
    n = min(int(images.shape[0]), int(max_crops))
    cmap = label_colormap(num_classes)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        img, lab = _volume(images[i]), _volume(labels[i]).round().astype(int)
        z = int(np.argmax((lab > 0).sum(axis=(0, 1))))
        ax.imshow(img[:, :, z][::-1, :].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.imshow(lab[:, :, z][::-1, :].T, cmap=cmap, vmin=0, vmax=num_classes - 1, origin="lower",
                  interpolation="nearest", alpha=0.5)
        organs = len(set(np.unique(lab).tolist()) - {0})
        ax.set_title(f"crop {i}: slice {z}, {organs} organs", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"training crops {tuple(images.shape[2:])} voxels, intensities in [0, 1], labels overlaid")
    fig.tight_layout()
    return _save(fig, path)


def _compare_stats(results: dict[str, Any], metric: str) -> tuple[list[int], dict[str, list[list[float]]]]:
    runs = results["runs"] if isinstance(results, dict) or hasattr(results, "runs") else results
    sizes = sorted({int(r["size"]) for r in runs})
    values: dict[str, list[list[float]]] = {}
    for arm in ("random", "pretrained"):
        values[arm] = [[100 * float(r[metric]) for r in runs if int(r["size"]) == n and r["arm"] == arm] for n in sizes]
    return sizes, values


def plot_compare_bars(results: dict[str, Any], metric: str = "final", path: str | None = None, title: str | None = None):
    """Validation Dice (%) per training-set size, random initialisation beside the pre-trained
    encoder: bars = mean over seeds, error bars = sd over seeds, dots = the individual seeds.

    ``results``: what ``compare_init`` returns (or its ``results.json`` loaded). ``metric``:
    ``"final"`` or ``"best"``.
    """
    sizes, values = _compare_stats(results, metric)
    arms = [a for a in ("random", "pretrained") if any(values[a])]
    colours = {"random": "0.6", "pretrained": "tab:orange"}
    labels = {"random": "random init", "pretrained": "pre-trained encoder"}
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(sizes), 4))
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(sizes))
    for j, arm in enumerate(arms):
        pos = x - 0.4 + width * (j + 0.5)
        means = [np.mean(v) if v else np.nan for v in values[arm]]
        sds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values[arm]]
        ax.bar(pos, means, width * 0.9, yerr=sds, capsize=4, color=colours[arm], label=labels[arm])
        for p, v in zip(pos, values[arm]):
            ax.plot([p] * len(v), v, "k.", ms=5, alpha=0.7)
        for p, m in zip(pos, means):
            if np.isfinite(m):
                ax.annotate(f"{m:.1f}", (p, m), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(x, [str(n) for n in sizes])
    ax.set_xlabel("labeled training volumes")
    ax.set_ylabel(f"validation mean Dice, {metric} (%)")
    ax.set_title(title or "random initialisation vs pre-trained encoder")
    tops = [np.mean(v) + (np.std(v, ddof=1) if len(v) > 1 else 0) for a in arms for v in values[a] if v]
    if tops and np.isfinite(max(tops)) and max(tops) > 0:
        ax.set_ylim(0, 1.3 * max(tops))
    ax.legend(frameon=False, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_compare_curves(results: dict[str, Any], path: str | None = None):
    """Validation Dice curves of every comparison run, one panel per training-set size; colour =
    arm, line style = seed."""
    runs = results["runs"] if isinstance(results, dict) or hasattr(results, "runs") else results
    sizes = sorted({int(r["size"]) for r in runs})
    seeds = sorted({int(r["seed"]) for r in runs})
    styles = ["-", "--", ":", "-."]
    colours = {"random": "0.45", "pretrained": "tab:orange"}
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for r in runs:
            if int(r["size"]) != n or not r["curve"]:
                continue
            it, d = zip(*r["curve"])
            ax.plot(it, 100 * np.asarray(d), styles[seeds.index(int(r["seed"])) % 4], marker="o", ms=3,
                    color=colours.get(r["arm"], "k"),
                    label=f"{'pre-trained' if r['arm'] == 'pretrained' else 'random'}, seed {r['seed']}")
        ax.set_title(f"{n} training volumes")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation mean Dice (%)")
    axes[0][-1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ============================================================================================
# study
# ============================================================================================


# ============================================================================================
# the study
# ============================================================================================


def plot_study(records: Sequence[dict[str, Any]], probe: Sequence[dict[str, Any]], path: str | None = None,
               arm_names: dict[str, str] | None = None):
    """The study's figure: mean ± sd validation Dice curves per arm and training-set size, plus the
    probe's curves (every probe arm, the baselines included); ``arm_names`` labels the arms (default:
    the arm keys)."""
    sizes = sorted({r["size"] for r in records})
    panels = len(sizes) + (1 if probe else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.9), squeeze=False)
    from .organs import count_label

    colours = {"random": "tab:gray", "pretrained": "tab:red", "mae": "tab:purple", "control": "tab:orange",
               "patch_embedding": "tab:blue", "intensity": "tab:green"}
    classes = list(records[0].get("per_organ", {})) if records else []  # the foreground classes

    def draw(ax, recs, title):
        for arm in colours:
            curves = [r["curve"] for r in recs if r["arm"] == arm]
            if not curves:
                continue
            its = np.array([c[0] for c in curves[0]], dtype=float)
            vals = np.array([[c[1] for c in cur] for cur in curves if len(cur) == len(its)], dtype=float) * 100
            mean, sd = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(its))
            for v in vals:
                ax.plot(its, v, color=colours[arm], alpha=0.25, lw=0.8)
            ax.plot(its, mean, color=colours[arm], lw=2, label=f"{(arm_names or {}).get(arm, arm)} (n={len(vals)})")
            ax.fill_between(its, mean - sd, mean + sd, color=colours[arm], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"validation mean Dice, {count_label(classes)} (%)" if classes else "validation mean Dice (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")

    for ax, n in zip(axes[0], sizes):
        draw(ax, [r for r in records if r["size"] == n], f"fine-tuning, {n} labeled volumes")
    if probe:
        draw(axes[0][-1], probe, "linear probe on frozen features")
    fig.tight_layout()
    return _save(fig, path)
