"""Any label set in fine-tuning: the classes come from the datalist's ``labels`` map (here
"background" and "lesion", prepared from NIfTI and NRRD by ``ssl_utils.prepare``), through UNETR's
output channels, the loss, Dice, every table and the checkpoint's head; the comparison makes
nested subsets of one datalist."""

import json
import os

import pytest

from ssl_utils import get_config
from ssl_utils.checkpoint import CheckpointError, load_checkpoint
from ssl_utils.data import DatalistError, datalist_label_names
from ssl_utils.finetune import compare_init, config_for_classes, finetune, nested_datalist

SMOKE = get_config("smoke", ft_iterations=2, ft_eval_every=2)
BTCV_WORDS = ("spleen", "liver", "kidney", "organs")


@pytest.fixture(scope="module")
def lesion_comparison(lesion_dataset, tmp_path_factory, one_thread):
    logdir = str(tmp_path_factory.mktemp("lesion_compare"))
    res = compare_init(SMOKE, train_sizes=[1, 2], seeds=[0], pretrained_path=None, json_path=lesion_dataset.json_path,
                       logdir=logdir, progress=False, log=lambda _: None)
    return res, logdir


@pytest.mark.slow
def test_the_comparison_trains_and_reports_the_datalists_own_classes(lesion_comparison, lesion_dataset):
    res, logdir = lesion_comparison
    assert res.class_names == ["background", "lesion"]
    assert [r["size"] for r in res.runs] == [1, 2]
    for run in res.runs:
        assert list(run["per_organ"]) == ["lesion"]
        ckpt = load_checkpoint(os.path.join(run["logdir"], "best_model.pt"))
        assert ckpt["state_dict"]["out.conv.conv.weight"].shape[0] == 2  # UNETR's head: one channel per class
        assert ckpt["class_names"] == ["background", "lesion"]
    report = open(os.path.join(logdir, "results_table.md")).read()
    assert "| lesion |" in report and "| mean (1 class) |" in report and "| Class |" in report
    assert "Per class (%" in report
    assert not any(word in report for word in BTCV_WORDS), report
    assert json.load(open(os.path.join(logdir, "results.json")))["config"]["out_channels"] == 2
    # nested subsets of the one datalist: the first N training entries, one shared validation list
    full = json.load(open(lesion_dataset.json_path))
    n1 = json.load(open(os.path.join(logdir, "datalists", "datalist_n1.json")))
    n2 = json.load(open(os.path.join(logdir, "datalists", "datalist_n2.json")))
    assert [os.path.basename(e["image"]) for e in n2["training"]] == [os.path.basename(e["image"]) for e in full["training"]]
    assert n1["training"] == n2["training"][:1] and n1["validation"] == n2["validation"]
    assert n1["labels"] == {"0": "background", "1": "lesion"}


def test_a_checkpoint_with_another_head_is_refused(lesion_comparison, smoke_cohort, tmp_path):
    res, _ = lesion_comparison
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last_model.pt").write_bytes(open(os.path.join(res.runs[0]["logdir"], "last_model.pt"), "rb").read())
    with pytest.raises(CheckpointError, match=r"output layer has 2 classes, the datalist has 14 \(background, spleen"):
        finetune(SMOKE, json_path=smoke_cohort["btcv_json"][1], logdir=str(run_dir), use_pretrained=False, resume=True,
                 progress=False, log=lambda _: None)


def test_labels_map_errors_name_the_datalist(tmp_path, lesion_dataset):
    content = json.load(open(lesion_dataset.json_path))
    bad = tmp_path / "gap.json"
    bad.write_text(json.dumps({**content, "labels": {"0": "background", "2": "lesion"}}))
    with pytest.raises(DatalistError, match=r"gap.json, key 'labels': class indices must run from 0 to 2 .* missing \[1\]"):
        datalist_label_names(bad)
    assert datalist_label_names(lesion_dataset.json_path) == {0: "background", 1: "lesion"}
    cfg, names = config_for_classes(get_config("smoke"), lesion_dataset.json_path)
    assert cfg["out_channels"] == 2 and names == ("background", "lesion")
    with pytest.raises(DatalistError, match="labels map has 2 classes .* out_channels is set to 5"):
        config_for_classes(get_config("smoke", out_channels=5), lesion_dataset.json_path)
    with pytest.raises(DatalistError, match="training-set size 3 asked for, but the datalist holds 2 training entries"):
        nested_datalist(lesion_dataset.json_path, None, 3, str(tmp_path))


def test_the_linear_probe_scores_the_datalists_classes(lesion_dataset, one_thread):
    from ssl_utils.probe import train_probe

    res = train_probe(SMOKE, None, seed=0, iterations=2, eval_every=2, json_path=lesion_dataset.json_path,
                      progress=False, log=lambda _: None)
    assert list(res.final["per_organ"]) == ["lesion"]
    assert res.probe.head.out_channels == 2 and res.encoder_unchanged
