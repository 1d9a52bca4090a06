"""Everything a process needs to know about the others: rank, world size, collectives, data shards.

Each helper answers as a single process would outside a ``torch.distributed`` process group
(rank 0, world size 1, identity reductions), so one code path serves a notebook, one GPU and
``torchrun`` on many nodes alike.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def rank() -> int:
    """This process's global rank; 0 outside a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``); 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    """Number of processes; 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process logs and writes files (rank 0)."""
    return rank() == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as a new tensor (``values`` itself outside a process group)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity outside a process group)."""
    return all_reduce_sum(values) / world_size() if world_size() > 1 else values


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably.

    The backward pass sums each rank's gradient for this rank's slice (a reduce-scatter), so the
    gradient reaching ``x`` includes the contributions of every rank's loss.
    Outside a process group it returns ``x``.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def shard(entries: Sequence, rank_: int, world: int, seed: int, pad: bool) -> list:
    """This rank's share of ``entries``: a seeded shuffle split in ``world`` parts.

    With ``pad`` every part has the same length (entries repeated; with fewer entries than ranks,
    each rank gets one, cycling), so every rank runs the same number of steps; without it the
    parts may differ by one, and with fewer entries than ranks the last ranks get none.
    """
    entries = list(entries)
    if world == 1 or not entries:
        return entries
    from monai.data import partition_dataset

    if len(entries) < world:  # partition_dataset refuses
        if not pad:
            return entries[rank_:rank_ + 1]
        entries = [entries[i % len(entries)] for i in range(world)]
    return partition_dataset(entries, num_partitions=world, shuffle=True, seed=seed, even_divisible=pad)[rank_]


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its exception on every
    rank (same type where it is one of ours, same message), so a bad input stops all ranks
    together instead of leaving the others waiting in the next collective."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    shared = [result, None if error is None else (type(error).__module__, type(error).__name__, str(error))]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise _rebuild_error(*shared[1])
    return shared[0]


def run_on_all(fn: Callable[[], Any]) -> list:
    """Run ``fn`` on every rank and give every rank the list of all ranks' results (in rank order);
    when any rank raises, every rank raises the lowest such rank's exception (same type where it
    is one of ours, same message), so work split across ranks stops all of them together."""
    if world_size() == 1:
        return [fn()]
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, on every rank
        error = exc
    shared: list = [None] * world_size()
    described = None if error is None else (type(error).__module__, type(error).__name__, str(error))
    dist.all_gather_object(shared, (result, described))
    for r, (_, failed) in enumerate(shared):
        if failed is not None:
            if r == rank():
                raise error
            raise _rebuild_error(*failed)
    return [res for res, _ in shared]


def _rebuild_error(module: str, name: str, message: str) -> Exception:
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception:  # pragma: no cover - an exception type that cannot be rebuilt from a message
        pass
    return RuntimeError(f"{name}: {message}")


def freeze_unused(model: nn.Module) -> int:
    """Freeze the parameters no forward pass uses, so DDP need not search for them every step.

    MONAI's ``TransformerBlock`` always registers a ``norm_cross_attn`` LayerNorm, used only with
    cross-attention (never in ViTAutoEnc or UNETR). Returns the number of tensors frozen.
    """
    n = 0
    for module in model.modules():
        norm = getattr(module, "norm_cross_attn", None)
        if isinstance(norm, nn.Module) and not getattr(module, "with_cross_attention", False):
            for p in norm.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    n += 1
    return n


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group (one device per process); the
    model itself outside one. Parameters no forward uses are frozen first (``freeze_unused``), so
    every remaining parameter gets a gradient every step and DDP runs without
    ``find_unused_parameters`` (a graph traversal per step)."""
    if world_size() == 1:
        return model
    freeze_unused(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
