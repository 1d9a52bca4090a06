"""The training engine every loop shares: one step, one divergence check, one run state.

- ``setup_run(cfg, device, seed)``: the device (chosen once), CPU settings, seeds and the
  ``Precision`` (one autocast context, a GradScaler active only for fp16).
- ``train_step(state, forward)``: zero the gradients (before the forward, so old gradients are not
  kept alongside the activations), run ``forward``, scaled backward, optional clipping, optimiser
  step, scaler update, scheduler step. Pre-training, fine-tuning, the linear probe and the
  benchmark's "ours" variant all call it; it is the one place in ``ssl_utils`` that runs a backward pass.
- ``check_finite(values, where, last_good)``: decides on the value all-reduced over ranks, so
  every rank raises the same ``TrainingDiverged`` at the same step and none is left waiting in a
  collective.
- ``RunState``: model, optimiser, scheduler, scaler, RNG and counters, saved and restored as one
  checkpoint (written atomically by ``ssl_utils.checkpoint.save_checkpoint``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from .distributed import all_reduce_sum, rank, world_size
from .models import unwrap_model
from .runtime import Precision, amp_dtype, configure_cpu, seed_everything, select_device


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) became NaN or Inf. The message names where, and on which rank."""


def setup_run(cfg: Mapping[str, Any], device: str | torch.device | None, seed: int | None = None,
              amp: str | bool | None = None) -> Precision:
    """Choose the device (once: ``select_device``), configure it, seed everything and return the
    run's ``Precision`` (its ``.device`` is the device; its autocast dtype from ``amp``, by default
    ``cfg["amp"]``)."""
    dev = select_device(device)
    if dev.type == "cpu":
        configure_cpu()
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    seed_everything(int(cfg["seed"] if seed is None else seed), bool(cfg["deterministic"]))
    return Precision(dev, amp_dtype(dev, cfg["amp"] if amp is None else amp))


@dataclass
class RunState:
    """Everything a run needs to continue where it stopped, saved as one checkpoint.

    ``model`` is the plain module (a DDP / compiled wrapper is unwrapped on save, so no
    ``module.`` / ``_orig_mod.`` prefix reaches the file); ``counters`` are the loop's own
    entries (``epoch``, ``iteration``, ``history``, best values, ...), stored at the top level of
    the checkpoint next to ``state_dict``, ``optimizer``, ``scheduler``, ``scaler``, ``rng`` and
    ``config``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    config: Mapping[str, Any]
    scheduler: Any = None
    grad_clip: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.counters[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.counters[key] = value

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """The checkpoint dict: weights, optimiser, scheduler, scaler, RNG, config, counters, ``extra``."""
        cfg = self.config
        return {
            "state_dict": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.precision.scaler.state_dict(),
            "rng": capture_rng_state(),
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
            **self.counters,
            **extra,
        }

    def save(self, *paths: str | os.PathLike, **extra: Any) -> None:
        """Write the checkpoint atomically to every path in ``paths`` (captured once)."""
        ck = self.checkpoint(**extra)
        for path in paths:
            save_checkpoint(ck, path)

    def restore(self, ckpt: Mapping[str, Any], counters: Sequence[str], rng: bool = True) -> None:
        """Load weights, optimiser, scheduler and scaler from ``ckpt``, copy the named
        ``counters`` (those present), and, with ``rng``, the random state (``restore_rng``)."""
        unwrap_model(self.model).load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.counters.update({k: ckpt[k] for k in counters if k in ckpt})
        if rng:
            self.restore_rng(ckpt)

    @staticmethod
    def restore_rng(ckpt: Mapping[str, Any]) -> None:
        """Python, NumPy and torch (CPU, CUDA) random state as saved; raises ``CheckpointError``
        where the CUDA state cannot be restored."""
        restore_rng_state(ckpt.get("rng"))


def train_step(state: RunState, forward: Callable[[], torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor:
    """One optimisation step of ``state``'s model; ``forward()`` returns the loss, or a tuple
    whose first element is the loss to minimise (the rest are logged).

    Returns the detached values ``[loss, *rest]`` as a float64 tensor on the device, without a
    host synchronisation (the caller reads them on logging steps only).
    """
    opt, scaler = state.optimizer, state.precision.scaler
    opt.zero_grad(set_to_none=True)
    out = forward()
    values = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    scaler.scale(values[0]).backward()
    if state.grad_clip:
        scaler.unscale_(opt)
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, state.grad_clip)
    scale = scaler.get_scale() if scaler.is_enabled() else None  # fp16 only (a host sync)
    scaler.step(opt)
    scaler.update()
    skipped = scale is not None and scaler.get_scale() < scale  # inf/NaN gradients: no optimiser step
    if state.scheduler is not None and not skipped:
        state.scheduler.step()
    return torch.stack([v.detach().double().reshape(()) for v in values])


def check_finite(values: torch.Tensor, where: str, last_good: str | None = None, what: str = "the loss",
                 collective: bool = True) -> None:
    """Raise ``TrainingDiverged`` on every rank when ``values`` hold NaN or Inf on any rank.

    The decision is the all-reduced count of non-finite values per rank, so all ranks take it
    together (one collective; call it at the same steps on every rank). ``where`` says when
    (e.g. "epoch 3, step 2"); ``last_good`` names the last checkpoint that is still good.
    ``collective=False``: this process alone decides (for work one rank does while the others
    wait, such as the probe monitor; a collective there would never be met).
    """
    world = world_size() if collective else 1
    flags = torch.zeros(world, dtype=torch.float64, device=values.device)
    flags[rank() if collective else 0] = (~torch.isfinite(values)).sum().double()
    if collective:
        flags = all_reduce_sum(flags)
    if not bool(flags.any()):
        return
    ranks = [i for i, f in enumerate(flags.tolist()) if f]
    on = f" on rank {', '.join(map(str, ranks))} of {world}" if world > 1 else ""
    saved = last_good if last_good and os.path.exists(last_good) else "(none yet)"
    raise TrainingDiverged(
        f"{what} is not finite (NaN or Inf) at {where}{on}; training stopped. The last good checkpoint is "
        f"{saved}; 'best' was not overwritten. Try a lower learning rate or amp='off'."
    )


def check_weights_finite(model: nn.Module, where: str, last_good: str | None = None) -> None:
    """``check_finite`` for the weights (and so for everything the next save would write)."""
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()  # no host sync yet
    check_finite(torch.where(finite, 0.0, float("nan")).reshape(1), where, last_good, what="a weight")


class Result:
    """Base of the typed results (``PretrainResult``, ``FinetuneResult``, ...): fields read as
    attributes, and, for code written against the earlier dict results, as ``result["name"]``."""

    __iter__ = None  # not a sequence: iterating is an error, not a walk over integer indices

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def __contains__(self, name: str) -> bool:
        return hasattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def keys(self) -> list[str]:
        import dataclasses

        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
