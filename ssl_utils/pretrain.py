"""Self-supervised pre-training loop (single process or DDP under torchrun: the same code).

``pretrain(cfg, data_root, json_path, logdir)`` reads and checks the datalist, caches the
deterministic transforms, trains ``ViTAutoEnc`` on two corrupted views per crop with the
reference's loss ``r + c * r``, validates on fixed-seed views under ``no_grad``, and writes
``best_model.pt`` / ``last_model.pt`` (atomically), ``history.json`` / ``history.csv`` and,
optionally, TensorBoard scalars under ``logdir``.

Inside a ``torch.distributed`` process group each rank caches only its own shard of the data,
metrics are all-reduced, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import ARCH_KEYS, get_config
from .datasets import mix_seed, pretrain_datasets
from .losses import ssl_loss
from .models import build_vitautoenc, unwrap_model
from .runtime import (
    Precision,
    all_reduce_mean,
    all_reduce_sum,
    amp_dtype,
    barrier,
    config_differences,
    configure_cpu,
    is_main,
    lr_lambda,
    optimizer_kwargs,
    rank,
    seed_everything,
    select_device,
    world_size,
    wrap_ddp,
)

BEST_NAME = "best_model.pt"
LAST_NAME = "last_model.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf. The message names the epoch and step."""


def resolve_ssl_data(
    cfg: dict[str, Any], data_root: str | None, json_path: str | None, cohort_root: str = "data/synthetic"
) -> tuple[str, str]:
    """``(data_root, json_path)`` for pre-training; an empty ``data_root`` means the embedded cohort
    (generated under ``cohort_root`` on first use, reused afterwards)."""
    if data_root:
        if not json_path:
            raise ValueError("json_path is required when data_root is given (e.g. json_files/tcia_covid19/dataset_split.json)")
        return str(data_root), str(json_path)
    from .synthetic import make_cohort_from_config

    if world_size() > 1:  # one rank generates, the others wait and reuse
        if is_main():
            info = make_cohort_from_config(cfg, cohort_root)
        barrier()
        if not is_main():
            info = make_cohort_from_config(cfg, cohort_root, progress=False)
    else:
        info = make_cohort_from_config(cfg, cohort_root)
    return info["tcia_root"], info["tcia_json"]


def shard(entries: list, rank_: int, world: int, seed: int, pad: bool) -> list:
    """This rank's share of ``entries``: a seeded shuffle split in ``world`` parts; with ``pad``
    every part has the same length (entries repeated), so every rank runs the same number of steps."""
    if world == 1:
        return list(entries)
    from monai.data import partition_dataset

    entries = list(entries)
    if len(entries) < world:  # fewer volumes than processes (partition_dataset refuses)
        if not pad:
            return entries[rank_:rank_ + 1]  # one each for the first ranks, none for the others
        entries = [entries[i % len(entries)] for i in range(world)]
    return partition_dataset(entries, num_partitions=world, shuffle=True, seed=seed, even_divisible=pad)[rank_]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of a MONAI ``MetaTensor`` (no per-operation metadata tracking
    through the network: the loop does not need it, and on CPU it costs more than the small ops)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def ssl_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: dict[str, Any], precision: Precision, gather: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass of both views; returns (total, recon, contrastive, recon_1, recon_2).

    The two views go through the network in one batch (``[2B, 1, roi^3]``), which is what the
    reference does in two calls; the result is the same, the kernels are larger.
    """
    device = precision.device
    v1, v2, gt = (_plain(batch[k]).to(device, non_blocking=True) for k in ("image", "image_2", "gt_image"))
    n = v1.shape[0]
    with precision.autocast():
        recon, _ = model(torch.cat([v1, v2], dim=0))
    recon = recon.float()
    r1, r2 = recon[:n], recon[n:]
    total, r, c = ssl_loss(r1, r2, gt, temperature=cfg["temperature"], gather=gather)
    return total, r, c, r1, r2


@torch.no_grad()
def evaluate_ssl(
    model: nn.Module, loader, cfg: dict[str, Any], precision: Precision, epoch: int = 0
) -> dict[str, float]:
    """Validation on the fixed-seed views: mean L1 reconstruction, contrastive and total loss
    (all-reduced over ranks; each batch weighted by its number of crops). The model's
    train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=precision.device)
    for batch in loader:
        total, r, c, _, _ = ssl_forward(model, batch, cfg, precision, gather=False)
        n = batch["image"].shape[0]
        sums += torch.stack([r.double() * n, c.double() * n, total.double() * n, torch.tensor(float(n), device=sums.device, dtype=torch.float64)])
    sums = all_reduce_sum(sums)
    model.train(was_training)
    count = max(sums[3].item(), 1.0)
    return {"val_recon": sums[0].item() / count, "val_contrastive": sums[1].item() / count, "val_total": sums[2].item() / count}


def _write_history(history: list[dict], logdir: str) -> None:
    with open(os.path.join(logdir, "history.json.tmp"), "w") as f:
        json.dump(history, f, indent=1)
    os.replace(os.path.join(logdir, "history.json.tmp"), os.path.join(logdir, "history.json"))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(os.path.join(logdir, "history.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(os.path.join(logdir, "history.csv.tmp"), os.path.join(logdir, "history.csv"))


def check_resumable(ckpt: dict[str, Any], cfg: dict[str, Any], path: str) -> None:
    """Raise ``CheckpointError`` naming the settings that differ when a checkpoint comes from
    another model configuration."""
    saved = ckpt.get("config") or {}
    diffs = config_differences(saved, cfg, ARCH_KEYS) if saved else []
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with other settings: " + "; ".join(diffs))


def pretrain(
    cfg: dict[str, Any] | str = "demo",
    data_root: str | None = None,
    json_path: str | None = None,
    logdir: str = "runs/ssl",
    resume: bool = False,
    device: str | None = None,
    epochs: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    tensorboard: bool | str = False,
    skip_bad: bool = False,
    global_negatives: bool = False,
    num_workers: int | None = None,
    cohort_root: str = "data/synthetic",
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Pre-train ``ViTAutoEnc`` with the two-view SSL recipe. Returns ``{"history", "best", "last", ...}``.

    ``cfg``: a preset name or a config dict. ``epochs`` overrides ``cfg["ssl_epochs"]``.
    ``stop_after``: stop (as if interrupted) after this epoch; ``resume=True`` continues from
    ``logdir/last_model.pt`` and ends with the same weights as an uninterrupted run.
    ``tensorboard``: ``True`` writes scalars under ``logdir/tensorboard``, a path writes them there.
    ``on_epoch_end(epoch, row)``: called on every rank after each epoch's checkpoint is written.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else dict(cfg)
    if epochs is not None:
        cfg["ssl_epochs"] = int(epochs)
    if num_workers is not None:
        cfg["num_workers"] = int(num_workers)
    rank_, world = rank(), world_size()
    main = rank_ == 0
    dev = select_device(device)
    if dev.type == "cpu":
        configure_cpu()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    precision = Precision(dev, amp_dtype(dev, cfg["amp"]))
    seed_everything(cfg["seed"], cfg.get("deterministic", False))
    os.makedirs(logdir, exist_ok=True)
    last_path, best_path = os.path.join(logdir, LAST_NAME), os.path.join(logdir, BEST_NAME)

    # ---- resume: read and check before any expensive work ----
    ckpt = None
    if resume:
        if os.path.exists(last_path):
            ckpt = load_checkpoint(last_path)
            check_resumable(ckpt, cfg, last_path)
        elif main:
            log(f"resume requested but {last_path} does not exist: starting from scratch")

    # ---- data: read, check every entry, shard, cache ----
    from .data import preflight_datalist

    data_root, json_path = resolve_ssl_data(cfg, data_root, json_path, cohort_root)
    # every file of both keys checked once, every problem listed at once; under DDP rank 0 checks
    # and the other ranks receive its verdict instead of reading every file again
    checked, error = None, None
    if main:
        try:
            checked = preflight_datalist(
                json_path, data_root, keys=("training", "validation"), window=(cfg["ssl_a_min"], cfg["ssl_a_max"]),
                skip_bad=skip_bad, progress=progress, log=log,
            )
        except Exception as exc:
            if world == 1:
                raise
            error = exc
    if world > 1:
        import torch.distributed as dist

        shared = [checked, None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(shared, src=0)
        checked, failure = shared
        if error is not None:
            raise error
        if failure is not None:
            from .data import DatalistError

            raise DatalistError(failure[1]) if failure[0] == "DatalistError" else RuntimeError(failure[1])
    train_entries, val_entries = checked["training"], checked["validation"]
    train_local = shard(train_entries, rank_, world, cfg["seed"], pad=True)
    val_local = shard(val_entries, rank_, world, cfg["seed"], pad=False)
    train_ds, val_ds = pretrain_datasets(cfg, train_local, val_local, progress=progress and main)
    if world > 1:  # item i of every rank's shard would otherwise get the same crops and holes
        train_ds.seed = mix_seed(cfg["seed"], rank_)

    from monai.data import DataLoader
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=mix_seed(cfg["seed"], rank_))
    nw = int(cfg.get("num_workers", 0))
    loader_kw = dict(num_workers=nw, pin_memory=dev.type == "cuda", persistent_workers=False)
    train_loader = DataLoader(train_ds, batch_size=cfg["ssl_batch_size"], sampler=sampler, **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=cfg["ssl_batch_size"], shuffle=False, **loader_kw)

    # ---- model, optimiser, schedule ----
    torch.manual_seed(cfg["seed"])
    model = build_vitautoenc(cfg).to(dev)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg["ssl_lr"], weight_decay=cfg.get("ssl_weight_decay", 0.0), **optimizer_kwargs(dev)
    )
    steps_per_epoch = len(train_loader)
    total_epochs = int(cfg["ssl_epochs"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg["warmup_epochs"] * steps_per_epoch, total_epochs * steps_per_epoch, cfg["cosine"])
    )
    history: list[dict[str, Any]] = []
    best_val = float("inf")
    start_epoch = 1
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            precision.scaler.load_state_dict(ckpt["scaler"])
        history = list(ckpt.get("history", []))
        best_val = float(ckpt.get("best_val_loss", float("inf")))
        start_epoch = int(ckpt["epoch"]) + 1
        restore_rng_state(ckpt.get("rng"))
        if main:
            log(f"resumed from {last_path} (epoch {ckpt['epoch']} done); continuing at epoch {start_epoch}")

    train_model: nn.Module = model
    if cfg.get("compile"):
        train_model = torch.compile(train_model)
    train_model = wrap_ddp(train_model, dev)  # DDP inside a process group, else unchanged
    gather = bool(global_negatives) and world > 1

    writer = None
    if tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = tensorboard if isinstance(tensorboard, (str, os.PathLike)) else os.path.join(logdir, "tensorboard")
        writer = SummaryWriter(log_dir=os.fspath(tb_dir))

    if main:
        log(
            f"pre-training: preset={cfg.get('preset', 'custom')} world_size={world} device={dev} "
            f"precision={precision.name} sdpa={cfg.get('sdpa', True)} roi={cfg['roi']} "
            f"hidden={cfg['hidden_size']} | {len(train_entries)} train / {len(val_entries)} val volumes, "
            f"{cfg['ssl_batch_size']}x{cfg['ssl_num_samples']} crops per step per rank, "
            f"{steps_per_epoch} steps per epoch, epochs {start_epoch}..{total_epochs}"
        )

    from tqdm.auto import tqdm

    def checkpoint_dict(epoch: int) -> dict[str, Any]:
        return {
            "state_dict": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict(),
            "rng": capture_rng_state(),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "history": history,
            "best_val_loss": best_val,
        }

    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, total_epochs + 1):
        if stop_after is not None and epoch > stop_after:
            break
        # every source of randomness is a function of (seed, epoch, rank): resumable bitwise
        torch.manual_seed(mix_seed(cfg["seed"], epoch, rank_))
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=dev)
        step_losses = []
        n_crops = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{total_epochs}", leave=False, disable=not (progress and main))
        for step, batch in enumerate(bar, start=1):
            optimizer.zero_grad(set_to_none=True)  # before the forward: the old gradients are not kept alongside the activations
            total, r, c, _, _ = ssl_forward(train_model, batch, cfg, precision, gather=gather)
            precision.scaler.scale(total).backward()
            if cfg.get("grad_clip"):
                precision.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            precision.scaler.step(optimizer)
            precision.scaler.update()
            scheduler.step()
            detached = torch.stack([total.detach(), r.detach(), c.detach()]).double()
            sums += detached
            step_losses.append(detached[0])
            n_crops += batch["image"].shape[0]
            if dev.type == "cpu" or step % 10 == 0 or step == steps_per_epoch:  # .item() syncs on GPU
                value = total.item()
                if value != value or value in (float("inf"), float("-inf")):
                    raise TrainingDiverged(
                        f"loss is {value} at epoch {epoch}, step {step}; training stopped. "
                        f"The last good checkpoint is {last_path if os.path.exists(last_path) else '(none yet)'}; "
                        "'best' was not overwritten. Try a lower learning rate or amp='off'."
                    )
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        steps_done = max(len(step_losses), 1)
        means = all_reduce_mean(sums / steps_done)
        if not torch.isfinite(means).all():
            bad = next(i for i, v in enumerate(step_losses, start=1) if not torch.isfinite(v))
            raise TrainingDiverged(f"loss is not finite at epoch {epoch}, step {bad}; training stopped; 'best' not overwritten")
        elapsed = time.perf_counter() - t0
        pairs = all_reduce_sum(torch.tensor(float(n_crops), device=dev)).item()
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_total": means[0].item(),
            "train_recon": means[1].item(),
            "train_contrastive": means[2].item(),
            "lr": scheduler.get_last_lr()[0],
            "epoch_time_s": elapsed,
            "crop_pairs_per_s": pairs / max(elapsed, 1e-9),
        }
        is_best = False
        if epoch % int(cfg["ssl_val_every"]) == 0 or epoch == total_epochs:
            row.update(evaluate_ssl(model, val_loader, cfg, precision, epoch))
            if row["val_recon"] < best_val:
                best_val, is_best = row["val_recon"], True
        # a diverged model is never saved: validation loss and weights must be finite too
        bad_val = [k for k in ("val_recon", "val_total") if k in row and not torch.isfinite(torch.tensor(row[k]))]
        if bad_val or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            what = f"validation loss is {row[bad_val[0]]}" if bad_val else "the weights hold NaN or Inf"
            raise TrainingDiverged(
                f"{what} at epoch {epoch}, after step {steps_done}; training stopped before saving. "
                f"The last good checkpoint is {last_path if os.path.exists(last_path) else '(none yet)'}; "
                "'best' was not overwritten. Try a lower learning rate or amp='off'."
            )
        history.append(row)
        last_epoch = epoch
        if main:
            state = checkpoint_dict(epoch)
            if is_best:
                save_checkpoint(state, best_path)
            save_checkpoint(state, last_path)
            _write_history(history, logdir)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch)
            msg = (
                f"epoch {epoch}/{total_epochs} loss {row['train_total']:.4f} (recon {row['train_recon']:.4f}, "
                f"contrastive {row['train_contrastive']:.4f}) {row['crop_pairs_per_s']:.1f} crop pairs/s"
            )
            if "val_recon" in row:
                msg += f" | val recon {row['val_recon']:.4f} contrastive {row['val_contrastive']:.4f}" + (" (best)" if is_best else "")
            log(msg)
        barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    if writer is not None:
        writer.close()
    return {
        "history": history,
        "best": best_path,
        "last": last_path,
        "logdir": logdir,
        "model": model,
        "config": cfg,
        "last_epoch": last_epoch,
        "val_dataset": val_ds,
        "train_dataset": train_ds,
        "precision": precision,
    }
