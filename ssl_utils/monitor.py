"""A downstream signal while pre-training runs: a cheap linear probe on a copy of the encoder.

The reconstruction loss says how well the network repairs corrupted crops, not whether its
encoder is getting better for segmentation. Every ``probe_every`` epochs, ``ProbeMonitor``
copies the encoder into UNETR's ViT, freezes it, fits a linear probe (``ssl_utils.probe``: one
1x1x1 convolution on the tokens of layers 3, 6, 9, 12) on ``probe_fit_volumes`` labeled volumes
for ``probe_monitor_iterations`` iterations, and scores it (mean Dice over the labeled classes)
on the next ``probe_score_volumes`` volumes of the labeled datalist's ``training`` list. Its
``validation`` list is never read: that one reports the fine-tuning results, and a checkpoint
chosen with ``select_by="probe"`` must not have seen it.

Every probe starts from the same head initialisation and sees the same crops in the same order,
so two scores differ only by the encoder. The pre-training's own model, random state and
train/eval mode are left as they were.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import torch
from torch import nn

from .datasets import mix_seed
from .runtime import Precision

__all__ = ["ProbeMonitor", "monitor_entries", "no_labeled_data"]

_SEED_SALT = 0x5E1F  # the monitor's seed: a function of the run's seed, apart from the loops' streams


def monitor_entries(cfg: Mapping[str, Any], probe_json: str | None, probe_root: str | None, pretrain_root: str | None,
                    cohort_root: str = "data/synthetic") -> tuple[list[dict], list[dict], str]:
    """The labeled entries the monitor fits on and scores on, checked: (fit, score, datalist path).

    ``probe_json``: a labeled datalist (entries relative to ``probe_root``, or to the JSON file's
    folder). Without it the embedded cohort's labeled datalist is used, unless the pre-training
    data is the user's own (``pretrain_root`` set, outside ``cohort_root``): then there is no
    labeled data to probe with, and this raises ``ValueError`` saying what to pass.
    """
    from .data import preflight_datalist
    from .finetune import resolve_ft_data
    from .finetune.inputs import config_for_classes

    if no_labeled_data(probe_json, pretrain_root, cohort_root):
        raise ValueError(
            f"probe_every={cfg['probe_every']} needs labeled volumes to probe with: pass probe_json (a labeled "
            "datalist, e.g. json_files/btcv/dataset_0_init_6.json) and probe_data_root, or set probe_every=0"
        )
    root, path = resolve_ft_data(cfg, probe_root, probe_json, cohort_root)
    cfg, _ = config_for_classes(cfg, path)  # the datalist's own classes (its labels map), else BTCV's
    n_fit, n_score = int(cfg["probe_fit_volumes"]), int(cfg["probe_score_volumes"])
    checked = preflight_datalist(path, root, keys=("training",), require_label=True, num_classes=cfg["out_channels"],
                                 window=(cfg["ft_a_min"], cfg["ft_a_max"]), progress=False)
    entries = checked["training"]
    if len(entries) < n_fit + n_score:
        raise ValueError(
            f"{path}: the probe monitor needs probe_fit_volumes + probe_score_volumes = {n_fit + n_score} labeled "
            f"'training' entries, the datalist has {len(entries)}; lower them or use a larger datalist"
        )
    return entries[:n_fit], entries[n_fit:n_fit + n_score], str(path)


def no_labeled_data(probe_json: str | None, pretrain_root: str | None, cohort_root: str) -> bool:
    """True when pre-training runs on the user's own data (``pretrain_root`` outside the embedded
    cohort's ``cohort_root``) and no labeled datalist (``probe_json``) is given to probe with."""
    return not probe_json and bool(pretrain_root) and not _inside(pretrain_root, cohort_root)


def _inside(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies under it (the embedded cohort's own unlabeled part)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


class ProbeMonitor:
    """Scores an encoder by a short linear probe; ``monitor.score(model)`` -> ``{"probe_dice", ...}``.

    ``model``: the ViTAutoEnc being pre-trained (or a DDP / compiled wrapper of it). Datasets are
    cached once, when the monitor is made.
    """

    def __init__(self, cfg: Mapping[str, Any], fit_entries, score_entries, precision: Precision,
                 source: str = "") -> None:
        from .models import build_unetr
        from .probe import probe_loaders
        from .speedups import apply_speedups

        self.class_names = None
        if source:  # the datalist's own classes (its labels map), else BTCV's
            from .finetune.inputs import config_for_classes

            cfg, self.class_names = config_for_classes(cfg, source)
        self.cfg, self.precision, self.source = cfg, precision, source
        self.seed = mix_seed(int(cfg["seed"]), _SEED_SALT)
        self.n_fit, self.n_score = len(fit_entries), len(score_entries)
        self.loaders = probe_loaders(cfg, fit_entries, score_entries, self.seed)
        with torch.random.fork_rng(devices=[]):
            self.vit = apply_speedups(build_unetr(cfg), cfg, precision.device).vit  # UNETR's encoder, as fine-tuning gets it
        self.vit.requires_grad_(False)

    def __repr__(self) -> str:
        return (f"ProbeMonitor(fit {self.n_fit} / score {self.n_score} labeled volumes of {self.source or 'a datalist'}, "
                f"{self.cfg['probe_monitor_iterations']} iterations)")

    def _copy_encoder(self, model: nn.Module) -> None:
        from .models import encoder_state, unwrap_model

        target = self.vit.state_dict()
        source = encoder_state(unwrap_model(model).state_dict(), target)[0]  # ViTAutoEnc or MAE, in UNETR's names
        missing = [k for k in target if k not in source]
        if missing:
            raise KeyError(f"the probe monitor cannot copy the encoder: the model has no {missing[:3]}")
        with torch.no_grad():
            for k, v in target.items():
                v.copy_(source[k])

    def score(self, model: nn.Module) -> dict[str, float]:
        """Fit and score a probe on a frozen copy of ``model``'s encoder."""
        from .probe import LinearProbe, fit_probe

        t0 = time.perf_counter()
        self._copy_encoder(model)
        cfg, dev = self.cfg, self.precision.device
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the pre-training's random streams stay as they were
            torch.manual_seed(self.seed)
            probe = LinearProbe(self.vit, cfg["hidden_size"], cfg["patch_size"], cfg["out_channels"]).to(dev)
            iterations = int(cfg["probe_monitor_iterations"])
            _, final = fit_probe(probe, self.loaders, cfg, self.precision, self.seed, iterations, iterations,
                                 class_names=self.class_names)
        return {"probe_dice": float(final["mean_dice"]), "probe_time_s": time.perf_counter() - t0}

