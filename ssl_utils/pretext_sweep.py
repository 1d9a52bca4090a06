"""The pretext sweep: how the masked-autoencoder recipe (and the choice between pretexts) was made.

    python -m ssl_utils.pretext_sweep --out results/pretext_sweep            # every setting
    python -m ssl_utils.pretext_sweep --out results/pretext_sweep --only mae_r75

Each setting is the demo preset with a few overrides, pre-trained on the embedded cohort's unlabeled
*training* volumes. It is scored on two things no reported number uses:

- the unlabeled *validation* volumes: the best validation loss as a multiple of its baseline (views:
  the L1 of predicting each crop's mean; MAE: the masked-patch loss of predicting each masked patch's
  own mean), on fixed views and masks;
- the probe monitor (``ssl_utils.monitor``): a linear probe on the frozen encoder, fitted on the first
  ``probe_fit_volumes`` of the labeled cohort's *training* list and scored on the next
  ``probe_score_volumes`` (never its tuning or validation split), against the same probe on the
  untrained encoder.

The choice rule, fixed before the sweep ran: the setting whose encoder's final probe Dice is highest
(a tie, within 0.5 points, goes to the lower validation ratio, then to the cheaper run). Finished
settings are reused (``<out>/settings/<name>.json``) and an interrupted one continues from its last
epoch; ``seconds`` is then the resumed part's time only (the s per epoch column is every epoch's). Table ``<out>/sweep.md``, data ``<out>/sweep.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .io import write_json, write_text

# Every setting: the demo preset (its pre-training precision and schedule), the probe monitor every 20 epochs on
# 2 + 4 labeled training volumes with 300 iterations (less noisy than the demo's 150 on 2 + 2).
PRETEXT_SWEEP_BASE: dict[str, Any] = dict(probe_every=20, probe_fit_volumes=2, probe_score_volumes=4,
                                          probe_monitor_iterations=300)
# the MAE's starting point: a decoder the size of the demo encoder's tokens, 2 blocks (He et al.: a light decoder)
MAE_BASE: dict[str, Any] = dict(pretext="mae", mae_mask_ratio=0.75, mae_decoder_hidden=96, mae_decoder_mlp=192,
                                mae_decoder_layers=2, mae_decoder_heads=4, ssl_epochs=60)
# in-domain pre-training reads another cohort folder (the unlabeled volumes are abdominal; the labeled ones the same)
ABDOMEN_SUFFIX = "_abdomen"

# (name, overrides of the demo preset, why it is in the sweep)
PRETEXT_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("views_demo", dict(pretext="views"), "the two-view recipe of the demo preset: the reference pretext"),
    ("mae_r75", dict(MAE_BASE), "MAE, 75% masked (He et al.), per-patch normalised MSE target"),
    ("mae_r90", dict(MAE_BASE, mae_mask_ratio=0.9), "90% masked (2 of 27 patches visible)"),
    ("mae_r75_abdomen", dict(MAE_BASE, synth_unlabeled_kind="abdomen"),
     "in-domain: the unlabeled volumes are abdominal CT like the labeled ones"),
    ("mae_r50", dict(MAE_BASE, mae_mask_ratio=0.5), "half the patches masked: more context per prediction"),
    ("mae_r75_raw", dict(MAE_BASE, mae_norm_target=False), "raw intensities as the target (brightness counts)"),
    ("mae_r75_sp6", dict(MAE_BASE, ssl_spacing=(6.0, 6.0, 6.0)), "coarser spacing (a 29 cm field of view)"),
    ("mae_r75_lr3e-3", dict(MAE_BASE, ssl_lr=3e-3), "three times the learning rate"),
    ("mae_r75_e180", dict(MAE_BASE, ssl_epochs=180), "three times the epochs"),
    ("mae_r75_sp3", dict(MAE_BASE, ssl_spacing=(3.0, 3.0, 3.0)), "finer pre-training spacing (smaller field of view)"),
    ("mae_r75_lr3e-4", dict(MAE_BASE, ssl_lr=3e-4), "a third of the learning rate"),
]


def _probe_final(history: list[dict[str, Any]]) -> tuple[float, float]:
    """(the last probe Dice, the untrained encoder's) from a pre-training history."""
    probes = [r for r in history if "probe_dice" in r]
    if not probes:
        return float("nan"), float("nan")
    return float(probes[-1]["probe_dice"]), float(probes[-1].get("probe_dice_init") or float("nan"))


def pretext_row(name: str, overrides: dict[str, Any], why: str, result, seconds: float) -> dict[str, Any]:
    """A setting's row: validation loss against its baseline, the probe, the time."""
    from .pretrain import reference_baseline

    val = [r for r in result.history if "val_recon" in r]
    best = min(val, key=lambda r: r["val_recon"])
    key, base = reference_baseline(best) or ("", float("nan"))
    probe, probe_init = _probe_final(result.history)
    epochs = [r["epoch_time_s"] for r in result.history]
    return {
        "name": name, "overrides": overrides, "why": why, "pretext": result.config["pretext"],
        "epochs": result.last_epoch, "best_epoch": best["epoch"], "best_val": best["val_recon"],
        "baseline": key, "baseline_val": base, "ratio": best["val_recon"] / base if base else float("nan"),
        "probe_dice": probe, "probe_dice_init": probe_init,
        "probe_curve": [[r["epoch"], r["probe_dice"]] for r in result.history if "probe_dice" in r],
        "seconds": seconds, "s_per_epoch": sum(epochs) / max(len(epochs), 1), "precision": result.precision.name,
    }


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The choice rule of the module docstring, over the MAE settings."""
    mae = [r for r in rows if r["pretext"] == "mae" and r["probe_dice"] == r["probe_dice"]]
    top = max(r["probe_dice"] for r in mae)
    near = [r for r in mae if r["probe_dice"] >= top - 0.005]
    return min(near, key=lambda r: (r["ratio"], r["seconds"]))


def run_pretext_sweep(out: str, only: list[str] | None = None, runs_root: str = "runs/pretext_sweep",
                      cohort_root: str = "data/synthetic", log=print) -> list[dict[str, Any]]:
    """Run (or reuse) every setting of ``PRETEXT_SETTINGS`` (those named in ``only``); write the table."""
    from .config import get_config
    from .pretrain import pretrain
    from .sweeps import _saved_row

    settings_dir = os.path.join(out, "settings")
    os.makedirs(settings_dir, exist_ok=True)
    rows = []
    for name, overrides, why in PRETEXT_SETTINGS:
        if only and name not in only:
            continue
        saved = _saved_row(settings_dir, name, overrides, log)
        if saved is None:
            cfg = get_config("demo", **{**PRETEXT_SWEEP_BASE, **overrides})
            root = cohort_root + (ABDOMEN_SUFFIX if cfg["synth_unlabeled_kind"] == "abdomen" else "")
            log(f"[{name}] {why}: {overrides}")
            t0 = time.perf_counter()
            result = pretrain(cfg, logdir=os.path.join(runs_root, name), cohort_root=root, progress=False,
                              log=lambda msg: None, resume=True)  # an interrupted setting continues
            saved = pretext_row(name, overrides, why, result, time.perf_counter() - t0)
            write_json(os.path.join(settings_dir, f"{name}.json"), saved)
            log(f"[{name}] best val {saved['best_val']:.4f} = {saved['ratio']:.2f} x {saved['baseline']}; probe Dice "
                f"{100 * saved['probe_dice']:.1f}% (untrained {100 * saved['probe_dice_init']:.1f}%); {saved['seconds']:.0f} s")
        rows.append(saved)
    return write_table(out, cohort_root)


def write_table(out: str, cohort_root: str = "data/synthetic") -> list[dict[str, Any]]:
    """``sweep.md`` / ``sweep.json`` from the settings finished so far, in ``PRETEXT_SETTINGS`` order; the
    settings not yet run are listed as such under the table."""
    import json

    rows, missing = [], []
    for name, _, _ in PRETEXT_SETTINGS:
        path = os.path.join(out, "settings", f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                rows.append(json.load(f))
        else:
            missing.append(name)
    write_json(os.path.join(out, "sweep.json"), rows)
    note = f"\nNot run yet: {', '.join(missing)}.\n" if missing else ""
    write_text(os.path.join(out, "sweep.md"), _header(cohort_root) + pretext_table(rows) + note)
    return rows


def _header(cohort_root: str) -> str:
    from .runtime import machine_line
    from .sweeps import _cohort_meta

    cohort = _cohort_meta(cohort_root)
    return (
        "# Pretext sweep\n\n"
        f"Each row is the demo preset with {', '.join(f'{k}={v}' for k, v in PRETEXT_SWEEP_BASE.items())} and the "
        "changes named. Scored on the unlabeled validation volumes (best loss / its baseline: views, the L1 of "
        "predicting each crop's mean; MAE, the masked-patch loss of predicting each masked patch's own mean) and by the "
        "probe monitor on the labeled cohort's training volumes (fit on the first "
        f"{PRETEXT_SWEEP_BASE['probe_fit_volumes']}, scored on the next {PRETEXT_SWEEP_BASE['probe_score_volumes']}; "
        "mean Dice over the 13 organs, final probe; the untrained encoder's probe beside it). The tuning and validation "
        "splits are not read.\n\n"
        f"Machine: {machine_line()} (other work shared it); table written "
        f"{time.strftime('%Y-%m-%d')}. Cohort: {cohort.get('n_unlabeled', '?')} unlabeled volumes "
        f"({cohort.get('n_unlabeled_val', '?')} validation), {cohort.get('unlabeled_kind', '?')} unless the row says "
        "abdomen. Choice rule (fixed before the runs): highest final probe Dice among the MAE settings, a tie within "
        "0.5 points to the lower validation ratio. Re-run: `python -m ssl_utils.pretext_sweep --out "
        "results/pretext_sweep` (finished settings are reused).\n\n"
    )


def pretext_table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | changes | epochs | best val / baseline | probe Dice (untrained) | probe curve (epoch: Dice) | "
            "precision | s per epoch | total s |\n|---|---|---|---|---|---|---|---|---|\n")
    chosen = choose(rows)["name"] if any(r["pretext"] == "mae" for r in rows) else None
    lines = []
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        curve = ", ".join(f"{e}: {100 * d:.1f}" for e, d in r["probe_curve"])
        name = f"**{r['name']}** (chosen)" if r["name"] == chosen else r["name"]
        lines.append(
            f"| {name} | {changes} | {r['epochs']} | {r['best_val']:.4f} / {r['baseline_val']:.4f} = "
            f"**{r['ratio']:.2f}** | **{100 * r['probe_dice']:.1f}** ({100 * r['probe_dice_init']:.1f}) | {curve} | "
            f"{r['precision']} | {r['s_per_epoch']:.2f} | {r['seconds']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/pretext_sweep", help="table and settings (default: results/pretext_sweep)")
    parser.add_argument("--runs", default="runs/pretext_sweep", help="checkpoints and histories")
    parser.add_argument("--only", nargs="*", default=None, help="run only these settings")
    parser.add_argument("--cohort_root", default="data/synthetic", help="the embedded cohort's folder")
    parser.add_argument("--table_only", action="store_true",
                        help="write sweep.md / sweep.json from the finished settings only (nothing runs)")
    args = parser.parse_args(argv)
    if args.table_only:
        write_table(args.out, args.cohort_root)
        return 0
    run_pretext_sweep(args.out, args.only, args.runs, args.cohort_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
