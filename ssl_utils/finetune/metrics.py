"""Dice on integer label maps: per case and organ, with the exclusion convention written down once.

``dice_per_case``: per case and organ, ``2|P∩G| / (|P| + |G|)``. An organ absent from both the
prediction and the ground truth is *excluded* (NaN in the per-case row, left out by ``nanmean``,
counted in ``n_excluded``); an organ absent from the ground truth but predicted scores 0 (false
positives cost). ``summarize_dice``'s headline ``mean_dice`` is, for each case, the mean over the
organs, then the mean over cases; ``mean_dice_with_bg`` also averages the background class, as the
reference's ``DiceMetric(include_background=True)`` does (it reads higher: background is easy).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from ..organs import organ_names

def _confusion(pred, gt, num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` voxel counts, rows = ground truth, columns = prediction."""
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        p = torch.as_tensor(pred).reshape(-1)
        g = torch.as_tensor(gt).reshape(-1).to(p.device)
        if p.numel() != g.numel():
            raise ValueError(f"prediction has {p.numel()} voxels, ground truth {g.numel()}")
        p, g = p.long(), g.long()
        for name, t in (("prediction", p), ("ground truth", g)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{name} holds labels {lo}..{hi}, expected 0..{num_classes - 1}")
        counts = torch.bincount(g * num_classes + p, minlength=num_classes * num_classes)
        return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)
    p = np.asarray(pred).reshape(-1)
    g = np.asarray(gt).reshape(-1)
    if p.size != g.size:
        raise ValueError(f"prediction has {p.size} voxels, ground truth {g.size}")
    if p.size and (np.any(p != np.round(p)) or np.any(g != np.round(g))):
        raise ValueError("dice expects integer label maps (argmax of the logits), found non-integer values")
    p, g = p.astype(np.int64), g.astype(np.int64)
    for name, t in (("prediction", p), ("ground truth", g)):
        if t.size and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} holds labels {t.min()}..{t.max()}, expected 0..{num_classes - 1}")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _dice_from_confusion(conf: np.ndarray) -> np.ndarray:
    inter = np.diag(conf).astype(np.float64)
    denom = conf.sum(axis=0).astype(np.float64) + conf.sum(axis=1).astype(np.float64)
    out = np.full(conf.shape[0], np.nan)
    ok = denom > 0
    out[ok] = 2.0 * inter[ok] / denom[ok]
    return out


def dice_with_background(pred, gt, num_classes: int = 14) -> np.ndarray:
    """Dice of every class ``0..num_classes-1`` (index 0 = background) for one case.

    ``pred``, ``gt``: integer label maps of the same number of voxels (any shape, e.g.
    ``[H, W, D]`` or ``[1, H, W, D]``; numpy arrays or tensors). A class absent from both is NaN
    (excluded); absent from the ground truth but predicted is 0. Returns float64 ``[num_classes]``.
    """
    return _dice_from_confusion(_confusion(pred, gt, num_classes))


def dice_per_case(pred, gt, num_classes: int = 14) -> np.ndarray:
    """Dice of each organ ``1..num_classes-1`` for one case: float64 ``[num_classes - 1]``.

    Same convention as ``dice_with_background``: NaN where the organ is absent from both the
    prediction and the ground truth (excluded from means), 0 where it is only predicted.
    """
    return dice_with_background(pred, gt, num_classes)[1:]


def _nanmean(a: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(a, axis=axis)


def summarize_dice(rows_with_bg: Sequence[Sequence[float]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Average per-case Dice rows (``[cases, num_classes]``, index 0 = background) over cases.

    ``mean_dice``: per case the nanmean over organs 1.., then the mean over cases;
    ``mean_dice_with_bg``: the same including background; ``per_organ``: nanmean over cases.
    """
    a = np.asarray(rows_with_bg, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"need a [cases, classes] array of Dice rows, got shape {a.shape}")
    names = list(names) if names is not None else organ_names(a.shape[1])
    organs = a[:, 1:]
    per_case_mean = _nanmean(organs, axis=1)
    per_case_mean_bg = _nanmean(a, axis=1)
    per_organ = _nanmean(organs, axis=0)
    return {
        "mean_dice": float(_nanmean(per_case_mean)),
        "mean_dice_with_bg": float(_nanmean(per_case_mean_bg)),
        "per_organ": {n: float(v) for n, v in zip(names, per_organ)},
        "per_case": organs.tolist(),
        "per_case_mean": per_case_mean.tolist(),
        "per_case_background": a[:, 0].tolist(),
        "n_cases": int(a.shape[0]),
        "n_excluded": int(np.isnan(organs).sum()),
    }
