"""Linear probe: segmentation from a frozen ViT encoder with only a 1x1x1 convolution trained.

Full fine-tuning mixes what the pre-training put into the encoder with what the (random)
convolutional decoder learns in the same budget. The probe isolates the first: the encoder is
frozen, a single linear map (a 1x1x1 convolution) turns the patch tokens of layers 3, 6, 9 and 12
into class logits on the token grid, and trilinear upsampling brings them to the crop size.
Pre-trained and random encoders get the same head, data and budget, and the same training step
as every other loop (``ssl_utils.engine.train_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, get_config
from .engine import Result, RunState, check_finite, setup_run, train_step

PROBE_LAYERS = (3, 6, 9, 12)


@dataclass
class ProbeResult(Result):
    """What ``train_probe`` returns (also readable as ``result["curve"]`` etc.)."""

    seed: int
    arm: str  # "random" or "pre-trained"
    curve: list[list[float]]  # [iteration, mean Dice]
    final: dict[str, Any]  # the last evaluation's metrics
    encoder_unchanged: bool  # the frozen encoder's weights are bitwise what they were
    transfer: str | None
    probe: nn.Module


class LinearProbe(nn.Module):
    """Frozen ViT encoder + trainable 1x1x1 convolution on its patch tokens.

    Input ``[B, 1, roi, roi, roi]`` -> logits ``[B, num_classes, roi, roi, roi]``.
    """

    def __init__(self, vit: nn.Module, hidden_size: int, patch_size: int, num_classes: int,
                 layers: Sequence[int] = PROBE_LAYERS) -> None:
        super().__init__()
        self.encoder = vit
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.layers = tuple(layers)
        self.patch_size = int(patch_size)
        self.head = nn.Conv3d(hidden_size * len(self.layers), num_classes, kernel_size=1)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, no statistics updates
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        grid = [s // self.patch_size for s in size]
        with torch.no_grad():
            _, hidden = self.encoder(x)
            feats = torch.cat([hidden[i - 1] for i in self.layers], dim=-1)  # [B, N, k*hidden]
        feats = feats.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        logits = self.head(feats.float())
        return F.interpolate(logits, size=size, mode="trilinear", align_corners=False)


def build_probe(cfg: Mapping[str, Any], pretrained_path: str | None, seed: int) -> tuple[LinearProbe, Any]:
    """A probe on UNETR's ViT (so the encoder is exactly what fine-tuning would start from).

    ``pretrained_path=None`` gives a random encoder. The head is initialised from ``seed`` after
    the encoder, so both arms start from the same head. Returns (probe, transfer report or None).
    """
    from .models import build_unetr, load_pretrained_vit

    torch.manual_seed(seed)
    unetr = build_unetr(cfg)
    report = load_pretrained_vit(unetr, pretrained_path) if pretrained_path else None
    torch.manual_seed(seed + 1)
    probe = LinearProbe(unetr.vit, cfg["hidden_size"], cfg["patch_size"], cfg["out_channels"])
    return probe, report


def probe_loaders(cfg: Mapping[str, Any], train_entries, val_entries, seed: int, progress: bool = False):
    """Cached datasets and loaders of a probe: (training dataset, its ``EpochSampler``, training
    loader, validation loader); the order and crops of training follow ``seed``."""
    from monai.data import DataLoader

    from .datasets import finetune_datasets
    from .finetune import EpochSampler

    train_ds, val_ds = finetune_datasets(cfg, train_entries, val_entries, progress=progress)
    sampler = EpochSampler(len(train_ds), seed)
    train_loader = DataLoader(train_ds, batch_size=cfg["ft_batch_size"], sampler=sampler, num_workers=0)
    return train_ds, sampler, train_loader, DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=0)


def _probe_data(cfg: Config, data_root: str, json_path: str, seed: int):
    """Training loader (seeded order and crops) and validation loader of a resolved datalist,
    after the pre-flight check."""
    from .data import preflight_datalist

    checked = preflight_datalist(json_path, data_root, keys=("training", "validation"), require_label=True,
                                 num_classes=cfg["out_channels"], window=(cfg["ft_a_min"], cfg["ft_a_max"]), progress=False)
    return probe_loaders(cfg, checked["training"], checked["validation"], seed)


def fit_probe(probe: LinearProbe, loaders, cfg: Mapping[str, Any], precision, seed: int, iterations: int,
              eval_every: int, progress: bool = False, desc: str = "linear probe",
              class_names: Sequence[str] | None = None) -> tuple[list[list[float]], dict[str, Any]]:
    """Train the probe's head (Adam at ``probe_lr``, Dice + cross-entropy) for ``iterations``
    steps on ``loaders`` (from ``probe_loaders``) and evaluate it every ``eval_every`` steps and at
    the end. ``class_names``: every class, background first (default BTCV's). Returns (curve
    ``[[iteration, mean Dice]]``, the last evaluation's metrics)."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from .datasets import mix_seed, plain_tensor
    from .finetune import evaluate

    train_ds, sampler, train_loader, val_loader = loaders
    dev = precision.device
    optimizer = torch.optim.Adam(probe.head.parameters(), lr=cfg["probe_lr"])
    state = RunState(probe, optimizer, precision, cfg, counters={"iteration": 0})
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(batch) -> torch.Tensor:
        with precision.autocast():
            logits = probe(plain_tensor(batch["image"]).to(dev))
        return loss_fn(logits.float(), plain_tensor(batch["label"]).to(dev))

    curve: list[list[float]] = []
    final: dict[str, Any] = {}
    bar = tqdm(total=iterations, desc=desc, leave=False, disable=not progress)
    probe.train()
    epoch = 0
    while state["iteration"] < iterations:
        epoch += 1
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        torch.manual_seed(mix_seed(seed, epoch, 0x9B0B))
        for batch in train_loader:
            loss = train_step(state, lambda: forward(batch))
            state["iteration"] += 1
            check_finite(loss, f"probe iteration {state['iteration']}", collective=False)  # may run on rank 0 alone
            bar.update(1)
            bar.set_postfix(loss=f"{loss[0].item():.4f}")
            if state["iteration"] % eval_every == 0 or state["iteration"] == iterations:
                final = evaluate(probe, val_loader, cfg, precision, class_names=class_names)
                curve.append([state["iteration"], final["mean_dice"]])
                probe.train()
            if state["iteration"] >= iterations:
                break
    bar.close()
    return curve, final


def train_probe(
    cfg: Mapping[str, Any] | str,
    pretrained_path: str | None,
    seed: int = 0,
    iterations: int | None = None,
    eval_every: int | None = None,
    data_root: str | None = None,
    json_path: str | None = None,
    n_train: int | None = None,
    cohort_root: str = "data/synthetic",
    device: str | None = None,
    progress: bool = True,
    log=print,
) -> "ProbeResult":
    """Train a linear probe's head on the labeled training volumes and evaluate it like fine-tuning
    (sliding-window inference, Dice per case and class, averaged over cases). The classes come
    from the datalist's ``labels`` map (BTCV's 13 organs without one), as in ``finetune``.

    Same seed, same data order, crops and head initialisation for both encoders. Returns a
    ``ProbeResult`` (``curve`` [[iteration, mean Dice]], ``final`` metrics, ``encoder_unchanged``).
    """
    from .finetune import config_for_classes, resolve_ft_data

    cfg = get_config(cfg, probe_iterations=iterations, ft_eval_every=eval_every)
    data_root, json_path = resolve_ft_data(cfg, data_root, json_path, cohort_root, n_train)
    cfg, class_names = config_for_classes(cfg, json_path)
    precision = setup_run(cfg, device, seed)
    loaders = _probe_data(cfg, data_root, json_path, seed)
    probe, report = build_probe(cfg, pretrained_path, seed)
    probe = probe.to(precision.device)
    before = {k: v.detach().clone() for k, v in probe.encoder.state_dict().items()}
    arm = "pre-trained" if pretrained_path else "random"
    curve, final = fit_probe(probe, loaders, cfg, precision, seed, cfg["probe_iterations"], cfg["ft_eval_every"],
                             progress, desc=f"linear probe ({arm} encoder, seed {seed})", class_names=class_names)
    after = probe.encoder.state_dict()
    unchanged = all(torch.equal(before[k], after[k].detach()) for k in before)
    log(f"linear probe ({arm} encoder, seed {seed}): mean Dice {final.get('mean_dice', float('nan')):.4f}")
    return ProbeResult(seed, arm, curve, final, unchanged, str(report) if report else None, probe)
