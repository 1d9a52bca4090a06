"""Recipe sweeps: how the demo preset's choices were made, re-runnable.

    python -m ssl_utils.sweeps pretrain --out results/ssl_sweep            # every setting
    python -m ssl_utils.sweeps pretrain --out results/ssl_sweep --only h192_lr1e-3
    python -m ssl_utils.sweeps finetune --out results/ft_sweep             # fine-tuning, tuning split only
    python -m ssl_utils.sweeps precision --out results/precision           # bf16 against fp32, part by part
    python -m ssl_utils.sweeps precision --gradients_only                  # the same settings, one batch each
    python -m ssl_utils.sweeps temperature --out results/precision         # the loss terms' gradients
    python -m ssl_utils.sweeps conv-audit --out results/precision          # each convolution in bf16 vs fp64
    python -m ssl_utils.sweeps precision-finetune --out results/precision/finetune   # UNETR, bf16 and fp32

``pretrain``: each setting is the demo preset with a few overrides, pre-trained on the embedded
cohort's unlabeled *training* volumes and scored on its unlabeled *validation* volumes only
(fixed views): best validation L1 of view 1, the constant and copy baselines on the same views,
the best L1 as a multiple of the constant, and the wall time. No labeled volume is looked at.
Finished settings are reused (``<out>/settings/<name>.json``), so an interrupted sweep continues
where it stopped. The table is ``<out>/sweep.md``, the data ``<out>/sweep.json``; checkpoints and
histories go under ``--runs`` (default ``runs/ssl_sweep``).

``precision``: the demo preset's pre-training as it is, in fp32, in bf16 autocast with no part
kept in fp32, and in bf16 with one part at a time kept in fp32 (``fp32_parts``); fp32 and bf16 also
at two more seeds (the control: a run that escapes the reconstruction plateau by seed luck looks
like a precision effect). Each row also has the one-batch relative error of the encoder's gradient
against fp64 (``gradient_error``). Same files as ``pretrain`` (under ``results/precision``). With
``--gradients_only`` every setting gets that one-batch gradient check alone, untrained (``gradients.md``).

``precision-finetune``: the demo's fine-tuning recipe (random initialisation, ``FT_SWEEP_BASE``: the
tuning split, final Dice = mean of the last 3 evaluations) in bf16 autocast and in fp32, same seed, side
by side (``ssl_utils.parallel``). Same files as ``finetune``.

``conv-audit``: every convolution and transposed convolution of the demo's ViTAutoEnc and UNETR (as
``apply_speedups`` builds them, with ``fp32_parts=()``), and a grid of transposed convolutions, computed
once in bf16 and once in fp64 on random inputs of the layer's shape and layout: the relative error of
the output, of the input gradient and of the weight gradient (``conv_errors``). Table
``<out>/conv_audit.md``, data ``<out>/conv_audit.json``.

``temperature``: the demo pre-training (fp32) at the reference's temperature 0.05 and at the demo's 1.0;
after epochs 0 (untrained), 1, 5 and 20 (of 60) the gradient of each term of ``r + c * r`` on the unlabeled
validation crops: ``(1 + c) grad r`` and ``r grad c`` (their norms, ratio and cosine). Table
``<out>/temperature.md``, data ``<out>/temperature.json``.

``finetune``: each setting is the demo preset with ``FT_SWEEP_BASE`` and a few overrides, fine-tuned
from random initialisation (the pre-trained encoder plays no part in the choice) on the largest
training set and evaluated on the labeled cohort's *tuning* split only, never the validation split
that the demo and the study report. Table ``<out>/sweep.md``, figure ``<out>/sweep.png`` (Dice
against iteration per setting, per-organ final Dice), data ``<out>/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch

from .io import write_json, write_text

# Every setting starts from the demo preset with its pre-training settings as they were before the sweep
# (so that the table re-runs the same runs now that the demo preset follows the sweep's choice).
SWEEP_BASE: dict[str, Any] = dict(hidden_size=96, mlp_dim=192, num_heads=4, ssl_lr=2e-3, ssl_epochs=30, temperature=0.05,
                                  ssl_amp="same", probe_every=0)

# (name, overrides of SWEEP_BASE, why it is in the sweep)
PRETRAIN_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    # round 1: the demo ViT before this sweep, and wider tokens, at its 30 epochs (bf16 autocast on a bf16 CPU)
    ("demo_before", dict(hidden_size=96, mlp_dim=192, num_heads=4, ssl_lr=2e-3),
     "the demo ViT before this sweep (43x bottleneck: 4096 voxels per 96-d token)"),
    ("h192_lr1e-3", dict(hidden_size=192, mlp_dim=768, num_heads=4, ssl_lr=1e-3), "wider tokens: 21x bottleneck"),
    ("h384_lr5e-4", dict(hidden_size=384, mlp_dim=1536, num_heads=6, ssl_lr=5e-4), "11x bottleneck (ViT-B: 5x)"),
    # round 2: width did not help; at temperature 0.05 the contrastive gradient dominates the L1 one (c falls to
    # ~0 in a few hundred steps while the L1 stays near predicting 0), so: more steps, and the temperature.
    # fp32: for this small ViT the bf16 casts cost more than they save on a CPU (compare the last two rows).
    ("h96_t0.05_e60", dict(hidden_size=96, mlp_dim=192, num_heads=4, ssl_lr=1e-3, ssl_epochs=60, amp="off"),
     "twice the steps at the reference's temperature"),
    ("h96_t0.2_e60", dict(hidden_size=96, mlp_dim=192, num_heads=4, ssl_lr=1e-3, ssl_epochs=60, amp="off", temperature=0.2),
     "a softer contrastive term"),
    ("h96_t1_e60", dict(hidden_size=96, mlp_dim=192, num_heads=4, ssl_lr=1e-3, ssl_epochs=60, amp="off", temperature=1.0),
     "a soft contrastive term: its gradient no longer swamps the L1 one"),
    ("h192_t1_e60", dict(hidden_size=192, mlp_dim=768, num_heads=4, ssl_lr=1e-3, ssl_epochs=60, amp="off", temperature=1.0),
     "the same with wider tokens (21x bottleneck)"),
    ("h96_t1_e60_bf16", dict(hidden_size=96, mlp_dim=192, num_heads=4, ssl_lr=1e-3, ssl_epochs=60, amp="auto", temperature=1.0),
     "h96_t1_e60 with bf16 autocast where the CPU has it: time"),
]


def _row(name: str, overrides: dict[str, Any], why: str, result, seconds: float) -> dict[str, Any]:
    val = [r for r in result.history if "val_recon" in r]
    best = min(val, key=lambda r: r["val_recon"])
    epochs = [r["epoch_time_s"] for r in result.history]
    return {
        "name": name, "overrides": overrides, "why": why, "epochs": result.last_epoch,
        "best_epoch": best["epoch"], "best_val_l1": best["val_recon"], "best_val_l1_view2": best["val_recon_2"],
        "const_l1": best["val_const_l1"], "copy_l1_1": best["val_copy_l1_1"], "copy_l1_2": best["val_copy_l1_2"],
        "ratio_to_const": best["val_recon"] / best["val_const_l1"],
        "final_val_l1": val[-1]["val_recon"], "final_contrastive": val[-1]["val_contrastive"],
        "seconds": seconds, "s_per_epoch": sum(epochs) / max(len(epochs), 1),
        "parameters_m": sum(p.numel() for p in result.model.parameters()) / 1e6,
        "precision": result.precision.name,
    }


def _cohort_meta(cohort_root: str) -> dict[str, Any]:
    """The embedded cohort's generation parameters (``cohort.json``), or {} when there is none."""
    meta = os.path.join(cohort_root, "cohort.json")
    if not os.path.exists(meta):
        return {}
    with open(meta) as f:
        return json.load(f)


def _saved_row(settings_dir: str, name: str, overrides: dict[str, Any], log) -> dict[str, Any] | None:
    """A setting's finished row, when it was run with exactly these overrides (else None: run it)."""
    path = os.path.join(settings_dir, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("overrides") != json.loads(json.dumps(overrides)):
        return None
    log(f"[{name}] reused {path}")
    return saved


def _interrupted_run(logdir: str, cfg) -> bool:
    """Whether ``logdir`` holds an unfinished run of exactly ``cfg`` (then the sweep resumes it: the
    same weights and history as one uninterrupted run; its ``seconds`` then count this part only)."""
    from .checkpoint import load_checkpoint

    path = os.path.join(logdir, "last_model.pt")
    if not os.path.exists(path):
        return False
    saved = load_checkpoint(path).get("config") or {}
    return saved == json.loads(json.dumps(cfg.to_dict()))


def run_pretrain_sweep(out: str, only: list[str] | None = None, runs_root: str = "runs/ssl_sweep",
                       cohort_root: str = "data/synthetic", log=print, preset: str = "demo",
                       settings: list[tuple[str, dict[str, Any], str]] | None = None,
                       base: dict[str, Any] | None = None, header=None, table=None, extra=None) -> list[dict[str, Any]]:
    """Run (or reuse) every setting of ``settings`` (default ``PRETRAIN_SETTINGS``; those named in
    ``only``), each as ``preset`` with ``base`` (default ``SWEEP_BASE`` for the demo preset) and its
    overrides. A setting's saved row is reused when its overrides are unchanged. ``header(cohort_root)``
    and ``table(rows)`` write ``sweep.md`` (default: the recipe sweep's); ``extra(cfg, result)`` adds
    entries to a row."""
    from .config import get_config
    from .pretrain import pretrain

    settings_dir = os.path.join(out, "settings")
    os.makedirs(settings_dir, exist_ok=True)
    rows = []
    for name, overrides, why in PRETRAIN_SETTINGS if settings is None else settings:
        saved = _saved_row(settings_dir, name, overrides, log)
        if saved is not None:  # a finished setting is in the table even when ``only`` names others
            rows.append(saved)
            continue
        if only and name not in only:
            continue
        path = os.path.join(settings_dir, f"{name}.json")
        if base is None:
            base = SWEEP_BASE if preset == "demo" else {}
        cfg = get_config(preset, **{**base, **overrides})
        logdir = os.path.join(runs_root, name)
        resume = _interrupted_run(logdir, cfg)
        log(f"[{name}] {why}: {overrides}" + (" (resuming the interrupted run)" if resume else ""))
        t0 = time.perf_counter()
        result = pretrain(cfg, logdir=logdir, resume=resume, cohort_root=cohort_root, progress=False,
                          log=lambda msg: None)
        row = _row(name, overrides, why, result, time.perf_counter() - t0)
        if extra is not None:
            row.update(extra(cfg, result))
        write_json(path, row)
        log(f"[{name}] best val L1 {row['best_val_l1']:.4f} = {row['ratio_to_const']:.2f} x constant "
            f"({row['const_l1']:.4f}); {row['seconds']:.0f} s")
        rows.append(row)
    write_json(os.path.join(out, "sweep.json"), rows)
    write_text(os.path.join(out, "sweep.md"), (header or _sweep_header)(cohort_root) + (table or pretrain_table)(rows))
    return rows


def _sweep_header(cohort_root: str) -> str:
    from .runtime import machine_line

    cohort = _cohort_meta(cohort_root)
    return (
        "# Pre-training recipe sweep\n\n"
        "Each row is the demo preset with the pre-training settings it had before this sweep "
        f"({', '.join(f'{k}={v}' for k, v in SWEEP_BASE.items())}; amp auto = bf16 autocast on a bf16 CPU) "
        "and the changes named.\n\n"
        f"Machine: {machine_line()}; table written {time.strftime('%Y-%m-%d')}. "
        f"Data: the embedded cohort's unlabeled {cohort.get('unlabeled_kind', '?')} CT, "
        f"{cohort.get('n_unlabeled', '?')} volumes of which {cohort.get('n_unlabeled_val', '?')} validation; "
        "every number is on the validation volumes' fixed views (no labeled volume is read). "
        "L1 on the [0, 1] intensity scale; 'best / constant' is the best validation L1 of view 1 divided by the L1 "
        "of predicting each crop's mean on the same views (target: at most 0.70). Re-run: "
        "`python -m ssl_utils.sweeps pretrain --out results/ssl_sweep` (finished settings are reused).\n\n"
    )


def pretrain_table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | changes | epochs | best val L1 (view 1 / 2) | constant | copy view 1 / 2 | "
            "best / constant | precision | s per epoch | total s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        lines.append(
            f"| {r['name']} | {changes} | {r['epochs']} | {r['best_val_l1']:.4f} / {r['best_val_l1_view2']:.4f} "
            f"(epoch {r['best_epoch']}) | {r['const_l1']:.4f} | {r['copy_l1_1']:.4f} / {r['copy_l1_2']:.4f} | "
            f"**{r['ratio_to_const']:.2f}** | {r['precision']} | {r['s_per_epoch']:.1f} | {r['seconds']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


# ---- precision --------------------------------------------------------------------------------------
# The demo preset's pre-training as it is (60 epochs, temperature 1, Adam 1e-3, warm-up and cosine), without the
# probe monitor; each setting names its precision and the parts kept in fp32 under bf16 autocast.
PRECISION_BASE: dict[str, Any] = dict(probe_every=0)
_FP32, _BF16 = dict(ssl_amp="off", fp32_parts=()), dict(ssl_amp="bf16")
PRECISION_SEEDS = (1, 2)  # the control seeds, beside the preset's own (123)

PRECISION_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("fp32", _FP32, "fp32 throughout"),
    ("bf16", dict(_BF16, fp32_parts=()), "bf16 autocast as it was: every matmul and convolution in bf16"),
    ("bf16_layernorm", dict(_BF16, fp32_parts=("layernorm",)), "LayerNorms in fp32"),
    ("bf16_attention", dict(_BF16, fp32_parts=("attention",)), "self-attention (qkv, SDPA, output projection) in fp32"),
    ("bf16_mlp", dict(_BF16, fp32_parts=("mlp",)), "MLP blocks (both linear layers, the recomputed GELU) in fp32"),
    ("bf16_head", dict(_BF16, fp32_parts=("head_deconv1", "head_deconv2")),
     "the transposed-convolution reconstruction head in fp32"),
    ("bf16_loss_inputs", dict(_BF16, fp32_parts=("head_deconv2",)),
     "the loss's input (the head's last layer, the reconstruction) computed in fp32"),
    ("bf16_head_deconv1", dict(_BF16, fp32_parts=("head_deconv1",)),
     "the head's first layer alone in fp32 (tokens -> 16 channels, kernel 4)"),
    *[(f"{name}_seed{seed}", dict(overrides, seed=seed), f"{name} at seed {seed} (control)")
      for seed in PRECISION_SEEDS
      for name, overrides in (("fp32", _FP32), ("bf16", dict(_BF16, fp32_parts=())),
                              ("bf16_head_deconv1", dict(_BF16, fp32_parts=("head_deconv1",))))],
]


def gradient_error(cfg, batch: dict[str, torch.Tensor], precision=None) -> dict[str, float]:
    """How far one batch's gradient under ``cfg``'s pre-training precision is from fp64's.

    ViTAutoEnc is built at ``cfg``'s seed with ``apply_speedups`` (so with ``fp32_parts``); the same
    weights run once in fp64 and once in the run's precision (``ssl_precision(cfg)``, or
    ``precision``), through ``ssl_forward`` on ``batch``. Returns the median and the largest relative
    error ``|g - g64| / |g64|`` over the encoder's parameters (all but the reconstruction head) and the
    median over the head's. bf16 rounding gives about 1e-2; an error near 1 is a wrong gradient.
    """
    import copy

    from .models import build_vitautoenc
    from .pretrain import ssl_forward, ssl_precision
    from .runtime import Precision
    from .speedups import apply_speedups

    device = torch.device("cpu")
    precision = precision or ssl_precision(cfg, device)
    torch.manual_seed(cfg["seed"])
    model = apply_speedups(build_vitautoenc(cfg), cfg, device)
    reference = copy.deepcopy(model).double()

    def grads(net, prec, dtype):
        net.zero_grad(set_to_none=True)
        ssl_forward(net, {k: batch[k].to(dtype) for k in ("image", "image_2", "gt_image")}, cfg, prec)[0].backward()
        return {n: p.grad.double() for n, p in net.named_parameters() if p.grad is not None}

    ref, got = grads(reference, Precision(device, None), torch.float64), grads(model, precision, torch.float32)
    errors = {n: float((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref}
    encoder = [e for n, e in errors.items() if not n.startswith("conv3d_transpose")]
    head = [e for n, e in errors.items() if n.startswith("conv3d_transpose")]
    return {"grad_error_encoder_median": float(np.median(encoder)), "grad_error_encoder_max": float(max(encoder)),
            "grad_error_head_median": float(np.median(head)) if head else float("nan")}


def _first_val_batch(cfg, dataset) -> dict[str, torch.Tensor]:
    from monai.data import DataLoader

    from .datasets import plain_tensor

    batch = next(iter(DataLoader(dataset, batch_size=cfg["ssl_batch_size"], shuffle=False)))
    return {k: plain_tensor(batch[k]).float() for k in ("image", "image_2", "gt_image")}


def _precision_extra(cfg, result) -> dict[str, Any]:
    """The precision sweep's extra entries: seed, parts in fp32, threads, the gradient error."""
    return {"seed": cfg["seed"], "fp32_parts": list(cfg["fp32_parts"]) if result.precision.dtype is not None else [],
            "threads": int(torch.get_num_threads()),
            **gradient_error(cfg, _first_val_batch(cfg, result.val_dataset), result.precision)}


def run_precision_sweep(out: str = "results/precision", only: list[str] | None = None,
                        runs_root: str = "runs/precision", cohort_root: str = "data/synthetic", log=print,
                        preset: str = "demo") -> list[dict[str, Any]]:
    """The bisection of bf16 against fp32 on ``preset``'s pre-training (``PRECISION_SETTINGS``)."""
    return run_pretrain_sweep(out, only, runs_root, cohort_root, log, preset, settings=PRECISION_SETTINGS,
                              base=PRECISION_BASE, header=lambda root: _precision_header(root, preset), table=precision_table,
                              extra=_precision_extra)


def run_gradient_bisection(out: str = "results/precision", cohort_root: str = "data/synthetic", log=print,
                           preset: str = "demo") -> list[dict[str, Any]]:
    """The one-batch half of the bisection, for every setting of ``PRECISION_SETTINGS`` at the preset's seed:
    ``gradient_error`` of the untrained model on the first validation batch (no training, seconds per
    setting). Writes ``gradients.json`` / ``gradients.md`` in ``out``; the trained rows stay in ``sweep.md``."""
    from .config import get_config
    from .datasets import pretrain_data
    from .pretrain import resolve_ssl_data, ssl_precision

    rows = []
    batch = None
    for name, overrides, why in PRECISION_SETTINGS:
        if "seed" in overrides:
            continue
        cfg = get_config(preset, **{**PRECISION_BASE, **overrides})
        if batch is None:
            data_root, json_path = resolve_ssl_data(cfg, None, None, cohort_root)
            val = pretrain_data(cfg, json_path, data_root, progress=False, log=lambda msg: None).val
            batch = _first_val_batch(cfg, val)
        precision = ssl_precision(cfg, torch.device("cpu"))
        parts = list(cfg["fp32_parts"]) if precision.dtype is not None else []
        row = {"name": name, "why": why, "precision": precision.name, "fp32_parts": parts, "seed": cfg["seed"],
               **gradient_error(cfg, batch, precision)}
        rows.append(row)
        log(f"[{name}] encoder gradient error median {row['grad_error_encoder_median']:.1e} "
            f"(max {row['grad_error_encoder_max']:.1e}), head {row['grad_error_head_median']:.1e}")
    write_json(os.path.join(out, "gradients.json"), rows)
    write_text(os.path.join(out, "gradients.md"), _gradients_header(preset) + gradients_table(rows))
    return rows


def _gradients_header(preset: str) -> str:
    from .runtime import machine_line

    return (
        f"# Mixed precision, one batch: each bisection setting's gradient against fp64 ({preset} pre-training)\n\n"
        "Every setting of the bisection (results/precision/sweep.md) at the preset's seed, untrained: ViTAutoEnc built "
        "with the setting's precision policy, one validation batch (4 volumes x 2 fixed views) through the loss "
        "r + c r, the gradient compared with the same weights' gradient in fp64: relative error |g - g64| / |g64| "
        "per parameter, median and largest over the encoder's parameters (all but the reconstruction head), median "
        "over the head's. bf16 rounding alone gives about 1e-2; an error near 1 means the gradient is wrong, and "
        "every update built on it is noise. No training here: the trained rows are in sweep.md.\n\n"
        f"Machine: {machine_line()}; table written {time.strftime('%Y-%m-%d')}. Re-run: "
        "`python -m ssl_utils.sweeps precision --gradients_only --out results/precision` (seconds).\n\n"
    )


def gradients_table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | precision | kept in fp32 | encoder grad error, median | max | head grad error, median | "
            "gradient |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        verdict = "wrong" if r["grad_error_encoder_median"] > 0.1 else "right"
        lines.append(f"| {r['name']} | {r['precision']} | {', '.join(r['fp32_parts']) or '-'} | "
                     f"{r['grad_error_encoder_median']:.1e} | {r['grad_error_encoder_max']:.1e} | "
                     f"{r['grad_error_head_median']:.1e} | **{verdict}** |")
    return head + "\n".join(lines) + "\n"


def _precision_header(cohort_root: str, preset: str = "demo") -> str:
    from .config import get_config
    from .runtime import machine_line

    cfg = get_config(preset, **PRECISION_BASE)
    cohort = _cohort_meta(cohort_root)
    return (
        f"# Mixed precision: bf16 against fp32, part by part ({preset} pre-training)\n\n"
        f"Each row is the {preset} preset's pre-training as it is ({cfg['ssl_epochs']} epochs, Adam {cfg['ssl_lr']:g} "
        f"with {cfg['warmup_epochs']}-epoch warm-up and cosine decay, temperature {cfg['temperature']:g}, "
        f"{cfg['ssl_batch_size']} volumes x {cfg['ssl_num_samples']} crops of {cfg['roi']}^3 per step, ViT hidden "
        f"{cfg['hidden_size']}) with the precision named: fp32, or bf16 autocast with the listed parts kept in "
        "fp32 (`fp32_parts`). Seed 123 unless named; the validation views are fixed (val_seed "
        f"{cfg['val_seed']}) for every row. Data: the embedded cohort's unlabeled {cohort.get('unlabeled_kind', '?')} CT, "
        f"{cohort.get('n_unlabeled', '?')} volumes of which {cohort.get('n_unlabeled_val', '?')} validation; every "
        "number is on the validation volumes (no labeled volume is read).\n\n"
        "'best / constant': the best validation L1 of view 1 divided by the L1 of predicting each crop's mean on "
        "the same views; 'vs fp32': the best validation L1 against the fp32 run of the same seed. 'grad error': "
        "one validation batch through the untrained model at the row's seed and precision, the relative error "
        "|g - g64| / |g64| of each parameter's gradient against fp64, median (max) over the encoder's parameters "
        "(everything but the reconstruction head); bf16 rounding alone gives about 1e-2.\n\n"
        f"Machine: {machine_line()}; table written {time.strftime('%Y-%m-%d')}. The rows ran at different times with "
        "the threads named per row: some while other work shared the machine (load average up to 11), some two side "
        "by side on an otherwise idle machine, so the times per epoch are not comparable between rows (fp32 against "
        "bf16 is timed step by step, alternating, in benchmarks/results/cpu_demo_size.md). "
        "A setting interrupted and resumed counts only its last part in 'total s'. Re-run: "
        "`python -m ssl_utils.sweeps precision --out results/precision` (finished settings are reused).\n\n"
    )


def precision_table(rows: list[dict[str, Any]]) -> str:
    fp32 = {r.get("seed"): r["best_val_l1"] for r in rows if r["precision"] == "fp32"}
    head = ("| setting | precision | kept in fp32 | seed | best val L1 (epoch) | best / constant | vs fp32 | "
            "grad error, encoder median (max) | threads | s per epoch | total s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        ref = fp32.get(r.get("seed"))
        vs = f"{100 * (r['best_val_l1'] / ref - 1):+.1f}%" if ref else "-"
        parts = ", ".join(r.get("fp32_parts") or []) or "-"
        lines.append(
            f"| {r['name']} | {r['precision']} | {parts} | {r.get('seed', '?')} | {r['best_val_l1']:.4f} "
            f"({r['best_epoch']}) | **{r['ratio_to_const']:.2f}** | {vs} | {r['grad_error_encoder_median']:.1e} "
            f"({r['grad_error_encoder_max']:.1e}) | {r.get('threads', '?')} | {r['s_per_epoch']:.2f} | {r['seconds']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


# ---- bf16 against fp64, one convolution at a time --------------------------------------------------


def conv_errors(layer: torch.nn.Module, shape: tuple[int, ...], channels_last: bool = False, seed: int = 0) -> dict[str, float]:
    """Relative errors ``|x - x64| / |x64|`` of ``layer`` (``Conv3d`` / ``ConvTranspose3d``, its own
    weights, no bias) computed in bf16 against fp64 on a random input of ``shape`` (in channels-last
    3D layout when ``channels_last``) and a random output gradient: ``output``, ``grad_input`` and
    ``grad_weight``. bf16 rounding gives about 3e-3."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    transposed = isinstance(layer, torch.nn.ConvTranspose3d)
    fn = F.conv_transpose3d if transposed else F.conv3d
    kw = dict(stride=layer.stride, padding=layer.padding)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = layer.weight.detach().double()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    out = {}
    results = []
    for dtype in (torch.float64, torch.bfloat16):
        xi = x.to(dtype, copy=True).contiguous(memory_format=fmt).requires_grad_(True)
        wi = w.to(dtype, copy=True).requires_grad_(True)
        y = fn(xi, wi, **kw)
        if dtype == torch.float64:
            grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(grad.to(dtype).contiguous(memory_format=fmt))
        results.append((y.detach().double(), xi.grad.double(), wi.grad.double()))
    for name, ref, got in zip(("output", "grad_input", "grad_weight"), results[0], results[1]):
        out[name] = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    return out


def _conv_layers(model: torch.nn.Module, roi: int) -> list[tuple[str, torch.nn.Module, tuple[int, ...], bool]]:
    """``(name, layer, input shape, channels-last)`` of every 3D (transposed) convolution in one forward
    of a 2-crop batch."""
    found = []
    hooks = [m.register_forward_hook(lambda mod, inputs, output, name=name: found.append(
        (name, mod, tuple(inputs[0].shape), bool(inputs[0].dim() == 5 and not inputs[0].is_contiguous()
                                                 and inputs[0].is_contiguous(memory_format=torch.channels_last_3d)))))
             for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.no_grad():
        model(torch.rand(2, 1, roi, roi, roi))
    for h in hooks:
        h.remove()
    return found


def run_conv_audit(out: str = "results/precision", log=print) -> list[dict[str, Any]]:
    """``conv_errors`` of every (transposed) convolution in the demo's ViTAutoEnc and UNETR, and of
    transposed convolutions over a grid of kernels and output channels."""
    from .config import get_config
    from .models import build_unetr, build_vitautoenc
    from .speedups import apply_speedups

    cfg = get_config("demo", fp32_parts=())
    rows = []
    for model_name, build in (("ViTAutoEnc", build_vitautoenc), ("UNETR", build_unetr)):
        torch.manual_seed(0)
        model = apply_speedups(build(cfg), cfg, "cpu")
        for name, layer, shape, cl in _conv_layers(model, cfg["roi"]):
            rows.append({"model": model_name, "layer": name, "kind": type(layer).__name__,
                         "kernel": layer.kernel_size[0], "stride": layer.stride[0], "in": layer.in_channels,
                         "out": layer.out_channels, "input": list(shape), "channels_last": cl,
                         **conv_errors(layer, shape, cl)})
    for kernel in (2, 4):
        for out_channels in (1, 4, 8, 12, 16, 24, 32, 64):
            torch.manual_seed(0)
            layer = torch.nn.ConvTranspose3d(32, out_channels, kernel, kernel, bias=False)
            shape = (2, 32, 4, 4, 4)
            rows.append({"model": "grid", "layer": f"ConvTranspose3d(32, {out_channels}, {kernel}, stride {kernel})",
                         "kind": "ConvTranspose3d", "kernel": kernel, "stride": kernel, "in": 32, "out": out_channels,
                         "input": list(shape), "channels_last": False, **conv_errors(layer, shape)})
    layer, shape = torch.nn.ConvTranspose3d(32, 16, 4, 4, bias=False), (2, 32, 4, 4, 4)
    with torch.backends.mkldnn.flags(enabled=False):  # the same layer without oneDNN: PyTorch's own kernels
        rows.append({"model": "grid, oneDNN off", "layer": "ConvTranspose3d(32, 16, 4, stride 4)", "kind": "ConvTranspose3d",
                     "kernel": 4, "stride": 4, "in": 32, "out": 16, "input": list(shape), "channels_last": False,
                     **conv_errors(layer, shape)})
    for r in rows:
        log(f"{r['model']:10s} {r['layer']:45s} grad_input {r['grad_input']:.1e}")
    write_json(os.path.join(out, "conv_audit.json"), rows)
    write_text(os.path.join(out, "conv_audit.md"), _conv_audit_header() + conv_audit_table(rows))
    return rows


def _conv_audit_header() -> str:
    from .runtime import machine_line

    return (
        "# Each convolution in bf16 against fp64\n\n"
        "Every 3D convolution and transposed convolution of the demo's ViTAutoEnc and UNETR (48^3, hidden 96, UNETR "
        "feature 8, as `apply_speedups` builds them: UNETR in channels-last 3D on a CPU), on random inputs of the shape "
        "it sees in a 2-crop forward pass, and a grid of transposed convolutions (32 input channels): the relative "
        "error |x - x64| / |x64| of the output, the input gradient and the weight gradient computed in bf16 against "
        "fp64. bf16 rounding alone gives about 3e-3; **bold**: above 0.05.\n\n"
        f"Machine: {machine_line()} "
        f"(oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}); table written {time.strftime('%Y-%m-%d')}. "
        "Re-run: `python -m ssl_utils.sweeps conv-audit --out results/precision` (seconds).\n\n"
    )


def conv_audit_table(rows: list[dict[str, Any]]) -> str:
    def cell(x: float) -> str:
        return f"**{x:.1e}**" if x > 0.05 else f"{x:.1e}"

    head = ("| model | layer | kernel / stride | channels in -> out | input | output | input gradient | weight gradient |"
            "\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['model']} | {r['layer']} | {r['kernel']} / {r['stride']} | {r['in']} -> {r['out']} | "
             f"{'x'.join(map(str, r['input']))}{' (channels-last)' if r['channels_last'] else ''} | {cell(r['output'])} | "
             f"{cell(r['grad_input'])} | {cell(r['grad_weight'])} |" for r in rows]
    return head + "\n".join(lines) + "\n"


# ---- the loss terms' gradients at two temperatures ------------------------------------------------
TEMPERATURES = (0.05, 1.0)
TEMPERATURE_EPOCHS = (0, 1, 5, 20)  # gradients measured after these epochs (0: the untrained model)


def loss_term_gradients(model, batch: dict[str, torch.Tensor], cfg, precision) -> dict[str, float]:
    """The two terms of the gradient of ``r + c * r`` on ``batch``: ``(1 + c) grad r`` (reconstruction)
    and ``r grad c`` (contrastive), over all parameters and over the encoder alone (all but the
    reconstruction head): their norms, the ratio contrastive / reconstruction and their cosine."""
    from .pretrain import ssl_forward

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    _, r, c, _, _ = ssl_forward(model, batch, cfg, precision)
    grad_r = torch.autograd.grad(r, params, retain_graph=True, allow_unused=True)
    grad_c = torch.autograd.grad(c, params, allow_unused=True)
    grad_r, grad_c = ([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in (grad_r, grad_c))
    out: dict[str, float] = {"r": float(r.detach()), "c": float(c.detach())}
    encoder = [i for i, (n, _) in enumerate(named) if not n.startswith("conv3d_transpose")]
    for scope, idx in (("all", range(len(named))), ("encoder", encoder)):
        a = (1 + float(c)) * torch.cat([grad_r[i].reshape(-1) for i in idx]).double()
        b = float(r) * torch.cat([grad_c[i].reshape(-1) for i in idx]).double()
        out[f"{scope}_recon_term"], out[f"{scope}_contrastive_term"] = float(a.norm()), float(b.norm())
        out[f"{scope}_ratio"] = float(b.norm() / a.norm().clamp_min(1e-30))
        out[f"{scope}_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return out


def _validation_batch(cfg, dataset) -> dict[str, torch.Tensor]:
    """Every validation crop in one batch (fixed views)."""
    from monai.data import DataLoader

    from .datasets import plain_tensor

    parts = list(DataLoader(dataset, batch_size=cfg["ssl_batch_size"], shuffle=False))
    return {k: torch.cat([plain_tensor(b[k]).float() for b in parts]) for k in ("image", "image_2", "gt_image")}


def run_temperature_gradients(out: str = "results/precision", runs_root: str = "runs/temperature",
                              cohort_root: str = "data/synthetic", log=print) -> list[dict[str, Any]]:
    """Pre-train the demo recipe (fp32) at each of ``TEMPERATURES``, stopping after each of
    ``TEMPERATURE_EPOCHS`` (and resuming: the same weights as one uninterrupted run), then measure
    ``loss_term_gradients`` of every stored state on all validation crops. Each temperature's run
    starts afresh under ``runs_root``."""
    import shutil

    from .config import get_config
    from .models import build_vitautoenc
    from .pretrain import pretrain
    from .runtime import Precision

    rows = []
    for temperature in TEMPERATURES:
        cfg = get_config("demo", **PRECISION_BASE, temperature=temperature, ssl_amp="off")
        logdir = os.path.join(runs_root, f"t{temperature:g}")
        shutil.rmtree(logdir, ignore_errors=True)  # stop_after counts from epoch 0
        torch.manual_seed(cfg["seed"])
        states = [(0, build_vitautoenc(cfg).state_dict(), None)]  # the weights pretrain starts from
        val_ds = None
        for epoch in TEMPERATURE_EPOCHS[1:]:
            result = pretrain(cfg, logdir=logdir, resume=True, stop_after=epoch, cohort_root=cohort_root,
                              progress=False, log=lambda msg: None)
            last = result.history[-1]
            ratio = last["val_recon"] / last["val_const_l1"] if "val_recon" in last else None
            states.append((epoch, {k: v.detach().clone() for k, v in result.model.state_dict().items()}, ratio))
            val_ds = result.val_dataset
        batch = _validation_batch(cfg, val_ds)
        for epoch, state, ratio in states:
            model = build_vitautoenc(cfg)
            model.load_state_dict(state)
            row = {"temperature": temperature, "epoch": epoch, "val_l1_over_const": ratio,
                   **loss_term_gradients(model, batch, cfg, Precision(torch.device("cpu"), None))}
            rows.append(row)
            log(f"[t={temperature:g} epoch {epoch}] r {row['r']:.4f} c {row['c']:.4f} | encoder: reconstruction "
                f"term {row['encoder_recon_term']:.3e}, contrastive term {row['encoder_contrastive_term']:.3e} "
                f"(ratio {row['encoder_ratio']:.2f}, cosine {row['encoder_cosine']:+.2f})")
    write_json(os.path.join(out, "temperature.json"), rows)
    write_text(os.path.join(out, "temperature.md"), _temperature_header() + temperature_table(rows))
    return rows


def _temperature_header() -> str:
    from .config import get_config
    from .runtime import machine_line

    cfg = get_config("demo", **PRECISION_BASE)
    return (
        "# The loss terms' gradients at two temperatures (demo pre-training, fp32)\n\n"
        f"The demo preset's pre-training ({cfg['ssl_epochs']} epochs, Adam {cfg['ssl_lr']:g}, warm-up and cosine, fp32) "
        f"at temperature 0.05 (the reference's) and 1.0 (the demo's). The loss is r + c r, so its gradient is "
        "(1 + c) grad r + r grad c. After each epoch named, on all unlabeled validation crops (fixed views): the norm "
        "of each term over the encoder's parameters (all but the reconstruction head), their ratio (contrastive / "
        "reconstruction) and cosine, and the validation L1 / constant at that epoch (where validated).\n\n"
        f"Machine: {machine_line()}; table written {time.strftime('%Y-%m-%d')}. Re-run: "
        "`python -m ssl_utils.sweeps temperature --out results/precision`.\n\n"
    )


def temperature_table(rows: list[dict[str, Any]]) -> str:
    head = ("| temperature | after epoch | val L1 / constant | r | c | (1 + c) grad r | r grad c | ratio | cosine | "
            "ratio, all parameters |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        v = "-" if r["val_l1_over_const"] is None else f"{r['val_l1_over_const']:.2f}"
        lines.append(f"| {r['temperature']:g} | {r['epoch']} | {v} | {r['r']:.4f} | {r['c']:.4f} | "
                     f"{r['encoder_recon_term']:.2e} | {r['encoder_contrastive_term']:.2e} | **{r['encoder_ratio']:.2f}** | "
                     f"{r['encoder_cosine']:+.2f} | {r['all_ratio']:.2f} |")
    return head + "\n".join(lines) + "\n"


# the fine-tuning check of the precision policy: the demo's recipe, bf16 against fp32 (same seed, tuning split)
PRECISION_FT_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("ft_bf16", dict(amp="bf16"), "the demo's fine-tuning in bf16 autocast (amp='auto' on a bf16 CPU)"),
    ("ft_fp32", dict(amp="off"), "the same in fp32"),
]


# ---- fine-tuning ----------------------------------------------------------------------------------
# Every fine-tuning setting: the demo preset, random initialisation, evaluated on the tuning split every 100
# iterations, final Dice = the mean of the last 3 evaluations; no frozen warm-up (a random encoder has nothing
# to protect).
FT_SWEEP_BASE: dict[str, Any] = dict(ft_eval_split="tuning", ft_eval_every=100, ft_final_evals=3, freeze_encoder_iters=0)
FT_SWEEP_SEED = 0

# the pre-trained encoder of round 3: the demo preset's pre-training recipe (results/ssl_sweep, h96_t1_e60)
FT_SWEEP_ENCODER = "runs/ssl_sweep/h96_t1_e60/best_model.pt"
_DEMO_CANDIDATE = dict(roi=48, feature_size=8, ft_lr=4e-3, ft_crop="classes", ft_iterations=600)

FINETUNE_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    # round 1: the crop (where and how large), the network's width, at a fixed learning rate
    ("demo_before", dict(roi=48, feature_size=4, ft_lr=4e-3, ft_crop="posneg", ft_iterations=800),
     "the demo recipe before this sweep (48^3, feature 4, crops centred on any organ)"),
    ("r48_f8_posneg", dict(roi=48, feature_size=8, ft_lr=2e-3, ft_crop="posneg", ft_iterations=800),
     "UNETR feature 8"),
    ("r48_f8_classes", dict(roi=48, feature_size=8, ft_lr=2e-3, ft_crop="classes", ft_iterations=800),
     "class-balanced crop centres"),
    ("r64_f8_posneg", dict(roi=64, feature_size=8, ft_lr=2e-3, ft_crop="posneg", ft_iterations=600),
     "64^3 crops (more context, 2.4x the voxels)"),
    ("r64_f8_classes", dict(roi=64, feature_size=8, ft_lr=2e-3, ft_crop="classes", ft_iterations=600),
     "64^3 crops, class-balanced"),
    ("r48_f8_classes_lr4e-3", dict(roi=48, feature_size=8, ft_lr=4e-3, ft_crop="classes", ft_iterations=800),
     "class-balanced, twice the learning rate"),
    # round 2: 48^3 / feature 8 / class-balanced / lr 4e-3 learned fastest (64^3 crops cost 2x per iteration and were
    # not better per iteration); now the budget: the study's candidate and the demo's, each with a cosine decay to 0
    # so that the last evaluations (the final Dice is their mean) sit on a plateau, not on a slope. At 600 iterations
    # the decay came too early (33.9% against 45.6% at a constant rate, whose first 600 iterations are the same run)
    ("r48_f8_classes_lr4e-3_1500_cos", dict(roi=48, feature_size=8, ft_lr=4e-3, ft_crop="classes", ft_iterations=1500,
                                            ft_cosine=True), "the study's budget, cosine decay"),
    ("r48_f8_classes_lr4e-3_600_cos", dict(roi=48, feature_size=8, ft_lr=4e-3, ft_crop="classes", ft_iterations=600,
                                           ft_cosine=True), "the demo's budget, cosine decay"),
    # round 3: the encoder's schedule, which only matters to a pre-trained encoder; so both arms run and a schedule is
    # judged by the mean of the two (a schedule chosen on the pre-trained arm alone would favour it)
    *[(f"enc_{tag}_{ {'random': 'rand', 'pretrained': 'pre'}[arm]}", dict(_DEMO_CANDIDATE, arm=arm, **extra), why)
      for tag, extra, why in (("plain", {}, "no frozen warm-up, one learning rate (the reference's full fine-tuning)"),
                              ("freeze50", dict(freeze_encoder_iters=50), "encoder frozen for the first 50 iterations"),
                              ("mult0.25", dict(encoder_lr_mult=0.25), "the encoder at a quarter of the learning rate"))
      for arm in ("random", "pretrained")],
]


def finetune_setting(name: str, overrides: dict[str, Any], why: str, out: str, runs_root: str, cohort_root: str,
                     preset: str = "demo", n_train: int | None = None) -> dict[str, Any]:
    """One fine-tuning setting (random init, tuning split): run (or resume) it, write and return its row."""
    from .config import get_config
    from .finetune import finetune

    settings = {k: v for k, v in overrides.items() if k != "arm"}
    arm = overrides.get("arm", "random")
    cfg = get_config(preset, **{**FT_SWEEP_BASE, **settings, "seed": FT_SWEEP_SEED})
    n = int(n_train or max(cfg["synth_train_sizes"]))
    if arm == "pretrained" and not os.path.isfile(FT_SWEEP_ENCODER):
        raise FileNotFoundError(f"setting {name}: the pre-trained encoder {FT_SWEEP_ENCODER} is missing; run "
                                "python -m ssl_utils.sweeps pretrain --only h96_t1_e60 first")
    t0 = time.perf_counter()
    res = finetune(cfg, logdir=os.path.join(runs_root, name), use_pretrained=arm == "pretrained",
                   pretrained_path=FT_SWEEP_ENCODER if arm == "pretrained" else None, resume="auto", progress=False,
                   cohort_root=cohort_root, n_train=n, log=lambda msg: None)
    hist = res.history
    train_s = sum(r["train_time_s"] for r in hist)
    final = res.final or {}
    organs = final.get("per_organ", {})
    row = {
        "name": name, "overrides": overrides, "why": why, "arm": arm, "n_train": res.n_train, "n_tuning": res.n_val,
        "iterations": res.iteration, "curve": [[int(r["iteration"]), float(r["val_mean_dice"])] for r in hist],
        "final": float(final.get("mean_dice", float("nan"))), "final_organ": organs,
        "organs_over_50": sum(1 for v in organs.values() if v == v and v > 0.5),
        "best": max(r["val_mean_dice"] for r in hist), "s_per_iteration": train_s / max(res.iteration, 1),
        "eval_s": float(np.mean([r["eval_time_s"] for r in hist])), "seconds": time.perf_counter() - t0,
        "threads": int(torch.get_num_threads()), "precision": res.precision.name,
    }
    write_json(os.path.join(out, "settings", f"{name}.json"), row)
    return row


def run_finetune_sweep(out: str, only: list[str] | None = None, runs_root: str = "runs/ft_sweep",
                       cohort_root: str = "data/synthetic", log=print, preset: str = "demo", workers: int | None = None,
                       settings: list[tuple[str, dict[str, Any], str]] | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) every fine-tuning setting, ``workers`` at a time (default ``auto_workers()``);
    write ``sweep.json``, ``sweep.md`` and ``sweep.png`` under ``out``."""
    from .parallel import auto_workers, run_jobs
    from .synthetic import make_cohort_from_config

    make_cohort_from_config(preset, cohort_root, progress=False)  # once, before the workers read it
    os.makedirs(os.path.join(out, "settings"), exist_ok=True)
    chosen = [s for s in (FINETUNE_SETTINGS if settings is None else settings) if not only or s[0] in only]
    rows: dict[str, dict[str, Any]] = {}
    jobs = []
    for name, overrides, why in chosen:
        saved = _saved_row(os.path.join(out, "settings"), name, overrides, log)
        if saved is not None:
            rows[name] = saved
            continue
        jobs.append((finetune_setting, dict(name=name, overrides=overrides, why=why, out=out, runs_root=runs_root,
                                            cohort_root=cohort_root, preset=preset)))
    workers = auto_workers() if workers is None else int(workers)
    if jobs:
        log(f"{len(jobs)} settings to run, {workers} at a time")
    for _, row in run_jobs(jobs, workers):
        log(f"[{row['name']}] final Dice {100 * row['final']:.1f}% ({row['organs_over_50']} organs > 50%), "
            f"{row['s_per_iteration']:.2f} s per iteration, {row['seconds']:.0f} s")
        rows[row["name"]] = row
    ordered = [rows[s[0]] for s in chosen if s[0] in rows]
    write_json(os.path.join(out, "sweep.json"), ordered)
    write_text(os.path.join(out, "sweep.md"), _ft_header(cohort_root, workers) + finetune_table(ordered))
    plot_finetune_sweep(ordered, os.path.join(out, "sweep.png"))
    return ordered


def _ft_header(cohort_root: str, workers: int) -> str:
    from .runtime import machine_line

    cohort = _cohort_meta(cohort_root)
    return (
        "# Fine-tuning recipe sweep (tuning split)\n\n"
        "Each row is the demo preset with "
        f"{', '.join(f'{k}={v}' for k, v in FT_SWEEP_BASE.items())} and the changes named; random initialisation "
        f"(round 3, the encoder's schedule, also runs the demo recipe's pre-trained encoder, {FT_SWEEP_ENCODER}), "
        f"seed {FT_SWEEP_SEED}, the largest training set of the embedded cohort. Dice is measured on the labeled "
        f"cohort's tuning split ({cohort.get('n_labeled_tune', '?')} volumes), never on the validation split "
        f"({cohort.get('n_labeled_val', '?')} volumes) that the demo and the study report. Final = mean of the last "
        "3 evaluations; mean over the 13 organs.\n\n"
        f"Machine: {machine_line()}; {workers} settings ran side by side "
        f"({max(1, (os.cpu_count() or 1) // max(workers, 1))} thread(s) each); table written {time.strftime('%Y-%m-%d')}. "
        "Times per iteration are indicative: other work shared the machine during parts of the sweep (equal settings "
        "differed by up to 20%). "
        "Re-run: `python -m ssl_utils.sweeps finetune --out results/ft_sweep` (finished settings are reused).\n\n"
    )


def finetune_table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | changes | encoder | iterations | final Dice % (tuning) | best % | organs > 50% | s per iteration "
            "| total s |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items() if k != "arm")
        lines.append(f"| {r['name']} | {changes} | {r.get('arm', 'random')} | {r['iterations']} | **{100 * r['final']:.1f}** "
                     f"| {100 * r['best']:.1f} | {r['organs_over_50']} | {r['s_per_iteration']:.2f} | {r['seconds']:.0f} |")
    organs = list(rows[0]["final_organ"]) if rows else []
    org_head = "\n\nFinal Dice per organ (%):\n\n| setting | " + " | ".join(organs) + " |\n|---|" + "---|" * len(organs) + "\n"
    org_lines = [f"| {r['name']} | " + " | ".join(f"{100 * r['final_organ'].get(o, float('nan')):.0f}" for o in organs) + " |"
                 for r in rows]
    return head + "\n".join(lines) + org_head + "\n".join(org_lines) + "\n"


def plot_finetune_sweep(rows: list[dict[str, Any]], path: str | None = None):
    """Left: tuning-split mean Dice against iteration, one line per setting. Right: final Dice per organ."""
    import matplotlib.pyplot as plt

    fig, (ax, hm) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1, 1.25]})
    colours = plt.get_cmap("tab20")
    for k, r in enumerate(rows):
        its, dice = zip(*r["curve"]) if r["curve"] else ((), ())
        pre = r.get("arm") == "pretrained"
        ax.plot(its, [100 * d for d in dice], marker="o", ms=2.5, lw=1.2, color=colours(k % 20), ls="--" if pre else "-",
                label=f"{r['name']} ({r['s_per_iteration']:.2f} s/it)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("tuning-split mean Dice, 13 organs (%)")
    ax.set_title("fine-tuning sweep (dashed: pre-trained encoder)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    organs = list(rows[0]["final_organ"]) if rows else []
    data = np.array([[100 * r["final_organ"].get(o, np.nan) for o in organs] for r in rows]) if rows else np.zeros((0, 0))
    im = hm.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    hm.set_xticks(range(len(organs)), organs, rotation=60, ha="right", fontsize=7)
    hm.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                hm.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if data[i, j] < 50 else "black")
    hm.set_title("final Dice per organ (%), tuning split")
    fig.colorbar(im, ax=hm, fraction=0.03)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pretrain", help="the pre-training recipe sweep (unlabeled validation split only)")
    p.add_argument("--out", default="results/ssl_sweep", help="folder for the table and the data (default: results/ssl_sweep)")
    p.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    p.add_argument("--runs", default="runs/ssl_sweep", help="folder for the runs' checkpoints (default: runs/ssl_sweep)")
    p.add_argument("--cohort_root", default="data/synthetic", help="where the embedded cohort is (default: data/synthetic)")
    q = sub.add_parser("precision", help="bf16 against fp32 on the demo's pre-training, part by part")
    q.add_argument("--out", default="results/precision", help="folder for the table and the data (default: results/precision)")
    q.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    q.add_argument("--runs", default="runs/precision", help="folder for the runs' checkpoints (default: runs/precision)")
    q.add_argument("--cohort_root", default="data/synthetic", help="where the embedded cohort is (default: data/synthetic)")
    q.add_argument("--gradients_only", action="store_true",
                   help="no training: every setting's one-batch gradient error against fp64 (gradients.md, seconds)")
    pf = sub.add_parser("precision-finetune", help="the demo's fine-tuning in bf16 and in fp32 (tuning split)")
    pf.add_argument("--out", default="results/precision/finetune", help="folder for the table, figure and data")
    pf.add_argument("--runs", default="runs/precision_ft", help="folder for the runs' checkpoints (default: runs/precision_ft)")
    pf.add_argument("--cohort_root", default="data/synthetic", help="where the embedded cohort is (default: data/synthetic)")
    pf.add_argument("--workers", type=int, default=None, help="runs side by side (default: 2 on a CPU, 1 on a GPU)")
    ca = sub.add_parser("conv-audit", help="every convolution of the demo's models in bf16 against fp64 (seconds)")
    ca.add_argument("--out", default="results/precision", help="folder for conv_audit.md / .json (default: results/precision)")
    t = sub.add_parser("temperature", help="the gradient of each loss term at temperature 0.05 and 1.0 (demo, fp32)")
    t.add_argument("--out", default="results/precision", help="folder for temperature.md / .json (default: results/precision)")
    t.add_argument("--runs", default="runs/temperature", help="folder for the runs' checkpoints (default: runs/temperature)")
    t.add_argument("--cohort_root", default="data/synthetic", help="where the embedded cohort is (default: data/synthetic)")
    f = sub.add_parser("finetune", help="the fine-tuning recipe sweep (random init, labeled tuning split only)")
    f.add_argument("--out", default="results/ft_sweep", help="folder for the table, figure and data (default: results/ft_sweep)")
    f.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    f.add_argument("--runs", default="runs/ft_sweep", help="folder for the runs' checkpoints (default: runs/ft_sweep)")
    f.add_argument("--cohort_root", default="data/synthetic", help="where the embedded cohort is (default: data/synthetic)")
    f.add_argument("--workers", type=int, default=None, help="settings run side by side (default: 2 on a CPU, 1 on a GPU)")
    args = parser.parse_args(argv)
    if args.what == "finetune":
        rows = run_finetune_sweep(args.out, args.only, args.runs, args.cohort_root, workers=args.workers)
        print(finetune_table(rows))
        return 0
    if args.what == "precision-finetune":
        rows = run_finetune_sweep(args.out, None, args.runs, args.cohort_root, workers=args.workers,
                                  settings=PRECISION_FT_SETTINGS)
        print(finetune_table(rows))
        return 0
    if args.what == "conv-audit":
        print(conv_audit_table(run_conv_audit(args.out)))
        return 0
    if args.what == "temperature":
        print(temperature_table(run_temperature_gradients(args.out, args.runs, args.cohort_root)))
        return 0
    if args.what == "precision" and args.gradients_only:
        print(gradients_table(run_gradient_bisection(args.out, args.cohort_root)))
        return 0
    if args.what == "precision":
        rows = run_precision_sweep(args.out, args.only, args.runs, args.cohort_root)
        print(precision_table(rows))
        return 0
    rows = run_pretrain_sweep(args.out, args.only, args.runs, args.cohort_root)
    print(pretrain_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
