"""Each speed-up computes the same thing as the formulation it replaces (equal results, not speed:
speed is measured by ``benchmarks/run.py``).

- the O(B^2) contrastive loss against MONAI's ``ContrastiveLoss`` (values and gradients, float64);
- SDPA attention against MONAI's einsum attention (ViTAutoEnc and UNETR outputs and gradients);
- both views in one batch (``ssl_forward``) against two separate model calls + MONAI's loss;
- bf16 autocast against fp32 (close, loose tolerance);
- the cached deterministic stage (``SeededCacheDataset``) against a plain ``Dataset`` re-running it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.losses import ContrastiveLoss

from ssl_utils import build_unetr, build_vitautoenc, contrastive_loss, get_config, set_sdpa
from ssl_utils.pretrain import ssl_forward
from ssl_utils.runtime import Precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster (and steadier on a busy machine) than several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.mark.parametrize(
    "kind, dtype, tol",
    [("vitautoenc", torch.float64, 1e-9), ("unetr", torch.float32, 1e-4)],  # float64 convolutions are slow on CPU
)
def test_sdpa_matches_einsum_attention(kind, dtype, tol):
    cfg = _tiny_cfg()
    build = build_vitautoenc if kind == "vitautoenc" else build_unetr
    torch.manual_seed(0)
    model = build(cfg).to(dtype)
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


# ------------------------------------------------------------------------------------------------
# both views in one batch
# ------------------------------------------------------------------------------------------------


def test_one_batch_two_view_forward_equals_reference_two_calls():
    """``ssl_forward`` (one call on ``[2B, ...]``, our loss) equals the reference step: two model
    calls, ``L1Loss`` and MONAI's ``ContrastiveLoss`` on the flattened reconstructions, ``r + c * r``."""
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = build_vitautoenc(cfg)
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
# autocast
# ------------------------------------------------------------------------------------------------


def test_bf16_autocast_forward_close_to_fp32():
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = build_vitautoenc(cfg).eval()
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


def test_benchmark_harness_writes_report(tmp_path, capsys):
    """``benchmarks/run.py`` at tiny sizes, in this process (its memory subprocesses are left out)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
