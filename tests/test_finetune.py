"""Fine-tuning: Dice conventions, evaluation over cases, paired initialisation, bitwise resume,
and the random-init vs pre-trained comparison table (smoke preset, CPU)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from ssl_utils import build_vitautoenc, get_config
from ssl_utils.checkpoint import save_checkpoint
from ssl_utils.finetune import (
    build_finetune_model,
    compare_init,
    dice_per_case,
    dice_with_background,
    evaluate,
    finetune,
    per_organ_table_markdown,
    results_table_markdown,
    summarize_dice,
)
from ssl_utils.runtime import Precision

SMOKE = get_config("smoke")


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    """A pre-trained-encoder checkpoint in this project's format (ViTAutoEnc weights)."""
    torch.manual_seed(7)
    path = str(tmp_path_factory.mktemp("vit") / "best_model.pt")
    save_checkpoint({"state_dict": build_vitautoenc(SMOKE).state_dict(), "optimizer": {}, "epoch": 1}, path)
    return path


# ---------------------------------------------------------------------------- Dice


def two_blobs(shape=(12, 10, 8)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.int64)
    lab[1:5, 1:5, 1:4] = 1  # spleen, 48 voxels
    lab[6:11, 2:7, 2:6] = 6  # liver, 100 voxels
    return lab


def test_dice_identical_disjoint_and_partial():
    gt = two_blobs()
    same = dice_per_case(gt, gt)
    assert same.shape == (13,)
    assert same[0] == 1.0 and same[5] == 1.0  # spleen (1) and liver (6)
    assert np.isnan(same[[1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]]).all()  # absent from both: excluded

    swapped = np.where(gt == 1, 6, np.where(gt == 6, 1, 0))  # organs at each other's places
    d = dice_per_case(swapped, gt)
    assert d[0] == 0.0 and d[5] == 0.0

    half = gt.copy()
    half[6:11, 2:7, 4:6] = 0  # liver: 50 of its 100 voxels lost
    d = dice_per_case(half, gt)
    assert d[0] == 1.0 and d[5] == pytest.approx(2 * 50 / (50 + 100))


def test_dice_absent_organ_conventions():
    gt = two_blobs()
    pred = gt.copy()
    pred[0, 0, 0] = 13  # a false-positive left adrenal, absent from the ground truth -> 0
    d = dice_per_case(pred, gt)
    assert d[12] == 0.0
    assert np.isnan(d[3])  # gallbladder absent from both -> excluded (NaN)
    s = summarize_dice([dice_with_background(pred, gt), dice_with_background(gt, gt)])
    # case 1: mean of spleen 1, liver 1, left adrenal 0; case 2: spleen 1, liver 1
    assert s["per_case_mean"] == pytest.approx([2 / 3, 1.0])
    assert s["mean_dice"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert s["n_excluded"] == 10 + 11  # organ/case pairs absent from both, counted
    assert s["per_organ"]["gallbladder"] != s["per_organ"]["gallbladder"]  # NaN: never present
    assert s["per_organ"]["left adrenal"] == 0.0


def test_dice_with_background_and_input_types():
    gt = two_blobs()
    pred = gt.copy()
    pred[6:11, 2:7, 4:6] = 0
    d = dice_with_background(pred, gt)
    assert d.shape == (14,)
    n_bg_gt = int((gt == 0).sum())
    n_bg_pred = int((pred == 0).sum())
    assert d[0] == pytest.approx(2 * n_bg_gt / (n_bg_gt + n_bg_pred))
    np.testing.assert_array_equal(d[1:], dice_per_case(pred, gt))
    # tensors (with a channel axis) give the same numbers as arrays
    t = dice_with_background(torch.from_numpy(pred)[None], torch.from_numpy(gt).float()[None])
    np.testing.assert_array_equal(t, d)
    s = summarize_dice([d])
    assert s["mean_dice_with_bg"] == pytest.approx(np.nanmean(d)) and s["mean_dice_with_bg"] > s["mean_dice"]


def test_dice_rejects_bad_label_maps():
    gt = two_blobs()
    with pytest.raises(ValueError, match="labels 0..14, expected 0..13"):
        dice_per_case(np.where(gt == 6, 14, gt), gt)
    with pytest.raises(ValueError, match="voxels"):
        dice_per_case(gt[:-1], gt)
    with pytest.raises(ValueError, match="integer"):
        dice_per_case(gt + 0.5, gt)


class LabelEcho(nn.Module):
    """A segmentation 'network' whose logits are the one-hot of its input's voxel values: feeding
    it a label map as the image makes the prediction exactly that label map."""

    def __init__(self, num_classes: int = 14) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lab = x[:, 0].round().long().clamp(0, self.num_classes - 1)
        return nn.functional.one_hot(lab, self.num_classes).permute(0, 4, 1, 2, 3).float()


def test_evaluate_scores_each_case_then_averages_over_cases():
    """Sliding-window inference over whole volumes, per-case Dice, one average over cases (the
    reference averaged a running mean again)."""
    from monai.data import DataLoader

    cfg = get_config("smoke")  # roi 32: volumes larger than one window, and one smaller
    cases, expected = [], []
    for shape, drop in (((40, 36, 33), []), ((40, 36, 33), [6]), ((20, 30, 24), [1, 6])):
        gt = np.zeros(shape, dtype=np.int64)
        for k in range(1, 14):  # every organ present, as small boxes on a grid
            x, y, z = 5 * ((k - 1) % 4), 6 * ((k - 1) // 4), 2 + (k % 3)
            gt[x : x + 4, y : y + 5, z : z + 4] = k
        pred = gt.copy()
        for k in drop:  # the prediction misses these organs entirely
            pred[pred == k] = 0
        expected.append(np.nanmean(dice_per_case(pred, gt)))
        cases.append({"image": torch.from_numpy(pred)[None].float(), "label": torch.from_numpy(gt)[None].float()})
    loader = DataLoader(cases, batch_size=1)
    out = evaluate(LabelEcho(), loader, cfg, Precision(torch.device("cpu"), None))
    assert out["per_case_mean"] == pytest.approx(expected)
    assert out["mean_dice"] == pytest.approx(np.mean(expected))
    assert out["per_organ"]["spleen"] == pytest.approx(2 / 3) and out["per_organ"]["liver"] == pytest.approx(1 / 3)
    assert len(out["per_case"]) == 3 and len(out["per_case"][0]) == 13 and out["n_excluded"] == 0


# ---------------------------------------------------------------------------- pairing


def test_same_seed_same_decoder_initialisation(vit_checkpoint):
    random_arm, none = build_finetune_model(SMOKE, seed=3, use_pretrained=False)
    pre_arm, report = build_finetune_model(SMOKE, seed=3, pretrained_path=vit_checkpoint, use_pretrained=True)
    other_seed, _ = build_finetune_model(SMOKE, seed=4, use_pretrained=False)
    assert none is None and len(report.loaded) == len(pre_arm.vit.state_dict())
    a, b, c = random_arm.state_dict(), pre_arm.state_dict(), other_seed.state_dict()
    decoder = [k for k in a if not k.startswith("vit.")]
    assert len(decoder) > 20
    for k in decoder:
        assert torch.equal(a[k], b[k]), f"{k} differs between the arms"
    assert any(not torch.equal(a[k], c[k]) for k in decoder), "another seed must give another decoder"
    assert not torch.equal(a["vit.blocks.0.attn.qkv.weight"], b["vit.blocks.0.attn.qkv.weight"])


def test_missing_pretrained_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt not found.*use_pretrained=False"):
        finetune(SMOKE, logdir=str(tmp_path), pretrained_path=str(tmp_path / "nowhere.pt"), use_pretrained=True)


# ---------------------------------------------------------------------------- resume


def test_stop_and_resume_is_bitwise_identical(tmp_path, smoke_cohort):
    """3 training volumes -> 3 iterations per epoch; evaluations at 2 and 4 fall inside epochs 1 and 2.
    Dropout is on, so the global RNG state matters too; the encoder is frozen for 2 iterations and
    has its own learning rate."""
    cfg = get_config("smoke", ft_iterations=4, ft_eval_every=2, dropout_rate=0.1, amp="off",
                     freeze_encoder_iters=2, encoder_lr_mult=0.5)
    kw = dict(
        data_root=smoke_cohort["btcv_root"],
        json_path=smoke_cohort["btcv_json"][3],
        use_pretrained=False,
        progress=False,
        log=lambda *_: None,
        seed=11,
    )
    ref = finetune(cfg, logdir=str(tmp_path / "full"), **kw)
    split = str(tmp_path / "split")
    first = finetune(cfg, logdir=split, stop_after=1, **kw)  # mid-epoch, between evaluations
    assert first["iteration"] == 1 and os.path.exists(first["last"])
    second = finetune(cfg, logdir=split, stop_after=2, resume=True, **kw)  # an evaluation point, mid-epoch
    assert second["iteration"] == 2 and [r["iteration"] for r in second["history"]] == [2]
    # the encoder is frozen for the first 2 iterations: still its initial weights, the rest trained
    init, _ = build_finetune_model(cfg, seed=11)
    init_sd, now = init.state_dict(), second["model"].state_dict()
    assert all(torch.equal(init_sd[k], now[k]) for k in init_sd if k.startswith("vit."))
    assert not torch.equal(init_sd["out.conv.conv.weight"], now["out.conv.conv.weight"])
    done = finetune(cfg, logdir=split, resume=True, **kw)
    assert done["iteration"] == 4
    sd_ref, sd = ref["model"].state_dict(), done["model"].state_dict()
    assert all(torch.equal(sd_ref[k], sd[k]) for k in sd_ref)
    assert done["train_losses"] == ref["train_losses"]
    assert [(r["iteration"], r["train_loss"], r["val_mean_dice"]) for r in done["history"]] == [
        (r["iteration"], r["train_loss"], r["val_mean_dice"]) for r in ref["history"]
    ]
    # the checkpoint has the pre-training keys plus the fine-tuning position
    ck = torch.load(done["last"], map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer", "iteration", "epoch", "scaler", "rng", "config", "history", "best_dice"} <= set(ck)
    assert ck["iteration"] == 4 and ck["epoch"] == 2 and ck["step_in_epoch"] == 1
    best = torch.load(done["best"], map_location="cpu", weights_only=True)
    assert best["best_dice"] == pytest.approx(max(r["val_mean_dice"] for r in ref["history"]))
    with open(os.path.join(split, "history.json")) as f:
        assert [r["iteration"] for r in json.load(f)] == [2, 4]


# ---------------------------------------------------------------------------- comparison


@pytest.mark.slow
def test_compare_init_fills_every_cell(tmp_path, smoke_cohort, vit_checkpoint):
    cfg = get_config("smoke", ft_iterations=2, ft_eval_every=1)
    logdir = str(tmp_path / "compare")
    res = compare_init(
        cfg,
        train_sizes=[1],
        seeds=[0, 1],
        pretrained_path=vit_checkpoint,
        logdir=logdir,
        cohort_root=smoke_cohort["root"],
        progress=False,
        log=lambda *_: None,
    )
    runs = res["runs"]
    assert sorted((r["seed"], r["arm"]) for r in runs) == [(0, "pretrained"), (0, "random"), (1, "pretrained"), (1, "random")]
    for r in runs:
        assert [i for i, _ in r["curve"]] == [1, 2] and all(0.0 <= d <= 1.0 for _, d in r["curve"])
        assert r["final"] == r["curve"][-1][1] and r["n_val"] == 2 and len(r["per_organ"]) == 13
    lines = res["table"].strip().splitlines()
    assert lines[0] == "| Training Volumes | Validation Volumes | Random Init Dice | Pre-trained Dice | Relative Improvement |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:2] == ["1", "2"]
    assert all(c and c != "n/a" for c in cells) and "±" in cells[2] and "±" in cells[3] and cells[4].endswith("%")
    rand = [r["final"] for r in runs if r["arm"] == "random"]
    assert cells[2] == f"{100 * np.mean(rand):.2f} ± {100 * np.std(rand, ddof=1):.2f}"
    organ_lines = per_organ_table_markdown(res).strip().splitlines()
    assert len(organ_lines) == 2 + 13 + 1 and "n/a" not in "".join(organ_lines[2:])
    for name in ("results.json", "results_table.md"):
        assert os.path.getsize(os.path.join(logdir, name)) > 0
    with open(os.path.join(logdir, "results.json")) as f:
        saved = json.load(f)
    assert results_table_markdown(saved) == res["table"]  # the table can be rebuilt from the JSON
    assert math.isfinite(res["paired"][1]["mean_diff"]) and res["paired"][1]["n"] == 2
    # a second call reuses the finished runs instead of training them again
    again = compare_init(cfg, [1], [0, 1], vit_checkpoint, logdir=logdir, cohort_root=smoke_cohort["root"],
                         progress=False, log=lambda *_: None)
    assert again["table"] == res["table"]
    # a rewritten pre-trained checkpoint (a new pre-training run) makes its arm run again
    st = os.stat(vit_checkpoint)
    os.utime(vit_checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    messages = []
    compare_init(cfg, [1], [0], vit_checkpoint, logdir=logdir, cohort_root=smoke_cohort["root"], progress=False,
                 log=messages.append)
    text = "\n".join(messages)
    assert text.count("is not the file this run started from") == 1 and text.count("resumed from") == 1


@pytest.mark.slow
def test_compare_init_reuses_records_of_finished_runs_without_their_weights(tmp_path, smoke_cohort, vit_checkpoint):
    """A finished run leaves run_record.json; with its checkpoints gone (the folder copied to another
    machine) the run is reused, unless the pre-trained encoder's weights are not the ones it started from."""
    import shutil

    cfg = get_config("smoke", ft_iterations=2, ft_eval_every=1)
    pre = str(tmp_path / "encoder.pt")
    shutil.copyfile(vit_checkpoint, pre)
    logdir = str(tmp_path / "compare")
    kw = dict(cohort_root=smoke_cohort["root"], progress=False, logdir=logdir)
    first = compare_init(cfg, [1], [0], pre, log=lambda *_: None, **kw)
    for arm in ("random", "pretrained"):
        run = os.path.join(logdir, "n1", "seed0", arm)
        with open(os.path.join(run, "run_record.json")) as f:
            rec = json.load(f)
        assert rec["iteration"] == 2 and (rec["pretrained_digest"] is None) == (arm == "random")
        for name in ("last_model.pt", "best_model.pt"):
            os.remove(os.path.join(run, name))
    messages: list[str] = []
    again = compare_init(cfg, [1], [0], pre, log=messages.append, **kw)
    assert "\n".join(messages).count("reused the finished run recorded in") == 2
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in first["runs"]]
    assert not os.path.exists(os.path.join(logdir, "n1", "seed0", "random", "last_model.pt"))
    # other encoder weights: the pre-trained arm trains again, the random arm is still reused
    ckpt = torch.load(pre, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1.0
    torch.save(ckpt, pre)
    messages = []
    compare_init(cfg, [1], [0], pre, log=messages.append, **kw)
    text = "\n".join(messages)
    assert text.count("reused the finished run recorded in") == 1 and "are not those the run started from" in text
    assert os.path.exists(os.path.join(logdir, "n1", "seed0", "pretrained", "last_model.pt"))
