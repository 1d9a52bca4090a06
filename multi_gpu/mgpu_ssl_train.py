"""
Self-supervised pre-training of the 3D ViT autoencoder (MONAI ViTAutoEnc) on one process or many
(DistributedDataParallel under torchrun). The recipe itself (transforms, model, the loss r + c * r,
validation, checkpoints, resume) is ``ssl_utils.pretrain.pretrain``, the same function the
notebook calls; this script starts the processes, passes the flags through and logs.
``--pretext mae`` pre-trains a masked autoencoder (MONAI MaskedAutoEncoderViT) instead, through the
same loop; its encoder loads into UNETR the same way.

One process (one GPU, or the CPU):

    python multi_gpu/mgpu_ssl_train.py --preset demo
    python multi_gpu/mgpu_ssl_train.py --data_root /data/TCIA_Covid19 \\
        --json_path json_files/tcia_covid19/dataset_split.json --output runs/ssl_paper

One node with N GPUs (one process per GPU):

    torchrun --standalone --nproc_per_node=N multi_gpu/mgpu_ssl_train.py --data_root ... --epochs 500

Two nodes with 8 GPUs each: run on both nodes, with --node_rank=0 on the first (whose address is
MASTER) and --node_rank=1 on the second:

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=MASTER --master_port=29500 \\
        multi_gpu/mgpu_ssl_train.py --data_root ...
    # or, with the c10d rendezvous (same command on every node, no node rank needed):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=MASTER:29500 \\
        --rdzv-id=ssl1 multi_gpu/mgpu_ssl_train.py --data_root ...

Recovering from a crashed worker: add ``--max-restarts=3`` to torchrun and ``--resume`` to the
script; every restart continues from ``<output>/last_model.pt`` (the log says from which epoch).

What it writes:
    --output        best_model.pt, last_model.pt (state_dict, optimizer, epoch, scheduler, scaler,
                    RNG, config, history), history.json, history.csv
    --logdir_path   train.log (what rank 0 printed) and, with --tensorboard, tensorboard/
Both default to <repo>/runs/mgpu_ssl. Relative paths are taken from the current folder; a
relative --data_root / --json_path that does not exist there is looked up from the repository
root, so the defaults work from the repository root and from multi_gpu/.

Sizes: --batch_size is volumes per GPU per step, each giving 2 random crops (both are used), so
one step sees world_size * batch_size * 2 crop pairs. --base_lr is the learning rate as given;
when adding GPUs at a fixed per-GPU batch, the linear scaling rule (lr proportional to the global
batch, e.g. 1e-4 on one GPU -> 4e-4 on four) is a reasonable start, with --warmup_epochs 5 or so.
--global_negatives makes the contrastive loss compare each view with the views of every GPU.

Cohorts larger than memory: --cache disk --cache_dir DIR keeps the resampled volumes in DIR
instead of each process's memory; the first run fills it, later runs and resumed runs reuse it
(docs/clusters.md: where to put it, SLURM, measured scaling).

Without --data_root the embedded synthetic CT cohort is used (generated once under
<repo>/data/synthetic at the preset's size; --preset demo for a CPU-sized run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
import warnings
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_JSON = os.path.join("json_files", "tcia_covid19", "dataset_split.json")
DEFAULT_LOGDIR = os.path.join(REPO, "runs", "mgpu_ssl")


# -----------------------------------------------------------------------------
# flags
# -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgpu_ssl_train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data_root", default="", help="folder the datalist's paths are relative to; empty: the embedded synthetic cohort")
    g.add_argument("--json_path", default="", help=f"datalist JSON with 'training' and 'validation' lists (default with --data_root: {DEFAULT_JSON})")
    g.add_argument("--logdir_path", default=DEFAULT_LOGDIR, help="folder for train.log and TensorBoard (default: <repo>/runs/mgpu_ssl)")
    g.add_argument("--output", default="", help="folder for best_model.pt / last_model.pt and history (default: --logdir_path)")
    g.add_argument("--skip_bad", action="store_true", help="drop unreadable datalist entries (listed in the log) instead of stopping")
    g.add_argument("--num_workers", type=int, default=None, help="data-loader worker processes per GPU (default: preset's)")
    g.add_argument("--cache", default=None, choices=["memory", "disk"], help="where the resampled volumes wait between epochs: memory (each process holds its share) or disk (--cache_dir; reused by later runs and every process; docs/clusters.md)")
    g.add_argument("--cache_dir", default="", help="folder of the disk cache (a local SSD or a shared file system)")
    g = p.add_argument_group("recipe (defaults: the preset's values)")
    g.add_argument("--preset", default="paper", choices=["paper", "demo", "smoke"], help="paper: the reference's recipe (GPU); demo: CPU minutes; smoke: CPU seconds (default: paper)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (paper: 500)")
    g.add_argument("--batch_size", type=int, default=None, help="volumes per GPU per step, 2 crops each (paper: 4)")
    g.add_argument("--base_lr", type=float, default=None, help="Adam learning rate, used as given (paper: 1e-4; see the linear scaling note above)")
    g.add_argument("--warmup_epochs", type=int, default=None, help="epochs of linear learning-rate warm-up (paper: 0; useful with a scaled --base_lr)")
    g.add_argument("--pretext", default=None, choices=["views", "mae"], help="views: the reference's two corrupted views (ViTAutoEnc, L1 + contrastive); mae: masked autoencoder (MaskedAutoEncoderViT, loss on the masked patches) (default: the preset's, views)")
    g.add_argument("--mask_ratio", type=float, default=None, help="with --pretext mae: fraction of the patches masked (default: the preset's, 0.75)")
    g.add_argument("--temperature", type=float, default=None, help="contrastive temperature (paper: 0.05)")
    g.add_argument("--global_negatives", action="store_true", help="contrastive negatives from every GPU's views (differentiable all-gather)")
    g.add_argument("--val_every", type=int, default=None, help="validate every this many epochs (paper: 2)")
    g.add_argument("--seed", type=int, default=None, help="random seed (paper: 123)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    g = p.add_argument_group("downstream signal while training (rank 0 probes, the others wait)")
    g.add_argument("--probe_every", type=int, default=None, help="every this many epochs, score the encoder with a short linear probe on labeled volumes (default: 0 = off)")
    g.add_argument("--probe_json", default="", help="labeled datalist for the probe (fits on the first 'training' entries, scores on the next; default: the embedded cohort's)")
    g.add_argument("--probe_data_root", default="", help="folder --probe_json's paths are relative to (default: the JSON file's folder)")
    g.add_argument("--select_by", default=None, choices=["val_recon", "probe"], help="best_model.pt: lowest validation L1 (default, the reference) or highest probe Dice")
    g = p.add_argument_group("run")
    g.add_argument("--amp", default=None, choices=["auto", "bf16", "fp16", "off"], help="pre-training's mixed precision (default: the preset's ssl_amp, else its amp: auto = bf16 where supported, fp16 on older GPUs, off on CPUs without bf16; the demo preset pre-trains in fp32)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cuda or cpu")
    g.add_argument("--resume", action="store_true", help="continue from <output>/last_model.pt when it exists")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to <logdir_path>/tensorboard")
    return p


def input_path(path: str) -> str:
    """An input path: as given when it exists (or is absolute), else from the repository root."""
    path = os.path.expanduser(path)
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    from_repo = os.path.join(REPO, path)
    return from_repo if os.path.exists(from_repo) else os.path.abspath(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_root:
        args.data_root = input_path(args.data_root)
        if not os.path.isdir(args.data_root):
            parser.error(f"--data_root {args.data_root}: folder not found")
        args.json_path = input_path(args.json_path or DEFAULT_JSON)
        if not os.path.isfile(args.json_path):
            parser.error(f"--json_path {args.json_path}: file not found")
    elif args.json_path:
        parser.error("--json_path was given without --data_root (the folder its paths are relative to)")
    args.logdir_path = os.path.abspath(os.path.expanduser(args.logdir_path))
    args.output = os.path.abspath(os.path.expanduser(args.output)) if args.output else args.logdir_path
    if args.probe_json:
        args.probe_json = input_path(args.probe_json)
        if not os.path.isfile(args.probe_json):
            parser.error(f"--probe_json {args.probe_json}: file not found")
    if args.probe_data_root:
        args.probe_data_root = input_path(args.probe_data_root)
    if args.probe_every is not None and args.probe_every < 0:
        parser.error(f"--probe_every must be 0 or more, got {args.probe_every}")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        parser.error(f"--warmup_epochs must be 0 or more, got {args.warmup_epochs}")
    for name in ("epochs", "batch_size", "val_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    from ssl_utils.config import ConfigError

    try:  # a combination the config refuses (e.g. --select_by probe without --probe_every) fails here
        make_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return args


# -----------------------------------------------------------------------------
# processes
# -----------------------------------------------------------------------------


def init_process_group(backend: str, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    """Join the process group torchrun (or another launcher) describes in the environment.

    Under torchrun the workers share the launcher's key-value store across restarts; each
    attempt gets its own key prefix here, or a restarted worker reads the previous attempt's
    (dead) addresses and cannot connect (seen with torch 2.13, gloo and NCCL alike).
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"mgpu_ssl_train/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:  # env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), e.g. srun without torchrun
        dist.init_process_group(backend=backend, timeout=timeout)


# -----------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------


class DeviceUnavailable(Exception):
    """The requested device does not exist on this host (``main`` exits with code 2)."""


def choose_device(args: argparse.Namespace):
    """The device this process trains on: ``ssl_utils.runtime.select_device(--device)``, made current
    on CUDA (before NCCL joins the process group)."""
    import torch

    from ssl_utils.runtime import select_device

    try:
        device = select_device(args.device)
    except RuntimeError as exc:
        raise DeviceUnavailable(f"--device {args.device}: {exc}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def make_logger(logdir: str, is_master: bool) -> tuple[Callable[[str], None], str]:
    """``(log, log_file)``: rank 0 prints and appends to ``<logdir>/train.log``; the others stay quiet."""
    os.makedirs(logdir, exist_ok=True)
    log_file = os.path.join(logdir, "train.log")

    def log(msg: str) -> None:
        if is_master:
            print(msg, flush=True)
            with open(log_file, "a") as f:
                f.write(msg + "\n")

    return log, log_file


def log_joined(log: Callable[[str], None], device, ddp: bool, world_size: int) -> None:
    """One line: every host and the devices its processes run on."""
    import torch.distributed as dist

    joined = [(socket.gethostname(), str(device))]
    if ddp:
        joined = [None] * world_size
        dist.all_gather_object(joined, (socket.gethostname(), str(device)))
    hosts: dict[str, list[str]] = {}
    for host, dev in joined:
        hosts.setdefault(host, []).append(dev)
    log("joined: " + "; ".join(f"{h}: {len(d)} process(es) on {', '.join(sorted(set(d)))}" for h, d in hosts.items()))


def make_config(args: argparse.Namespace):
    """The preset with the recipe flags applied (``None``: the preset's value)."""
    from ssl_utils import get_config

    return get_config(
        args.preset,
        ssl_epochs=args.epochs,
        ssl_batch_size=args.batch_size,
        ssl_lr=args.base_lr,
        warmup_epochs=args.warmup_epochs,
        temperature=args.temperature,
        pretext=args.pretext,
        mae_mask_ratio=args.mask_ratio,
        ssl_val_every=args.val_every,
        seed=args.seed,
        deterministic=True if args.deterministic else None,
        ssl_amp=args.amp,  # this script only pre-trains: --amp is pre-training's precision
        num_workers=args.num_workers,
        cache=args.cache,
        cache_dir=os.path.abspath(os.path.expanduser(args.cache_dir)) if args.cache_dir else None,
        probe_every=args.probe_every,
        select_by=args.select_by,
    )


def log_setup(log: Callable[[str], None], args: argparse.Namespace, cfg, world_size: int, device, log_file: str) -> None:
    """Global batch, learning rate, negatives, data, outputs (and a note for the paper preset on a CPU)."""
    log(
        f"global batch: {world_size} x {cfg['ssl_batch_size']} volumes x {cfg['ssl_num_samples']} crops = "
        f"{world_size * cfg['ssl_batch_size'] * cfg['ssl_num_samples']} crop pairs per step; lr {cfg['ssl_lr']:g}; "
        f"contrastive negatives from {'all ranks' if args.global_negatives and world_size > 1 else 'the local batch'}"
    )
    log(f"data: {args.data_root or 'embedded synthetic cohort (' + os.path.join(REPO, 'data', 'synthetic') + ')'}"
        + (f", datalist {args.json_path}" if args.json_path else ""))
    log(f"checkpoints: {args.output}; log: {log_file}")
    if device.type == "cpu" and args.preset == "paper":
        log("note: the paper preset (ViT-B, 96^3 crops) is GPU-sized; --preset demo runs on a CPU in minutes")


def log_summary(log: Callable[[str], None], result, run_rows: list[dict], elapsed: float, world_size: int) -> None:
    """The last line: epochs, time, throughput after the first epoch, best validation."""
    if not run_rows:
        log(f"nothing to do: {result.last} already holds epoch {result.last_epoch}")
        return
    # the first epoch of a run also pays for warm-up (allocations, kernel selection)
    speeds = [row["crop_pairs_per_s"] for row in run_rows[1:]] or [run_rows[0]["crop_pairs_per_s"]]
    val = [row["val_recon"] for row in result.history if "val_recon" in row]
    log(
        f"done: epoch {result.last_epoch} reached in {elapsed / 60:.1f} min "
        f"({world_size} process(es), {sum(speeds) / len(speeds):.1f} crop pairs/s"
        f"{' after the first epoch' if len(run_rows) > 1 else ''}); "
        + (f"best val recon {min(val):.4f}; " if val else "")
        + f"best {result.best}, last {result.last}"
    )


def run(args: argparse.Namespace, on_epoch_end: Callable[[int, dict], None] | None = None):
    """Pre-train with the parsed flags: join the process group (under torchrun), log, call
    ``ssl_utils.pretrain.pretrain`` and log a summary; returns its ``PretrainResult``.

    ``on_epoch_end(epoch, row)`` is passed to ``pretrain`` (called on every rank after each
    epoch's checkpoint). Raises ``DeviceUnavailable`` when --device names a missing device.
    """
    import torch.distributed as dist

    from ssl_utils.pretrain import pretrain

    # DDP's reducer warns when a transposed convolution's weight gradient has another memory
    # layout than its bucket; the values are right, the copy is cheap.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; one process does not
    ddp = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = choose_device(args)
    backend = "nccl" if device.type == "cuda" else "gloo"
    log, log_file = make_logger(args.logdir_path, rank == 0)
    if ddp:
        # generous timeout: ranks meet after caching their shard, which can take minutes on real data
        init_process_group(backend, rank, world_size, timeout=datetime.timedelta(minutes=60))
    try:
        log(f"mgpu_ssl_train: world_size={world_size} backend={backend if ddp else 'none (single process)'} "
            f"device={device} preset={args.preset}")
        log_joined(log, device, ddp, world_size)
        cfg = make_config(args)
        log_setup(log, args, cfg, world_size, device, log_file)
        run_rows: list[dict] = []  # the epochs this run trained (a resumed history holds earlier ones too)

        def epoch_end(epoch: int, row: dict) -> None:
            run_rows.append(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)

        t0 = time.perf_counter()
        result = pretrain(
            cfg, data_root=args.data_root or None, json_path=args.json_path or None, logdir=args.output,
            resume=args.resume, device=device, progress=rank == 0 and sys.stderr.isatty(),
            tensorboard=os.path.join(args.logdir_path, "tensorboard") if args.tensorboard else False,
            skip_bad=args.skip_bad, global_negatives=args.global_negatives,
            probe_json=args.probe_json or None, probe_data_root=args.probe_data_root or None,
            cohort_root=os.path.join(REPO, "data", "synthetic"), log=log, on_epoch_end=epoch_end,
        )
        log_summary(log, result, run_rows, time.perf_counter() - t0, world_size)
        return result
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run; the exit code (2: a usage error such as a missing device)."""
    args = parse_args(argv)
    try:
        run(args)
    except DeviceUnavailable as exc:
        print(f"mgpu_ssl_train.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun: a worker's traceback goes into torchrun's summary
        from torch.distributed.elastic.multiprocessing.errors import record

        sys.exit(record(main)())
    sys.exit(main())
