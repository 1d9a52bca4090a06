"""Pictures for the README that need no training run, drawn from the embedded cohort.

    python -m ssl_utils.figures                      # every figure, into figures/
    python -m ssl_utils.figures synthetic_subject --out figures
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Callable

import numpy as np


def synthetic_subject(out_dir: str = "figures", preset: str = "demo") -> str:
    """``synthetic_subject.png``: the first labeled subject of the ``preset`` cohort (the demo
    cohort's ``img0001``) as stored, in HU with its 13-organ labels, next to the same views after
    the fine-tuning validation chain (RAS, resampling, HU window to [0, 1], foreground crop).
    Returns the file's path."""
    import nibabel as nib

    from .config import get_config
    from .plots import plot_subject_views
    from .synthetic import ORGANS, make_synthetic_dataset
    from .transforms import finetune_transforms

    cfg = get_config(preset)
    with tempfile.TemporaryDirectory() as tmp:
        # a one-subject cohort with the preset's size and seed: its img0001 is the full cohort's img0001
        info = make_synthetic_dataset(
            tmp, n_unlabeled=1, n_unlabeled_val=0, n_labeled_train=1, n_labeled_val=0, train_sizes=(1,),
            shape=tuple(cfg["synth_shape"]), spacing=tuple(cfg["synth_spacing"]), seed=int(cfg["synth_seed"]),
            progress=False,
        )
        root = info["btcv_root"]
        entry = {"image": os.path.join(root, "imagesTr/img0001.nii.gz"), "label": os.path.join(root, "labelsTr/label0001.nii.gz")}
        img, lab = nib.load(entry["image"]), nib.load(entry["label"])
        image, label, affine = np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj), img.affine
        out = finetune_transforms(cfg, train=False)(dict(entry))
    sp = "x".join(f"{s:g}" for s in cfg["ft_spacing"])
    path = os.path.join(out_dir, "synthetic_subject.png")
    plot_subject_views(
        image, label, affine,
        out["image"].numpy(), out["label"].numpy(), out["image"].affine.numpy(),
        window=(cfg["ft_a_min"], cfg["ft_a_max"]),
        names=ORGANS,
        tf_description="validation transforms",
        title=f"Synthetic subject img0001 ({preset} cohort): as stored, and after the fine-tuning validation chain\n"
        f"(orientation RAS, resampling to {sp} mm, HU window [{cfg['ft_a_min']:g}, {cfg['ft_a_max']:g}] to [0, 1], "
        "foreground crop)",
        path=path,
    )
    return path


def synthetic_chest(out_dir: str = "figures", preset: str = "demo") -> str:
    """``synthetic_chest.png``: the first unlabeled (pre-training) volume of the ``preset`` cohort, a
    chest CT, in a wide window and in the pre-training window, where the lungs go black. Returns
    the file's path."""
    from .config import get_config
    from .plots import plot_ct_windows
    from .synthetic import _subject_seed, generate_subject

    cfg = get_config(preset)
    if cfg["synth_unlabeled_kind"] != "chest":
        raise ValueError(f"preset {preset!r} pre-trains on {cfg['synth_unlabeled_kind']} CT, not chest CT")
    # volume-synth-0000 of the cohort: unlabeled stream 0, index 0
    seed = _subject_seed(int(cfg["synth_seed"]), 0, 0)
    image, _, affine = generate_subject(seed, tuple(cfg["synth_shape"]), tuple(cfg["synth_spacing"]), with_label=False,
                                        kind="chest")
    lo, hi = cfg["ssl_a_min"], cfg["ssl_a_max"]
    path = os.path.join(out_dir, "synthetic_chest.png")
    plot_ct_windows(
        image, affine, windows=(("wide window", -1000.0, 400.0), ("pre-training window", lo, hi)),
        title=f"Unlabeled synthetic chest CT volume-synth-0000 ({preset} cohort, {image.shape} voxels)\nas stored "
        f"(top) and through the pre-training window [{lo:g}, {hi:g}] HU (bottom): lungs and fat go black",
        path=path,
    )
    return path


FIGURES: dict[str, Callable[..., str]] = {"synthetic_subject": synthetic_subject, "synthetic_chest": synthetic_chest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the README's data figures (no training needed).")
    parser.add_argument("names", nargs="*", help=f"figures to draw (default: all of {sorted(FIGURES)})")
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {sorted(FIGURES)}")
    import matplotlib

    matplotlib.use("Agg")
    for name in args.names or list(FIGURES):
        print(FIGURES[name](args.out))


if __name__ == "__main__":
    main()
