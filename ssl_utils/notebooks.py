"""Executed notebooks fit for a static page: no widget state, no paths of the machine that ran them.

``make demo`` executes both notebooks with papermill and commits what they printed and drew. Two
things in such a copy read badly on a static page (GitHub, nbviewer): Jupyter widget outputs
(tqdm's bars in a kernel), which show as bars frozen at 0% and carry their state in the
notebook's metadata, and absolute paths of the machine that ran it (papermill's input and output
paths, whatever a cell printed). ``clean_notebook`` removes the first and makes the second
relative to the repository; it also keeps, of each text line that a progress bar rewrote with
carriage returns, only its final state, as a terminal shows it (a bar that cleared its line
leaves nothing).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .io import write_text

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def is_widget_output(output: dict[str, Any]) -> bool:
    """Whether a cell output is a Jupyter widget (its ``data`` has a widget view)."""
    return WIDGET_VIEW in output.get("data", {})


def final_text(text: str) -> str:
    """What a terminal shows of ``text``: of each line, the part after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _relative(text: str, root: str) -> str:
    """``text`` with every ``root/...`` path made relative (``root`` itself becomes ``.``)."""
    root = root.rstrip(os.sep)
    return re.sub(re.escape(root) + r"(?=/|\b)/?", lambda m: "" if m.group(0).endswith("/") else ".", text)


def _merged_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stream outputs of one name merged into one (a progress bar writes many)."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == out.get("name")):
            merged[-1] = {**merged[-1], "text": _text(merged[-1]["text"]) + _text(out["text"])}
        else:
            merged.append(out)
    return merged


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def _clean_value(value: Any, root: str) -> Any:
    """Relative paths inside every string of ``value`` (a string, or lists and dicts of them)."""
    if isinstance(value, str):
        return _relative(value, root)
    if isinstance(value, list):
        return [_clean_value(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _clean_value(v, root) for k, v in value.items()}
    return value


def _clean_output(output: dict[str, Any], root: str) -> dict[str, Any]:
    """Relative paths in an output's text (stream text, ``text/*`` data, a traceback); images untouched."""
    out = dict(output)
    if "text" in out:
        out["text"] = _clean_value(out["text"], root)
    if "traceback" in out:
        out["traceback"] = _clean_value(out["traceback"], root)
    if "data" in out:
        out["data"] = {k: _clean_value(v, root) if k.startswith("text/") else v for k, v in out["data"].items()}
    return out


def notebook_root(nb: dict[str, Any]) -> str | None:
    """The folder the notebook was executed from: that of papermill's ``input_path``, if recorded."""
    path = nb.get("metadata", {}).get("papermill", {}).get("input_path")
    return os.path.dirname(path) if path and os.path.isabs(path) else None


def clean_notebook_dict(nb: dict[str, Any], root: str) -> dict[str, Any]:
    """``nb`` (notebook JSON as a dict) without widget outputs or widget state, with paths under
    ``root`` made relative to it and rewritten progress lines reduced to their final state."""
    nb = dict(nb)
    metadata = dict(nb.get("metadata", {}))
    metadata.pop("widgets", None)
    if "papermill" in metadata:
        metadata["papermill"] = _clean_value(metadata["papermill"], root)
    nb["metadata"] = metadata
    cells = []
    for cell in nb.get("cells", []):
        if "outputs" in cell:
            outputs = [o for o in cell["outputs"] if not is_widget_output(o)]
            outputs = [{**o, "text": final_text(_text(o["text"]))} if o.get("output_type") == "stream" else o
                       for o in _merged_streams(outputs)]
            # a bar that cleared its line leaves nothing; the text around it joins up again
            outputs = _merged_streams([o for o in outputs if o.get("output_type") != "stream" or o["text"].strip()])
            cell = {**cell, "outputs": [_clean_output(o, root) for o in outputs]}
        cells.append(cell)
    nb["cells"] = cells
    return nb


def clean_notebook(path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Rewrite the notebook at ``path`` in place with ``clean_notebook_dict``; paths are made
    relative to ``root`` (default: the folder papermill executed it from, else the current one)."""
    import nbformat

    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    root = os.path.abspath(root) if root is not None else (notebook_root(nb) or os.getcwd())
    cleaned = nbformat.from_dict(clean_notebook_dict(nb, root))
    mode = os.stat(path).st_mode & 0o777
    write_text(str(path), nbformat.writes(cleaned) + "\n")
    os.chmod(path, mode)  # the atomic writer's temporary file is private
