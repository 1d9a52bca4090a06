"""Models (ViTAutoEnc for pre-training, UNETR for fine-tuning) and encoder weight transfer.

The builders return MONAI's plain models, exactly as the reference tutorial builds them (einsum
attention, default layout); ``ssl_utils.speedups.apply_speedups(model, cfg, device)`` then moves a
model to its device and applies the speed-ups (same results, same state dict).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from monai.networks.nets import UNETR, ViTAutoEnc
from torch import nn


def build_vitautoenc(cfg: Mapping[str, Any]) -> ViTAutoEnc:
    """MONAI's plain ``ViTAutoEnc`` from a config (paper: 96^3, patch 16, hidden 768, mlp 3072,
    12 layers, 12 heads). Input ``[B, 1, roi, roi, roi]`` -> (reconstruction
    ``[B, 1, roi, roi, roi]``, hidden states). Same weights for the same seed.
    """
    return ViTAutoEnc(
        out_channels=1,
        patch_size=(cfg["patch_size"],) * 3,
        deconv_chns=cfg["deconv_chns"],
        num_layers=cfg["num_layers"],
        **_vit_arguments(cfg),
    )


def _vit_arguments(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT's arguments both models take (so the encoders have the same shape, and transfer)."""
    keys = ("hidden_size", "mlp_dim", "num_heads", "proj_type", "dropout_rate")
    return {"in_channels": 1, "img_size": (cfg["roi"],) * 3, **{k: cfg[k] for k in keys}}


def check_unetr_encoder(cfg: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the config's ViT is one UNETR can hold: MONAI's UNETR fixes its
    ViT at 12 transformer layers and patch size 16."""
    if cfg["num_layers"] != 12 or cfg["patch_size"] != 16:
        raise ValueError(
            "UNETR uses 12 transformer layers and patch size 16; "
            f"this config has num_layers={cfg['num_layers']}, patch_size={cfg['patch_size']}"
        )


def build_unetr(cfg: Mapping[str, Any]) -> UNETR:
    """MONAI's plain ``UNETR`` from a config (paper: feature 16, hidden 768, mlp 3072, 12 heads,
    instance norm, residual blocks, 14 outputs). Input ``[B, 1, roi^3]`` -> logits
    ``[B, out_channels, roi^3]``."""
    check_unetr_encoder(cfg)
    return UNETR(
        out_channels=cfg["out_channels"],
        feature_size=cfg["feature_size"],
        norm_name=cfg["norm_name"],
        res_block=cfg["res_block"],
        **_vit_arguments(cfg),
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove any leading ``module.`` / ``_orig_mod.`` (DDP / torch.compile) from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key = key[len(p):]
                    changed = True
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# weight transfer
# --------------------------------------------------------------------------------------------


class WeightTransferError(RuntimeError):
    """A checkpoint's encoder weights do not fit the UNETR encoder."""


@dataclass
class TransferReport:
    """What ``load_pretrained_vit`` did: key lists, and a one-line summary when printed."""

    checkpoint: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in unetr.vit, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in unetr.vit (e.g. decoder)
    shape_mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, ckpt, model
    epoch: int | None = None

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing)
        line = (
            f"loaded {len(self.loaded)}/{total} encoder tensors from {self.checkpoint}"
            + (f" (pre-training epoch {self.epoch})" if self.epoch is not None else "")
            + f"; ignored {len(self.unexpected)} non-encoder tensors"
        )
        if self.unexpected:
            shown = sorted({k.split(".")[0] for k in self.unexpected})
            line += f" ({', '.join(shown)})"
        return line


def _extract_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], int | None]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd, epoch = obj["state_dict"], obj.get("epoch")
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        sd, epoch = obj["model"], obj.get("epoch")
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, epoch = obj, None
    else:
        keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightTransferError(
            f"{path}: not a model checkpoint: expected a dict with a 'state_dict' of tensors "
            f"or a bare state dict, found {keys}"
        )
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightTransferError(f"{path}: 'state_dict' holds values that are not tensors")
    return strip_prefixes(sd), (int(epoch) if isinstance(epoch, (int, float)) else None)


def encoder_state(state: Mapping[str, torch.Tensor], target: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A pre-trained network's state dict in UNETR's ViT key names, and the keys that are not part of
    the encoder (the caller reports them).

    - ``MaskedAutoEncoderViT`` (``pretext="mae"``): ``ssl_utils.mae.mae_encoder_state`` (its final
      LayerNorm ``blocks.L`` becomes ``norm``; the class and mask tokens and the decoder are dropped);
    - a UNETR (e.g. a fine-tuned model, the positive control): its ``vit.*`` tensors, prefix removed;
    - ``ViTAutoEnc`` or a bare encoder: as it is (the decoder ``conv3d_transpose*`` is not in UNETR's
      ViT; ``load_pretrained_vit`` reports it as unexpected).
    ``target``: the ViT's state dict, to tell a UNETR checkpoint from an encoder one."""
    from .mae import is_mae_state, mae_encoder_state

    if is_mae_state(state):
        return mae_encoder_state(state)
    if any(k.startswith("vit.") for k in state) and (target is None or not any(k in target for k in state)):
        return ({k[4:]: v for k, v in state.items() if k.startswith("vit.")},
                [k for k in state if not k.startswith("vit.")])
    return dict(state), []


def load_pretrained_vit(
    unetr: nn.Module,
    checkpoint_path: str | os.PathLike,
    strict: bool = True,
) -> TransferReport:
    """Copy a pre-trained ViT encoder into ``unetr.vit`` and report what was loaded.

    Accepts this project's checkpoints of either pretext (``ViTAutoEnc``; ``MaskedAutoEncoderViT``,
    whose final LayerNorm ``blocks.L`` is UNETR's ``norm``), the reference's ``{"state_dict": ...}``,
    a bare state dict and a UNETR checkpoint (its ``vit.`` tensors); ``module.`` / ``_orig_mod.``
    prefixes are stripped (``encoder_state``). What is not encoder (the decoders, the MAE's class and
    mask tokens, a UNETR's convolutional parts) is reported as unexpected and skipped.

    Raises ``WeightTransferError`` when no encoder tensor matches, when shapes differ (naming the
    first keys with both shapes), or, with ``strict=True``, when part of the encoder is missing.
    Nothing is copied into the model unless the checks pass.
    """
    from .checkpoint import load_checkpoint

    path = str(checkpoint_path)
    obj = load_checkpoint(path)
    state, epoch = _extract_state_dict(obj, path)
    vit = unwrap_model(unetr)
    vit = getattr(vit, "vit", vit)
    target = vit.state_dict()
    state, dropped = encoder_state(state, target)
    report = TransferReport(checkpoint=path, epoch=epoch, unexpected=dropped)
    to_load = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.shape_mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.missing = [k for k in target if k not in state]
    if report.shape_mismatched:
        first = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.shape_mismatched[:3])
        raise WeightTransferError(
            f"{path}: {len(report.shape_mismatched)} encoder tensor(s) have other shapes than unetr.vit "
            f"(was the checkpoint trained with another hidden size, ROI or patch size?): {first}"
        )
    if not report.loaded:
        raise WeightTransferError(
            f"{path}: no tensor matches unetr.vit; checkpoint keys start {sorted(state)[:5]}, "
            f"encoder keys start {sorted(target)[:5]}"
        )
    if strict and report.missing:
        raise WeightTransferError(
            f"{path}: only {len(report.loaded)} of {len(target)} encoder tensors found; "
            f"missing e.g. {report.missing[:5]}"
        )
    vit.load_state_dict(to_load, strict=False)
    return report


def export_encoder(checkpoint_path: str | os.PathLike, dest: str | os.PathLike, **extra: Any) -> str:
    """Write the ViT encoder of a checkpoint (``ViTAutoEnc`` or ``MaskedAutoEncoderViT`` pre-training, or a
    UNETR) to ``dest`` in UNETR's own key names: ``{"state_dict", "config", "epoch", "source", **extra}``,
    atomically. ``load_pretrained_vit`` loads it with nothing dropped; it is a few MB where the training
    checkpoint also holds a decoder and the optimiser's state. Returns ``dest``."""
    from .checkpoint import load_checkpoint, save_checkpoint

    path = os.fspath(checkpoint_path)
    obj = load_checkpoint(path)
    state, epoch = _extract_state_dict(obj, path)
    encoder, _ = encoder_state(state)
    encoder = {k: v for k, v in encoder.items() if not k.startswith("conv3d_transpose")}
    if any(k.startswith("vit.") for k in state):
        epoch = None  # a UNETR's epoch counts fine-tuning, not pre-training
    config = dict(obj.get("config") or {}) if isinstance(obj, Mapping) else {}
    save_checkpoint({"state_dict": encoder, "config": config, "epoch": epoch, "source": path, **extra}, dest)
    return os.fspath(dest)
