"""``multi_gpu/mgpu_ssl_train.py`` with test instruments, for ``tests/test_ddp.py``.

Imports the script by path, parses the script's own flags with its own parser and calls its
``run(args, on_epoch_end=hook)``: the same code path as ``main``, plus what a test needs to see.
The wrapper's options come first; everything after them is the script's argv:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_wrapper.py \\
        [--crash-at-epoch N] [--save-rank-params] --preset smoke --data_root ... (the script's flags)

``--crash-at-epoch N``: after epoch N (its checkpoint written), the last rank (rank 1 of 2) writes
    ``<output>/crash_rank{r}_epoch{N}.marker``, prints "rank r: simulated crash after epoch N" to
    stderr and dies with ``os._exit(1)``, on the first attempt only (``TORCHELASTIC_RESTART_COUNT``
    0), so a torchrun restart runs to the end.
``--save-rank-params``: at the end every rank saves ``result.model.state_dict()`` (on the CPU) to
    ``<output>/rank{r}_params.pt``, and ``<output>/rank{r}_ddp.json``: the names of its frozen
    parameters and the ``find_unused_parameters`` setting of every ``DistributedDataParallel``
    built during the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "multi_gpu", "mgpu_ssl_train.py")


def load_script():
    """The script as a module (``mgpu_ssl_train``), imported from its path."""
    spec = importlib.util.spec_from_file_location("mgpu_ssl_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrapper_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddp_wrapper.py", allow_abbrev=False, add_help=False)
    p.add_argument("--crash-at-epoch", type=int, default=0)
    p.add_argument("--save-rank-params", action="store_true")
    return p


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(wrapper options, the script's argv)``: the wrapper takes its own options (spelled out in
    full), the script gets the rest, in order."""
    return wrapper_parser().parse_known_args(argv)


def crash_hook(epoch_to_crash: int, output: str, rank: int, world: int):
    """``on_epoch_end``: the last rank dies once after ``epoch_to_crash`` (first attempt only)."""
    crash_rank = world - 1

    def hook(epoch: int, row: dict) -> None:
        if epoch != epoch_to_crash or rank != crash_rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        with open(os.path.join(output, f"crash_rank{rank}_epoch{epoch}.marker"), "w") as f:
            f.write(f"rank {rank} of {world} crashed after epoch {epoch}\n")
        print(f"rank {rank}: simulated crash after epoch {epoch}", file=sys.stderr, flush=True)
        os._exit(1)

    return hook


def spy_ddp() -> list[bool]:
    """Record ``find_unused_parameters`` of every ``DistributedDataParallel`` built from now on."""
    from torch.nn.parallel import DistributedDataParallel

    seen: list[bool] = []
    init = DistributedDataParallel.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(bool(self.find_unused_parameters))

    DistributedDataParallel.__init__ = recording_init
    return seen


def main(argv: list[str] | None = None) -> int:
    opts, script_argv = split_argv(sys.argv[1:] if argv is None else argv)
    script = load_script()
    args = script.parse_args(script_argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    hook = crash_hook(opts.crash_at_epoch, args.output, rank, world) if opts.crash_at_epoch else None
    ddp_settings = spy_ddp() if opts.save_rank_params else []
    result = script.run(args, on_epoch_end=hook)
    if opts.save_rank_params:
        import torch

        model = result.model
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(args.output, f"rank{rank}_params.pt"))
        info = {
            "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
            "find_unused_parameters": ddp_settings,
        }
        with open(os.path.join(args.output, f"rank{rank}_ddp.json"), "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    if "RANK" in os.environ:  # as the script does: a worker's traceback goes into torchrun's summary
        from torch.distributed.elastic.multiprocessing.errors import record

        sys.exit(record(main)())
    sys.exit(main())
