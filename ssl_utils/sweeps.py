"""Recipe sweeps: how the demo preset's choices were made, re-runnable.

    python -m ssl_utils.sweeps pretrain --out results/ssl_sweep            # every setting
    python -m ssl_utils.sweeps pretrain --out results/ssl_sweep --only h192_lr1e-3

``pretrain``: each setting is the demo preset with a few overrides, pre-trained on the embedded
cohort's unlabeled *training* volumes and scored on its unlabeled *validation* volumes only
(fixed views): best validation L1 of view 1, the constant and copy baselines on the same views,
the best L1 as a multiple of the constant, and the wall time. No labeled volume is looked at.
Finished settings are reused (``<out>/settings/<name>.json``), so an interrupted sweep continues
where it stopped. The table is ``<out>/sweep.md``, the data ``<out>/sweep.json``; checkpoints and
histories go under ``--runs`` (default ``runs/ssl_sweep``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

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


def run_pretrain_sweep(out: str, only: list[str] | None = None, runs_root: str = "runs/ssl_sweep",
                       cohort_root: str = "data/synthetic", log=print, preset: str = "demo",
                       settings: list[tuple[str, dict[str, Any], str]] | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) every setting of ``settings`` (default ``PRETRAIN_SETTINGS``; those named in
    ``only``), each as ``preset`` with its overrides. A setting's saved row is reused when its
    overrides are unchanged."""
    from .config import get_config
    from .pretrain import pretrain

    settings_dir = os.path.join(out, "settings")
    os.makedirs(settings_dir, exist_ok=True)
    rows = []
    for name, overrides, why in PRETRAIN_SETTINGS if settings is None else settings:
        if only and name not in only:
            continue
        path = os.path.join(settings_dir, f"{name}.json")
        if os.path.exists(path):
            saved = json.load(open(path))
            if saved.get("overrides") == json.loads(json.dumps(overrides)):
                log(f"[{name}] reused {path}")
                rows.append(saved)
                continue
        cfg = get_config(preset, **{**(SWEEP_BASE if preset == "demo" else {}), **overrides})
        log(f"[{name}] {why}: {overrides}")
        t0 = time.perf_counter()
        result = pretrain(cfg, logdir=os.path.join(runs_root, name), cohort_root=cohort_root, progress=False,
                          log=lambda msg: None)
        row = _row(name, overrides, why, result, time.perf_counter() - t0)
        write_json(path, row)
        log(f"[{name}] best val L1 {row['best_val_l1']:.4f} = {row['ratio_to_const']:.2f} x constant "
            f"({row['const_l1']:.4f}); {row['seconds']:.0f} s")
        rows.append(row)
    write_json(os.path.join(out, "sweep.json"), rows)
    write_text(os.path.join(out, "sweep.md"), _sweep_header(cohort_root) + pretrain_table(rows))
    return rows


def _sweep_header(cohort_root: str) -> str:
    import json as _json

    from .runtime import cpu_model

    cohort = {}
    meta = os.path.join(cohort_root, "cohort.json")
    if os.path.exists(meta):
        cohort = _json.load(open(meta))
    return (
        "# Pre-training recipe sweep\n\n"
        "Each row is the demo preset with the pre-training settings it had before this sweep "
        f"({', '.join(f'{k}={v}' for k, v in SWEEP_BASE.items())}; amp auto = bf16 autocast on a bf16 CPU) "
        "and the changes named.\n\n"
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; table written {time.strftime('%Y-%m-%d')}. "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pretrain", help="the pre-training recipe sweep (unlabeled validation split only)")
    p.add_argument("--out", default="results/ssl_sweep", help="folder for the table and the data (default: results/ssl_sweep)")
    p.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    p.add_argument("--runs", default="runs/ssl_sweep", help="folder for the runs' checkpoints (default: runs/ssl_sweep)")
    p.add_argument("--cohort_root", default="data/synthetic", help="where the embedded cohort is (default: data/synthetic)")
    args = parser.parse_args(argv)
    rows = run_pretrain_sweep(args.out, args.only, args.runs, args.cohort_root)
    print(pretrain_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
