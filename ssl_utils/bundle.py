"""Export a trained model as a MONAI bundle (a self-describing folder MONAI's tools can run).

Two kinds, each from a checkpoint this project wrote (it holds the weights and the run's
``"config"``, from which the network's architecture and the preprocessing are taken):

- ``encoder``: the pre-trained ``ViTAutoEnc`` of ``ssl_utils.pretrain`` (``runs/ssl/best_model.pt``).
  Its ``docs/README.md`` shows how to load the encoder into UNETR; its metadata states the
  pre-training recipe and the validation losses with their baselines.
- ``segmenter``: a fine-tuned UNETR of ``ssl_utils.finetune``. Its ``configs/inference.json``
  segments NIfTI volumes (the fine-tuning validation preprocessing, sliding-window inference,
  argmax, inversion to the input's geometry, one NIfTI label map per input); its metadata names
  the labels and states the run's Dice and training data.

A bundle folder holds ``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``
(the bare state dict) and ``docs/README.md``. The commands::

    python -m ssl_utils.bundle export --kind encoder --checkpoint runs/ssl/best_model.pt --out bundles/vit_encoder
    python -m ssl_utils.bundle export --kind segmenter \\
        --checkpoint runs/finetune/compare/n8/seed0/pretrained/best_model.pt --out bundles/unetr_seg

and then, with MONAI's bundle tools (``python -m monai.bundle`` needs the ``fire`` package)::

    python -m monai.bundle run --config_file bundles/unetr_seg/configs/inference.json --dataset_dir IN --output_dir OUT
    python -m monai.bundle verify_net_in_out network_def --meta_file bundles/unetr_seg/configs/metadata.json \\
        --config_file bundles/unetr_seg/configs/inference.json

``inference.json`` runs on MONAI alone (no pytorch-ignite): its ``initialize`` loads the weights,
``run`` segments every ``*.nii.gz`` / ``*.nii`` file of ``dataset_dir``. ``bundle_root`` is the
folder the bundle was exported to; after moving the bundle, pass ``--bundle_root NEW_FOLDER``.

The receiving end, as ``ssl_finetune.ipynb`` uses it: ``run_segmenter`` runs that command as a
separate process and returns the per-volume times the bundle printed; ``label_map_path`` names
the label map written for an input; ``compare_label_map`` scores one against a ground truth in
the input's own geometry.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tempfile
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, get_config
from .models import strip_prefixes

KINDS = ("encoder", "segmenter")
EXPORTER = "ssl_utils.bundle"
# the files of a bundle this module writes; a folder holding only these (and its folders) may be replaced
BUNDLE_FILES = ("configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md")
_BUNDLE_DIRS = ("configs", "models", "docs")
DEFAULT_NAMES = {"encoder": "ssl_vit_encoder", "segmenter": "unetr_ct_segmentation"}
# the orientation labels of the fine-tuning transforms (NIfTI world axes), stated explicitly
_RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]
_REFERENCES = [
    "Hatamizadeh A. et al. UNETR: Transformers for 3D Medical Image Segmentation. WACV 2022. "
    "https://arxiv.org/abs/2103.10504",
    "MONAI tutorial: self-supervised pre-training of a ViT (ViTAutoEnc) on TCIA-Covid19 CT, fine-tuned as "
    "UNETR's encoder on BTCV. https://github.com/Project-MONAI/tutorials/tree/main/self_supervised_pretraining",
]
_INTENDED_USE = "Research and teaching; not for clinical or diagnostic use."


# --------------------------------------------------------------------------------------------
# reading and checking the checkpoint
# --------------------------------------------------------------------------------------------


def _checkpoint_kind(state: Mapping[str, Any]) -> str | None:
    """"encoder" for a ViTAutoEnc state dict (decoder ``conv3d_transpose*``), "segmenter" for a
    UNETR one (output layer ``out.conv.conv.weight``), else None."""
    if "out.conv.conv.weight" in state:
        return "segmenter"
    if any(k.startswith("conv3d_transpose") for k in state):
        return "encoder"
    return None


_WHAT = {
    "encoder": "a pre-training checkpoint (ViTAutoEnc, written by ssl_utils.pretrain)",
    "segmenter": "a fine-tuning checkpoint (UNETR, written by ssl_utils.finetune)",
}


def read_checkpoint(kind: str, checkpoint: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Load ``checkpoint`` and check it is one of ``kind``; returns ``(checkpoint dict, state dict
    without DDP / compile prefixes, validated Config)``. Raises ``CheckpointError`` naming the file
    and what is wrong (missing, unreadable, of the other kind, without ``"config"``)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    path = os.fspath(checkpoint)
    ckpt = load_checkpoint(path)  # CheckpointError: file not found / not a checkpoint / unsafe
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        found = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a training checkpoint of this project (expected a dict with 'state_dict' and "
            f"'config', found {found}); export {_WHAT[kind]}"
        )
    state = strip_prefixes(ckpt["state_dict"])
    found_kind = _checkpoint_kind(state)
    if found_kind != kind:
        if found_kind is None:
            detail = f"its state dict is neither ViTAutoEnc's nor UNETR's (keys start {sorted(state)[:4]})"
        else:
            key = "out.conv.conv.weight" if found_kind == "segmenter" else "conv3d_transpose*"
            detail = f"it is {_WHAT[found_kind]} (its state dict has {key})"
        hint = f"; export it with --kind {found_kind}" if found_kind else ""
        raise CheckpointError(f"checkpoint {path}: --kind {kind} needs {_WHAT[kind]}, but {detail}{hint}")
    if not isinstance(ckpt.get("config"), Mapping) or not ckpt["config"]:
        raise CheckpointError(
            f"checkpoint {path}: no 'config' entry (the run's settings), so the network's architecture and "
            f"preprocessing are unknown; export a best_model.pt / last_model.pt written by "
            f"{'ssl_utils.pretrain' if kind == 'encoder' else 'ssl_utils.finetune'}"
        )
    try:
        cfg = get_config(dict(ckpt["config"]))
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: its 'config' is not valid: {exc}") from None
    if kind == "segmenter":
        n_out = int(state["out.conv.conv.weight"].shape[0])
        if n_out != int(cfg["out_channels"]):
            raise CheckpointError(f"checkpoint {path}: its output layer has {n_out} classes, its config says "
                                  f"out_channels={cfg['out_channels']}")
        names = ckpt.get("class_names")
        if names and len(names) != n_out:
            raise CheckpointError(f"checkpoint {path}: {len(names)} class names {list(names)} for {n_out} output channels")
    return dict(ckpt), state, cfg


# --------------------------------------------------------------------------------------------
# the configs
# --------------------------------------------------------------------------------------------


def _cube(n: int) -> list[int]:
    return [int(n)] * 3


def _vit_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT arguments both networks take, as ``ssl_utils.models`` passes them."""
    return {
        "in_channels": 1,
        "img_size": _cube(cfg["roi"]),
        "hidden_size": int(cfg["hidden_size"]),
        "mlp_dim": int(cfg["mlp_dim"]),
        "num_heads": int(cfg["num_heads"]),
        "proj_type": str(cfg["proj_type"]),
        "dropout_rate": float(cfg["dropout_rate"]),
        "spatial_dims": 3,
    }


def _common_config(bundle_root: str) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import os", "$import time"],
        # where the bundle was exported; after moving it, pass --bundle_root NEW_FOLDER
        "bundle_root": bundle_root,
        "ckpt_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
    }


def encoder_inference_config(cfg: Mapping[str, Any], bundle_root: str) -> dict[str, Any]:
    """``inference.json`` of an encoder bundle.

    ``network_def`` is MONAI's ``ViTAutoEnc`` with the checkpoint's architecture, as a subclass whose
    ``forward`` returns the reconstruction only (``ViTAutoEnc`` returns ``(reconstruction, hidden
    states)``, which ``verify_net_in_out`` cannot check); same parameters, same state dict keys.
    ``preprocessing`` is the pre-training data recipe's deterministic stage (for reconstructions)."""
    return {
        **_common_config(bundle_root),
        "network_class": "$type('ViTAutoEncReconstruction', (monai.networks.nets.ViTAutoEnc,), "
                         "{'forward': lambda self, x: monai.networks.nets.ViTAutoEnc.forward(self, x)[0]})",
        "network_def": {
            "_target_": "@network_class",
            "out_channels": 1,
            "patch_size": _cube(cfg["patch_size"]),
            "deconv_chns": int(cfg["deconv_chns"]),
            "num_layers": int(cfg["num_layers"]),
            **_vit_args(cfg),
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": _preprocessing(cfg["ssl_spacing"], cfg["ssl_a_min"], cfg["ssl_a_max"], orient=False,
                                        pad=_cube(cfg["roi"])),
        "initialize": [
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
    }


def _preprocessing(spacing, a_min: float, a_max: float, orient: bool, pad: list[int] | None = None) -> dict[str, Any]:
    """The deterministic stage of ``ssl_utils.transforms`` (``pretrain_deterministic`` without
    orientation, with padding to the crop; ``finetune_deterministic`` with RAS orientation), for the
    image alone, as bundle config: load, channel first, [RAS,] resample (bilinear), window to [0, 1],
    crop foreground[, pad]. A test checks it gives the arrays the project's own chain gives."""
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    if orient:
        transforms.append({"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": _RAS_LABELS})
    transforms += [
        {"_target_": "Spacingd", "keys": "image", "pixdim": [float(v) for v in spacing], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(a_min), "a_max": float(a_max),
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "allow_smaller": True},
    ]
    if pad is not None:
        transforms.append({"_target_": "SpatialPadd", "keys": "image", "spatial_size": pad})
    return {"_target_": "Compose", "transforms": transforms}


def segmenter_inference_config(cfg: Mapping[str, Any], bundle_root: str) -> dict[str, Any]:
    """``inference.json`` of a segmenter bundle: NIfTI volumes of ``dataset_dir`` -> label maps in
    ``output_dir``, each with its input's shape and affine.

    Preprocessing is the fine-tuning validation chain (load, channel first, RAS, ``ft_spacing``, HU
    window to [0, 1], crop foreground); sliding windows of ``roi``^3 (``sw_batch_size``,
    ``sw_overlap``); argmax; ``Invertd`` undoes the crop, the resampling (nearest) and the
    orientation; ``SaveImaged`` writes ``<name>_seg.nii.gz``. ``initialize`` loads the weights and
    checks there is input; ``run`` segments; ``finalize`` prints a summary."""
    n_classes = int(cfg["out_channels"])
    return {
        **_common_config(bundle_root),
        "dataset_dir": "$os.path.join(@bundle_root, 'input')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "network_def": {
            "_target_": "monai.networks.nets.UNETR",
            "out_channels": n_classes,
            "feature_size": int(cfg["feature_size"]),
            "norm_name": str(cfg["norm_name"]),
            "res_block": bool(cfg["res_block"]),
            **_vit_args(cfg),
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": _preprocessing(cfg["ft_spacing"], cfg["ft_a_min"], cfg["ft_a_max"], orient=True),
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": _cube(cfg["roi"]),
            "sw_batch_size": int(cfg["sw_batch_size"]),
            "overlap": float(cfg["sw_overlap"]),
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": True, "to_tensor": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                 "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8" if n_classes <= 256 else "$numpy.int16",
                 "resample": False, "separate_folder": False, "savepath_in_metadict": True, "print_log": False},
            ],
        },
        # one volume: preprocessing (by the dataset), logits of the sliding windows, postprocessing;
        # returns the path of the label map written
        "segment": "$torch.no_grad()(lambda item: @postprocessing(dict(item, pred=@inferer("
                   "item['image'].unsqueeze(0).to(@device), @network)[0].cpu()))['pred'].meta['saved_to'])",
        "initialize": [
            "$@datalist or (_ for _ in ()).throw(FileNotFoundError("
            "'no *.nii.gz or *.nii file in dataset_dir ' + os.path.abspath(@dataset_dir)))",
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        # volume i of the dataset -> (path written, seconds from reading the file to writing the label map)
        "segment_timed": "$lambda i: (lambda t0: (@segment(@dataset[i]), time.perf_counter() - t0))(time.perf_counter())",
        "run": ["$[print('wrote {} in {:.2f} s'.format(*@segment_timed(i)), flush=True) for i in range(len(@dataset))]"],
        "finalize": ["$print('segmented', len(@datalist), 'volume(s) of', @dataset_dir, 'into', @output_dir)"],
    }


# --------------------------------------------------------------------------------------------
# the metadata
# --------------------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _versions() -> dict[str, Any]:
    import monai
    import nibabel
    import numpy

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
    }


def _image_input(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "image",
        "format": "hounsfield",
        "modality": "CT",
        "num_channels": 1,
        "spatial_shape": _cube(cfg["roi"]),
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": {"0": "image"},
    }


def _base_metadata(kind: str, name: str, version: str, authors: str, copyright: str, path: str) -> dict[str, Any]:
    today = datetime.date.today().isoformat()
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "name": name,
        "version": version,
        "changelog": {version: f"exported from {os.path.basename(path)} by {EXPORTER} on {today}"},
        **_versions(),
        "authors": authors,
        "copyright": copyright,
        "data_type": "nibabel",
        "intended_use": _INTENDED_USE,
        "references": list(_REFERENCES),
        "exported_by": {"exporter": EXPORTER, "kind": kind, "checkpoint": os.path.abspath(path), "date": today},
    }


def _last_row_with(history: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    rows = [r for r in history if isinstance(r, Mapping) and r.get(key) is not None]
    return rows[-1] if rows else None


def encoder_metadata(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: str, name: str, version: str,
                     authors: str, copyright: str) -> dict[str, Any]:
    """``metadata.json`` of an encoder bundle: the pre-training recipe (from the checkpoint's config
    and history) and the validation losses of these weights with their baselines."""
    history = list(ckpt.get("history") or [])
    epochs_run = int(ckpt["epoch"]) if isinstance(ckpt.get("epoch"), (int, float)) else len(history)
    row = _last_row_with(history, "val_recon")
    metrics: dict[str, Any] = {}
    if row is not None:
        metrics = {
            "epoch": int(row.get("epoch", epochs_run)),
            "val_recon_l1": _number(row.get("val_recon")),
            "val_recon_l1_view2": _number(row.get("val_recon_2")),
            "val_contrastive": _number(row.get("val_contrastive")),
            "val_total": _number(row.get("val_total")),
            "baseline_constant_l1": _number(row.get("val_const_l1")),
            "baseline_copy_view1_l1": _number(row.get("val_copy_l1_1")),
            "baseline_copy_view2_l1": _number(row.get("val_copy_l1_2")),
        }
        if metrics["val_recon_l1"] is not None and metrics["baseline_constant_l1"]:
            metrics["val_recon_over_constant"] = metrics["val_recon_l1"] / metrics["baseline_constant_l1"]
        metrics = {k: v for k, v in metrics.items() if v is not None}
    recipe_keys = (
        "ssl_spacing", "ssl_a_min", "ssl_a_max", "ssl_num_samples", "ssl_batch_size", "ssl_lr", "ssl_weight_decay",
        "temperature", "ssl_epochs", "ssl_val_every", "warmup_epochs", "cosine", "grad_clip", "inpaint_holes",
        "inpaint_size", "outpaint_holes", "outpaint_size", "shuffle_prob", "shuffle_holes", "shuffle_size",
        "select_by", "seed",
    )
    arch_keys = ("roi", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "proj_type",
                 "dropout_rate", "deconv_chns")
    window = (float(cfg["ssl_a_min"]), float(cfg["ssl_a_max"]))
    meta = _base_metadata("encoder", name, version, authors, copyright, path)
    meta.update({
        "task": "Self-supervised pre-training of a 3D ViT encoder (MONAI ViTAutoEnc) on unlabeled CT",
        "description": (
            f"ViTAutoEnc (ViT encoder: {cfg['num_layers']} layers, hidden size {cfg['hidden_size']}, patch "
            f"{cfg['patch_size']}, {cfg['roi']}^3 input) pre-trained with two-view reconstruction (in-/out-painting, "
            f"local shuffling) and a contrastive loss (temperature {cfg['temperature']:g}) for {epochs_run} epoch(s), "
            f"preset {cfg['preset']!r}. Its encoder initialises UNETR's ViT for segmentation fine-tuning "
            "(docs/README.md). The network of configs/inference.json returns the reconstruction only."
        ),
        "data_source": (f"unlabeled CT volumes (preset {cfg['preset']!r}; the checkpoint does not record their "
                        "location), resampled and windowed as in 'pretraining'"),
        "image_classes": (f"single-channel CT at {list(cfg['ssl_spacing'])} mm, HU window [{window[0]:g}, {window[1]:g}] "
                          "scaled to [0, 1]"),
        "pred_classes": "1 channel: the reconstructed (clean) crop, intensities as the input's",
        "eval_metrics": metrics,
        "pretraining": {
            "preset": cfg["preset"],
            "epochs_run": epochs_run,
            "best_val_loss": _number(ckpt.get("best_val_loss")),
            **{k: _jsonable(cfg[k]) for k in recipe_keys},
        },
        "architecture": {k: _jsonable(cfg[k]) for k in arch_keys},
        "network_data_format": {
            "inputs": {"image": _image_input(cfg)},
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": _cube(cfg["roi"]),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "reconstruction"},
                }
            },
        },
    })
    return meta


def segmenter_metadata(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: str, name: str, version: str,
                       authors: str, copyright: str) -> dict[str, Any]:
    """``metadata.json`` of a segmenter bundle: the label names, the Dice of the evaluation these
    weights were saved at (the history's last row), and the training data and recipe."""
    from .organs import BTCV_CLASSES

    n_classes = int(cfg["out_channels"])
    names = [str(n) for n in (ckpt.get("class_names") or [])]
    if len(names) != n_classes:
        names = list(BTCV_CLASSES[:n_classes]) if n_classes <= len(BTCV_CLASSES) else [f"class {i}" for i in range(n_classes)]
    history = list(ckpt.get("history") or [])
    row = _last_row_with(history, "val_mean_dice")
    metrics: dict[str, Any] = {}
    if row is not None:
        metrics = {
            "iteration": int(row.get("iteration", 0)),
            "split": cfg["ft_eval_split"],
            "mean_dice": _number(row.get("val_mean_dice")),
            "mean_dice_with_bg": _number(row.get("val_mean_dice_with_bg")),
            "per_class_dice": {n: _number(row.get(f"dice_{n}")) for n in names[1:] if f"dice_{n}" in row},
        }
    use_pretrained = ckpt.get("use_pretrained")
    n_train = ckpt.get("n_train")
    window = (float(cfg["ft_a_min"]), float(cfg["ft_a_max"]))
    recipe_keys = (
        "ft_spacing", "ft_a_min", "ft_a_max", "ft_iterations", "ft_eval_every", "ft_lr", "ft_weight_decay",
        "ft_batch_size", "ft_num_samples", "ft_crop", "encoder_lr_mult", "freeze_encoder_iters", "ft_cosine",
        "ft_eval_split", "sw_batch_size", "sw_overlap", "seed",
    )
    arch_keys = ("roi", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "proj_type",
                 "dropout_rate", "feature_size", "norm_name", "res_block", "out_channels")
    encoder = "a self-supervised pre-trained ViT encoder" if use_pretrained else "a randomly initialised encoder"
    dice = f"; validation mean Dice {metrics['mean_dice']:.4f}" if metrics.get("mean_dice") is not None else ""
    meta = _base_metadata("segmenter", name, version, authors, copyright, path)
    meta.update({
        "task": f"CT segmentation of {n_classes - 1} class(es): {', '.join(names[1:])}",
        "description": (
            f"UNETR ({cfg['roi']}^3 windows, ViT hidden size {cfg['hidden_size']}, feature size {cfg['feature_size']}) "
            f"fine-tuned from {encoder} on {n_train if n_train is not None else 'an unrecorded number of'} labeled "
            f"volume(s), preset {cfg['preset']!r}{dice}. configs/inference.json segments NIfTI volumes and writes "
            "one label map per input, in the input's geometry."
        ),
        "data_source": (f"labeled CT volumes (preset {cfg['preset']!r}; the checkpoint does not record their "
                        f"location): {n_train} for training, scored on the {cfg['ft_eval_split']!r} split"),
        "image_classes": (f"single-channel CT at {list(cfg['ft_spacing'])} mm, RAS, HU window "
                          f"[{window[0]:g}, {window[1]:g}] scaled to [0, 1]"),
        "label_classes": ", ".join(f"{i} {n}" for i, n in enumerate(names)),
        "pred_classes": (f"{n_classes} channels of logits, channel i for label i; the bundle's run writes their "
                         f"argmax, a label map with values 0..{n_classes - 1}"),
        "eval_metrics": metrics,
        "training": {
            "n_train": n_train,
            "use_pretrained": use_pretrained,
            "pretrained_path": ckpt.get("pretrained_path"),
            "preset": cfg["preset"],
            "iterations_run": ckpt.get("iteration"),
            **{k: _jsonable(cfg[k]) for k in recipe_keys},
        },
        "architecture": {k: _jsonable(cfg[k]) for k in arch_keys},
        "network_data_format": {
            "inputs": {"image": _image_input(cfg)},
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": n_classes,
                    "spatial_shape": _cube(cfg["roi"]),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(names)},
                }
            },
        },
    })
    return meta


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return _number(v)
    return v


# --------------------------------------------------------------------------------------------
# the README
# --------------------------------------------------------------------------------------------


def _encoder_readme(meta: Mapping[str, Any], cfg: Mapping[str, Any], out: str) -> str:
    m, p = meta["eval_metrics"], meta["pretraining"]
    losses = ""
    if m:
        losses = (
            f"\nValidation (fixed views, epoch {m.get('epoch')}): reconstruction L1 {m.get('val_recon_l1', float('nan')):.4f} "
            f"against {m.get('baseline_constant_l1', float('nan')):.4f} for predicting each crop's mean and "
            f"{m.get('baseline_copy_view1_l1', float('nan')):.4f} for copying the corrupted view.\n"
        )
    preset = cfg["preset"] if cfg["preset"] in ("paper", "demo", "smoke") else "paper"
    arch = ", ".join(f"{k}={cfg[k]!r}" for k in ("roi", "hidden_size", "mlp_dim", "num_heads", "proj_type"))
    return f"""# {meta['name']}: a self-supervised pre-trained ViT encoder (MONAI ViTAutoEnc)

{meta['description']}

Pre-training: preset `{p['preset']}`, {p['epochs_run']} epoch(s) run of {p['ssl_epochs']}, lr {p['ssl_lr']:g},
temperature {p['temperature']:g}, {cfg['roi']}^3 crops at {list(cfg['ssl_spacing'])} mm, HU window
[{cfg['ssl_a_min']:g}, {cfg['ssl_a_max']:g}] scaled to [0, 1] (`configs/metadata.json`, `pretraining`).
{losses}
## Files

- `models/model.pt`: the ViTAutoEnc state dict (a bare dict of tensors; `torch.load(..., weights_only=True)`).
- `configs/inference.json`: `network_def` builds the network with this architecture; `preprocessing` is
  the pre-training data recipe. `network_def` is `ViTAutoEnc` with a `forward` that returns only the
  reconstruction (ViTAutoEnc returns `(reconstruction, hidden_states)`); its parameters and state dict
  keys are ViTAutoEnc's.
- `configs/metadata.json`: the recipe, the validation losses and their baselines, the input format.

## Load the encoder into UNETR

UNETR's ViT has the same keys as this state dict minus the decoder (`conv3d_transpose*`). With this
project's helpers (the UNETR must have the same ViT settings: roi {cfg['roi']}, hidden size
{cfg['hidden_size']}, mlp {cfg['mlp_dim']}, heads {cfg['num_heads']}, {cfg['num_layers']} layers, patch {cfg['patch_size']}):

```python
from ssl_utils import build_unetr, get_config, load_pretrained_vit

cfg = get_config("{preset}", out_channels=14, {arch})
unetr = build_unetr(cfg)
report = load_pretrained_vit(unetr, "{os.path.join(out, 'models', 'model.pt')}")  # strict: every encoder tensor
print(report)  # loaded N/N encoder tensors ...; ignored the decoder (conv3d_transpose, conv3d_transpose_1)
```

Or with MONAI alone, by copying the keys:

```python
import torch
from monai.networks.nets import UNETR

unetr = UNETR(in_channels=1, out_channels=14, img_size=({cfg['roi']}, {cfg['roi']}, {cfg['roi']}), feature_size=16,
              hidden_size={cfg['hidden_size']}, mlp_dim={cfg['mlp_dim']}, num_heads={cfg['num_heads']}, proj_type="{cfg['proj_type']}")
state = torch.load("{os.path.join(out, 'models', 'model.pt')}", map_location="cpu", weights_only=True)
encoder = {{k: v for k, v in state.items() if not k.startswith("conv3d_transpose")}}
unetr.vit.load_state_dict(encoder, strict=True)
```

Check the network's shapes: `python -m monai.bundle verify_net_in_out network_def --meta_file
configs/metadata.json --config_file configs/inference.json` (in this folder; `python -m monai.bundle`
needs the `fire` package).

{_INTENDED_USE}
"""


def _segmenter_readme(meta: Mapping[str, Any], cfg: Mapping[str, Any], out: str) -> str:
    m, t = meta["eval_metrics"], meta["training"]
    names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    rows = "\n".join(
        f"| {i} | {n} | " + (f"{m['per_class_dice'][n]:.4f}" if m.get("per_class_dice", {}).get(n) is not None else
                            ("-" if i == "0" else "n/a")) + " |"
        for i, n in names.items()
    )
    mean = f"{m['mean_dice']:.4f}" if m.get("mean_dice") is not None else "n/a"
    score = (f"Validation Dice at iteration {m.get('iteration')} (the evaluation these weights were saved at), "
             f"{m.get('split')} split: mean {mean} over the foreground classes.") if m else "No validation Dice recorded."
    config = os.path.join(out, "configs", "inference.json")
    return f"""# {meta['name']}: UNETR CT segmentation

{meta['description']}

Training: {t['n_train']} labeled volume(s), encoder {'pre-trained (' + str(t['pretrained_path']) + ')' if t['use_pretrained'] else 'randomly initialised'},
preset `{t['preset']}`, the weights of iteration {t['iterations_run']} of {t['ft_iterations']}, lr {t['ft_lr']:g}.
{score}

| label | name | Dice |
| --- | --- | --- |
{rows}

## Segment NIfTI volumes

```bash
python -m monai.bundle run --config_file {config} --dataset_dir IN --output_dir OUT
```

Every `*.nii.gz` / `*.nii` file of `IN` is read, oriented to RAS, resampled to {list(cfg['ft_spacing'])} mm,
windowed to HU [{cfg['ft_a_min']:g}, {cfg['ft_a_max']:g}] -> [0, 1] and cropped to its foreground (the
fine-tuning validation transforms), segmented with sliding windows of {cfg['roi']}^3 voxels
(batch {cfg['sw_batch_size']}, overlap {cfg['sw_overlap']:g}), and its argmax is mapped back to the input's
grid (nearest neighbour) and written as `OUT/<name>_seg.nii.gz`: the input's shape and affine, label values
0..{int(cfg['out_channels']) - 1} as in the table. `device` is CUDA when available, else the CPU (`--device
"$torch.device('cpu')"` forces it). `bundle_root` is the folder this bundle was exported to; after moving
the bundle, add `--bundle_root NEW_FOLDER`. `python -m monai.bundle` needs the `fire` package; without
it, `python -c "from monai.bundle import run; run(config_file='{config}', dataset_dir='IN', output_dir='OUT')"`
does the same. The run needs MONAI only (no pytorch-ignite).

In Python:

```python
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config("{config}")
parser.read_meta("{os.path.join(out, 'configs', 'metadata.json')}")
parser["dataset_dir"], parser["output_dir"] = "IN", "OUT"
for id in ("initialize", "run"):
    parser.get_parsed_content(id)
```

Check the network's shapes: `python -m monai.bundle verify_net_in_out network_def --meta_file
configs/metadata.json --config_file configs/inference.json` (in this folder).

## Files

- `models/model.pt`: the UNETR state dict (a bare dict of tensors).
- `configs/inference.json`: the network, preprocessing, inferer, postprocessing, `initialize` / `run` / `finalize`.
- `configs/metadata.json`: labels (`network_data_format.outputs.pred.channel_def`), Dice (`eval_metrics`),
  training data and recipe (`training`).

{_INTENDED_USE}
"""


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def files_under(folder: str) -> list[str]:
    """Every file and link under ``folder``, as paths relative to it (``/``-separated)."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def is_exported_bundle(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a bundle written by this module and nothing else."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, "configs", "metadata.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    ours = isinstance(meta, dict) and isinstance(meta.get("exported_by"), dict) \
        and meta["exported_by"].get("exporter") == EXPORTER
    return ours and set(files_under(folder)) <= set(BUNDLE_FILES)


def _check_out(out: str) -> None:
    """Refuse an output that is a file, or a non-empty folder that is not a bundle of ours."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"output {out} exists and is not a folder: refusing to overwrite it; choose another --out")
    if os.path.isdir(out) and os.path.islink(out):
        raise ValueError(f"output {out} is a symbolic link: refusing to replace it; give the real folder")
    if not os.path.isdir(out):
        return
    files = files_under(out)
    if files and not is_exported_bundle(out):
        foreign = [f for f in files if f not in BUNDLE_FILES] or files
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output folder {out} already holds files that are not a bundle exported by {EXPORTER} ({shown}): "
            "refusing to overwrite them; choose a new or empty --out, or move those files away"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, allow_nan=False)
        f.write("\n")


def _check_bundle(folder: str) -> None:
    """The written config builds ``network_def`` and it loads ``models/model.pt`` strictly."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(folder, "configs", "inference.json"))
    parser.read_meta(os.path.join(folder, "configs", "metadata.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(os.path.join(folder, "models", "model.pt"), map_location="cpu", weights_only=True),
                        strict=True)


def export_bundle(
    kind: str,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    authors: str = "ssl_utils users",
    copyright: str = "Copyright (c) the authors of the training run",
) -> str:
    """Write a MONAI bundle of ``checkpoint`` into the folder ``out`` and return its path.

    ``kind``: ``"encoder"`` (a pre-training checkpoint: ViTAutoEnc) or ``"segmenter"`` (a
    fine-tuning checkpoint: UNETR). The bundle holds ``configs/inference.json``,
    ``configs/metadata.json``, ``models/model.pt`` and ``docs/README.md`` (see the module
    docstring). ``out`` may be new, empty, or a bundle this function wrote before (it is
    replaced); anything else is refused. The bundle is written next to ``out`` first and checked
    (``network_def`` loads ``models/model.pt`` strictly), then moved into place.

    Raises ``CheckpointError`` for a missing or unreadable checkpoint, one of the other kind, or one
    without ``"config"``, and ``ValueError`` for an unknown kind or an output folder holding other files.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    path = os.fspath(checkpoint)
    out = os.path.abspath(os.fspath(out))
    _check_out(out)  # before reading a large checkpoint
    ckpt, state, cfg = read_checkpoint(kind, path)
    name = name or DEFAULT_NAMES[kind]
    if kind == "encoder":
        inference = encoder_inference_config(cfg, out)
        meta = encoder_metadata(ckpt, cfg, path, name, version, authors, copyright)
        readme = _encoder_readme(meta, cfg, out)
    else:
        inference = segmenter_inference_config(cfg, out)
        meta = segmenter_metadata(ckpt, cfg, path, name, version, authors, copyright)
        readme = _segmenter_readme(meta, cfg, out)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.export-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle folder is an ordinary one
        for d in _BUNDLE_DIRS:
            os.makedirs(os.path.join(tmp, d))
        torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "models", "model.pt"))
        _write_json(os.path.join(tmp, "configs", "inference.json"), inference)
        _write_json(os.path.join(tmp, "configs", "metadata.json"), meta)
        with open(os.path.join(tmp, "docs", "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
        try:
            _check_bundle(tmp)
        except Exception as exc:  # a config that does not rebuild the checkpoint's network
            raise CheckpointError(f"checkpoint {path}: the exported network does not load its weights: {exc}") from exc
        _check_out(out)  # again: nothing may have appeared meanwhile
        old = None
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "bundle"))
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# the receiving end: run a segmenter bundle as its receiver would, and check what it wrote
# --------------------------------------------------------------------------------------------

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

    from .finetune.metrics import dice_per_case

    keys = ["image", "label", "pred"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS", labels=_RAS_LABELS),
                    ScaleIntensityRanged("image", a_min, a_max, 0.0, 1.0, clip=True)])
    item = load({"image": image, "label": label, "pred": pred})
    same = item["pred"].shape == item["image"].shape and np.allclose(item["pred"].affine, item["image"].affine)
    dice = dice_per_case(item["pred"].numpy().astype(int), item["label"].numpy().astype(int), num_classes)
    present = dice[~np.isnan(dice)]
    return ({"shape": list(item["image"].shape[1:]), "same_shape_and_affine": bool(same),
             "mean_dice": float(present.mean()) if present.size else float("nan")}, item)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_utils.bundle",
        description="Export a checkpoint of this project as a MONAI bundle (configs/inference.json, "
                    "configs/metadata.json, models/model.pt, docs/README.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ex = sub.add_parser(
        "export", help="write a bundle from a checkpoint",
        description="Write a MONAI bundle from a pre-training (--kind encoder) or fine-tuning (--kind segmenter) "
                    "checkpoint. A segmenter bundle runs with: python -m monai.bundle run --config_file "
                    "OUT/configs/inference.json --dataset_dir IN --output_dir PRED",
    )
    ex.add_argument("--kind", required=True, choices=KINDS,
                    help="encoder: the pre-trained ViTAutoEnc (runs/ssl/best_model.pt); segmenter: a fine-tuned UNETR")
    ex.add_argument("--checkpoint", required=True, help="the checkpoint (best_model.pt or last_model.pt of a run)")
    ex.add_argument("--out", required=True,
                    help="the bundle folder: new, empty, or a bundle exported before (replaced); never other files")
    ex.add_argument("--name", default=None, help="the bundle's name (default: ssl_vit_encoder / unetr_ct_segmentation)")
    ex.add_argument("--version", default="0.1.0", help="the bundle's version (default 0.1.0)")
    ex.add_argument("--authors", default="ssl_utils users", help="metadata 'authors'")
    ex.add_argument("--copyright", default="Copyright (c) the authors of the training run", help="metadata 'copyright'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        folder = export_bundle(args.kind, args.checkpoint, args.out, name=args.name, version=args.version,
                               authors=args.authors, copyright=args.copyright)
    except (CheckpointError, ValueError) as exc:
        parser.exit(2, f"{parser.prog} export: error: {exc}\n")
    size = os.path.getsize(os.path.join(folder, "models", "model.pt"))
    print(f"wrote the {args.kind} bundle {folder} ({', '.join(BUNDLE_FILES)}; model.pt {size / 2**20:.1f} MiB)")
    if args.kind == "segmenter":
        print(f"run it: python -m monai.bundle run --config_file {os.path.join(folder, 'configs', 'inference.json')} "
              "--dataset_dir IN --output_dir OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
