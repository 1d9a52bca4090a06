"""A bundle's ``configs/inference.json``: MONAI bundle configs that rebuild the checkpoint's network
and its preprocessing from the run's config (an encoder's: the network and the pre-training
recipe, the two-view pretext's ViTAutoEnc or the masked autoencoder's encoder as UNETR's ViT; the
segmenter's: a complete NIfTI-in, label-map-out inference run)."""

from __future__ import annotations

from typing import Any, Mapping

from .layout import RAS_LABELS

def cube(n: int) -> list[int]:
    return [int(n)] * 3


def _vit_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT arguments both networks take, as ``ssl_utils.models`` passes them."""
    return {
        "in_channels": 1,
        "img_size": cube(cfg["roi"]),
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


def _encoder_config(cfg: Mapping[str, Any], bundle_root: str, network_class: str,
                    network_def: dict[str, Any]) -> dict[str, Any]:
    """An encoder bundle's ``inference.json``: ``network_class`` (a ``$`` expression) built with
    ``network_def``'s arguments, the pre-training recipe's deterministic stage as ``preprocessing``,
    and ``initialize`` loading the weights."""
    return {
        **_common_config(bundle_root),
        "network_class": network_class,
        "network_def": {"_target_": "@network_class", **network_def},
        "network": "$@network_def.to(@device)",
        "preprocessing": _preprocessing(cfg["ssl_spacing"], cfg["ssl_a_min"], cfg["ssl_a_max"], orient=False,
                                        pad=cube(cfg["roi"])),
        "initialize": [
            "$@network.load_state_dict(torch.load(@ckpt_path, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
    }


def encoder_inference_config(cfg: Mapping[str, Any], bundle_root: str) -> dict[str, Any]:
    """``inference.json`` of an encoder bundle of the two-view pretext.

    ``network_def`` is MONAI's ``ViTAutoEnc`` with the checkpoint's architecture, as a subclass whose
    ``forward`` returns the reconstruction only (``ViTAutoEnc`` returns ``(reconstruction, hidden
    states)``, which ``verify_net_in_out`` cannot check); same parameters, same state dict keys.
    ``preprocessing`` is the pre-training data recipe's deterministic stage (for reconstructions)."""
    return _encoder_config(
        cfg, bundle_root,
        "$type('ViTAutoEncReconstruction', (monai.networks.nets.ViTAutoEnc,), "
        "{'forward': lambda self, x: monai.networks.nets.ViTAutoEnc.forward(self, x)[0]})",
        {
            "out_channels": 1,
            "patch_size": cube(cfg["patch_size"]),
            "deconv_chns": int(cfg["deconv_chns"]),
            "num_layers": int(cfg["num_layers"]),
            **_vit_args(cfg),
        },
    )


def unetr_vit_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments MONAI's ``UNETR`` (1.6) gives its ``vit``, for ``ssl_utils.models.build_unetr``'s
    settings: ``patch_size`` and ``num_layers`` (UNETR fixes them at 16 and 12), a learnable position
    embedding, no class token (``classification=False``), a qkv projection without bias."""
    return {
        **_vit_args(cfg),
        "patch_size": cube(cfg["patch_size"]),
        "num_layers": int(cfg["num_layers"]),
        "pos_embed_type": "learnable",
        "classification": False,
        "qkv_bias": False,
    }


def mae_encoder_inference_config(cfg: Mapping[str, Any], bundle_root: str) -> dict[str, Any]:
    """``inference.json`` of an encoder bundle of the masked-autoencoder pretext.

    ``network_def`` is MONAI's ``ViT`` built as UNETR builds its ``vit`` (``unetr_vit_args``), as a
    subclass whose ``forward`` returns the final token features only, ``[B, tokens, hidden_size]``
    after the last LayerNorm (``ViT`` returns ``(features, hidden states)``); its state dict is
    ``UNETR.vit``'s. ``preprocessing`` is the pre-training data recipe's deterministic stage."""
    return _encoder_config(
        cfg, bundle_root,
        "$type('ViTTokenFeatures', (monai.networks.nets.ViT,), "
        "{'forward': lambda self, x: monai.networks.nets.ViT.forward(self, x)[0]})",
        unetr_vit_args(cfg),
    )


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
        transforms.append({"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": RAS_LABELS})
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
            "roi_size": cube(cfg["roi"]),
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
