"""Models (ViTAutoEnc for pre-training, UNETR for fine-tuning) and encoder weight transfer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from monai.networks.blocks.mlp import MLPBlock
from monai.networks.nets import UNETR, ViTAutoEnc
from torch import nn


def set_sdpa(model: nn.Module, enabled: bool = True) -> int:
    """Switch MONAI's ``scaled_dot_product_attention`` path on or off in every self-attention block.

    Returns the number of blocks changed. The SDPA path computes the same attention as the
    default einsum path (tests check this), in fused kernels.
    """
    from monai.networks.blocks.selfattention import SABlock

    n = 0
    for module in model.modules():
        if isinstance(module, SABlock):
            if enabled and (module.save_attn or module.rel_positional_embedding is not None):
                continue  # SDPA path cannot return attention maps / relative position terms
            module.use_flash_attention = bool(enabled)
            n += 1
    return n


def _contiguous_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def contiguous_tokens(vit: nn.Module) -> nn.Module:
    """Make the ViT's token sequence contiguous once, after the patch embedding.

    MONAI's convolutional patch embedding returns ``[B, tokens, hidden]`` as a transposed view;
    the residual sums keep that layout through all the blocks, so every LayerNorm (two per block,
    forward and backward) copies its input first. One copy here removes them; values are
    unchanged.
    """
    vit.patch_embedding.register_forward_hook(_contiguous_output)
    return vit


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(a), weight, bias)`` that keeps ``a`` for the backward pass but not
    ``gelu(a)``: the GELU (cheap) is recomputed in the backward pass instead of storing the
    largest activation of a ViT block (``[B, tokens, mlp_dim]``, 4x the hidden size)."""

    @staticmethod
    def forward(ctx, a, weight, bias, approximate):  # type: ignore[override]
        ctx.approximate = approximate
        ctx.save_for_backward(a, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(nn.functional.gelu(a, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, weight = ctx.saved_tensors
        dtype = grad.dtype  # under autocast the forward ran in a lower precision; so does this
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_a = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            h = nn.functional.gelu(a, approximate=ctx.approximate).to(dtype)
            grad_w = (g2.t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_h = (grad @ weight.to(dtype)).to(a.dtype)
            grad_a = torch.ops.aten.gelu_backward(grad_h, a, approximate=ctx.approximate)
        return grad_a, grad_w, grad_b, None


class RecomputeGeluMLP(MLPBlock):
    """MONAI's ``MLPBlock`` that stores ``linear1``'s output but not the GELU's (see ``recompute_gelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (
            not torch.is_grad_enabled()
            or not isinstance(self.fn, nn.GELU)
            or (self.training and isinstance(self.drop1, nn.Dropout) and self.drop1.p > 0)
        )
        if plain:
            return super().forward(x)
        a = self.linear1(x)
        return self.drop2(_GeluLinear.apply(a, self.linear2.weight, self.linear2.bias, self.fn.approximate))


def recompute_gelu(model: nn.Module) -> int:
    """Let every MONAI ``MLPBlock`` (GELU, no active dropout between its two layers) recompute its
    GELU in the backward pass rather than store its output: one ``[B, tokens, mlp_dim]`` tensor
    less per ViT block (20% of a ViT-B block's activations; 0.5 GiB at the paper's pre-training
    batch), for one extra elementwise GELU per block. Same values and gradients (tests); the
    module keeps its submodules and state dict (its class becomes ``RecomputeGeluMLP``, a
    subclass of ``MLPBlock``). Returns the number of blocks changed."""
    n = 0
    for module in model.modules():
        if type(module) is MLPBlock and isinstance(module.fn, nn.GELU):
            module.__class__ = RecomputeGeluMLP
            n += 1
    return n


def build_vitautoenc(cfg: dict[str, Any], reference: bool = False) -> ViTAutoEnc:
    """``ViTAutoEnc`` from a config (paper: 96^3, patch 16, hidden 768, mlp 3072, 12 layers, 12 heads).

    Input ``[B, 1, roi, roi, roi]`` -> (reconstruction ``[B, 1, roi, roi, roi]``, hidden states).
    ``reference=True``: MONAI's model exactly as the reference tutorial builds it (einsum
    attention, no layout hooks), for side-by-side comparisons; same weights for the same seed.
    """
    model = ViTAutoEnc(
        in_channels=1,
        img_size=(cfg["roi"],) * 3,
        patch_size=(cfg["patch_size"],) * 3,
        out_channels=1,
        deconv_chns=cfg.get("deconv_chns", 16),
        hidden_size=cfg["hidden_size"],
        mlp_dim=cfg["mlp_dim"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        proj_type=cfg["proj_type"],
        dropout_rate=cfg.get("dropout_rate", 0.0),
    )
    if reference:
        return model
    set_sdpa(model, cfg.get("sdpa", True))
    contiguous_tokens(model)
    if cfg.get("recompute_gelu", True):
        recompute_gelu(model)
    return model


def build_unetr(cfg: dict[str, Any], reference: bool = False) -> UNETR:
    """``UNETR`` from a config (paper: feature 16, hidden 768, mlp 3072, 12 heads, instance norm,
    residual blocks, 14 outputs). Input ``[B, 1, roi^3]`` -> logits ``[B, out_channels, roi^3]``.
    ``reference=True``: MONAI's model as the reference builds it (see ``build_vitautoenc``)."""
    if cfg["num_layers"] != 12 or cfg["patch_size"] != 16:
        raise ValueError(
            "UNETR uses 12 transformer layers and patch size 16; "
            f"this config has num_layers={cfg['num_layers']}, patch_size={cfg['patch_size']}"
        )
    model = UNETR(
        in_channels=1,
        out_channels=cfg["out_channels"],
        img_size=(cfg["roi"],) * 3,
        feature_size=cfg["feature_size"],
        hidden_size=cfg["hidden_size"],
        mlp_dim=cfg["mlp_dim"],
        num_heads=cfg["num_heads"],
        proj_type=cfg["proj_type"],
        norm_name=cfg.get("norm_name", "instance"),
        res_block=cfg.get("res_block", True),
        dropout_rate=cfg.get("dropout_rate", 0.0),
    )
    if reference:
        return model
    set_sdpa(model, cfg.get("sdpa", True))
    contiguous_tokens(model.vit)
    if cfg.get("recompute_gelu", True):
        recompute_gelu(model)
    return model


# --------------------------------------------------------------------------------------------
# channels-last 3D: UNETR's convolutions in the layout oneDNN runs fastest on CPU
# --------------------------------------------------------------------------------------------


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` sums over the spatial axes of ``a * b`` for channels-last ``[N, C, D, H, W]``
    tensors: the diagonal of a ``C x C`` batched matrix product, which reads the memory once at
    matrix-multiply speed."""
    n, c = a.shape[:2]
    a_flat = a.permute(0, 2, 3, 4, 1).reshape(n, -1, c)  # views, for channels-last tensors
    b_flat = b.permute(0, 2, 3, 4, 1).reshape(n, -1, c)
    return torch.bmm(a_flat.transpose(1, 2), b_flat).diagonal(dim1=1, dim2=2)


def _stats(x: torch.Tensor, centred: torch.Tensor, eps: float) -> torch.Tensor:
    count = x[0, 0].numel()
    return (_channel_dot(centred, centred) / count + eps).rsqrt().reshape(x.shape[0], x.shape[1], 1, 1, 1)


def _normalise_(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Instance normalisation of a channels-last tensor, in place (inference)."""
    x.sub_(x.mean(dim=(2, 3, 4), keepdim=True))
    return x.mul_(_stats(x, x, eps))


class _InstanceNormCL(torch.autograd.Function):
    """Instance normalisation (no affine) of a channels-last ``[N, C, D, H, W]`` tensor, keeping
    its layout. Same maths as ``F.instance_norm``: biased variance over the spatial axes, computed
    around the mean (two passes), ``(x - mean) / sqrt(var + eps)``. The sums of squares are the
    diagonal of a ``C x C`` batched matrix product over the spatial axis, which reads the
    channels-last memory once at matrix-multiply speed. Saves the input (not the output, which
    MONAI's in-place LeakyReLU overwrites)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        y = x - mean  # channels-last, like x
        rstd = _stats(x, y, eps)
        ctx.save_for_backward(x, mean, rstd)
        return y.mul_(rstd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, mean, rstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        xhat = (x - mean).mul_(rstd)
        mean_gx = (_channel_dot(grad, xhat) / x[0, 0].numel()).reshape(mean.shape)
        mean_g = grad.mean(dim=(2, 3, 4), keepdim=True)
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - xhat * mean(g * xhat))
        return xhat.mul_(-mean_gx).add_(grad).sub_(mean_g).mul_(rstd), None


class InstanceNormCL(nn.Module):
    """Drop-in for ``nn.InstanceNorm3d`` (no running statistics) that keeps channels-last 3D
    tensors channels-last. ``nn.InstanceNorm3d`` converts them to the default layout, so in a
    channels-last network every convolution would convert them back; the two conversions cost
    more than the normalisation. Other inputs (default layout, other ranks) take
    ``F.instance_norm``. Low-precision inputs are normalised in float32 (as autocast does) and
    returned in float32. The affine ``weight``/``bias`` (when the replaced layer has them) keep
    their names, so state dicts are unchanged."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False, inplace_inference: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine = int(num_features), float(eps), bool(affine)
        # Without autograd, normalise the input tensor in place (no new activation-sized tensor).
        # Only for layers whose input is a fresh convolution output that nothing else reads, as in
        # MONAI's UnetResBlock / UnetBasicBlock (``to_channels_last`` sets it there).
        self.inplace_inference = bool(inplace_inference)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_instance_norm(cls, layer: nn.modules.instancenorm._InstanceNorm, inplace_inference: bool = False) -> "InstanceNormCL":
        new = cls(layer.num_features, layer.eps, layer.affine, inplace_inference)
        if layer.affine:
            new.weight, new.bias = layer.weight, layer.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _channels_last(x):
            return nn.functional.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.inplace_inference and not torch.is_grad_enabled() and not x.requires_grad:
                y = _normalise_(x, self.eps)
            else:
                y = _InstanceNormCL.apply(x, self.eps)
            if self.affine:
                y = y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, channels_last=True"


def use_channels_last(cfg_value: Any, device: torch.device | str) -> bool:
    """Resolve the ``channels_last`` setting: ``"auto"`` means on for CPU, off elsewhere."""
    if cfg_value in ("auto", None):
        return torch.device(device).type == "cpu"
    if isinstance(cfg_value, bool):
        return cfg_value
    raise ValueError(f"channels_last must be 'auto', True or False, got {cfg_value!r}")


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put a 3D convolutional network (UNETR) in channels-last layout, in place.

    Convolution weights become ``channels_last_3d`` (PyTorch then runs every convolution, and
    returns its output, in that layout, whatever the input's layout), and each
    ``nn.InstanceNorm3d`` without running statistics becomes an ``InstanceNormCL``, which keeps
    the layout; convolutions of the one-channel image become ``ImageConv3dCL``, which return it. Same results up to float rounding (tests compare outputs and gradients); parameter
    names and the state dict are unchanged. On a CPU with AVX2 this makes UNETR's
    convolutions about 1.7x faster (benchmarks/).
    """
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock

    for parent in list(model.modules()):
        fresh_inputs = isinstance(parent, (UnetResBlock, UnetBasicBlock))  # each norm follows its own conv
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and not child.track_running_stats:
                setattr(parent, name, InstanceNormCL.from_instance_norm(child, inplace_inference=fresh_inputs))
        if type(parent) is nn.Conv3d and parent.in_channels == 1:
            parent.__class__ = ImageConv3dCL
    return model.to(memory_format=torch.channels_last_3d)


class ImageConv3dCL(nn.Conv3d):
    """A convolution of the one-channel image in a channels-last network.

    With one input channel PyTorch cannot tell the layouts apart and returns the default one; this
    returns channels-last, so the norm and the residual sum after it stay in layout. A 1x1x1 one
    (UNETR's first residual projection), without autograd and autocast, is computed as what it is,
    ``bias + image * weight`` per output channel, in one pass straight into a channels-last tensor
    (oneDNN's kernel for one input channel, plus the layout conversion, cost 6x more).
    """

    def _pointwise(self) -> bool:
        return (
            tuple(self.kernel_size) == (1, 1, 1) and tuple(self.stride) == (1, 1, 1)
            and tuple(self.dilation) == (1, 1, 1) and tuple(self.padding) == (0, 0, 0) and self.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        if self._pointwise() and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            n, _, d, h, w = x.shape
            c = self.out_channels
            out = torch.empty((n, c, d, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
            weight = self.weight.reshape(1, c, 1, 1, 1).to(x.dtype)
            bias = torch.zeros_like(weight) if self.bias is None else self.bias.reshape(1, c, 1, 1, 1).to(x.dtype)
            return torch.addcmul(bias, x, weight, out=out)
        return super().forward(x).contiguous(memory_format=torch.channels_last_3d)


def prepare_model(model: nn.Module, cfg: dict[str, Any], device: torch.device | str) -> nn.Module:
    """Move a model to ``device`` and apply the layout settings of ``cfg`` (``channels_last``)."""
    model = model.to(device)
    if use_channels_last(cfg.get("channels_last", "auto"), device):
        to_channels_last(model)
    return model


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


def load_pretrained_vit(
    unetr: nn.Module,
    checkpoint_path: str | os.PathLike,
    strict: bool = True,
) -> TransferReport:
    """Copy a pre-trained ViT encoder into ``unetr.vit`` and report what was loaded.

    Accepts this project's checkpoints, the reference's ``{"state_dict": ...}``, a bare state
    dict and a UNETR checkpoint (its ``vit.`` tensors); ``module.`` / ``_orig_mod.`` prefixes are
    stripped. Decoder tensors
    (``conv3d_transpose*``) are reported as unexpected and skipped.

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
    if not any(k in target for k in state) and any(k.startswith("vit.") for k in state):
        # a UNETR checkpoint (e.g. a fine-tuned model): its encoder lives under "vit."
        state = {(k[4:] if k.startswith("vit.") else k): v for k, v in state.items()}
    report = TransferReport(checkpoint=path, epoch=epoch)
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
