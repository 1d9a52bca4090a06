"""Speed-ups for MONAI's ViTAutoEnc and UNETR: patches of MONAI internals that compute the same
thing faster or with less memory (``tests/test_speedups.py`` compares each one with the plain
model; ``benchmarks/run.py`` measures the speed).

``ssl_utils.models`` builds MONAI's plain models; ``apply_speedups(model, cfg, device)`` is the one
entry point that moves a model to its device and patches it according to the config:

- ``set_sdpa`` (``cfg["sdpa"]``): MONAI's ``scaled_dot_product_attention`` path in every
  self-attention block instead of its einsum attention;
- ``contiguous_tokens`` (always): one copy of the token sequence after the patch embedding
  instead of one per LayerNorm;
- ``recompute_gelu`` (``cfg["recompute_gelu"]``): each ViT block's GELU is recomputed in the
  backward pass rather than stored (``RecomputeGeluMLP``, ``_GeluLinear``);
- ``to_channels_last`` (``use_channels_last(cfg["channels_last"], device)``, only for networks
  with 3D convolutions beyond the patch embedding, i.e. UNETR): channels-last 3D layout
  (``InstanceNormCL``, ``ImageConv3dCL``).

It also applies the precision policy, on every version: ``keep_fp32_parts(model, cfg["fp32_parts"])``
runs the named parts of a model in fp32 under autocast (see ``FP32_PARTS``). The default keeps
ViTAutoEnc's first reconstruction layer in fp32: on CPUs, oneDNN's bf16 input gradient of a
transposed convolution with kernel = stride = 4 and 16 output channels is wrong (relative error
about 1 against fp64; torch 2.13.0, results/precision/sweep.md), so under bf16 autocast every
gradient upstream of that layer was noise and pre-training stalled.

The patches rely on MONAI internals (attribute names, module classes), so ``apply_speedups`` only
applies them on the versions they were verified on (``VERIFIED_MONAI``, ``VERIFIED_TORCH``); on
any other version it warns and returns the plain model (same results, slower).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import monai
import torch
from monai.networks.blocks.mlp import MLPBlock
from torch import nn

VERIFIED_MONAI = ("1.6.1",)  # MONAI releases the patches were checked on (tests/test_speedups.py)
VERIFIED_TORCH = ("2.13",)  # torch 2.13.x


def _release(version: str) -> str:
    """``"1.6.1+12.gabc"`` -> ``"1.6.1"``; ``"2.13.0+cpu"`` -> ``"2.13.0"``."""
    return str(version).split("+")[0].strip()


def speedups_supported(monai_version: str | None = None, torch_version: str | None = None) -> tuple[bool, str]:
    """Whether the patches were verified on these MONAI and torch versions (default: the installed
    ones), and, when not, a message that says which were found and which were verified."""
    monai_version = _release(monai.__version__ if monai_version is None else monai_version)
    torch_version = _release(torch.__version__ if torch_version is None else torch_version)
    torch_minor = ".".join(torch_version.split(".")[:2])
    problems = []
    if monai_version not in VERIFIED_MONAI:
        problems.append(f"MONAI {monai_version} (verified: {', '.join(VERIFIED_MONAI)})")
    if torch_minor not in VERIFIED_TORCH:
        problems.append(f"torch {torch_version} (verified: {', '.join(v + '.x' for v in VERIFIED_TORCH)})")
    if not problems:
        return True, f"MONAI {monai_version}, torch {torch_version}: speed-ups verified"
    return False, (
        "ssl_utils.speedups: found " + " and ".join(problems) + "; the speed-ups patch MONAI internals "
        "and were not verified on this version, so they are not applied: running the plain MONAI "
        "models (same results, slower)."
    )


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


_MARK = "_ssl_contiguous_tokens"  # set on a patch embedding once its hook is registered


def _contiguous_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def contiguous_tokens(vit: nn.Module) -> nn.Module:
    """Make the ViT's token sequence contiguous once, after the patch embedding.

    MONAI's convolutional patch embedding returns ``[B, tokens, hidden]`` as a transposed view;
    the residual sums keep that layout through all the blocks, so every LayerNorm (two per block,
    forward and backward) copies its input first. One copy here removes them; values are
    unchanged. Registers the hook once (a second call on the same ViT does nothing).
    """
    if not getattr(vit.patch_embedding, _MARK, False):
        vit.patch_embedding.register_forward_hook(_contiguous_output)
        setattr(vit.patch_embedding, _MARK, True)
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


# --------------------------------------------------------------------------------------------
# precision policy: parts of a model that run in fp32 under autocast
# --------------------------------------------------------------------------------------------


class _Fp32Forward:
    """Mixin (placed before a module's class): the module's forward runs with autocast off and its
    bf16 / fp16 tensor arguments cast to fp32, so its forward and backward are fp32 whatever the
    caller's autocast; its output is fp32. Parameters, buffers and the state dict are unchanged."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a
                     for a in args)
        with torch.autocast(device_type=device, enabled=False):
            return super().forward(*args, **kwargs)  # type: ignore[misc]


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    """``Fp32<cls>``: ``cls`` with ``_Fp32Forward`` first in its MRO (one class per ``cls``, registered
    in this module under its name so that pickling a patched model finds it)."""
    if cls not in _FP32_CLASSES:
        name = f"Fp32{cls.__name__}"
        new = type(name, (_Fp32Forward, cls), {"__module__": __name__, "__qualname__": name,
                                                "__doc__": f"``{cls.__name__}`` run in fp32 under autocast (``keep_fp32``)."})
        _FP32_CLASSES[cls] = globals()[name] = new
    return _FP32_CLASSES[cls]


def keep_fp32(module: nn.Module) -> nn.Module:
    """Run ``module`` in fp32 under autocast (in place: its class becomes ``Fp32<class>``, a
    subclass, so ``isinstance`` checks and the state dict are unchanged). Idempotent."""
    if not isinstance(module, _Fp32Forward):
        module.__class__ = _fp32_class(type(module))
    return module


def _modules_of(*types: type):
    return lambda model: [m for m in model.modules() if isinstance(m, types)]


def _vitautoenc_layer(attribute: str):
    def select(model: nn.Module) -> list[nn.Module]:
        from monai.networks.nets import ViTAutoEnc

        return [getattr(m, attribute) for m in model.modules() if isinstance(m, ViTAutoEnc)]

    return select


def _fp32_parts() -> dict[str, Any]:
    from monai.networks.blocks.selfattention import SABlock

    return {
        "layernorm": _modules_of(nn.LayerNorm),  # every LayerNorm of the ViT (two per block, the final one)
        "attention": _modules_of(SABlock),  # qkv projection, attention (SDPA / softmax), output projection
        "mlp": _modules_of(MLPBlock),  # both linear layers and the GELU (recomputed or stored)
        "head_deconv1": _vitautoenc_layer("conv3d_transpose"),  # ViTAutoEnc: tokens -> deconv_chns, kernel 4
        "head_deconv2": _vitautoenc_layer("conv3d_transpose_1"),  # ViTAutoEnc: -> the reconstruction (the loss's input)
    }


FP32_PARTS = ("layernorm", "attention", "mlp", "head_deconv1", "head_deconv2")  # the names ``fp32_parts`` takes


def keep_fp32_parts(model: nn.Module, parts: Any) -> int:
    """Run the named ``parts`` of ``model`` (any of ``FP32_PARTS``) in fp32 under autocast; a part
    ``model`` does not have (UNETR has no ViTAutoEnc head) is skipped. Returns the number of modules
    changed. Without autocast (fp32 runs) nothing changes numerically."""
    selectors = _fp32_parts()
    unknown = [p for p in parts if p not in selectors]
    if unknown:
        raise ValueError(f"fp32_parts: unknown part(s) {unknown}; expected some of {list(FP32_PARTS)}")
    n = 0
    for part in parts:
        for module in selectors[part](model):
            n += not isinstance(module, _Fp32Forward)
            keep_fp32(module)
    return n


def _vits(model: nn.Module) -> list[nn.Module]:
    """The ViTs in ``model``: every module with a ``patch_embedding`` submodule (ViTAutoEnc itself,
    UNETR's ``vit``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "patch_embedding", None), nn.Module)]


def _has_image_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has ``Conv3d`` layers outside its patch embeddings (UNETR's convolutional
    encoder and decoder; ViTAutoEnc has none: its decoder is transposed convolutions)."""
    in_patch_embedding = {id(m) for vit in _vits(model) for m in vit.patch_embedding.modules()}
    return any(isinstance(m, nn.Conv3d) and id(m) not in in_patch_embedding for m in model.modules())


def apply_speedups(model: nn.Module, cfg: Mapping[str, Any], device: torch.device | str) -> nn.Module:
    """Move ``model`` (a plain ``ViTAutoEnc`` or ``UNETR``, before any DDP / ``torch.compile``
    wrapper) to ``device`` and apply the speed-ups ``cfg`` selects, in place; returns the model.

    SDPA attention (``cfg["sdpa"]``), contiguous tokens after the patch embedding (always), GELU
    recomputation (``cfg["recompute_gelu"]``) and, for networks with 3D convolutions beyond the
    patch embedding (UNETR), channels-last 3D (``use_channels_last(cfg["channels_last"], device)``).
    Same results as the plain model (tests); parameter names and the state dict are unchanged, so
    weights load either way. Calling it again (same config) on a patched model changes nothing;
    patches are never undone.

    The precision policy (``keep_fp32_parts(model, cfg["fp32_parts"])``) is applied last, on every
    version: it changes which dtype parts of the model compute in under autocast, not what they compute.

    On MONAI / torch versions other than ``VERIFIED_MONAI`` / ``VERIFIED_TORCH`` nothing else is
    patched: one ``RuntimeWarning`` says so and the plain model is returned, on ``device``.
    """
    supported, message = speedups_supported()
    if not supported:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        model = model.to(device)
        keep_fp32_parts(model, cfg["fp32_parts"])
        return model
    model = model.to(device)
    set_sdpa(model, bool(cfg["sdpa"]))
    for vit in _vits(model):
        contiguous_tokens(vit)
    if cfg["recompute_gelu"]:
        recompute_gelu(model)
    if _has_image_convolutions(model) and use_channels_last(cfg["channels_last"], device):
        to_channels_last(model)
    keep_fp32_parts(model, cfg["fp32_parts"])
    return model
