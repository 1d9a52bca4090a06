"""MONAI transform chains: self-supervised two-view pre-training, and UNETR fine-tuning.

Each chain is one ``Compose`` whose deterministic stage (load, orient, resample, window, crop
foreground, pad) comes first, so ``CacheDataset`` caches it once and only the random stage runs
every epoch. The ``paper`` preset reproduces the reference tutorial's arguments exactly.
"""

from __future__ import annotations

from typing import Any

import monai
from monai import transforms as T

from .data import ContentError, describe_error, image_content_problems, label_content_problems


def _roi(cfg: dict[str, Any]) -> tuple[int, int, int]:
    r = int(cfg["roi"])
    return (r, r, r)


def view_augmentation(cfg: dict[str, Any], key: str) -> list:
    """The corruption applied to one view: in-painting or out-painting, then local pixel shuffling.

    - in-painting: ``inpaint_holes`` cubes of ``inpaint_size`` voxels are blanked inside the crop
      (the network must fill them from context);
    - out-painting: the same number of larger cubes are *kept* and everything else is blanked
      (the network must extrapolate the anatomy around them);
    - local pixel shuffling: voxels are shuffled inside small cubes (texture must be restored).
    One call per key: a single call with two keys would corrupt both views identically.
    """
    lo_in, hi_in = cfg["inpaint_size"]
    lo_out, hi_out = cfg["outpaint_size"]
    return [
        T.OneOf(
            transforms=[
                T.RandCoarseDropoutd(
                    keys=[key], prob=1.0, holes=cfg["inpaint_holes"], spatial_size=lo_in,
                    dropout_holes=True, max_spatial_size=hi_in,
                ),
                T.RandCoarseDropoutd(
                    keys=[key], prob=1.0, holes=cfg["outpaint_holes"], spatial_size=lo_out,
                    dropout_holes=False, max_spatial_size=hi_out,
                ),
            ]
        ),
        T.RandCoarseShuffled(
            keys=[key], prob=cfg["shuffle_prob"], holes=cfg["shuffle_holes"], spatial_size=cfg["shuffle_size"]
        ),
    ]


class LoadCheckedd(T.MapTransform):
    """``LoadImaged`` that checks what it read, on that same read, and otherwise returns exactly
    what ``LoadImaged`` returns: an image's voxels are finite and (with the HU ``window``) not all
    air; a label's values (keys named ``label``) are integers in ``0..num_classes-1``. Raises
    ``ssl_utils.data.ContentError`` listing every problem, a file that cannot be read included, so
    the cache fill can name the entry instead of stopping at a stack trace."""

    def __init__(self, keys, window: tuple[float, float] | None = None, num_classes: int | None = None) -> None:
        super().__init__(keys)
        self.window, self.num_classes = window, num_classes
        self.loaders = {key: T.LoadImaged(keys=[key], image_only=True) for key in self.keys}

    def __call__(self, data):
        d, problems = dict(data), []
        for key in self.keys:
            try:
                d = self.loaders[key](d)
            except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
                problems.append((key, f"truncated or corrupt file ({describe_error(exc)})"))
                continue
            values = d[key].as_tensor().numpy()
            found = label_content_problems(values, self.num_classes) if key == "label" else image_content_problems(values, self.window)
            problems += [(key, p) for p in found]
        if problems:
            raise ContentError(problems)
        return d


def pretrain_deterministic(cfg: dict[str, Any], checked: bool = False) -> list:
    """Load, channel first, resample (mm), window HU to [0, 1], crop foreground, pad to the ROI.

    ``checked``: load with ``LoadCheckedd``, which checks each volume's voxels on the read (what
    the pre-training cache fill does); the output is the same.
    """
    load = (LoadCheckedd(keys=["image"], window=(cfg["ssl_a_min"], cfg["ssl_a_max"])) if checked
            else T.LoadImaged(keys=["image"], image_only=True))
    return [
        load,
        T.EnsureChannelFirstd(keys=["image"]),
        T.Spacingd(keys=["image"], pixdim=tuple(cfg["ssl_spacing"]), mode="bilinear"),
        T.ScaleIntensityRanged(
            keys=["image"], a_min=cfg["ssl_a_min"], a_max=cfg["ssl_a_max"], b_min=0.0, b_max=1.0, clip=True
        ),
        T.CropForegroundd(keys=["image"], source_key="image", allow_smaller=True),
        T.SpatialPadd(keys=["image"], spatial_size=_roi(cfg)),
    ]


def pretrain_random(cfg: dict[str, Any]) -> list:
    """Random ROI crops; for the two-view pretext (``pretext="views"``) also the untouched copy
    ``gt_image`` and two independently corrupted views. The masked autoencoder (``"mae"``) takes the
    clean crop as ``image`` (its masking happens inside the network)."""
    crops = T.RandSpatialCropSamplesd(
        keys=["image"], roi_size=_roi(cfg), random_size=False, num_samples=cfg["ssl_num_samples"]
    )
    if cfg.get("pretext", "views") == "mae":
        return [crops]
    return [
        crops,
        T.CopyItemsd(keys=["image"], times=2, names=["gt_image", "image_2"], allow_missing_keys=False),
        *view_augmentation(cfg, "image"),
        *view_augmentation(cfg, "image_2"),
    ]


def pretrain_transforms(cfg: dict[str, Any], checked: bool = False) -> T.Compose:
    """The full two-view pre-training chain (deterministic stage first, then the random stage).

    Output per crop: ``image`` (view 1), ``image_2`` (view 2), ``gt_image`` (the clean crop),
    each ``[1, roi, roi, roi]`` float in [0, 1]. ``checked``: see ``pretrain_deterministic``.
    """
    return T.Compose(pretrain_deterministic(cfg, checked) + pretrain_random(cfg))


def pretrain_cache_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything ``pretrain_deterministic``'s output depends on besides the file itself: part of
    the disk cache's key, so a cached volume is reused only by a chain that would recompute it
    identically. Change it with the chain."""
    return {"stage": "pretrain_deterministic", "monai": monai.__version__, "ssl_spacing": list(cfg["ssl_spacing"]),
            "ssl_a_min": cfg["ssl_a_min"], "ssl_a_max": cfg["ssl_a_max"], "roi": cfg["roi"]}


def finetune_deterministic(cfg: dict[str, Any]) -> list:
    """Load image and label, orient to RAS, resample (bilinear / nearest), window, crop foreground.

    A volume smaller than the ROI after cropping is padded to it (a no-op on real BTCV volumes).
    """
    keys = ["image", "label"]
    return [
        T.LoadImaged(keys=keys, image_only=True),
        T.EnsureChannelFirstd(keys=keys),
        T.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # NIfTI world axes
        T.Spacingd(keys=keys, pixdim=tuple(cfg["ft_spacing"]), mode=("bilinear", "nearest")),
        T.ScaleIntensityRanged(
            keys=["image"], a_min=cfg["ft_a_min"], a_max=cfg["ft_a_max"], b_min=0.0, b_max=1.0, clip=True
        ),
        T.CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
    ]


def finetune_crop(cfg: dict[str, Any]):
    """The training crops. ``ft_crop="posneg"`` (the reference): centres on foreground : background
    voxels as ``ft_pos : ft_neg``; any organ's voxel counts the same, so most crops centre on the
    largest organ. ``"classes"``: each crop first draws a class (background and every organ equally
    often; a class absent from the volume is skipped), then a voxel of it, so an adrenal is a crop
    centre as often as the liver."""
    keys = ["image", "label"]
    if cfg["ft_crop"] == "classes":
        return T.RandCropByLabelClassesd(
            keys=keys, label_key="label", spatial_size=_roi(cfg), num_classes=int(cfg["out_channels"]),
            num_samples=cfg["ft_num_samples"], image_key="image", image_threshold=0, warn=False,
        )
    return T.RandCropByPosNegLabeld(
        keys=keys, label_key="label", spatial_size=_roi(cfg), pos=cfg["ft_pos"], neg=cfg["ft_neg"],
        num_samples=cfg["ft_num_samples"], image_key="image", image_threshold=0,
    )


def finetune_transforms(cfg: dict[str, Any], train: bool = True) -> T.Compose:
    """Fine-tuning chain. ``train=False`` gives the deterministic part only (for validation)."""
    keys = ["image", "label"]
    det = finetune_deterministic(cfg)
    if not train:
        return T.Compose(det)
    return T.Compose(
        det
        + [
            T.SpatialPadd(keys=keys, spatial_size=_roi(cfg)),
            finetune_crop(cfg),
            T.RandFlipd(keys=keys, spatial_axis=[0], prob=cfg["ft_flip_prob"]),
            T.RandFlipd(keys=keys, spatial_axis=[1], prob=cfg["ft_flip_prob"]),
            T.RandFlipd(keys=keys, spatial_axis=[2], prob=cfg["ft_flip_prob"]),
            T.RandRotate90d(keys=keys, prob=cfg["ft_rot_prob"], max_k=3),
            T.RandShiftIntensityd(keys=["image"], offsets=cfg["ft_shift_offset"], prob=cfg["ft_shift_prob"]),
        ]
    )
