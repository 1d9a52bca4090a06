"""Self-supervised pre-training (single process or DDP under torchrun: the same code).

``pretrain(cfg, data_root, json_path, logdir)`` reads and checks the datalist, caches the
deterministic transforms, trains ``ViTAutoEnc`` on two corrupted views per crop with the
reference's loss ``r + c * r`` (one ``ssl_utils.engine.train_step`` per batch), validates on
fixed-seed views under ``no_grad``, and writes ``best_model.pt`` / ``last_model.pt``
(atomically), ``history.json`` / ``history.csv`` and, optionally, TensorBoard scalars under
``logdir``.

Inside a ``torch.distributed`` process group each rank caches only its own shard of the data,
metrics are all-reduced, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .config import ARCH_KEYS, Config, config_differences, get_config
from .datasets import SeededCacheDataset, mix_seed, plain_tensor, pretrain_data
from .distributed import all_reduce_mean, all_reduce_sum, barrier, is_main, rank, run_on_main, world_size, wrap_ddp
from .engine import Result, RunState, TrainingDiverged, check_finite, check_weights_finite, setup_run, train_step
from .io import write_csv, write_json
from .losses import ssl_loss
from .mae import build_mae, evaluate_mae, mae_forward
from .models import build_vitautoenc
from .runtime import Precision, lr_lambda, optimizer_kwargs
from .speedups import apply_speedups

__all__ = ["pretrain", "PretrainResult", "ssl_forward", "Pretext", "pretext_of", "reference_baseline", "ssl_precision", "evaluate_ssl", "reconstruction_baselines", "TrainingDiverged", "resolve_ssl_data"]

BEST_NAME = "best_model.pt"
LAST_NAME = "last_model.pt"
_COUNTERS = ("epoch", "history", "best_val_loss", "best_probe_dice", "probe_dice_init")


@dataclass
class PretrainResult(Result):
    """What ``pretrain`` returns (also readable as ``result["history"]`` etc.)."""

    history: list[dict[str, Any]]
    best: str  # path of best_model.pt
    last: str  # path of last_model.pt
    logdir: str
    model: nn.Module  # the plain ViTAutoEnc, last weights
    config: Config
    last_epoch: int
    val_dataset: SeededCacheDataset
    train_dataset: SeededCacheDataset
    precision: Precision


@dataclass
class _Data:
    train_ds: SeededCacheDataset
    val_ds: SeededCacheDataset
    train_loader: Any
    val_loader: Any
    sampler: Any
    n_train: int
    n_val: int


def resolve_ssl_data(
    cfg: Mapping[str, Any], data_root: str | None, json_path: str | None, cohort_root: str = "data/synthetic"
) -> tuple[str, str]:
    """``(data_root, json_path)`` for pre-training; an empty ``data_root`` means the embedded cohort
    (generated under ``cohort_root`` on first use, reused afterwards)."""
    if data_root:
        if not json_path:
            raise ValueError("json_path is required when data_root is given (e.g. json_files/tcia_covid19/dataset_split.json)")
        return str(data_root), str(json_path)
    from .synthetic import make_cohort_from_config

    info = make_cohort_from_config(cfg, cohort_root) if is_main() else None  # rank 0 generates (or reuses)
    barrier()
    if info is None:  # the other ranks wait for it, then reuse its files
        info = make_cohort_from_config(cfg, cohort_root, progress=False)
    return info["tcia_root"], info["tcia_json"]


def ssl_forward(
    model: nn.Module, batch: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], precision: Precision, gather: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of both views; returns (total, recon, contrastive, recon_1, recon_2).

    The two views go through the network in one batch (``[2B, 1, roi^3]``), which is what the
    reference does in two calls; the result is the same, the kernels are larger.
    """
    v1, v2, gt = (plain_tensor(batch[k]).to(precision.device, non_blocking=True) for k in ("image", "image_2", "gt_image"))
    n = v1.shape[0]
    with precision.autocast():
        recon, _ = model(torch.cat([v1, v2], dim=0))
    recon = recon.float()
    r1, r2 = recon[:n], recon[n:]
    total, r, c = ssl_loss(r1, r2, gt, temperature=cfg["temperature"], gather=gather)
    return total, r, c, r1, r2


# history keys of one validation pass, in the order ``evaluate_ssl`` sums them
VAL_KEYS = ("val_recon", "val_recon_2", "val_contrastive", "val_total", "val_const_l1", "val_copy_l1_1", "val_copy_l1_2")


def reconstruction_baselines(view_1: torch.Tensor, view_2: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The L1 a model must beat, per crop: ``[B, 3]`` = (predicting each crop's mean intensity,
    copying view 1, copying view 2), each the mean absolute difference to the clean crop.

    A reconstruction worse than the copy has undone nothing of the corruption; one no better than
    the constant has learned nothing of the crop's layout.
    """
    clean = clean.float().flatten(1)
    const = (clean - clean.mean(dim=1, keepdim=True)).abs().mean(dim=1)
    copy_1 = (view_1.float().flatten(1) - clean).abs().mean(dim=1)
    copy_2 = (view_2.float().flatten(1) - clean).abs().mean(dim=1)
    return torch.stack([const, copy_1, copy_2], dim=1)


@torch.no_grad()
def evaluate_ssl(model: nn.Module, loader, cfg: Mapping[str, Any], precision: Precision) -> dict[str, float]:
    """Validation on the fixed-seed views: reconstruction L1 of each view (``val_recon`` is view 1,
    the reference's ``r``), contrastive and total loss, and on the same views the baselines of
    ``reconstruction_baselines`` (``val_const_l1``, ``val_copy_l1_1``, ``val_copy_l1_2``).
    All-reduced over ranks; each batch weighted by its number of crops. The model's train/eval
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(VAL_KEYS) + 1, dtype=torch.float64, device=precision.device)
    for batch in loader:
        v1, v2, gt = (plain_tensor(batch[k]).to(precision.device) for k in ("image", "image_2", "gt_image"))
        total, r, c, r1, r2 = ssl_forward(model, {"image": v1, "image_2": v2, "gt_image": gt}, cfg, precision)
        n = float(v1.shape[0])
        recon_2 = (r2 - gt.float()).abs().mean()
        base = reconstruction_baselines(v1, v2, gt).double().mean(dim=0)
        means = torch.stack([r.double(), recon_2.double(), c.double(), total.double(), *base])
        sums += torch.cat([means * n, torch.tensor([n], dtype=torch.float64, device=sums.device)])
    sums = all_reduce_sum(sums)
    model.train(was_training)
    count = max(sums[-1].item(), 1.0)
    return {k: sums[i].item() / count for i, k in enumerate(VAL_KEYS)}


def check_resumable(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: str) -> None:
    """Raise ``CheckpointError`` naming the settings that differ when a checkpoint comes from
    another model configuration (or the other pretext)."""
    saved = dict(ckpt.get("config") or {})
    if saved:
        saved.setdefault("pretext", "views")  # checkpoints from before the setting existed
    keys = ARCH_KEYS + ("pretext",) + (MAE_ARCH_KEYS if cfg["pretext"] == "mae" else ())
    diffs = config_differences(saved, cfg, keys) if saved else []
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with other settings: " + "; ".join(diffs))


def _resume_checkpoint(resume: bool, path: str, cfg: Config, say: Callable[[str], None]) -> dict | None:
    if not resume:
        return None
    if not os.path.exists(path):
        say(f"resume requested but {path} does not exist: starting from scratch")
        return None
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, cfg, path)
    return ckpt


def _load_data(cfg: Config, data_root, json_path, cohort_root, skip_bad: bool, progress: bool, say,
               device: torch.device) -> _Data:
    """Every datalist entry's header checked (split across ranks), this rank's shard read once into
    its cache with the content checked on that read (``ssl_utils.datasets.pretrain_data``), loaders."""
    from monai.data import DataLoader
    from torch.utils.data import DistributedSampler

    data_root, json_path = resolve_ssl_data(cfg, data_root, json_path, cohort_root)
    train_ds, val_ds, n_train, n_val = pretrain_data(cfg, json_path, data_root, skip_bad=skip_bad, progress=progress, log=say)
    sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=mix_seed(cfg["seed"], rank()))
    kw = dict(batch_size=cfg["ssl_batch_size"], num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    return _Data(train_ds, val_ds, DataLoader(train_ds, sampler=sampler, **kw), DataLoader(val_ds, shuffle=False, **kw),
                 sampler, n_train, n_val)


def _probe_monitor(cfg: Config, probe_json, probe_data_root, data_root, cohort_root, precision: Precision, say):
    """``(monitor, probing)``: whether the probe monitor runs (the same answer on every rank) and,
    on rank 0, the ``ProbeMonitor`` (its datalist checked on rank 0, the verdict shared, so a bad
    one stops every rank before training); other ranks get ``None``.

    With ``probe_every`` > 0 on the user's own unlabeled data and no ``probe_json``, there is
    nothing to probe with: the monitor is off, with a line saying how to turn it on, unless
    ``select_by="probe"`` asks for it (then ``monitor_entries`` raises, before any training)."""
    if not cfg["probe_every"]:
        return None, False
    from .monitor import ProbeMonitor, monitor_entries, no_labeled_data

    if no_labeled_data(probe_json, data_root, cohort_root) and cfg["select_by"] != "probe":
        say(f"probe monitor off: pre-training on {data_root} with no labeled datalist to probe with; pass "
            "probe_json (and probe_data_root) to score the encoder every probe_every epochs, or set probe_every=0")
        return None, False
    fit, score, path = run_on_main(lambda: monitor_entries(cfg, probe_json, probe_data_root, data_root, cohort_root))
    if not is_main():
        return None, True
    monitor = ProbeMonitor(cfg, fit, score, precision, source=path)
    say(f"probe monitor: every {cfg['probe_every']} epochs, {monitor!r}")
    return monitor, True


def _probe_row(state: RunState, monitor) -> dict[str, float]:
    """Rank 0 scores the encoder, every rank gets the numbers (the others wait)."""
    return run_on_main(lambda: monitor.score(state.model))


def _is_best(state: RunState, row: Mapping[str, Any]) -> bool:
    """Update the best scores with this epoch's row; True when it makes this epoch ``best_model.pt``."""
    best = False
    if "val_recon" in row:
        best = row["val_recon"] < state["best_val_loss"]
        state["best_val_loss"] = min(row["val_recon"], state["best_val_loss"])
    if state.config["select_by"] == "probe":
        best = "probe_dice" in row and row["probe_dice"] > state["best_probe_dice"]
    if "probe_dice" in row:
        state["best_probe_dice"] = max(row["probe_dice"], state["best_probe_dice"])
    return best


def ssl_amp(cfg: Mapping[str, Any]) -> str | bool:
    """Pre-training's mixed-precision setting: ``ssl_amp``, or ``amp`` when it is ``"same"``."""
    return cfg["amp"] if cfg["ssl_amp"] == "same" else cfg["ssl_amp"]


def ssl_precision(cfg: Mapping[str, Any], device: torch.device) -> Precision:
    """The ``Precision`` pre-training runs in on ``device`` (for a forward pass outside ``pretrain``)."""
    from .runtime import amp_dtype

    return Precision(device, amp_dtype(device, ssl_amp(cfg)))


def pretrain_optimizer(model: nn.Module, cfg: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The reference's Adam (``ssl_lr``, ``ssl_weight_decay``), fused where PyTorch has a kernel."""
    return torch.optim.Adam(model.parameters(), lr=cfg["ssl_lr"], weight_decay=cfg["ssl_weight_decay"],
                            **optimizer_kwargs(device))


# the MAE's decoder settings: a checkpoint resumes only with the same ones
MAE_ARCH_KEYS = ("mae_decoder_hidden", "mae_decoder_mlp", "mae_decoder_layers", "mae_decoder_heads")


def reference_baseline(row: Mapping[str, Any]) -> tuple[str, float] | None:
    """The baseline a validation row's ``val_recon`` is read against: the L1 of predicting each crop's
    mean (two views), or the masked-patch loss of predicting each masked patch's own mean (MAE)."""
    for key in ("val_const_l1", "val_patch_mean"):
        if row.get(key):
            return key, float(row[key])
    return None


def _build_state(cfg: Config, precision: Precision, steps_per_epoch: int) -> RunState:
    """The pretext's network (initialised from the seed), Adam, the warm-up / cosine schedule."""
    torch.manual_seed(cfg["seed"])
    model = apply_speedups(pretext_of(cfg).build(cfg), cfg, precision.device)
    optimizer = pretrain_optimizer(model, cfg, precision.device)
    schedule = lr_lambda(cfg["warmup_epochs"] * steps_per_epoch, cfg["ssl_epochs"] * steps_per_epoch, cfg["cosine"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    counters = {"epoch": 0, "history": [], "best_val_loss": float("inf"), "best_probe_dice": -1.0, "probe_dice_init": None}
    return RunState(model, optimizer, precision, cfg, scheduler, cfg["grad_clip"], counters)


def train_epoch(state: RunState, train_model: nn.Module, data: _Data, epoch: int, gather: bool, progress: bool,
                last_good: str) -> dict[str, Any]:
    """One epoch of ``train_step``s; returns the epoch's row of the history (all-reduced means).
    Every source of randomness is a function of (seed, epoch, rank): resumable bitwise."""
    from tqdm.auto import tqdm

    cfg, dev = state.config, state.precision.device
    torch.manual_seed(mix_seed(cfg["seed"], epoch, rank()))
    data.train_ds.set_epoch(epoch)
    data.sampler.set_epoch(epoch)
    state.model.train()
    t0, n_crops, steps = time.perf_counter(), 0, len(data.train_loader)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    forward = pretext_of(cfg).forward
    check_every = 1 if dev.type == "cpu" else 10  # a check reads the value on the host: a sync on GPU
    bar = tqdm(data.train_loader, desc=f"epoch {epoch}/{cfg['ssl_epochs']}", leave=False, disable=not progress)
    for step, batch in enumerate(bar, start=1):
        values = train_step(state, lambda: forward(train_model, batch, cfg, state.precision, gather)[:3])
        sums += values
        n_crops += batch["image"].shape[0]
        if step % check_every == 0 or step == steps:
            check_finite(values, f"epoch {epoch}, step {step}", last_good)
            bar.set_postfix(loss=f"{values[0].item():.4f}", lr=f"{state.scheduler.get_last_lr()[0]:.2e}")
    means = all_reduce_mean(sums / max(steps, 1))
    check_finite(means, f"epoch {epoch}", last_good)
    elapsed = time.perf_counter() - t0
    pairs = all_reduce_sum(torch.tensor(float(n_crops), device=dev)).item()
    return {
        "epoch": epoch, "train_total": means[0].item(), "train_recon": means[1].item(),
        "train_contrastive": means[2].item(), "lr": state.scheduler.get_last_lr()[0],
        "epoch_time_s": elapsed, "crop_pairs_per_s": pairs / max(elapsed, 1e-9),
    }


def _epoch_message(row: Mapping[str, Any], total: int, is_best: bool) -> str:
    msg = (
        f"epoch {row['epoch']}/{total} loss {row['train_total']:.4f} (recon {row['train_recon']:.4f}, "
        f"contrastive {row['train_contrastive']:.4f}) {row['crop_pairs_per_s']:.1f} crop pairs/s"
    )
    if "val_recon" in row:
        msg += (
            f" | val L1 {row['val_recon']:.4f} / {row['val_recon_2']:.4f} (constant {row['val_const_l1']:.4f}, "
            f"copy {row['val_copy_l1_1']:.4f} / {row['val_copy_l1_2']:.4f}) contrastive {row['val_contrastive']:.4f}"
        )
    if "probe_dice" in row:
        msg += f" | probe Dice {row['probe_dice']:.4f} (untrained encoder {row['probe_dice_init']:.4f})"
    return msg + (" (best)" if is_best else "")


def _mae_message(row: Mapping[str, Any], total: int, is_best: bool) -> str:
    msg = f"epoch {row['epoch']}/{total} masked-patch loss {row['train_recon']:.4f} {row['crop_pairs_per_s']:.1f} crops/s"
    if "val_recon" in row:
        msg += (f" | val {row['val_recon']:.4f} (each patch's own mean {row['val_patch_mean']:.4f}, "
                f"mean visible patch {row['val_visible_mean']:.4f})")
    if "probe_dice" in row:
        msg += f" | probe Dice {row['probe_dice']:.4f} (untrained encoder {row['probe_dice_init']:.4f})"
    return msg + (" (best)" if is_best else "")


@dataclass(frozen=True)
class Pretext:
    """What differs between the pretexts; the loop, resume, validation schedule, probe monitor and
    checkpoints are shared. ``forward(model, batch, cfg, precision, gather)`` returns ``(total,
    reconstruction term, contrastive term, ...)``; ``evaluate`` the validation row; ``message`` an epoch's
    log line."""

    build: Callable[[Mapping[str, Any]], nn.Module]
    forward: Callable[..., tuple]
    evaluate: Callable[..., dict[str, float]]
    message: Callable[[Mapping[str, Any], int, bool], str]


def pretext_of(cfg: Mapping[str, Any]) -> Pretext:
    """``cfg["pretext"]``'s parts: two views (``ViTAutoEnc``, ``ssl_forward``, ``evaluate_ssl``) or the masked
    autoencoder (``ssl_utils.mae``: ``MaskedAutoEncoderViT``, ``mae_forward``, ``evaluate_mae``)."""
    if cfg["pretext"] == "mae":
        return Pretext(build_mae, mae_forward, evaluate_mae, _mae_message)
    return Pretext(build_vitautoenc, ssl_forward, evaluate_ssl, _epoch_message)


def _tensorboard(tensorboard: bool | str, logdir: str):
    if not tensorboard or not is_main():
        return None
    from torch.utils.tensorboard import SummaryWriter

    folder = tensorboard if isinstance(tensorboard, (str, os.PathLike)) else os.path.join(logdir, "tensorboard")
    return SummaryWriter(log_dir=os.fspath(folder))


def _write_epoch(state: RunState, logdir: str, is_best: bool, writer) -> None:
    """Rank 0: best (when it is), last, the history files and TensorBoard scalars."""
    paths = [os.path.join(logdir, BEST_NAME)] if is_best else []
    state.save(*paths, os.path.join(logdir, LAST_NAME))
    write_json(os.path.join(logdir, "history.json"), state["history"])
    write_csv(os.path.join(logdir, "history.csv"), state["history"])
    if writer is not None:
        row = state["history"][-1]
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(k, v, row["epoch"])


def pretrain(
    cfg: Mapping[str, Any] | str = "demo",
    data_root: str | None = None,
    json_path: str | None = None,
    logdir: str = "runs/ssl",
    resume: bool = False,
    device: str | torch.device | None = None,
    epochs: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    tensorboard: bool | str = False,
    skip_bad: bool = False,
    global_negatives: bool = False,
    num_workers: int | None = None,
    cohort_root: str = "data/synthetic",
    probe_json: str | None = None,
    probe_data_root: str | None = None,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Pre-train ``ViTAutoEnc`` with the two-view SSL recipe.

    ``cfg``: a preset name or a config. ``epochs`` / ``num_workers`` override ``ssl_epochs`` /
    ``num_workers``. ``stop_after``: stop (as if interrupted) after this epoch; ``resume=True``
    continues from ``logdir/last_model.pt`` and ends with the same weights as an uninterrupted run.
    ``tensorboard``: ``True`` writes scalars under ``logdir/tensorboard``, a path writes them there.
    ``probe_json`` / ``probe_data_root``: the labeled datalist of the probe monitor (``probe_every``
    > 0; default: the embedded cohort's; on your own unlabeled data without it the monitor is off);
    see ``ssl_utils.monitor``.
    ``on_epoch_end(epoch, row)``: called on every rank after each epoch's checkpoint is written.
    """
    cfg = get_config(cfg, ssl_epochs=epochs, num_workers=num_workers)
    precision = setup_run(cfg, device, amp=ssl_amp(cfg))
    main, say = is_main(), (log if is_main() else (lambda *_: None))
    os.makedirs(logdir, exist_ok=True)
    last_path = os.path.join(logdir, LAST_NAME)
    ckpt = _resume_checkpoint(resume, last_path, cfg, say)  # read and checked before any expensive work
    data = _load_data(cfg, data_root, json_path, cohort_root, skip_bad, progress and main, say, precision.device)
    state = _build_state(cfg, precision, len(data.train_loader))
    if ckpt is not None:
        state.restore(ckpt, _COUNTERS)
        say(f"resumed from {last_path} (epoch {state['epoch']} done); continuing at epoch {state['epoch'] + 1}")
    monitor, probing = _probe_monitor(cfg, probe_json, probe_data_root, data_root, cohort_root, precision, say)
    if probing and state["probe_dice_init"] is None:  # the untrained encoder: the line to rise above
        state["probe_dice_init"] = _probe_row(state, monitor)["probe_dice"]
        say(f"probe monitor: untrained encoder, mean Dice {state['probe_dice_init']:.4f}")
    train_model = wrap_ddp(torch.compile(state.model) if cfg["compile"] else state.model, precision.device)
    gather = bool(global_negatives) and world_size() > 1
    writer = _tensorboard(tensorboard, logdir)
    total = cfg["ssl_epochs"]
    say(
        f"pre-training: preset={cfg['preset']} pretext={cfg['pretext']} world_size={world_size()} device={precision.device} "
        f"precision={precision.name} sdpa={cfg['sdpa']} roi={cfg['roi']} hidden={cfg['hidden_size']} | "
        f"{data.n_train} train / {data.n_val} val volumes, {cfg['ssl_batch_size']}x{cfg['ssl_num_samples']} crops "
        f"per step per rank, {len(data.train_loader)} steps per epoch, epochs {state['epoch'] + 1}..{total}"
    )
    for epoch in range(state["epoch"] + 1, total + 1):
        if stop_after is not None and epoch > stop_after:
            break
        row = train_epoch(state, train_model, data, epoch, gather, progress and main, last_path)
        if epoch % cfg["ssl_val_every"] == 0 or epoch == total:
            row.update(pretext_of(cfg).evaluate(state.model, data.val_loader, cfg, precision))
            check_finite(torch.tensor([row["val_recon"], row["val_total"]]), f"epoch {epoch} (validation)",
                         last_path, what="the validation loss")
        if probing and (epoch % cfg["probe_every"] == 0 or epoch == total):
            row.update(_probe_row(state, monitor), probe_dice_init=state["probe_dice_init"])
        is_best = _is_best(state, row)
        check_weights_finite(state.model, f"epoch {epoch}", last_path)  # a diverged model is never saved
        state["history"].append(row)
        state["epoch"] = epoch
        if main:
            _write_epoch(state, logdir, is_best, writer)
            say(pretext_of(cfg).message(row, total, is_best))
        barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    if writer is not None:
        writer.close()
    return PretrainResult(state["history"], os.path.join(logdir, BEST_NAME), last_path, logdir, state.model, cfg,
                          state["epoch"], data.val_ds, data.train_ds, precision)
