"""Linear probe: segmentation from a frozen ViT encoder with only a 1x1x1 convolution trained.

Full fine-tuning mixes what the pre-training put into the encoder with what the (random)
convolutional decoder learns in the same budget. The probe isolates the first: the encoder is
frozen, a single linear map (a 1x1x1 convolution) turns the patch tokens of layers 3, 6, 9 and 12
into class logits on the token grid, and trilinear upsampling brings them to the crop size.
Pre-trained and random encoders get the same head, data and budget.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROBE_LAYERS = (3, 6, 9, 12)


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


def build_probe(cfg: dict[str, Any], pretrained_path: str | None, seed: int) -> tuple[LinearProbe, Any]:
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


def train_probe(
    cfg: dict[str, Any],
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
) -> dict[str, Any]:
    """Train a linear probe's head on the labeled training volumes and evaluate it like fine-tuning
    (sliding-window inference, Dice per case and organ, averaged over cases).

    Same seed, same data order, crops and head initialisation for both encoders. Returns
    ``{"curve": [[iteration, mean Dice]], "final": metrics, "encoder_unchanged": bool, ...}``.
    """
    from monai.data import DataLoader
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from .data import preflight_datalist
    from .datasets import finetune_datasets
    from .finetune import EpochSampler, evaluate, resolve_ft_data
    from .runtime import Precision, amp_dtype, configure_cpu, select_device

    cfg = dict(cfg)
    iterations = int(iterations or cfg.get("probe_iterations", cfg["ft_iterations"]))
    every = int(eval_every or cfg["ft_eval_every"])
    dev = select_device(device)
    if dev.type == "cpu":
        configure_cpu()
    precision = Precision(dev, amp_dtype(dev, cfg["amp"]))
    data_root, json_path = resolve_ft_data(cfg, data_root, json_path, cohort_root, n_train)
    nc = int(cfg["out_channels"])
    checked = preflight_datalist(json_path, data_root, keys=("training", "validation"), require_label=True,
                                 num_classes=nc, window=(cfg["ft_a_min"], cfg["ft_a_max"]), progress=False)
    train_entries, val_entries = checked["training"], checked["validation"]
    train_ds, val_ds = finetune_datasets(cfg, train_entries, val_entries, progress=False)
    sampler = EpochSampler(len(train_ds), seed)
    train_loader = DataLoader(train_ds, batch_size=int(cfg["ft_batch_size"]), sampler=sampler, num_workers=0)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=0)

    probe, report = build_probe(cfg, pretrained_path, seed)
    probe = probe.to(dev)
    before = {k: v.detach().clone() for k, v in probe.encoder.state_dict().items()}
    optimizer = torch.optim.Adam(probe.head.parameters(), lr=float(cfg.get("probe_lr", 3e-3)))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    curve: list[list[float]] = []
    final: dict[str, Any] = {}
    iteration, epoch = 0, 0
    arm = "pre-trained" if pretrained_path else "random"
    bar = tqdm(total=iterations, desc=f"linear probe ({arm} encoder, seed {seed})", leave=False, disable=not progress)
    probe.train()
    while iteration < iterations:
        epoch += 1
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)
        for batch in train_loader:
            x = batch["image"].to(dev)
            y = batch["label"].to(dev)
            with precision.autocast():
                logits = probe(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            iteration += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if iteration % every == 0 or iteration == iterations:
                final = evaluate(probe, val_loader, cfg, precision)
                curve.append([iteration, final["mean_dice"]])
                probe.train()
            if iteration >= iterations:
                break
    bar.close()
    after = probe.encoder.state_dict()
    unchanged = all(torch.equal(before[k], after[k].detach()) for k in before)
    log(f"linear probe ({arm} encoder, seed {seed}): mean Dice {final.get('mean_dice', float('nan')):.4f}")
    return {
        "seed": seed,
        "arm": arm,
        "curve": curve,
        "final": final,
        "encoder_unchanged": unchanged,
        "transfer": str(report) if report else None,
        "probe": probe,
    }
