"""The receiving end: run a segmenter bundle as its receiver would, and check what it wrote.

``run_segmenter`` runs ``python -m monai.bundle run`` as a separate process and returns the
per-volume times the bundle printed; ``label_map_path`` names the label map written for an input;
``compare_label_map`` scores one against a ground truth in the input's own geometry;
``folder_mib`` is a bundle's size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

from .export import files_under
from .layout import RAS_LABELS

# the line the segmenter's ``run`` prints per volume (see ``segmenter_inference_config``)
_WROTE = re.compile(r"^wrote (\S+) in (\d+\.\d+) s$", flags=re.M)


def folder_mib(folder: str | os.PathLike) -> float:
    """The size of the files under ``folder`` in MiB."""
    folder = os.fspath(folder)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in files_under(folder)) / 2**20


def label_map_path(output_dir: str | os.PathLike, image: str | os.PathLike) -> str:
    """Where the segmenter bundle writes the label map of ``image``: ``<output_dir>/<name>_seg.nii.gz``."""
    name = os.path.basename(os.fspath(image))
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
    return os.path.join(os.fspath(output_dir), f"{stem}_seg.nii.gz")


def run_segmenter(bundle: str | os.PathLike, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike,
                  timeout: float | None = None) -> dict[str, Any]:
    """``python -m monai.bundle run`` of the segmenter bundle in ``bundle`` on the NIfTI files of
    ``dataset_dir``, as a separate process (what a receiver runs). Returns ``command`` (the
    argument list), ``stdout``, ``volumes`` (``(label map, seconds from reading to writing)`` per
    volume, as the bundle printed them) and ``seconds`` (the whole process: Python start, MONAI
    import and weight loading included). A failed run raises ``RuntimeError`` with its stderr."""
    config = os.path.join(os.fspath(bundle), "configs", "inference.json")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
               "--dataset_dir", os.fspath(dataset_dir), "--output_dir", os.fspath(output_dir)]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"monai.bundle run of {config} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    volumes = [(path, float(s)) for path, s in _WROTE.findall(done.stdout)]
    return {"command": command, "stdout": done.stdout, "volumes": volumes, "seconds": seconds}


def compare_label_map(image: str, label: str, pred: str, num_classes: int, a_min: float, a_max: float
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A label map a segmenter wrote for ``image``, against the ground truth ``label``, at the
    image's own resolution (all three loaded and turned to RAS alike; the image windowed to
    [0, 1] by ``a_min`` / ``a_max`` for display). Returns ``{"shape", "same_shape_and_affine",
    "mean_dice"}`` (Dice over the classes present in the label or the map; NaN if none) and the
    loaded arrays (``image``, ``label``, ``pred``, each ``[1, X, Y, Z]``)."""
    import numpy as np
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged

    from ..finetune.metrics import dice_per_case

    keys = ["image", "label", "pred"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
                    ScaleIntensityRanged("image", a_min, a_max, 0.0, 1.0, clip=True)])
    item = load({"image": image, "label": label, "pred": pred})
    same = item["pred"].shape == item["image"].shape and np.allclose(item["pred"].affine, item["image"].affine)
    dice = dice_per_case(item["pred"].numpy().astype(int), item["label"].numpy().astype(int), num_classes)
    present = dice[~np.isnan(dice)]
    return ({"shape": list(item["image"].shape[1:]), "same_shape_and_affine": bool(same),
             "mean_dice": float(present.mean()) if present.size else float("nan")}, item)
