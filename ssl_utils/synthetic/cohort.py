"""The on-disk cohort: per-subject seeds, the NIfTI volumes and datalists in the reference's layout
(TCIA-like unlabeled, BTCV-like labeled with nested training subsets, tuning and validation splits),
reuse of a complete cohort, ``make_synthetic_dataset`` and ``make_cohort_from_config``."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from ..io import write_nifti, write_text
from ..organs import ORGANS
from .subject import generate_subject

COHORT_VERSION = 1  # cohort.json also records unlabeled_kind; a cohort.json without it never matches (regenerated)


def _subject_seed(seed: int, stream: int, index: int) -> int:
    """Independent per-subject seed (stream 0: unlabeled, 1: labeled)."""
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream), int(index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _write_json_atomic(obj: Any, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n", what="datalist")


def _make_one(task: tuple) -> str:
    """Worker: generate and write one subject. task = (seed, shape, spacing, kind, image_path, label_path)."""
    seed, shape, spacing, kind, img_path, lab_path = task
    image, label, affine = generate_subject(seed, shape, spacing, with_label=lab_path is not None, kind=kind)
    write_nifti(Path(img_path), image, affine)
    if lab_path is not None:
        write_nifti(Path(lab_path), label, affine)
    return img_path


# ----------------------------------------------------------------------------------------------
# the on-disk cohort
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CohortLayout:
    """Paths of one cohort under ``root`` (datalist entries are relative to ``tcia_root`` / ``btcv_root``)."""

    root: Path
    tcia_root: Path
    btcv_root: Path
    tcia_json: Path
    btcv_json: dict[int, Path]  # N -> btcv/dataset_0_init_{N}.json
    unlabeled: list[str]  # data/volume-synth-XXXX.nii.gz
    labeled: list[dict[str, str]]  # {"image": imagesTr/..., "label": labelsTr/...}, training first

    @property
    def meta_path(self) -> Path:
        return self.root / "cohort.json"

    def all_files(self) -> list[Path]:
        files = [self.tcia_json, *self.btcv_json.values(), *(self.tcia_root / p for p in self.unlabeled)]
        return files + [self.btcv_root / e[k] for e in self.labeled for k in ("image", "label")]

    def result(self, reused: bool) -> dict:
        return {
            "root": str(self.root),
            "tcia_root": str(self.tcia_root),
            "tcia_json": str(self.tcia_json),
            "btcv_root": str(self.btcv_root),
            "btcv_json": {N: str(p) for N, p in self.btcv_json.items()},
            "reused": reused,
        }


_UNLABELED_KINDS = {"chest": "chest", "abdomen": "tcia"}  # make_synthetic_dataset(unlabeled_kind=...) -> kind


def _cohort_params(
    n_unlabeled, n_unlabeled_val, n_labeled_train, n_labeled_val, train_sizes, shape, spacing, seed, unlabeled_kind,
    n_labeled_tune=0, n_labeled_control=0,
) -> dict:
    """Validated generation parameters, as written to ``cohort.json`` (raises ValueError)."""
    if unlabeled_kind not in _UNLABELED_KINDS:
        raise ValueError(f"unlabeled_kind={unlabeled_kind!r}; expected one of {sorted(_UNLABELED_KINDS)}")
    sizes = sorted({int(s) for s in train_sizes})
    if n_unlabeled < 1 or not 0 <= n_unlabeled_val < n_unlabeled:
        raise ValueError(
            f"need n_unlabeled >= 1 and 0 <= n_unlabeled_val < n_unlabeled, got {n_unlabeled}, {n_unlabeled_val}"
        )
    if n_labeled_control < 0:
        raise ValueError(f"need n_labeled_control >= 0, got {n_labeled_control}")
    if n_labeled_train < 1 or n_labeled_val < 0 or n_labeled_tune < 0:
        raise ValueError(f"need n_labeled_train >= 1, n_labeled_tune >= 0 and n_labeled_val >= 0, got {n_labeled_train}, "
                         f"{n_labeled_tune}, {n_labeled_val}")
    if not sizes or sizes[0] < 1 or sizes[-1] > n_labeled_train:
        raise ValueError(f"train_sizes={tuple(train_sizes)} must lie in 1..n_labeled_train={n_labeled_train}")
    params = {
        "version": COHORT_VERSION,
        "n_unlabeled": int(n_unlabeled),
        "n_unlabeled_val": int(n_unlabeled_val),
        "n_labeled_train": int(n_labeled_train),
        "n_labeled_val": int(n_labeled_val),
        "train_sizes": sizes,
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
        "unlabeled_kind": str(unlabeled_kind),
    }
    if n_labeled_tune:  # recorded only when there is a tuning split (cohorts without one keep their cohort.json)
        params["n_labeled_tune"] = int(n_labeled_tune)
    if n_labeled_control:  # likewise the positive-control split
        params["n_labeled_control"] = int(n_labeled_control)
    return params


def _cohort_layout(root: Path, params: dict) -> _CohortLayout:
    tcia_root, btcv_root = root / "tcia", root / "btcv"
    n_lab = (params["n_labeled_train"] + params.get("n_labeled_tune", 0) + params["n_labeled_val"]
             + params.get("n_labeled_control", 0))
    return _CohortLayout(
        root=root,
        tcia_root=tcia_root,
        btcv_root=btcv_root,
        tcia_json=tcia_root / "dataset_split.json",
        btcv_json={N: btcv_root / f"dataset_0_init_{N}.json" for N in params["train_sizes"]},
        unlabeled=[f"data/volume-synth-{i:04d}.nii.gz" for i in range(params["n_unlabeled"])],
        labeled=[
            {"image": f"imagesTr/img{j:04d}.nii.gz", "label": f"labelsTr/label{j:04d}.nii.gz"}
            for j in range(1, n_lab + 1)
        ],
    )


def _is_complete(layout: _CohortLayout, params: dict) -> bool:
    """A previous cohort with identical parameters, marked complete, with every file present."""
    if not layout.meta_path.exists():
        return False
    try:
        old = json.loads(layout.meta_path.read_text())
    except (OSError, ValueError):
        return False
    return old == {**params, "complete": True} and all(p.exists() for p in layout.all_files())


def _prepare_folders(layout: _CohortLayout, params: dict) -> None:
    """Drop a previous cohort's folders (only if this module made them: cohort.json present), mark the new
    one as in progress and create its folders."""
    if layout.meta_path.exists():
        for d in (layout.tcia_root, layout.btcv_root):
            if d.is_dir():
                shutil.rmtree(d)
    layout.root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic({**params, "complete": False}, layout.meta_path)  # marks tcia/ and btcv/ as ours
    (layout.tcia_root / "data").mkdir(parents=True, exist_ok=True)
    (layout.btcv_root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (layout.btcv_root / "labelsTr").mkdir(parents=True, exist_ok=True)


def _write_volumes(layout: _CohortLayout, params: dict, progress: bool, workers: int) -> None:
    """Generate and write every subject (unlabeled: seed stream 0, kind from ``unlabeled_kind``; labeled:
    stream 1, kind "btcv")."""
    seed, shp, spc = params["seed"], tuple(params["shape"]), tuple(params["spacing"])
    tcia, btcv = layout.tcia_root, layout.btcv_root
    kind = _UNLABELED_KINDS[params["unlabeled_kind"]]
    tasks = [(_subject_seed(seed, 0, i), shp, spc, kind, str(tcia / p), None) for i, p in enumerate(layout.unlabeled)]
    tasks += [
        (_subject_seed(seed, 1, j), shp, spc, "btcv", str(btcv / e["image"]), str(btcv / e["label"]))
        for j, e in enumerate(layout.labeled)
    ]
    bar = tqdm(total=len(tasks), desc="synthetic cohort", unit="vol", disable=not progress)
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=int(workers)) as ex:
                for _ in ex.map(_make_one, tasks):
                    bar.update(1)
        else:
            for t in tasks:
                _make_one(t)
                bar.update(1)
    finally:
        bar.close()


def _write_datalists(layout: _CohortLayout, params: dict) -> None:
    """The TCIA train / validation split and one BTCV datalist per training-set size."""
    n_train_unl = params["n_unlabeled"] - params["n_unlabeled_val"]
    split = {
        "training": [{"image": p} for p in layout.unlabeled[:n_train_unl]],
        "validation": [{"image": p} for p in layout.unlabeled[n_train_unl:]],
    }
    _write_json_atomic(split, layout.tcia_json)
    labels = {"0": "background", **{str(k): v for k, v in ORGANS.items()}}
    n_train, n_tune = params["n_labeled_train"], params.get("n_labeled_tune", 0)
    n_val, n_control = params["n_labeled_val"], params.get("n_labeled_control", 0)
    train, tune = layout.labeled[:n_train], layout.labeled[n_train : n_train + n_tune]
    val = layout.labeled[n_train + n_tune : n_train + n_tune + n_val]
    control = layout.labeled[n_train + n_tune + n_val :]
    for N, path in layout.btcv_json.items():
        datalist = {
            "description": "synthetic btcv-like cohort",
            "labels": labels,
            "modality": {"0": "CT"},
            "name": "btcv-synthetic",
            "tensorImageSize": "3D",
            "numTraining": N,
            "training": train[:N],
            **({"tuning": tune} if n_tune else {}),
            "validation": val,
            **({"control": control} if n_control else {}),
        }
        _write_json_atomic(datalist, path)


def make_synthetic_dataset(
    root: str | os.PathLike,
    n_unlabeled: int = 32,
    n_unlabeled_val: int = 6,
    n_labeled_train: int = 6,
    n_labeled_val: int = 4,
    train_sizes: tuple[int, ...] = (2, 6),
    shape: tuple[int, int] = (128, 128),
    spacing: tuple[float, float, float] = (3.0, 3.0, 5.0),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    unlabeled_kind: str = "chest",
    n_labeled_tune: int = 0,
    n_labeled_control: int = 0,
) -> dict:
    """Write (or reuse) a synthetic TCIA-like + BTCV-like cohort under ``root``.

    n_unlabeled: unlabeled volumes in total, the last ``n_unlabeled_val`` of which form the validation split.
    unlabeled_kind: "chest" (default; TCIA-Covid19-like chest CT, ``generate_subject(kind="chest")``, as the
    reference pre-trains on) or "abdomen" (the abdominal renderer, ``kind="tcia"``); recorded in
    ``cohort.json``, so a cohort of the other kind is regenerated, not reused.
    n_labeled_train / n_labeled_tune / n_labeled_val: labeled subjects (img0001.. training first, then the tuning
    split, then validation). The tuning split (a ``"tuning"`` list in every datalist, when n_labeled_tune > 0) is
    what recipe choices are made on; the validation split only reports. n_labeled_control: subjects after the
    validation split, listed as ``"control"`` in every datalist (when > 0): the positive control's training set,
    disjoint from the three others.
    train_sizes: for each N a ``btcv/dataset_0_init_{N}.json`` with the first N training subjects (nested)
    and the shared validation list. shape: in-plane voxels; spacing: nominal voxel size (mm).
    A complete ``root/cohort.json`` with identical parameters and all files present means reuse (unless
    overwrite); otherwise the ``tcia/`` and ``btcv/`` folders of a previous cohort are replaced (nothing else
    under ``root`` is touched). ``workers`` > 1 writes
    subjects in parallel processes.
    Returns {"root", "tcia_root", "tcia_json", "btcv_root", "btcv_json": {N: path}, "reused"} (str paths).
    """
    params = _cohort_params(
        n_unlabeled, n_unlabeled_val, n_labeled_train, n_labeled_val, train_sizes, shape, spacing, seed, unlabeled_kind,
        n_labeled_tune, n_labeled_control,
    )
    layout = _cohort_layout(Path(root), params)
    if not overwrite and _is_complete(layout, params):
        return layout.result(reused=True)
    _prepare_folders(layout, params)
    _write_volumes(layout, params, progress, workers)
    _write_datalists(layout, params)
    _write_json_atomic({**params, "complete": True}, layout.meta_path)  # last: the cohort is complete
    return layout.result(reused=False)


def make_cohort_from_config(cfg: Mapping[str, Any] | str, root: str | os.PathLike, **kw: Any) -> dict:
    """``make_synthetic_dataset`` with sizes from a config: synth_unlabeled (total incl. validation),
    synth_unlabeled_val, synth_labeled_train, synth_labeled_tune, synth_labeled_val, synth_train_sizes, synth_shape (voxels),
    synth_spacing (mm), synth_seed, synth_unlabeled_kind ("chest" / "abdomen"). Keyword arguments (overwrite,
    progress, workers, ...) override."""
    from ..config import get_config

    cfg = get_config(cfg)  # a preset name, a Config or flat settings (validated; missing ones default)
    args = dict(
        n_unlabeled=int(cfg["synth_unlabeled"]),
        n_unlabeled_val=int(cfg["synth_unlabeled_val"]),
        n_labeled_train=int(cfg["synth_labeled_train"]),
        n_labeled_val=int(cfg["synth_labeled_val"]),
        n_labeled_tune=int(cfg["synth_labeled_tune"]),
        n_labeled_control=int(cfg["synth_labeled_control"]),
        train_sizes=tuple(cfg["synth_train_sizes"]),
        shape=tuple(cfg["synth_shape"]),
        spacing=tuple(cfg["synth_spacing"]),
        seed=int(cfg["synth_seed"]),
        unlabeled_kind=str(cfg["synth_unlabeled_kind"]),
    )
    args.update(kw)
    return make_synthetic_dataset(root, **args)
