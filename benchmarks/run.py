#!/usr/bin/env python
"""Side-by-side benchmark: the reference tutorial's formulation against this project's defaults.

    python benchmarks/run.py --out runs/benchmark             # paper configuration (long on a CPU)
    python benchmarks/run.py --quick --out /tmp/bench         # tiny sizes: does every section run? (minutes)
    python benchmarks/run.py --sections pretrain,loss --steps 5 --warmup 2
    bash benchmarks/gpu_check.sh                              # the same at paper size on a GPU

Sections (``--sections``, comma separated, default all but ``e2e``):

- ``pretrain``: one ViTAutoEnc pre-training step (paper: ViT-B/16 at 96^3, 4 volumes x 2 crops).
  reference = MONAI's plain model (``build_vitautoenc``), two model calls (one per view), MONAI
  ``ContrastiveLoss(0.05)`` on the flattened reconstructions, fp32, plain Adam step; ours = the
  library's step: ``ssl_utils.engine.train_step`` on a ``RunState`` of
  ``apply_speedups(build_vitautoenc(cfg), cfg, device)`` and Adam with ``optimizer_kwargs``,
  forward ``ssl_forward`` (both views in one batch, ``ssl_loss``, autocast per ``cfg["amp"]``,
  "auto"); ours_fp32 = the same with ``amp="off"``; ours_bf16_all = the same as ours with no part
  kept in fp32 (``fp32_parts=()``, the precision policy off: what "auto" ran before it).
- ``loss``: the contrastive loss alone (forward + backward) on ``[B, roi^3]``, MONAI against ours.
- ``attention``: one transformer block (forward + backward), einsum against SDPA attention.
- ``data``: two-view augmented crops per second from the second epoch on: plain
  ``monai.data.Dataset`` (every volume loaded and resampled every epoch, as the reference does)
  against ``SeededCacheDataset`` (deterministic stage cached), on synthetic CT volumes of a
  realistic size (512 x 512 x 95-135 voxels at about 0.75 x 0.75 x 2.5 mm).
- ``finetune``: one UNETR step (DiceCE, AdamW): MONAI's plain UNETR in a plain fp32 loop against
  ``train_step`` on ``apply_speedups(build_unetr(cfg), cfg, device)`` with fused AdamW and the
  fine-tuning loop's forward (autocast, DiceCE on ``logits.float()``); ours_fp32 = the same with
  ``amp="off"``.
- ``sliding``: sliding-window inference on one resampled volume (96^3 windows, 4 per batch): the
  plain UNETR against ``ssl_utils.finetune.inference.predict_logits`` on the sped-up one.
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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

CHILD_TAG = "BENCH_CHILD "

# The performance targets the harness reports against (ratio = reference time / ours):
# key -> (what, comparison, goal, section, the section's entry, variant).
TARGETS = {
    "pretrain_step_default": ("pre-training step, ours (default) vs reference", ">=", 4.0, "pretrain", "ratios", "ours"),
    "pretrain_step_fp32": ("pre-training step, ours fp32 vs reference", ">=", 2.0, "pretrain", "ratios", "ours_fp32"),
    "pretrain_peak_memory": ("pre-training peak memory, ours / reference", "<=", 0.4, "pretrain", "memory_ratios", "ours"),
    "data_pipeline": ("data pipeline, crops/s ours vs reference", ">=", 10.0, "data", "ratios", "ours"),
    "finetune_step": ("fine-tuning step, ours vs reference", ">=", 1.5, "finetune", "ratios", "ours"),
    "sliding_window": ("sliding-window inference, ours vs reference", ">=", 1.5, "sliding", "ratios", "ours"),
}

# The rows of the report's table: (section, baseline variant, variant, what).
ROWS = (
    ("pretrain", "reference", "ours", "pre-training step, ours default"),
    ("pretrain", "reference", "ours_fp32", "pre-training step, ours fp32"),
    ("pretrain", "reference", "ours_bf16_all", "pre-training step, ours in bf16 with no part kept in fp32"),
    ("pretrain", "reference", "ours_compiled", "pre-training step, ours + torch.compile"),
    ("loss", "reference", "ours", "contrastive loss alone (fwd+bwd)"),
    ("attention", "einsum", "sdpa", "one transformer block, einsum -> SDPA (fwd+bwd)"),
    ("data", "reference", "ours", "data pipeline, two-view crops/s"),
    ("finetune", "reference", "ours", "UNETR fine-tuning step"),
    ("finetune", "reference", "ours_fp32", "UNETR fine-tuning step, ours fp32"),
    ("sliding", "reference", "ours", "UNETR sliding-window inference"),
)

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
    g = p.add_argument_group("learning checks (sections pretrain, finetune, sliding)")
    g.add_argument("--check", default=None, choices=("demo", "smoke", "bench", "none"),
                   help="the learning check beside each timed variant: demo / smoke = that preset's model, recipe and "
                   "cohort; bench = the benchmark's sizes with the paper recipe on the demo cohort; none = no check "
                   "(default demo; quick: none)")
    g.add_argument("--check-steps", type=int, default=None, help="pre-training steps of the check (default 210: 30 demo epochs)")
    g.add_argument("--check-ft-steps", type=int, default=None, help="fine-tuning iterations of the check (default 200)")
    g.add_argument("--check-cohort", default="data/synthetic", help="where the check's embedded cohort is (generated when missing)")
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


def model_config(s: dict[str, Any], **overrides: Any) -> Any:
    """The project's ``Config`` (paper preset) with the benchmark's sizes and ``overrides``
    (``None`` values are ignored, as ``get_config`` does)."""
    from ssl_utils import get_config

    sizes = dict(
        roi=s["roi"], hidden_size=s["hidden"], mlp_dim=s["mlp"], num_layers=s["layers"], num_heads=s["heads"],
        ssl_batch_size=s["volumes"], ssl_num_samples=s["crops"], ft_num_samples=s["ft_crops"],
        feature_size=s["feature_size"], ssl_spacing=tuple(s["ssl_spacing"]),
    )
    return get_config("paper", **{**sizes, **overrides})


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# workloads: each returns a zero-argument callable that runs one step
#
# "reference": MONAI's plain model (``build_vitautoenc`` / ``build_unetr``) in a plain loop, as the
# reference tutorial writes it. "ours": the library itself: ``apply_speedups`` on the same model,
# a ``RunState`` as ``ssl_utils`` builds it, and ``ssl_utils.engine.train_step`` (pre-training,
# fine-tuning) or ``ssl_utils.finetune.inference.predict_logits`` (sliding window).
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_variant(what: str, variant: str, known: tuple[str, ...]) -> None:
    if variant not in known:
        raise ValueError(f"unknown {what} variant {variant!r}; expected one of {known}")


def _seeded_model(build: Callable, s: dict[str, Any], **overrides: Any) -> tuple[Any, torch.nn.Module]:
    """``(config, plain MONAI model on the CPU)``, built under the benchmark's seed: every variant
    starts from the same weights."""
    cfg = model_config(s, **overrides)
    torch.manual_seed(s["seed"])
    return cfg, build(cfg)


def _precision(cfg: Any, device: torch.device) -> Any:
    """The run's ``Precision`` as ``ssl_utils.engine.setup_run`` chooses it (``cfg["amp"]``)."""
    from ssl_utils.runtime import Precision, amp_dtype

    return Precision(device, amp_dtype(device, cfg["amp"]))


def _library_state(model: torch.nn.Module, make_optimizer: Callable, cfg: Any, device: torch.device) -> Any:
    """A ``RunState`` as the library builds one: ``apply_speedups`` (on the device), the library's
    optimiser (``pretrain_optimizer`` / ``finetune_optimizer``), the config's precision and clipping."""
    from ssl_utils.engine import RunState
    from ssl_utils.speedups import apply_speedups

    model = apply_speedups(model, cfg, device)
    return RunState(model, make_optimizer(model, cfg, device), _precision(cfg, device), cfg, grad_clip=cfg["grad_clip"])


def _ssl_batch(s: dict[str, Any], seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Two masked views and the clean crop, on the CPU (pinned for CUDA): every step copies them over."""
    g = torch.Generator().manual_seed(seed)
    n, r = s["volumes"] * s["crops"], s["roi"]
    gt = torch.rand(n, 1, r, r, r, generator=g)
    v1 = gt * (torch.rand(n, 1, r, r, r, generator=g) > 0.2)
    v2 = gt * (torch.rand(n, 1, r, r, r, generator=g) > 0.2)
    batch = {"image": v1, "image_2": v2, "gt_image": gt}
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def _reference_pretrain_step(model: torch.nn.Module, lr: float, temperature: float,
                             device: torch.device) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], Any]:
    """The reference's loop body as ``(step(batch) -> loss, optimizer)``: one model call per view,
    MONAI's ContrastiveLoss, plain Adam, fp32."""
    from monai.losses import ContrastiveLoss

    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    l1, cl = torch.nn.L1Loss(), ContrastiveLoss(temperature=temperature)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
        return total.detach()

    return step, optimizer


def pretrain_variant(variant: str, cfg: Any, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """One pre-training variant on the plain ``model``: ``{"step": step(batch) -> loss, "model",
    "precision", "optimizer"}``. ``ours`` / ``ours_fp32`` / ``ours_compiled``: the library's step
    (``train_step`` on ``ssl_forward``, the forward of ``ssl_utils.pretrain.train_epoch``) in
    ``cfg``'s precision (``ours_fp32``: fp32); ``reference``: the reference's loop, fp32."""
    from ssl_utils.pretrain import pretrain_optimizer, ssl_forward
    from ssl_utils.runtime import Precision

    _check_variant("pre-training", variant, ("reference", "ours", "ours_fp32", "ours_bf16_all", "ours_compiled"))
    if variant == "reference":
        step, optimizer = _reference_pretrain_step(model, cfg["ssl_lr"], cfg["temperature"], device)
        return {"step": step, "model": model, "precision": Precision(device, None), "optimizer": optimizer}
    if variant == "ours_fp32":
        cfg = cfg.replace(amp="off")
    if variant == "ours_bf16_all":  # the precision policy off: what amp="auto" ran before fp32_parts
        cfg = cfg.replace(fp32_parts=())
    state = _library_state(model, pretrain_optimizer, cfg, device)
    train_model = torch.compile(state.model) if variant == "ours_compiled" else state.model

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from ssl_utils import engine

        return engine.train_step(state, lambda: ssl_forward(train_model, batch, cfg, state.precision)[:3])[0]

    return {"step": step, "model": state.model, "precision": state.precision, "optimizer": state.optimizer}


def pretrain_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One pre-training step (forward both views, loss, backward, Adam step, loss.item())."""
    from ssl_utils.models import build_vitautoenc

    cfg, model = _seeded_model(build_vitautoenc, s)
    batch = _ssl_batch(s, s["seed"] + 1, device)
    step = pretrain_variant(variant, cfg, model, device)["step"]
    return lambda: step(batch).item()


def _backward_step(fn: Callable[[], torch.Tensor], zero: Callable[[], None]) -> Callable[[], None]:
    """``zero()``, then ``fn()`` and its backward; the loss read on the host."""

    def step() -> None:
        zero()
        loss = fn()
        loss.backward()
        loss.item()

    return step


def loss_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """The contrastive loss alone, forward + backward, on ``[volumes*crops, roi^3]`` fp32."""
    from monai.losses import ContrastiveLoss

    from ssl_utils.losses import contrastive_loss

    _check_variant("loss", variant, ("reference", "ours"))
    g = torch.Generator().manual_seed(s["seed"] + 2)
    n, d = s["volumes"] * s["crops"], s["roi"] ** 3
    a = torch.rand(n, d, generator=g).to(device).requires_grad_(True)
    b = torch.rand(n, d, generator=g).to(device).requires_grad_(True)
    if variant == "reference":
        reference = ContrastiveLoss(temperature=s["temperature"])
        fn = lambda: reference(a, b)  # noqa: E731
    else:
        fn = lambda: contrastive_loss(a, b, temperature=s["temperature"])  # noqa: E731

    def zero() -> None:
        a.grad = b.grad = None

    return _backward_step(fn, zero)


def attention_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One ViT transformer block, forward + backward, on ``[2*volumes*crops, tokens, hidden]``."""
    from monai.networks.blocks.transformerblock import TransformerBlock

    from ssl_utils.speedups import set_sdpa

    _check_variant("attention", variant, ("einsum", "sdpa"))
    torch.manual_seed(s["seed"])
    block = TransformerBlock(s["hidden"], s["mlp"], s["heads"]).to(device)
    set_sdpa(block, variant == "sdpa")
    tokens = (s["roi"] // s["patch"]) ** 3
    g = torch.Generator().manual_seed(s["seed"] + 3)
    x = torch.randn(2 * s["volumes"] * s["crops"], tokens, s["hidden"], generator=g).to(device).requires_grad_(True)

    def zero() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None

    return _backward_step(lambda: block(x).square().mean(), zero)


def finetune_variant(variant: str, cfg: Any, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """One fine-tuning variant on the plain UNETR ``model``: ``{"step": step(batch) -> loss, "model",
    "precision", "optimizer"}``. ``ours``: ``train_step`` on ``apply_speedups(model)`` with
    ``finetune_optimizer`` and the fine-tuning loop's forward (autocast per ``cfg["amp"]``, DiceCE on
    float32 logits); ``ours_fp32``: the same with ``amp="off"``; ``reference``: MONAI's plain UNETR in a
    plain fp32 loop with AdamW."""
    from monai.losses import DiceCELoss

    from ssl_utils.datasets import plain_tensor
    from ssl_utils.finetune.loop import finetune_optimizer, segmentation_forward
    from ssl_utils.runtime import Precision

    _check_variant("fine-tuning", variant, ("reference", "ours", "ours_fp32"))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if variant == "reference":
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["ft_lr"], weight_decay=cfg["ft_weight_decay"])

        def reference_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            x, y = (plain_tensor(batch[k]).to(device) for k in ("image", "label"))
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        return {"step": reference_step, "model": model, "precision": Precision(device, None), "optimizer": optimizer}
    if variant == "ours_fp32":
        cfg = cfg.replace(amp="off")
    state = _library_state(model, finetune_optimizer, cfg, device)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from ssl_utils import engine

        return engine.train_step(state, lambda: segmentation_forward(state.model, batch, loss_fn, state.precision))[0]

    return {"step": step, "model": state.model, "precision": state.precision, "optimizer": state.optimizer}


def finetune_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One UNETR step on ``ft_crops`` crops: forward, DiceCE, backward, AdamW step, loss.item()."""
    from ssl_utils.models import build_unetr

    cfg, model = _seeded_model(build_unetr, s, ft_lr=s["ft_lr"], ft_weight_decay=s["ft_wd"])
    g = torch.Generator().manual_seed(s["seed"] + 4)
    r = s["roi"]
    x = torch.rand(s["ft_crops"], 1, r, r, r, generator=g).to(device)
    y = torch.randint(0, s["out_channels"], (s["ft_crops"], 1, r, r, r), generator=g).to(device)
    step = finetune_variant(variant, cfg, model, device)["step"]
    batch = {"image": x, "label": y}
    return lambda: step(batch).item()


def sliding_workload(variant: str, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """Sliding-window inference of UNETR over one ``sw_shape`` volume (roi windows, sw_batch per batch)."""
    from monai.inferers import sliding_window_inference

    from ssl_utils.finetune.inference import predict_logits
    from ssl_utils.models import build_unetr
    from ssl_utils.runtime import Precision
    from ssl_utils.speedups import apply_speedups

    _check_variant("sliding-window", variant, ("reference", "ours"))
    cfg, model = _seeded_model(build_unetr, s)
    g = torch.Generator().manual_seed(s["seed"] + 5)
    vol = torch.rand(1, 1, *s["sw_shape"], generator=g).to(device)
    roi = (s["roi"],) * 3
    window = torch.rand(1, 1, *roi, generator=g).to(device)
    if variant == "reference":
        model, precision = model.to(device).eval(), Precision(device, None)
        infer = lambda: sliding_window_inference(vol, roi, 4, model)  # noqa: E731
    else:  # the library's inference: the sliding window of ssl_utils.finetune.evaluate
        model, precision = apply_speedups(model, cfg, device).eval(), _precision(cfg, device)
        infer = lambda: predict_logits(model, vol, cfg, precision)  # noqa: E731
    with torch.no_grad(), precision.autocast():  # warm-up: one window (a whole pass is minutes on a CPU)
        model(window)

    def step() -> None:
        with torch.no_grad():
            out = infer()
        out.sum().item()

    return step


WORKLOADS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "pretrain": (pretrain_workload, ("reference", "ours", "ours_fp32", "ours_bf16_all")),
    "loss": (loss_workload, ("reference", "ours")),
    "attention": (attention_workload, ("einsum", "sdpa")),
    "finetune": (finetune_workload, ("reference", "ours", "ours_fp32")),
    "sliding": (sliding_workload, ("reference", "ours")),
}


# ------------------------------------------------------------------------------------------------
# learning checks: every timed variant, the same step trained for a few hundred steps on CT crops
#
# A speed is only worth reporting for a setting that learns. Each timed pre-training and
# fine-tuning variant runs its own step function (``pretrain_variant`` / ``finetune_variant``, the
# ones the timing runs) for ``--check-steps`` / ``--check-ft-steps`` steps on the embedded cohort,
# every variant on the same crops in the same order, from the same weights and with the same
# learning-rate schedule; then pre-training reports its validation L1 as a multiple of predicting
# each crop's mean (fixed validation views) and fine-tuning its mean Dice on the labeled tuning
# split. The sliding-window check scores one trained UNETR (the fine-tuning check's reference) with
# both inferences. A variant fails when it is worse than the fp32 baseline by more than
# ``CHECK_TOLERANCE``; a failed variant is marked in the table and meets no target.
# ------------------------------------------------------------------------------------------------

# pre-training: val L1 / constant at most (1 + 0.05) x the fp32 baseline's; fine-tuning: tuning Dice at least the
# baseline's - 0.03 (a 200-step check: two formulations of the same maths drift apart by a point or two); sliding
# window: the same model's tuning Dice within 0.01 under both inferences
CHECK_TOLERANCE = {"pretrain": 0.05, "finetune": 0.03, "sliding": 0.01}
CHECK_BASELINE = {"pretrain": ("ours_fp32", "reference"), "finetune": ("reference",), "sliding": ("reference",)}


def check_config(s: dict[str, Any], kind: str, **overrides: Any) -> Any:
    """The learning check's settings: ``kind`` "demo" / "smoke" = that preset (model, recipe, cohort);
    "bench" = the benchmark's sizes with the paper recipe (``model_config``) on the demo preset's cohort."""
    from ssl_utils import get_config

    # the timed variants' precision ("ours": amp="auto", the paper preset's), whatever the preset's own
    base = dict(probe_every=0, amp="auto", ssl_amp="same", seed=s["seed"])
    if kind in ("demo", "smoke"):
        return get_config(kind, **{**base, **overrides})
    if kind != "bench":
        raise ValueError(f"--check {kind!r}: expected demo, smoke, bench or none")
    demo = get_config("demo")
    cohort = {k: demo[k] for k in demo if k.startswith("synth_")}
    return model_config(s, **{**cohort, **base, **overrides})


def _cohort(cfg: Any, root: str) -> dict[str, Any]:
    from ssl_utils.synthetic import make_cohort_from_config

    return make_cohort_from_config(cfg, root, progress=False)


def _epochs_of(loader_for_epoch: Callable[[int], Any], steps: int):
    """Batches of epoch 1, 2, ... (``loader_for_epoch(epoch)``) until ``steps`` batches were given."""
    done, epoch = 0, 0
    while done < steps:
        epoch += 1
        for batch in loader_for_epoch(epoch):
            if done == steps:
                return
            done += 1
            yield batch


def pretrain_check(variant: str, s: dict[str, Any], device: torch.device, kind: str, steps: int,
                   cohort_root: str) -> dict[str, Any]:
    """Train ``variant`` for ``steps`` steps on the cohort's unlabeled training crops (the cfg's
    warm-up and cosine schedule over ``steps``), then its validation L1 on the fixed views."""
    from monai.data import DataLoader

    from ssl_utils.data import load_datalist
    from ssl_utils.datasets import mix_seed, plain_tensor, pretrain_datasets
    from ssl_utils.models import build_vitautoenc
    from ssl_utils.pretrain import evaluate_ssl
    from ssl_utils.runtime import lr_lambda

    cfg = check_config(s, kind)
    info = _cohort(cfg, cohort_root)
    train, val = (load_datalist(info["tcia_json"], info["tcia_root"], k) for k in ("training", "validation"))
    train_ds, val_ds = pretrain_datasets(cfg, train, val, progress=False)
    bs = cfg["ssl_batch_size"]
    torch.manual_seed(cfg["seed"])
    v = pretrain_variant(variant, cfg, build_vitautoenc(cfg), device)
    per_epoch = -(-len(train_ds) // bs)
    schedule = lr_lambda(cfg["warmup_epochs"] * per_epoch, steps, cfg["cosine"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(v["optimizer"], schedule)

    def loader(epoch: int):
        train_ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(mix_seed(cfg["seed"], epoch))
        return DataLoader(train_ds, batch_size=bs, shuffle=True, generator=g, num_workers=0)

    t0 = time.perf_counter()
    losses = []
    for batch in _epochs_of(loader, steps):
        losses.append(float(v["step"]({k: plain_tensor(batch[k]) for k in ("image", "image_2", "gt_image")})))
        scheduler.step()
    seconds = time.perf_counter() - t0
    val_loader = DataLoader(val_ds, batch_size=bs, shuffle=False, num_workers=0)
    m = evaluate_ssl(v["model"], val_loader, cfg, v["precision"])
    return {"steps": steps, "precision": v["precision"].name, "val_l1": m["val_recon"], "const_l1": m["val_const_l1"],
            "metric": m["val_recon"] / m["val_const_l1"], "metric_name": "val L1 / constant",
            "final_train_loss": losses[-1], "seconds": seconds}


def _labeled(cfg: Any, cohort_root: str) -> tuple[list[dict], list[dict]]:
    """The cohort's largest labeled training list and its tuning list."""
    from ssl_utils.data import load_datalist

    info = _cohort(cfg, cohort_root)
    json_path = info["btcv_json"][max(info["btcv_json"])]
    return (load_datalist(json_path, info["btcv_root"], "training", require_label=True),
            load_datalist(json_path, info["btcv_root"], "tuning", require_label=True))


def _tuning_dice(model: torch.nn.Module, cfg: Any, tune_ds: Any, precision: Any) -> float:
    from monai.data import DataLoader

    from ssl_utils.finetune.inference import evaluate

    return float(evaluate(model, DataLoader(tune_ds, batch_size=1, shuffle=False, num_workers=0), cfg, precision)["mean_dice"])


def finetune_check(variant: str, s: dict[str, Any], device: torch.device, kind: str, steps: int,
                   cohort_root: str) -> tuple[dict[str, Any], torch.nn.Module, Any, Any]:
    """Train ``variant`` for ``steps`` iterations on the cohort's labeled training crops, then its
    mean Dice on the tuning split (its own precision). Returns ``(result, model, cfg, tuning dataset)``."""
    from monai.data import DataLoader

    from ssl_utils.datasets import finetune_datasets
    from ssl_utils.finetune import EpochSampler
    from ssl_utils.models import build_unetr

    cfg = check_config(s, kind)
    train, tune = _labeled(cfg, cohort_root)
    train_ds, tune_ds = finetune_datasets(cfg, train, tune, progress=False)
    torch.manual_seed(cfg["seed"])
    v = finetune_variant(variant, cfg, build_unetr(cfg), device)
    sampler = EpochSampler(len(train_ds), cfg["seed"])

    def loader(epoch: int):
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        return DataLoader(train_ds, batch_size=cfg["ft_batch_size"], sampler=sampler, num_workers=0)

    t0 = time.perf_counter()
    losses = [float(v["step"](batch)) for batch in _epochs_of(loader, steps)]
    seconds = time.perf_counter() - t0
    dice = _tuning_dice(v["model"], cfg, tune_ds, v["precision"])
    result = {"steps": steps, "precision": v["precision"].name, "metric": dice, "metric_name": "tuning Dice",
              "final_train_loss": losses[-1], "seconds": seconds}
    return result, v["model"], cfg, tune_ds


def sliding_check(trained: tuple[Any, ...], device: torch.device) -> dict[str, dict[str, Any]]:
    """One trained UNETR (plain, fp32 weights) scored on the tuning split by the reference's
    inference (the plain model, fp32) and by ours (``apply_speedups``, the run's precision)."""
    import copy

    from ssl_utils.runtime import Precision
    from ssl_utils.speedups import apply_speedups

    _, model, cfg, tune_ds = trained
    plain = copy.deepcopy(model).to(device)
    ours = apply_speedups(copy.deepcopy(model), cfg, device)
    out = {}
    for name, net, precision in (("reference", plain, Precision(device, None)), ("ours", ours, _precision(cfg, device))):
        t0 = time.perf_counter()
        out[name] = {"metric": _tuning_dice(net, cfg, tune_ds, precision), "metric_name": "tuning Dice, same weights",
                     "precision": precision.name, "seconds": time.perf_counter() - t0}
    return out


def judge_checks(section: str, checks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mark each check passed or failed against the section's fp32 baseline (``CHECK_BASELINE``)."""
    base_name = next((b for b in CHECK_BASELINE[section] if b in checks), None)
    if base_name is None:
        return checks
    base, tol = checks[base_name]["metric"], CHECK_TOLERANCE[section]
    for name, c in checks.items():
        c["baseline"] = base_name
        if section == "pretrain":  # lower is better
            c["passed"] = c["metric"] <= base * (1 + tol)
        elif section == "finetune":
            c["passed"] = c["metric"] >= base - tol
        else:
            c["passed"] = abs(c["metric"] - base) <= tol
    return checks


def run_checks(section: str, variants: tuple[str, ...], s: dict[str, Any], device: torch.device,
               args: argparse.Namespace, trained: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The learning checks of ``section``'s timed ``variants`` (``trained`` keeps the fine-tuning
    check's reference model for the sliding-window check)."""
    kind, root = args.check, args.check_cohort
    checks: dict[str, dict[str, Any]] = {}
    if section == "pretrain":
        for v in variants:
            checks[v] = pretrain_check(v, s, device, kind, args.check_steps, root)
            log(f"  check pretrain:{v}: val L1 / constant {checks[v]['metric']:.3f} ({checks[v]['seconds']:.0f} s)")
    elif section in ("finetune", "sliding"):
        if section == "finetune" or "finetune" not in trained:
            for v in (variants if section == "finetune" else ("reference",)):
                result, *rest = finetune_check(v, s, device, kind, args.check_ft_steps, root)
                if v == "reference":
                    trained["finetune"] = (result, *rest)
                if section == "finetune":
                    checks[v] = result
                    log(f"  check finetune:{v}: tuning Dice {result['metric']:.3f} ({result['seconds']:.0f} s)")
        if section == "sliding":
            checks = sliding_check(trained["finetune"], device)
            log("  check sliding: " + ", ".join(f"{k} {c['metric']:.4f}" for k, c in checks.items()))
    return judge_checks(section, checks)


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
    configure_device(device, s.get("threads"))
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


def run_step_section(section: str, s: dict[str, Any], device: torch.device, memory: bool, same_as: dict[str, str],
                     check: Callable[[tuple[str, ...]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time the variants of one section alternately; optionally measure each one's peak memory and
    (``check(variants)``) run each one's learning check."""
    factory, variants = WORKLOADS[section]
    variants = tuple(v for v in variants if v not in same_as)
    if section == "pretrain" and s.get("compile"):
        variants += ("ours_compiled",)
    mem: dict[str, Any] = {}
    if memory:  # first, while this process is small (a fresh subprocess per variant)
        mem = {v: measure_memory(section, v, s) for v in variants if v not in ("ours_compiled", "ours_bf16_all")}
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
    if check is not None:
        checks = check(variants if section != "pretrain" or not s.get("compile") else variants[:-1])
        for alias, target in same_as.items():
            if target in checks:
                checks[alias] = dict(checks[target], same_as=target)
        result["checks"] = checks
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


def learned(section: dict[str, Any], variant: str) -> bool | None:
    """Whether ``variant`` passed its learning check (None: not checked)."""
    c = section.get("checks", {}).get(variant)
    return None if c is None or "passed" not in c else bool(c["passed"])


def check_targets(sections: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Each target against its measurement; a variant whose learning check failed meets none."""
    rows = []
    for key, (what, op, goal, section, entry, variant) in TARGETS.items():
        value = sections.get(section, {}).get(entry, {}).get(variant)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        ok = learned(sections.get(section, {}), variant)
        if met and ok is False:
            met = False
        rows.append({"key": key, "what": what, "target": f"{op} {goal:g}", "measured": value, "met": met,
                     "learning_check": ok})
    return rows


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _header_lines(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    return [
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
    ]


def _table_row(name: str, s: dict[str, Any], base: str, v: str, what: str, key: str) -> str:
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
    if o.get("same_as"):
        what += f" (= {o['same_as']} here)"
    ratio = f"**{s['ratios'][v]:.2f}x**" if learned(s, v) is not False else f"{s['ratios'][v]:.2f}x (does not learn)"
    return (f"| {what} | {ref_s} | {our_s} | {ratio} | {s['paired_ratios'][v]:.2f}x | {steps} | {mem} | {mr} | "
            f"{_check_cell(s, base)} | {_check_cell(s, v)} |")


def _check_cell(sec: dict[str, Any], variant: str) -> str:
    """``0.71x const, pass`` / ``Dice 41.2%, **fails**`` / ``-`` (not checked)."""
    c = sec.get("checks", {}).get(variant)
    if c is None:
        return "-"
    value = f"{c['metric']:.3f}x const" if c["metric_name"].startswith("val L1") else f"Dice {100 * c['metric']:.1f}%"
    verdict = {True: "pass", False: "**fails**", None: "?"}[c.get("passed")]
    return f"{value} ({c['precision']}), {verdict}"


def _table_lines(sec: dict[str, Any], key: str) -> list[str]:
    lines = ["| workload | reference | ours | ratio | paired ratio | steps | memory ref -> ours | memory ratio "
             "| check, reference | check, ours |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, base, v, what in ROWS:
        if name in sec and v in sec[name]["variants"]:
            lines.append(_table_row(name, sec[name], base, v, what, key))
    if "e2e" in sec:
        e = sec["e2e"]
        lines += ["", f"End-to-end `pretrain(...)` ({e['precision']}, {e['num_workers']} loader workers, "
                  f"{e['volumes']} volumes): **{e['crop_pairs_per_s']:.2f} crop pairs/s per device** "
                  f"(median of epochs 2..{e['epochs']}; per epoch {[round(x, 2) for x in e['crop_pairs_per_s_per_epoch']]})."]
    return lines


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Targets:", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        val = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        if t.get("learning_check") is False:
            met += " (its learning check failed)"
        lines.append(f"| {t['what']} {t['target']} | {val} | {met} |")
    return lines


def _check_lines(report: dict[str, Any]) -> list[str]:
    """The learning checks' settings and every check's numbers."""
    sec = report["sections"]
    rows = [(name, v, c) for name in ("pretrain", "finetune", "sliding") for v, c in sec.get(name, {}).get("checks", {}).items()]
    if not rows:
        return ["", "Learning checks: not run (`--check none`)."]
    a = report["settings"].get("check", {})
    lines = [
        "", f"Learning checks (`--check {a.get('kind')}`): each timed variant's own step trained on the embedded cohort, "
        "every variant on the same crops in the same order, from the same weights, with the same schedule: pre-training "
        f"{a.get('steps')} steps, then the validation L1 on fixed views / the L1 of predicting each crop's mean (fails "
        f"when above {1 + CHECK_TOLERANCE['pretrain']:.2f}x the fp32 baseline's); fine-tuning {a.get('ft_steps')} "
        "iterations, then the mean Dice on the labeled tuning split (fails when more than "
        f"{100 * CHECK_TOLERANCE['finetune']:.0f} points below the reference's); sliding window: the fine-tuning check's "
        "reference model scored by both inferences (fails when they differ by more than "
        f"{100 * CHECK_TOLERANCE['sliding']:.0f} point). A variant that fails is marked and meets no target.",
        "", "| section | variant | precision | check | baseline | passed | check time |", "|---|---|---|---|---|---|---|",
    ]
    for name, v, c in rows:
        value = f"{c['metric']:.4f}" if c["metric_name"].startswith("val L1") else f"{100 * c['metric']:.2f}%"
        passed = {True: "yes", False: "**no**", None: "?"}[c.get("passed")]
        lines.append(f"| {name} | {v} | {c['precision']} | {c['metric_name']} {value} | {c.get('baseline', '-')} | "
                     f"{passed} | {c['seconds']:.0f} s |")
    return lines


def _sizes_lines(s: dict[str, Any], sec: dict[str, Any]) -> list[str]:
    lines = [
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
    return lines


def markdown(report: dict[str, Any]) -> str:
    sec = report["sections"]
    key = "cuda_peak_mb" if str(report["machine"]["device"]).startswith("cuda") else "peak_rss_mb"
    lines = (_header_lines(report) + _table_lines(sec, key) + _target_lines(report["targets"]) + _check_lines(report)
             + _sizes_lines(report["settings"], sec) + [""])
    return "\n".join(lines)


def _sections_and_memory(args: argparse.Namespace) -> tuple[list[str], set[str]]:
    """The sections to run and those whose peak memory is measured, checked."""
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
    return sections, memory


def configure_device(device: torch.device, threads: int | None) -> None:
    """Threads; on CPU flush denormals (the whole process, so the reference gets it too); on CUDA
    make ``device`` current."""
    from ssl_utils.runtime import configure_cpu

    if threads:
        torch.set_num_threads(int(threads))
    if device.type == "cpu":
        configure_cpu()
    else:
        torch.cuda.set_device(device)


def write_report(report: dict[str, Any], out: str, name: str) -> None:
    """``<out>/<name>.json`` and ``.md``; both printed on stdout."""
    os.makedirs(out, exist_ok=True)
    md = markdown(report)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    print(json.dumps(report, indent=1, default=str))
    print()
    print(md)
    log(f"wrote {os.path.join(out, name)}.json and .md")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return {}
    from ssl_utils.runtime import amp_dtype, machine_info, select_device

    sections, memory = _sections_and_memory(args)
    device = select_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    configure_device(device, args.threads)
    s = resolve_settings(args)
    s["device"] = str(device)
    s["threads"] = args.threads
    info = machine_info(device)
    log(f"machine: {info['cpu']}, {info['logical_cores']} cores, torch {info['torch']}, MONAI {info['monai']}, "
        f"device {device}, auto precision {info['auto_precision']}")
    # where "auto" resolves to fp32 the default, fp32 and no-fp32-part variants are the same computation: time it once
    same_as = {"ours": "ours_fp32", "ours_bf16_all": "ours_fp32"} if amp_dtype(device, "auto") is None else {}
    section_same_as = {name: {a: t for a, t in same_as.items() if a in WORKLOADS[name][1]} for name in WORKLOADS}
    if args.check is None:
        args.check = "none" if args.quick else "demo"
    args.check_steps = 210 if args.check_steps is None else int(args.check_steps)
    args.check_ft_steps = 200 if args.check_ft_steps is None else int(args.check_ft_steps)
    s["check"] = {"kind": args.check, "steps": args.check_steps, "ft_steps": args.check_ft_steps}
    trained: dict[str, Any] = {}
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in sections:
        t0 = time.perf_counter()
        if name in WORKLOADS:
            check = None
            if args.check != "none" and name in ("pretrain", "finetune", "sliding"):
                check = lambda variants, name=name: run_checks(name, variants, s, device, args, trained)  # noqa: E731
            results[name] = run_step_section(name, s, device, name in memory, section_same_as[name], check)
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
    write_report(report, args.out, args.name or device.type)
    return report


if __name__ == "__main__":
    main()
