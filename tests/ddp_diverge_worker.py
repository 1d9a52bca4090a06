"""Pre-training in DDP where ONE rank's loss becomes NaN: every rank must stop with the same error.

Run by ``tests/test_ddp.py`` under ``torchrun --nproc_per_node=2``. Each rank calls
``ssl_utils.pretrain.pretrain`` on the smoke cohort (2 epochs, batch size ``BATCH_SIZE``); on rank 1 only, a global forward
hook (``torch.nn.modules.module.register_module_forward_hook``, nothing patched in ``ssl_utils``)
turns the reconstruction of the ``POISONED_FORWARD``-th training forward of the ``ViTAutoEnc`` into
NaN, so that rank's loss is NaN while rank 0's stays finite (its weights turn NaN only through the
all-reduced gradients, after its loss was computed).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_diverge_worker.py OUT_DIR DATA_ROOT JSON_PATH``;
writes ``OUT_DIR/rank{r}.txt``: ``TrainingDiverged: <message>`` (exit code 0), or
``<type>: <message>`` of any other outcome (exit code 1; "finished" when nothing was raised).
Checkpoints go to ``OUT_DIR/run``.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
from monai.networks.nets import ViTAutoEnc

from ssl_utils import get_config
from ssl_utils.engine import TrainingDiverged
from ssl_utils.pretrain import pretrain

POISONED_RANK = 1
BATCH_SIZE = 1  # the smoke cohort's 4 training volumes: 2 per rank, 2 steps per epoch
POISONED_FORWARD = 4  # epoch 2, step 2: mid-epoch, after epoch 1's checkpoint


def poison_forward(n: int):
    """Make the ``n``-th training-mode ``ViTAutoEnc`` forward of this process return NaN
    reconstructions (a hook on every module; returns its handle)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not isinstance(module, ViTAutoEnc) or not module.training:
            return None
        calls["n"] += 1
        if calls["n"] != n:
            return None
        recon, hidden = output
        return recon * float("nan"), hidden

    return torch.nn.modules.module.register_module_forward_hook(hook)


def main(out_dir: str, data_root: str, json_path: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handle = poison_forward(POISONED_FORWARD) if rank == POISONED_RANK else None
    outcome, code = "finished", 1
    try:
        cfg = get_config("smoke", ssl_batch_size=BATCH_SIZE, ssl_epochs=2)
        pretrain(cfg, data_root=data_root, json_path=json_path, logdir=os.path.join(out_dir, "run"),
                 device="cpu", progress=False, log=lambda msg: None)
    except TrainingDiverged as exc:
        outcome, code = f"TrainingDiverged: {exc}", 0
    except Exception as exc:  # reported to the test, then raised (torchrun shows the traceback)
        outcome = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        raise
    finally:
        if handle is not None:
            handle.remove()
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
