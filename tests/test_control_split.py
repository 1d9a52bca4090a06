"""The positive control's labeled split: disjoint from training, tuning and validation, in every
datalist, and the other splits' subjects unchanged by adding it."""

import json

from ssl_utils import get_config


def _entries(datalist: dict, key: str) -> set[str]:
    return {e["image"] for e in datalist.get(key, [])} | {e["label"] for e in datalist.get(key, [])}


def test_control_split_is_disjoint_from_the_others(smoke_cohort):
    cfg = get_config("smoke")
    for n, path in smoke_cohort["btcv_json"].items():
        with open(path) as f:
            datalist = json.load(f)
        control = _entries(datalist, "control")
        assert len(datalist["control"]) == cfg["synth_labeled_control"]
        # the control split is disjoint from the whole training list (not only this size's subset)
        with open(smoke_cohort["btcv_json"][max(smoke_cohort["btcv_json"])]) as f:
            largest = json.load(f)
        for key in ("training", "tuning", "validation"):
            assert not control & _entries(largest, key), key
            assert not control & _entries(datalist, key), key


def test_adding_a_control_split_leaves_the_other_splits_as_they_were(smoke_cohort, tmp_path):
    from ssl_utils.synthetic import make_cohort_from_config

    without = make_cohort_from_config(get_config("smoke", synth_labeled_control=0), str(tmp_path), progress=False)
    n = max(without["btcv_json"])
    with open(without["btcv_json"][n]) as f:
        plain = json.load(f)
    with open(smoke_cohort["btcv_json"][n]) as f:
        with_control = json.load(f)
    assert "control" not in plain
    for key in ("training", "tuning", "validation"):
        assert plain[key] == with_control[key], key
