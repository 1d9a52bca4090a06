"""Presets and run configuration.

A configuration is a flat ``dict`` of named settings. ``PRESETS`` holds three of them:

- ``"paper"``: the public reference tutorial's exact recipe (ViT-B/16 at 96^3, GPU sized);
- ``"demo"``: the same pipeline shrunk to run both notebooks on a laptop CPU in minutes;
- ``"smoke"``: tiny, for the test-suite (CPU seconds).

``get_config(preset, **overrides)`` returns a copy with overrides applied; an unknown key is an
error that lists the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from typing import Any

# Settings shared by every preset unless a preset overrides them.
_BASE: dict[str, Any] = {
    # ---- geometry and ViT (UNETR fixes 12 layers and patch 16, so these must transfer) ----
    "roi": 96,  # cubic crop edge, voxels; a multiple of patch_size
    "patch_size": 16,
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "proj_type": "conv",
    "dropout_rate": 0.0,
    "deconv_chns": 16,
    "sdpa": True,  # MONAI's scaled_dot_product_attention path in every ViT block
    "amp": "auto",  # "auto" (bf16 where supported, else fp16 on CUDA, else off) | "bf16" | "fp16" | "off"
    "recompute_gelu": True,  # recompute each ViT block's GELU in backward instead of storing it (-20% activations)
    "channels_last": "auto",  # UNETR in channels-last 3D layout: "auto" (on for CPU) | True | False
    "compile": False,  # torch.compile the model (pays on GPU for long runs)
    "seed": 123,
    "deterministic": False,
    "num_workers": 0,
    # ---- self-supervised pre-training data (TCIA-Covid19 recipe) ----
    "ssl_spacing": (2.0, 2.0, 2.0),  # mm
    "ssl_a_min": -57.0,  # HU window
    "ssl_a_max": 164.0,
    "ssl_num_samples": 2,  # random crops per volume
    "inpaint_holes": 6,
    "inpaint_size": (5, 32),  # hole edge range, voxels (min, max)
    "outpaint_holes": 6,
    "outpaint_size": (20, 64),
    "shuffle_prob": 0.8,
    "shuffle_holes": 10,
    "shuffle_size": 8,
    "cache_rate": 1.0,
    # ---- self-supervised pre-training optimisation ----
    "ssl_batch_size": 4,  # volumes per step (x ssl_num_samples crops)
    "ssl_lr": 1e-4,
    "ssl_weight_decay": 0.0,
    "temperature": 0.05,
    "ssl_epochs": 500,
    "ssl_val_every": 2,
    "warmup_epochs": 0,
    "cosine": False,
    "grad_clip": 0.0,  # 0 = off
    "val_seed": 12345,  # fixes the validation views
    # ---- fine-tuning data (BTCV recipe) ----
    "ft_spacing": (1.5, 1.5, 2.0),
    "ft_a_min": -175.0,
    "ft_a_max": 250.0,
    "ft_num_samples": 4,
    "ft_pos": 1,
    "ft_neg": 1,
    "ft_flip_prob": 0.1,
    "ft_rot_prob": 0.1,
    "ft_shift_offset": 0.1,
    "ft_shift_prob": 0.5,
    # ---- fine-tuning model and optimisation ----
    "out_channels": 14,
    "feature_size": 16,
    "norm_name": "instance",
    "res_block": True,
    "ft_batch_size": 1,  # volumes per step (x ft_num_samples crops)
    "ft_lr": 1e-4,
    "ft_weight_decay": 1e-5,
    "ft_iterations": 30000,
    "ft_eval_every": 100,
    "sw_batch_size": 4,
    "sw_overlap": 0.25,
    "encoder_lr_mult": 1.0,  # learning-rate multiplier for the pre-trained ViT encoder
    "freeze_encoder_iters": 0,  # iterations with the encoder frozen at the start
    # ---- linear probe on the frozen encoder ----
    "probe_lr": 3e-3,
    "probe_iterations": 300,
    # ---- embedded synthetic cohort ----
    "synth_unlabeled": 600 + 171,
    "synth_unlabeled_val": 171,
    "synth_labeled_train": 24,
    "synth_labeled_val": 6,
    "synth_train_sizes": (6, 12, 24),
    "synth_shape": (512, 512),  # in-plane voxels
    "synth_spacing": (0.75, 0.75, 2.5),  # mm (in-plane nominal, slice)
    "synth_seed": 0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The reference tutorial's exact settings.
    "paper": dict(_BASE),
    # CPU minutes: a small ViT (still 12 layers / patch 16, so it transfers into UNETR),
    # 48^3 crops at coarser spacing, a small cohort.
    "demo": {
        **_BASE,
        "roi": 48,
        "hidden_size": 96,
        "mlp_dim": 192,
        "num_heads": 4,
        "ssl_spacing": (4.0, 4.0, 4.0),
        "inpaint_size": (3, 16),
        "outpaint_size": (10, 32),
        "shuffle_size": 4,
        "ssl_batch_size": 4,
        "ssl_lr": 2e-3,  # 30 epochs: validation L1 0.24 (5e-4: 0.31, barely below a constant prediction)
        "ssl_epochs": 30,
        "ssl_val_every": 2,
        "warmup_epochs": 2,
        "cosine": True,
        "ft_spacing": (4.0, 4.0, 4.0),
        # Fine-tuning sized so that ssl_finetune.ipynb (8 runs: 2 sizes x 2 seeds x 2 arms) fits in
        # minutes on 2 CPU cores. UNETR's full-resolution convolutions dominate: feature 4 halves
        # the step of feature 8, and a 2-crop batch costs about what 1 crop does (batch 1 is slow
        # on CPU). About 0.55 s CPU per iteration; one run of 80 iterations ~60 s on one core.
        # lr 3e-4 left the Dice at ~0 after 100 iterations; 4e-3 learns the liver by iteration 60.
        "feature_size": 4,
        "ft_num_samples": 2,
        "ft_lr": 4e-3,
        "ft_iterations": 80,
        "ft_eval_every": 20,
        # few-label practice, fixed before any comparison and the same for both arms: the decoder
        # warms up for 20 iterations with the encoder frozen, so a random decoder's first large
        # gradients do not wash out pre-trained features.
        "freeze_encoder_iters": 20,
        "synth_unlabeled": 32,
        "synth_unlabeled_val": 6,
        "synth_labeled_train": 6,
        "synth_labeled_val": 4,
        "synth_train_sizes": (2, 6),
        "synth_shape": (128, 128),
        "synth_spacing": (3.0, 3.0, 5.0),
    },
    # CPU seconds, for tests.
    "smoke": {
        **_BASE,
        "roi": 32,
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_heads": 2,
        "ssl_spacing": (6.0, 6.0, 6.0),
        "inpaint_holes": 3,
        "inpaint_size": (2, 8),
        "outpaint_holes": 3,
        "outpaint_size": (8, 20),
        "shuffle_holes": 4,
        "shuffle_size": 4,
        "ssl_batch_size": 2,
        "ssl_lr": 1e-3,
        "ssl_epochs": 2,
        "ssl_val_every": 1,
        "ft_spacing": (6.0, 6.0, 6.0),
        "feature_size": 4,
        "ft_num_samples": 1,
        "ft_lr": 1e-3,
        "ft_iterations": 4,
        "ft_eval_every": 2,
        "sw_batch_size": 2,
        "synth_unlabeled": 6,
        "synth_unlabeled_val": 2,
        "synth_labeled_train": 3,
        "synth_labeled_val": 2,
        "synth_train_sizes": (1, 3),
        "synth_shape": (64, 64),
        "synth_spacing": (6.0, 6.0, 8.0),
    },
}


def get_config(preset: str = "demo", **overrides: Any) -> dict[str, Any]:
    """Return a copy of ``PRESETS[preset]`` with ``overrides`` applied.

    Raises ``KeyError`` naming the preset or the unknown setting (and the valid ones).
    ``None`` values in ``overrides`` are ignored, so callers can pass optional arguments through.
    """
    if isinstance(preset, dict):  # already a config
        cfg = copy.deepcopy(preset)
    else:
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        cfg = copy.deepcopy(PRESETS[preset])
        cfg["preset"] = preset
    unknown = [k for k in overrides if k not in cfg]
    if unknown:
        raise KeyError(f"unknown setting(s) {unknown}; valid settings are {sorted(cfg)}")
    for key, value in overrides.items():
        if value is not None:
            cfg[key] = value
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict[str, Any]) -> None:
    """Check the geometric constraints UNETR weight transfer relies on; raise ``ValueError``."""
    roi, patch = int(cfg["roi"]), int(cfg["patch_size"])
    if roi % patch:
        raise ValueError(f"roi={roi} must be a multiple of patch_size={patch}")
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise ValueError(f"hidden_size={cfg['hidden_size']} must be divisible by num_heads={cfg['num_heads']}")
    if cfg["amp"] not in ("auto", "bf16", "fp16", "off", True, False):
        raise ValueError(f"amp={cfg['amp']!r}; expected 'auto', 'bf16', 'fp16' or 'off'")


# Settings that must agree between a checkpoint and a run that resumes from it or loads it.
ARCH_KEYS = ("roi", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "proj_type")
