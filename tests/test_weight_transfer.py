"""Encoder weight transfer ViTAutoEnc -> UNETR (``load_pretrained_vit``): every checkpoint format
the project meets loads every encoder tensor; every mismatch is an error that says what is wrong,
and nothing is copied unless everything checks out."""

import os

import pytest
import torch

from ssl_utils import (
    TransferReport,
    WeightTransferError,
    build_unetr,
    build_vitautoenc,
    get_config,
    load_pretrained_vit,
    strip_prefixes,
)
from ssl_utils.checkpoint import CheckpointError, save_checkpoint
from ssl_utils.speedups import apply_speedups

CFG = get_config("smoke")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, smoke_cohort):
    """A real pre-training run (smoke preset, one epoch) and its best checkpoint."""
    from ssl_utils.pretrain import pretrain

    logdir = tmp_path_factory.mktemp("ssl_run")
    out = pretrain(
        get_config("smoke"),
        data_root=smoke_cohort["tcia_root"],
        json_path=smoke_cohort["tcia_json"],
        logdir=str(logdir),
        epochs=1,
        progress=False,
        log=lambda *_: None,
    )
    return out["best"]


@pytest.fixture(scope="module")
def vit_state():
    """A ViTAutoEnc state dict whose values differ from any UNETR initialisation."""
    torch.manual_seed(1234)
    return build_vitautoenc(CFG).state_dict()


def fresh_unetr(seed: int = 0):
    """A UNETR with every speed-up (channels-last included): weights load into it as into the plain one."""
    torch.manual_seed(seed)
    return apply_speedups(build_unetr(CFG), CFG, "cpu")


def assert_all_loaded(unetr, report: TransferReport, source: dict) -> None:
    vit_sd = unetr.vit.state_dict()
    assert isinstance(report, TransferReport)
    assert sorted(report.loaded) == sorted(vit_sd), "every encoder tensor must be loaded"
    assert report.missing == [] and report.shape_mismatched == []
    assert {k.split(".")[0] for k in report.unexpected} == {"conv3d_transpose", "conv3d_transpose_1"}
    for key, value in vit_sd.items():
        assert torch.equal(value, source[key]), f"{key} was not copied"


def snapshot(unetr) -> dict:
    return {k: v.clone() for k, v in unetr.state_dict().items()}


def test_our_checkpoint_from_a_real_pretraining_run(pretrained):
    ckpt = torch.load(pretrained, map_location="cpu", weights_only=True)
    # the reference's own loading recipe works on our checkpoints: plain keys, no prefix, real epoch
    assert {"state_dict", "optimizer", "epoch"} <= set(ckpt) and ckpt["epoch"] == 1
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    unetr = fresh_unetr()
    before = snapshot(unetr)
    report = load_pretrained_vit(unetr, pretrained)
    assert_all_loaded(unetr, report, ckpt["state_dict"])
    assert report.epoch == 1 and "161/161" in str(report)
    # weights changed in the encoder only; the convolutional encoder/decoder is untouched
    after = unetr.state_dict()
    assert not torch.equal(before["vit.patch_embedding.patch_embeddings.weight"], after["vit.patch_embedding.patch_embeddings.weight"])
    assert not torch.equal(before["vit.blocks.11.mlp.linear1.weight"], after["vit.blocks.11.mlp.linear1.weight"])
    for key in before:
        if not key.startswith("vit."):
            assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("fmt", ["reference", "bare", "ddp_prefix", "unetr"])
def test_other_checkpoint_formats_load_every_encoder_tensor(tmp_path, vit_state, fmt):
    path = str(tmp_path / f"{fmt}.pt")
    if fmt == "reference":  # the original tutorial's {"epoch", "state_dict", "optimizer"}
        model = build_vitautoenc(CFG)
        model.load_state_dict(vit_state)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        torch.save({"epoch": 7, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
        source = vit_state
    elif fmt == "bare":
        torch.save(vit_state, path)
        source = vit_state
    elif fmt == "ddp_prefix":  # saved from a DistributedDataParallel model: the reference loads nothing
        torch.save({"state_dict": {f"module.{k}": v for k, v in vit_state.items()}, "epoch": 3}, path)
        source = vit_state
    else:  # a fine-tuned UNETR: its encoder under "vit."
        donor = fresh_unetr(seed=99)
        donor.vit.load_state_dict({k: v for k, v in vit_state.items() if not k.startswith("conv3d_transpose")})
        save_checkpoint({"state_dict": donor.state_dict(), "iteration": 4}, path)
        source = vit_state
    unetr = fresh_unetr()
    before = snapshot(unetr)
    report = load_pretrained_vit(unetr, path)
    vit_sd = unetr.vit.state_dict()
    assert sorted(report.loaded) == sorted(vit_sd) and not report.missing
    for key, value in vit_sd.items():
        assert torch.equal(value, source[key]), key
    assert not torch.equal(before["vit.blocks.0.attn.qkv.weight"], unetr.state_dict()["vit.blocks.0.attn.qkv.weight"])
    if fmt == "reference":
        assert report.epoch == 7


def test_other_hidden_size_names_a_key_and_both_shapes(tmp_path):
    other = get_config("smoke", hidden_size=24, mlp_dim=96, num_heads=2)
    torch.save({"state_dict": build_vitautoenc(other).state_dict()}, tmp_path / "h24.pt")
    unetr = fresh_unetr()
    before = snapshot(unetr)
    with pytest.raises(WeightTransferError) as info:
        load_pretrained_vit(unetr, str(tmp_path / "h24.pt"))
    msg = str(info.value)
    assert "h24.pt" in msg and "hidden size" in msg
    assert "patch_embedding" in msg or "blocks." in msg
    assert "(24," in msg and "(48," in msg  # both shapes are named
    assert all(torch.equal(before[k], v) for k, v in unetr.state_dict().items()), "nothing may be copied"


def test_partial_encoder_is_an_error_and_copies_nothing(tmp_path, vit_state):
    partial = {k: v for k, v in vit_state.items() if not k.startswith(("blocks.10.", "blocks.11.", "norm."))}
    torch.save({"state_dict": partial, "epoch": 1}, tmp_path / "partial.pt")
    unetr = fresh_unetr()
    before = snapshot(unetr)
    with pytest.raises(WeightTransferError, match=r"partial\.pt.*only \d+ of 161 encoder tensors"):
        load_pretrained_vit(unetr, str(tmp_path / "partial.pt"))
    assert all(torch.equal(before[k], v) for k, v in unetr.state_dict().items())
    # the caller may accept a partial encoder explicitly, and then sees what is missing
    report = load_pretrained_vit(unetr, str(tmp_path / "partial.pt"), strict=False)
    assert len(report.loaded) == len(partial) - 4 and any(k.startswith("blocks.11.") for k in report.missing)


def test_nothing_matching_is_never_a_success(tmp_path, vit_state):
    decoder_only = {k: v for k, v in vit_state.items() if k.startswith("conv3d_transpose")}
    torch.save({"state_dict": decoder_only}, tmp_path / "decoder.pt")
    renamed = {f"encoder.{k}": v for k, v in vit_state.items()}
    torch.save({"state_dict": renamed}, tmp_path / "renamed.pt")
    torch.save({"state_dict": {}}, tmp_path / "empty.pt")
    for name in ("decoder.pt", "renamed.pt", "empty.pt"):
        unetr = fresh_unetr()
        with pytest.raises(WeightTransferError, match="no tensor matches unetr.vit"):
            load_pretrained_vit(unetr, str(tmp_path / name), strict=False)


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.pt").write_text("this is a text file, not a checkpoint\n")
    with pytest.raises((CheckpointError, WeightTransferError), match="notes.pt"):
        load_pretrained_vit(fresh_unetr(), str(tmp_path / "notes.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightTransferError, match=r"list\.pt: not a model checkpoint"):
        load_pretrained_vit(fresh_unetr(), str(tmp_path / "list.pt"))
    with pytest.raises(CheckpointError, match="missing.pt: file not found"):
        load_pretrained_vit(fresh_unetr(), str(tmp_path / "missing.pt"))
    assert not os.path.exists(tmp_path / "missing.pt")


def test_strip_prefixes_removes_ddp_and_compile_prefixes_in_any_order():
    t = torch.zeros(1)
    got = strip_prefixes({
        "module._orig_mod.vit.x": t,
        "_orig_mod.module.x": t,
        "module.module.blocks.0.y": t,
        "vit.module.z": t,  # only leading prefixes go
    })
    assert list(got) == ["vit.x", "x", "blocks.0.y", "vit.module.z"]
    assert all(v is t for v in got.values())
