"""Markdown tables of a comparison: the reference's table, per class (BTCV's organs or the
datalist's own classes), and the paired differences."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..organs import are_btcv_organs, mean_label

# random initialisation; the reference pretext's encoder; the masked autoencoder's; the positive control (the encoder of
# a UNETR trained with labels on a disjoint split)
ARMS = ("random", "pretrained", "mae", "control")
ARM_LABELS = {"random": "Random Init", "pretrained": "Pre-trained", "mae": "MAE pre-trained",
              "control": "Control (supervised encoder)"}

def _by_size(results: dict[str, Any], metric: str) -> dict[int, dict[str, dict[int, float]]]:
    """``{size: {arm: {seed: value}}}`` and the validation counts, from the run list."""
    if metric not in ("final", "best"):
        raise ValueError(f"metric must be 'final' or 'best', got {metric!r}")
    out: dict[int, dict[str, dict[int, float]]] = {}
    for run in results["runs"]:
        out.setdefault(int(run["size"]), {a: {} for a in ARMS})[run["arm"]][int(run["seed"])] = float(run[metric])
    return dict(sorted(out.items()))


def _mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 2, unit: str = "") -> str:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float) * scale
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}f}{unit}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}{unit}"


def results_table_markdown(results: dict[str, Any], metric: str = "final") -> str:
    """The reference's table, one row per training-set size, Dice in % as mean ± sd over seeds::

        | Training Volumes | Validation Volumes | Random Init Dice | Pre-trained Dice | Relative Improvement |

    ``metric``: ``"final"`` (Dice after the full budget) or ``"best"`` (highest Dice over the
    evaluations, what the reference reports). Relative improvement is computed per seed
    (pre-trained / random - 1, paired) and then averaged. A missing arm reads "n/a".
    """
    n_val = {int(r["size"]): int(r["n_val"]) for r in results["runs"]}
    extra = [a for a in ARMS[2:] if any(r["arm"] == a for r in results["runs"])]  # arms beyond the reference's two
    lines = [
        "| Training Volumes | Validation Volumes | Random Init Dice | Pre-trained Dice | Relative Improvement |"
        + "".join(f" {ARM_LABELS[a]} Dice | Relative Improvement |" for a in extra),
        "|---|---|---|---|---|" + "---|---|" * len(extra),
    ]
    for size, arms in _by_size(results, metric).items():
        rand = arms["random"]
        cells = []
        for arm in ("pretrained", *extra):
            treat = arms[arm]
            rel = [(treat[s] / rand[s] - 1.0) for s in sorted(rand) if s in treat and rand[s] > 0]
            cells.append(f"{_mean_sd(list(treat.values()))} | {_mean_sd(rel, unit='%') if rel else 'n/a'}")
        lines.append(f"| {size} | {n_val[size]} | {_mean_sd(list(rand.values()))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def class_word(results: dict[str, Any]) -> str:
    """"organ" when the runs scored BTCV's organs, "class" for any other label set."""
    names = [o for r in results.get("runs", []) for o in r.get("per_organ", {})]
    return "organ" if not names or are_btcv_organs(list(dict.fromkeys(names))) else "class"


def per_organ_table_markdown(results: dict[str, Any], metric: str = "final") -> str:
    """Dice per class (%, mean over seeds), one column per training-set size and arm; the rows are
    the datalist's classes (BTCV's 13 organs by default) and their mean."""
    key = "per_organ" if metric == "final" else "per_organ_best"
    sizes = sorted({int(r["size"]) for r in results["runs"]})
    arms = [a for a in ARMS if any(r["arm"] == a for r in results["runs"])]
    organs: list[str] = []
    for r in results["runs"]:
        organs += [o for o in r[key] if o not in organs]
    header = f"| {class_word(results).capitalize()} | " + " | ".join(f"{n} vol., {ARM_LABELS[a]}" for n in sizes for a in arms) + " |"
    lines = [header, "|---|" + "---|" * (len(sizes) * len(arms))]
    mean_row = mean_label(organs)
    for organ in organs + [mean_row]:
        cells = []
        for n in sizes:
            for a in arms:
                sel = [r for r in results["runs"] if int(r["size"]) == n and r["arm"] == a]
                if organ == mean_row:
                    vals = [r[metric] for r in sel]
                else:
                    vals = [r[key].get(organ, float("nan")) for r in sel]
                v = np.asarray([x for x in vals if math.isfinite(x)], dtype=float)
                cells.append(f"{100 * v.mean():.1f}" if v.size else "n/a")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_summary(results: dict[str, Any], metric: str = "final", level: float = 0.95,
                   treatment: str = "pretrained") -> dict[int, dict[str, Any]]:
    """Per training-set size, the paired difference ``treatment`` - random over seeds (Dice
    fractions): ``ssl_utils.stats.paired_comparison``'s dict plus ``wins`` (seeds where the
    treatment arm is higher). Sizes without both arms are left out."""
    from ..stats import paired_comparison

    out: dict[int, dict[str, Any]] = {}
    for size, arms in _by_size(results, metric).items():
        seeds = [s for s in sorted(arms["random"]) if s in arms[treatment]]
        if not seeds:
            continue
        a = [arms["random"][s] for s in seeds]
        b = [arms[treatment][s] for s in seeds]
        res = paired_comparison(a, b, level=level)
        res["seeds"] = seeds
        res["wins"] = int(sum(y > x for x, y in zip(a, b)))
        out[size] = res
    return out


def paired_table_markdown(paired: dict[int, dict[str, Any]], treatment: str = "pretrained") -> str:
    """Markdown table of ``paired_summary``: mean paired difference in Dice points with its
    t interval, wins out of seeds, and the verdict the interval supports."""
    label = ARM_LABELS[treatment]
    if not paired:
        return f"(no paired runs: the {label.lower()} arm did not run)\n"
    lines = [
        f"| Training Volumes | Seeds | {label} - Random (Dice points) | 95% CI | {label} higher | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for size, r in paired.items():
        lo, hi = r["t_ci"]
        ci = f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" if math.isfinite(lo) and math.isfinite(hi) else "n/a (one seed)"
        lines.append(
            f"| {size} | {r['n']} | {100 * r['mean_diff']:+.2f} | {ci} | {r['wins']} of {r['n']} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def comparison_report_markdown(results: dict[str, Any]) -> str:
    """The full Markdown report ``compare_init`` writes: main table (final Dice), the same with
    the best Dice over evaluations, the paired differences, and the per-organ table."""
    cfg = results.get("config", {})
    seeds = results.get("seeds", [])
    k = int(cfg.get("ft_final_evals", 1) or 1)
    final = "the last evaluation" if k == 1 else f"the mean of the last {k} evaluations"
    return (
        f"Validation Dice (%) after {cfg.get('ft_iterations', '?')} iterations (preset {cfg.get('preset', 'custom')}), "
        f"{len(seeds)} seed(s) {list(seeds)}; final Dice = {final}.\n\n"
        "Each encoder arm − random initialisation, paired by seed (same data order, crops and decoder initialisation):\n\n"
        + results["paired_table"]
        + "\nIn the reference's format (mean ± sd over seeds; relative improvement per seed, then averaged):\n\n"
        + results["table"]
        + "\nBest Dice over the evaluations (the reference's convention; selected on the validation set):\n\n"
        + results["table_best"]
        + f"\nPer {class_word(results)} (%, final, mean over seeds):\n\n"
        + results["per_organ_table"]
    )
