"""Each speed-up computes the same thing as the formulation it replaces (equal results, not speed:
speed is measured by ``benchmarks/run.py``).

- the O(B^2) contrastive loss against MONAI's ``ContrastiveLoss`` (values and gradients, float64);
- SDPA attention against MONAI's einsum attention (ViTAutoEnc and UNETR outputs and gradients);
- ``apply_speedups`` on ViTAutoEnc (SDPA, contiguous tokens, GELU recomputed in backward) against
  MONAI's plain model, and the activation memory the recomputation saves; the recomputation's
  gradients under bf16 autocast;
- both views in one batch (``ssl_forward``) against two separate model calls + MONAI's loss;
- bf16 autocast against fp32 (close, loose tolerance);
- UNETR in channels-last 3D layout (``to_channels_last``, ``InstanceNormCL``) against the default
  layout (outputs and gradients, float64 for the norm, float32 for the network);
- ``apply_speedups`` on an unverified MONAI version: a warning and the plain model;
- the cached deterministic stage (``SeededCacheDataset``) against a plain ``Dataset`` re-running it.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np
import pytest
import torch
from monai.losses import ContrastiveLoss

from ssl_utils import build_unetr, build_vitautoenc, contrastive_loss, get_config
from ssl_utils.pretrain import ssl_forward
from ssl_utils.runtime import Precision
from ssl_utils.speedups import (
    ImageConv3dCL,
    InstanceNormCL,
    RecomputeGeluMLP,
    apply_speedups,
    recompute_gelu,
    set_sdpa,
    speedups_supported,
    use_channels_last,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def _sdpa_flags(model: torch.nn.Module) -> list[bool]:
    from monai.networks.blocks.selfattention import SABlock

    return [m.use_flash_attention for m in model.modules() if isinstance(m, SABlock)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------
# contrastive loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_contrastive_loss_and_gradients_match_monai(temperature):
    g = torch.Generator().manual_seed(7)
    # correlated views, as two reconstructions of one crop are
    base = torch.randn(8, 4096, dtype=torch.float64, generator=g)
    a0 = base + 0.3 * torch.randn(8, 4096, dtype=torch.float64, generator=g)
    b0 = base + 0.3 * torch.randn(8, 4096, dtype=torch.float64, generator=g)

    a_ref, b_ref = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ref = ContrastiveLoss(temperature=temperature)(a_ref, b_ref)
    ref.backward()
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ours = contrastive_loss(a, b, temperature=temperature)
    ours.backward()

    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-8, atol=1e-12)
    assert a.grad.abs().max() > 0  # the comparison is not between two zero gradients


# ------------------------------------------------------------------------------------------------
# SDPA attention
# ------------------------------------------------------------------------------------------------


def _tiny_cfg(**kw):
    return get_config("smoke", **kw)


def _fast(model: torch.nn.Module, **kw) -> torch.nn.Module:
    """``model`` with the speed-ups of the smoke config (``kw``: other settings), on the CPU."""
    return apply_speedups(model, _tiny_cfg(**kw), "cpu")


@pytest.mark.parametrize(
    "kind, dtype, tol",
    [("vitautoenc", torch.float64, 1e-9), ("unetr", torch.float32, 1e-4)],  # float64 convolutions are slow on CPU
)
def test_sdpa_matches_einsum_attention(kind, dtype, tol):
    cfg = _tiny_cfg()
    build = build_vitautoenc if kind == "vitautoenc" else build_unetr
    torch.manual_seed(0)
    model = build(cfg)
    assert not any(_sdpa_flags(model))  # MONAI's plain model: einsum attention
    model = _fast(model, channels_last=False).to(dtype)
    assert all(_sdpa_flags(model)) and len(_sdpa_flags(model)) == cfg["num_layers"]  # default: SDPA on
    x = torch.rand(1, 1, cfg["roi"], cfg["roi"], cfg["roi"], generator=torch.Generator().manual_seed(1), dtype=dtype)

    def run(sdpa: bool):
        assert set_sdpa(model, sdpa) == cfg["num_layers"]
        assert _sdpa_flags(model) == [sdpa] * cfg["num_layers"]
        model.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        # a loss that depends on every output voxel non-uniformly
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach().clone(), _grads(model)

    out_einsum, g_einsum = run(False)
    out_sdpa, g_sdpa = run(True)
    torch.testing.assert_close(out_sdpa, out_einsum, rtol=tol, atol=tol * out_einsum.abs().max().item())
    assert g_sdpa.keys() == g_einsum.keys()
    qkv = [k for k in g_sdpa if "qkv" in k]
    assert qkv and all(g_sdpa[k].abs().max() > 0 for k in qkv)  # attention weights do get gradients
    for k in g_einsum:
        scale = g_einsum[k].abs().max().item()
        torch.testing.assert_close(g_sdpa[k], g_einsum[k], rtol=10 * tol, atol=10 * tol * max(scale, 1e-12),
                                   msg=lambda m, k=k: f"{k}: {m}")


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd stores for the backward pass while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_sped_up_vitautoenc_equals_plain_model_and_stores_less():
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    ref = build_vitautoenc(cfg).double()
    ours = _fast(build_vitautoenc(cfg)).double()
    ours.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, RecomputeGeluMLP) for m in ours.modules()) == cfg["num_layers"]
    assert not any(isinstance(m, RecomputeGeluMLP) for m in ref.modules()) and not any(_sdpa_flags(ref))
    r = cfg["roi"]
    x = torch.rand(3, 1, r, r, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
    results = []
    for model in (ref, ours):
        model.zero_grad(set_to_none=True)
        out, hidden = model(x)
        (out * weight).sum().backward()
        results.append((out.detach(), [h.detach() for h in hidden], _grads(model)))
    (o_ref, h_ref, g_ref), (o_ours, h_ours, g_ours) = results
    torch.testing.assert_close(o_ours, o_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(h_ours, h_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert g_ours.keys() == g_ref.keys()
    assert all(g_ours[k].abs().max() > 0 for k in g_ours if "mlp.linear" in k)
    for k in g_ref:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-8, atol=1e-10 * max(g_ref[k].abs().max().item(), 1e-12),
                                   msg=lambda m, k=k: f"{k}: {m}")
    # without autograd (validation, inference) the plain path runs: same values
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], o_ref, rtol=1e-9, atol=1e-10)

    # the GELU output ([B, tokens, mlp_dim] per block) is no longer stored for the backward pass
    plain = _fast(build_vitautoenc(cfg), recompute_gelu=False).double()
    plain.load_state_dict(ref.state_dict())
    stored_plain = _saved_bytes(lambda: plain(x)[0].sum())
    stored_ours = _saved_bytes(lambda: ours(x)[0].sum())
    tokens = (r // cfg["patch_size"]) ** 3
    gelu_out = cfg["num_layers"] * 3 * tokens * cfg["mlp_dim"] * 8
    assert stored_plain - stored_ours == gelu_out


def test_recomputed_gelu_gradients_under_bf16_autocast_match_mlp_block():
    """Under bf16 autocast (the CPU's mixed precision) the recomputed GELU gives MONAI's
    ``MLPBlock``'s output and, up to bf16 rounding, its gradients (input and all four parameters,
    which stay float32)."""
    from monai.networks.blocks.mlp import MLPBlock

    torch.manual_seed(0)
    plain = MLPBlock(32, 128, dropout_rate=0.0)
    ours = copy.deepcopy(plain)
    assert recompute_gelu(ours) == 1 and isinstance(ours, RecomputeGeluMLP)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 64, 32, generator=g)
    weight = torch.randn(2, 64, 32, generator=g)
    results = []
    for block in (plain, ours):
        block.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        assert out.dtype == torch.bfloat16  # autocast really ran in bf16
        (out.float() * weight).sum().backward()
        results.append((out.detach().float(), {"input": x.grad, **_grads(block)}))
    (o_plain, g_plain), (o_ours, g_ours) = results
    torch.testing.assert_close(o_ours, o_plain, rtol=1e-2, atol=1e-2 * o_plain.abs().max().item())
    assert g_ours.keys() == g_plain.keys() == {"input", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    for k in g_plain:
        assert g_ours[k].dtype == g_plain[k].dtype == torch.float32, k
        assert torch.isfinite(g_ours[k]).all() and g_plain[k].abs().max() > 0, k
        scale = g_plain[k].abs().max().item()
        torch.testing.assert_close(g_ours[k], g_plain[k], rtol=2e-2, atol=2e-2 * scale, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# both views in one batch
# ------------------------------------------------------------------------------------------------


def test_one_batch_two_view_forward_equals_reference_two_calls():
    """``ssl_forward`` (one call on ``[2B, ...]``, our loss) equals the reference step: two model
    calls, ``L1Loss`` and MONAI's ``ContrastiveLoss`` on the flattened reconstructions, ``r + c * r``."""
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = _fast(build_vitautoenc(cfg))
    model.train()
    g = torch.Generator().manual_seed(3)
    r = cfg["roi"]
    gt = torch.rand(4, 1, r, r, r, generator=g)
    batch = {
        "gt_image": gt,
        "image": gt * (torch.rand(4, 1, r, r, r, generator=g) > 0.3),
        "image_2": gt * (torch.rand(4, 1, r, r, r, generator=g) > 0.3),
    }
    precision = Precision(torch.device("cpu"), None)

    total, rec, con, r1, r2 = ssl_forward(model, batch, cfg, precision)
    model.zero_grad(set_to_none=True)
    total.backward()
    ours_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    out1, _ = model(batch["image"])
    out2, _ = model(batch["image_2"])
    ref_r = torch.nn.L1Loss()(out1, batch["gt_image"])
    ref_c = ContrastiveLoss(temperature=cfg["temperature"])(out1.flatten(start_dim=1), out2.flatten(start_dim=1))
    ref_total = ref_r + ref_c * ref_r
    ref_total.backward()
    ref_grads = _grads(model)

    torch.testing.assert_close(r1, out1.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r2, out2.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(r1, r2)  # the two views do give different reconstructions
    torch.testing.assert_close(rec, ref_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(con, ref_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    assert ours_grads.keys() == ref_grads.keys()
    for k in ref_grads:
        scale = ref_grads[k].abs().max().item()
        torch.testing.assert_close(ours_grads[k], ref_grads[k], rtol=1e-3, atol=1e-4 * max(scale, 1e-8),
                                   msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------
# channels-last UNETR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_matches_instance_norm(affine):
    g = torch.Generator().manual_seed(5)
    x0 = (3 * torch.randn(2, 6, 7, 9, 5, generator=g, dtype=torch.float64) + 1.5)
    dy = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ref = torch.nn.InstanceNorm3d(6, eps=1e-5, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    ours = InstanceNormCL.from_instance_norm(ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]

    x_ref = x0.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(dy)
    grads_ref = [p.grad.clone() for p in ref.parameters()]
    ref.zero_grad()
    x_cl = x0.clone().to(memory_format=torch.channels_last_3d).requires_grad_(True)
    y_cl = ours(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last_3d) and not y_cl.is_contiguous()
    y_cl.backward(dy.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y_cl, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for got, want in zip((p.grad for p in ours.parameters()), grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # default-layout input: the plain F.instance_norm path, same values
    torch.testing.assert_close(ours(x0), y_ref.detach(), rtol=1e-12, atol=1e-12)


def test_channels_last_unetr_matches_default_layout():
    """Channels-last (``apply_speedups`` with ``channels_last="auto"`` on the CPU) keeps the state
    dict and gives UNETR's outputs and gradients (float32, so up to rounding); the activations
    really are channels-last."""
    cfg = _tiny_cfg(feature_size=4)
    torch.manual_seed(0)
    ref = _fast(build_unetr(cfg), feature_size=4, channels_last=False)
    n_norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in ref.modules())
    ours = _fast(build_unetr(cfg), feature_size=4, channels_last="auto")
    ours.load_state_dict(ref.state_dict())
    assert n_norms > 0 and sum(isinstance(m, InstanceNormCL) for m in ours.modules()) == n_norms
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in ours.modules())
    assert list(ours.state_dict()) == list(ref.state_dict())

    g = torch.Generator().manual_seed(2)
    r = cfg["roi"]
    x = torch.rand(2, 1, r, r, r, generator=g)
    y = torch.randint(0, cfg["out_channels"], (2, 1, r, r, r), generator=g)
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    layouts = []  # per InstanceNormCL call: was its input channels-last?
    for m in ours.modules():
        if isinstance(m, InstanceNormCL):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(
                inp[0].is_contiguous(memory_format=torch.channels_last_3d) and not inp[0].is_contiguous()))
    outs, losses, grads = [], [], []
    for model in (ref, ours):
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        outs.append(out.detach())
        losses.append(loss.detach())
        grads.append(_grads(model))
    # the convolutions that run in oneDNN (3x3x3, batch > 1) return channels-last activations,
    # and the norms keep them so (1x1x1 convolutions on one thread use another kernel)
    assert len(layouts) == n_norms and sum(layouts) >= n_norms // 2
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4 * outs[0].abs().max().item())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    # absolute tolerance on the scale of the whole gradient: a convolution followed by instance
    # norm has a gradient that cancels to about 0 (a 1-channel 1x1x1 conv: ~1e-6), pure rounding
    scale = max(g.abs().max().item() for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-3, atol=1e-5 * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")

    # inference (no autograd): in-place norms and the one-pass 1x1x1 projection of the image
    assert sum(isinstance(m, ImageConv3dCL) and m._pointwise() for m in ours.modules()) >= 1
    ref.eval()
    ours.eval()
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())

    # the setting: "auto" is on for the CPU only
    assert not use_channels_last("auto", "cuda")
    with pytest.raises(ValueError, match="channels_last"):
        use_channels_last("yes", "cpu")


# ------------------------------------------------------------------------------------------------
# apply_speedups: applying twice, the version guard
# ------------------------------------------------------------------------------------------------


def _unetr_input(cfg) -> torch.Tensor:
    r = cfg["roi"]
    return torch.rand(2, 1, r, r, r, generator=torch.Generator().manual_seed(8))


def test_apply_speedups_twice_changes_nothing_and_vitautoenc_keeps_its_layout():
    cfg = _tiny_cfg(feature_size=4, channels_last=True)
    torch.manual_seed(0)
    model = apply_speedups(build_unetr(cfg), cfg, "cpu")
    x = _unetr_input(cfg)
    with torch.no_grad():
        once = model(x)
    modules = [type(m) for m in model.modules()]
    assert apply_speedups(model, cfg, "cpu") is model
    assert [type(m) for m in model.modules()] == modules
    assert len(model.vit.patch_embedding._forward_hooks) == 1  # one contiguous-tokens hook, not two
    with torch.no_grad():
        assert torch.equal(model(x), once)
    # channels-last is for networks with convolutions beyond the patch embedding (UNETR) only
    vit = apply_speedups(build_vitautoenc(cfg), cfg, "cpu")
    assert sum(isinstance(m, RecomputeGeluMLP) for m in vit.modules()) == cfg["num_layers"]
    assert all(p.is_contiguous() for p in vit.parameters())


def test_unverified_monai_version_gets_the_plain_model_and_one_warning(monkeypatch):
    import monai

    ok, _ = speedups_supported()
    assert ok, "the installed MONAI/torch are the verified ones (else every speed-up test is moot)"
    ok, message = speedups_supported("0.9.9")
    assert not ok and "MONAI 0.9.9" in message and "1.6.1" in message
    ok, message = speedups_supported(torch_version="2.99.0+cpu")
    assert not ok and "torch 2.99.0" in message and "2.13.x" in message

    monkeypatch.setattr(monai, "__version__", "0.9.9")
    cfg = _tiny_cfg(feature_size=4, channels_last=True)
    torch.manual_seed(0)
    plain = build_unetr(cfg)
    torch.manual_seed(0)
    model = build_unetr(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = apply_speedups(model, cfg, "cpu")
    assert got is model
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    text = str(caught[0].message)
    assert "MONAI 0.9.9" in text and "1.6.1" in text and "plain MONAI models" in text and "slower" in text
    # nothing patched: einsum attention, no hook, stored GELU, default layout
    assert not any(_sdpa_flags(model)) and not model.vit.patch_embedding._forward_hooks
    assert not any(isinstance(m, (RecomputeGeluMLP, InstanceNormCL, ImageConv3dCL)) for m in model.modules())
    assert all(p.is_contiguous() for p in model.parameters())
    x = _unetr_input(cfg)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


# ------------------------------------------------------------------------------------------------
# autocast
# ------------------------------------------------------------------------------------------------


def test_bf16_autocast_forward_close_to_fp32():
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = _fast(build_vitautoenc(cfg)).eval()
    g = torch.Generator().manual_seed(4)
    r = cfg["roi"]
    gt = torch.rand(2, 1, r, r, r, generator=g)
    batch = {"gt_image": gt, "image": gt * (torch.rand(2, 1, r, r, r, generator=g) > 0.3),
             "image_2": gt * (torch.rand(2, 1, r, r, r, generator=g) > 0.3)}
    cpu = torch.device("cpu")
    bf16 = Precision(cpu, torch.bfloat16)
    with torch.no_grad():
        with bf16.autocast():
            raw, _ = model(batch["image"])
        total32, rec32, con32, r1_32, _ = ssl_forward(model, batch, cfg, Precision(cpu, None))
        total16, rec16, con16, r1_16, _ = ssl_forward(model, batch, cfg, bf16)
    assert raw.dtype == torch.bfloat16  # autocast really ran in bf16
    assert r1_16.dtype == torch.float32  # ssl_forward hands the loss fp32 reconstructions
    rel = (r1_16 - r1_32).norm() / r1_32.norm()
    assert rel < 0.05, f"bf16 reconstruction differs from fp32 by {rel:.3f} (relative L2)"
    assert abs(rec16 - rec32) / rec32 < 0.05
    assert abs(total16 - total32) / total32 < 0.05
    assert torch.isfinite(con16)


# ------------------------------------------------------------------------------------------------
# cached deterministic stage
# ------------------------------------------------------------------------------------------------


def _assert_items_equal(a, b, where: str) -> None:
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), where
        for k in x:
            if isinstance(x[k], (torch.Tensor, np.ndarray)):
                xa, ya = torch.as_tensor(np.asarray(x[k])), torch.as_tensor(np.asarray(y[k]))
                assert xa.shape == ya.shape, f"{where} crop {i} key {k}"
                assert torch.equal(xa, ya), f"{where} crop {i} key {k}: values differ"


def test_cached_pretrain_items_equal_uncached_dataset(smoke_cohort):
    from monai.data import Dataset

    from ssl_utils.datasets import SeededCacheDataset, mix_seed
    from ssl_utils.transforms import pretrain_transforms

    cfg = _tiny_cfg()
    with open(smoke_cohort["tcia_json"]) as f:
        entries = json.load(f)["training"][:3]
    files = [{"image": os.path.join(smoke_cohort["tcia_root"], e["image"])} for e in entries]
    cached = SeededCacheDataset(files, pretrain_transforms(cfg), seed=11)
    plain = Dataset(files, pretrain_transforms(cfg))
    first = {}
    for epoch in (1, 2):
        cached.set_epoch(epoch)
        for i in range(len(files)):
            plain.transform.set_random_state(seed=mix_seed(11, epoch, i))
            item = cached[i]
            _assert_items_equal(item, plain[i], f"epoch {epoch} item {i}")
            first.setdefault(i, item)
    # the random stage does change from epoch to epoch (so the equality above is not trivial)
    cached.set_epoch(1)
    again = cached[0]
    _assert_items_equal(again, first[0], "epoch 1 repeated")
    cached.set_epoch(2)
    assert not torch.equal(torch.as_tensor(cached[0][0]["image"]), torch.as_tensor(first[0][0]["image"]))


def test_cached_finetune_items_equal_uncached_dataset(smoke_cohort):
    from monai.data import Dataset

    from ssl_utils.datasets import SeededCacheDataset, mix_seed
    from ssl_utils.transforms import finetune_transforms

    cfg = _tiny_cfg()
    json_path = smoke_cohort["btcv_json"][max(smoke_cohort["btcv_json"])]
    with open(json_path) as f:
        entries = json.load(f)["training"][:2]
    files = [{k: os.path.join(smoke_cohort["btcv_root"], v) for k, v in e.items()} for e in entries]
    cached = SeededCacheDataset(files, finetune_transforms(cfg, train=True), seed=5)
    plain = Dataset(files, finetune_transforms(cfg, train=True))
    cached.set_epoch(3)
    for i in range(len(files)):
        plain.transform.set_random_state(seed=mix_seed(5, 3, i))
        _assert_items_equal(cached[i], plain[i], f"item {i}")


# ------------------------------------------------------------------------------------------------
# the harness itself runs (structure only; it never asserts a timing)
# ------------------------------------------------------------------------------------------------


def _load_benchmark():
    """``benchmarks/run.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_harness_writes_report(tmp_path, capsys):
    """``benchmarks/run.py`` at tiny sizes, in this process (its memory subprocesses are left out)."""
    bench = _load_benchmark()
    out = tmp_path / "bench"
    report = bench.main(["--quick", "--sections", "loss,attention", "--memory", "none", "--steps", "2",
                         "--warmup", "0", "--device", "cpu", "--out", str(out), "--name", "t"])
    assert json.loads((out / "t.json").read_text())["sections"].keys() == report["sections"].keys() == {"loss", "attention"}
    loss = report["sections"]["loss"]
    assert set(loss["variants"]) == {"reference", "ours"}
    assert all(v["median_s"] > 0 and len(v["times_s"]) == 2 for v in loss["variants"].values())
    assert loss["ratios"]["ours"] > 0 and loss["paired_ratios"]["ours"] > 0
    assert set(report["sections"]["attention"]["ratios"]) == {"sdpa"}
    assert report["machine"]["torch"] == torch.__version__ and report["settings"]["roi"] == 32
    assert {t["key"] for t in report["targets"]} >= {"pretrain_step_default", "data_pipeline"}
    md = (out / "t.md").read_text()
    assert "contrastive loss alone" in md and "Targets" in md
    assert "contrastive loss alone" in capsys.readouterr().out  # the table is printed too

    with pytest.raises(SystemExit, match="unknown section"):
        bench.main(["--sections", "pretrain,nope", "--out", str(out)])


def test_benchmark_ours_runs_the_library_step(tmp_path, monkeypatch):
    """The "ours" variants time the library itself: every pre-training and fine-tuning step is one
    ``ssl_utils.engine.train_step`` (the reference variants never call it), and the sliding window
    is ``ssl_utils.finetune.inference.predict_logits``."""
    import ssl_utils.engine
    import ssl_utils.finetune.inference
    from ssl_utils.runtime import amp_dtype

    calls = {"train_step": 0, "predict_logits": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ssl_utils.engine, "train_step", counted("train_step", ssl_utils.engine.train_step))
    monkeypatch.setattr(ssl_utils.finetune.inference, "predict_logits",
                        counted("predict_logits", ssl_utils.finetune.inference.predict_logits))
    bench = _load_benchmark()
    report = bench.main(["--quick", "--sections", "pretrain,finetune,sliding", "--memory", "none", "--steps", "1",
                         "--warmup", "0", "--sw-steps", "1", "--device", "cpu", "--out", str(tmp_path), "--name", "t"])
    sec = report["sections"]
    assert set(sec["pretrain"]["variants"]) == {"reference", "ours", "ours_fp32", "ours_bf16_all"}
    assert set(sec["finetune"]["variants"]) == {"reference", "ours", "ours_fp32"}
    assert set(sec["sliding"]["variants"]) == {"reference", "ours"}
    # in fp32 "ours" (and in pre-training "ours_bf16_all") is "ours_fp32" (timed once); else each is timed
    fp32_here = amp_dtype(torch.device("cpu"), "auto") is None
    timed_pretrain, timed_finetune = (1, 1) if fp32_here else (3, 2)
    assert calls == {"train_step": timed_pretrain + timed_finetune, "predict_logits": 1}
    assert all(sec[k]["ratios"]["ours"] > 0 for k in ("pretrain", "finetune", "sliding"))
    assert {t["key"] for t in report["targets"] if t["measured"] is not None} >= {"finetune_step", "sliding_window"}
    assert "UNETR fine-tuning step" in (tmp_path / "t.md").read_text()
