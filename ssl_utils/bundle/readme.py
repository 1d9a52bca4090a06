"""A bundle's ``docs/README.md``: the templates in ``templates/`` filled from its metadata and config.

The templates are plain Markdown with ``str.format`` fields (``{name}``; a literal brace is
doubled); this module computes the fields. The encoders' READMEs (two-view, masked autoencoder)
show how to load the encoder into UNETR, the segmenter's how to run it on NIfTI volumes and what
it scored.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Mapping

from .layout import INTENDED_USE
from .metadata import token_grid


def template(name: str) -> str:
    """The text of ``templates/<name>`` (package data, installed with the package)."""
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def _unetr_fields(cfg: Mapping[str, Any], out: str) -> dict[str, Any]:
    """The fields both encoder READMEs use to show the UNETR that takes the encoder: its ViT
    settings, the preset and overrides that rebuild it, the weights' path."""
    preset = cfg["preset"] if cfg["preset"] in ("paper", "demo", "smoke") else "paper"
    return dict(
        roi=cfg["roi"], hidden_size=cfg["hidden_size"], mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"],
        num_layers=cfg["num_layers"], patch_size=cfg["patch_size"], proj_type=cfg["proj_type"], preset=preset,
        arch=", ".join(f"{k}={cfg[k]!r}" for k in ("roi", "hidden_size", "mlp_dim", "num_heads", "proj_type")),
        model_path=os.path.join(out, "models", "model.pt"), ssl_spacing=list(cfg["ssl_spacing"]),
        ssl_a_min=f"{cfg['ssl_a_min']:g}", ssl_a_max=f"{cfg['ssl_a_max']:g}", intended_use=INTENDED_USE,
    )


def encoder_readme(meta: Mapping[str, Any], cfg: Mapping[str, Any], out: str) -> str:
    """``docs/README.md`` of a two-view encoder bundle (ViTAutoEnc) exported to ``out``."""
    m, p = meta["eval_metrics"], meta["pretraining"]
    losses = ""
    if m:
        losses = (
            f"\nValidation (fixed views, epoch {m.get('epoch')}): reconstruction L1 {m.get('val_recon_l1', float('nan')):.4f} "
            f"against {m.get('baseline_constant_l1', float('nan')):.4f} for predicting each crop's mean and "
            f"{m.get('baseline_copy_view1_l1', float('nan')):.4f} for copying the corrupted view.\n"
        )
    return template("encoder_README.md").format(
        name=meta["name"], description=meta["description"], run_preset=p["preset"], epochs_run=p["epochs_run"],
        ssl_epochs=p["ssl_epochs"], ssl_lr=f"{p['ssl_lr']:g}", temperature=f"{p['temperature']:g}", losses=losses,
        **_unetr_fields(cfg, out),
    )


def mae_encoder_readme(meta: Mapping[str, Any], cfg: Mapping[str, Any], out: str) -> str:
    """``docs/README.md`` of a masked-autoencoder encoder bundle (UNETR's ViT) exported to ``out``:
    the recipe, the validation losses, what the features are, what becomes of the fixed position
    table, and how to load the weights into UNETR's ``vit``."""
    m, p = meta["eval_metrics"], meta["pretraining"]
    target = "per-patch normalised" if p["mae_norm_target"] else "raw windowed"
    losses = ""
    if m:
        nan = float("nan")
        losses = (
            f"\nValidation (fixed crops and masks, epoch {m.get('epoch')}): masked-patch {p['mae_loss'].upper()} "
            f"{m.get('val_recon', nan):.4f} against {m.get('val_patch_mean', nan):.4f} for predicting each masked "
            f"patch's own mean and {m.get('val_visible_mean', nan):.4f} for the mean of the visible patches "
            f"({target} targets; `eval_metrics` in `configs/metadata.json`).\n"
        )
    grid, n_tokens = token_grid(cfg)
    return template("mae_encoder_README.md").format(
        name=meta["name"], description=meta["description"], run_preset=p["preset"], epochs_run=p["epochs_run"],
        ssl_epochs=p["ssl_epochs"], ssl_lr=f"{p['ssl_lr']:g}", mask_ratio=f"{p['mae_mask_ratio']:g}",
        decoder_layers=p["mae_decoder_layers"], decoder_hidden=p["mae_decoder_hidden"],
        decoder_mlp=p["mae_decoder_mlp"], decoder_heads=p["mae_decoder_heads"], loss=p["mae_loss"].upper(),
        target=target, losses=losses, grid=grid, n_tokens=n_tokens, last_block=int(cfg["num_layers"]) - 1,
        **_unetr_fields(cfg, out),
    )


def segmenter_readme(meta: Mapping[str, Any], cfg: Mapping[str, Any], out: str) -> str:
    """``docs/README.md`` of a segmenter bundle exported to ``out``: labels, Dice, how to run it."""
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
    encoder = "pre-trained (" + str(t["pretrained_path"]) + ")" if t["use_pretrained"] else "randomly initialised"
    return template("segmenter_README.md").format(
        name=meta["name"], description=meta["description"], n_train=t["n_train"], encoder=encoder,
        train_preset=t["preset"], iterations_run=t["iterations_run"], ft_iterations=t["ft_iterations"],
        ft_lr=f"{t['ft_lr']:g}", score=score, rows=rows, config=os.path.join(out, "configs", "inference.json"),
        metadata=os.path.join(out, "configs", "metadata.json"), ft_spacing=list(cfg["ft_spacing"]),
        ft_a_min=f"{cfg['ft_a_min']:g}", ft_a_max=f"{cfg['ft_a_max']:g}", roi=cfg["roi"],
        sw_batch_size=cfg["sw_batch_size"], sw_overlap=f"{cfg['sw_overlap']:g}",
        last_label=int(cfg["out_channels"]) - 1, intended_use=INTENDED_USE,
    )
