"""``load_finetune_run``: a finished fine-tuning run read back from its folder gives what
``finetune`` returned (history, final Dice, weights, predictions) without training; an
unfinished run or a folder without a run is a clear error (smoke preset, CPU)."""

import os

import pytest
import torch

from ssl_utils import get_config
from ssl_utils.checkpoint import CheckpointError, load_checkpoint
from ssl_utils.finetune import finetune, load_finetune_run, predict_labels

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smoke_cohort):
    cfg = get_config("smoke", ft_iterations=4, ft_eval_every=2, ft_final_evals=2, amp="off")
    data = dict(data_root=smoke_cohort["btcv_root"], json_path=smoke_cohort["btcv_json"][3])
    logdir = str(tmp_path_factory.mktemp("ft_reload") / "run")
    run = finetune(cfg, logdir=logdir, use_pretrained=False, progress=False, log=lambda *_: None, seed=5, **data)
    return cfg, data, logdir, run


def test_reload_gives_back_what_finetune_returned(finished):
    cfg, data, logdir, run = finished
    back = load_finetune_run(logdir, **data)
    assert back["iteration"] == run["iteration"] == 4
    assert back["history"] == run["history"] and back["curve"] == run["curve"]
    assert back["best_dice"] == run["best_dice"]
    assert back["final"]["mean_dice"] == pytest.approx(run["final"]["mean_dice"])
    assert back["final"]["iterations"] == [2, 4]
    assert back["train_losses"] == run["train_losses"]
    assert back["class_names"] == run["class_names"] and back["n_train"] == run["n_train"]
    assert back["n_val"] == run["n_val"] and back["use_pretrained"] is False
    ref, sd = run["model"].state_dict(), back["model"].state_dict()
    assert ref.keys() == sd.keys() and all(torch.equal(ref[k], sd[k]) for k in ref)
    case = back["val_dataset"][0]
    assert torch.equal(predict_labels(back["model"], case["image"][None], back["config"], back["precision"]),
                       predict_labels(run["model"], case["image"][None], run["config"], run["precision"]))


def test_reload_best_weights_without_data(finished):
    _, _, logdir, run = finished
    back = load_finetune_run(logdir, which="best")
    best = load_checkpoint(run["best"])["state_dict"]
    sd = back["model"].state_dict()
    assert all(torch.equal(best[k], sd[k]) for k in best)
    assert back["val_dataset"] is None and back["n_val"] == 0
    with pytest.raises(ValueError, match="which='first'"):
        load_finetune_run(logdir, which="first")


def test_reload_refuses_an_unfinished_run_and_a_folder_without_one(finished, tmp_path):
    cfg, data, _, _ = finished
    half = str(tmp_path / "half")
    finetune(cfg, logdir=half, use_pretrained=False, progress=False, log=lambda *_: None, seed=5, stop_after=1, **data)
    with pytest.raises(CheckpointError, match="stopped at iteration 1 of 4; finish it first"):
        load_finetune_run(half)
    with pytest.raises(FileNotFoundError, match="is not a fine-tuning run folder"):
        load_finetune_run(str(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "nothing")
