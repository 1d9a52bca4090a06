"""Datalists: reading them relative to ``data_root`` and checking every entry before training.

A datalist is the MONAI decathlon-style JSON the reference uses::

    {"training": [{"image": "data/volume-0001.nii.gz"}, ...], "validation": [...]}

with ``"label"`` as well for fine-tuning. Relative paths are resolved against ``data_root``
(default: the JSON file's folder); absolute paths and ``..`` are allowed when they resolve to a
readable file.

``preflight(...)`` opens every file of a datalist once, before any training, and reports *every*
bad entry at once (datalist, key, entry index, resolved path, what is wrong), instead of a stack
trace from deep inside a transform halfway through an epoch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


class DatalistError(ValueError):
    """A datalist, or a file it names, cannot be used. The message says where and why."""


def read_datalist_json(json_path: str | os.PathLike) -> dict[str, Any]:
    """Read and parse a datalist JSON file, with errors that name the file."""
    path = Path(json_path)
    if not path.is_file():
        raise DatalistError(f"datalist {path}: file not found (resolved: {path.resolve()})")
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatalistError(f"datalist {path}: cannot be read ({exc})") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatalistError(
            f"datalist {path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(content, dict):
        raise DatalistError(f"datalist {path}: expected a JSON object with lists of entries, found {type(content).__name__}")
    return content


def load_datalist(
    json_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    key: str = "training",
    require_label: bool = False,
) -> list[dict[str, str]]:
    """Return the entries under ``key`` with absolute, normalised paths.

    Checks the structure only (no file is opened): the key exists, the list is not empty, every
    entry is an object with an ``"image"`` (and ``"label"`` when ``require_label``) string.
    Raises ``DatalistError`` naming the datalist, the key and the entry index.
    """
    content = read_datalist_json(json_path)
    where = f"datalist {json_path}"
    if key not in content:
        raise DatalistError(f"{where}: no key {key!r} (keys present: {sorted(content)})")
    entries = content[key]
    if not isinstance(entries, list):
        raise DatalistError(f"{where}, key {key!r}: expected a list of entries, found {type(entries).__name__}")
    if not entries:
        raise DatalistError(f"{where}, key {key!r}: the list is empty")
    root = Path(data_root) if data_root else Path(json_path).parent
    fields = ("image", "label") if require_label else ("image",)
    out: list[dict[str, str]] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str) and not require_label:
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise DatalistError(f"{where}, key {key!r}, entry {i}: expected an object, found {entry!r}")
        resolved: dict[str, str] = {}
        for field in fields:
            if field not in entry:
                raise DatalistError(
                    f"{where}, key {key!r}, entry {i}: no {field!r} field (fields present: {sorted(entry)})"
                )
            value = entry[field]
            if not isinstance(value, str) or not value:
                raise DatalistError(f"{where}, key {key!r}, entry {i}: {field!r} must be a path string, found {value!r}")
            resolved[field] = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
        out.append(resolved)
    return out


# --------------------------------------------------------------------------------------------
# pre-flight check of the files themselves
# --------------------------------------------------------------------------------------------


def _load_nifti(path: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    img = nib.load(path)
    zooms = tuple(float(z) for z in img.header.get_zooms())
    data = np.asanyarray(img.dataobj)
    return data, np.asarray(img.affine, dtype=float), zooms


def check_entry(
    entry: dict[str, str],
    num_classes: int | None = None,
    check_values: bool = True,
) -> list[str]:
    """Return the problems of one resolved entry (empty when it is usable).

    Checks: each file exists and reads as a NIfTI volume; the image is 3D (a trailing singleton
    4th axis is accepted); voxel spacing is positive and finite; voxel values are finite; the label
    has the image's shape and affine and holds integers in ``0..num_classes-1``.
    """
    problems: list[str] = []
    arrays: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] = {}
    for field in ("image", "label"):
        if field not in entry:
            continue
        path = entry[field]
        if not os.path.exists(path):
            problems.append(f"{field} {path}: file not found")
            continue
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            problems.append(f"{field} {path}: not a readable file")
            continue
        try:
            data, affine, zooms = _load_nifti(path)
        except Exception as exc:  # nibabel raises many types for truncated / foreign files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{field} {path}: cannot be read as NIfTI ({type(exc).__name__}: {reason})")
            continue
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            problems.append(f"{field} {path}: expected a 3D volume, found {data.ndim}D with shape {tuple(data.shape)}")
            continue
        spatial = zooms[:3]
        if any((not math.isfinite(z)) or z <= 0 for z in spatial):
            problems.append(f"{field} {path}: voxel spacing must be positive, header says {spatial}")
        if check_values:
            if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
                bad = int((~np.isfinite(data)).sum())
                problems.append(f"{field} {path}: {bad} voxel(s) are NaN or Inf")
        arrays[field] = (data, affine, spatial)

    if "image" in arrays and "label" in arrays:
        img, img_aff, _ = arrays["image"]
        lab, lab_aff, _ = arrays["label"]
        label_path = entry["label"]
        if img.shape != lab.shape:
            problems.append(f"label {label_path}: shape {tuple(lab.shape)} differs from image shape {tuple(img.shape)}")
        elif not np.allclose(img_aff, lab_aff, atol=1e-3):
            problems.append(f"label {label_path}: affine differs from the image's (image and label are not aligned)")
        if check_values:
            values = np.unique(np.asarray(lab))
            if np.issubdtype(values.dtype, np.floating):
                if not np.isfinite(values).all():
                    problems.append(f"label {label_path}: contains NaN or Inf")
                    values = values[np.isfinite(values)]
                if not np.all(values == np.round(values)):
                    odd = values[values != np.round(values)][:5]
                    problems.append(f"label {label_path}: labels must be integers, found {odd.tolist()}")
            if num_classes is not None and values.size:
                outside = values[(values < 0) | (values > num_classes - 1)]
                if outside.size:
                    problems.append(
                        f"label {label_path}: values must be in 0..{num_classes - 1}, found {outside[:5].tolist()}"
                    )
    return problems


def preflight(
    entries: Sequence[dict[str, str]],
    datalist: str = "",
    key: str = "training",
    num_classes: int | None = None,
    skip_bad: bool = False,
    check_values: bool = True,
    progress: bool = True,
) -> list[dict[str, str]]:
    """Open every entry once; raise one ``DatalistError`` listing every bad entry.

    With ``skip_bad=True`` the bad entries are dropped with a printed list instead (an error is
    still raised when nothing usable remains). Returns the usable entries.
    """
    from tqdm.auto import tqdm

    bad: list[tuple[int, list[str]]] = []
    good: list[dict[str, str]] = []
    iterator: Iterable = enumerate(entries)
    if progress:
        iterator = tqdm(iterator, total=len(entries), desc=f"checking {key} ({len(entries)} entries)", leave=False)
    for i, entry in iterator:
        problems = check_entry(entry, num_classes=num_classes, check_values=check_values)
        if problems:
            bad.append((i, problems))
        else:
            good.append(entry)
    if bad:
        lines = [f"  entry {i}: " + "; ".join(p) for i, p in bad]
        head = f"datalist {datalist or '?'}, key {key!r}: {len(bad)} of {len(entries)} entries are unusable"
        message = head + ":\n" + "\n".join(lines)
        if not skip_bad or not good:
            if skip_bad:
                message += "\n(no usable entry left to train on)"
            raise DatalistError(message)
        print(message.replace("are unusable", "are unusable and skipped"))
    return good


def load_checked_datalist(
    json_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    key: str = "training",
    require_label: bool = False,
    num_classes: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> list[dict[str, str]]:
    """``load_datalist`` followed by ``preflight``: the entries, every file checked."""
    entries = load_datalist(json_path, data_root, key=key, require_label=require_label)
    return preflight(
        entries,
        datalist=str(json_path),
        key=key,
        num_classes=num_classes if require_label else None,
        skip_bad=skip_bad,
        progress=progress,
    )
