"""What tells a user pre-training learned something: the reconstruction baselines, the probe
monitor (a downstream score while training runs) and the orientation of the views figure."""

import json
import os

import numpy as np
import pytest
import torch

from ssl_utils import get_config
from ssl_utils.checkpoint import load_checkpoint
from ssl_utils.pretrain import pretrain, reconstruction_baselines

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASELINE_KEYS = ("val_recon", "val_recon_2", "val_const_l1", "val_copy_l1_1", "val_copy_l1_2")
MONITOR = dict(probe_every=1)  # the smoke preset: fit on 1 labeled volume, score on 2, 4 iterations


def _run(cohort, logdir, cfg, **kw):
    return pretrain(cfg, cohort["tcia_root"], cohort["tcia_json"], str(logdir), device="cpu", progress=False,
                    log=lambda _msg: None, **kw)


def _probe_json(cohort):
    return cohort["btcv_json"][max(cohort["btcv_json"])]


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------


def test_baselines_on_known_inputs():
    torch.manual_seed(0)
    crop = torch.rand(3, 1, 8, 8, 8)
    other = torch.rand(3, 1, 8, 8, 8)
    base = reconstruction_baselines(crop, other, crop)  # view 1 is the crop itself
    assert base.shape == (3, 3)
    assert torch.all(base[:, 1] == 0)  # copying an uncorrupted view: nothing to repair
    assert torch.allclose(base[:, 2], (other - crop).abs().flatten(1).mean(1))
    flat = torch.full((2, 1, 4, 4, 4), 0.37)
    assert torch.all(reconstruction_baselines(flat, flat, flat)[:, 0] == 0)  # a constant crop: constant-L1 0
    half = torch.zeros(1, 1, 4, 4, 4)
    half[..., :2] = 1.0  # half 0, half 1: the mean 0.5 is 0.5 away from every voxel
    assert reconstruction_baselines(half, half, half)[0, 0] == pytest.approx(0.5)


def test_every_validation_row_carries_the_baselines(smoke_cohort, tmp_path):
    res = _run(smoke_cohort, tmp_path, get_config("smoke"), epochs=2)
    rows = [r for r in res.history if "val_recon" in r]
    assert len(rows) == 2
    for row in rows:
        assert all(np.isfinite(row[k]) for k in BASELINE_KEYS), row
    # the views are fixed, so the baselines are the same numbers at every validation
    for k in ("val_const_l1", "val_copy_l1_1", "val_copy_l1_2"):
        assert rows[0][k] == rows[1][k]
    assert 0 < rows[0]["val_const_l1"] < 1
    with open(os.path.join(tmp_path, "history.csv")) as f:
        header = f.readline().strip().split(",")
    assert set(BASELINE_KEYS) <= set(header)


# ---------------------------------------------------------------------------------------------
# the probe monitor
# ---------------------------------------------------------------------------------------------


def test_probe_monitor_scores_lands_in_history_and_changes_nothing_else(smoke_cohort, tmp_path):
    """The monitor's score is in the history and TensorBoard-ready row; the pre-training itself
    (losses, weights) is bit for bit what it is without the monitor: the monitor works on a copy
    of the encoder and leaves the random streams as they were."""
    plain = _run(smoke_cohort, tmp_path / "plain", get_config("smoke", deterministic=True), epochs=2)
    cfg = get_config("smoke", deterministic=True, **MONITOR)
    watched = _run(smoke_cohort, tmp_path / "watched", cfg, epochs=2, probe_json=_probe_json(smoke_cohort))
    for a, b in zip(plain.history, watched.history):
        assert a["train_total"] == b["train_total"] and a["val_recon"] == b["val_recon"]
        assert 0.0 <= b["probe_dice"] <= 1.0 and b["probe_dice_init"] is not None and b["probe_time_s"] > 0
    for (k, p), q in zip(plain.model.state_dict().items(), watched.model.state_dict().values()):
        assert torch.equal(p, q), k
    saved = json.loads((tmp_path / "watched" / "history.json").read_text())
    assert [r["probe_dice"] for r in saved] == [r["probe_dice"] for r in watched.history]


def test_probe_monitor_leaves_the_encoder_unchanged_and_is_repeatable(smoke_cohort):
    from ssl_utils.models import build_vitautoenc
    from ssl_utils.monitor import ProbeMonitor, monitor_entries
    from ssl_utils.runtime import Precision

    cfg = get_config("smoke", **MONITOR)
    fit, score, _ = monitor_entries(cfg, _probe_json(smoke_cohort), None, None)
    assert len(fit) == 1 and len(score) == 2 and not {e["image"] for e in fit} & {e["image"] for e in score}
    monitor = ProbeMonitor(cfg, fit, score, Precision(torch.device("cpu"), None))
    torch.manual_seed(0)
    model = build_vitautoenc(cfg).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    first, second = monitor.score(model), monitor.score(model)
    assert first["probe_dice"] == second["probe_dice"]  # same head, same crops: the encoder alone decides
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(p.requires_grad for p in model.parameters())


def test_select_by_probe_keeps_the_best_probe_checkpoint(smoke_cohort, tmp_path):
    cfg = get_config("smoke", select_by="probe", ssl_lr=3e-3, **MONITOR)
    res = _run(smoke_cohort, tmp_path, cfg, epochs=3, probe_json=_probe_json(smoke_cohort))
    scores = [r["probe_dice"] for r in res.history]
    best = load_checkpoint(res.best)
    assert best["epoch"] == res.history[int(np.argmax(scores))]["epoch"]  # first epoch of the highest score
    assert best["best_probe_dice"] == max(scores)


def test_monitor_refuses_missing_or_too_small_labeled_data(smoke_cohort, tmp_path):
    from ssl_utils.monitor import monitor_entries

    cfg = get_config("smoke", probe_every=2)
    with pytest.raises(ValueError, match="probe_json"):  # own unlabeled data, no labeled datalist
        monitor_entries(cfg, None, None, smoke_cohort["tcia_root"])
    big = get_config("smoke", probe_every=2, probe_fit_volumes=2, probe_score_volumes=2)  # smoke: 3 labeled
    with pytest.raises(ValueError, match=r"dataset_0_init_3\.json.*needs .* = 4"):
        monitor_entries(big, _probe_json(smoke_cohort), None, None)
    # pre-training on own data with the monitor asked for: it is off, and says how to turn it on ...
    lines = []
    res = pretrain(cfg, smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(tmp_path / "own"), epochs=1,
                   device="cpu", progress=False, log=lines.append)
    assert not any("probe_dice" in r for r in res.history)
    assert any(line.startswith("probe monitor off") and "probe_json" in line for line in lines), lines
    # ... unless the best checkpoint is to be chosen by it: then a clear error before any training
    with pytest.raises(ValueError, match="probe_json"):
        _run(smoke_cohort, tmp_path / "by_probe", get_config("smoke", probe_every=2, select_by="probe"), epochs=1)
    assert not (tmp_path / "by_probe" / "last_model.pt").exists()
    with pytest.raises(ValueError, match="probe_every"):
        get_config("smoke", select_by="probe")


# ---------------------------------------------------------------------------------------------
# the views figure's orientation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-2.0, -2.0, 2.0, 1.0])], ids=["RAS", "LPS"])
def test_views_figure_shows_patient_right_on_the_viewer_left_and_anterior_up(affine):
    from ssl_utils.plots import radiological_axial, to_ras

    vol = np.zeros((10, 12, 3))
    right = (9, 5, 1) if affine[0, 0] > 0 else (0, 5, 1)  # the voxel nearest the patient's right
    anterior = (4, 11, 1) if affine[1, 1] > 0 else (4, 0, 1)
    vol[right], vol[anterior] = 1.0, 2.0
    img = radiological_axial(to_ras(vol, affine), 1)
    assert img.shape == (12, 10)  # rows: anterior -> posterior, columns: patient right -> left
    r, c = np.argwhere(img == 1.0)[0]
    assert c == 0  # patient's right: the viewer's left edge
    r, c = np.argwhere(img == 2.0)[0]
    assert r == 0  # anterior: the top edge


def test_views_figure_uses_the_crop_affine(smoke_cohort, tmp_path):
    from ssl_utils.datasets import pretrain_datasets
    from ssl_utils.data import load_datalist
    from ssl_utils.plots import plot_views_and_reconstructions

    cfg = get_config("smoke")
    entries = load_datalist(smoke_cohort["tcia_json"], smoke_cohort["tcia_root"], "validation")
    _, val_ds = pretrain_datasets(cfg, entries[:1], entries[:1], progress=False)
    sample = val_ds[0]
    assert getattr(sample[0]["gt_image"], "affine", None) is not None  # what the figure orients by
    fig = plot_views_and_reconstructions(None, sample, "cpu", str(tmp_path / "v.png"), n_slices=2)
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"R", "L", "A", "P"} <= texts
    assert "predict its mean" in fig._suptitle.get_text()
    import matplotlib.pyplot as plt

    plt.close("all")


def test_reconstruction_keeps_the_input_orientation():
    """The autoencoder's output voxel grid is the input's: with the transformer blocks reduced to
    their residual path, a change inside one 16^3 patch changes the reconstruction inside that
    patch only (an axis swap or flip between tokens and the decoded volume would move it)."""
    from ssl_utils.models import build_vitautoenc

    cfg = get_config("smoke", roi=48, patch_size=16)
    torch.manual_seed(0)
    model = build_vitautoenc(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:  # attention and MLP add nothing: tokens do not mix
            block.attn.out_proj.weight.zero_()
            block.mlp.linear2.weight.zero_()
            block.attn.out_proj.bias.zero_() if block.attn.out_proj.bias is not None else None
            block.mlp.linear2.bias.zero_()
        x = torch.rand(1, 1, 48, 48, 48)
        y = x.clone()
        y[:, :, 0:16, 16:32, 32:48] += 0.5  # patch (0, 1, 2): different along every axis
        diff = (model(y)[0] - model(x)[0]).abs()[0, 0]
    inside = diff[0:16, 16:32, 32:48]
    assert inside.max() > 1e-4
    diff[0:16, 16:32, 32:48] = 0
    assert diff.max() == 0


def test_recipe_sweep_scores_on_validation_views_and_reuses_finished_settings(smoke_cohort, tmp_path):
    from ssl_utils.sweeps import run_pretrain_sweep

    cohort_root = os.path.dirname(smoke_cohort["tcia_root"])
    settings = [("tiny", dict(ssl_epochs=1), "one epoch")]
    kw = dict(runs_root=str(tmp_path / "runs"), cohort_root=cohort_root, log=lambda _m: None, preset="smoke", settings=settings)
    (row,) = run_pretrain_sweep(str(tmp_path / "sweep"), **kw)
    assert row["ratio_to_const"] == pytest.approx(row["best_val_l1"] / row["const_l1"])
    assert 0 < row["const_l1"] < 1 and row["epochs"] == 1
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| tiny | ssl_epochs=1 | 1 |" in table and "validation volumes' fixed views" in table
    (tmp_path / "runs" / "tiny" / "last_model.pt").unlink()
    again = run_pretrain_sweep(str(tmp_path / "sweep"), **kw)  # reused: nothing is trained again
    assert again == [row] and not (tmp_path / "runs" / "tiny" / "last_model.pt").exists()


def test_monitor_uses_the_embedded_labeled_cohort_when_pre_training_on_the_embedded_one(smoke_cohort):
    """What the notebook does: the embedded cohort's unlabeled folder as data_root, no probe_json."""
    from ssl_utils.monitor import monitor_entries

    cfg = get_config("smoke", probe_every=1)
    root = os.path.dirname(smoke_cohort["tcia_root"])
    fit, score, path = monitor_entries(cfg, None, None, smoke_cohort["tcia_root"], cohort_root=root)
    assert len(fit) == 1 and len(score) == 2 and os.path.realpath(path).startswith(os.path.realpath(root))


def test_monitor_probes_the_classes_of_its_labeled_datalist(lesion_dataset, smoke_cohort, tmp_path):
    """A user's labeled datalist with its own classes (background, lesion): the probe head has their
    number of channels and the score is their mean Dice."""
    from ssl_utils.models import build_vitautoenc
    from ssl_utils.monitor import ProbeMonitor, monitor_entries
    from ssl_utils.runtime import Precision

    cfg = get_config("smoke", probe_every=1, probe_score_volumes=1)  # its 2 training volumes: fit 1, score 1
    fit, score, path = monitor_entries(cfg, lesion_dataset.json_path, lesion_dataset.out, smoke_cohort["tcia_root"])
    monitor = ProbeMonitor(cfg, fit, score, Precision(torch.device("cpu"), None), source=path)
    assert monitor.cfg["out_channels"] == 2 and list(monitor.class_names) == ["background", "lesion"]
    assert 0.0 <= monitor.score(build_vitautoenc(cfg))["probe_dice"] <= 1.0
