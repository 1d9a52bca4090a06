"""Statistics for paired comparisons: learning-curve area, paired differences, intervals, verdict.

Pre-training is compared with random initialisation on *paired* runs: the same seed gives both
arms the same data order, crops and decoder initialisation, so the per-seed difference isolates
the effect of the encoder's starting point.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detectable difference at this budget"


def curve_auc(iterations: Sequence[float], values: Sequence[float]) -> float:
    """Normalised area under a learning curve: the trapezoid integral divided by the iteration span,
    i.e. the curve's average height (same units as ``values``). A single point returns its value."""
    x = np.asarray(iterations, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.size != y.size or x.size == 0:
        raise ValueError(f"need equal, non-empty iterations and values, got {x.size} and {y.size}")
    if x.size == 1:
        return float(y[0])
    order = np.argsort(x)
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span <= 0:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / span)


def paired_comparison(
    baseline: Sequence[float],
    treatment: Sequence[float],
    level: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict:
    """Paired differences ``treatment - baseline`` (one pair per seed), with a paired-t interval and
    a bootstrap percentile interval of the mean difference, and the verdict the t interval supports.

    Returns a dict: n, mean/sd of each arm, diffs, mean_diff, sd_diff, t_ci, boot_ci, p_value,
    verdict ("better" when the whole interval is above 0, "worse" when below, otherwise
    "no detectable difference at this budget").
    """
    from scipy import stats

    a = np.asarray(baseline, dtype=float)
    b = np.asarray(treatment, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1D sequences, got shapes {a.shape} and {b.shape}")
    d = b - a
    n = d.size
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    if n > 1 and sd > 0:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
        t_ci = (mean - half, mean + half)
        p_value = float(stats.ttest_rel(b, a).pvalue)
    elif n > 1:  # every difference identical (e.g. exactly zero): a degenerate interval
        t_ci = (mean, mean)
        p_value = 1.0 if mean == 0 else 0.0
    else:
        t_ci = (float("-inf"), float("inf"))
        p_value = float("nan")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1 - level) / 2
    boot_ci = (float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha)))
    if t_ci[0] > 0:
        verdict = BETTER
    elif t_ci[1] < 0:
        verdict = WORSE
    else:
        verdict = NO_DIFFERENCE
    return {
        "n": n,
        "baseline_mean": float(a.mean()),
        "baseline_sd": float(a.std(ddof=1)) if n > 1 else float("nan"),
        "treatment_mean": float(b.mean()),
        "treatment_sd": float(b.std(ddof=1)) if n > 1 else float("nan"),
        "diffs": d.tolist(),
        "mean_diff": mean,
        "sd_diff": sd,
        "level": level,
        "t_ci": t_ci,
        "boot_ci": boot_ci,
        "p_value": p_value,
        "verdict": verdict,
    }


def format_ci(result: dict, scale: float = 100.0, digits: int = 1) -> str:
    """``+2.3 [−0.4, +5.0]`` (mean paired difference and its t interval, scaled e.g. to Dice %)."""
    lo, hi = result["t_ci"]
    f = f"{{:+.{digits}f}}"
    return f"{f.format(result['mean_diff'] * scale)} [{f.format(lo * scale)}, {f.format(hi * scale)}]"
