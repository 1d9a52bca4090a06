"""One pre-training step, in DDP on a share of a fixed batch or in one process on all of it.

Run by ``tests/test_ddp.py``: under ``torchrun --nproc_per_node=2`` each rank takes its half of
``2b`` fixed crops (both views and the clean crop), runs ``ssl_forward`` (with and without
global negatives) in DDP and steps Adam once; the test compares the parameters with one process
that steps on all ``2b`` crops (``step_parameters`` called in the test itself).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_step_worker.py OUT_DIR``;
writes ``OUT_DIR/rank{r}.pt``: ``{"gather": {name: tensor}, "local": {name: tensor}}``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from ssl_utils import build_vitautoenc, get_config
from ssl_utils.distributed import wrap_ddp
from ssl_utils.pretrain import ssl_forward
from ssl_utils.runtime import Precision

CROPS_PER_RANK = 2  # b
LR = 1e-4  # the paper's learning rate
MODEL_SEED = 7
DATA_SEED = 11


def fixed_batch(cfg: dict, n: int) -> dict[str, torch.Tensor]:
    """``n`` fixed random crops: ``image``, ``image_2``, ``gt_image``, each ``[n, 1, roi^3]`` in [0, 1]."""
    g = torch.Generator().manual_seed(DATA_SEED)
    shape = (n, 1) + (cfg["roi"],) * 3
    gt = torch.rand(shape, generator=g)
    # two differently corrupted views of the same crops
    return {
        "gt_image": gt,
        "image": gt * (torch.rand(shape, generator=g) > 0.3),
        "image_2": gt * (torch.rand(shape, generator=g) > 0.3),
    }


def fresh_model(cfg: dict) -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return build_vitautoenc(cfg)


def step_parameters(model: nn.Module, batch: dict, cfg: dict, gather: bool) -> dict[str, torch.Tensor]:
    """One Adam step of ``model`` (plain or DDP-wrapped) on ``batch``; returns the new parameters."""
    precision = Precision(torch.device("cpu"), None)  # fp32: the comparison is to 1e-5
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = torch.optim.Adam(plain.parameters(), lr=LR)
    total, _, _, _, _ = ssl_forward(model, batch, cfg, precision, gather=gather)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in plain.named_parameters()}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg = get_config("smoke")
        batch = fixed_batch(cfg, CROPS_PER_RANK * world)
        mine = {k: v[rank * CROPS_PER_RANK:(rank + 1) * CROPS_PER_RANK] for k, v in batch.items()}
        result = {}
        for name, gather in (("gather", True), ("local", False)):
            ddp = wrap_ddp(fresh_model(cfg), torch.device("cpu"))  # as pretrain() wraps it
            result[name] = step_parameters(ddp, mine, cfg, gather=gather)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
