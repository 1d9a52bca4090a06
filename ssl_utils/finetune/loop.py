"""The fine-tuning loop: UNETR with a random or a pre-trained ViT encoder, DiceCE, fixed budget.

``finetune(cfg, ...)`` reads and checks a labeled datalist (its ``labels`` map, when it has one,
sets the classes: UNETR's output channels, the loss, Dice and every table; BTCV's 13 organs
otherwise), builds UNETR, copies a pre-trained
ViT encoder into ``unetr.vit`` (or keeps it random), trains with one ``ssl_utils.engine.train_step``
per iteration, evaluates with sliding-window inference every ``ft_eval_every`` iterations, and
writes ``best_model.pt`` (highest mean Dice) and ``last_model.pt`` (atomically, resumable bitwise,
also mid-epoch), ``history.json`` / ``history.csv`` and ``train_loss.csv`` under ``logdir``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import ARCH_KEYS, Config, config_differences, get_config
from ..datasets import mix_seed, plain_tensor
from ..distributed import is_main
from ..engine import Result, RunState, check_finite, check_weights_finite, setup_run, train_step
from ..io import write_csv, write_json
from ..models import TransferReport, build_unetr, load_pretrained_vit
from ..runtime import Precision, optimizer_kwargs
from ..speedups import apply_speedups
from .inference import evaluate
from .inputs import EpochSampler, config_for_classes, resolve_ft_data

BEST_NAME = "best_model.pt"
LAST_NAME = "last_model.pt"
# Settings that may differ when resume="auto" reuses a run (they do not change its result).
_RUN_IGNORE = ("preset", "num_workers", "cache_rate", "cache", "cache_dir")
# Settings that must agree between a fine-tuning checkpoint and a run that resumes from it.
FT_RESUME_KEYS = ARCH_KEYS + ("feature_size", "out_channels", "norm_name", "res_block", "ft_num_samples", "ft_batch_size")
_COUNTERS = ("iteration", "epoch", "step_in_epoch", "history", "train_losses", "best_dice")


@dataclass
class FinetuneResult(Result):
    """What ``finetune`` returns (also readable as ``result["history"]`` etc.)."""

    history: list[dict[str, Any]]  # one row per evaluation
    curve: list[tuple[int, float]]  # (iteration, mean Dice)
    best_dice: float
    best: str  # checkpoint paths
    last: str
    final: dict[str, Any] | None  # the last evaluation's metrics
    model: nn.Module
    train_losses: list[float]  # one per iteration
    transfer: TransferReport | None
    iteration: int
    config: Config
    logdir: str
    n_train: int
    n_val: int
    val_dataset: Any
    train_dataset: Any
    precision: Precision
    use_pretrained: bool
    class_names: tuple[str, ...] = ()  # every class, index 0 (background) first


def _fingerprint(path: str | None) -> str | None:
    """``"<bytes>-<mtime ns>"`` of a file (changes when a pre-training run rewrites it), else None."""
    try:
        st = os.stat(str(path))
    except (OSError, TypeError):
        return None
    return f"{st.st_size}-{st.st_mtime_ns}"


def check_head(state_dict: Mapping[str, Any], class_names: tuple[str, ...] | list[str], path: str) -> None:
    """Raise ``CheckpointError`` when the output layer of a UNETR state dict (``out.conv.conv``) does
    not have one channel per class of ``class_names`` (the datalist's classes)."""
    weight = state_dict.get("out.conv.conv.weight") if isinstance(state_dict, Mapping) else None
    if weight is None or not class_names:
        return
    if int(weight.shape[0]) != len(class_names):
        raise CheckpointError(
            f"{path}: its output layer has {int(weight.shape[0])} classes, the datalist has {len(class_names)} "
            f"({', '.join(class_names)}): the checkpoint was trained on another label set"
        )


def _check_resumable(ckpt: Any, cfg: Config, use_pretrained: bool, n_train: int, path: str, same_run: bool = False,
                     pretrained_path: str | None = None, class_names: tuple[str, ...] = ()) -> None:
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
    check_head(ckpt["state_dict"], class_names, f"cannot resume from {path}")
    if class_names and ckpt.get("class_names") and list(ckpt["class_names"]) != list(class_names):
        diffs.append(f"classes: checkpoint {list(ckpt['class_names'])}, this datalist {list(class_names)}")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with other settings: " + "; ".join(diffs))


def _resume_checkpoint(resume: bool | str, path: str, cfg: Config, use_pretrained: bool, n_train: int,
                       pretrained_path: str | None, say: Callable[[str], None],
                       class_names: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint to continue, or None. ``resume="auto"``: only exactly this run's, else a new run."""
    if not resume:
        return None
    if not os.path.exists(path):
        if resume != "auto":
            say(f"resume requested but {path} does not exist: starting from scratch")
        return None
    try:
        ckpt = load_checkpoint(path)
        _check_resumable(ckpt, cfg, use_pretrained, n_train, path, same_run=resume == "auto", pretrained_path=pretrained_path,
                         class_names=class_names)
        return ckpt
    except CheckpointError as exc:
        if resume != "auto":
            raise
        say(f"{exc}; starting a new run in {os.path.dirname(path)}")
        return None


def build_finetune_model(cfg: Mapping[str, Any], seed: int, pretrained_path: str | None = None,
                         use_pretrained: bool = False) -> tuple[nn.Module, TransferReport | None]:
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


@dataclass
class _Data:
    train_ds: Any
    val_ds: Any
    train_loader: Any
    val_loader: Any
    sampler: EpochSampler
    n_train: int
    n_val: int
    steps_per_epoch: int


def _load_data(cfg: Config, data_root, json_path, cohort_root, n_train, skip_bad, progress, say, device) -> _Data:
    """Check every datalist entry (every problem listed at once), cache the deterministic stage."""
    from monai.data import DataLoader

    from ..data import DatalistError, preflight_datalist, read_datalist_json
    from ..datasets import finetune_datasets

    split = cfg["ft_eval_split"]
    if split != "validation" and split not in read_datalist_json(json_path):
        raise DatalistError(f"datalist {json_path}: ft_eval_split={split!r} but the datalist has no {split!r} list "
                            "(the embedded cohort has one when synth_labeled_tune > 0)")
    checked = preflight_datalist(
        json_path, data_root, keys=("training", split), require_label=True, num_classes=cfg["out_channels"],
        window=(cfg["ft_a_min"], cfg["ft_a_max"]), skip_bad=skip_bad, progress=progress, log=say,
    )
    train, val = checked["training"], checked[split]
    big = len(train) + len(val) >= 20  # a caching progress bar only where caching takes a while
    train_ds, val_ds = finetune_datasets(cfg, train, val, progress=progress and big)
    bs = cfg["ft_batch_size"]
    sampler = EpochSampler(len(train_ds), cfg["seed"])
    kw = dict(num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    return _Data(train_ds, val_ds, DataLoader(train_ds, batch_size=bs, sampler=sampler, **kw),
                 DataLoader(val_ds, batch_size=1, shuffle=False, **kw), sampler, len(train), len(val),
                 math.ceil(len(train_ds) / bs))


def finetune_optimizer(model: nn.Module, cfg: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """AdamW with two groups: the decoder at ``ft_lr``, the ViT encoder at ``encoder_lr_mult`` times it."""
    enc_ids = {id(p) for p in model.vit.parameters()}
    lr = cfg["ft_lr"]
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in enc_ids], "lr": lr, "name": "decoder"},
        {"params": list(model.vit.parameters()), "lr": lr * cfg["encoder_lr_mult"], "name": "encoder"},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg["ft_weight_decay"], **optimizer_kwargs(device))


def segmentation_forward(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: nn.Module,
                         precision: Precision) -> torch.Tensor:
    """The fine-tuning loss of one batch (``image`` ``[B, 1, roi^3]``, ``label`` ``[B, 1, roi^3]``):
    the model under autocast, the loss (DiceCE) on float32 logits."""
    x = plain_tensor(batch["image"]).to(precision.device, non_blocking=True)
    y = plain_tensor(batch["label"]).to(precision.device, non_blocking=True)
    with precision.autocast():
        logits = model(x)
    return loss_fn(logits.float(), y)


def _build_state(cfg: Config, precision: Precision, model: nn.Module, counters: dict[str, Any]) -> RunState:
    """The model on the device with the speed-ups (channels-last on CPU), ``finetune_optimizer``, and
    (``ft_cosine``) a cosine decay of every group's learning rate to 0 over ``ft_iterations``."""
    from ..runtime import lr_lambda

    model = apply_speedups(model, cfg, precision.device)
    optimizer = finetune_optimizer(model, cfg, precision.device)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, cfg["ft_iterations"], True))
                 if cfg["ft_cosine"] else None)
    return RunState(model, optimizer, precision, cfg, scheduler, cfg["grad_clip"], counters)


class _Loop:
    """The iterations of one fine-tuning run, resumable at any iteration (see ``finetune``)."""

    def __init__(self, state: RunState, data: _Data, logdir: str, progress: bool, say, save_every_s: float,
                 class_names: tuple[str, ...] = ()) -> None:
        from monai.losses import DiceCELoss

        self.state, self.data, self.cfg, self.say = state, data, state.config, say
        self.class_names = tuple(class_names)
        self.best_path, self.last_path = os.path.join(logdir, BEST_NAME), os.path.join(logdir, LAST_NAME)
        self.logdir, self.progress, self.save_every_s = logdir, progress, save_every_s
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.train_model = torch.compile(state.model) if self.cfg["compile"] else state.model
        self.window: list[torch.Tensor] = []  # per-iteration losses since the last evaluation
        self.final: dict[str, Any] | None = None
        self.resume_rng: dict | None = None
        self.frozen = False  # the encoder's requires_grad state (a fresh model trains everything)

    def continue_from(self, ckpt: Mapping[str, Any]) -> None:
        """Position after ``state.restore``: the next epoch, or mid-epoch with the saved RNG."""
        s = self.state
        s["step_in_epoch"] = int(ckpt.get("step_in_epoch", self.data.steps_per_epoch))
        if s["step_in_epoch"] >= self.data.steps_per_epoch:
            s["epoch"], s["step_in_epoch"] = s["epoch"] + 1, 0
        # the RNG state is restored only inside an epoch; a new epoch re-seeds from (seed, epoch)
        self.resume_rng = dict(ckpt) if s["step_in_epoch"] > 0 else None
        pending = int(ckpt.get("pending_window", 0))
        if pending:
            s["train_losses"] = list(s["train_losses"])
            self.window = [torch.tensor(v, dtype=torch.float64) for v in s["train_losses"][-pending:]]
            del s["train_losses"][-pending:]

    def set_frozen(self, frozen: bool) -> None:
        """Freeze or release the encoder (only when that changes: not a walk over it every step)."""
        if frozen == self.frozen:
            return
        for p in self.state.model.vit.parameters():
            p.requires_grad_(not frozen)
        self.frozen = frozen

    def run(self, stop: int) -> None:
        """Iterate up to iteration ``stop`` (evaluating, saving), epoch by epoch."""
        from tqdm.auto import tqdm

        s, cfg, total = self.state, self.cfg, self.cfg["ft_iterations"]
        bs, every = cfg["ft_batch_size"], max(cfg["ft_eval_every"], 1)
        check_every = 1 if s.precision.device.type == "cpu" else 10  # a check syncs on GPU
        self.bar = tqdm(total=total, initial=s["iteration"], desc="fine-tuning", disable=not self.progress, leave=False)
        self.last_save = self.t_window = time.perf_counter()
        s.model.train()
        while s["iteration"] < stop:
            torch.manual_seed(mix_seed(cfg["seed"], s["epoch"]))  # randomness = f(seed, epoch): resumable bitwise
            self.data.train_ds.set_epoch(s["epoch"])
            self.data.sampler.set_epoch(s["epoch"], start=s["step_in_epoch"] * bs)
            batches = iter(self.data.train_loader)
            if self.resume_rng is not None:  # resuming mid-epoch: the RNG exactly as it was when saved
                s.restore_rng(self.resume_rng)
                self.resume_rng = None
            for batch in batches:
                if s["iteration"] >= stop:
                    break
                self.set_frozen(s["iteration"] < cfg["freeze_encoder_iters"])
                loss = train_step(s, lambda: segmentation_forward(self.train_model, batch, self.loss_fn, s.precision))
                s["iteration"] += 1
                s["step_in_epoch"] += 1
                self.window.append(loss[0])
                self.bar.update(1)
                if s["iteration"] % check_every == 0:
                    check_finite(loss, f"iteration {s['iteration']} (epoch {s['epoch']})", self.last_path)
                    self.bar.set_postfix(loss=f"{loss[0].item():.4f}", best=f"{max(s['best_dice'], 0):.3f}")
                if s["iteration"] % every == 0 or s["iteration"] == total:
                    self.evaluate_and_save()
                elif is_main() and (s["iteration"] == stop or self._save_due()):
                    self.save_partial()
            if s["iteration"] >= stop and s["step_in_epoch"] < self.data.steps_per_epoch:
                break
            s["epoch"], s["step_in_epoch"] = s["epoch"] + 1, 0
        self.bar.close()
        self.set_frozen(False)
        if self.window and stop < total:
            s["train_losses"] = list(s["train_losses"]) + torch.stack(self.window).cpu().tolist()

    def _save_due(self) -> bool:
        epoch_done = self.state["step_in_epoch"] >= self.data.steps_per_epoch
        return epoch_done and time.perf_counter() - self.last_save > self.save_every_s

    def save_partial(self) -> None:
        """``last`` between evaluations, with the losses since the last one marked as pending."""
        s = self.state
        check_weights_finite(s.model, f"iteration {s['iteration']}", self.last_path)
        losses = list(s["train_losses"]) + torch.stack(self.window).cpu().tolist()
        s.save(self.last_path, train_losses=losses, pending_window=len(self.window))
        self.last_save = time.perf_counter()

    def evaluate_and_save(self) -> None:
        """Validation Dice; a history row; best (when it is) and last checkpoints; the log files."""
        s = self.state
        window = torch.stack(self.window)
        self.window = []
        check_finite(window, f"an iteration before {s['iteration']}", self.last_path)
        s["train_losses"] = list(s["train_losses"]) + window.cpu().tolist()
        t_eval = time.perf_counter()
        metrics = evaluate(s.model, self.data.val_loader, self.cfg, s.precision, class_names=self.class_names or None)
        where = f"iteration {s['iteration']} (validation)"  # a diverged model is never saved, nor called best
        check_finite(torch.tensor([float("nan") if metrics["n_nonfinite"] else 0.0]), where, self.last_path,
                     what="the validation output")
        check_weights_finite(s.model, where, self.last_path)
        is_best = metrics["mean_dice"] > s["best_dice"]
        s["best_dice"] = max(s["best_dice"], metrics["mean_dice"])
        row = {
            "iteration": s["iteration"], "epoch": s["epoch"], "train_loss": float(np.mean(window.cpu().tolist())),
            "lr": s.optimizer.param_groups[0]["lr"], "val_mean_dice": metrics["mean_dice"],
            "val_mean_dice_with_bg": metrics["mean_dice_with_bg"], "val_excluded": metrics["n_excluded"],
            "train_time_s": t_eval - self.t_window, "eval_time_s": time.perf_counter() - t_eval,
            **{f"dice_{k}": v for k, v in metrics["per_organ"].items()},
        }
        s["history"] = list(s["history"]) + [row]
        self.final = metrics
        if is_main():
            s.save(*([self.best_path] if is_best else []), self.last_path)
            self.last_save = time.perf_counter()
            write_json(os.path.join(self.logdir, "history.json"), s["history"])
            write_csv(os.path.join(self.logdir, "history.csv"), s["history"])
            write_csv(os.path.join(self.logdir, "train_loss.csv"),
                      [{"iteration": i + 1, "loss": v} for i, v in enumerate(s["train_losses"])])
        self.say(
            f"iteration {s['iteration']}/{self.cfg['ft_iterations']} loss {row['train_loss']:.4f} | val mean Dice "
            f"{row['val_mean_dice']:.4f} (with background {row['val_mean_dice_with_bg']:.4f})" + (" best" if is_best else "")
            + f" | {row['train_time_s']:.1f} s training, {row['eval_time_s']:.1f} s evaluation"
        )
        self.bar.set_postfix(loss=f"{row['train_loss']:.4f}", dice=f"{row['val_mean_dice']:.3f}")
        self.t_window = time.perf_counter()


def final_from_history(history: list[Mapping[str, Any]], k: int = 1) -> dict[str, Any] | None:
    """A run's final Dice: the mean of its last ``k`` evaluations (``ft_final_evals``; 1 = the last
    one), mean and per class (a class that is NaN in all of them stays NaN), and the iterations
    averaged. One evaluation alone sits wherever the run's oscillation happens to be."""
    if not history:
        return None
    rows = list(history)[-max(int(k), 1):]

    def mean(key: str) -> float:
        vals = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        return float(np.mean(vals)) if vals else float("nan")

    organs = [key[5:] for key in rows[-1] if key.startswith("dice_")]
    return {"mean_dice": mean("val_mean_dice"), "mean_dice_with_bg": mean("val_mean_dice_with_bg"),
            "per_organ": {o: mean(f"dice_{o}") for o in organs}, "iterations": [int(r["iteration"]) for r in rows]}


def _final_metrics(loop: _Loop) -> dict[str, Any] | None:
    """The run's final metrics: ``final_from_history`` over its last ``ft_final_evals`` evaluations;
    with 1, the last evaluation's metrics as they were measured (for a reused run, from its history)."""
    history = loop.state["history"]
    k = int(loop.cfg["ft_final_evals"])
    if k == 1 and loop.final is not None:
        return loop.final
    return final_from_history(history, k)


def finetune(
    cfg: Mapping[str, Any] | str = "demo",
    data_root: str | None = None,
    json_path: str | None = None,
    logdir: str = "runs/finetune",
    pretrained_path: str | None = None,
    use_pretrained: bool = True,
    resume: bool | str = False,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    skip_bad: bool = False,
    cohort_root: str = "data/synthetic",
    log: Callable[[str], None] = print,
    iterations: int | None = None,
    eval_every: int | None = None,
    n_train: int | None = None,
    save_every_s: float = 600.0,
) -> FinetuneResult:
    """Fine-tune UNETR for ``cfg["ft_iterations"]`` iterations; returns a ``FinetuneResult``.

    ``iterations`` / ``eval_every`` / ``seed`` override ``ft_iterations`` / ``ft_eval_every`` /
    ``seed``; the seed fixes the data order, the crops and the decoder initialisation (the two
    arms of a comparison differ only in the encoder's starting weights). ``use_pretrained``: copy
    the ViT encoder of ``pretrained_path`` into ``unetr.vit`` (a missing file is an error).
    ``stop_after``: stop, as if interrupted, after that many iterations (``last`` is saved there);
    ``resume=True`` continues from ``logdir/last_model.pt`` and ends with the weights an
    uninterrupted run has (bitwise on CPU); ``resume="auto"`` continues (or, when finished,
    returns) a run only when it has exactly these settings and the same pre-trained file, and
    otherwise starts afresh. ``last`` is saved at every evaluation, at the end, and at an epoch end
    when ``save_every_s`` seconds have passed since the previous save. ``n_train`` picks the
    embedded cohort's datalist when ``data_root`` and ``json_path`` are empty.
    """
    cfg = get_config(cfg, seed=seed, ft_iterations=iterations, ft_eval_every=eval_every)
    if use_pretrained and not pretrained_path:
        raise ValueError("use_pretrained=True needs pretrained_path (the pre-training run's best_model.pt)")
    if use_pretrained and not os.path.isfile(str(pretrained_path)):
        raise FileNotFoundError(f"pre-trained checkpoint {pretrained_path} not found: run ssl_train.ipynb first "
                                "(it writes <logdir>/best_model.pt), pass the right path, or set use_pretrained=False")
    data_root, json_path = resolve_ft_data(cfg, data_root, json_path, cohort_root, n_train)
    cfg, class_names = config_for_classes(cfg, json_path)
    precision = setup_run(cfg, device)
    say = log if is_main() else (lambda *_: None)
    os.makedirs(logdir, exist_ok=True)
    data = _load_data(cfg, data_root, json_path, cohort_root, n_train, skip_bad, progress and is_main(), say, precision.device)
    ckpt = _resume_checkpoint(resume, os.path.join(logdir, LAST_NAME), cfg, use_pretrained, data.n_train, pretrained_path, say,
                              class_names)
    model, transfer = build_finetune_model(cfg, cfg["seed"], pretrained_path, use_pretrained and ckpt is None)
    if transfer is not None:
        say(f"weight transfer: {transfer}")
    counters = {"iteration": 0, "epoch": 1, "step_in_epoch": 0, "steps_per_epoch": data.steps_per_epoch, "history": [],
                "train_losses": [], "best_dice": -1.0, "use_pretrained": bool(use_pretrained), "n_train": data.n_train,
                "pretrained_path": str(pretrained_path) if use_pretrained else None,
                "pretrained_fingerprint": _fingerprint(pretrained_path) if use_pretrained else None,
                "class_names": list(class_names)}
    state = _build_state(cfg, precision, model, counters)
    loop = _Loop(state, data, logdir, progress and is_main(), say, save_every_s, class_names)
    if ckpt is not None:
        state.restore(ckpt, _COUNTERS, rng=False)
        loop.continue_from(ckpt)
        say(f"resumed from {loop.last_path} at iteration {state['iteration']}")
    n_enc, n_all = sum(p.numel() for p in model.vit.parameters()), sum(p.numel() for p in model.parameters())
    say(f"fine-tuning: preset={cfg['preset']} seed={cfg['seed']} device={precision.device} precision={precision.name} "
        f"roi={cfg['roi']} feature_size={cfg['feature_size']} | {len(class_names)} classes "
        f"({', '.join(class_names) if len(class_names) <= 6 else ', '.join(class_names[:5]) + ', ...'}) | "
        + (f"pre-trained encoder ({pretrained_path})" if use_pretrained else "random initialisation")
        + f" | {data.n_train} train / {data.n_val} val volumes, {cfg['ft_batch_size']}x{cfg['ft_num_samples']} crops "
        f"per iteration, {data.steps_per_epoch} iterations per epoch | UNETR {n_all / 1e6:.2f} M parameters "
        f"({n_enc / 1e6:.2f} M in the ViT encoder) | iterations {state['iteration'] + 1}..{cfg['ft_iterations']}, "
        f"evaluation every {cfg['ft_eval_every']}")
    loop.run(cfg["ft_iterations"] if stop_after is None else min(cfg["ft_iterations"], int(stop_after)))
    history = state["history"]
    return FinetuneResult(
        history, [(int(r["iteration"]), float(r["val_mean_dice"])) for r in history],
        state["best_dice"] if history else float("nan"), loop.best_path, loop.last_path, _final_metrics(loop),
        state.model, [float(v) for v in state["train_losses"]], transfer, state["iteration"], cfg, logdir,
        data.n_train, data.n_val, data.val_ds, data.train_ds, precision, bool(use_pretrained), tuple(class_names),
    )
