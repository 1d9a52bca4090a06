"""The linear probe's two controls: non-network intensity statistics (+ position) per patch, and
the ViT's patch embedding alone; the default encoder probe is unchanged by them."""

import math

import pytest
import torch

from ssl_utils import get_config
from ssl_utils.probe import PROBE_FEATURES, IntensityFeatures, LinearProbe, build_probe, train_probe

SMOKE = get_config("smoke")
# mean, sd, min, max, 8 histogram bins, 3 coordinates
MEAN, SD, MIN, MAX, HIST, POS = 0, 1, 2, 3, slice(4, 12), slice(12, 15)


def _run(smoke_cohort, pretrained_path=None, log=lambda _: None, **kw):
    return train_probe(SMOKE, pretrained_path, seed=0, iterations=2, eval_every=2, data_root=smoke_cohort["btcv_root"],
                       json_path=smoke_cohort["btcv_json"][1], progress=False, log=log, **kw)


@pytest.fixture(scope="module")
def pretrained_checkpoint(tmp_path_factory):
    """A ViTAutoEnc checkpoint (``{"state_dict": ...}``) with weights unlike a seed-0 UNETR's."""
    from ssl_utils.models import build_vitautoenc

    torch.manual_seed(1234)
    sd = build_vitautoenc(SMOKE).state_dict()
    with torch.no_grad():
        sd["patch_embedding.patch_embeddings.weight"].add_(0.5)  # unmistakable
    path = str(tmp_path_factory.mktemp("ckpt") / "best_model.pt")
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return path, sd


def test_intensity_features_of_a_hand_made_crop():
    p = 16
    x = torch.full((2, 1, 2 * p, 3 * p, p), 0.25)
    x[0, 0, :p, :p, :] = 0.5  # patch (0, 0, 0): constant 0.5
    x[0, 0, p:, :p, : p // 2] = 0.0  # patch (1, 0, 0): half 0, half 1
    x[0, 0, p:, :p, p // 2:] = 1.0
    f = IntensityFeatures(p)(x)
    assert f.shape == (2, 4 + 8 + 3, 2, 3, 1) and IntensityFeatures(p).num_features == 15
    assert list(IntensityFeatures(p).parameters()) == []

    const = f[0, :, 0, 0, 0]
    assert const[MEAN] == 0.5 and const[SD] == 0.0 and const[MIN] == 0.5 and const[MAX] == 0.5
    assert const[HIST].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]  # 0.5 is the first value of bin 4 ([0.5, 0.625))
    halves = f[0, :, 1, 0, 0]
    assert halves[MEAN] == 0.5 and halves[SD] == pytest.approx(0.5) and halves[MIN] == 0.0 and halves[MAX] == 1.0
    assert halves[HIST].tolist() == [0.5, 0, 0, 0, 0, 0, 0, 0.5]  # 1.0 falls in the last bin
    other = f[0, :, 0, 2, 0]
    assert other[MEAN] == 0.25 and other[SD] == 0.0 and other[HIST].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert torch.allclose(f[:, HIST].sum(1), torch.ones(2, 2, 3, 1))

    # positions: normalised grid coordinates, -1 .. 1 along each axis, 0 on an axis of one patch,
    # the same for every case of the batch
    pos = f[:, POS]
    assert pos[0, 0, :, 0, 0].tolist() == [-1.0, 1.0]
    assert pos[0, 1, 0, :, 0].tolist() == [-1.0, 0.0, 1.0]
    assert pos[0, 2].abs().max() == 0.0
    assert torch.equal(pos[0, 0], pos[0, 0, :, :1].expand(2, 3, 1))  # axis 0 varies along axis 0 only
    assert torch.equal(pos[0], pos[1])
    # the second case is 0.25 everywhere
    assert torch.equal(f[1, MEAN], torch.full((2, 3, 1), 0.25))

    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        IntensityFeatures(p)(torch.zeros(1, 1, 20, 16, 16))


def test_probe_heads_follow_the_features():
    cfg = SMOKE
    x = torch.rand(1, 1, cfg["roi"], cfg["roi"], cfg["roi"])
    for features, channels in (("encoder", 4 * cfg["hidden_size"]), ("patch_embedding", cfg["hidden_size"]),
                               ("intensity", 15)):
        probe, report = build_probe(cfg, None, seed=0, features=features)
        assert report is None and probe.features == features
        assert probe.head.in_channels == channels and probe.head.out_channels == cfg["out_channels"]
        assert all(not p.requires_grad for p in probe.encoder.parameters())
        assert probe(x).shape == (1, cfg["out_channels"], cfg["roi"], cfg["roi"], cfg["roi"])
    intensity, _ = build_probe(cfg, None, seed=0, features="intensity")
    assert list(intensity.encoder.parameters()) == [] and isinstance(intensity.encoder, IntensityFeatures)
    embed, _ = build_probe(cfg, None, seed=0, features="patch_embedding")
    full, _ = build_probe(cfg, None, seed=0)
    # the patch embedding is the random encoder's own (same seed), nothing more
    assert set(embed.encoder.state_dict()) == {k[len("patch_embedding."):] for k in full.encoder.state_dict()
                                               if k.startswith("patch_embedding.")}
    for k, v in embed.encoder.state_dict().items():
        assert torch.equal(v, full.encoder.state_dict()[f"patch_embedding.{k}"]), k


def test_baselines_train_at_smoke(smoke_cohort, one_thread):
    logs = []
    res = _run(smoke_cohort, features="intensity", log=logs.append)
    assert res.features == "intensity" and res.arm == "intensity statistics + position" and res.transfer is None
    assert res.encoder_unchanged and list(res.probe.encoder.parameters()) == []
    assert len(res.curve) == 1 and math.isfinite(res.final["mean_dice"]) and 0.0 <= res.final["mean_dice"] <= 1.0
    assert "intensity statistics + position" in logs[-1]

    fresh, _ = build_probe(SMOKE, None, seed=0, features="patch_embedding")
    res = _run(smoke_cohort, features="patch_embedding", log=logs.append)
    assert res.features == "patch_embedding" and res.arm == "patch embedding (random)"
    assert res.encoder_unchanged and res.probe.head.in_channels == SMOKE["hidden_size"]
    assert math.isfinite(res.final["mean_dice"]) and 0.0 <= res.final["mean_dice"] <= 1.0
    assert "patch embedding (random)" in logs[-1]
    assert not torch.equal(fresh.head.weight, res.probe.head.weight.cpu())  # the head trained
    for k, v in fresh.encoder.state_dict().items():
        assert torch.equal(v, res.probe.encoder.state_dict()[k].cpu()), k


def test_encoder_features_are_the_default(smoke_cohort, one_thread):
    default = _run(smoke_cohort)
    explicit = _run(smoke_cohort, features="encoder")
    assert default.features == explicit.features == "encoder" and default.arm == explicit.arm == "random"
    assert default.curve == explicit.curve and default.final["mean_dice"] == explicit.final["mean_dice"]
    for (k, v), (_, w) in zip(default.probe.state_dict().items(), explicit.probe.state_dict().items()):
        assert torch.equal(v, w), k


def test_patch_embedding_probe_uses_the_checkpoint(pretrained_checkpoint, smoke_cohort, one_thread):
    path, sd = pretrained_checkpoint
    probe, report = build_probe(SMOKE, path, seed=0, features="patch_embedding")
    assert report is not None and report.epoch == 3
    random, _ = build_probe(SMOKE, None, seed=0, features="patch_embedding")
    state = probe.encoder.state_dict()
    assert set(state) == {"patch_embeddings.weight", "patch_embeddings.bias", "position_embeddings"}
    for k, v in state.items():
        assert torch.equal(v, sd[f"patch_embedding.{k}"]), k
    assert not torch.equal(state["patch_embeddings.weight"], random.encoder.state_dict()["patch_embeddings.weight"])
    # same seed, same head initialisation whatever the weights
    assert torch.equal(probe.head.weight, random.head.weight)

    res = _run(smoke_cohort, path, features="patch_embedding")
    assert res.arm == "patch embedding (pre-trained)" and res.transfer and res.encoder_unchanged
    assert math.isfinite(res.final["mean_dice"])
    for k, v in res.probe.encoder.state_dict().items():
        assert torch.equal(v.cpu(), sd[f"patch_embedding.{k}"]), k


def test_bad_features_are_refused(pretrained_checkpoint, tmp_path):
    path, _ = pretrained_checkpoint
    nowhere = str(tmp_path / "no_cohort")
    with pytest.raises(ValueError, match="features='intensity' uses no network weights; pass pretrained_path=None"):
        train_probe(SMOKE, path, features="intensity", cohort_root=nowhere, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="uses no network weights"):
        build_probe(SMOKE, path, seed=0, features="intensity")
    allowed = r"must be one of 'encoder', 'patch_embedding', 'intensity'; got 'pixels'"
    with pytest.raises(ValueError, match=allowed):
        train_probe(SMOKE, None, features="pixels", cohort_root=nowhere, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match=allowed):
        build_probe(SMOKE, None, seed=0, features="pixels")
    with pytest.raises(ValueError, match=allowed):
        LinearProbe(None, 32, 16, 2, features="pixels")
    with pytest.raises(ValueError, match="needs a frozen network"):
        LinearProbe(None, 32, 16, 2, features="patch_embedding")
    assert PROBE_FEATURES == ("encoder", "patch_embedding", "intensity")
