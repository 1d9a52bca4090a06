"""ssl_train.ipynb: its parameters contract, and headless papermill runs at the smoke preset, one per
pretext."""

import json
import os

import nbformat
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "ssl_train.ipynb")


def test_notebook_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[0]
    assert "parameters" in first.metadata.get("tags", [])
    names = {}
    exec(first.source, {}, names)  # plain assignments only
    assert names["preset"] == "demo" and names["data_root"] == "" and names["json_path"] == ""
    assert names["logdir"] == "runs/ssl" and names["overrides"] == {} and names["pretext"] == "views"
    assert "cuda:0" not in "".join(c.source for c in code)


@pytest.mark.parametrize("name", ["ssl_train.ipynb", "ssl_finetune.ipynb"])
def test_committed_notebooks_are_executed_demo_copies(name):
    """What a reader sees on GitHub: the demo's executed copy, top to bottom, without an error, its
    plots included, under 3 MB."""
    path = os.path.join(ROOT, name)
    assert os.path.getsize(path) < 3 * 1024 * 1024
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(counts) and counts == sorted(counts), f"{name}: not executed top to bottom: {counts}"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    assert nb.metadata.get("papermill", {}).get("parameters", {}).get("preset") == "demo"


def _run_at_smoke(smoke_cohort, tmp_path, monkeypatch, **parameters):
    """Execute a copy of the notebook at the smoke preset on the session's cohort; returns
    ``(logdir, executed notebook, its text output)``."""
    import papermill as pm

    # the kernel is a separate process: keep its OpenMP threads from spinning on a shared CPU
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    logdir = tmp_path / "ssl"
    out = tmp_path / "ssl_train.out.ipynb"
    pm.execute_notebook(
        NOTEBOOK,
        str(out),
        parameters={"preset": "smoke", "logdir": str(logdir), "cohort_root": smoke_cohort["root"], **parameters},
        cwd=ROOT,
        kernel_name="python3",
        execution_timeout=300,  # seconds per cell
        progress_bar=False,
    )
    nb = nbformat.read(str(out), as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    return logdir, nb, text


def _images(nb) -> int:
    return sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))


@pytest.mark.slow
def test_notebook_runs_headless_at_smoke(smoke_cohort, tmp_path, monkeypatch):
    marker = os.path.join(smoke_cohort["root"], "cohort.json")
    stamp = os.stat(marker).st_mtime_ns
    logdir, nb, text = _run_at_smoke(smoke_cohort, tmp_path, monkeypatch)
    for name in ("best_model.pt", "last_model.pt", "history.json", "history.csv"):
        assert (logdir / name).is_file(), name
    for name in ("ssl_loss_curves.png", "ssl_views_reconstructions.png"):
        assert (logdir / name).stat().st_size > 10_000, name
    ckpt = torch.load(logdir / "best_model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["preset"] == "smoke" and ckpt["epoch"] >= 1

    assert _images(nb) >= 3  # the views of one batch, the loss curves, the reconstructions
    assert "loaded" in text and "encoder tensors" in text  # the UNETR transfer check ran
    assert os.stat(marker).st_mtime_ns == stamp  # empty data_root: the embedded cohort was reused


@pytest.mark.slow
def test_notebook_runs_headless_with_the_mae_pretext(smoke_cohort, tmp_path, monkeypatch):
    """``pretext="mae"``: every cell runs with the masked autoencoder, whose figures replace the
    two-view ones, and its encoder goes into UNETR."""
    logdir, nb, text = _run_at_smoke(smoke_cohort, tmp_path, monkeypatch, pretext="mae")
    ckpt = torch.load(logdir / "best_model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["pretext"] == "mae" and ckpt["epoch"] >= 1
    for name in ("ssl_loss_curves.png", "mae_reconstruction.png"):
        assert (logdir / name).stat().st_size > 10_000, name
    assert not (logdir / "ssl_views_reconstructions.png").exists()
    history = json.loads((logdir / "history.json").read_text())
    validated = [row for row in history if "val_recon" in row]
    assert validated and all("val_patch_mean" in row and "val_const_l1" not in row for row in validated)

    assert _images(nb) >= 3  # the crop and its masked input, the loss curves, the reconstruction
    assert "'pretext': 'mae'" in text  # the configuration cell used the parameter
    assert "untrained: masked-patch loss" in text and "x each masked patch's own mean" in text
    assert "loaded" in text and "encoder tensors" in text  # the MAE's encoder fits UNETR
