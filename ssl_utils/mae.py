"""The masked-autoencoder pretext (``pretext="mae"``): MONAI's ``MaskedAutoEncoderViT`` on clean crops.

He et al. 2022 ("Masked Autoencoders Are Scalable Vision Learners"), in 3D as SelfMedMAE and nnssl
use it: the crop is cut into ``patch_size^3`` patches, the encoder sees a random ``1 - mae_mask_ratio``
of them, a small decoder (discarded after pre-training) predicts the voxels of the others, and the
loss is taken on the masked patches only (predicting the visible ones would reward copying).

- ``build_mae(cfg)``: the network, its encoder shaped exactly as UNETR's ViT (hidden size, MLP size,
  heads, 12 layers, patch 16), so every encoder tensor transfers (``mae_encoder_state``);
- ``patchify``: a crop ``[B, C, X, Y, Z]`` as ``[B, tokens, patch^3 * C]`` in the patch embedding's
  token order;
- ``mae_loss``: the masked-patch loss (MSE or L1, optionally on per-patch-normalised targets);
- ``mae_forward`` / ``evaluate_mae``: one training forward, and validation on fixed masks with the
  two baselines a reconstruction must beat (each masked patch's own mean; the mean visible patch).

The target: with ``mae_norm_target`` each patch is normalised to zero mean and unit variance
before the loss (He et al.: better features, because the network must predict structure rather than
brightness); a patch of constant intensity (air, after the HU window) has target 0 there.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .datasets import plain_tensor
from .distributed import all_reduce_sum
from .runtime import Precision

# history keys of one MAE validation pass, in the order ``evaluate_mae`` sums them
MAE_VAL_KEYS = ("val_recon", "val_total", "val_patch_mean", "val_visible_mean")


def _autocast_safe_mae():
    """MONAI's ``MaskedAutoEncoderViT`` whose forward also runs under autocast (MONAI 1.6.1 writes the
    decoder's bf16 tokens into an fp32 tensor of mask tokens, which ``index_put`` refuses): the same
    computation, with the mask tokens in the decoder's dtype. Parameters and state dict unchanged."""
    from monai.networks.nets import MaskedAutoEncoderViT

    class MaskedAutoEncoder(MaskedAutoEncoderViT):
        def forward(self, x, masking_ratio: float | None = None):
            x = self.patch_embedding(x)
            x, selected, mask = self._masking(x, masking_ratio=masking_ratio)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = self.decoder_embed(self.blocks(x))
            rows = torch.arange(x.shape[0], device=selected.device).unsqueeze(-1)
            tokens = self.mask_tokens.to(x.dtype).repeat(x.shape[0], mask.shape[1], 1)
            tokens[rows, selected] = x[:, 1:, :]  # the visible tokens at their places, mask tokens elsewhere
            x = torch.cat([x[:, :1, :], tokens + self.decoder_pos_embedding], dim=1)
            x = self.decoder_pred(self.decoder_blocks(x))
            return x[:, 1:, :], mask

    return MaskedAutoEncoder


def build_mae(cfg: Mapping[str, Any]) -> nn.Module:
    """MONAI's ``MaskedAutoEncoderViT`` whose encoder has UNETR's ViT dimensions (``hidden_size``,
    ``mlp_dim``, ``num_heads``, ``num_layers``, ``patch_size``, ``roi``) and whose decoder follows the
    ``mae_decoder_*`` settings. Fixed sin-cos position embeddings (He et al.); the masking ratio is
    ``mae_mask_ratio``."""
    return _autocast_safe_mae()(
        in_channels=1,
        img_size=(cfg["roi"],) * 3,
        patch_size=(cfg["patch_size"],) * 3,
        hidden_size=cfg["hidden_size"],
        mlp_dim=cfg["mlp_dim"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        masking_ratio=cfg["mae_mask_ratio"],
        decoder_hidden_size=cfg["mae_decoder_hidden"],
        decoder_mlp_dim=cfg["mae_decoder_mlp"],
        decoder_num_layers=cfg["mae_decoder_layers"],
        decoder_num_heads=cfg["mae_decoder_heads"],
        proj_type=cfg["proj_type"],
        dropout_rate=cfg["dropout_rate"],
    )


def is_mae_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a ``MaskedAutoEncoderViT``'s (it has the decoder's mask token)."""
    return "mask_tokens" in state and "decoder_pred.weight" in state


def mae_encoder_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder of a ``MaskedAutoEncoderViT`` state dict in UNETR's ViT key names, and the keys
    dropped.

    ``patch_embedding.*`` and ``blocks.0..L-1.*`` keep their names; the final LayerNorm, which the MAE
    keeps as the last element of ``blocks`` (``blocks.L``), becomes ``norm``. Dropped: the class token
    (UNETR has none), the mask token, and the decoder (``decoder_*``). The fixed sin-cos table
    ``patch_embedding.position_embeddings`` is kept: in UNETR, whose position embedding is learnable,
    it is the starting value that fine-tuning then trains like every other weight.
    """
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    last = layers[-1] if layers else None
    out, dropped = {}, []
    for key, value in state.items():
        if key.startswith("patch_embedding."):
            out[key] = value
        elif key.startswith("blocks.") and last is not None and key.split(".")[1] == str(last) and key.count(".") == 2:
            out["norm." + key.split(".")[2]] = value  # blocks.L.weight / blocks.L.bias: the final LayerNorm
        elif key.startswith("blocks."):
            out[key] = value
        else:
            dropped.append(key)
    return out, dropped


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, X, Y, Z]`` -> ``[B, tokens, patch^3 * C]``, tokens in the order of MONAI's convolutional
    patch embedding (``flatten(2).transpose(1, 2)`` of its ``[B, hidden, X/p, Y/p, Z/p]`` output)."""
    b, c, X, Y, Z = x.shape
    if X % patch or Y % patch or Z % patch:
        raise ValueError(f"crop {tuple(x.shape[2:])} is not a multiple of the patch size {patch}")
    x = x.reshape(b, c, X // patch, patch, Y // patch, patch, Z // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, gx, gy, gz, px, py, pz, C
    return x.reshape(b, (X // patch) * (Y // patch) * (Z // patch), patch**3 * c)


def mae_target(crop: torch.Tensor, patch: int, normalise: bool) -> torch.Tensor:
    """The reconstruction target: the crop's patches (``patchify``), each normalised to zero mean and
    unit variance when ``normalise`` (a constant patch becomes 0)."""
    t = patchify(crop.float(), patch)
    if normalise:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True, unbiased=False)
        t = (t - mean) / (var + 1e-6).sqrt()
    return t


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean per-voxel error over the masked patches only (``mask`` 1 = masked, ``[B, tokens]``);
    ``pred`` and ``target`` ``[B, tokens, voxels]``. The visible patches do not count."""
    err = (pred.float() - target).pow(2) if kind == "mse" else (pred.float() - target).abs()
    per_patch = err.mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def mae_baselines(target: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``[2]``: the masked-patch loss of (each masked patch's own mean intensity, the voxel-wise mean of
    the crop's visible patches), in the loss's own space. The first knows what no network is told (each
    hidden patch's brightness): a model below it has learned structure inside patches; the second is
    what copying the visible context gives."""
    own_mean = target.mean(dim=-1, keepdim=True).expand_as(target)
    vis = (1 - mask).to(target.dtype).unsqueeze(-1)
    visible_mean = (target * vis).sum(dim=1, keepdim=True) / vis.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.stack([mae_loss(own_mean, target, mask, kind), mae_loss(visible_mean.expand_as(target), target, mask, kind)])


def mae_forward(model: nn.Module, batch: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], precision: Precision,
                gather: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of the MAE on the batch's clean crops (``batch["image"]``); returns
    ``(loss, loss, 0)`` so that the pre-training loop logs it as its reconstruction term (an
    MAE has no contrastive term; ``gather`` is accepted for the loop's signature and unused)."""
    crop = plain_tensor(batch["image"]).to(precision.device, non_blocking=True)
    with precision.autocast():
        pred, mask = model(crop)
    target = mae_target(crop, int(cfg["patch_size"]), bool(cfg["mae_norm_target"]))
    loss = mae_loss(pred, target, mask, cfg["mae_loss"])
    return loss, loss.detach(), torch.zeros((), device=loss.device)


@torch.no_grad()
def evaluate_mae(model: nn.Module, loader, cfg: Mapping[str, Any], precision: Precision) -> dict[str, float]:
    """Validation on fixed crops (the loader's fixed-seed views) with fixed masks (``val_seed``, batch by
    batch; the training random state is left as it was): the masked-patch loss (``val_recon`` =
    ``val_total``) and its baselines (``val_patch_mean``, ``val_visible_mean``, see ``mae_baselines``).
    All-reduced over ranks, each batch weighted by its number of crops."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(MAE_VAL_KEYS) + 1, dtype=torch.float64, device=precision.device)
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(loader):
            torch.manual_seed(int(cfg["val_seed"]) + i)  # the mask indices come from the CPU generator
            crop = plain_tensor(batch["image"]).to(precision.device)
            with precision.autocast():
                pred, mask = model(crop)
            target = mae_target(crop, int(cfg["patch_size"]), bool(cfg["mae_norm_target"]))
            loss = mae_loss(pred, target, mask, cfg["mae_loss"])
            base = mae_baselines(target, mask, cfg["mae_loss"])
            n = float(crop.shape[0])
            means = torch.stack([loss.double(), loss.double(), *base.double()])
            sums += torch.cat([means * n, torch.tensor([n], dtype=torch.float64, device=sums.device)])
    sums = all_reduce_sum(sums)
    model.train(was_training)
    count = max(sums[-1].item(), 1.0)
    return {k: sums[j].item() / count for j, k in enumerate(MAE_VAL_KEYS)}


def unpatchify(tokens: torch.Tensor, patch: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of ``patchify`` for a crop of ``shape`` ``[B, C, X, Y, Z]``."""
    b, c, X, Y, Z = shape
    x = tokens.reshape(b, X // patch, Y // patch, Z // patch, patch, patch, patch, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, X, Y, Z)


__all__ = [
    "MAE_VAL_KEYS", "build_mae", "is_mae_state", "mae_encoder_state", "patchify", "unpatchify", "mae_target",
    "mae_loss", "mae_baselines", "mae_forward", "evaluate_mae",
]
