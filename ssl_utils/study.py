"""``make experiment``: what pre-training buys on the embedded cohort, measured with statistics.

    python -m ssl_utils.study --out runs/study [--preset demo] [--seeds 5] [--ssl_epochs 60]

1. pre-trains ViTAutoEnc on the unlabeled part of the embedded cohort (resumable);
2. fine-tunes UNETR from random initialisation and from the pre-trained encoder, for each
   training-set size and for ``--seeds`` paired seeds (same data order, crops and decoder
   initialisation within a pair), recording validation Dice every ``ft_eval_every`` iterations;
3. trains a linear probe (frozen encoder, one 1x1x1 convolution) on both encoders, same seeds;
4. reports final Dice and the area under the Dice curve (per organ and mean), mean ± sd, the
   paired differences with a 95% confidence interval, and the verdict the interval supports;
   writes ``study.json`` (every number), ``study.md`` (tables) and ``study_curves.png``.

Every step resumes: run it again after an interruption and finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from .io import write_json, write_text

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see the Makefile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _machine() -> str:
    import torch

    from .runtime import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def _load_history(run: dict[str, Any]) -> list[dict[str, Any]]:
    path = os.path.join(run["logdir"], "history.json")
    with open(path) as f:
        return json.load(f)


def curve_metrics(runs: Sequence[dict[str, Any]], organs: Sequence[str]) -> list[dict[str, Any]]:
    """Per run: final Dice and area under the Dice curve (mean and per organ), from its history."""
    from .stats import curve_auc

    out = []
    for run in runs:
        hist = _load_history(run)
        its = [row["iteration"] for row in hist]
        rec = {k: run[k] for k in ("size", "seed", "arm")}
        rec["final"] = float(hist[-1]["val_mean_dice"])
        rec["auc"] = curve_auc(its, [row["val_mean_dice"] for row in hist])
        rec["curve"] = [[int(i), float(row["val_mean_dice"])] for i, row in zip(its, hist)]
        rec["final_organ"] = {o: float(hist[-1].get(f"dice_{o}", float("nan"))) for o in organs}
        rec["auc_organ"] = {}
        for o in organs:
            vals = [row.get(f"dice_{o}", float("nan")) for row in hist]
            ok = [(i, v) for i, v in zip(its, vals) if v is not None and math.isfinite(v)]
            rec["auc_organ"][o] = curve_auc(*zip(*ok)) if ok else float("nan")
        out.append(rec)
    return out


def paired_by(records: Sequence[dict[str, Any]], size: Any, metric: str, organ: str | None = None) -> dict[str, Any] | None:
    """``paired_comparison`` of pre-trained vs random at one training-set size (seed-paired)."""
    from .stats import paired_comparison

    def value(r):
        return r[metric] if organ is None else r[f"{metric}_organ"][organ]

    rand = {r["seed"]: value(r) for r in records if r["size"] == size and r["arm"] == "random"}
    pre = {r["seed"]: value(r) for r in records if r["size"] == size and r["arm"] == "pretrained"}
    seeds = [s for s in sorted(rand) if s in pre and math.isfinite(rand[s]) and math.isfinite(pre[s])]
    if not seeds:
        return None
    res = paired_comparison([rand[s] for s in seeds], [pre[s] for s in seeds])
    res["seeds"] = seeds
    return res


def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if math.isfinite(x) else "n/a"


def _ms(res: dict[str, Any], arm: str) -> str:
    m, s = res[f"{arm}_mean"], res[f"{arm}_sd"]
    return f"{100 * m:.1f} ± {100 * s:.1f}" if math.isfinite(s) else _pct(m)


def _ci(res: dict[str, Any]) -> str:
    lo, hi = res["t_ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def summary_table(stats: dict[str, dict[str, Any]], label: str) -> str:
    """Markdown: one row per (size, metric) with both arms, the paired difference, CI and verdict."""
    lines = [
        f"| {label} | Metric | Random init | Pre-trained | Difference (points) | 95% CI | Verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, res in stats.items():
        if res is None:
            continue
        size, metric = key.split("|")
        lines.append(
            f"| {size} | {metric} | {_ms(res, 'baseline')} | {_ms(res, 'treatment')} | "
            f"{100 * res['mean_diff']:+.1f} | {_ci(res)} | {res['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def organ_table(records: Sequence[dict[str, Any]], sizes: Sequence[int], organs: Sequence[str], metric: str) -> str:
    """Markdown: per organ (or class of the datalist's own label set), mean over seeds of each arm
    and the paired difference with its CI."""
    from .organs import are_btcv_organs

    head = f"| {'Organ' if are_btcv_organs(organs) else 'Class'} | " + " | ".join(f"{n} vol.: random / pre-trained / diff [95% CI]" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for organ in organs:
        cells = []
        for n in sizes:
            res = paired_by(records, n, metric, organ)
            cells.append("n/a" if res is None else f"{_pct(res['baseline_mean'])} / {_pct(res['treatment_mean'])} / {100 * res['mean_diff']:+.1f} {_ci(res)}")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(records: Sequence[dict[str, Any]], probe: Sequence[dict[str, Any]], path: str | None = None):
    """Mean ± sd validation Dice curves per arm and training-set size, plus the probe's curves."""
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in records})
    panels = len(sizes) + (1 if probe else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    from .organs import count_label

    colours = {"random": "tab:gray", "pretrained": "tab:red"}
    labels = {"random": "random init", "pretrained": "pre-trained encoder"}
    classes = list(records[0].get("final_organ", {})) if records else []  # the foreground classes

    def draw(ax, recs, title):
        for arm in ("random", "pretrained"):
            curves = [r["curve"] for r in recs if r["arm"] == arm]
            if not curves:
                continue
            its = np.array([c[0] for c in curves[0]], dtype=float)
            vals = np.array([[c[1] for c in cur] for cur in curves if len(cur) == len(its)], dtype=float) * 100
            mean, sd = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(its))
            for v in vals:
                ax.plot(its, v, color=colours[arm], alpha=0.25, lw=0.8)
            ax.plot(its, mean, color=colours[arm], lw=2, label=f"{labels[arm]} (n={len(vals)})")
            ax.fill_between(its, mean - sd, mean + sd, color=colours[arm], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"validation mean Dice, {count_label(classes)} (%)" if classes else "validation mean Dice (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")

    for ax, n in zip(axes[0], sizes):
        draw(ax, [r for r in records if r["size"] == n], f"fine-tuning, {n} labeled volumes")
    if probe:
        draw(axes[0][-1], probe, "linear probe on the frozen encoder")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def run_study(
    out: str = "runs/study",
    preset: str = "demo",
    seeds: int = 5,
    ssl_epochs: int | None = None,
    train_sizes: Sequence[int] | None = None,
    probe_size: int | None = None,
    cohort_root: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run (or resume) the whole study; returns the dict written to ``out/study.json``."""
    from .config import get_config
    from .finetune import compare_init
    from .organs import are_btcv_organs, count_label, organ_names
    from .pretrain import pretrain
    from .probe import train_probe
    from .synthetic import make_cohort_from_config

    t_start = time.perf_counter()
    cfg = get_config(preset, **{**(overrides or {}), "ssl_epochs": int(ssl_epochs) if ssl_epochs else None})
    os.makedirs(out, exist_ok=True)
    cohort_root = cohort_root or os.path.join(REPO, "data", "synthetic")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    make_cohort_from_config(cfg, cohort_root, progress=progress)
    timings["cohort_s"] = time.perf_counter() - t0

    log(f"[1/3] pre-training ({cfg['ssl_epochs']} epochs)")
    t0 = time.perf_counter()
    ssl = pretrain(cfg, logdir=os.path.join(out, "ssl"), resume=True, progress=progress, cohort_root=cohort_root, log=log)
    timings["pretrain_s"] = time.perf_counter() - t0
    ssl_history = ssl["history"]
    best = ssl["best"]
    del ssl

    seed_list = list(range(int(seeds)))
    sizes = list(train_sizes) if train_sizes else [int(n) for n in cfg["synth_train_sizes"]]
    log(f"[2/3] fine-tuning: sizes {sizes} x seeds {seed_list} x 2 arms")
    t0 = time.perf_counter()
    comp = compare_init(cfg, sizes, seed_list, best, logdir=os.path.join(out, "compare"), progress=progress,
                        log=log, cohort_root=cohort_root)
    timings["finetune_s"] = time.perf_counter() - t0
    organs = list(comp["class_names"][1:]) or organ_names(int(cfg["out_channels"]))  # the datalist's classes
    records = curve_metrics(comp["runs"], organs)

    probe_n = int(probe_size or min(sizes))
    log(f"[3/3] linear probe on the frozen encoder ({probe_n} labeled volumes, seeds {seed_list})")
    t0 = time.perf_counter()
    probe_records = []
    for seed in seed_list:
        for arm, path in (("random", None), ("pretrained", best)):
            res = train_probe(cfg, path, seed=seed, n_train=probe_n, cohort_root=cohort_root, progress=progress, log=log)
            from .stats import curve_auc

            curve = res["curve"]
            probe_records.append({
                "size": probe_n, "seed": seed, "arm": arm, "curve": curve,
                "final": float(res["final"]["mean_dice"]),
                "auc": curve_auc([c[0] for c in curve], [c[1] for c in curve]),
                "final_organ": {o: float(v) for o, v in res["final"]["per_organ"].items()},
                "encoder_unchanged": bool(res["encoder_unchanged"]),
            })
    timings["probe_s"] = time.perf_counter() - t0

    stats: dict[str, Any] = {}
    for n in sizes:
        for metric in ("final", "auc"):
            stats[f"{n}|{metric}"] = paired_by(records, n, metric)
    probe_stats = {f"{probe_n}|{m}": paired_by(probe_records, probe_n, m) for m in ("final", "auc")}
    timings["total_s"] = time.perf_counter() - t_start

    fig_path = os.path.join(out, "study_curves.png")
    plot_study(records, probe_records, fig_path)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "preset": preset,
        "config": cfg.to_dict(),
        "seeds": seed_list,
        "train_sizes": sizes,
        "timings_s": timings,
        "ssl_history": ssl_history,
        "finetune_runs": records,
        "finetune_stats": stats,
        "probe_runs": probe_records,
        "probe_stats": probe_stats,
        "figure": fig_path,
    }
    word = "organ" if are_btcv_organs(organs) else "class"
    report = (
        f"Study on the embedded synthetic cohort, preset `{preset}`, {len(seed_list)} paired seeds; "
        f"{result['date']}; {result['machine']}; total {timings['total_s'] / 60:.0f} min "
        f"(pre-training {timings['pretrain_s'] / 60:.0f}, fine-tuning {timings['finetune_s'] / 60:.0f}, "
        f"probe {timings['probe_s'] / 60:.0f}).\n"
        f"Budget: pre-training {cfg['ssl_epochs']} epochs; fine-tuning {cfg['ft_iterations']} iterations "
        f"(evaluation every {cfg['ft_eval_every']}); probe {cfg['probe_iterations']} iterations.\n\n"
        f"Mean Dice over the {count_label(organs)} (%), mean ± sd over seeds; difference = pre-trained − random, paired by "
        "seed, with a 95% paired-t interval. AUC = area under the validation Dice curve divided by its length "
        "(the curve's average height): early convergence shows there first.\n\n"
        "**Full fine-tuning (UNETR)**\n\n" + summary_table(stats, "Training volumes")
        + "\n**Linear probe on the frozen encoder**\n\n" + summary_table(probe_stats, "Training volumes")
        + f"\n**Per {word}, final Dice (%)**\n\n" + organ_table(records, sizes, organs, "final")
        + f"\n**Per {word}, AUC of the Dice curve (%)**\n\n" + organ_table(records, sizes, organs, "auc")
    )
    result["report"] = report
    write_json(os.path.join(out, "study.json"), result)
    write_text(os.path.join(out, "study.md"), report)
    log(report)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="output folder (default: runs/study)")
    parser.add_argument("--preset", default="demo", choices=["demo", "smoke", "paper"])
    parser.add_argument("--seeds", type=int, default=5, help="paired seeds per arm (default: 5)")
    parser.add_argument("--ssl_epochs", type=int, default=None, help="pre-training epochs (default: the preset's)")
    parser.add_argument("--train_sizes", type=int, nargs="+", default=None, help="labeled training volumes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set ft_iterations=400 (values parsed as JSON when possible)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    sys.path.insert(0, REPO)
    run_study(args.out, args.preset, args.seeds, args.ssl_epochs, args.train_sizes, overrides=overrides,
              progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
