"""UNETR fine-tuning on labeled CT (13 abdominal organs), evaluation, and the random-init vs
pre-trained comparison.

``finetune(cfg, ...)`` reads and checks a BTCV-style datalist, builds UNETR, copies a pre-trained
ViT encoder into ``unetr.vit`` (or keeps it random), trains with DiceCE for a fixed number of
iterations, evaluates with sliding-window inference every ``ft_eval_every`` iterations, and writes
``best_model.pt`` (highest mean Dice) and ``last_model.pt`` (atomically, resumable bitwise),
``history.json`` / ``history.csv`` and ``train_loss.csv`` under ``logdir``.

``compare_init(cfg, train_sizes, seeds, pretrained_path)`` runs both arms, paired by seed, for
each training-set size and writes the reference's table (``results_table.md``) with mean ± sd
over seeds, a per-organ table and ``results.json``.

Dice convention (``dice_per_case``): per case and organ, ``2|P∩G| / (|P| + |G|)`` on the integer
label maps. An organ absent from both the prediction and the ground truth is *excluded* (NaN in
the per-case row, left out by ``nanmean``, and counted in ``n_excluded``); an organ absent from
the ground truth but predicted scores 0 (false positives cost). The headline ``mean_dice`` is,
for each validation case, the mean over the 13 organs, then the mean over cases.
``mean_dice_with_bg`` also averages the background class, as the reference's
``DiceMetric(include_background=True)`` does; it reads higher because background is easy.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import ARCH_KEYS, get_config
from .datasets import mix_seed
from .pretrain import TrainingDiverged
from .models import TransferReport, build_unetr, load_pretrained_vit, prepare_model, unwrap_model
from .runtime import (
    Precision,
    amp_dtype,
    config_differences,
    configure_cpu,
    is_main,
    optimizer_kwargs,
    seed_everything,
    select_device,
)

BEST_NAME = "best_model.pt"
LAST_NAME = "last_model.pt"

# BTCV label indices 1..13 (0 is background), short names for tables and legends.
ORGAN_NAMES: tuple[str, ...] = (
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "IVC",
    "portal/splenic veins",
    "pancreas",
    "right adrenal",
    "left adrenal",
)

# Settings that may differ when resume="auto" reuses a run (they do not change its result).
_RUN_IGNORE = ("preset", "num_workers", "cache_rate")
# Settings that must agree between a fine-tuning checkpoint and a run that resumes from it.
FT_RESUME_KEYS = ARCH_KEYS + ("feature_size", "out_channels", "norm_name", "res_block", "ft_num_samples", "ft_batch_size")


def organ_names(num_classes: int = 14) -> list[str]:
    """Names of the foreground classes ``1..num_classes-1`` (BTCV names, ``class k`` beyond 13)."""
    return [ORGAN_NAMES[k - 1] if k - 1 < len(ORGAN_NAMES) else f"class {k}" for k in range(1, num_classes)]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def resolve_ft_data(
    cfg: dict[str, Any],
    data_root: str | None,
    json_path: str | None,
    cohort_root: str = "data/synthetic",
    n_train: int | None = None,
) -> tuple[str, str]:
    """``(data_root, json_path)`` for fine-tuning.

    - ``data_root`` given: ``json_path`` is required (e.g. ``json_files/btcv/dataset_0_init_6.json``);
    - both empty: the embedded cohort (generated under ``cohort_root`` on first use, reused after),
      with the datalist of ``n_train`` training volumes (default: the largest of
      ``cfg["synth_train_sizes"]``);
    - only ``json_path``: its entries resolve against the JSON file's folder.
    """
    if data_root:
        if not json_path:
            raise ValueError(
                f"data_root={data_root!r} is given but json_path is empty; pass the datalist, "
                "e.g. json_files/btcv/dataset_0_init_6.json"
            )
        return str(data_root), str(json_path)
    if json_path:
        return os.path.dirname(os.path.abspath(str(json_path))), str(json_path)
    from .synthetic import make_cohort_from_config

    sizes = [int(s) for s in cfg["synth_train_sizes"]]
    n = int(n_train) if n_train else max(sizes)
    info = make_cohort_from_config(cfg, cohort_root, progress=False)
    table = {int(k): v for k, v in info["btcv_json"].items()}
    if n not in table:
        raise ValueError(
            f"the embedded cohort has datalists for {sorted(table)} training volumes, not {n}; "
            "choose one of those or change synth_train_sizes"
        )
    return info["btcv_root"], table[n]


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order of ``n`` items that is a pure function of ``(seed, epoch)``, optionally
    starting ``start`` items in (to resume in the middle of an epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = int(n), int(seed), 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self.epoch, 0x5A4D))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(self.n - self.start, 0)


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------


def _confusion(pred, gt, num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` voxel counts, rows = ground truth, columns = prediction."""
    if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
        p = torch.as_tensor(pred).reshape(-1)
        g = torch.as_tensor(gt).reshape(-1).to(p.device)
        if p.numel() != g.numel():
            raise ValueError(f"prediction has {p.numel()} voxels, ground truth {g.numel()}")
        p, g = p.long(), g.long()
        for name, t in (("prediction", p), ("ground truth", g)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{name} holds labels {lo}..{hi}, expected 0..{num_classes - 1}")
        counts = torch.bincount(g * num_classes + p, minlength=num_classes * num_classes)
        return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)
    p = np.asarray(pred).reshape(-1)
    g = np.asarray(gt).reshape(-1)
    if p.size != g.size:
        raise ValueError(f"prediction has {p.size} voxels, ground truth {g.size}")
    if p.size and (np.any(p != np.round(p)) or np.any(g != np.round(g))):
        raise ValueError("dice expects integer label maps (argmax of the logits), found non-integer values")
    p, g = p.astype(np.int64), g.astype(np.int64)
    for name, t in (("prediction", p), ("ground truth", g)):
        if t.size and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} holds labels {t.min()}..{t.max()}, expected 0..{num_classes - 1}")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _dice_from_confusion(conf: np.ndarray) -> np.ndarray:
    inter = np.diag(conf).astype(np.float64)
    denom = conf.sum(axis=0).astype(np.float64) + conf.sum(axis=1).astype(np.float64)
    out = np.full(conf.shape[0], np.nan)
    ok = denom > 0
    out[ok] = 2.0 * inter[ok] / denom[ok]
    return out


def dice_with_background(pred, gt, num_classes: int = 14) -> np.ndarray:
    """Dice of every class ``0..num_classes-1`` (index 0 = background) for one case.

    ``pred``, ``gt``: integer label maps of the same number of voxels (any shape, e.g.
    ``[H, W, D]`` or ``[1, H, W, D]``; numpy arrays or tensors). A class absent from both is NaN
    (excluded); absent from the ground truth but predicted is 0. Returns float64 ``[num_classes]``.
    """
    return _dice_from_confusion(_confusion(pred, gt, num_classes))


def dice_per_case(pred, gt, num_classes: int = 14) -> np.ndarray:
    """Dice of each organ ``1..num_classes-1`` for one case: float64 ``[num_classes - 1]``.

    Same convention as ``dice_with_background``: NaN where the organ is absent from both the
    prediction and the ground truth (excluded from means), 0 where it is only predicted.
    """
    return dice_with_background(pred, gt, num_classes)[1:]


def _nanmean(a: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(a, axis=axis)


def summarize_dice(rows_with_bg: Sequence[Sequence[float]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Average per-case Dice rows (``[cases, num_classes]``, index 0 = background) over cases.

    ``mean_dice``: per case the nanmean over organs 1.., then the mean over cases;
    ``mean_dice_with_bg``: the same including background; ``per_organ``: nanmean over cases.
    """
    a = np.asarray(rows_with_bg, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"need a [cases, classes] array of Dice rows, got shape {a.shape}")
    names = list(names) if names is not None else organ_names(a.shape[1])
    organs = a[:, 1:]
    per_case_mean = _nanmean(organs, axis=1)
    per_case_mean_bg = _nanmean(a, axis=1)
    per_organ = _nanmean(organs, axis=0)
    return {
        "mean_dice": float(_nanmean(per_case_mean)),
        "mean_dice_with_bg": float(_nanmean(per_case_mean_bg)),
        "per_organ": {n: float(v) for n, v in zip(names, per_organ)},
        "per_case": organs.tolist(),
        "per_case_mean": per_case_mean.tolist(),
        "per_case_background": a[:, 0].tolist(),
        "n_cases": int(a.shape[0]),
        "n_excluded": int(np.isnan(organs).sum()),
    }


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, cfg: dict[str, Any], precision: Precision) -> torch.Tensor:
    """Sliding-window logits ``[B, out_channels, H, W, D]`` (float32) for images ``[B, 1, H, W, D]``.

    Windows of ``roi^3`` voxels, ``sw_batch_size`` at a time, overlapping by ``sw_overlap``
    (Gaussian-free constant blending, as the reference).
    """
    from monai.inferers import sliding_window_inference

    image = _plain(image).to(precision.device, non_blocking=True)
    with precision.autocast():
        logits = sliding_window_inference(
            image,
            roi_size=(int(cfg["roi"]),) * 3,
            sw_batch_size=int(cfg["sw_batch_size"]),
            predictor=model,
            overlap=float(cfg["sw_overlap"]),
        )
    return _plain(logits).float()


@torch.no_grad()
def predict_labels(model: nn.Module, image: torch.Tensor, cfg: dict[str, Any], precision: Precision) -> torch.Tensor:
    """Label map ``[B, H, W, D]`` (int64, argmax over classes) for images ``[B, 1, H, W, D]``."""
    was_training = model.training
    model.eval()
    try:
        return predict_logits(model, image, cfg, precision).argmax(dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, loader, cfg: dict[str, Any], precision: Precision) -> dict[str, Any]:
    """Mean Dice over the validation cases (sliding-window inference, argmax, per-case Dice).

    Each case is scored on its own (``dice_with_background``) and the per-case values are
    averaged once over cases (not a running mean averaged again). Returns ``{"mean_dice"`` (13
    organs), ``"mean_dice_with_bg"``, ``"per_organ"`` {name: Dice}, ``"per_case"`` [[13 values]],
    ``"per_case_mean"``, ``"n_excluded"`` (organ/case pairs absent from both), ``"cases"`` (file
    names)``}``. Dice values are fractions in [0, 1].
    """
    was_training = model.training
    model.eval()
    rows: list[np.ndarray] = []
    cases: list[str] = []
    nc = int(cfg["out_channels"])
    try:
        for batch in loader:
            pred = predict_logits(model, batch["image"], cfg, precision).argmax(dim=1)
            label = _plain(batch["label"]).to(pred.device)
            names = _filenames(batch, pred.shape[0])
            for i in range(pred.shape[0]):
                rows.append(dice_with_background(pred[i], label[i, 0].round().long(), nc))
                cases.append(names[i])
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("the validation loader yielded no case")
    out = summarize_dice(rows, organ_names(nc))
    out["cases"] = cases
    return out


def _filenames(batch: dict, n: int) -> list[str]:
    meta = getattr(batch.get("image"), "meta", None) or {}
    names = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    if isinstance(names, str):
        names = [names]
    if not names or len(names) != n:
        return [f"case {i}" for i in range(n)]
    return [os.path.basename(str(x)) for x in names]


# --------------------------------------------------------------------------------------------
# fine-tuning loop
# --------------------------------------------------------------------------------------------


def _write_rows_csv(rows: list[dict], path: str) -> None:
    import csv

    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def _write_json(obj: Any, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _write_logs(history: list[dict], losses: list[float], logdir: str) -> None:
    _write_json(history, os.path.join(logdir, "history.json"))
    _write_rows_csv(history, os.path.join(logdir, "history.csv"))
    _write_rows_csv([{"iteration": i + 1, "loss": v} for i, v in enumerate(losses)], os.path.join(logdir, "train_loss.csv"))


def _fingerprint(path: str | None) -> str | None:
    """``"<bytes>-<mtime ns>"`` of a file (changes when a pre-training run rewrites it), else None."""
    try:
        st = os.stat(str(path))
    except (OSError, TypeError):
        return None
    return f"{st.st_size}-{st.st_mtime_ns}"


def _check_resumable(
    ckpt: Any,
    cfg: dict[str, Any],
    use_pretrained: bool,
    n_train: int,
    path: str,
    same_run: bool = False,
    pretrained_path: str | None = None,
) -> None:
    """Raise ``CheckpointError`` naming what differs when ``ckpt`` cannot be continued by this run.

    ``same_run``: also require every other setting and the same pre-trained file (size and
    modification time), i.e. the checkpoint belongs to exactly this run (``resume="auto"``)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"cannot resume from {path}: not a fine-tuning checkpoint")
    saved = ckpt.get("config") or {}
    keys = [k for k in cfg if k not in _RUN_IGNORE] if same_run else FT_RESUME_KEYS + ("seed",)
    diffs = config_differences(saved, cfg, keys) if saved else []
    if same_run and use_pretrained and ckpt.get("pretrained_fingerprint") != _fingerprint(pretrained_path):
        diffs.append(f"the pre-trained checkpoint {pretrained_path} is not the file this run started from")
    if "use_pretrained" in ckpt and bool(ckpt["use_pretrained"]) != bool(use_pretrained):
        diffs.append(f"use_pretrained: checkpoint {bool(ckpt['use_pretrained'])}, this run {bool(use_pretrained)}")
    if "n_train" in ckpt and int(ckpt["n_train"]) != int(n_train):
        diffs.append(f"training volumes: checkpoint {ckpt['n_train']}, this run {n_train}")
    for key in ("state_dict", "optimizer", "iteration", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"cannot resume from {path}: no {key!r} entry (not a fine-tuning checkpoint?)")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with other settings: " + "; ".join(diffs))


def build_finetune_model(
    cfg: dict[str, Any], seed: int, pretrained_path: str | None = None, use_pretrained: bool = False
) -> tuple[nn.Module, TransferReport | None]:
    """UNETR initialised under ``torch.manual_seed(seed)``, then (``use_pretrained``) its ViT encoder
    replaced by the pre-trained one (strict: every encoder tensor must load).

    With one seed, the random and the pre-trained model share every weight outside ``unetr.vit``
    (the convolutional encoder and decoder), so a comparison isolates the encoder's starting point.
    Returns ``(model on CPU, TransferReport or None)``.
    """
    torch.manual_seed(int(seed))
    model = build_unetr(cfg)
    report = load_pretrained_vit(model, pretrained_path, strict=True) if use_pretrained else None
    return model, report


def finetune(
    cfg: dict[str, Any] | str = "demo",
    data_root: str | None = None,
    json_path: str | None = None,
    logdir: str = "runs/finetune",
    pretrained_path: str | None = None,
    use_pretrained: bool = True,
    resume: bool | str = False,
    stop_after: int | None = None,
    device: str | None = None,
    progress: bool = True,
    seed: int | None = None,
    skip_bad: bool = False,
    cohort_root: str = "data/synthetic",
    log: Callable[[str], None] = print,
    iterations: int | None = None,
    eval_every: int | None = None,
    n_train: int | None = None,
    save_every_s: float = 600.0,
) -> dict[str, Any]:
    """Fine-tune UNETR for ``cfg["ft_iterations"]`` iterations; returns a dict with ``history``
    (one row per evaluation), ``curve`` [(iteration, mean Dice)], ``best_dice``, ``best`` / ``last``
    (checkpoint paths), ``final`` (the last evaluation's metrics), ``model``, ``train_losses``
    (one per iteration), ``transfer`` (the ``TransferReport`` or None), ``n_train``, ``n_val``.

    ``cfg``: preset name or config dict; ``iterations`` / ``eval_every`` override
    ``ft_iterations`` / ``ft_eval_every``; ``seed`` overrides ``cfg["seed"]`` and fixes the data
    order, the crops and the decoder initialisation (the two arms of a comparison differ only in
    the encoder's starting weights). ``use_pretrained``: copy the ViT encoder of
    ``pretrained_path`` into ``unetr.vit`` (a missing file is an error). ``stop_after``: stop, as if
    interrupted, after that many iterations (``last`` is saved there); ``resume=True`` continues
    from ``logdir/last_model.pt`` and ends with the weights an uninterrupted run has (bitwise on
    CPU); ``resume="auto"`` continues (or, when finished, returns) a run only when it has exactly
    these settings and the same pre-trained file, and otherwise starts afresh. ``last`` is saved
    at every evaluation, at the end, and at an epoch end when ``save_every_s`` seconds have passed
    since the previous save. ``n_train`` picks the embedded cohort's datalist when ``data_root``
    and ``json_path`` are empty.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else dict(cfg)
    if seed is not None:
        cfg["seed"] = int(seed)
    if iterations is not None:
        cfg["ft_iterations"] = int(iterations)
    if eval_every is not None:
        cfg["ft_eval_every"] = int(eval_every)
    seed = int(cfg["seed"])
    total_iters, every = int(cfg["ft_iterations"]), max(int(cfg["ft_eval_every"]), 1)
    main = is_main()
    say = log if main else (lambda *_: None)

    if use_pretrained:
        if not pretrained_path:
            raise ValueError("use_pretrained=True needs pretrained_path (the pre-training run's best_model.pt)")
        if not os.path.isfile(str(pretrained_path)):
            raise FileNotFoundError(
                f"pre-trained checkpoint {pretrained_path} not found: run ssl_train.ipynb first "
                "(it writes <logdir>/best_model.pt), pass the right path, or set use_pretrained=False"
            )

    dev = select_device(device)
    if dev.type == "cpu":
        configure_cpu()
    precision = Precision(dev, amp_dtype(dev, cfg["amp"]))
    seed_everything(seed, cfg.get("deterministic", False))
    os.makedirs(logdir, exist_ok=True)
    last_path, best_path = os.path.join(logdir, LAST_NAME), os.path.join(logdir, BEST_NAME)

    # ---- data: read, check every entry, cache the deterministic stage ----
    from monai.data import DataLoader

    from .data import preflight_datalist
    from .datasets import finetune_datasets

    data_root, json_path = resolve_ft_data(cfg, data_root, json_path, cohort_root, n_train)
    nc = int(cfg["out_channels"])
    checked = preflight_datalist(  # every file of both keys, every problem listed at once
        json_path, data_root, keys=("training", "validation"), require_label=True, num_classes=nc,
        window=(cfg["ft_a_min"], cfg["ft_a_max"]), skip_bad=skip_bad, progress=progress and main, log=say,
    )
    train_entries, val_entries = checked["training"], checked["validation"]

    ckpt = None
    if resume:
        if os.path.exists(last_path):
            try:
                ckpt = load_checkpoint(last_path)
                _check_resumable(ckpt, cfg, use_pretrained, len(train_entries), last_path,
                                 same_run=resume == "auto", pretrained_path=pretrained_path)
            except CheckpointError as exc:
                if resume != "auto":
                    raise
                say(f"{exc}; starting a new run in {logdir}")
                ckpt = None
        elif resume != "auto":
            say(f"resume requested but {last_path} does not exist: starting from scratch")

    big = len(train_entries) + len(val_entries) >= 20  # a caching progress bar only where caching takes a while
    train_ds, val_ds = finetune_datasets(cfg, train_entries, val_entries, progress=progress and main and big)
    bs = int(cfg["ft_batch_size"])
    sampler = EpochSampler(len(train_ds), seed)
    loader_kw = dict(num_workers=int(cfg.get("num_workers", 0)), pin_memory=dev.type == "cuda")
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, **loader_kw)
    steps_per_epoch = math.ceil(len(train_ds) / bs)

    # ---- model: decoder initialised from the seed alone, then the encoder is replaced ----
    model, transfer = build_finetune_model(cfg, seed, pretrained_path, use_pretrained and ckpt is None)
    if transfer is not None:
        say(f"weight transfer: {transfer}")
    model = prepare_model(model, cfg, dev)  # on the device; channels-last on CPU (cfg['channels_last'])
    encoder_params = list(model.vit.parameters())
    enc_ids = {id(p) for p in encoder_params}
    other_params = [p for p in model.parameters() if id(p) not in enc_ids]
    lr = float(cfg["ft_lr"])
    optimizer = torch.optim.AdamW(
        [
            {"params": other_params, "lr": lr, "name": "decoder"},
            {"params": encoder_params, "lr": lr * float(cfg.get("encoder_lr_mult", 1.0)), "name": "encoder"},
        ],
        lr=lr,
        weight_decay=float(cfg["ft_weight_decay"]),
        **optimizer_kwargs(dev),
    )
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    freeze_iters = int(cfg.get("freeze_encoder_iters", 0))

    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best_dice = -1.0
    iteration, epoch, step_in_epoch = 0, 1, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            precision.scaler.load_state_dict(ckpt["scaler"])
        history = list(ckpt.get("history", []))
        losses = [float(v) for v in ckpt.get("train_losses", [])]
        best_dice = float(ckpt.get("best_dice", -1.0))
        iteration, epoch = int(ckpt["iteration"]), int(ckpt["epoch"])
        step_in_epoch = int(ckpt.get("step_in_epoch", steps_per_epoch))
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        say(f"resumed from {last_path} at iteration {iteration}")
    # the RNG state is restored only inside an epoch; a new epoch re-seeds from (seed, epoch)
    resume_rng = ckpt.get("rng") if ckpt is not None and step_in_epoch > 0 else None
    window: list[torch.Tensor] = []  # per-iteration losses since the last evaluation
    pending = int(ckpt.get("pending_window", 0)) if ckpt is not None else 0
    if pending:
        window = [torch.tensor(v, dtype=torch.float64) for v in losses[-pending:]]
        del losses[-pending:]

    train_model: nn.Module = torch.compile(model) if cfg.get("compile") else model
    n_enc = sum(p.numel() for p in encoder_params)
    n_all = sum(p.numel() for p in model.parameters())
    init = f"pre-trained encoder ({pretrained_path})" if use_pretrained else "random initialisation"
    say(
        f"fine-tuning: preset={cfg.get('preset', 'custom')} seed={seed} device={dev} precision={precision.name} "
        f"roi={cfg['roi']} feature_size={cfg['feature_size']} | {init} | {len(train_entries)} train / "
        f"{len(val_entries)} val volumes, {bs}x{cfg['ft_num_samples']} crops per iteration, "
        f"{steps_per_epoch} iterations per epoch | UNETR {n_all / 1e6:.2f} M parameters "
        f"({n_enc / 1e6:.2f} M in the ViT encoder) | iterations {iteration + 1}..{total_iters}, "
        f"evaluation every {every}"
    )

    def set_frozen(frozen: bool) -> None:
        for p in encoder_params:
            p.requires_grad_(not frozen)

    def state(epoch_: int, step_: int) -> dict[str, Any]:
        return {
            "state_dict": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "epoch": epoch_,
            "step_in_epoch": step_,
            "steps_per_epoch": steps_per_epoch,
            "scheduler": None,
            "scaler": precision.scaler.state_dict(),
            "rng": capture_rng_state(),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "history": history,
            "train_losses": losses,
            "best_dice": best_dice,
            "use_pretrained": bool(use_pretrained),
            "pretrained_path": str(pretrained_path) if use_pretrained else None,
            "pretrained_fingerprint": _fingerprint(pretrained_path) if use_pretrained else None,
            "n_train": len(train_entries),
        }

    from tqdm.auto import tqdm

    bar = tqdm(total=total_iters, initial=iteration, desc="fine-tuning", disable=not (progress and main), leave=False)
    last_save = time.perf_counter()
    t_window = time.perf_counter()
    stop = total_iters if stop_after is None else min(total_iters, int(stop_after))
    final: dict[str, Any] | None = None
    model.train()
    while iteration < stop:
        # every source of randomness is a function of (seed, epoch): resumable bitwise
        torch.manual_seed(mix_seed(seed, epoch))
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch, start=step_in_epoch * bs)
        batches = iter(train_loader)
        if resume_rng is not None:  # resuming mid-run: the RNG exactly as it was when saved
            restore_rng_state(resume_rng)
            resume_rng = None
        for batch in batches:
            if iteration >= stop:
                break
            set_frozen(iteration < freeze_iters)
            x = _plain(batch["image"]).to(dev, non_blocking=True)
            y = _plain(batch["label"]).to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)  # before the forward: the old gradients are not kept alongside the activations
            with precision.autocast():
                logits = train_model(x)
            loss = loss_fn(logits.float(), y)
            precision.scaler.scale(loss).backward()
            if cfg.get("grad_clip"):
                precision.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            precision.scaler.step(optimizer)
            precision.scaler.update()
            iteration += 1
            step_in_epoch += 1
            window.append(loss.detach().double())
            bar.update(1)
            if dev.type == "cpu" or iteration % 10 == 0:  # .item() syncs on GPU
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss is {value} at iteration {iteration} (epoch {epoch}); training stopped. The last good "
                        f"checkpoint is {last_path if os.path.exists(last_path) else '(none yet)'}; 'best' was not "
                        "overwritten. Try a lower learning rate or amp='off'."
                    )
                bar.set_postfix(loss=f"{value:.4f}", best=f"{max(best_dice, 0):.3f}")
            at_eval = iteration % every == 0 or iteration == total_iters
            at_stop = iteration == stop
            epoch_done = step_in_epoch >= steps_per_epoch
            if at_eval:
                window_losses = torch.stack(window).double().cpu().tolist()
                window = []
                if not all(math.isfinite(v) for v in window_losses):
                    raise TrainingDiverged(f"loss is not finite before iteration {iteration}; training stopped; 'best' not overwritten")
                losses.extend(window_losses)
                t_eval = time.perf_counter()
                metrics = evaluate(model, val_loader, cfg, precision)
                is_best = metrics["mean_dice"] > best_dice
                if is_best:
                    best_dice = metrics["mean_dice"]
                row = {
                    "iteration": iteration,
                    "epoch": epoch,
                    "train_loss": float(np.mean(window_losses)),
                    "lr": optimizer.param_groups[0]["lr"],
                    "val_mean_dice": metrics["mean_dice"],
                    "val_mean_dice_with_bg": metrics["mean_dice_with_bg"],
                    "val_excluded": metrics["n_excluded"],
                    "train_time_s": t_eval - t_window,
                    "eval_time_s": time.perf_counter() - t_eval,
                    **{f"dice_{k}": v for k, v in metrics["per_organ"].items()},
                }
                history.append(row)
                final = metrics
                if main:
                    ck = state(epoch, step_in_epoch)
                    if is_best:
                        save_checkpoint(ck, best_path)
                    save_checkpoint(ck, last_path)
                    last_save = time.perf_counter()
                    _write_logs(history, losses, logdir)
                say(
                    f"iteration {iteration}/{total_iters} loss {row['train_loss']:.4f} | val mean Dice "
                    f"{row['val_mean_dice']:.4f} (with background {row['val_mean_dice_with_bg']:.4f})"
                    + (" best" if is_best else "")
                    + f" | {row['train_time_s']:.1f} s training, {row['eval_time_s']:.1f} s evaluation"
                )
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", dice=f"{row['val_mean_dice']:.3f}")
                t_window = time.perf_counter()
            elif main and (at_stop or (epoch_done and time.perf_counter() - last_save > save_every_s)):
                losses_now = losses + torch.stack(window).double().cpu().tolist()
                ck = state(epoch, step_in_epoch)
                ck["train_losses"] = losses_now
                ck["pending_window"] = len(window)
                save_checkpoint(ck, last_path)
                last_save = time.perf_counter()
        if iteration >= stop and step_in_epoch < steps_per_epoch:
            break
        epoch, step_in_epoch = epoch + 1, 0
    bar.close()
    set_frozen(False)
    if window and stop < total_iters:
        losses.extend(torch.stack(window).double().cpu().tolist())
    if final is None and history:
        final = {
            "mean_dice": history[-1]["val_mean_dice"],
            "mean_dice_with_bg": history[-1]["val_mean_dice_with_bg"],
            "per_organ": {k[5:]: v for k, v in history[-1].items() if k.startswith("dice_")},
        }
    return {
        "history": history,
        "curve": [(int(r["iteration"]), float(r["val_mean_dice"])) for r in history],
        "best_dice": best_dice if history else float("nan"),
        "best": best_path,
        "last": last_path,
        "final": final,
        "model": model,
        "train_losses": losses,
        "transfer": transfer,
        "iteration": iteration,
        "config": cfg,
        "logdir": logdir,
        "n_train": len(train_entries),
        "n_val": len(val_entries),
        "val_dataset": val_ds,
        "train_dataset": train_ds,
        "precision": precision,
        "use_pretrained": bool(use_pretrained),
    }


# --------------------------------------------------------------------------------------------
# random initialisation vs pre-trained encoder
# --------------------------------------------------------------------------------------------

ARMS = ("random", "pretrained")
ARM_LABELS = {"random": "Random Init", "pretrained": "Pre-trained"}


def compare_run_dir(logdir: str, size: int, seed: int, arm: str) -> str:
    """The folder ``compare_init`` uses for one run: ``logdir/n{size}/seed{seed}/{arm}``."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    return os.path.join(logdir, f"n{int(size)}", f"seed{int(seed)}", arm)


def _run_summary(res: dict[str, Any], size: int, seed: int, arm: str, seconds: float) -> dict[str, Any]:
    history = res["history"]
    best_row = max(history, key=lambda r: r["val_mean_dice"]) if history else {}
    final = res["final"] or {}
    return {
        "size": int(size),
        "seed": int(seed),
        "arm": arm,
        "n_train": int(res["n_train"]),
        "n_val": int(res["n_val"]),
        "curve": [[int(i), float(d)] for i, d in res["curve"]],
        "final": float(final.get("mean_dice", float("nan"))),
        "final_with_bg": float(final.get("mean_dice_with_bg", float("nan"))),
        "best": float(best_row.get("val_mean_dice", float("nan"))),
        "best_iteration": int(best_row.get("iteration", 0)),
        "per_organ": {k: float(v) for k, v in (final.get("per_organ") or {}).items()},
        "per_organ_best": {k[5:]: float(v) for k, v in best_row.items() if k.startswith("dice_")},
        "iterations": int(res["iteration"]),
        "logdir": res["logdir"],
        "time_s": float(seconds),
        "transfer": str(res["transfer"]) if res.get("transfer") is not None else None,
    }


def compare_init(
    cfg: dict[str, Any] | str,
    train_sizes: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    pretrained_path: str | None = None,
    data_root: str | None = None,
    json_template: str | None = None,
    logdir: str = "runs/compare",
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = True,
    device: str | None = None,
    cohort_root: str = "data/synthetic",
) -> dict[str, Any]:
    """Fine-tune from random initialisation and from the pre-trained encoder, with the same budget,
    for every training-set size and seed; write ``results.json`` and ``results_table.md`` to
    ``logdir``.

    ``train_sizes``: numbers of labeled training volumes (default: ``cfg["synth_train_sizes"]``
    on the embedded cohort, 6/12/24 on real data). ``seeds``: default ``[0, 1]``; with the same
    seed both arms see the same data order, crops and decoder initialisation. ``pretrained_path``:
    ``None`` runs the random arm only (the pre-trained column then reads "n/a"); a path that does
    not exist is an error. Real data: ``data_root`` and ``json_template`` such as
    ``"json_files/btcv/dataset_0_init_{n}.json"``. With ``resume=True`` (default) a run whose
    folder already holds a checkpoint with the same settings is continued or, when finished, reused.

    Returns ``{"runs": [{size, seed, arm, n_train, n_val, curve [[iteration, mean Dice]], final,
    best, per_organ, ...}], "table", "table_best", "per_organ_table", "paired", "paths"}``.
    Dice values are fractions in [0, 1]; the tables show percent.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else dict(cfg)
    if data_root and not json_template:
        raise ValueError("data_root is given but json_template is empty; e.g. json_files/btcv/dataset_0_init_{n}.json")
    if train_sizes is None:
        train_sizes = (6, 12, 24) if data_root else tuple(cfg["synth_train_sizes"])
    seeds = [0, 1] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    arms: list[str] = ["random"]
    if pretrained_path:
        if not os.path.isfile(str(pretrained_path)):
            raise FileNotFoundError(
                f"pre-trained checkpoint {pretrained_path} not found; run ssl_train.ipynb first or pass "
                "pretrained_path=None to run the random-initialisation arm only"
            )
        arms.append("pretrained")
    else:
        log("no pre-trained checkpoint given: only the random-initialisation arm runs")
    os.makedirs(logdir, exist_ok=True)
    plan = [(int(n), s, arm) for n in train_sizes for s in seeds for arm in arms]
    log(
        f"comparison: {len(plan)} runs ({len(list(train_sizes))} training-set sizes x {len(seeds)} seeds x "
        f"{len(arms)} arms), {cfg['ft_iterations']} iterations each, evaluation every {cfg['ft_eval_every']}"
    )
    runs: list[dict[str, Any]] = []
    paths = {"json": os.path.join(logdir, "results.json"), "table": os.path.join(logdir, "results_table.md")}
    t_all = time.perf_counter()
    for k, (n, seed, arm) in enumerate(plan, start=1):
        run_dir = compare_run_dir(logdir, n, seed, arm)
        run_cfg = dict(cfg, seed=seed)
        json_path = json_template.format(n=n) if data_root else None
        log(f"[{k}/{len(plan)}] {n} training volumes, seed {seed}, {ARM_LABELS[arm].lower()}")
        t0 = time.perf_counter()
        res = finetune(
            run_cfg,
            data_root=data_root,
            json_path=json_path,
            logdir=run_dir,
            pretrained_path=pretrained_path if arm == "pretrained" else None,
            use_pretrained=arm == "pretrained",
            resume="auto" if resume else False,
            device=device,
            progress=progress,
            seed=seed,
            cohort_root=cohort_root,
            n_train=n,
            log=lambda msg: log("    " + msg) if ("resumed" in msg or "new run" in msg) else None,
        )
        summary = _run_summary(res, n, seed, arm, time.perf_counter() - t0)
        del res
        runs.append(summary)
        log(
            f"    final mean Dice {100 * summary['final']:.2f}% (best {100 * summary['best']:.2f}% at iteration "
            f"{summary['best_iteration']}) in {summary['time_s']:.0f} s"
        )
        _write_json({"config": _jsonable(cfg), "runs": runs}, paths["json"])
    results: dict[str, Any] = {"runs": runs, "config": _jsonable(cfg), "seeds": seeds, "arms": arms}
    results["table"] = results_table_markdown(results, metric="final")
    results["table_best"] = results_table_markdown(results, metric="best")
    results["per_organ_table"] = per_organ_table_markdown(results, metric="final")
    results["paired"] = paired_summary(results, metric="final")
    results["paired_table"] = paired_table_markdown(results["paired"])
    results["paths"] = paths
    results["time_s"] = time.perf_counter() - t_all
    _write_json({k: v for k, v in results.items()}, paths["json"])
    with open(paths["table"] + ".tmp", "w") as f:
        f.write(comparison_report_markdown(results))
    os.replace(paths["table"] + ".tmp", paths["table"])
    log(f"comparison done in {results['time_s'] / 60:.1f} min; table in {paths['table']}")
    return results


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _by_size(results: dict[str, Any], metric: str) -> dict[int, dict[str, dict[int, float]]]:
    """``{size: {arm: {seed: value}}}`` and the validation counts, from the run list."""
    if metric not in ("final", "best"):
        raise ValueError(f"metric must be 'final' or 'best', got {metric!r}")
    out: dict[int, dict[str, dict[int, float]]] = {}
    for run in results["runs"]:
        out.setdefault(int(run["size"]), {a: {} for a in ARMS})[run["arm"]][int(run["seed"])] = float(run[metric])
    return dict(sorted(out.items()))


def _mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 2, unit: str = "") -> str:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float) * scale
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}f}{unit}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}{unit}"


def results_table_markdown(results: dict[str, Any], metric: str = "final") -> str:
    """The reference's table, one row per training-set size, Dice in % as mean ± sd over seeds::

        | Training Volumes | Validation Volumes | Random Init Dice | Pre-trained Dice | Relative Improvement |

    ``metric``: ``"final"`` (Dice after the full budget) or ``"best"`` (highest Dice over the
    evaluations, what the reference reports). Relative improvement is computed per seed
    (pre-trained / random - 1, paired) and then averaged. A missing arm reads "n/a".
    """
    n_val = {int(r["size"]): int(r["n_val"]) for r in results["runs"]}
    lines = [
        "| Training Volumes | Validation Volumes | Random Init Dice | Pre-trained Dice | Relative Improvement |",
        "|---|---|---|---|---|",
    ]
    for size, arms in _by_size(results, metric).items():
        rand, pre = arms["random"], arms["pretrained"]
        paired = [s for s in sorted(rand) if s in pre]
        rel = [(pre[s] / rand[s] - 1.0) for s in paired if rand[s] > 0]
        lines.append(
            f"| {size} | {n_val[size]} | {_mean_sd(list(rand.values()))} | {_mean_sd(list(pre.values()))} | "
            f"{_mean_sd(rel, unit='%') if rel else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def per_organ_table_markdown(results: dict[str, Any], metric: str = "final") -> str:
    """Dice per organ (%, mean over seeds), one column per training-set size and arm."""
    key = "per_organ" if metric == "final" else "per_organ_best"
    sizes = sorted({int(r["size"]) for r in results["runs"]})
    arms = [a for a in ARMS if any(r["arm"] == a for r in results["runs"])]
    organs: list[str] = []
    for r in results["runs"]:
        organs += [o for o in r[key] if o not in organs]
    header = "| Organ | " + " | ".join(f"{n} vol., {ARM_LABELS[a]}" for n in sizes for a in arms) + " |"
    lines = [header, "|---|" + "---|" * (len(sizes) * len(arms))]
    for organ in organs + ["mean (13 organs)"]:
        cells = []
        for n in sizes:
            for a in arms:
                sel = [r for r in results["runs"] if int(r["size"]) == n and r["arm"] == a]
                if organ == "mean (13 organs)":
                    vals = [r[metric] for r in sel]
                else:
                    vals = [r[key].get(organ, float("nan")) for r in sel]
                v = np.asarray([x for x in vals if math.isfinite(x)], dtype=float)
                cells.append(f"{100 * v.mean():.1f}" if v.size else "n/a")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_summary(results: dict[str, Any], metric: str = "final", level: float = 0.95) -> dict[int, dict[str, Any]]:
    """Per training-set size, the paired difference pre-trained - random over seeds (Dice
    fractions): ``ssl_utils.stats.paired_comparison``'s dict plus ``wins`` (seeds where the
    pre-trained arm is higher). Sizes without both arms are left out."""
    from .stats import paired_comparison

    out: dict[int, dict[str, Any]] = {}
    for size, arms in _by_size(results, metric).items():
        seeds = [s for s in sorted(arms["random"]) if s in arms["pretrained"]]
        if not seeds:
            continue
        a = [arms["random"][s] for s in seeds]
        b = [arms["pretrained"][s] for s in seeds]
        res = paired_comparison(a, b, level=level)
        res["seeds"] = seeds
        res["wins"] = int(sum(y > x for x, y in zip(a, b)))
        out[size] = res
    return out


def paired_table_markdown(paired: dict[int, dict[str, Any]]) -> str:
    """Markdown table of ``paired_summary``: mean paired difference in Dice points with its
    t interval, wins out of seeds, and the verdict the interval supports."""
    if not paired:
        return "(no paired runs: the pre-trained arm did not run)\n"
    lines = [
        "| Training Volumes | Seeds | Pre-trained - Random (Dice points) | 95% CI | Pre-trained higher | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for size, r in paired.items():
        lo, hi = r["t_ci"]
        ci = f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" if math.isfinite(lo) and math.isfinite(hi) else "n/a (one seed)"
        lines.append(
            f"| {size} | {r['n']} | {100 * r['mean_diff']:+.2f} | {ci} | {r['wins']} of {r['n']} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_report_markdown(results: dict[str, Any]) -> str:
    """The full Markdown report ``compare_init`` writes: main table (final Dice), the same with
    the best Dice over evaluations, the paired differences, and the per-organ table."""
    cfg = results.get("config", {})
    seeds = results.get("seeds", [])
    return (
        f"Validation Dice (%), mean ± sd over {len(seeds)} seed(s) {list(seeds)}, after "
        f"{cfg.get('ft_iterations', '?')} iterations (preset {cfg.get('preset', 'custom')}).\n\n"
        + results["table"]
        + "\nBest Dice over the evaluations (the reference's convention; selected on the validation set):\n\n"
        + results["table_best"]
        + "\nPaired by seed (same data order, crops and decoder initialisation):\n\n"
        + results["paired_table"]
        + "\nPer organ (%, final, mean over seeds):\n\n"
        + results["per_organ_table"]
    )
