"""Linear probe: segmentation from a frozen ViT encoder with only a 1x1x1 convolution trained.

Full fine-tuning mixes what the pre-training put into the encoder with what the (random)
convolutional decoder learns in the same budget. The probe isolates the first: the encoder is
frozen, a single linear map (a 1x1x1 convolution) turns the patch tokens of layers 3, 6, 9 and 12
into class logits on the token grid, and trilinear upsampling brings them to the crop size.
Pre-trained and random encoders get the same head, data and budget, and the same training step
as every other loop (``ssl_utils.engine.train_step``).

Two controls (``features=``) separate "the encoder learned anatomy" from "the tokens carry
intensity", with the same head kind, loss, data, budget and seed:

- ``"intensity"``: no network at all; per patch (``patch_size``^3) the mean, standard deviation,
  minimum, maximum and an 8-bin histogram over [0, 1] of the windowed input, plus the patch's
  position on the token grid. What a linear map gets from local intensity and position alone.
- ``"patch_embedding"``: the ViT's patch embedding (convolution + position embedding), before any
  transformer block, random or pre-trained. What the pre-training put into the first linear
  projection, as opposed to the transformer layers (``"encoder"``, the default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, get_config
from .engine import Result, RunState, check_finite, setup_run, train_step

PROBE_LAYERS = (3, 6, 9, 12)
PROBE_FEATURES = ("encoder", "patch_embedding", "intensity")
HISTOGRAM_BINS = 8


def check_features(features: str) -> str:
    """``features`` if it is one of ``PROBE_FEATURES``; a ``ValueError`` naming them otherwise."""
    if features not in PROBE_FEATURES:
        allowed = ", ".join(repr(f) for f in PROBE_FEATURES)
        raise ValueError(f"probe features must be one of {allowed}; got {features!r}")
    return features


def _check_arm(features: str, pretrained_path: str | None) -> None:
    check_features(features)
    if features == "intensity" and pretrained_path:
        raise ValueError(f"features='intensity' uses no network weights; pass pretrained_path=None "
                         f"(got {pretrained_path!r})")


@dataclass
class ProbeResult(Result):
    """What ``train_probe`` returns (also readable as ``result["curve"]`` etc.)."""

    seed: int
    arm: str  # "random" / "pre-trained" (encoder), "patch embedding (...)", "intensity statistics + position"
    curve: list[list[float]]  # [iteration, mean Dice]
    final: dict[str, Any]  # the last evaluation's metrics
    encoder_unchanged: bool  # the frozen encoder's weights are bitwise what they were
    transfer: str | None
    probe: nn.Module
    features: str = "encoder"  # one of PROBE_FEATURES
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one row per evaluation


class IntensityFeatures(nn.Module):
    """The non-network baseline's features: statistics of the input per ``patch_size``^3 patch.

    Input ``[B, 1, D, H, W]`` (windowed to [0, 1], each side a multiple of ``patch_size``) ->
    ``[B, 4 + bins + 3, D/p, H/p, W/p]``: channels mean, standard deviation (population), min,
    max, the fraction of voxels in each of ``bins`` equal bins over [0, 1] (values clamped to
    [0, 1], 1 in the last bin), and the patch's grid coordinates along the 3 axes, normalised to
    [-1, 1] (0 on an axis of one patch). No parameters.
    """

    def __init__(self, patch_size: int, bins: int = HISTOGRAM_BINS) -> None:
        super().__init__()
        self.patch_size = int(patch_size)
        self.bins = int(bins)

    @property
    def num_features(self) -> int:
        return 4 + self.bins + 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"intensity features expect [B, 1, D, H, W]; got shape {tuple(x.shape)}")
        b, size = x.shape[0], tuple(x.shape[2:])
        if any(n % p for n in size):
            raise ValueError(f"intensity features: crop size {size} is not a multiple of the patch size {p}")
        g = [n // p for n in size]
        v = x.float().reshape(b, g[0], p, g[1], p, g[2], p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, *g, p ** 3)
        stats = [v.mean(-1), v.std(-1, correction=0), v.amin(-1), v.amax(-1)]
        idx = (v.clamp(0.0, 1.0) * self.bins).floor().clamp(max=self.bins - 1)
        hist = [(idx == k).float().mean(-1) for k in range(self.bins)]
        axes = [torch.linspace(-1.0, 1.0, n, device=x.device) if n > 1 else torch.zeros(1, device=x.device)
                for n in g]
        coords = [c.expand(b, *g) for c in torch.meshgrid(*axes, indexing="ij")]
        return torch.stack(stats + hist + coords, dim=1)


class LinearProbe(nn.Module):
    """Frozen feature extractor + trainable 1x1x1 convolution on its per-patch features.

    Input ``[B, 1, roi, roi, roi]`` -> logits ``[B, num_classes, roi, roi, roi]``. ``features``:
    ``"encoder"`` (``vit`` is a ViT; its layers ``layers`` concatenated), ``"patch_embedding"``
    (``vit`` is a ViT's ``patch_embedding``; its tokens) or ``"intensity"`` (``vit`` is ``None`` or
    an ``IntensityFeatures``; no network weights).
    """

    def __init__(self, vit: nn.Module | None, hidden_size: int, patch_size: int, num_classes: int,
                 layers: Sequence[int] = PROBE_LAYERS, features: str = "encoder") -> None:
        super().__init__()
        self.features = check_features(features)
        if features == "intensity":
            vit = vit if vit is not None else IntensityFeatures(patch_size)
            if not isinstance(vit, IntensityFeatures):
                raise ValueError("features='intensity' takes no network: pass vit=None")
        elif vit is None:
            raise ValueError(f"features={features!r} needs a frozen network (got vit=None)")
        self.encoder = vit
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.layers = tuple(layers)
        self.patch_size = int(patch_size)
        if features == "encoder":
            in_channels = hidden_size * len(self.layers)
        elif features == "patch_embedding":
            in_channels = hidden_size
        else:
            in_channels = vit.num_features
        self.head = nn.Conv3d(in_channels, num_classes, kernel_size=1)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, no statistics updates
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        grid = [s // self.patch_size for s in size]
        with torch.no_grad():
            if self.features == "intensity":
                feats = self.encoder(x)  # already [B, C, *grid]
            else:
                if self.features == "encoder":
                    _, hidden = self.encoder(x)
                    feats = torch.cat([hidden[i - 1] for i in self.layers], dim=-1)  # [B, N, k*hidden]
                else:
                    feats = self.encoder(x)  # [B, N, hidden]: tokens before any transformer block
                feats = feats.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        logits = self.head(feats.float())
        return F.interpolate(logits, size=size, mode="trilinear", align_corners=False)


def build_probe(cfg: Mapping[str, Any], pretrained_path: str | None, seed: int,
                features: str = "encoder") -> tuple[LinearProbe, Any]:
    """A probe on UNETR's ViT (so the encoder is exactly what fine-tuning would start from).

    ``pretrained_path=None`` gives a random encoder. The head is initialised from ``seed`` after
    the encoder, so both arms start from the same head. ``features="patch_embedding"`` keeps only
    the ViT's patch embedding; ``features="intensity"`` builds no network (a ``pretrained_path``
    is then a ``ValueError``). Returns (probe, transfer report or None).
    """
    from .models import build_unetr, load_pretrained_vit

    _check_arm(features, pretrained_path)
    if features == "intensity":
        torch.manual_seed(seed + 1)
        return LinearProbe(None, cfg["hidden_size"], cfg["patch_size"], cfg["out_channels"], features=features), None
    torch.manual_seed(seed)
    unetr = build_unetr(cfg)
    report = load_pretrained_vit(unetr, pretrained_path) if pretrained_path else None
    torch.manual_seed(seed + 1)
    encoder = unetr.vit if features == "encoder" else unetr.vit.patch_embedding
    probe = LinearProbe(encoder, cfg["hidden_size"], cfg["patch_size"], cfg["out_channels"], features=features)
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
              class_names: Sequence[str] | None = None,
              history: list[dict[str, Any]] | None = None) -> tuple[list[list[float]], dict[str, Any]]:
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
                if history is not None:  # one row per evaluation, as fine-tuning's history.json
                    history.append({"iteration": state["iteration"], "val_mean_dice": final["mean_dice"],
                                    "val_mean_dice_with_bg": final["mean_dice_with_bg"],
                                    **{f"dice_{k}": v for k, v in final["per_organ"].items()}})
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
    features: str = "encoder",
) -> "ProbeResult":
    """Train a linear probe's head on the labeled training volumes and evaluate it like fine-tuning
    (sliding-window inference, Dice per case and class, averaged over cases). The classes come
    from the datalist's ``labels`` map (BTCV's 13 organs without one), as in ``finetune``.

    Same seed, same data order, crops and head initialisation for both encoders. ``features``:
    ``"encoder"`` (default), or a control: ``"patch_embedding"`` (random or pre-trained) or
    ``"intensity"`` (no network; ``pretrained_path`` must be ``None``). Returns a
    ``ProbeResult`` (``curve`` [[iteration, mean Dice]], ``final`` metrics, ``encoder_unchanged``,
    ``features``).
    """
    from .finetune import config_for_classes, resolve_ft_data

    _check_arm(features, pretrained_path)  # before the data are loaded
    cfg = get_config(cfg, probe_iterations=iterations, ft_eval_every=eval_every)
    data_root, json_path = resolve_ft_data(cfg, data_root, json_path, cohort_root, n_train)
    cfg, class_names = config_for_classes(cfg, json_path)
    precision = setup_run(cfg, device, seed)
    loaders = _probe_data(cfg, data_root, json_path, seed)
    probe, report = build_probe(cfg, pretrained_path, seed, features=features)
    probe = probe.to(precision.device)
    before = {k: v.detach().clone() for k, v in probe.encoder.state_dict().items()}
    weights = "pre-trained" if pretrained_path else "random"
    if features == "encoder":
        arm, name = weights, f"{weights} encoder"
    elif features == "patch_embedding":
        arm = name = f"patch embedding ({weights})"
    else:
        arm = name = "intensity statistics + position"
    history: list[dict[str, Any]] = []
    curve, final = fit_probe(probe, loaders, cfg, precision, seed, cfg["probe_iterations"], cfg["ft_eval_every"],
                             progress, desc=f"linear probe ({name}, seed {seed})", class_names=class_names,
                             history=history)
    after = probe.encoder.state_dict()
    unchanged = all(torch.equal(before[k], after[k].detach()) for k in before)
    log(f"linear probe ({name}, seed {seed}): mean Dice {final.get('mean_dice', float('nan')):.4f}")
    return ProbeResult(seed, arm, curve, final, unchanged, str(report) if report else None, probe, features, history)
