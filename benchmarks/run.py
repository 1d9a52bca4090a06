#!/usr/bin/env python
"""Side-by-side benchmark: the reference tutorial's formulation against this project's defaults.

    python benchmarks/run.py --out runs/benchmark             # paper configuration (long on a CPU)
    python benchmarks/run.py --quick --out /tmp/bench         # tiny sizes: does every section run? (minutes)
    python benchmarks/run.py --sections pretrain,loss --steps 5 --warmup 2
    bash benchmarks/gpu_check.sh                              # the same at paper size on a GPU

Sections (``--sections``, comma separated, default all but ``e2e``):

- ``pretrain``: one ViTAutoEnc pre-training step (paper: ViT-B/16 at 96^3, 4 volumes x 2 crops).
  reference = two model calls (one per view), MONAI ``ContrastiveLoss(0.05)`` on the flattened
  reconstructions, einsum attention, fp32, plain Adam step; ours = ``ssl_forward`` (both views in
  one batch), ``ssl_loss``, SDPA, autocast per ``amp_dtype(device, "auto")``; ours_fp32 = the
  same without autocast.
- ``loss``: the contrastive loss alone (forward + backward) on ``[B, roi^3]``, MONAI against ours.
- ``attention``: one transformer block (forward + backward), einsum against SDPA attention.
- ``data``: two-view augmented crops per second from the second epoch on: plain
  ``monai.data.Dataset`` (every volume loaded and resampled every epoch, as the reference does)
  against ``SeededCacheDataset`` (deterministic stage cached), on synthetic CT volumes of a
  realistic size (512 x 512 x 95-135 voxels at about 0.75 x 0.75 x 2.5 mm).
- ``finetune``: one UNETR step (DiceCE, AdamW), einsum fp32 against SDPA + autocast.
- ``sliding``: sliding-window inference on one resampled volume (96^3 windows, 4 per batch).
- ``e2e`` (opt-in): ``ssl_utils.pretrain.pretrain`` on a synthetic cohort, crop pairs per second
  per device including data loading, from the second epoch on.

Timing: one process; the variants of a section alternate step by step (A B A B ...), so the drift
of a shared machine hits all of them alike; the median over the timed steps after warm-up is
reported, with the reference / ours ratio. CUDA is synchronised around every timed step.
Peak memory: each variant again in a fresh subprocess (CPU: the process's resident-set
high-water mark, ``VmHWM``; CUDA: ``torch.cuda.max_memory_allocated``), so one variant's peak
cannot hide another's.

Output: ``<out>/<name>.json`` and ``<out>/<name>.md`` (``--name`` defaults to the device type),
the JSON report and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

CHILD_TAG = "BENCH_CHILD "

# The performance targets the harness reports against (ratio = reference time / ours).
TARGETS = {
    "pretrain_step_default": ("pre-training step, ours (default) vs reference", ">=", 4.0),
    "pretrain_step_fp32": ("pre-training step, ours fp32 vs reference", ">=", 2.0),
    "pretrain_peak_memory": ("pre-training peak memory, ours / reference", "<=", 0.4),
    "data_pipeline": ("data pipeline, crops/s ours vs reference", ">=", 10.0),
    "finetune_step": ("fine-tuning step, ours vs reference", ">=", 1.5),
    "sliding_window": ("sliding-window inference, ours vs reference", ">=", 1.5),
}

ALL_SECTIONS = ("pretrain", "loss", "attention", "data", "finetune", "sliding", "e2e")
DEFAULT_SECTIONS = ("pretrain", "loss", "attention", "data", "finetune", "sliding")


def log(msg: str) -> None:
    """Progress lines go to stderr; stdout carries the report."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (``None`` defaults are explained in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark this project's pre-training / fine-tuning against the reference formulation "
        "(one process, variants alternating step by step; peak memory in fresh subprocesses).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", default="runs/benchmark", help="folder for <name>.json and <name>.md")
    p.add_argument("--name", default=None, help="report file name (default: the device type, e.g. cpu or cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a sanity run of every section in a few minutes")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated subset of {','.join(ALL_SECTIONS)}")
    p.add_argument("--memory", default=None,
                   help="sections whose peak memory is measured in fresh subprocesses, 'none' to skip "
                   "(default pretrain,loss; quick: pretrain)")
    g = p.add_argument_group("steps")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps per variant before timing (default 1; quick 1)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 3; quick 2)")
    g.add_argument("--ft-warmup", type=int, default=None, help="untimed fine-tuning steps (default: --warmup)")
    g.add_argument("--ft-steps", type=int, default=None, help="timed fine-tuning steps (default: --steps)")
    g.add_argument("--sw-steps", type=int, default=None,
                   help="timed sliding-window passes per variant (default 2; warm-up is one window per variant)")
    g.add_argument("--data-epochs", type=int, default=None, help="epochs per data variant, the first untimed (default 4)")
    g.add_argument("--mem-steps", type=int, default=2, help="steps per memory subprocess (2: includes optimiser state)")
    g = p.add_argument_group("sizes (default: the paper configuration)")
    g.add_argument("--roi", type=int, default=None, help="crop edge, voxels (paper 96)")
    g.add_argument("--hidden", type=int, default=None, help="ViT hidden size (paper 768)")
    g.add_argument("--mlp", type=int, default=None, help="ViT MLP size (paper 3072)")
    g.add_argument("--layers", type=int, default=None, help="ViT layers (paper 12; UNETR needs 12)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (paper 12)")
    g.add_argument("--volumes", type=int, default=None, help="volumes per pre-training step (paper 4)")
    g.add_argument("--crops", type=int, default=None, help="crops per volume (paper 2)")
    g.add_argument("--ft-crops", type=int, default=None, help="UNETR crops per step (paper 4)")
    g.add_argument("--feature-size", type=int, default=None, help="UNETR feature size (paper 16)")
    g.add_argument("--sw-shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="volume for sliding-window inference, voxels after resampling (default 250 250 125)")
    g.add_argument("--data-volumes", type=int, default=None, help="synthetic volumes for the data section (default 4)")
    g.add_argument("--data-shape", type=int, nargs=2, default=None, metavar=("X", "Y"),
                   help="in-plane voxels of the synthetic volumes (default 512 512)")
    g.add_argument("--data-spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="voxel size of the synthetic volumes, mm (default 0.75 0.75 2.5)")
    g = p.add_argument_group("end-to-end (section e2e)")
    g.add_argument("--e2e-volumes", type=int, default=16, help="training volumes in the synthetic cohort")
    g.add_argument("--e2e-epochs", type=int, default=3, help="epochs; crop pairs/s is reported from epoch 2 on")
    g.add_argument("--e2e-workers", type=int, default=None, help="DataLoader workers (default min(8, cores))")
    p.add_argument("--compile", action="store_true", help="add an 'ours_compiled' pre-training variant (torch.compile)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every size the workloads need, from the paper configuration, ``--quick`` and the flags."""
    from ssl_utils import get_config

    paper = get_config("paper")
    s: dict[str, Any] = {
        "roi": paper["roi"], "patch": paper["patch_size"], "hidden": paper["hidden_size"], "mlp": paper["mlp_dim"],
        "layers": paper["num_layers"], "heads": paper["num_heads"], "volumes": paper["ssl_batch_size"],
        "crops": paper["ssl_num_samples"], "ft_crops": paper["ft_num_samples"], "feature_size": paper["feature_size"],
        "temperature": paper["temperature"], "ssl_lr": paper["ssl_lr"], "ft_lr": paper["ft_lr"],
        "ft_wd": paper["ft_weight_decay"], "out_channels": paper["out_channels"],
        "sw_batch": paper["sw_batch_size"], "sw_overlap": paper["sw_overlap"], "sw_shape": [250, 250, 125],
        "data_volumes": 4, "data_shape": [512, 512], "data_spacing": [0.75, 0.75, 2.5],
        "ssl_spacing": list(paper["ssl_spacing"]),
        "warmup": 1, "steps": 3, "sw_steps": 2, "data_epochs": 4,
    }
    if args.quick:
        s.update(roi=32, hidden=48, mlp=96, heads=4, volumes=2, crops=2, ft_crops=2, feature_size=4,
                 sw_shape=[64, 64, 48], data_volumes=2, data_shape=[128, 128], data_spacing=[3.0, 3.0, 5.0],
                 ssl_spacing=[4.0, 4.0, 4.0], warmup=1, steps=2, sw_steps=1, data_epochs=3)
    flags = {
        "roi": args.roi, "hidden": args.hidden, "mlp": args.mlp, "layers": args.layers, "heads": args.heads,
        "volumes": args.volumes, "crops": args.crops, "ft_crops": args.ft_crops, "feature_size": args.feature_size,
        "sw_shape": args.sw_shape, "data_volumes": args.data_volumes, "data_shape": args.data_shape,
        "data_spacing": args.data_spacing, "warmup": args.warmup, "steps": args.steps, "sw_steps": args.sw_steps,
        "data_epochs": args.data_epochs,
    }
    s["ft_warmup"] = args.ft_warmup if args.ft_warmup is not None else (args.warmup if args.warmup is not None else s["warmup"])
    s["ft_steps"] = args.ft_steps if args.ft_steps is not None else (args.steps if args.steps is not None else s["steps"])
    s.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in flags.items() if v is not None})
    s["mem_steps"] = int(args.mem_steps)
    s["seed"] = int(args.seed)
    s["device"] = str(args.device)
    s["compile"] = bool(args.compile)
    if s["roi"] % s["patch"]:
        raise SystemExit(f"--roi {s['roi']} must be a multiple of the patch size {s['patch']}")
    if s["hidden"] % s["heads"]:
        raise SystemExit(f"--hidden {s['hidden']} must be divisible by --heads {s['heads']}")
    if min(s["steps"], s["ft_steps"], s["sw_steps"]) < 1 or min(s["warmup"], s["ft_warmup"]) < 0 or s["data_epochs"] < 2:
        raise SystemExit("need --steps, --ft-steps, --sw-steps >= 1, --warmup, --ft-warmup >= 0 and --data-epochs >= 2")
    return s


def model_config(s: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A project config (paper preset) with the benchmark's sizes."""
    from ssl_utils import get_config

    cfg = get_config(
        "paper", roi=s["roi"], hidden_size=s["hidden"], mlp_dim=s["mlp"], num_layers=s["layers"],
        num_heads=s["heads"], ssl_batch_size=s["volumes"], ssl_num_samples=s["crops"],
        ft_num_samples=s["ft_crops"], feature_size=s["feature_size"], ssl_spacing=tuple(s["ssl_spacing"]),
    )
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, library versions, bf16 support, GPU (if any), load average."""
    import monai

    from ssl_utils.runtime import amp_dtype, cpu_model, cpu_supports_bf16

    cpu = cpu_model()
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "cpu_bf16": cpu_supports_bf16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(device),
        "auto_precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device, "auto")],
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


# ------------------------------------------------------------------------------------------------
# workloads: each returns a zero-argument callable that runs one step
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ssl_batch(s: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, r = s["volumes"] * s["crops"], s["roi"]
    gt = torch.rand(n, 1, r, r, r, generator=g)
    v1 = gt * (torch.rand(n, 1, r, r, r, generator=g) > 0.2)
    v2 = gt * (torch.rand(n, 1, r, r, r, generator=g) > 0.2)
    return {"image": v1, "image_2": v2, "gt_image": gt}


def pretrain_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One pre-training step (forward both views, loss, backward, Adam step, loss.item())."""
    from monai.losses import ContrastiveLoss

    from ssl_utils.models import build_vitautoenc, set_sdpa
    from ssl_utils.pretrain import ssl_forward
    from ssl_utils.runtime import Precision, amp_dtype, optimizer_kwargs

    cfg = model_config(s)
    torch.manual_seed(s["seed"])
    # same initial weights for every variant; the reference is MONAI's model as the tutorial builds it
    model = build_vitautoenc(cfg, reference=variant == "reference").to(device)
    batch = _ssl_batch(s, s["seed"] + 1)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    # the reference: plain Adam; ours: as ssl_utils.pretrain builds it (fused where available)
    optimizer = torch.optim.Adam(model.parameters(), lr=s["ssl_lr"],
                                 **({} if variant == "reference" else optimizer_kwargs(device)))

    if variant == "reference":
        l1, cl = torch.nn.L1Loss(), ContrastiveLoss(temperature=s["temperature"])

        def step() -> None:
            v1 = batch["image"].to(device)
            v2 = batch["image_2"].to(device)
            gt = batch["gt_image"].to(device)
            optimizer.zero_grad()
            out1, _ = model(v1)
            out2, _ = model(v2)
            r = l1(out1, gt)
            c = cl(out1.flatten(start_dim=1), out2.flatten(start_dim=1))
            total = r + c * r
            total.backward()
            optimizer.step()
            total.item()

        return step

    if variant not in ("ours", "ours_fp32", "ours_compiled"):
        raise ValueError(f"unknown pre-training variant {variant!r}")
    set_sdpa(model, True)
    precision = Precision(device, None if variant == "ours_fp32" else amp_dtype(device, "auto"))
    train_model = torch.compile(model) if variant == "ours_compiled" else model

    def step() -> None:  # the body of ssl_utils.pretrain.pretrain's training loop
        optimizer.zero_grad(set_to_none=True)
        total, _, _, _, _ = ssl_forward(train_model, batch, cfg, precision)
        precision.scaler.scale(total).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total.item()

    return step


def loss_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """The contrastive loss alone, forward + backward, on ``[volumes*crops, roi^3]`` fp32."""
    from monai.losses import ContrastiveLoss

    from ssl_utils.losses import contrastive_loss

    g = torch.Generator().manual_seed(s["seed"] + 2)
    n, d = s["volumes"] * s["crops"], s["roi"] ** 3
    a = torch.rand(n, d, generator=g).to(device).requires_grad_(True)
    b = torch.rand(n, d, generator=g).to(device).requires_grad_(True)
    if variant == "reference":
        fn: Callable = ContrastiveLoss(temperature=s["temperature"])
    elif variant == "ours":
        def fn(x, y):
            return contrastive_loss(x, y, temperature=s["temperature"])
    else:
        raise ValueError(f"unknown loss variant {variant!r}")

    def step() -> None:
        a.grad = b.grad = None
        loss = fn(a, b)
        loss.backward()
        loss.item()

    return step


def attention_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One ViT transformer block, forward + backward, on ``[2*volumes*crops, tokens, hidden]``."""
    from monai.networks.blocks.transformerblock import TransformerBlock

    from ssl_utils.models import set_sdpa

    if variant not in ("einsum", "sdpa"):
        raise ValueError(f"unknown attention variant {variant!r}")
    torch.manual_seed(s["seed"])
    block = TransformerBlock(s["hidden"], s["mlp"], s["heads"]).to(device)
    set_sdpa(block, variant == "sdpa")
    tokens = (s["roi"] // s["patch"]) ** 3
    g = torch.Generator().manual_seed(s["seed"] + 3)
    x = torch.randn(2 * s["volumes"] * s["crops"], tokens, s["hidden"], generator=g).to(device).requires_grad_(True)

    def step() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.square().mean().backward()

    return step


def finetune_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One UNETR step on ``ft_crops`` crops: forward, DiceCE, backward, AdamW step, loss.item()."""
    from monai.losses import DiceCELoss

    from ssl_utils.models import build_unetr, prepare_model, set_sdpa
    from ssl_utils.runtime import Precision, amp_dtype, optimizer_kwargs

    cfg = model_config(s)
    torch.manual_seed(s["seed"])
    model = build_unetr(cfg, reference=variant == "reference").to(device)
    g = torch.Generator().manual_seed(s["seed"] + 4)
    r = s["roi"]
    x = torch.rand(s["ft_crops"], 1, r, r, r, generator=g).to(device)
    y = torch.randint(0, s["out_channels"], (s["ft_crops"], 1, r, r, r), generator=g).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["ft_lr"], weight_decay=s["ft_wd"],
                                  **({} if variant == "reference" else optimizer_kwargs(device)))
    if variant == "reference":

        def step() -> None:
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            loss.item()
            optimizer.step()
            optimizer.zero_grad()

        return step
    if variant != "ours":
        raise ValueError(f"unknown fine-tuning variant {variant!r}")
    set_sdpa(model, True)
    prepare_model(model, cfg, device)  # channels-last on CPU, as ssl_utils.finetune does
    precision = Precision(device, amp_dtype(device, "auto"))

    def step() -> None:  # the body of ssl_utils.finetune.finetune's training loop
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        loss.item()

    return step


def sliding_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """Sliding-window inference of UNETR over one ``sw_shape`` volume (roi windows, sw_batch per batch)."""
    from monai.inferers import sliding_window_inference

    from ssl_utils.models import build_unetr, prepare_model, set_sdpa
    from ssl_utils.runtime import Precision, amp_dtype

    cfg = model_config(s)
    torch.manual_seed(s["seed"])
    model = build_unetr(cfg, reference=variant == "reference").to(device).eval()
    g = torch.Generator().manual_seed(s["seed"] + 5)
    vol = torch.rand(1, 1, *s["sw_shape"], generator=g).to(device)
    roi = (s["roi"],) * 3
    window = torch.rand(1, 1, *roi, generator=g).to(device)
    if variant == "reference":
        with torch.no_grad():  # warm-up: one window (a whole pass is minutes on a CPU)
            model(window)

        def step() -> None:
            with torch.no_grad():
                out = sliding_window_inference(vol, roi, 4, model)
            out.sum().item()

        return step
    if variant != "ours":
        raise ValueError(f"unknown sliding-window variant {variant!r}")
    set_sdpa(model, True)
    prepare_model(model, cfg, device)
    precision = Precision(device, amp_dtype(device, "auto"))
    with torch.no_grad(), precision.autocast():
        model(window)

    def step() -> None:
        with torch.no_grad(), precision.autocast():
            out = sliding_window_inference(vol, roi, s["sw_batch"], model, overlap=s["sw_overlap"])
        out.sum().item()

    return step


WORKLOADS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "pretrain": (pretrain_workload, ("reference", "ours", "ours_fp32")),
    "loss": (loss_workload, ("reference", "ours")),
    "attention": (attention_workload, ("einsum", "sdpa")),
    "finetune": (finetune_workload, ("reference", "ours")),
    "sliding": (sliding_workload, ("reference", "ours")),
}


# ------------------------------------------------------------------------------------------------
# data pipeline
# ------------------------------------------------------------------------------------------------


def write_volumes(s: dict[str, Any], folder: str) -> list[dict[str, str]]:
    """``data_volumes`` synthetic TCIA-like CT volumes (int16 HU NIfTI) in ``folder``; datalist entries."""
    import nibabel as nib

    from ssl_utils.synthetic import generate_subject

    entries = []
    for i in range(s["data_volumes"]):
        image, _, affine = generate_subject(
            1000 + i, shape=tuple(s["data_shape"]), spacing=tuple(s["data_spacing"]), with_label=False, kind="tcia"
        )
        path = os.path.join(folder, f"volume-{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(image, affine), path)
        entries.append({"image": path, "shape": list(image.shape)})
        log(f"  wrote {path} {tuple(image.shape)} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return entries


def data_workloads(s: dict[str, Any], entries: list[dict]) -> tuple[dict[str, Callable[[], int]], dict[str, float]]:
    """One epoch over the volumes per call (returns the number of two-view crops produced)."""
    from monai.data import Dataset

    from ssl_utils.datasets import SeededCacheDataset
    from ssl_utils.transforms import pretrain_transforms

    cfg = model_config(s)
    files = [{"image": e["image"]} for e in entries]
    reference = Dataset(data=files, transform=pretrain_transforms(cfg))
    t0 = time.perf_counter()
    ours = SeededCacheDataset(files, pretrain_transforms(cfg), seed=s["seed"], cache_rate=1.0, num_workers=None)
    cache_s = time.perf_counter() - t0
    epoch = {"n": 0}

    def run_reference() -> int:
        return sum(len(reference[i]) for i in range(len(reference)))

    def run_ours() -> int:
        epoch["n"] += 1
        ours.set_epoch(epoch["n"])
        return sum(len(ours[i]) for i in range(len(ours)))

    return {"reference": run_reference, "ours": run_ours}, {"cache_fill_s": cache_s}


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------


def alternate(fns: dict[str, Callable], warmup: int, steps: int, device: torch.device, label: str) -> dict[str, list[float]]:
    """Run the variants in turn (A B A B ...): ``warmup`` untimed rounds, then ``steps`` timed rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            timed = i >= warmup
            if timed:
                times[name].append(dt)
            log(f"  {label}:{name} {'step' if timed else 'warm-up'} {i - warmup + 1 if timed else i + 1}: {dt:.3f} s")
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"times_s": [round(t, 4) for t in times], "median_s": statistics.median(times), "min_s": min(times)}


def paired_ratio(ref: list[float], ours: list[float]) -> float:
    """Median of the per-round ratios (each pair ran back to back, so drift cancels within it)."""
    return statistics.median(a / b for a, b in zip(ref, ours))


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # pragma: no cover
        return float("nan")


def _maxrss_mb() -> float:
    """This process's resident-set high-water mark, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: exec keeps the parent's peak at
    fork time in it, so a child of a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def child_main(args: argparse.Namespace) -> None:
    """Subprocess: build one variant, run ``mem_steps`` steps, print its memory as one JSON line."""
    s = json.loads(args.settings)
    device = torch.device(s["device"])
    from ssl_utils.runtime import configure_cpu

    if device.type == "cpu":
        configure_cpu()
    else:
        torch.cuda.set_device(device)
    if s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    section, variant = args.child.split(":")
    import monai  # noqa: F401  (imports counted in the baseline, not in the step)
    import ssl_utils  # noqa: F401

    baseline = _rss_mb()
    fn = WORKLOADS[section][0](variant, s, device)
    after_setup = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    steps = 1 if section == "sliding" else s["mem_steps"]
    for _ in range(steps):
        fn()
    out = {"rss_baseline_mb": baseline, "rss_after_setup_mb": after_setup, "peak_rss_mb": _maxrss_mb(), "steps": steps}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    print(CHILD_TAG + json.dumps(out), flush=True)


def measure_memory(section: str, variant: str, s: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one variant in a fresh Python process and return its peak memory report."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{section}:{variant}", "--settings", json.dumps(s)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"memory subprocess {section}:{variant} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1][len(CHILD_TAG):])
    out["peak_above_baseline_mb"] = out["peak_rss_mb"] - out["rss_baseline_mb"]
    log(f"  memory {section}:{variant}: peak RSS {out['peak_rss_mb']:.0f} MiB"
        + (f", CUDA peak {out['cuda_peak_mb']:.0f} MiB" if "cuda_peak_mb" in out else "")
        + f" ({time.perf_counter() - t0:.0f} s)")
    return out


def release_memory(device: torch.device) -> None:
    """Give freed memory back (so a later section's subprocesses have room)."""
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_key(device: torch.device) -> str:
    return "cuda_peak_mb" if device.type == "cuda" else "peak_rss_mb"


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------


def run_step_section(section: str, s: dict[str, Any], device: torch.device, memory: bool, same_as: dict[str, str]) -> dict[str, Any]:
    """Time the variants of one section alternately; optionally measure each one's peak memory."""
    factory, variants = WORKLOADS[section]
    variants = tuple(v for v in variants if v not in same_as)
    if section == "pretrain" and s.get("compile"):
        variants += ("ours_compiled",)
    mem: dict[str, Any] = {}
    if memory:  # first, while this process is small (a fresh subprocess per variant)
        mem = {v: measure_memory(section, v, s) for v in variants if v != "ours_compiled"}
    log(f"[{section}] building {', '.join(variants)}")
    fns = {v: factory(v, s, device) for v in variants}
    if section == "sliding":
        warmup, steps = 0, s["sw_steps"]  # each workload ran one window when it was built
    elif section == "finetune":
        warmup, steps = s["ft_warmup"], s["ft_steps"]
    else:
        warmup, steps = s["warmup"], s["steps"]
    times = alternate(fns, warmup, steps, device, section)
    del fns
    release_memory(device)
    result: dict[str, Any] = {"warmup": warmup, "steps": steps, "variants": {v: summary(t) for v, t in times.items()}}
    for alias, target in same_as.items():
        result["variants"][alias] = dict(result["variants"][target], same_as=target)
    base = "reference" if "reference" in times else "einsum"
    others = [v for v in result["variants"] if v != base]
    result["ratios"] = {
        v: result["variants"][base]["median_s"] / result["variants"][v]["median_s"] for v in others
    }
    result["paired_ratios"] = {v: paired_ratio(times[base], times[same_as.get(v, v)]) for v in others}
    if memory:
        for alias, target in same_as.items():
            mem[alias] = dict(mem[target], same_as=target)
        key = peak_key(device)
        for v, m in mem.items():
            result["variants"][v]["memory"] = m
        result["memory_ratios"] = {v: mem[v][key] / mem[base][key] for v in others if v in mem}
        result["memory_ratios_above_baseline"] = {
            v: mem[v]["peak_above_baseline_mb"] / mem[base]["peak_above_baseline_mb"] for v in others if v in mem
        }
    return result


def run_data_section(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    log(f"[data] writing {s['data_volumes']} synthetic volumes {s['data_shape']} at {s['data_spacing']} mm")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        entries = write_volumes(s, folder)
        fns, extra = data_workloads(s, entries)
        counts: dict[str, int] = {}

        def counted(name: str, fn: Callable[[], int]) -> Callable[[], None]:
            def run() -> None:
                counts[name] = fn()
            return run

        times = alternate({k: counted(k, f) for k, f in fns.items()}, 1, s["data_epochs"] - 1, torch.device("cpu"), "data")
        del fns
    release_memory(device)
    result: dict[str, Any] = {
        "volumes": [e["shape"] for e in entries],
        "crops_per_epoch": counts["ours"],
        "epochs_timed": s["data_epochs"] - 1,
        "cache_fill_s": extra["cache_fill_s"],
        "variants": {},
    }
    for v, t in times.items():
        rates = [counts[v] / x for x in t]
        result["variants"][v] = dict(summary(t), crops_per_s=statistics.median(rates))
    result["ratios"] = {"ours": result["variants"]["ours"]["crops_per_s"] / result["variants"]["reference"]["crops_per_s"]}
    result["paired_ratios"] = {"ours": paired_ratio(times["reference"], times["ours"])}
    return result


def run_e2e_section(s: dict[str, Any], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """``pretrain(...)`` on a synthetic cohort: crop pairs per second per device, data loading included."""
    from ssl_utils.pretrain import pretrain
    from ssl_utils.synthetic import make_synthetic_dataset

    workers = args.e2e_workers if args.e2e_workers is not None else min(8, os.cpu_count() or 1)
    cfg = model_config(s, ssl_epochs=int(args.e2e_epochs), ssl_val_every=10**6, num_workers=int(workers))
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as folder:
        log(f"[e2e] writing a cohort of {args.e2e_volumes} + 1 volumes {s['data_shape']}")
        info = make_synthetic_dataset(
            os.path.join(folder, "cohort"), n_unlabeled=int(args.e2e_volumes) + 1, n_unlabeled_val=1,
            n_labeled_train=1, n_labeled_val=0, train_sizes=(1,), shape=tuple(s["data_shape"]),
            spacing=tuple(s["data_spacing"]), progress=False, workers=min(8, os.cpu_count() or 1),
        )
        out = pretrain(cfg, info["tcia_root"], info["tcia_json"], logdir=os.path.join(folder, "run"),
                       device=str(device), progress=False, log=log)
    rows = out["history"]
    timed = rows[1:] if len(rows) > 1 else rows
    return {
        "volumes": int(args.e2e_volumes), "epochs": len(rows), "num_workers": workers,
        "precision": out["precision"].name,
        "crop_pairs_per_s_per_epoch": [r["crop_pairs_per_s"] for r in rows],
        "crop_pairs_per_s": statistics.median(r["crop_pairs_per_s"] for r in timed),
        "epoch_time_s": [r["epoch_time_s"] for r in rows],
    }


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def check_targets(sections: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    measured: dict[str, float | None] = {}
    p = sections.get("pretrain")
    if p:
        measured["pretrain_step_default"] = p["ratios"].get("ours")
        measured["pretrain_step_fp32"] = p["ratios"].get("ours_fp32")
        measured["pretrain_peak_memory"] = p.get("memory_ratios", {}).get("ours")
    if "data" in sections:
        measured["data_pipeline"] = sections["data"]["ratios"]["ours"]
    if "finetune" in sections:
        measured["finetune_step"] = sections["finetune"]["ratios"]["ours"]
    if "sliding" in sections:
        measured["sliding_window"] = sections["sliding"]["ratios"]["ours"]
    rows = []
    for key, (what, op, goal) in TARGETS.items():
        value = measured.get(key)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        rows.append({"key": key, "what": what, "target": f"{op} {goal:g}", "measured": value, "met": met})
    return rows


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def markdown(report: dict[str, Any]) -> str:
    m, sec = report["machine"], report["sections"]
    dev = "cuda" if str(m["device"]).startswith("cuda") else "cpu"
    lines = [
        f"# Benchmark: reference formulation vs ours ({m.get('gpu', m['cpu'])})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['torch_threads']} torch threads, "
        f"{m['cpu_capability']}), {m.get('memory_gb', '?')} GB RAM"
        + (f"; GPU {m['gpu']} ({m['gpu_memory_gb']} GB), CUDA {m['cuda']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, MONAI {m['monai']}, Python {m['python']}.  ",
        f"Precision chosen by `amp=\"auto\"` here: **{m['auto_precision']}** (CPU bf16 support: {m['cpu_bf16']}).  ",
        f"Load average at start / end: {m.get('load_average_start')} / {m.get('load_average_end')}; "
        f"total wall time {report['wall_time_s'] / 60:.1f} min.",
        "",
        "Times are medians over the timed steps; variants alternated step by step in one process. "
        "Ratio = reference time / ours (higher is better); paired ratio = median of the per-round ratios; "
        "memory ratio = ours / reference peak (lower is better). Steps = warm-up + timed steps per variant "
        "(sliding window: warm-up is one window per variant).",
        "",
        "| workload | reference | ours | ratio | paired ratio | steps | memory ref -> ours | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    key = "cuda_peak_mb" if dev == "cuda" else "peak_rss_mb"

    def row(name: str, s: dict[str, Any], base: str, v: str, what: str) -> None:
        r, o = s["variants"][base], s["variants"][v]
        mem = mr = "-"
        if "memory" in r and "memory" in o:
            mem = f"{r['memory'][key] / 1024:.2f} -> {o['memory'][key] / 1024:.2f} GiB"
            mr = f"{s['memory_ratios'][v]:.2f}x"
        if name == "data":
            ref_s, our_s = f"{r['crops_per_s']:.2f} crops/s", f"{o['crops_per_s']:.1f} crops/s"
            steps = f"{s['epochs_timed']} epochs"
        else:
            ref_s, our_s = _fmt_s(r["median_s"]), _fmt_s(o["median_s"])
            steps = f"{s['warmup']}+{s['steps']}"
        lines.append(f"| {what} | {ref_s} | {our_s} | **{s['ratios'][v]:.2f}x** | {s['paired_ratios'][v]:.2f}x | {steps} | {mem} | {mr} |")

    if "pretrain" in sec:
        p = sec["pretrain"]
        note = " (= fp32 here)" if p["variants"]["ours"].get("same_as") else ""
        row("pretrain", p, "reference", "ours", f"pre-training step, ours default{note}")
        row("pretrain", p, "reference", "ours_fp32", "pre-training step, ours fp32")
        if "ours_compiled" in p["variants"]:
            row("pretrain", p, "reference", "ours_compiled", "pre-training step, ours + torch.compile")
    if "loss" in sec:
        row("loss", sec["loss"], "reference", "ours", "contrastive loss alone (fwd+bwd)")
    if "attention" in sec:
        row("attention", sec["attention"], "einsum", "sdpa", "one transformer block, einsum -> SDPA (fwd+bwd)")
    if "data" in sec:
        row("data", sec["data"], "reference", "ours", "data pipeline, two-view crops/s")
    if "finetune" in sec:
        row("finetune", sec["finetune"], "reference", "ours", "UNETR fine-tuning step")
    if "sliding" in sec:
        row("sliding", sec["sliding"], "reference", "ours", "UNETR sliding-window inference")
    if "e2e" in sec:
        e = sec["e2e"]
        lines += ["", f"End-to-end `pretrain(...)` ({e['precision']}, {e['num_workers']} loader workers, "
                  f"{e['volumes']} volumes): **{e['crop_pairs_per_s']:.2f} crop pairs/s per device** "
                  f"(median of epochs 2..{e['epochs']}; per epoch {[round(x, 2) for x in e['crop_pairs_per_s_per_epoch']]})."]
    lines += ["", "Targets:", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        val = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} {t['target']} | {val} | {met} |")
    s = report["settings"]
    lines += [
        "",
        f"Sizes: ViT hidden {s['hidden']}, mlp {s['mlp']}, {s['layers']} layers, {s['heads']} heads, patch {s['patch']}, "
        f"ROI {s['roi']}^3; pre-training {s['volumes']} volumes x {s['crops']} crops (two views each); "
        f"UNETR feature {s['feature_size']}, {s['ft_crops']} crops; sliding window over {tuple(s['sw_shape'])} voxels, "
        f"{s['sw_batch']} windows per batch, overlap {s['sw_overlap']}; data: {s['data_volumes']} volumes "
        f"{tuple(s['data_shape'])} at {tuple(s['data_spacing'])} mm resampled to {tuple(s['ssl_spacing'])} mm.",
    ]
    if "data" in sec:
        lines.append(f"Data: volumes {sec['data']['volumes']}; our cache fill (once, before epoch 1) took "
                     f"{sec['data']['cache_fill_s']:.1f} s.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    from ssl_utils.runtime import configure_cpu, select_device

    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in sections if x not in ALL_SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; expected a subset of {list(ALL_SECTIONS)}")
    if args.memory is None:
        args.memory = "pretrain" if args.quick else "pretrain,loss"
    memory = {x.strip() for x in args.memory.split(",") if x.strip() and x.strip() != "none"}
    bad = memory - set(WORKLOADS)
    if bad:
        raise SystemExit(f"--memory: unknown section(s) {sorted(bad)}; expected a subset of {sorted(WORKLOADS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        configure_cpu()  # flush denormals: the whole process, so the reference gets it too
    else:
        torch.cuda.set_device(device)
    s = resolve_settings(args)
    s["device"] = str(device)
    s["threads"] = args.threads
    info = machine_info(device)
    log(f"machine: {info['cpu']}, {info['logical_cores']} cores, torch {info['torch']}, MONAI {info['monai']}, "
        f"device {device}, auto precision {info['auto_precision']}")
    from ssl_utils.runtime import amp_dtype

    # where "auto" resolves to fp32 the default and fp32 variants are the same computation: time it once
    same_as = {"ours": "ours_fp32"} if amp_dtype(device, "auto") is None else {}
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in sections:
        t0 = time.perf_counter()
        if name in WORKLOADS:
            results[name] = run_step_section(name, s, device, name in memory, same_as if name == "pretrain" else {})
        elif name == "data":
            results[name] = run_data_section(s, device)
        elif name == "e2e":
            results[name] = run_e2e_section(s, device, args)
        results[name]["section_wall_s"] = time.perf_counter() - t0
        log(f"[{name}] done in {results[name]['section_wall_s']:.0f} s")
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    cmd = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {
        "command": cmd.strip(),
        "machine": info,
        "settings": s,
        "sections": results,
        "targets": check_targets(results, device),
        "wall_time_s": time.perf_counter() - t_start,
    }
    name = args.name or device.type
    os.makedirs(args.out, exist_ok=True)
    md = markdown(report)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(md)
    print(json.dumps(report, indent=1, default=str))
    print()
    print(md)
    log(f"wrote {os.path.join(args.out, name)}.json and .md")
    return report


if __name__ == "__main__":
    main()
