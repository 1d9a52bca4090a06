"""The study's statistics on known inputs, and the linear probe's frozen encoder."""

import math

import numpy as np
import pytest
import torch

from ssl_utils.stats import BETTER, NO_DIFFERENCE, WORSE, curve_auc, paired_comparison


def test_curve_auc_known_shapes():
    assert curve_auc([0, 10, 20], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    # a straight ramp from 0 to 1 has average height 1/2
    assert curve_auc([0, 50, 100], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    # order of the points does not matter; a single point is its value
    assert curve_auc([100, 0, 50], [1.0, 0.0, 0.5]) == pytest.approx(0.5)
    assert curve_auc([7], [0.3]) == pytest.approx(0.3)
    # the curve that rises earlier has the larger area at the same endpoint
    assert curve_auc([0, 1, 2, 3], [0.2, 0.8, 0.8, 0.8]) > curve_auc([0, 1, 2, 3], [0.2, 0.2, 0.2, 0.8])
    with pytest.raises(ValueError):
        curve_auc([0, 1], [0.5])


def test_identical_arms_give_exactly_zero():
    a = [0.31, 0.42, 0.28, 0.35, 0.40]
    res = paired_comparison(a, list(a))
    assert res["diffs"] == [0.0] * 5
    assert res["mean_diff"] == 0.0
    lo, hi = res["t_ci"]
    assert lo <= 0.0 <= hi
    blo, bhi = res["boot_ci"]
    assert blo <= 0.0 <= bhi
    assert res["verdict"] == NO_DIFFERENCE


def test_paired_t_interval_matches_textbook():
    from scipy import stats

    a = np.array([0.30, 0.35, 0.32, 0.40, 0.38])
    b = a + np.array([0.05, 0.02, 0.04, 0.03, 0.06])
    res = paired_comparison(a, b)
    d = b - a
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert res["mean_diff"] == pytest.approx(d.mean())
    assert res["t_ci"][0] == pytest.approx(d.mean() - half)
    assert res["t_ci"][1] == pytest.approx(d.mean() + half)
    assert res["verdict"] == BETTER
    assert paired_comparison(b, a)["verdict"] == WORSE
    # pairing matters: the same values shuffled across seeds give a wide interval
    noisy = paired_comparison(a, b[::-1])
    assert noisy["t_ci"][1] - noisy["t_ci"][0] > res["t_ci"][1] - res["t_ci"][0]


def test_probe_trains_only_its_head(smoke_cohort):
    from ssl_utils import get_config
    from ssl_utils.probe import build_probe, train_probe

    cfg = get_config("smoke")
    res = train_probe(cfg, None, seed=0, iterations=2, eval_every=2,
                      data_root=smoke_cohort["btcv_root"], json_path=smoke_cohort["btcv_json"][1], progress=False)
    assert res["encoder_unchanged"]
    probe = res["probe"]
    assert all(not p.requires_grad for p in probe.encoder.parameters())
    fresh, _ = build_probe(cfg, None, seed=0)
    # the head moved, the encoder did not
    assert not torch.equal(fresh.head.weight, probe.head.weight.cpu())
    for (k, v), (_, w) in zip(fresh.encoder.state_dict().items(), probe.encoder.state_dict().items()):
        assert torch.equal(v, w.cpu()), k
    assert len(res["curve"]) == 1 and 0.0 <= res["final"]["mean_dice"] <= 1.0
