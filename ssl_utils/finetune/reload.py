"""Read a finished fine-tuning run back from its folder, without training.

``finetune`` writes everything a run is into ``logdir``: ``last_model.pt`` holds the weights at
the end, the configuration (classes included), the history of evaluations and the training
losses; ``best_model.pt`` the weights of the best evaluation. ``load_finetune_run(logdir)``
rebuilds the ``FinetuneResult`` that ``finetune`` returned, so a notebook or a script can look at
a run (its curves, its model on a validation case) after the comparison trained it, instead of
calling ``finetune`` again.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import get_config
from ..models import build_unetr
from ..runtime import Precision, amp_dtype, select_device
from ..speedups import apply_speedups
from .loop import BEST_NAME, LAST_NAME, FinetuneResult, final_from_history

WHICH = {"last": LAST_NAME, "best": BEST_NAME}


def _finished_checkpoint(logdir: str) -> dict[str, Any]:
    """``logdir/last_model.pt`` of a run that reached its ``ft_iterations``; a clear error otherwise."""
    path = os.path.join(logdir, LAST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {logdir} is not a fine-tuning run folder (finetune writes "
                                f"{LAST_NAME} and {BEST_NAME} there)")
    ckpt = load_checkpoint(path)
    missing = [k for k in ("config", "history", "iteration", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint of this project (no {', '.join(missing)})")
    planned = int(ckpt["config"]["ft_iterations"])
    if int(ckpt["iteration"]) < planned:
        raise CheckpointError(f"{path}: the run stopped at iteration {ckpt['iteration']} of {planned}; finish it "
                              "first with finetune(..., resume=True)")
    return ckpt


def _validation_dataset(cfg, data_root: str | None, json_path: str, class_count: int):
    """The run's evaluation split of ``json_path`` (checked, every problem listed), whole volumes."""
    from monai.data import CacheDataset

    from ..data import preflight_datalist
    from ..transforms import finetune_transforms

    split = cfg["ft_eval_split"]
    entries = preflight_datalist(json_path, data_root, keys=(split,), require_label=True, num_classes=class_count,
                                 window=(cfg["ft_a_min"], cfg["ft_a_max"]), progress=False, log=lambda _: None)[split]
    return CacheDataset(entries, finetune_transforms(cfg, train=False), cache_rate=cfg["cache_rate"], progress=False)


def load_finetune_run(logdir: str, data_root: str | None = None, json_path: str | None = None, which: str = "last",
                      device: str | torch.device | None = None) -> FinetuneResult:
    """The ``FinetuneResult`` of the finished run in ``logdir``, read from its files.

    ``which``: the weights to load into ``model``, ``"last"`` (what ``finetune`` returns: the
    weights at the end) or ``"best"`` (the best evaluation's). With ``json_path`` (and
    ``data_root``, as given to ``finetune``) ``val_dataset`` holds the evaluation split's volumes,
    checked as ``finetune`` checks them; without it ``val_dataset`` is None and ``n_val`` 0.
    ``train_dataset`` is None and ``transfer`` None (the weights come from the run, not from a
    transfer). Raises ``FileNotFoundError`` when ``logdir`` holds no run and ``CheckpointError``
    when the run has not finished.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}: expected one of {sorted(WHICH)}")
    ckpt = _finished_checkpoint(logdir)
    cfg = get_config(ckpt["config"])
    dev = select_device(device)
    precision = Precision(dev, amp_dtype(dev, cfg["amp"]))  # no seeding: reading changes no random state
    weights = ckpt if which == "last" else load_checkpoint(os.path.join(logdir, WHICH[which]))
    model = build_unetr(cfg)
    model.load_state_dict(weights["state_dict"])
    model = apply_speedups(model, cfg, dev).eval()
    history = list(ckpt["history"])
    names = tuple(ckpt.get("class_names") or ())
    val_ds = _validation_dataset(cfg, data_root, json_path, int(cfg["out_channels"])) if json_path else None
    return FinetuneResult(
        history=history,
        curve=[(int(r["iteration"]), float(r["val_mean_dice"])) for r in history],
        best_dice=float(ckpt.get("best_dice", float("nan"))),
        best=os.path.join(logdir, BEST_NAME),
        last=os.path.join(logdir, LAST_NAME),
        final=final_from_history(history, int(cfg["ft_final_evals"])),
        model=model,
        train_losses=[float(v) for v in ckpt.get("train_losses", [])],
        transfer=None,
        iteration=int(ckpt["iteration"]),
        config=cfg,
        logdir=logdir,
        n_train=int(ckpt.get("n_train", 0)),
        n_val=len(val_ds) if val_ds is not None else 0,
        val_dataset=val_ds,
        train_dataset=None,
        precision=precision,
        use_pretrained=bool(ckpt.get("use_pretrained", False)),
        class_names=names,
    )
