"""The committed, executed notebooks read well on a static page: no widget outputs or widget
state, no paths of the machine that ran them, a size a browser opens at once; and the two tools
that keep them so (``ssl_utils.notebooks.clean_notebook``, ``SSL_UTILS_PROGRESS=text``) do what
they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ssl_utils.notebooks import WIDGET_VIEW, clean_notebook, clean_notebook_dict, final_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("ssl_train.ipynb", "ssl_finetune.ipynb")
MACHINE_PATHS = ("/work/", "/root/", "/home/", "/tmp/", "/Users/")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_widgets_no_machine_paths_and_is_small(name):
    path = os.path.join(ROOT, name)
    text = open(path, encoding="utf-8").read()
    assert os.path.getsize(path) < 3 * 2**20, f"{name}: {os.path.getsize(path) / 2**20:.1f} MiB"
    nb = json.loads(text)
    assert "widgets" not in nb["metadata"], f"{name}: widget state in the notebook's metadata"
    widgets = [i for i, cell in enumerate(nb["cells"]) for out in cell.get("outputs", [])
               if WIDGET_VIEW in out.get("data", {})]
    assert not widgets, f"{name}: widget outputs in cells {widgets}"
    found = sorted({p for p in MACHINE_PATHS if p in text})
    assert not found, f"{name}: machine paths {found}, e.g. ...{text[text.index(found[0]) - 60:text.index(found[0]) + 60]}..."


def _executed(root: str) -> dict:
    """A small executed notebook as papermill writes it, run from ``root``."""
    widget = {"output_type": "display_data", "metadata": {},
              "data": {WIDGET_VIEW: {"model_id": "abc", "version_major": 2, "version_minor": 0},
                       "text/plain": ["epochs:   0%|          | 0/3"]}}
    bar = [{"output_type": "stream", "name": "stderr", "text": ["\r", f"caching: {p}%|"]} for p in (0, 50, 100)]
    bar[-1]["text"].append("\n")
    epoch_bar = {"output_type": "stream", "name": "stderr", "text": "\repoch 1: 50%|\r           \r"}  # cleared
    printed = [{"output_type": "stream", "name": "stdout", "text": [f"best checkpoint {root}/runs/ssl/best_model.pt\n"]},
               epoch_bar, {"output_type": "stream", "name": "stdout", "text": [f"root {root}\n"]}]
    table = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
             "data": {"text/plain": [f"'{root}/data/x.nii.gz'"], "image/png": "iVBORw0KGgo/work/"}}
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}},
                         "papermill": {"input_path": f"{root}/ssl_train.ipynb", "output_path": f"{root}/runs/demo/ssl_train.ipynb"}},
            "cells": [{"cell_type": "code", "id": "a", "metadata": {}, "execution_count": 1, "source": "x",
                       "outputs": [widget, *bar, *printed, table]}]}


def test_clean_notebook_drops_widgets_makes_paths_relative_and_keeps_final_progress_lines():
    root = "/work/somewhere/repo"
    nb = clean_notebook_dict(_executed(root), root)
    assert "widgets" not in nb["metadata"]
    assert nb["metadata"]["papermill"]["input_path"] == "ssl_train.ipynb"
    assert nb["metadata"]["papermill"]["output_path"] == "runs/demo/ssl_train.ipynb"
    outputs = nb["cells"][0]["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "stream", "execute_result"]
    assert outputs[0]["text"] == "caching: 100%|\n"  # three rewrites of one line: its final state
    assert outputs[1]["text"] == "best checkpoint runs/ssl/best_model.pt\nroot .\n"
    assert outputs[2]["data"]["text/plain"] == ["'data/x.nii.gz'"]
    assert outputs[2]["data"]["image/png"] == "iVBORw0KGgo/work/"  # images are not text: untouched
    # a path that only starts like the root is not the root
    other = clean_notebook_dict(_executed("/work/somewhere/repo2"), root)
    assert other["metadata"]["papermill"]["input_path"] == "/work/somewhere/repo2/ssl_train.ipynb"


def test_clean_notebook_rewrites_a_file_relative_to_where_papermill_ran_it(tmp_path):
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(_executed("/elsewhere/checkout")))
    clean_notebook(path)  # the root comes from papermill's input_path
    text = path.read_text()
    assert "/elsewhere/checkout" not in text and WIDGET_VIEW not in text
    import nbformat

    nbformat.validate(nbformat.reads(text, as_version=4))


def test_final_text_is_what_a_terminal_shows():
    assert final_text("a\rb\rc\nd\n") == "c\nd\n"
    assert final_text("no returns") == "no returns"


def test_text_progress_on_request_only():
    code = ("import ssl_utils, tqdm.auto, tqdm.std; "
            "print(tqdm.auto.tqdm is tqdm.std.tqdm, ssl_utils.progress.ENV)")
    env = {k: v for k, v in os.environ.items() if k != "SSL_UTILS_PROGRESS"}
    on = subprocess.run([sys.executable, "-c", code], env={**env, "SSL_UTILS_PROGRESS": "text", "PYTHONPATH": ROOT},
                        capture_output=True, text=True, timeout=120)
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.split() == ["True", "SSL_UTILS_PROGRESS"]
