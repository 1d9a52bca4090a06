"""``ssl_finetune.ipynb`` executed top to bottom with papermill at the smoke preset, with a
pre-trained checkpoint and without one (then it runs random initialisation only and says so)."""

import json
import os

import nbformat
import pytest
import torch

from ssl_utils import build_vitautoenc, get_config
from ssl_utils.checkpoint import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "ssl_finetune.ipynb")


def run_notebook(tmp_path, **parameters):
    import papermill as pm

    out = str(tmp_path / "executed.ipynb")
    pm.execute_notebook(
        NOTEBOOK,
        out,
        parameters=parameters,
        cwd=REPO,
        kernel_name="python3",
        execution_timeout=300,
        progress_bar=False,
    )
    return nbformat.read(out, as_version=4)


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                text.append(o["text"])
            elif "data" in o:
                text.append(o["data"].get("text/markdown", "") + o["data"].get("text/plain", ""))
    return "\n".join(text)


def count_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_parameters_cell_is_tagged_and_complete():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    for name in ("preset", "data_root", "json_path", "logdir", "pretrained_path", "use_pretrained", "train_sizes",
                 "seeds", "overrides"):
        assert f"\n{name} = " in "\n" + first_code.source, name
    assert 'pretrained_path = "runs/ssl/best_model.pt"' in first_code.source


@pytest.mark.slow
def test_notebook_with_a_pretrained_checkpoint(tmp_path, smoke_cohort):
    torch.manual_seed(0)
    ckpt = str(tmp_path / "ssl" / "best_model.pt")
    cfg = get_config("smoke")
    save_checkpoint({"state_dict": build_vitautoenc(cfg).state_dict(), "optimizer": {}, "epoch": 1,
                     "config": cfg.to_dict()}, ckpt)
    logdir = str(tmp_path / "ft")
    nb = run_notebook(
        tmp_path,
        preset="smoke",
        logdir=logdir,
        pretrained_path=ckpt,
        cohort_root=smoke_cohort["root"],
        train_sizes=[1],
        seeds=[0],
        overrides={"ft_iterations": 2, "ft_eval_every": 1},
    )
    text = outputs(nb)
    assert "loaded 161/161 encoder tensors" in text
    assert "RANDOM INITIALISATION ONLY" not in text
    assert "| Training Volumes | Validation Volumes | Random Init Dice | Pre-trained Dice | Relative Improvement |" in text
    compare = os.path.join(logdir, "compare")
    with open(os.path.join(compare, "results.json")) as f:
        runs = json.load(f)["runs"]
    assert sorted(r["arm"] for r in runs) == ["pretrained", "random"]
    for name in ("results_table.md", "dice_bars.png", "dice_curves.png", "n1/seed0/pretrained/curves.png",
                 "n1/seed0/pretrained/validation_slice.png", "n1/seed0/pretrained/best_model.pt"):
        assert os.path.getsize(os.path.join(compare, name)) > 0, name
    assert count_images(nb) >= 6  # crops, curves, validation slice, bars, comparison curves, bundle's output
    # the last section: both bundles exported, the segmenter run by `python -m monai.bundle run`
    bundles = os.path.join(logdir, "bundles")
    for kind, folder in (("encoder", "ssl_vit_encoder"), ("segmenter", "unetr_seg")):
        assert f"{kind} bundle {os.path.join(bundles, folder)}" in text
        assert os.path.isfile(os.path.join(bundles, folder, "configs", "metadata.json"))
    assert "same shape and affine as the input: True" in text
    with open(os.path.join(bundles, "summary.json")) as f:
        summary = json.load(f)
    assert summary["volumes"] == len(os.listdir(os.path.join(bundles, "pred"))) >= 1
    assert f"segmented {summary['volumes']} volume(s)" in text
    assert all(c["same_shape_and_affine"] and 0 <= c["mean_dice"] <= 1 for c in summary["cases"].values())
    assert os.path.getsize(os.path.join(bundles, "bundle_segmentation.png")) > 0


@pytest.mark.slow
def test_notebook_without_a_checkpoint_runs_random_init_only(tmp_path, smoke_cohort):
    logdir = str(tmp_path / "ft")
    nb = run_notebook(
        tmp_path,
        preset="smoke",
        logdir=logdir,
        pretrained_path=str(tmp_path / "no_such_run" / "best_model.pt"),
        cohort_root=smoke_cohort["root"],
        train_sizes=[1],
        seeds=[0],
        overrides={"ft_iterations": 2, "ft_eval_every": 1},
    )
    text = outputs(nb)
    assert "RANDOM INITIALISATION ONLY" in text
    assert "segmenter bundle" in text and "encoder bundle" not in text  # no encoder to share
    assert "same shape and affine as the input: True" in text
    table = open(os.path.join(logdir, "compare", "results_table.md")).read()
    row = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    assert row.count("n/a") == 2  # pre-trained Dice and relative improvement
    with open(os.path.join(logdir, "compare", "results.json")) as f:
        assert [r["arm"] for r in json.load(f)["runs"]] == ["random"]


@pytest.mark.slow
def test_notebook_on_a_user_datalist_with_its_own_classes(tmp_path, lesion_dataset):
    """The user's ``json_path`` (``ssl_utils.prepare``'s dataset.json, classes "background" and
    "lesion") drives the single run and the comparison; ``train_sizes: [1]`` is a subset of it."""
    logdir = str(tmp_path / "ft")
    nb = run_notebook(
        tmp_path,
        preset="smoke",
        data_root=lesion_dataset.out,
        json_path=lesion_dataset.json_path,
        logdir=logdir,
        pretrained_path=str(tmp_path / "no_such_run" / "best_model.pt"),
        train_sizes=[1],
        seeds=[0],
        overrides={"ft_iterations": 2, "ft_eval_every": 1},
    )
    text = outputs(nb)
    assert "2 classes: 0 background, 1 lesion" in text
    assert "mean (1 class)" in text and "| lesion |" in text
    assert "spleen" not in text and "13 organs" not in text
    # the bundle of this run: its own class
    assert "CT segmentation of 1 class(es): lesion" in text and "same shape and affine as the input: True" in text
    compare = os.path.join(logdir, "compare")
    with open(os.path.join(compare, "results.json")) as f:
        runs = json.load(f)["runs"]
    assert [(r["size"], r["arm"], list(r["per_organ"])) for r in runs] == [(1, "random", ["lesion"])]
    with open(os.path.join(compare, "datalists", "datalist_n1.json")) as f:
        assert len(json.load(f)["training"]) == 1
