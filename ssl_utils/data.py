"""Datalists: reading them relative to ``data_root`` and checking every entry before training.

A datalist is the MONAI decathlon-style JSON the reference uses::

    {"training": [{"image": "data/volume-0001.nii.gz"}, ...], "validation": [...]}

with ``"label"`` as well for fine-tuning. Relative paths are resolved against ``data_root``
(default: the JSON file's folder); absolute paths and ``..`` are allowed when they resolve to a
readable file.

``preflight_datalist(...)`` opens every file of a datalist once, before any training, and
reports *every* bad entry of every key at once (datalist, key, entry index, the path as written
and as resolved, what is wrong), instead of a stack trace from deep inside a transform halfway
through an epoch. Files are read in a few threads (decompression and NumPy reductions release
the GIL); each file is decompressed once and its voxels are reduced without a float copy.

What a file must satisfy (``check_entry``):

- header (``check_values=False`` checks this alone, from one open that reads a few KB): the file
  exists, is readable, holds a NIfTI-1 or NIfTI-2 header; the image is 3D (a trailing singleton
  4th axis is accepted); the voxel spacing in the header is positive and finite, the affine is
  invertible, the intensity scaling finite; a label has its image's shape and affine;
- content: nibabel reads it to the end (a truncated ``.nii.gz`` is refused); voxel values are
  finite (no NaN / Inf); with an intensity ``window`` (the transforms' HU window) some voxel lies
  above the window's lower end (an all-air volume is refused rather than trained on, because
  cropping its foreground would leave nothing but padding); label values are integers in
  ``0..num_classes-1``.

Pre-training checks the headers before any volume is read (``check_datalist`` with
``split_across_ranks``: each rank checks its share) and the content on the one read that fills
its cache (``ssl_utils.transforms.LoadCheckedd`` raises ``ContentError``); both report through
``CheckedDatalist.report``, so the message is the same.

A volume smaller than the ROI is fine: the transforms pad it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

# MONAI 1.6.1 builds a DICOM reader (NvImgCodecPydicomReader) inside every LoadImage whenever pydicom
# is installed (``ssl_utils.prepare`` needs it), and on machines without nvImageCodec that reader
# logs and warns, once per transform chain, that it falls back to pydicom's own decoders. The
# datalists name NIfTI files only, so the notice says nothing about this project's data: it is
# silenced here, by its exact text, and nothing else is.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register",
                        category=UserWarning)


class DatalistError(ValueError):
    """A datalist, or a file it names, cannot be used. The message says where and why."""


def read_datalist_json(json_path: str | os.PathLike) -> dict[str, Any]:
    """Read and parse a datalist JSON file, with errors that name the file."""
    path = Path(json_path)
    if not path.is_file():
        raise DatalistError(f"datalist {path}: file not found (resolved: {path.resolve()})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatalistError(f"datalist {path}: cannot be read ({exc})") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatalistError(
            f"datalist {path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(content, dict):
        raise DatalistError(
            f"datalist {path}: expected a JSON object with lists of entries, found {type(content).__name__}"
        )
    return content


def parse_label_map(labels: Mapping[Any, Any], add_background: bool = False) -> tuple[dict[int, str], list[str]]:
    """``({index: name}, problems)`` of a class map such as ``{"0": "background", "1": "lesion"}``:
    keys must be integers >= 0 with non-empty names, and the indices must run from 0 to K-1
    without gaps (they are the segmentation network's K output channels). ``add_background``:
    index 0 is ``"background"`` when the map leaves it out."""
    names: dict[int, str] = {}
    problems: list[str] = []
    for key, name in labels.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            problems.append(f"key {key!r} is not a class index (an integer)")
            continue
        if index < 0 or not isinstance(name, str) or not name.strip():
            problems.append(f"entry {key!r}: {name!r}: expected an index >= 0 and a non-empty name")
            continue
        names[index] = name.strip()
    if add_background:
        names.setdefault(0, "background")
    if names:
        gaps = sorted(set(range(max(names) + 1)) - set(names))
        if gaps:
            problems.append(f"class indices must run from 0 to {max(names)} without gaps (they are the network's output "
                            f"channels); missing {gaps}")
    return dict(sorted(names.items())), problems


def datalist_label_names(json_path: str | os.PathLike) -> dict[int, str] | None:
    """The datalist's ``labels`` map as ``{index: name}`` (``None`` when it has none).

    The map (``{"0": "background", "1": "lesion"}``) names every class the label maps hold; its
    indices must run from 0 to K-1 without gaps, since they are the segmentation network's K output
    channels. Raises ``DatalistError`` naming the datalist and every bad key.
    """
    content = read_datalist_json(json_path)
    labels = content.get("labels")
    if labels is None:
        return None
    where = f"datalist {json_path}, key 'labels'"
    if not isinstance(labels, dict) or not labels:
        raise DatalistError(f"{where}: expected an object of class index -> name, e.g. {{\"0\": \"background\", "
                            f"\"1\": \"liver\"}}, found {labels!r}")
    names, problems = parse_label_map(labels)
    if len(names) == 1 and not problems:
        problems.append("only one class: segmentation needs background and at least one more class")
    if problems:
        raise DatalistError(f"{where}: " + "; ".join(problems))
    return names


def _root(json_path: str | os.PathLike, data_root: str | os.PathLike | None) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(data_root))) if data_root else os.path.dirname(
        os.path.abspath(os.fspath(json_path))
    )


def _parse_key(
    content: dict[str, Any], json_path: str, root: str, key: str, require_label: bool
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[tuple[int, str]]]:
    """Entries of one key: (resolved entries, paths as written, per-entry problems).

    Problems with the key itself (missing, not a list, empty) raise ``DatalistError``.
    """
    where = f"datalist {json_path}"
    if key not in content:
        raise DatalistError(f"{where}: no key {key!r} (keys present: {sorted(content)})")
    entries = content[key]
    if not isinstance(entries, list):
        raise DatalistError(f"{where}, key {key!r}: expected a list of entries, found {type(entries).__name__}")
    if not entries:
        raise DatalistError(f"{where}, key {key!r}: the list is empty")
    fields = ("image", "label") if require_label else ("image",)
    resolved_all: list[dict[str, str]] = []
    written_all: list[dict[str, str]] = []
    problems: list[tuple[int, str]] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str) and not require_label:
            entry = {"image": entry}
        if not isinstance(entry, dict):
            problems.append((i, f"expected an object with {' and '.join(map(repr, fields))}, found {entry!r}"))
            resolved_all.append({})
            written_all.append({})
            continue
        resolved: dict[str, str] = {}
        written: dict[str, str] = {}
        for field in fields:
            if field not in entry:
                problems.append((i, f"no {field!r} field (fields present: {sorted(entry)})"))
                continue
            value = entry[field]
            if not isinstance(value, str) or not value:
                problems.append((i, f"{field!r} must be a path string, found {value!r}"))
                continue
            written[field] = value
            resolved[field] = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
        resolved_all.append(resolved)
        written_all.append(written)
    return resolved_all, written_all, problems


def load_datalist(
    json_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    key: str = "training",
    require_label: bool = False,
) -> list[dict[str, str]]:
    """Return the entries under ``key`` with absolute, normalised paths.

    Checks the structure only (no file is opened): the key exists, the list is not empty, every
    entry is an object with an ``"image"`` (and ``"label"`` when ``require_label``) string.
    Raises one ``DatalistError`` naming the datalist, the key and every bad entry's index.
    """
    content = read_datalist_json(json_path)
    entries, _, problems = _parse_key(content, str(json_path), _root(json_path, data_root), key, require_label)
    if problems:
        lines = "\n".join(f"  {key} entry {i}: {p}" for i, p in problems)
        raise DatalistError(f"datalist {json_path}, key {key!r}: {len(problems)} malformed entries:\n{lines}")
    return entries


# --------------------------------------------------------------------------------------------
# pre-flight check of the files themselves
# --------------------------------------------------------------------------------------------


def describe_error(exc: BaseException) -> str:
    """``"Type: first line of the message"`` of an exception's root cause, for one-line problem reports."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _shown(path: str, raw: str | None) -> str:
    """A path as messages show it: as written, and resolved when that differs."""
    return path if raw is None or os.path.normpath(raw) == path else f"{raw!r} (resolved: {path})"


def _read_header(path: str) -> tuple[Any, Any]:
    """``(raw, header)`` of a single-file NIfTI-1 or NIfTI-2, from one open that reads the header
    alone (a few KB, whatever the volume's size). ``raw`` holds the values as stored; ``header`` is
    what nibabel's loader makes of them (it repairs some fields, e.g. a zero voxel size, silently),
    the header the voxels are placed in space with."""
    import nibabel as nib

    with nib.openers.ImageOpener(path) as f:
        block = f.read(nib.Nifti2Header.sizeof_hdr)
        klass = next((k for k in (nib.Nifti2Header, nib.Nifti1Header) if k.may_contain_header(block)), None)
        if klass is None:
            raise ValueError("no NIfTI-1 or NIfTI-2 header")
        f.seek(0)
        raw = klass.from_fileobj(f, check=False)
    return raw, klass(raw.binaryblock, raw.endianness, check=True)


def image_content_problems(data: np.ndarray, window: tuple[float, float] | None,
                           scale: tuple[float, float] = (1.0, 0.0)) -> list[str]:
    """What is wrong with an image's voxel values (empty when nothing): NaN or Inf voxels; with the
    intensity ``window`` (HU), no voxel above its lower end (an all-air volume, whose foreground crop
    would be nothing but padding). ``data``: the values as stored, ``scale``: (slope, intercept) to HU.
    Reduces the array without a float copy."""
    lo, hi = data.min(), data.max()  # NaN propagates, Inf shows up here
    if np.issubdtype(data.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
        return [f"{int(np.count_nonzero(~np.isfinite(data)))} voxel(s) are NaN or Inf"]
    slope, inter = scale
    top = max(float(lo) * slope + inter, float(hi) * slope + inter)
    if window is not None and top <= window[0]:
        return [f"no voxel above {window[0]:g} HU, the lower end of the intensity window [{window[0]:g}, {window[1]:g}] "
                f"(brightest voxel {top:g}): an all-air volume, whose foreground crop would be nothing but padding"]
    return []


def label_content_problems(label: np.ndarray, num_classes: int | None) -> list[str]:
    """What is wrong with a label map's values (empty when nothing): NaN or Inf, non-integers, values
    outside ``0..num_classes-1``."""
    problems: list[str] = []
    values = label
    if np.issubdtype(label.dtype, np.floating):
        finite = np.isfinite(label)
        if not finite.all():
            problems.append(f"{int(np.count_nonzero(~finite))} voxel(s) are NaN or Inf")
            values = label[finite]
        fractional = values != np.rint(values)
        if fractional.any():
            odd = np.unique(values[fractional])[:5]
            problems.append(f"labels must be integers, found {[float(v) for v in odd]}")
    if num_classes is not None and values.size:
        lo, hi = values.min(), values.max()
        if lo < 0 or hi > num_classes - 1:
            outside = np.unique(values[(values < 0) | (values > num_classes - 1)])[:5]
            shown_values = [int(v) if float(v).is_integer() else float(v) for v in outside]
            problems.append(f"values must be in 0..{num_classes - 1}, found {shown_values}")
    return problems


def _header_facts(field: str, path: str, shown: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Read one file's header; return ``(facts, problems)``: shape, affine and intensity scaling,
    or ``None`` when the file cannot be used at all."""
    if not os.path.exists(path):
        return None, [f"{field} {shown}: file not found"]
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        return None, [f"{field} {shown}: not a readable file"]
    try:
        raw, header = _read_header(path)
    except Exception as exc:  # gzip, nibabel and NumPy raise many types for foreign or damaged files
        return None, [f"{field} {shown}: cannot be read as NIfTI ({describe_error(exc)})"]
    full_shape = tuple(int(s) for s in header.get_data_shape())
    shape = full_shape[:3] if len(full_shape) == 4 and full_shape[3] == 1 else full_shape
    if len(shape) != 3:
        return None, [f"{field} {shown}: expected a 3D volume, found {len(shape)}D with shape {full_shape}"]
    if not all(shape):
        return None, [f"{field} {shown}: the volume has no voxels (shape {full_shape})"]
    problems: list[str] = []
    pixdim = tuple(float(z) for z in raw["pixdim"][1:4])
    affine = np.asarray(header.get_best_affine(), dtype=float)
    axes = np.linalg.norm(affine[:3, :3], axis=0)
    if not all(math.isfinite(z) and z > 0 for z in pixdim):
        problems.append(f"{field} {shown}: voxel spacing in the header must be positive, found {pixdim} mm")
    elif not (np.isfinite(affine).all() and (axes > 1e-6).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12):
        problems.append(
            f"{field} {shown}: the affine is degenerate (voxel axes of length {tuple(np.round(axes, 4).tolist())} mm); "
            "voxels cannot be placed in space"
        )
    try:
        slope, inter = header.get_slope_inter()
    except Exception:  # nibabel refuses a finite slope with a non-finite intercept
        slope, inter = float("nan"), float("nan")
    slope, inter = (1.0 if slope is None else float(slope)), (0.0 if inter is None else float(inter))
    if not (math.isfinite(slope) and math.isfinite(inter)):
        problems.append(f"{field} {shown}: intensity scaling in the header is not finite "
                        f"(slope {float(raw['scl_slope'])}, intercept {float(raw['scl_inter'])})")
        return None, problems
    return {"shape": shape, "affine": affine, "scale": (slope, inter), "values": None}, problems


def _inspect_file(
    field: str, path: str, shown: str, check_values: bool, window: tuple[float, float] | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """Check one file: its header (one open, the header alone), and with ``check_values`` its
    voxels too. Returns ``(facts, problems)``; ``facts`` has shape, affine and, for a label read in
    full, its voxel values (``None`` when the file cannot be used at all)."""
    import nibabel as nib

    facts, problems = _header_facts(field, path, shown)
    if facts is None or not check_values:
        return facts, problems
    try:
        img = nib.load(path)
        if field == "label":
            data = np.asanyarray(img.dataobj)  # labels: the scaled values are what matter
        else:  # images: reduce the stored values, scale the two extremes (no float copy)
            getter = getattr(img.dataobj, "get_unscaled", None)
            data = np.asanyarray(getter() if getter else img.dataobj)
    except Exception as exc:
        return None, problems + [f"{field} {shown}: truncated or corrupt file ({describe_error(exc)})"]
    if field == "label":
        facts["values"] = data
        return facts, problems
    return facts, problems + [f"{field} {shown}: {p}" for p in image_content_problems(data, window, facts["scale"])]


class ContentError(Exception):
    """A file's voxels cannot be used: ``problems`` is a list of ``(field, what is wrong)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {what}" for field, what in problems))
        self.problems = problems


def check_entry(
    entry: dict[str, str],
    num_classes: int | None = None,
    check_values: bool = True,
    window: tuple[float, float] | None = None,
    written: dict[str, str] | None = None,
) -> list[str]:
    """Return the problems of one resolved entry (empty when it is usable).

    ``entry``: ``{"image": path[, "label": path]}`` with resolved paths. ``num_classes``: label
    values must lie in ``0..num_classes-1``. ``window``: the HU window ``(a_min, a_max)`` of the
    transforms; an image with no voxel above ``a_min`` (all air) is refused. ``check_values=False``
    reads headers only. ``written``: the paths as the datalist spells them (shown in messages).
    Each file is read once.
    """
    problems: list[str] = []
    facts: dict[str, dict[str, Any]] = {}
    shown: dict[str, str] = {}
    for field in ("image", "label"):
        if field not in entry:
            continue
        path = entry[field]
        shown[field] = _shown(path, (written or {}).get(field))
        info, found = _inspect_file(field, path, shown[field], check_values, window if field == "image" else None)
        problems += found
        if info is not None:
            facts[field] = info
    if "label" in facts:
        label_path = shown["label"]
        lab = facts["label"]
        if "image" in facts:
            img = facts["image"]
            if img["shape"] != lab["shape"]:
                problems.append(f"label {label_path}: shape {lab['shape']} differs from the image's {img['shape']}")
            else:
                diff = np.abs(img["affine"] - lab["affine"])
                if diff[:3, :3].max() > 1e-4 or diff[:3, 3].max() > 1e-2:
                    problems.append(
                        f"label {label_path}: affine differs from the image's (by up to {diff.max():.3g} mm): "
                        "image and label are not aligned"
                    )
        if lab["values"] is not None:
            problems += [f"label {label_path}: {p}" for p in label_content_problems(lab["values"], num_classes)]
    return problems


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _check_many(
    jobs: Sequence[tuple[dict[str, str], dict[str, str]]],
    num_classes: int | None,
    check_values: bool,
    window: tuple[float, float] | None,
    progress: bool,
    desc: str,
    workers: int | None,
) -> list[list[str]]:
    """``check_entry`` on every job (entry, written), in threads (chunks of jobs, so that a long
    datalist of small files does not pay a thread hand-over per file), with a progress bar."""
    from tqdm.auto import tqdm

    workers = workers or _default_workers()

    def some(chunk: Sequence[tuple[dict[str, str], dict[str, str]]]) -> list[list[str]]:
        return [check_entry(e, num_classes=num_classes, check_values=check_values, window=window, written=w) for e, w in chunk]

    size = 1 if check_values else 64  # a full read is long enough to be handed over alone
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    bar = tqdm(total=len(jobs), desc=desc, leave=False, disable=not progress)
    results: list[list[str]] = []
    try:
        with ThreadPoolExecutor(max_workers=min(workers, max(1, len(chunks)))) as pool:
            for done in pool.map(some, chunks):
                results += done
                bar.update(len(done))
    finally:
        bar.close()
    return results


def _report(
    json_path: str,
    root: str,
    bad: list[tuple[str, int, list[str]]],
    total: int,
    skip_bad: bool,
    log: Callable[[str], None],
    empty_keys: Iterable[str] = (),
) -> None:
    """Raise one ``DatalistError`` listing every bad entry, or (``skip_bad``) print the list."""
    if not bad:
        return
    lines = "\n".join(f"  {key} entry {i}: " + "; ".join(p) for key, i, p in bad)
    where = f"datalist {json_path}" + (f" (data_root {root})" if root else "")
    head = f"{where}: {len(bad)} of {total} entries cannot be used"
    empty = list(empty_keys)
    if not skip_bad or empty:
        tail = (
            f"\nskip_bad=True would leave no usable entry under {empty}."
            if empty
            else "\nFix or remove these entries, or pass skip_bad=True to train on the others."
        )
        raise DatalistError(f"{head}:\n{lines}{tail}")
    log(f"{head}; skipped (skip_bad=True):\n{lines}")


@dataclasses.dataclass
class CheckedDatalist:
    """A datalist with every entry's problems: what ``check_datalist`` returns.

    ``entries[key][i]`` / ``written[key][i]``: entry ``i`` of ``key``, its paths resolved / as the
    datalist spells them; ``problems[(key, i)]``: what is wrong with it (absent when nothing).
    """

    json_path: str
    root: str
    entries: dict[str, list[dict[str, str]]]
    written: dict[str, list[dict[str, str]]]
    problems: dict[tuple[str, int], list[str]] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def usable(self, key: str) -> list[tuple[int, dict[str, str]]]:
        """``(index, entry)`` of every entry of ``key`` without a problem."""
        return [(i, e) for i, e in enumerate(self.entries[key]) if (key, i) not in self.problems]

    def shown(self, key: str, i: int, field_name: str) -> str:
        """A path of entry ``i`` as messages show it (as written, and resolved when that differs)."""
        return _shown(self.entries[key][i][field_name], self.written[key][i].get(field_name))

    def report(self, skip_bad: bool, log: Callable[[str], None], found: Mapping[tuple[str, int], list[str]] | None = None) -> None:
        """Raise one ``DatalistError`` listing every entry with a problem, or (``skip_bad``) log the
        list. ``found``: problems found since (e.g. while caching), added to ``problems`` first and
        the only ones reported; ``None`` reports all of ``problems``."""
        new = self.problems if found is None else found
        if found is not None:
            for where, p in found.items():
                self.problems[where] = self.problems.get(where, []) + list(p)
        order = {key: n for n, key in enumerate(self.entries)}
        bad = [(k, i, new[(k, i)]) for k, i in sorted(new, key=lambda w: (order[w[0]], w[1]))]
        empty = [key for key in self.entries if not self.usable(key)]
        _report(self.json_path, self.root, bad, self.total, skip_bad, log, empty)


def check_datalist(
    json_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    keys: Sequence[str] = ("training", "validation"),
    require_label: bool = False,
    num_classes: int | None = None,
    window: tuple[float, float] | None = None,
    check_values: bool = True,
    progress: bool = True,
    workers: int | None = None,
    split_across_ranks: bool = False,
) -> CheckedDatalist:
    """Read a datalist and check every file of every ``key``; return every entry with its problems
    (``preflight_datalist`` is this, then ``CheckedDatalist.report``).

    ``check_values=False`` reads headers only (one open per file, a few KB). With
    ``split_across_ranks`` inside a ``torch.distributed`` process group each rank checks every
    W-th entry and the problems are gathered: every rank returns the same result (and when a rank
    fails, every rank raises its error). Problems of the datalist file itself raise ``DatalistError``.
    """
    from .distributed import rank, run_on_all, world_size

    json_path = str(json_path)
    content = read_datalist_json(json_path)
    root = _root(json_path, data_root)
    parsed = {key: _parse_key(content, json_path, root, key, require_label) for key in keys}
    checked = CheckedDatalist(json_path, root, {k: v[0] for k, v in parsed.items()}, {k: v[1] for k, v in parsed.items()})
    for key, (_, _, problems) in parsed.items():
        for i, p in problems:
            checked.problems.setdefault((key, i), []).append(p)
    where = [(key, i) for key in keys for i in range(len(checked.entries[key])) if (key, i) not in checked.problems]
    r, w = (rank(), world_size()) if split_across_ranks else (0, 1)
    mine = where[r::w]
    ranks = f" on {w} ranks" if w > 1 else ""

    def check_mine() -> dict[tuple[str, int], list[str]]:
        jobs = [(checked.entries[k][i], checked.written[k][i]) for k, i in mine]
        desc = f"checking {os.path.basename(json_path)} ({checked.total} entries{ranks})"
        results = _check_many(jobs, num_classes if require_label else None, check_values, window, progress, desc, workers)
        return {at: p for at, p in zip(mine, results) if p}

    for found in run_on_all(check_mine) if w > 1 else [check_mine()]:
        checked.problems.update(found)
    return checked


def preflight_datalist(
    json_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    keys: Sequence[str] = ("training", "validation"),
    require_label: bool = False,
    num_classes: int | None = None,
    window: tuple[float, float] | None = None,
    skip_bad: bool = False,
    check_values: bool = True,
    progress: bool = True,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, str]]]:
    """Read a datalist and check every file of every ``key`` before any training.

    Returns ``{key: [{"image": abs_path[, "label": abs_path]}, ...]}``. Raises one
    ``DatalistError`` that lists every bad entry (key, index, path as written and resolved, what
    is wrong). With ``skip_bad=True`` bad entries are dropped and listed through ``log``; an
    error is still raised when a key has no usable entry left. Problems of the file itself
    (missing, malformed JSON, a missing or empty key) always raise.

    ``num_classes`` (labels in ``0..num_classes-1``) applies when ``require_label``; ``window`` is
    the transforms' HU window ``(a_min, a_max)`` (refuses all-air images); ``workers`` threads
    read files (default: up to 4); ``check_values=False`` reads headers only.
    """
    checked = check_datalist(json_path, data_root, keys, require_label, num_classes, window, check_values, progress, workers)
    checked.report(skip_bad, log)
    return {key: [e for _, e in checked.usable(key)] for key in keys}


def preflight(
    entries: Sequence[dict[str, str]],
    datalist: str = "",
    key: str = "training",
    num_classes: int | None = None,
    skip_bad: bool = False,
    check_values: bool = True,
    progress: bool = True,
    window: tuple[float, float] | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, str]]:
    """Open every (already resolved) entry once; raise one ``DatalistError`` listing every bad one.

    With ``skip_bad=True`` the bad entries are dropped with a printed list instead (an error is
    still raised when nothing usable remains). Returns the usable entries.
    """
    jobs = [(dict(e), {}) for e in entries]
    results = _check_many(
        jobs, num_classes, check_values, window, progress, f"checking {key} ({len(entries)} entries)", workers
    )
    bad = [(key, i, p) for i, p in enumerate(results) if p]
    good = [e for e, p in zip(entries, results) if not p]
    _report(datalist or "(entries)", "", bad, len(entries), skip_bad, log, [key] if not good else [])
    return list(good)


def load_checked_datalist(
    json_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    key: str = "training",
    require_label: bool = False,
    num_classes: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    window: tuple[float, float] | None = None,
    workers: int | None = None,
) -> list[dict[str, str]]:
    """``preflight_datalist`` for one ``key``: its entries, every file checked."""
    return preflight_datalist(
        json_path,
        data_root,
        keys=(key,),
        require_label=require_label,
        num_classes=num_classes,
        window=window,
        skip_bad=skip_bad,
        progress=progress,
        workers=workers,
    )[key]
