"""The masked-autoencoder pretext: the masked-patch loss, the token order, the weight transfer into
UNETR (every encoder tensor, the final norm included), bf16 autocast, and exact resume."""

import os

import pytest
import torch

from ssl_utils import build_unetr, get_config, load_pretrained_vit
from ssl_utils.mae import build_mae, mae_baselines, mae_encoder_state, mae_loss, mae_target, patchify, unpatchify
from ssl_utils.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mae_cfg(**overrides):
    return get_config("smoke", pretext="mae", deterministic=True, warmup_epochs=1, cosine=True, **overrides)


def test_the_loss_counts_only_the_masked_patches():
    torch.manual_seed(0)
    target = torch.randn(2, 8, 64)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0, 0, 0]])
    pred = target.clone()
    pred[mask == 0] += 100.0  # anything at all on the visible patches
    assert mae_loss(pred, target, mask, "mse") == 0 and mae_loss(pred, target, mask, "l1") == 0
    pred[0, 2] += 1.0  # one masked patch off by 1 everywhere: 1 of the 5 masked patches
    assert mae_loss(pred, target, mask, "mse").item() == pytest.approx(1 / 5)
    assert mae_loss(pred, target, mask, "l1").item() == pytest.approx(1 / 5)


def test_baselines_are_the_loss_of_their_predictions():
    torch.manual_seed(1)
    target = torch.randn(1, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0]])
    own, visible = mae_baselines(target, mask, "mse")
    expect_own = ((target[0, :2] - target[0, :2].mean(-1, keepdim=True)) ** 2).mean()
    expect_visible = ((target[0, :2] - target[0, 2:].mean(0)) ** 2).mean()
    assert own.item() == pytest.approx(expect_own.item()) and visible.item() == pytest.approx(expect_visible.item())


def test_patchify_follows_the_patch_embeddings_token_order():
    """A convolution that averages each patch (the patch embedding's own layout) gives, token by token,
    the mean of ``patchify``'s rows; ``unpatchify`` inverts it."""
    torch.manual_seed(2)
    x = torch.rand(2, 1, 32, 48, 16)
    conv = torch.nn.Conv3d(1, 1, kernel_size=16, stride=16, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0 / 16**3)
    tokens = conv(x).flatten(2).transpose(1, 2)[..., 0]  # [B, tokens], as MONAI's PatchEmbeddingBlock orders them
    assert torch.allclose(patchify(x, 16).mean(-1), tokens, atol=1e-6)
    assert torch.equal(unpatchify(patchify(x, 16), 16, x.shape), x)


def test_normalised_target_has_zero_mean_unit_variance_and_constant_patches_are_zero():
    x = torch.rand(1, 1, 32, 32, 32)
    x[..., :16, :16, :16] = 0.0  # one patch of air
    t = mae_target(x, 16, normalise=True)
    assert torch.allclose(t[0, 1:].mean(-1), torch.zeros(7), atol=1e-5)
    assert torch.allclose(t[0, 1:].var(-1, unbiased=False), torch.ones(7), atol=1e-3)
    assert torch.equal(t[0, 0], torch.zeros(16**3))


def test_every_encoder_tensor_transfers_from_an_mae_checkpoint(tmp_path):
    cfg = mae_cfg()
    torch.manual_seed(3)
    mae = build_mae(cfg)
    state = mae.state_dict()
    torch.save({"state_dict": state, "epoch": 5}, tmp_path / "mae.pt")
    unetr = build_unetr(cfg)
    target = unetr.vit.state_dict()
    report = load_pretrained_vit(unetr, str(tmp_path / "mae.pt"))
    assert sorted(report.loaded) == sorted(target) and not report.missing
    last = cfg["num_layers"]  # the MAE keeps its final LayerNorm as blocks.<num_layers>
    assert torch.equal(unetr.vit.norm.weight, state[f"blocks.{last}.weight"])
    assert torch.equal(unetr.vit.norm.bias, state[f"blocks.{last}.bias"])
    for key, value in unetr.vit.state_dict().items():
        source = state[f"blocks.{last}.{key[5:]}"] if key.startswith("norm.") else state[key]
        assert torch.equal(value, source), key
    dropped = set(report.unexpected)
    assert {"cls_token", "mask_tokens", "decoder_pred.weight"} <= dropped
    assert all(k in ("cls_token", "mask_tokens") or k.startswith("decoder") for k in dropped)
    assert "cls_token" in str(report) and "decoder_blocks" in str(report)
    # the keep-the-keys-that-match snippet of the reference would silently leave the final norm untrained
    encoder, _ = mae_encoder_state(state)
    assert {"norm.weight", "norm.bias"} <= set(encoder) and "norm.weight" not in state


def test_forward_under_bf16_autocast_gives_the_fp32_loss():
    """MONAI's own forward refuses bf16 autocast (an fp32 tensor of mask tokens receives bf16 tokens);
    ours runs, and gives the fp32 loss within bf16's precision on the same masks."""
    cfg = mae_cfg()
    torch.manual_seed(4)
    model = build_mae(cfg).eval()
    x = torch.rand(2, 1, cfg["roi"], cfg["roi"], cfg["roi"])
    losses = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(7)  # the same masks
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            pred, mask = model(x)
        losses.append(mae_loss(pred, mae_target(x, cfg["patch_size"], True), mask).item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


@pytest.fixture(scope="module")
def mae_run(smoke_cohort, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("mae_full")
    return pretrain(mae_cfg(), smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(logdir), device="cpu",
                    epochs=4, progress=False, log=lambda _: None)


def test_mae_pretraining_validates_against_its_baselines(mae_run):
    val = [r for r in mae_run.history if "val_recon" in r]
    assert len(val) == 4
    for row in val:
        assert {"val_recon", "val_patch_mean", "val_visible_mean"} <= set(row)
        assert row["val_patch_mean"] > 0 and row["val_visible_mean"] > 0
    # fixed crops and masks: the baselines do not move from epoch to epoch
    assert len({round(r["val_patch_mean"], 10) for r in val}) == 1
    assert val[-1]["val_recon"] < val[0]["val_recon"]
    ckpt = torch.load(mae_run.best, weights_only=True)
    assert ckpt["config"]["pretext"] == "mae" and "mask_tokens" in ckpt["state_dict"]


def test_mae_figures(mae_run, tmp_path):
    """An MAE history's curves (its loss and its two baselines; no contrastive panels), and the masked
    reconstruction: the masked patches blanked in the input row, the visible ones copied unchanged into
    the reconstruction, and without a model the same mask the model draws."""
    import matplotlib.pyplot as plt
    import numpy as np

    from ssl_utils.plots import history_pretext, plot_masked_reconstruction, plot_ssl_history

    assert history_pretext(mae_run.history) == "mae"
    unvalidated = [{k: v for k, v in row.items() if not k.startswith("val_")} for row in mae_run.history]
    assert history_pretext(unvalidated) == "mae"  # no contrastive term in any epoch
    fig = plot_ssl_history(mae_run.history, str(tmp_path / "curves.png"))
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert len(fig.axes) == 2 and (tmp_path / "curves.png").stat().st_size > 10_000
    assert "training (random masks)" in labels and "validation (fixed masks)" in labels
    baselines = [label for label in labels if label.startswith("baseline")]
    assert len(baselines) == 2 and "each masked patch's own mean" in baselines[0]

    model, sample = mae_run.model, mae_run.val_dataset[0]
    fig = plot_masked_reconstruction(model, sample, mae_run.config, mae_run.precision, str(tmp_path / "mae.png"),
                                     n_slices=3)
    assert len(fig.axes) == 4 * 3 and (tmp_path / "mae.png").stat().st_size > 10_000
    assert model.training  # restored

    def row(figure, i):
        return np.stack([np.ma.getdata(ax.images[0].get_array()) for ax in figure.axes[3 * i:3 * i + 3]]).astype(float)

    clean, masked, recon = row(fig, 0), row(fig, 1), row(fig, 3)
    hidden = np.isnan(masked)
    assert 0 < hidden.mean() < 1
    assert np.array_equal(recon[~hidden], clean[~hidden]) and not np.allclose(recon[hidden], clean[hidden])
    unmodelled = plot_masked_reconstruction(None, sample, mae_run.config, n_slices=3)
    assert len(unmodelled.axes) == 2 * 3 and np.array_equal(np.isnan(row(unmodelled, 1)), hidden)
    plt.close("all")


def test_mae_stop_and_resume_is_bitwise_identical(mae_run, smoke_cohort, tmp_path):
    kw = dict(device="cpu", progress=False, log=lambda _: None, epochs=4)
    stopped = pretrain(mae_cfg(), smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(tmp_path), stop_after=2, **kw)
    assert stopped.last_epoch == 2
    resumed = pretrain(mae_cfg(), smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(tmp_path), resume=True, **kw)
    a, b = resumed.model.state_dict(), mae_run.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [r["train_recon"] for r in resumed.history] == [r["train_recon"] for r in mae_run.history]


def test_a_views_checkpoint_does_not_resume_as_mae(smoke_cohort, tmp_path):
    from ssl_utils.checkpoint import CheckpointError

    kw = dict(device="cpu", progress=False, log=lambda _: None)
    pretrain(get_config("smoke"), smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(tmp_path), epochs=1, **kw)
    with pytest.raises(CheckpointError, match="pretext"):
        pretrain(mae_cfg(), smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(tmp_path), epochs=2, resume=True, **kw)
    assert os.path.exists(tmp_path / "last_model.pt")


def test_mae_settings_are_checked():
    from ssl_utils.config import ConfigError

    with pytest.raises(ConfigError, match="mae_mask_ratio"):
        get_config("smoke", pretext="mae", mae_mask_ratio=1.0)
    with pytest.raises(ConfigError, match="multiples of 6"):
        get_config("smoke", pretext="mae", hidden_size=32)
    with pytest.raises(ConfigError, match="pretext"):
        get_config("smoke", pretext="jigsaw")
