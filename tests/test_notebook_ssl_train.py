"""ssl_train.ipynb: its parameters contract, and a headless papermill run at the smoke preset."""

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
    assert names["logdir"] == "runs/ssl" and names["overrides"] == {}
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


@pytest.mark.slow
def test_notebook_runs_headless_at_smoke(smoke_cohort, tmp_path, monkeypatch):
    import papermill as pm

    # the kernel is a separate process: keep its OpenMP threads from spinning on a shared CPU
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    logdir = tmp_path / "ssl"
    marker = os.path.join(smoke_cohort["root"], "cohort.json")
    stamp = os.stat(marker).st_mtime_ns
    out = tmp_path / "ssl_train.out.ipynb"
    pm.execute_notebook(
        NOTEBOOK,
        str(out),
        parameters={"preset": "smoke", "logdir": str(logdir), "cohort_root": smoke_cohort["root"]},
        cwd=ROOT,
        kernel_name="python3",
        execution_timeout=300,  # seconds per cell
        progress_bar=False,
    )
    for name in ("best_model.pt", "last_model.pt", "history.json", "history.csv"):
        assert (logdir / name).is_file(), name
    for name in ("ssl_loss_curves.png", "ssl_views_reconstructions.png"):
        assert (logdir / name).stat().st_size > 10_000, name
    ckpt = torch.load(logdir / "best_model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["preset"] == "smoke" and ckpt["epoch"] >= 1

    nb = nbformat.read(str(out), as_version=4)
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 3  # the views of one batch, the loss curves, the reconstructions
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "loaded" in text and "encoder tensors" in text  # the UNETR transfer check ran
    assert os.stat(marker).st_mtime_ns == stamp  # empty data_root: the embedded cohort was reused
