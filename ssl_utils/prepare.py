"""Own CT in, a checked datalist out: DICOM series, NRRD, MetaImage and NIfTI to RAS NIfTI.

Unlabeled volumes (for ``ssl_train.ipynb``)::

    python -m ssl_utils.prepare --input /data/my_ct --out /data/my_ct_prepared

Labeled volumes with their own classes (for ``ssl_finetune.ipynb``)::

    python -m ssl_utils.prepare --input /data/scans --labels /data/masks \\
        --label-names names.json --out /data/lesions_prepared

``--input`` holds CT volumes in any mix of DICOM series (one folder per series, found
recursively, series told apart by SeriesInstanceUID), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and NIfTI (``.nii``, ``.nii.gz``). ``--labels`` holds label maps (NRRD,
MetaImage or NIfTI) matched to images by name stem (``case7.nii.gz`` labels the DICOM folder
``case7`` or the file ``case7.nrrd``; a ``_label``, ``_seg`` or ``_mask`` suffix is allowed).
``--label-names`` is a JSON object ``{"1": "liver", "2": "lesion"}`` (0 is background).

Written under ``--out``:

- ``data/<case>.nii.gz`` (unlabeled) or ``imagesTr/<case>.nii.gz`` + ``labelsTr/<case>.nii.gz``
  (labeled): int16 Hounsfield units (rescale slope and intercept applied), in the original
  geometry (the affine from DICOM orientation, position and spacing, or from the NRRD / MetaImage
  header), voxel axes reordered to RAS (no resampling); labels as uint8 (int16 beyond 255);
- ``dataset.json``: the datalist the notebooks read (``training``, ``validation`` and, with
  labels, ``labels``: class index -> name, ``"0": "background"`` included), paths relative to
  ``--out``; the first entries of ``training`` are the nested subsets fine-tuning compares;
- ``prepare_summary.md``: the summary table printed at the end.

Every input is checked before anything is written, and every problem is listed together, each
naming its file or folder: a DICOM series with missing slices or uneven slice spacing, several
series in one folder, a modality other than CT, a localizer, a 2D image, a label map whose shape
or affine differs from its image, label values not in ``--label-names``, an output folder that
already holds something else. Input files are only read. After writing, the datalist goes
through ``ssl_utils.data.preflight_datalist``, the check the notebooks run before training.
A volume whose voxels cannot be read after all (a damaged file) stops the run without a
``dataset.json``; once it is fixed, the same command writes into the same folder again.

World coordinates: DICOM, NRRD (``left-posterior-superior``) and MetaImage (ITK's convention)
are LPS; NIfTI is RAS. Everything written is RAS (x to the patient's left is negative).

Readers: SimpleITK (ITK, with GDCM for DICOM) reads the voxels and the geometry (origin, spacing,
direction) of DICOM slices, NRRD and MetaImage files, and decodes the compressed DICOM transfer
syntaxes GDCM supports (JPEG and JPEG Lossless, JPEG-LS, JPEG 2000, RLE); nibabel reads NIfTI and
reorders axes. pydicom reads the DICOM headers that group files into series and check them (so
every problem is known before a volume is decoded); the first slice of each series is decoded
once during the checks, so a transfer syntax that cannot be decoded here is a listed problem too.
The tests check the DICOM and NRRD results against MONAI's own ``PydicomReader`` and
``NrrdReader``. A DICOM series is named after the shortest part of its folder path that no other
series shares (``patient_001/CT_chest`` -> ``patient_001``), a file after its name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

IMAGE_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage",
                  ".mhd": "metaimage"}
# detached data files of .nhdr / .mhd headers and other files that are never volumes themselves
_COMPANION_SUFFIXES = (".raw", ".zraw", ".raw.gz", ".img", ".gz", ".json", ".txt", ".md", ".csv", ".xml", ".log")
_LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_mask", "-label", "-seg", "-mask", ".label", ".seg")
_UNFINISHED = ".prepare_unfinished.json"  # present while volumes are being written
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INT16 = (-32768, 32767)


class PrepareError(ValueError):
    """Inputs or the output folder cannot be used. The message lists every problem, each with
    the file or folder it concerns."""


@dataclass
class Volume:
    """One CT volume found under ``--input`` (or a label map under ``--labels``), header read.

    ``shape`` (voxels) and ``affine`` (4x4, mm, RAS world) are those of the written file, i.e.
    after the voxel axes are reordered to RAS; ``source`` is the file or, for DICOM, the folder.
    """

    case: str
    kind: str  # "dicom" | "nifti" | "nrrd" | "metaimage"
    source: str
    files: list[str] = field(default_factory=list)  # DICOM: slice files in slice order
    shape: tuple[int, int, int] = (0, 0, 0)
    affine: np.ndarray | None = None
    native_affine: np.ndarray | None = None  # RAS world, voxel axes as stored
    folder_parts: tuple[str, ...] = ()  # DICOM: the series folder relative to --input


@dataclass
class PrepareResult:
    """What ``prepare_dataset`` returns: the datalist written, one summary row per volume, the
    ``labels`` map (``{index: name}``, empty without labels) and the printed table."""

    json_path: str
    out: str
    rows: list[dict[str, Any]]
    labels: dict[int, str]
    table: str


# --------------------------------------------------------------------------------------------
# finding inputs
# --------------------------------------------------------------------------------------------


def _suffix_kind(name: str) -> tuple[str | None, str]:
    """``(kind, stem)`` of a file name by its suffix; kind None when it is not a known volume."""
    low = name.lower()
    for suffix, kind in IMAGE_SUFFIXES.items():
        if low.endswith(suffix):
            return kind, name[: -len(suffix)]
    return None, name


def _case_name(text: str) -> str:
    """A file-system and datalist friendly case name."""
    keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in text.strip())
    return keep.strip("._") or "case"


def _walk(root: Path, skip: Path | None) -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or Path(folder, d).resolve() != skip))
        files += [Path(folder, n) for n in sorted(names) if not n.startswith(".")]
    return files


_DICOM_TAGS = ["SOPClassUID", "Modality", "ImageType", "SeriesInstanceUID", "SeriesDescription", "Rows", "Columns",
               "NumberOfFrames", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope",
               "RescaleIntercept"]


def _itk_error(exc: Exception) -> str:
    """The line of an ITK exception that says what went wrong (ITK prefixes file and line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ITK ERROR" in ln or "rror" in ln] or lines or [type(exc).__name__]
    return useful[-1].split("): ", 1)[-1][:200]


def _decoding_problem(path: Path, ds: Any) -> str | None:
    """Why the pixel data of the DICOM file ``path`` (header ``ds``) cannot be decoded here, or
    None: the file is decoded once with SimpleITK (GDCM), which reads every transfer syntax the
    conversion will meet."""
    import SimpleITK as sitk

    try:
        sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax = f"compressed as {uid.name} ({uid})" if uid is not None and uid.is_compressed else \
            f"in transfer syntax {uid.name if uid is not None else '(none)'}"
        return (f"pixel data {syntax} cannot be decoded here ({path.name}: {_itk_error(exc)}); decompress the "
                "series first (e.g. gdcmconv --raw, dcmdjpeg) or export it uncompressed")
    return None


def _read_dicom_header(path: Path) -> Any | None:
    """The DICOM header of ``path`` (no pixel data), or None when it is not a DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _dicom_series(folder: Path, shown: str, items: list[tuple[Path, Any]], case: str,
                  problems: list[str]) -> Volume | None:
    """One DICOM series (all slice files of a folder): checks, slice order and geometry."""
    first = items[0][1]
    modality = str(first.get("Modality", "")).upper()
    if modality != "CT":
        problems.append(f"{shown}: modality {modality or '(none)'}, expected CT")
        return None
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        kind = "/".join(image_type)
        problems.append(f"{shown}: a localizer (scout) image (ImageType {kind}), not a CT volume")
        return None
    if len(items) < 2:
        problems.append(f"{shown}: a 2D image (one slice, {items[0][0].name}), expected a 3D volume of several slices")
        return None
    undecodable = _decoding_problem(items[0][0], first)
    if undecodable:
        problems.append(f"{shown}: {undecodable}")
        return None
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    geometry: list[tuple[Path, np.ndarray]] = []
    iop0 = _floats(first.get("ImageOrientationPatient"), 6)
    px0 = _floats(first.get("PixelSpacing"), 2)
    if iop0 is None or px0 is None:
        missing = [k for k, v in (("ImageOrientationPatient", iop0), ("PixelSpacing", px0)) if v is None]
        problems.append(f"{shown}: {items[0][0].name} has no usable {' or '.join(missing)}; the voxels cannot be placed")
        return None
    for path, ds in items:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            problems.append(f"{shown}: {path.name} is a multi-frame object; export the series as one file per slice")
            return None
        iop, px, ipp = (_floats(ds.get(k), n) for k, n in
                        (("ImageOrientationPatient", 6), ("PixelSpacing", 2), ("ImagePositionPatient", 3)))
        if ipp is None:
            problems.append(f"{shown}: {path.name} has no usable ImagePositionPatient")
            return None
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            problems.append(f"{shown}: {path.name} is {ds.get('Rows')}x{ds.get('Columns')} pixels, "
                            f"{items[0][0].name} {rows}x{cols}: the slices do not form one volume")
            return None
        if iop is None or np.abs(np.subtract(iop, iop0)).max() > 1e-4:
            problems.append(f"{shown}: {path.name} has orientation {iop}, {items[0][0].name} {iop0}: "
                            "the slices do not form one volume")
            return None
        if px is None or np.abs(np.subtract(px, px0)).max() > 1e-4:
            problems.append(f"{shown}: {path.name} has pixel spacing {px} mm, {items[0][0].name} {px0} mm")
            return None
        geometry.append((path, np.asarray(ipp, dtype=float)))
    row_dir, col_dir = np.asarray(iop0[:3]), np.asarray(iop0[3:])
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        problems.append(f"{shown}: ImageOrientationPatient {iop0} is not two orthogonal unit vectors")
        return None
    geometry.sort(key=lambda g: float(g[1] @ normal))
    where = np.asarray([float(g[1] @ normal) for g in geometry])
    steps = np.diff(where)
    if (steps < 1e-3).any():
        k = int(np.argmax(steps < 1e-3))
        problems.append(f"{shown}: {geometry[k][0].name} and {geometry[k + 1][0].name} lie at the same position "
                        f"({where[k]:.2f} mm along the slice normal): two acquisitions in one series?")
        return None
    step = float(np.median(steps))
    tolerance = max(0.01, 0.01 * step)
    if (steps > 1.5 * step).any():
        gaps = [(k, s) for k, s in enumerate(steps) if s > 1.5 * step]
        detail = "; ".join(f"{s:.2f} mm between {geometry[k][0].name} and {geometry[k + 1][0].name} "
                           f"(about {round(s / step) - 1} slice(s) missing)" for k, s in gaps[:3])
        problems.append(f"{shown}: missing slices: the slices are {step:.2f} mm apart but there is a gap of {detail}")
        return None
    if steps.max() - steps.min() > tolerance:
        k = int(np.argmax(np.abs(steps - step)))
        problems.append(f"{shown}: uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
                        f"(e.g. {steps[k]:.3f} mm between {geometry[k][0].name} and {geometry[k + 1][0].name}); "
                        "resample it or export it with a constant spacing")
        return None
    vol = Volume(case, "dicom", str(folder), [str(g[0]) for g in geometry])
    _set_geometry(vol, _series_affine(geometry[0][0], geometry[-1][0], len(geometry)), (cols, rows, len(geometry)))
    return vol


def _itk_affine(image: Any) -> np.ndarray:
    """RAS affine (mm) of an ITK image or image information (origin, spacing, direction: LPS world),
    voxel axes as stored; a 2D or 4D image gives the affine of its first (up to) three axes."""
    d = len(image.GetSize())
    m = min(d, 3)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(d, d)
    lps = np.eye(4)
    lps[:m, :m] = direction[:m, :m] * np.asarray(image.GetSpacing(), dtype=float)[:m]
    lps[:m, 3] = np.asarray(image.GetOrigin(), dtype=float)[:m]
    return _LPS_TO_RAS @ lps


def _image_information(path: Path | str) -> Any:
    """SimpleITK's reader of ``path`` with its header read (size, origin, spacing, direction)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _series_affine(first: Path, last: Path, n: int) -> np.ndarray:
    """RAS affine of a series whose slices, in order, run from ``first`` to ``last``: the in-plane
    axes as ITK places the first slice, the slice axis from the first to the last position."""
    a, b = _itk_affine(_image_information(first)), _itk_affine(_image_information(last))
    a[:3, 2] = (b[:3, 3] - a[:3, 3]) / (n - 1)
    return a


def _set_geometry(vol: Volume, native_affine: np.ndarray, native_shape: Sequence[int]) -> None:
    """Store the native (RAS world) geometry and the one after reordering the axes to RAS."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(native_affine)
    vol.native_affine = native_affine
    vol.affine = native_affine @ nib.orientations.inv_ornt_aff(ornt, tuple(native_shape))
    vol.shape = tuple(int(native_shape[int(a)]) for a in ornt[:, 0])  # type: ignore[assignment]


def _to_ras(data: np.ndarray, native_affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.orientations.apply_orientation(data, nib.orientations.io_orientation(native_affine))


# --------------------------------------------------------------------------------------------
# NIfTI, NRRD and MetaImage headers and voxels
# --------------------------------------------------------------------------------------------


def _file_geometry(path: Path, kind: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Native shape and RAS affine of a NIfTI, NRRD or MetaImage file from its header."""
    if kind == "nifti":
        import nibabel as nib

        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
    info = _image_information(path)
    if info.GetNumberOfComponents() != 1:
        raise ValueError(f"{info.GetNumberOfComponents()} channels per voxel, expected 1")
    return tuple(int(s) for s in info.GetSize()), _itk_affine(info)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ``[x, y, z]`` (native axis order, their stored type) and the RAS affine (mm) of an
    NRRD or MetaImage file (or any other format SimpleITK reads), through SimpleITK."""
    import SimpleITK as sitk

    image = sitk.ReadImage(os.fspath(path))
    return np.transpose(sitk.GetArrayFromImage(image)), _itk_affine(image)


def _file_voxels(path: str, kind: str) -> np.ndarray:
    """The voxel values of a NIfTI (scaled), NRRD or MetaImage file, native axis order."""
    if kind == "nifti":
        import nibabel as nib

        return np.asanyarray(nib.load(path).dataobj)
    return read_image(path)[0]


def _squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _file_volume(path: Path, kind: str, case: str, shown: str, problems: list[str]) -> Volume | None:
    try:
        shape, affine = _file_geometry(path, kind)
    except Exception as exc:  # the readers raise many types for damaged or foreign files
        problems.append(f"{shown}: cannot be read as {kind.upper() if kind != 'metaimage' else 'MetaImage'} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return None
    shape = _squeeze_shape(shape)
    if len(shape) == 2 or (len(shape) == 3 and 1 in shape):
        problems.append(f"{shown}: a 2D image (shape {shape}), expected a 3D volume")
        return None
    if len(shape) != 3:
        problems.append(f"{shown}: {len(shape)}D with shape {shape}, expected a 3D volume")
        return None
    axes = np.linalg.norm(affine[:3, :3], axis=0)
    if not (np.isfinite(affine).all() and (axes > 1e-6).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12):
        problems.append(f"{shown}: the affine is degenerate (voxel axes {np.round(axes, 4).tolist()} mm)")
        return None
    vol = Volume(case, kind, str(path), [str(path)])
    _set_geometry(vol, affine, shape)
    return vol


def _strip_label_suffix(stem: str) -> str:
    for suffix in _LABEL_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def find_volumes(input_dir: str | os.PathLike, skip: str | os.PathLike | None = None, labels: bool = False,
                 progress: bool = True) -> tuple[list[Volume], list[str], list[str]]:
    """Every volume under ``input_dir``: ``(volumes, problems, ignored files)``.

    DICOM files are grouped per folder and SeriesInstanceUID (found recursively); NIfTI, NRRD and
    MetaImage files are volumes of their own. Headers only are read. ``labels=True``: label maps
    (no DICOM; case names lose a ``_label`` / ``_seg`` / ``_mask`` suffix). ``skip``: a folder
    left out of the walk.
    """
    from tqdm.auto import tqdm

    root = Path(input_dir)
    skip_path = Path(skip).resolve() if skip else None
    volumes: list[Volume] = []
    problems: list[str] = []
    ignored: list[str] = []
    dicom: dict[Path, list[tuple[Path, Any]]] = {}
    files = _walk(root, skip_path)
    candidates: list[Path] = []
    for path in files:
        kind, stem = _suffix_kind(path.name)
        shown = str(path)
        if kind is not None:
            rel_stem = _case_name(stem)
            if labels:
                rel_stem = _case_name(_strip_label_suffix(stem))
            vol = _file_volume(path, kind, rel_stem, shown, problems)
            if vol is not None:
                volumes.append(vol)
        elif path.name.lower().endswith(_COMPANION_SUFFIXES):
            ignored.append(shown)
        else:
            candidates.append(path)
    for path in tqdm(candidates, desc="reading DICOM headers", disable=not progress or not candidates, leave=False):
        ds = _read_dicom_header(path)
        if ds is None or "Rows" not in ds or "SeriesInstanceUID" not in ds:
            if path.suffix.lower() == ".dcm" and ds is None:
                problems.append(f"{path}: named .dcm but cannot be read as DICOM")
            else:
                ignored.append(str(path))
            continue
        if labels:
            problems.append(f"{path}: a DICOM file among the label maps; give label maps as NIfTI, NRRD or MetaImage")
            continue
        dicom.setdefault(path.parent, []).append((path, ds))
    for folder, items in sorted(dicom.items()):
        series: dict[str, list[tuple[Path, Any]]] = {}
        for path, ds in items:
            series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
        if len(series) > 1:
            parts = ", ".join(f"{uid} ({_series_kind(v)}, e.g. {v[0][0].name})" for uid, v in series.items())
            problems.append(f"{folder}: {len(series)} DICOM series in one folder: {parts}; put each series in "
                            "its own folder (or remove the ones that are not CT volumes)")
            continue
        rel = folder.relative_to(root).as_posix() if folder != root else root.resolve().name
        case = _case_name(rel.replace("/", "_"))
        vol = _dicom_series(folder, str(folder), items, case, problems)
        if vol is not None:
            vol.folder_parts = tuple(rel.split("/"))
            volumes.append(vol)
    _shorten_series_names(volumes)
    return volumes, problems, ignored


def _series_kind(items: list[tuple[Path, Any]]) -> str:
    """"67 files, CT ORIGINAL/PRIMARY/AXIAL, 'chest 5mm'": what a series is, for messages."""
    ds = items[0][1]
    kind = " ".join(x for x in (str(ds.get("Modality", "") or ""), "/".join(map(str, ds.get("ImageType") or [])),
                                repr(str(ds.SeriesDescription)) if ds.get("SeriesDescription") else "") if x)
    return f"{len(items)} file{'s' if len(items) != 1 else ''}" + (f", {kind}" if kind else "")


def _shorten_series_names(volumes: list[Volume]) -> None:
    """Name each DICOM series by the shortest leading part of its folder path that no other series
    shares (``patient_001/CT_chest`` -> ``patient_001`` when that patient has one series), so a
    series and a label map ``patient_001.nii.gz`` match by name."""
    series = [v for v in volumes if v.kind == "dicom" and v.folder_parts]
    for vol in series:
        for k in range(1, len(vol.folder_parts) + 1):
            prefix = vol.folder_parts[:k]
            if sum(other.folder_parts[:k] == prefix for other in series) == 1:
                vol.case = _case_name("_".join(prefix))
                break


# --------------------------------------------------------------------------------------------
# label names, matching, the output folder
# --------------------------------------------------------------------------------------------


def read_label_names(path: str | os.PathLike, problems: list[str]) -> dict[int, str] | None:
    """``{index: name}`` from a JSON object ``{"1": "liver", ...}``; ``0: "background"`` is added
    when absent. Indices must be 0..K-1 without gaps (they are UNETR's output channels)."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: cannot be read as JSON ({exc})")
        return None
    if isinstance(content, dict) and isinstance(content.get("labels"), dict):
        content = content["labels"]  # a datalist or dataset.json with a labels map
    if not isinstance(content, dict) or not content:
        problems.append(f"{path}: expected a JSON object of label index -> name, e.g. {{\"1\": \"liver\"}}")
        return None
    from .data import parse_label_map

    names, found = parse_label_map(content, add_background=True)
    problems += [f"{path}: {p}" for p in found]
    return names


def _fingerprint(volumes: Sequence[Volume], label_names: dict[int, str] | None) -> str:
    """What makes a dataset the same one: the input files (by path) and the label names. A folder
    prepared from them may be written again (after an input was fixed in place, say)."""
    digest = hashlib.sha256()
    for vol in volumes:
        for f in vol.files:
            digest.update(f"{os.path.abspath(f)}\n".encode())
    digest.update(json.dumps(label_names or {}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _check_output(out: Path, fingerprint: str, input_dir: Path, labels_dir: Path | None) -> list[str]:
    """Problems with writing into ``out``: it must be empty, or hold a dataset prepared from
    exactly these inputs (then it is written again), and lie outside the input folders."""
    problems: list[str] = []
    for name, folder in (("--input", input_dir), ("--labels", labels_dir)):
        if folder is not None:
            o, f = out.resolve(), folder.resolve()
            if o == f or f in o.parents:
                problems.append(f"{out}: the output folder lies inside the {name} folder {folder}; choose another --out")
    if not out.exists():
        return problems
    if not out.is_dir():
        return problems + [f"{out}: exists and is not a folder"]
    content = sorted(p.name for p in out.iterdir())
    if not content:
        return problems
    previous, unfinished = out / "dataset.json", out / _UNFINISHED
    for marker in (previous, unfinished):
        if not marker.is_file():
            continue
        try:
            made = json.loads(marker.read_text()).get("prepared_from", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            made = {}
        if made.get("fingerprint") == fingerprint:
            return problems  # the same inputs: written again
        what = "a different dataset" if marker is previous else "an unfinished conversion of other inputs"
        if made:
            return problems + [f"{out}: already holds {what} (prepared from {made.get('input')}, "
                               f"{made.get('volumes')} volumes); choose another --out or remove that folder first"]
        return problems + [f"{out}: already holds a datalist {marker.name} that this tool did not write; "
                           "choose another --out"]
    shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
    return problems + [f"{out}: the output folder is not empty (it holds {shown}); choose an empty or new folder"]


def _match_labels(volumes: list[Volume], label_maps: list[Volume], labels_dir: Path, problems: list[str]) -> dict[str, Volume]:
    by_case: dict[str, Volume] = {}
    for lab in label_maps:
        if lab.case in by_case:
            problems.append(f"{lab.source}: a second label map for case {lab.case!r} (the first is {by_case[lab.case].source})")
        else:
            by_case[lab.case] = lab
    cases = {v.case for v in volumes}
    for vol in volumes:
        if vol.case not in by_case:
            problems.append(f"{vol.source}: no label map for case {vol.case!r} in {labels_dir} "
                            f"(expected e.g. {vol.case}.nii.gz or {vol.case}_seg.nrrd)")
    for case, lab in by_case.items():
        if case not in cases:
            problems.append(f"{lab.source}: label map of case {case!r}, but no image of that name under --input")
    return by_case


def _check_label(vol: Volume, lab: Volume, names: dict[int, str] | None, problems: list[str]) -> tuple[np.ndarray | None, list[int]]:
    """Label voxels (RAS axes, integer) and the values found; problems for geometry and values."""
    if lab.shape != vol.shape:
        problems.append(f"{lab.source}: label map shape {lab.shape} differs from its image's {vol.shape} "
                        f"({vol.source}, both with axes reordered to RAS)")
        return None, []
    diff = np.abs(lab.affine - vol.affine)
    if diff[:3, :3].max() > 1e-3 or diff[:3, 3].max() > 1e-2:
        problems.append(f"{lab.source}: label map affine differs from its image's ({vol.source}) by up to "
                        f"{diff.max():.3g} mm: they are not aligned\n      label {np.round(lab.affine, 3).tolist()}\n"
                        f"      image {np.round(vol.affine, 3).tolist()}")
        return None, []
    try:
        data = np.asarray(_file_voxels(lab.source, lab.kind))
    except Exception as exc:
        problems.append(f"{lab.source}: voxels cannot be read ({type(exc).__name__}: {exc})")
        return None, []
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or (data != np.rint(data)).any():
            problems.append(f"{lab.source}: label values must be integers, found non-integer or NaN values")
            return None, []
    values = [int(v) for v in np.unique(data)]
    if names is not None:
        unknown = [v for v in values if v not in names]
        if unknown:
            problems.append(f"{lab.source}: label values {unknown} are not in --label-names "
                            f"(known: {', '.join(f'{k} {n}' for k, n in names.items())})")
            return None, values
    elif min(values) < 0:
        problems.append(f"{lab.source}: negative label values {[v for v in values if v < 0]}")
        return None, values
    return _to_ras(data, lab.native_affine), values


# --------------------------------------------------------------------------------------------
# reading voxels, writing NIfTI
# --------------------------------------------------------------------------------------------


def _check_pixel_data_lengths(files: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first uncompressed slice whose pixel data holds fewer bytes
    than its Rows x Columns x BitsAllocated need (a file cut short; its header is intact)."""
    import pydicom

    for f in files:
        ds = pydicom.dcmread(f, defer_size=256)  # the pixel data's length, not its bytes
        if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
            continue
        length = ds.get_item("PixelData").length
        need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated) // 8
        if length < need:
            raise ValueError(f"{Path(f).name}: pixel data holds {length} bytes; {ds.Rows} x {ds.Columns} pixels of "
                             f"{ds.BitsAllocated} bits need {need}")


def read_hu(vol: Volume) -> np.ndarray:
    """Voxels of ``vol`` in Hounsfield units (float32), axes reordered to RAS (``vol.shape``).
    DICOM: each slice's rescale slope and intercept applied."""
    if vol.kind == "dicom":
        import SimpleITK as sitk

        _check_pixel_data_lengths(vol.files)  # ITK would read a file cut short without a word
        reader = sitk.ImageSeriesReader()  # every slice decoded by GDCM, its own slope and intercept applied
        reader.SetFileNames(list(vol.files))  # in the checked slice order
        reader.SetOutputPixelType(sitk.sitkFloat32)
        image = reader.Execute()
        placed = _itk_affine(image)
        if np.abs(placed - vol.native_affine).max() > 1e-3:
            raise ValueError(f"SimpleITK places the series at {np.round(placed, 3).tolist()}, its headers at "
                             f"{np.round(vol.native_affine, 3).tolist()}")
        data = np.transpose(sitk.GetArrayFromImage(image))  # [slice, row, col] -> [col, row, slice]
    else:
        data = np.asarray(_file_voxels(vol.source, vol.kind), dtype=np.float32)
        data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    return _to_ras(data, vol.native_affine)


def _write_nifti_gz(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    from .io import write_nifti

    path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(path, data, affine, compresslevel=4)


def _fmt_spacing(affine: np.ndarray) -> str:
    return " x ".join(f"{z:.2f}" for z in np.linalg.norm(affine[:3, :3], axis=0))


def summary_table(rows: Sequence[dict[str, Any]], labels: dict[int, str], max_rows: int = 40) -> str:
    """The Markdown summary: one row per volume in datalist order (source, split, shape in voxels,
    spacing in mm, HU range, label values), then the totals over the dataset."""
    labeled = bool(labels)
    head = "| Case | Source | Split | Shape (voxels) | Spacing (mm) | HU min .. max |" + (" Label values |" if labeled else "")
    lines = [head, "|---|---|---|---|---|---|" + ("---|" if labeled else "")]
    for r in rows[:max_rows]:
        lines.append(f"| {r['case']} | {r['kind']} | {r['split']} | {' x '.join(map(str, r['shape']))} | {r['spacing']} | "
                     f"{r['hu_min']} .. {r['hu_max']} |" + (f" {', '.join(map(str, r['label_values']))} |" if labeled else ""))
    if len(rows) > max_rows:
        lines.append(f"| ... {len(rows) - max_rows} more | | | | | |" + (" |" if labeled else ""))
    n_train = sum(r["split"] == "training" for r in rows)  # rows in datalist order: the training rows first
    spacing = np.asarray([r["spacing_mm"] for r in rows])
    shapes = np.asarray([r["shape"] for r in rows])
    kinds = {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})}
    total = [
        f"{len(rows)} volumes ({n_train} training, {len(rows) - n_train} validation) from "
        + ", ".join(f"{n} {k}" for k, n in kinds.items())
        + (" (rows in datalist order: a training subset of N volumes is the first N rows)" if labeled else ""),
        f"shape (voxels): {' x '.join(map(str, shapes.min(0)))} to {' x '.join(map(str, shapes.max(0)))}",
        f"spacing (mm): {' x '.join(f'{v:.2f}' for v in spacing.min(0))} to {' x '.join(f'{v:.2f}' for v in spacing.max(0))}",
        f"HU: {min(r['hu_min'] for r in rows)} .. {max(r['hu_max'] for r in rows)}",
    ]
    if labeled:
        found = sorted({v for r in rows for v in r["label_values"]})
        never = [k for k in labels if k not in found]
        total.append("label values found: " + ", ".join(f"{v} {labels.get(v, '?')}" for v in found)
                     + (f"; never present: {', '.join(f'{k} {labels[k]}' for k in never)}" if never else ""))
    odd = [r["case"] for r in rows if r["hu_min"] > -500]
    if odd:
        total.append(f"note: no voxel below -500 HU in {', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}: "
                     "CT of a body in air has voxels near -1000 HU; check the rescale intercept of these")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {t}" for t in total) + "\n"


@dataclass
class _Plan:
    """What ``prepare_dataset`` will write, once every input has been checked."""

    volumes: list[Volume]
    label_data: dict[str, tuple[np.ndarray, list[int]]]  # case -> (label voxels on the image grid, values)
    names: dict[int, str] | None  # the labels map (None without labels)
    n_val: int  # volumes that go to "validation"
    provenance: dict[str, Any]  # recorded in the datalist: what it was prepared from
    ignored: list[str]  # input files that are neither DICOM nor a volume


def _label_names_arg(label_names, labels_path: Path | None, problems: list[str]) -> dict[int, str] | None:
    names: dict[int, str] | None = None
    if isinstance(label_names, dict):
        names = {int(k): str(v) for k, v in label_names.items()}
        names.setdefault(0, "background")
    elif label_names:
        names = read_label_names(label_names, problems)
    if names is not None and labels_path is None:
        problems.append(f"--label-names {label_names}: given without --labels")
    return names


def _plan(input_path: Path, out_path: Path, labels_path: Path | None, label_names, val_fraction: float, seed: int,
          progress: bool) -> _Plan:
    """Find and check every input (volumes, label maps, names, split, output folder); raise one
    ``PrepareError`` listing every problem, before anything is written."""
    from tqdm.auto import tqdm

    if not input_path.is_dir():
        raise PrepareError(f"--input {input_path}: not a folder")
    if labels_path is not None and not labels_path.is_dir():
        raise PrepareError(f"--labels {labels_path}: not a folder")
    problems: list[str] = []
    if not 0.0 <= float(val_fraction) < 1.0:
        problems.append(f"--val-fraction {val_fraction}: expected a fraction in [0, 1)")
    names = _label_names_arg(label_names, labels_path, problems)
    skip = out_path if out_path.exists() else None
    volumes, found_problems, ignored = find_volumes(input_path, skip=skip, progress=progress)
    problems += found_problems
    seen: dict[str, Volume] = {}
    for vol in volumes:
        if vol.case in seen:
            problems.append(f"{vol.source}: case name {vol.case!r} is also the name of {seen[vol.case].source}; "
                            "rename one of them")
        seen.setdefault(vol.case, vol)
    if not volumes and not found_problems:
        problems.append(f"--input {input_path}: no DICOM series, NRRD, MetaImage or NIfTI volume found"
                        + (f" ({len(ignored)} other files ignored)" if ignored else ""))
    label_data: dict[str, tuple[np.ndarray, list[int]]] = {}
    if labels_path is not None:
        label_maps, label_problems, _ = find_volumes(labels_path, labels=True, progress=False)
        problems += label_problems
        matched = _match_labels(volumes, label_maps, labels_path, problems)
        for vol in tqdm(volumes, desc="checking label maps", disable=not progress, leave=False):
            if vol.case in matched:
                data, values = _check_label(vol, matched[vol.case], names, problems)
                if data is not None:
                    label_data[vol.case] = (data, values)
    n_val = 0 if float(val_fraction) <= 0 else max(1, int(round(float(val_fraction) * len(volumes))))
    if volumes and val_fraction > 0 and len(volumes) - n_val < 1:
        problems.append(f"--input {input_path}: {len(volumes)} volume(s): too few for a training and a validation "
                        "split (the notebooks need at least one of each)")
    fingerprint = _fingerprint(volumes, names) if volumes else ""
    problems += _check_output(out_path, fingerprint, input_path, labels_path)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise PrepareError(f"{len(problems)} problem(s); nothing was written:\n{listing}")
    if labels_path is not None and names is None:
        top = max(v for _, values in label_data.values() for v in values)
        names = {k: ("background" if k == 0 else f"class {k}") for k in range(top + 1)}
    provenance = {"input": str(input_path.resolve()), "labels": str(labels_path.resolve()) if labels_path else None,
                  "volumes": len(volumes), "fingerprint": fingerprint, "val_fraction": float(val_fraction),
                  "seed": int(seed)}
    return _Plan(volumes, label_data, names, n_val, provenance, ignored)


def _convert(plan: _Plan, out_path: Path, labeled: bool, seed: int, progress: bool):
    """Write every volume (and label map) as RAS NIfTI; returns (summary rows, datalist entries by
    split). A volume whose voxels cannot be read or do not fit int16 HU stops it, all listed
    together, before the datalist is written."""
    from tqdm.auto import tqdm

    order = list(range(len(plan.volumes)))
    random.Random(int(seed)).shuffle(order)
    val_ids = set(order[:plan.n_val])
    image_folder = "imagesTr" if labeled else "data"
    rows: list[dict[str, Any]] = []
    entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    failures: list[str] = []
    for i in tqdm(order[plan.n_val:] + order[:plan.n_val], desc="converting series", disable=not progress):
        vol = plan.volumes[i]
        split = "validation" if i in val_ids else "training"
        try:
            hu = np.rint(read_hu(vol))
        except Exception as exc:
            failures.append(f"{vol.source}: voxels cannot be read ({type(exc).__name__}: {exc})")
            continue
        lo, hi = float(hu.min()), float(hu.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            failures.append(f"{vol.source}: NaN or Inf voxels")
            continue
        if lo < _INT16[0] or hi > _INT16[1]:
            failures.append(f"{vol.source}: values {lo:g} .. {hi:g} do not fit int16 HU")
            continue
        image_rel = f"{image_folder}/{vol.case}.nii.gz"
        _write_nifti_gz(out_path / image_rel, hu.astype(np.int16), vol.affine)
        entry = {"image": image_rel}
        row = {"case": vol.case, "kind": vol.kind, "source": vol.source, "split": split, "shape": list(vol.shape),
               "spacing_mm": [round(float(z), 4) for z in np.linalg.norm(vol.affine[:3, :3], axis=0)],
               "spacing": _fmt_spacing(vol.affine), "hu_min": int(lo), "hu_max": int(hi)}
        if labeled:
            data, values = plan.label_data[vol.case]
            label_rel = f"labelsTr/{vol.case}.nii.gz"
            dtype = np.uint8 if max(values) <= 255 else np.int16
            _write_nifti_gz(out_path / label_rel, data.astype(dtype), vol.affine)
            entry["label"] = label_rel
            row["label_values"] = values
        entries[split].append(entry)
        rows.append(row)
    if failures:
        listing = "\n".join(f"  - {p}" for p in failures)
        raise PrepareError(f"{len(failures)} volume(s) could not be converted; dataset.json was not written:\n{listing}")
    return rows, entries


def prepare_dataset(
    input_dir: str | os.PathLike,
    out: str | os.PathLike,
    labels_dir: str | os.PathLike | None = None,
    label_names: str | os.PathLike | dict[int, str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PrepareResult:
    """Convert every CT volume under ``input_dir`` (DICOM series, NRRD, MetaImage, NIfTI) into RAS
    NIfTI (int16 HU, original geometry) under ``out`` and write the datalist ``out/dataset.json``.

    ``labels_dir``: label maps matched by case name (then ``imagesTr/`` + ``labelsTr/`` and a
    ``labels`` map in the datalist); ``label_names``: a JSON file or dict ``{index: name}`` (0 is
    background; default names ``class k`` for the values found). ``val_fraction`` of the volumes
    (at least one) go to ``validation``, chosen by ``seed``. Every problem with the inputs or the
    output folder is raised together in one ``PrepareError`` before anything is written; input
    files are never modified. Ends with ``preflight_datalist`` on the result and the summary table.
    """
    from .data import preflight_datalist
    from .io import write_json, write_text

    input_path, out_path = Path(input_dir), Path(out)
    labels_path = Path(labels_dir) if labels_dir else None
    plan = _plan(input_path, out_path, labels_path, label_names, val_fraction, seed, progress)
    labeled, names = labels_path is not None, plan.names
    out_path.mkdir(parents=True, exist_ok=True)
    write_json(out_path / _UNFINISHED, {"prepared_from": plan.provenance}, what="marker")
    rows, entries = _convert(plan, out_path, labeled, seed, progress)
    datalist: dict[str, Any] = {
        "description": f"prepared by ssl_utils.prepare from {input_path.resolve()}",
        "prepared_from": plan.provenance,
    }
    if labeled:
        datalist["labels"] = {str(k): v for k, v in names.items()}
    datalist["numTraining"] = len(entries["training"])
    datalist.update(entries)
    json_path = out_path / "dataset.json"
    write_json(json_path, datalist, what="datalist")
    os.unlink(out_path / _UNFINISHED)
    table = summary_table(rows, names or {})
    write_text(out_path / "prepare_summary.md", summary_table(rows, names or {}, max_rows=len(rows)))
    keys = ("training", "validation") if entries["validation"] else ("training",)
    preflight_datalist(json_path, out_path, keys=keys, require_label=labeled,
                       num_classes=len(names) if names else None, progress=False, log=log)
    log(table)
    ignored = plan.ignored
    log(f"pre-flight check passed: {len(rows)} volumes; datalist {json_path}"
        + (f"; ignored {len(ignored)} non-image files (e.g. {ignored[0]})" if ignored else ""))
    notebook = "ssl_finetune.ipynb" if labeled else "ssl_train.ipynb"
    log(f"next: {notebook} with data_root = {str(out_path.resolve())!r}, json_path = {str(json_path.resolve())!r}")
    return PrepareResult(str(json_path), str(out_path), rows, dict(names or {}), table)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m ssl_utils.prepare --input IN --out OUT [--labels L --label-names N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ssl_utils.prepare",
        description="Convert CT volumes (DICOM series, NRRD, MHA/MHD, NIfTI) into RAS NIfTI (int16 HU) and write a "
                    "checked datalist OUT/dataset.json that ssl_train.ipynb and ssl_finetune.ipynb read.",
        epilog="Then: data_root=OUT, json_path=OUT/dataset.json in either notebook. Every problem with the inputs "
               "is listed before anything is written; input files are never modified.",
    )
    parser.add_argument("--input", required=True, help="folder of CT volumes: DICOM series (one folder per series, "
                        "searched recursively), .nrrd/.nhdr, .mha/.mhd, .nii/.nii.gz")
    parser.add_argument("--out", required=True, help="output folder (new or empty, or one prepared from the same input)")
    parser.add_argument("--labels", help="folder of label maps (.nii.gz, .nrrd, .mha) named like their images "
                        "(optionally with a _label, _seg or _mask suffix)")
    parser.add_argument("--label-names", help='JSON file {"1": "liver", "2": "lesion"}; 0 is background '
                        "(default: 'class k' for each value found)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of volumes for validation (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training / validation split (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        prepare_dataset(args.input, args.out, args.labels, args.label_names, args.val_fraction, args.seed,
                        progress=not args.no_progress)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
