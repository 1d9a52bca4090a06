"""The fine-tuning recipe's options: the tuning split, class-balanced crops, the final Dice as a
mean of the last evaluations, and the cosine schedule."""

import json
import math
import os

import numpy as np
import pytest
import torch


def test_cohort_has_three_disjoint_labeled_splits(smoke_cohort):
    from ssl_utils import get_config

    cfg = get_config("smoke")
    seen = {}
    for n, path in smoke_cohort["btcv_json"].items():
        d = json.load(open(path))
        train = [e["image"] for e in d["training"]]
        tune = [e["image"] for e in d["tuning"]]
        val = [e["image"] for e in d["validation"]]
        assert len(train) == n and len(tune) == cfg["synth_labeled_tune"] and len(val) == cfg["synth_labeled_val"]
        assert not (set(train) & set(tune)) and not (set(train) & set(val)) and not (set(tune) & set(val))
        seen[n] = (tune, val)
    # every training-set size shares one tuning and one validation split
    assert len({json.dumps(v) for v in seen.values()}) == 1


def test_eval_split_tuning_scores_the_tuning_volumes(smoke_cohort, tmp_path):
    from ssl_utils import get_config
    from ssl_utils.data import DatalistError
    from ssl_utils.finetune import finetune

    cfg = get_config("smoke", ft_iterations=1, ft_eval_every=1, ft_eval_split="tuning")
    kw = dict(data_root=smoke_cohort["btcv_root"], use_pretrained=False, progress=False, log=lambda m: None)
    res = finetune(cfg, json_path=smoke_cohort["btcv_json"][1], logdir=str(tmp_path / "a"), **kw)
    assert res.n_val == cfg["synth_labeled_tune"]
    tuning = {os.path.basename(e["image"]) for e in json.load(open(smoke_cohort["btcv_json"][1]))["tuning"]}
    assert {os.path.basename(e["image"]) for e in res.val_dataset.data} == tuning
    # a datalist without a tuning list is refused before any training, naming the setting
    d = json.load(open(smoke_cohort["btcv_json"][1]))
    del d["tuning"]
    bad = tmp_path / "no_tuning.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(DatalistError, match="ft_eval_split='tuning'"):
        finetune(cfg, json_path=str(bad), logdir=str(tmp_path / "b"), **kw)


def _label_volume():
    """A 64^3 label map: a large 'liver' (6) and a small 'adrenal' (13) of 4^3 voxels."""
    lab = np.zeros((1, 64, 64, 64), dtype=np.float32)
    lab[:, 8:56, 8:56, 8:40] = 6
    lab[:, 50:54, 50:54, 50:54] = 13
    return lab


@pytest.mark.parametrize("crop", ["posneg", "classes"])
def test_crop_sampling(crop):
    from ssl_utils import get_config
    from ssl_utils.transforms import finetune_crop

    cfg = get_config("smoke", ft_crop=crop, ft_num_samples=1, roi=16)
    t = finetune_crop(cfg)
    t.set_random_state(seed=0)
    lab = _label_volume()
    hits = 0
    for _ in range(200):
        out = t({"image": np.ones_like(lab), "label": lab})[0]
        assert tuple(out["label"].shape) == (1, 16, 16, 16)
        hits += bool((out["label"] == 13).any())
    # class-balanced: about 1 crop in 14 classes' worth of draws centres on the adrenal (absent classes
    # are skipped: 3 present, so ~1/3); posneg: the adrenal is 64 of ~74,000 foreground voxels
    if crop == "classes":
        assert hits > 40
    else:
        assert hits < 15


def test_final_dice_is_the_mean_of_the_last_evaluations():
    from ssl_utils.finetune.loop import final_from_history

    hist = [{"iteration": i, "val_mean_dice": d, "val_mean_dice_with_bg": d, "dice_liver": d, "dice_spleen": float("nan")}
            for i, d in zip((10, 20, 30, 40), (0.1, 0.5, 0.3, 0.4))]
    f = final_from_history(hist, 3)
    assert f["mean_dice"] == pytest.approx(0.4)
    assert f["per_organ"]["liver"] == pytest.approx(0.4) and math.isnan(f["per_organ"]["spleen"])
    assert f["iterations"] == [20, 30, 40]
    assert final_from_history(hist, 1)["mean_dice"] == pytest.approx(0.4)
    assert final_from_history(hist, 10)["mean_dice"] == pytest.approx(0.325)  # fewer evaluations than asked
    assert final_from_history([], 3) is None


def test_cosine_schedule_decays_every_group_to_zero(smoke_cohort, tmp_path):
    from ssl_utils import get_config
    from ssl_utils.finetune import finetune

    cfg = get_config("smoke", ft_iterations=4, ft_eval_every=4, ft_cosine=True, encoder_lr_mult=0.5)
    res = finetune(cfg, data_root=smoke_cohort["btcv_root"], json_path=smoke_cohort["btcv_json"][1],
                   logdir=str(tmp_path), use_pretrained=False, progress=False, log=lambda m: None)
    ckpt = torch.load(res.last, weights_only=False)
    lrs = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([0.0, 0.0], abs=1e-12)
    assert ckpt["scheduler"] is not None


def _fails(kind: str) -> None:
    if kind == "bad":
        raise FileNotFoundError("no such volume: case7.nii.gz")
    return None


def _square(x: int) -> int:
    return x * x


@pytest.mark.slow
def test_jobs_side_by_side_return_every_result_and_keep_the_error_type():
    from ssl_utils.parallel import run_jobs

    jobs = [(_square, {"x": k}) for k in range(4)]
    assert sorted(run_jobs(jobs, workers=2)) == [(0, 0), (1, 1), (2, 4), (3, 9)]
    assert sorted(run_jobs(jobs, workers=1)) == [(0, 0), (1, 1), (2, 4), (3, 9)]
    with pytest.raises(FileNotFoundError, match="case7") as info:
        list(run_jobs([(_fails, {"kind": "ok"}), (_fails, {"kind": "bad"})], workers=2))
    assert any("job 2 of 2" in note for note in getattr(info.value, "__notes__", []))


def test_finetune_sweep_scores_the_tuning_split_and_reuses_finished_settings(smoke_cohort, tmp_path):
    from ssl_utils.sweeps import run_finetune_sweep

    settings = [("tiny", {"ft_iterations": 2, "ft_crop": "classes"}, "a smoke setting")]
    kw = dict(out=str(tmp_path / "sweep"), runs_root=str(tmp_path / "runs"), cohort_root=smoke_cohort["root"],
              preset="smoke", workers=1, settings=settings)
    logs: list[str] = []
    rows = run_finetune_sweep(log=logs.append, **kw)
    assert len(rows) == 1 and rows[0]["n_tuning"] == 1 and rows[0]["arm"] == "random"
    assert 0.0 <= rows[0]["final"] <= 1.0 and len(rows[0]["final_organ"]) == 13
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "tuning split" in table and "| tiny |" in table
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    logs.clear()
    again = run_finetune_sweep(log=logs.append, **kw)
    assert again == rows and any("reused" in m for m in logs)
