"""A bundle's ``configs/metadata.json``: every field MONAI's bundle specification requires
(versions, task, ``network_data_format``), plus the run's recipe, scores and training data; one
function per bundle: the two-view encoder, the masked autoencoder's encoder, the segmenter."""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Mapping, Sequence

import torch

from .configs import cube
from .layout import EXPORTER, INTENDED_USE, MAE_REFERENCE, REFERENCES

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
        "spatial_shape": cube(cfg["roi"]),
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
        "intended_use": INTENDED_USE,
        "references": list(REFERENCES),
        "exported_by": {"exporter": EXPORTER, "kind": kind, "checkpoint": os.path.abspath(path), "date": today},
    }


def _last_row_with(history: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    rows = [r for r in history if isinstance(r, Mapping) and r.get(key) is not None]
    return rows[-1] if rows else None


def _epochs_run(ckpt: Mapping[str, Any], history: Sequence[Any]) -> int:
    return int(ckpt["epoch"]) if isinstance(ckpt.get("epoch"), (int, float)) else len(history)


def _encoder_metadata(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], base: dict[str, Any], *, epochs_run: int,
                      task: str, description: str, pred_classes: str, metrics: dict[str, Any],
                      recipe_keys: Sequence[str], arch_keys: Sequence[str], pred: dict[str, Any]) -> dict[str, Any]:
    """The fields every encoder bundle's ``metadata.json`` has, around the pretext's own: the data,
    the recipe (``pretraining``: ``recipe_keys`` of the config), ``architecture`` and the input format."""
    window = (float(cfg["ssl_a_min"]), float(cfg["ssl_a_max"]))
    base.update({
        "task": task,
        "description": description,
        "data_source": (f"unlabeled CT volumes (preset {cfg['preset']!r}; the checkpoint does not record their "
                        "location), resampled and windowed as in 'pretraining'"),
        "image_classes": (f"single-channel CT at {list(cfg['ssl_spacing'])} mm, HU window [{window[0]:g}, {window[1]:g}] "
                          "scaled to [0, 1]"),
        "pred_classes": pred_classes,
        "eval_metrics": metrics,
        "pretraining": {
            "preset": cfg["preset"],
            "epochs_run": epochs_run,
            "best_val_loss": _number(ckpt.get("best_val_loss")),
            **{k: _jsonable(cfg[k]) for k in recipe_keys},
        },
        "architecture": {k: _jsonable(cfg[k]) for k in arch_keys},
        "network_data_format": {"inputs": {"image": _image_input(cfg)}, "outputs": {"pred": pred}},
    })
    return base


def encoder_metadata(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: str, name: str, version: str,
                     authors: str, copyright: str) -> dict[str, Any]:
    """``metadata.json`` of a two-view encoder bundle (ViTAutoEnc): the pre-training recipe (from the
    checkpoint's config and history) and the validation losses of these weights with their baselines."""
    history = list(ckpt.get("history") or [])
    epochs_run = _epochs_run(ckpt, history)
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
    return _encoder_metadata(
        ckpt, cfg, _base_metadata("encoder", name, version, authors, copyright, path), epochs_run=epochs_run,
        task="Self-supervised pre-training of a 3D ViT encoder (MONAI ViTAutoEnc) on unlabeled CT",
        description=(
            f"ViTAutoEnc (ViT encoder: {cfg['num_layers']} layers, hidden size {cfg['hidden_size']}, patch "
            f"{cfg['patch_size']}, {cfg['roi']}^3 input) pre-trained with two-view reconstruction (in-/out-painting, "
            f"local shuffling) and a contrastive loss (temperature {cfg['temperature']:g}) for {epochs_run} epoch(s), "
            f"preset {cfg['preset']!r}. Its encoder initialises UNETR's ViT for segmentation fine-tuning "
            "(docs/README.md). The network of configs/inference.json returns the reconstruction only."
        ),
        pred_classes="1 channel: the reconstructed (clean) crop, intensities as the input's",
        metrics=metrics, recipe_keys=recipe_keys, arch_keys=arch_keys,
        pred={**_image_input(cfg), "value_range": [], "channel_def": {"0": "reconstruction"}},
    )


def token_grid(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(patches per axis, tokens)`` of a ``roi``^3 input: ``roi / patch_size`` and its cube."""
    g = int(cfg["roi"]) // int(cfg["patch_size"])
    return g, g**3


def mae_encoder_metadata(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: str, name: str, version: str,
                         authors: str, copyright: str) -> dict[str, Any]:
    """``metadata.json`` of a masked-autoencoder encoder bundle (the encoder alone, as UNETR's ViT):
    the MAE recipe (mask ratio, decoder, target, loss, epochs), its validation losses with their
    baselines (``ssl_utils.mae.evaluate_mae``'s keys), and token features as the output."""
    from ..mae import MAE_VAL_KEYS

    history = list(ckpt.get("history") or [])
    epochs_run = _epochs_run(ckpt, history)
    row = _last_row_with(history, "val_recon")
    metrics: dict[str, Any] = {}
    if row is not None:
        metrics = {"epoch": int(row.get("epoch", epochs_run)), **{k: _number(row.get(k)) for k in MAE_VAL_KEYS}}
        metrics = {k: v for k, v in metrics.items() if v is not None}
    recipe_keys = (
        "pretext", "mae_mask_ratio", "mae_decoder_hidden", "mae_decoder_mlp", "mae_decoder_layers", "mae_decoder_heads",
        "mae_norm_target", "mae_loss", "ssl_spacing", "ssl_a_min", "ssl_a_max", "ssl_num_samples", "ssl_batch_size",
        "ssl_lr", "ssl_weight_decay", "ssl_epochs", "ssl_val_every", "warmup_epochs", "cosine", "grad_clip",
        "select_by", "seed",
    )
    arch_keys = ("roi", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "proj_type", "dropout_rate")
    g, n_tokens = token_grid(cfg)
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_layers"])
    target = "per-patch normalised" if cfg["mae_norm_target"] else "raw windowed"
    shape = f"[1, {n_tokens}, {hidden}]"
    features = (f"{shape} for a {cfg['roi']}^3 input: one {hidden}-vector per patch token "
                f"({g}x{g}x{g} patches of {cfg['patch_size']}^3 voxels, in the order of UNETR's patch embedding: the "
                "crop's last axis fastest), after the ViT's final LayerNorm")
    base = _base_metadata("encoder", name, version, authors, copyright, path)
    base["references"].append(MAE_REFERENCE)
    return _encoder_metadata(
        ckpt, cfg, base, epochs_run=epochs_run,
        task=("Self-supervised pre-training of a 3D ViT encoder as a masked autoencoder (MONAI MaskedAutoEncoderViT) "
              "on unlabeled CT; the encoder, as UNETR's ViT"),
        description=(
            f"The encoder of a masked autoencoder (ViT: {layers} layers, hidden size {hidden}, MLP {cfg['mlp_dim']}, "
            f"{cfg['num_heads']} heads, patch {cfg['patch_size']}, {cfg['roi']}^3 input) pre-trained for {epochs_run} "
            f"epoch(s), preset {cfg['preset']!r}: the encoder saw a random {1 - cfg['mae_mask_ratio']:.0%} of the "
            f"patches (mask ratio {cfg['mae_mask_ratio']:g}) and a decoder ({cfg['mae_decoder_layers']} layer(s), "
            f"hidden size {cfg['mae_decoder_hidden']}, MLP {cfg['mae_decoder_mlp']}, {cfg['mae_decoder_heads']} heads; "
            f"not in this bundle) reconstructed the others, {cfg['mae_loss'].upper()} on the {target} masked patches. "
            f"The bundle holds the encoder alone in UNETR's ViT key names (the state dict of UNETR's vit: "
            f"patch_embedding, blocks.0-{layers - 1}, norm); the MAE's class token, mask token and decoder are left "
            f"out. The network of configs/inference.json (MONAI ViT, built as UNETR builds its vit) returns the token "
            f"features {shape}. The MAE's fixed sin-cos position table is the starting value of "
            "UNETR's learnable position embedding (docs/README.md)."
        ),
        pred_classes=f"token features {features}",
        metrics=metrics, recipe_keys=recipe_keys, arch_keys=arch_keys,
        pred={
            "type": "tuples",
            "format": "features",
            "num_channels": n_tokens,  # axis 1, the one verify_net_in_out checks: the tokens
            "spatial_shape": [hidden],
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": True,
            "channel_def": {},
            "shape": [1, n_tokens, hidden],  # not a field of the specification: the whole output's shape
            "description": f"token features {features}; num_channels counts the tokens (axis 1), spatial_shape is "
                           "the feature axis",
        },
    )


def segmenter_metadata(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: str, name: str, version: str,
                       authors: str, copyright: str) -> dict[str, Any]:
    """``metadata.json`` of a segmenter bundle: the label names, the Dice of the evaluation these
    weights were saved at (the history's last row), and the training data and recipe."""
    from ..organs import BTCV_CLASSES

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
                    "spatial_shape": cube(cfg["roi"]),
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
