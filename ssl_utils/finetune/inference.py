"""Inference and evaluation: sliding-window logits, label maps, and validation Dice per case."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..datasets import plain_tensor
from ..organs import organ_names
from ..runtime import Precision
from .metrics import dice_with_background, summarize_dice

@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, cfg: Mapping[str, Any], precision: Precision) -> torch.Tensor:
    """Sliding-window logits ``[B, out_channels, H, W, D]`` (float32) for images ``[B, 1, H, W, D]``.

    Windows of ``roi^3`` voxels, ``sw_batch_size`` at a time, overlapping by ``sw_overlap``
    (Gaussian-free constant blending, as the reference).
    """
    from monai.inferers import sliding_window_inference

    image = plain_tensor(image).to(precision.device, non_blocking=True)
    with precision.autocast():
        logits = sliding_window_inference(
            image,
            roi_size=(int(cfg["roi"]),) * 3,
            sw_batch_size=int(cfg["sw_batch_size"]),
            predictor=model,
            overlap=float(cfg["sw_overlap"]),
        )
    return plain_tensor(logits).float()


@torch.no_grad()
def predict_labels(model: nn.Module, image: torch.Tensor, cfg: Mapping[str, Any], precision: Precision) -> torch.Tensor:
    """Label map ``[B, H, W, D]`` (int64, argmax over classes) for images ``[B, 1, H, W, D]``."""
    was_training = model.training
    model.eval()
    try:
        return predict_logits(model, image, cfg, precision).argmax(dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, loader, cfg: Mapping[str, Any], precision: Precision,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean Dice over the validation cases (sliding-window inference, argmax, per-case Dice).

    ``class_names``: every class, background first (``cfg["out_channels"]`` of them; default
    BTCV's). Each case is scored on its own (``dice_with_background``) and the per-case values are
    averaged once over cases (not a running mean averaged again). Returns ``{"mean_dice"`` (the
    foreground classes, e.g. BTCV's 13 organs), ``"mean_dice_with_bg"``, ``"per_organ"`` {class
    name: Dice}, ``"per_case"`` [[one value per foreground class]],
    ``"per_case_mean"``, ``"n_excluded"`` (organ/case pairs absent from both), ``"cases"`` (file
    names), ``"n_nonfinite"`` (logits that are NaN or Inf: a diverged model)``}``. Dice values are
    fractions in [0, 1].
    """
    was_training = model.training
    model.eval()
    rows: list[np.ndarray] = []
    cases: list[str] = []
    nc = int(cfg["out_channels"])
    if class_names is not None and len(class_names) != nc:
        raise ValueError(f"{len(class_names)} class names {list(class_names)} for out_channels={nc}")
    nonfinite = 0
    try:
        for batch in loader:
            logits = predict_logits(model, batch["image"], cfg, precision)
            nonfinite += int((~torch.isfinite(logits)).sum())
            pred = logits.argmax(dim=1)
            label = plain_tensor(batch["label"]).to(pred.device)
            names = _filenames(batch, pred.shape[0])
            for i in range(pred.shape[0]):
                rows.append(dice_with_background(pred[i], label[i, 0].round().long(), nc))
                cases.append(names[i])
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("the validation loader yielded no case")
    out = summarize_dice(rows, list(class_names[1:]) if class_names is not None else organ_names(nc))
    out["cases"] = cases
    out["n_nonfinite"] = nonfinite
    return out


def _filenames(batch: dict, n: int) -> list[str]:
    meta = getattr(batch.get("image"), "meta", None) or {}
    names = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    if isinstance(names, str):
        names = [names]
    if not names or len(names) != n:
        return [f"case {i}" for i in range(n)]
    return [os.path.basename(str(x)) for x in names]
