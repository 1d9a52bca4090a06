"""``make experiment``: what pre-training buys on the embedded cohort, measured with statistics.

    python -m ssl_utils.study --out runs/study [--preset demo] [--seeds 5] [--ssl_epochs 60]

1. pre-trains two encoders on the unlabeled part of the embedded cohort (resumable): the reference's
   two-view ViTAutoEnc (arm ``pretrained``) and a masked autoencoder (arm ``mae``, ``MAE_RECIPE``);
2. trains the positive control: a UNETR with labels on the cohort's ``control`` split (disjoint from
   training, tuning and validation); its ViT encoder is arm ``control``. If the study cannot see this
   encoder help at the smallest size, it cannot see an initialisation effect at all;
3. fine-tunes UNETR from random initialisation (arm ``random``) and from each encoder, for each
   training-set size and ``--seeds`` paired seeds (same data order, crops and decoder initialisation
   within a seed), recording validation Dice every ``ft_eval_every`` iterations;
4. trains a linear probe (frozen features, one 1x1x1 convolution) on every encoder, the random one
   included, and on two baselines: the pre-trained patch embedding alone, and per-patch intensity
   statistics + position (no network), same seeds;
5. reports final Dice (mean of the last ``ft_final_evals`` evaluations): the paired differences
   first, with intervals corrected for every comparison made (Bonferroni) and the verdict they
   support, the positive control's first; the area under the Dice curve is shown, descriptively;
   writes ``study.json`` (every number), ``study.md`` (tables) and ``study_curves.png``.

Every step resumes: run it again after an interruption and finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from .io import write_json, write_text

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see the Makefile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_history(run: dict[str, Any]) -> list[dict[str, Any]]:
    path = os.path.join(run["logdir"], "history.json")
    with open(path) as f:
        return json.load(f)


def curve_metrics(runs: Sequence[dict[str, Any]], organs: Sequence[str], final_evals: int = 1) -> list[dict[str, Any]]:
    """Per run: final Dice (the mean of its last ``final_evals`` evaluations) and area under the
    Dice curve, mean and per organ (``per_organ`` / ``auc_organ``), from its history."""
    from .finetune.loop import final_from_history
    from .stats import curve_auc

    out = []
    for run in runs:
        hist = _load_history(run)
        its = [row["iteration"] for row in hist]
        rec = {k: run[k] for k in ("size", "seed", "arm")}
        final = final_from_history(hist, final_evals) or {}
        rec["final"] = float(final.get("mean_dice", float("nan")))
        rec["final_iterations"] = final.get("iterations", [])
        rec["auc"] = curve_auc(its, [row["val_mean_dice"] for row in hist])
        rec["curve"] = [[int(i), float(row["val_mean_dice"])] for i, row in zip(its, hist)]
        rec["per_organ"] = {o: float(final.get("per_organ", {}).get(o, float("nan"))) for o in organs}
        rec["auc_organ"] = {}
        for o in organs:
            vals = [row.get(f"dice_{o}", float("nan")) for row in hist]
            ok = [(i, v) for i, v in zip(its, vals) if v is not None and math.isfinite(v)]
            rec["auc_organ"][o] = curve_auc(*zip(*ok)) if ok else float("nan")
        out.append(rec)
    return out


def paired_by(records: Sequence[dict[str, Any]], size: Any, metric: str, organ: str | None = None,
              baseline: str = "random", treatment: str = "pretrained", level: float = 0.95) -> dict[str, Any] | None:
    """``paired_comparison`` of arm ``treatment`` against arm ``baseline`` at one training-set size
    (seed-paired), at confidence ``level``; ``organ`` picks one class (``per_organ`` for "final",
    ``auc_organ`` for "auc")."""
    from .stats import paired_comparison

    def value(r):
        if organ is None:
            return r[metric]
        return r["per_organ" if metric == "final" else f"{metric}_organ"][organ]

    base = {r["seed"]: value(r) for r in records if r["size"] == size and r["arm"] == baseline}
    treat = {r["seed"]: value(r) for r in records if r["size"] == size and r["arm"] == treatment}
    seeds = [s for s in sorted(base) if s in treat and math.isfinite(base[s]) and math.isfinite(treat[s])]
    if not seeds:
        return None
    res = paired_comparison([base[s] for s in seeds], [treat[s] for s in seeds], level=level)
    res.update(seeds=seeds, baseline_arm=baseline, treatment_arm=treatment)
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


ARM_NAMES = {
    "random": "random init", "pretrained": "pre-trained (two views)", "mae": "MAE pre-trained",
    "control": "control (supervised encoder)",
    "patch_embedding": "pre-trained patch embedding only", "intensity": "intensity statistics + position (no network)",
}
# the encoder arms, in the order the report reads them: the positive control first
ENCODER_ARMS = ("control", "pretrained", "mae")


def summary_table(stats: dict[str, dict[str, Any]], label: str) -> str:
    """Markdown, the paired difference first: one row per (size, comparison) with the difference in
    final Dice, its (corrected) interval and the verdict, then both arms' mean ± sd."""
    lines = [
        f"| {label} | Comparison | Difference (Dice points) | CI | Verdict | Baseline | Treatment |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, res in stats.items():
        if res is None:
            continue
        size = key.split("|")[0]
        comp = f"{ARM_NAMES[res['treatment_arm']]} − {ARM_NAMES[res['baseline_arm']]}"
        lines.append(
            f"| {size} | {comp} | **{100 * res['mean_diff']:+.1f}** | {_ci(res)} | {res['verdict']} | "
            f"{_ms(res, 'baseline')} | {_ms(res, 'treatment')} |"
        )
    return "\n".join(lines) + "\n"


def organ_table(records: Sequence[dict[str, Any]], sizes: Sequence[int], organs: Sequence[str], metric: str,
                treatment: str = "pretrained") -> str:
    """Markdown: per organ (or class of the datalist's own label set), the paired difference
    (``treatment`` − random) with its unadjusted 95% CI, then each arm's mean over seeds."""
    from .organs import are_btcv_organs

    head = (f"| {'Organ' if are_btcv_organs(organs) else 'Class'} | "
            + " | ".join(f"{n} vol.: diff [95% CI] (random / {ARM_NAMES[treatment]})" for n in sizes) + " |")
    lines = [head, "|---|" + "---|" * len(sizes)]
    for organ in organs:
        cells = []
        for n in sizes:
            res = paired_by(records, n, metric, organ, treatment=treatment)
            cells.append("n/a" if res is None else f"{100 * res['mean_diff']:+.1f} {_ci(res)} "
                         f"({_pct(res['baseline_mean'])} / {_pct(res['treatment_mean'])})")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def organs_over(records: Sequence[dict[str, Any]], size: int, arm: str, threshold: float = 0.5) -> list[str]:
    """The organs whose final Dice, averaged over seeds, is above ``threshold`` for one arm and size."""
    sel = [r for r in records if r["size"] == size and r["arm"] == arm]
    if not sel:
        return []
    organs = list(sel[0]["per_organ"])
    means = {o: float(np.nanmean([r["per_organ"][o] for r in sel])) for o in organs}
    return [o for o in organs if means[o] > threshold]


# the probe's arms: (arm, features, the encoder arm whose checkpoint it reads, or None)
PROBE_ARMS = (("random", "encoder", None), ("pretrained", "encoder", "pretrained"), ("mae", "encoder", "mae"),
              ("control", "encoder", "control"), ("patch_embedding", "patch_embedding", "pretrained"),
              ("intensity", "intensity", None))
# the probe's headline comparisons (treatment, baseline): the reference pretext against a random encoder and its two
# no-network baselines; the MAE against a random encoder and against the reference pretext; the control
PROBE_COMPARISONS = (("pretrained", "random"), ("pretrained", "patch_embedding"), ("pretrained", "intensity"),
                     ("mae", "random"), ("mae", "pretrained"), ("control", "random"))


def _probe_run(cfg: dict[str, Any], arm: str, features: str, path: str | None, seed: int, n_train: int,
               cohort_root: str, out: str) -> dict[str, Any]:
    """One probe run (picklable for a worker process), reused from ``out`` when it exists."""
    from .config import get_config
    from .finetune.loop import final_from_history
    from .probe import train_probe
    from .stats import curve_auc

    rec_path = os.path.join(out, f"{arm}_seed{seed}.json")
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            saved = json.load(f)
        if saved.get("checkpoint") == _fingerprint(path) and saved.get("config") == cfg:
            return saved["record"]
    t0 = time.perf_counter()
    iterations = int(cfg["probe_iterations"])  # six evaluations per probe, whatever the fine-tuning's interval
    res = train_probe(get_config(cfg), path, seed=seed, n_train=n_train, cohort_root=cohort_root, progress=False,
                      log=lambda msg: None, features=features, eval_every=max(1, iterations // 6))
    curve = res.curve
    final = final_from_history(res.history, int(cfg["ft_final_evals"]))  # as fine-tuning: the last few evaluations
    record = {
        "size": n_train, "seed": seed, "arm": arm, "features": features, "curve": curve,
        "final": float(final["mean_dice"]), "final_iterations": final["iterations"],
        "auc": curve_auc([c[0] for c in curve], [c[1] for c in curve]),
        "per_organ": {o: float(v) for o, v in final["per_organ"].items()},
        "encoder_unchanged": bool(res.encoder_unchanged), "time_s": time.perf_counter() - t0,
    }
    write_json(rec_path, {"checkpoint": _fingerprint(path), "config": cfg, "record": record})
    return record


def _fingerprint(path: str | None) -> str | None:
    """The pre-trained encoder a probe record belongs to: the digest of its weights (the same
    after a copy to another machine or a repeated, identical pre-training run)."""
    from .checkpoint import weights_digest

    return weights_digest(path) if path else None


def save_state(out: str, dest: str, cohort_root: str | None = None, log=print) -> list[str]:
    """Copy what a study in ``out`` has finished, without training checkpoints, to ``dest``: for each
    finished fine-tuning run its ``run_record.json`` (written here from its checkpoint when the run
    predates records) and ``history.json``, the probe records, and the encoders the arms fine-tune from
    (``encoders/<arm>.pt``, the ViT alone, and its ``.json``). ``run_study(..., from_state=dest)`` (or
    ``--from_state``) on another machine reuses them: the encoders are not trained again, and a record
    counts only for the encoder weights it started from (their digest). Returns the files written."""
    import glob
    import shutil

    from .checkpoint import load_checkpoint
    from .config import get_config
    from .finetune.compare import RECORD_NAME, finished_run_record
    from .finetune.inputs import resolve_ft_data

    cohort_root = cohort_root or os.path.join(REPO, "data", "synthetic")
    summaries: dict[tuple, dict[str, Any]] = {}
    results = os.path.join(out, "compare", "results.json")
    if os.path.isfile(results):
        with open(results) as f:
            saved = json.load(f)
        summaries = {(r["size"], r["seed"], r["arm"]): r for r in saved.get("runs", [])}
    written: list[str] = []
    for run_dir in sorted(glob.glob(os.path.join(out, "compare", "n*", "seed*", "*"))):
        rec_path = os.path.join(run_dir, RECORD_NAME)
        arm, seed, size = (os.path.basename(p) for p in (run_dir, os.path.dirname(run_dir), os.path.dirname(os.path.dirname(run_dir))))
        key = (int(size[1:]), int(seed[4:]), arm)
        last = os.path.join(run_dir, "last_model.pt")
        if not os.path.isfile(rec_path) and key in summaries and os.path.isfile(last):  # a run that predates records
            ckpt = load_checkpoint(last)
            datalist = resolve_ft_data(get_config(ckpt["config"]), None, None, cohort_root, key[0])[1]
            record = finished_run_record(run_dir, summaries[key], ckpt.get("class_names") or [], datalist)
            if record is not None:
                write_json(rec_path, record)
        if not os.path.isfile(rec_path):
            log(f"not finished, not kept: {run_dir}")
            continue
        target = os.path.join(dest, os.path.relpath(run_dir, out))
        os.makedirs(target, exist_ok=True)
        for name in (RECORD_NAME, "history.json"):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(target, name))
            written.append(os.path.join(target, name))
    for path in sorted(glob.glob(os.path.join(out, "probe", "*.json")) + glob.glob(os.path.join(out, "encoders", "*"))):
        target = os.path.join(dest, os.path.relpath(path, out))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
        written.append(target)
    runs = sum(p.endswith(RECORD_NAME) for p in written)
    encoders = sum(os.path.dirname(p).endswith("encoders") and p.endswith(".pt") for p in written)
    probes = sum(os.path.basename(os.path.dirname(p)) == "probe" for p in written)
    log(f"kept {runs} finished fine-tuning run(s), {probes} probe record(s) and {encoders} encoder(s) in {dest}")
    return written


def restore_state(src: str, out: str, log=print) -> int:
    """Copy the records ``save_state`` wrote in ``src`` into the study folder ``out``, never over
    a file that is there; returns how many were copied."""
    import shutil

    if not os.path.isdir(src):
        raise FileNotFoundError(f"study state {src}: no such folder (write one with --save_state)")
    copied = 0
    for root, _, files in os.walk(src):
        for name in files:
            if not (name.endswith(".json") or os.path.basename(root) == "encoders" and name.endswith(".pt")):
                continue
            target = os.path.join(out, os.path.relpath(os.path.join(root, name), src))
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(root, name), target)
                copied += 1
    log(f"restored {copied} record file(s) from {src} into {out}")
    return copied


def comparison_family(sizes: Sequence[int], arms: Sequence[str] = ENCODER_ARMS) -> list[tuple[str, str, str]]:
    """The study's headline comparisons ``(size, treatment arm, baseline arm)``, all on final Dice:
    fine-tuning, every encoder arm in ``arms`` against random initialisation at every size; the
    probe's ``PROBE_COMPARISONS`` (those whose arms ran). Their intervals are Bonferroni-corrected for
    this number. The area under the Dice curve is reported beside them, descriptively (no verdict)."""
    fam = [(str(n), arm, "random") for n in sizes for arm in arms]
    return fam + [("probe", t, b) for t, b in PROBE_COMPARISONS if t in ("random", *arms) and b in
                  ("random", "patch_embedding", "intensity", *arms)]


def auc_table(records: Sequence[dict[str, Any]], sizes: Sequence[int]) -> str:
    """Markdown, descriptive: the area under each arm's Dice curve (mean ± sd over seeds), per size."""
    arms = [a for a in ("random", *ENCODER_ARMS) if any(r["arm"] == a for r in records)]
    lines = ["| Training volumes | " + " | ".join(ARM_NAMES[a] for a in arms) + " |", "|---|" + "---|" * len(arms)]
    for n in sizes:
        cells = []
        for a in arms:
            v = np.asarray([r["auc"] for r in records if r["size"] == n and r["arm"] == a], dtype=float) * 100
            cells.append("n/a" if not v.size else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if v.size > 1 else f"{v[0]:.1f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def control_statement(stats: dict[str, Any], size: int) -> str:
    """What the positive control says about the study's power, for the top of the report."""
    res = stats.get(f"{size}|control")
    if res is None:
        return ("**Positive control: not run.** Without it the study cannot tell 'no effect of pre-training' from "
                "'an effect this design cannot see'.\n")
    diff = f"{100 * res['mean_diff']:+.1f} Dice points {_ci(res)}"
    if res["t_ci"][0] > 0:
        return (f"**Positive control: detected.** At {size} labeled volume(s) the encoder of a UNETR trained with labels on "
                f"a disjoint split beats random initialisation by {diff} (corrected interval above 0), so this design can "
                "see an initialisation effect of the ViT encoder of at least that size; the verdicts on self-supervision "
                "below can be read against it.\n")
    return (f"**Positive control: not detected.** At {size} labeled volume(s) the encoder of a UNETR trained with labels "
            f"on a disjoint split differs from random initialisation by {diff}, an interval that contains 0 or lies "
            "below it: this study cannot see an initialisation effect of the ViT encoder at all, so a 'no detectable "
            "difference' for a self-supervised encoder below says nothing about whether pre-training helps.\n")


def study_report(result: dict[str, Any], organs: Sequence[str]) -> str:
    """``study.md``: how, when and with what budget the study ran, the positive control's verdict, the
    corrected headline tables (paired difference first), the organs above 50%, the descriptive AUC
    and per-organ tables."""
    from .organs import are_btcv_organs, count_label

    cfg, timings, sizes = result["config"], result["timings_s"], result["train_sizes"]
    m, adj = result["comparisons"]["m"], result["comparisons"]["per_interval_level"]
    level, over = result["comparisons"]["family_level"], result["organs_over_50"]
    word = "organ" if are_btcv_organs(organs) else "class"
    largest, smallest = max(sizes), min(sizes)
    recipes = result.get("encoders", {})
    arms = [a for a in ("random", *ENCODER_ARMS) if a in over[str(largest)]]
    per_organ = "".join(
        f"\n**Per {word}, final Dice (%), {ARM_NAMES[a]} − random** (unadjusted 95% intervals, descriptive)\n\n"
        + organ_table(result["finetune_runs"], sizes, organs, "final", treatment=a)
        for a in ENCODER_ARMS if any(r["arm"] == a for r in result["finetune_runs"]))
    return (
        f"Study on the embedded synthetic cohort, preset `{result['preset']}`, {len(result['seeds'])} paired seeds; "
        f"{result['date']}; {result['machine']}; {result['workers']} run(s) side by side; total "
        f"{timings['total_s'] / 60:.0f} min (pre-training {timings['pretrain_s'] / 60:.0f}, control encoder "
        f"{timings.get('control_s', 0) / 60:.0f}, fine-tuning {timings['finetune_s'] / 60:.0f}, probes "
        f"{timings['probe_s'] / 60:.0f})"
        + (f"; {result['reused_runs']} of the {len(result['finetune_runs'])} fine-tuning runs were recorded by an earlier "
           f"invocation and reused (the runs' own times add up to {timings['finetune_runs_s'] / 60:.0f} min, "
           f"{result['workers']} at a time)" if result.get("reused_runs") else "") + ".\n"
        f"Budget: fine-tuning {cfg['ft_iterations']} iterations (evaluation every {cfg['ft_eval_every']}; final = mean of "
        f"the last {cfg['ft_final_evals']} evaluations); probe {cfg['probe_iterations']} iterations. Encoders: "
        + "; ".join(f"{ARM_NAMES[a]}: {d}" for a, d in recipes.items())
        + f". Validation: {result['n_val'] or '?'} volumes of the reported split (no recipe choice looked at them).\n\n"
        f"Mean Dice over the {count_label(organs)} (%). Difference = treatment − baseline, paired by seed. "
        f"The study makes {m} headline comparisons, all on final Dice (below); each interval is a paired-t interval at "
        f"{100 * adj:.2f}% (Bonferroni: {100 * level:.0f}% for the {m} together) and the verdict follows it.\n\n"
        + control_statement(result["finetune_stats"], smallest)
        + "\n**Full fine-tuning (UNETR): each encoder − random initialisation**\n\n"
        + summary_table(result["finetune_stats"], "Training volumes")
        + "\n**Linear probe on frozen features** (the reference pretext against a random encoder, its own patch "
        "embedding alone and per-patch intensity statistics + position; the MAE against a random encoder and the "
        "reference pretext; the control against a random encoder)\n\n"
        + summary_table(result["probe_stats"], "Training volumes")
        + f"\n{word.capitalize()}s above 50% Dice at {largest} volumes (mean over seeds): "
        + "; ".join(f"{ARM_NAMES[a]} {len(over[str(largest)][a])} ({', '.join(over[str(largest)][a]) or 'none'})"
                    for a in arms) + ".\n"
        + "\n**Area under the validation Dice curve (%)**, its length-normalised height (descriptive: not among the "
        "headline comparisons)\n\n" + auc_table(result["finetune_runs"], sizes)
        + per_organ
    )


# The study's budget on top of the preset (the demo's fine-tuning recipe, run longer), chosen on the labeled tuning
# split (results/ft_sweep/sweep.md): 1,500 iterations with a cosine decay reached 52.9% mean Dice (final = mean of
# the last 3 evaluations; 53.0% at the end, flat over the last 300 iterations) against 45.6% for 800 at a constant
# rate. `--set` changes it. The precision is pinned as the study began (pre-training in fp32, fine-tuning and probes
# with amp="auto", bf16 on a bf16 CPU or a GPU), so that its records stay valid when the demo preset's precision
# changes and when the study continues on another machine; bf16 and fp32 fine-tuning reach the same Dice
# (results/precision/finetune/sweep.md).
STUDY_OVERRIDES: dict[str, Any] = {"ft_iterations": 1500, "ft_eval_every": 100, "ft_cosine": True,
                                   "amp": "auto", "ssl_amp": "off"}
# The MAE arm's pre-training on top of the demo preset: chosen by the pretext sweep (results/pretext_sweep/sweep.md) on
# the unlabeled validation volumes and the probe monitor's labeled training volumes.
MAE_RECIPE: dict[str, Any] = {"mae_mask_ratio": 0.75, "ssl_epochs": 60}


def mae_recipe(cfg, preset: str = "demo") -> Any:
    """The MAE arm's pre-training config: the study's config with ``pretext="mae"`` and, on the demo
    preset, ``MAE_RECIPE`` (other presets keep their own MAE settings)."""
    return cfg.replace(pretext="mae", **(MAE_RECIPE if preset == "demo" else {}))


def train_control(cfg, out: str, cohort_root: str, progress: bool = True, log=print) -> str:
    """The positive control's encoder: a UNETR trained with labels on the cohort's ``control`` split (disjoint
    from training, tuning and validation), the study's fine-tuning recipe with the cohort's control volumes,
    monitored on the tuning split (the validation split is not read). Resumable; returns its ``last_model.pt``
    (the encoder arm reads its ViT)."""
    from .data import read_datalist_json
    from .finetune import finetune
    from .finetune.inputs import resolve_ft_data

    data_root, json_path = resolve_ft_data(cfg, None, None, cohort_root, max(int(n) for n in cfg["synth_train_sizes"]))
    content = read_datalist_json(json_path)
    if not content.get("control"):
        raise ValueError(f"datalist {json_path}: no 'control' list; the study's positive control needs "
                         "synth_labeled_control > 0 (labeled volumes disjoint from training, tuning and validation)")
    folder = os.path.join(out, "control")
    os.makedirs(folder, exist_ok=True)
    datalist = os.path.join(folder, "datalist.json")
    write_json(datalist, {"labels": content.get("labels"), "training": content["control"], "tuning": content["tuning"],
                          "control_of": os.path.abspath(json_path)})
    ccfg = cfg.replace(ft_eval_split="tuning")
    res = finetune(ccfg, data_root=data_root, json_path=datalist, logdir=folder, use_pretrained=False, resume="auto",
                   progress=progress, cohort_root=cohort_root, log=log)
    final = (res.final or {}).get("mean_dice", float("nan"))
    log(f"control encoder: UNETR trained with labels on {res.n_train} control volumes, tuning Dice {100 * final:.1f}%")
    return os.path.join(folder, "last_model.pt")


def run_study(
    out: str = "runs/study",
    preset: str = "demo",
    seeds: int = 5,
    ssl_epochs: int | None = None,
    train_sizes: Sequence[int] | None = None,
    probe_size: int | None = None,
    cohort_root: str | None = None,
    overrides: dict[str, Any] | None = None,  # None: STUDY_OVERRIDES with the demo preset
    progress: bool = True,
    log=print,
    workers: int | None = None,
    level: float = 0.95,
    from_state: str | None = None,
    arms: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole study; returns the dict written to ``out/study.json``.

    Every headline interval is at family-wise confidence ``level``: Bonferroni over the
    ``comparison_family`` (each interval at ``1 - (1 - level) / m``); the verdict follows it.
    Per-organ intervals are unadjusted 95% and descriptive. ``from_state``: a folder written by
    ``save_state`` (on this or another machine); its records are copied into ``out`` first and the
    runs they record are reused, not trained again. ``arms``: the encoder arms to run (default all of
    ``ENCODER_ARMS``; random initialisation always runs): a study run with fewer arms first is completed
    by a later run with all of them, which reuses what the first one finished."""
    from .config import get_config
    from .finetune import compare_init
    from .organs import organ_names
    from .parallel import auto_workers, run_jobs
    from .synthetic import make_cohort_from_config

    t_start = time.perf_counter()
    if overrides is None:
        overrides = dict(STUDY_OVERRIDES) if preset == "demo" else {}
    cfg = get_config(preset, **{**overrides, "ssl_epochs": int(ssl_epochs) if ssl_epochs else None})
    os.makedirs(out, exist_ok=True)
    if from_state:
        restore_state(from_state, out, log=log)
    cohort_root = cohort_root or os.path.join(REPO, "data", "synthetic")
    workers = auto_workers() if workers is None else int(workers)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    make_cohort_from_config(cfg, cohort_root, progress=progress)
    timings["cohort_s"] = time.perf_counter() - t0

    mae_cfg = mae_recipe(cfg, preset)
    arms = [a for a in ENCODER_ARMS if a in (arms or ENCODER_ARMS)]
    encoders, provenance = study_encoders(cfg, mae_cfg, arms, out, cohort_root, timings, progress, log)
    best = encoders.get("pretrained")

    seed_list = list(range(int(seeds)))
    sizes = list(train_sizes) if train_sizes else [int(n) for n in cfg["synth_train_sizes"]]
    probe_n = int(probe_size or (2 if 2 in sizes else min(sizes)))
    log(f"[3/4] linear probes (cheap, so first) on frozen features ({probe_n} labeled volumes, seeds {seed_list}, arms "
        f"{[a for a, _, _ in PROBE_ARMS]})")
    t0 = time.perf_counter()
    probe_dir = os.path.join(out, "probe")
    os.makedirs(probe_dir, exist_ok=True)
    jobs = [(_probe_run, dict(cfg=cfg.to_dict(), arm=arm, features=feat, path=encoders[ckpt] if ckpt else None, seed=seed,
                              n_train=probe_n, cohort_root=cohort_root, out=probe_dir))
            for seed in seed_list for arm, feat, ckpt in PROBE_ARMS if ckpt is None or ckpt in encoders]
    probe_records = [rec for _, rec in sorted(run_jobs(jobs, workers), key=lambda x: x[0])]
    timings["probe_s"] = time.perf_counter() - t0

    log(f"[4/4] fine-tuning: sizes {sizes} x seeds {seed_list} x arms random, {', '.join(encoders)}; {workers} at a time")
    t0 = time.perf_counter()
    comp = compare_init(cfg, sizes, seed_list, best, logdir=os.path.join(out, "compare"), progress=progress,
                        log=log, cohort_root=cohort_root, workers=workers,
                        encoders={k: v for k, v in encoders.items() if k != "pretrained"} or None)
    timings["finetune_s"] = time.perf_counter() - t0
    timings["finetune_runs_s"] = float(sum(r["time_s"] for r in comp["runs"]))  # every run's own time, reused ones too
    reused = sum(bool(r.get("reused_record")) for r in comp["runs"])
    organs = list(comp["class_names"][1:]) or organ_names(int(cfg["out_channels"]))  # the datalist's classes
    records = curve_metrics(comp["runs"], organs, int(cfg["ft_final_evals"]))

    family = comparison_family(sizes, arms)
    m = len(family)
    adj = 1 - (1 - level) / m
    stats, probe_stats = headline_stats(family, records, probe_records, probe_n, adj)
    timings["total_s"] = time.perf_counter() - t_start

    from .plots import plot_study
    from .runtime import machine_line

    fig_path = os.path.join(out, "study_curves.png")
    plot_study(records, probe_records, fig_path, ARM_NAMES)
    over = {str(n): {arm: organs_over(records, n, arm) for arm in ("random", *arms)} for n in sizes}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_line(),
        "preset": preset,
        "config": cfg.to_dict(),
        "mae_config": mae_cfg.to_dict() if "mae" in arms else None,
        "arms": ["random", *arms],
        "seeds": seed_list,
        "train_sizes": sizes,
        "probe_size": probe_n,
        "n_val": comp["runs"][0]["n_val"] if comp["runs"] else None,
        "workers": workers,
        "timings_s": timings,
        "reused_runs": reused,
        "encoders": {arm: describe_encoder(arm, cfg, mae_cfg, provenance[arm]) for arm in arms},
        "ssl_history": provenance.get("pretrained", {}).get("history"),
        "mae_history": provenance.get("mae", {}).get("history"),
        "finetune_runs": records,
        "finetune_stats": stats,
        "organs_over_50": over,
        "probe_runs": probe_records,
        "probe_stats": probe_stats,
        "comparisons": {"family": [list(f) for f in family], "m": m, "family_level": level, "per_interval_level": adj,
                        "method": "Bonferroni", "metric": "final"},
        "figure": fig_path,
    }
    report = study_report(result, organs)
    result["report"] = report
    write_json(os.path.join(out, "study.json"), result)
    write_text(os.path.join(out, "study.md"), report)
    log(report)
    return result


def study_encoders(cfg, mae_cfg, arms: Sequence[str], out: str, cohort_root: str, timings: dict[str, float],
                   progress: bool = True, log=print) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Steps 1 and 2 of the study: the encoder of every arm in ``arms`` (``study_encoder``: made once, reused
    afterwards), the two pre-trainings first, then the positive control; ``({arm: path}, {arm: provenance})``.
    Their times go to ``timings`` (``pretrain_s``, ``control_s``)."""
    from .pretrain import pretrain

    log(f"[1/4] pre-training: two views ({cfg['ssl_epochs']} epochs) and the masked autoencoder")
    t0 = time.perf_counter()
    mae_root = cohort_root + ("_abdomen" if mae_cfg["synth_unlabeled_kind"] == "abdomen" else "")
    makers = {
        "pretrained": lambda: pretrain(cfg, logdir=os.path.join(out, "ssl"), resume=True, progress=progress,
                                       cohort_root=cohort_root, log=log),
        "mae": lambda: pretrain(mae_cfg, logdir=os.path.join(out, "mae"), resume=True, progress=progress,
                                cohort_root=mae_root, log=log),
        "control": lambda: train_control(cfg, out, cohort_root, progress=progress, log=log),
    }
    encoders, provenance = {}, {}
    for arm in ("pretrained", "mae"):
        if arm in arms:
            encoders[arm], provenance[arm] = study_encoder(out, arm, makers[arm], log)
    timings["pretrain_s"] = time.perf_counter() - t0
    log("[2/4] the positive control: a UNETR trained with labels on the control split")
    t0 = time.perf_counter()
    if "control" in arms:
        encoders["control"], provenance["control"] = study_encoder(out, "control", makers["control"], log)
    timings["control_s"] = time.perf_counter() - t0
    return encoders, provenance


def headline_stats(family, records, probe_records, probe_n: int, level: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The paired comparisons of ``family`` (``comparison_family``) at confidence ``level`` each: fine-tuning
    ``{"<size>|<arm>": ...}`` and probe ``{"<probe_n>|<arm>|<baseline>": ...}``, all on final Dice."""
    stats: dict[str, Any] = {}
    probe_stats: dict[str, Any] = {}
    for size, treatment, base in family:
        if size == "probe":
            probe_stats[f"{probe_n}|{treatment}|{base}"] = paired_by(probe_records, probe_n, "final", baseline=base,
                                                                    treatment=treatment, level=level)
        else:
            stats[f"{size}|{treatment}"] = paired_by(records, int(size), "final", treatment=treatment, level=level)
    return stats, probe_stats


def describe_encoder(arm: str, cfg, mae_cfg, provenance: dict[str, Any]) -> str:
    """One line on how an encoder arm's weights were made, for the report."""
    if arm == "pretrained":
        return f"ViTAutoEnc, two corrupted views, {cfg['ssl_epochs']} epochs on {cfg['synth_unlabeled_kind']} CT"
    if arm == "mae":
        return (f"MaskedAutoEncoderViT, {100 * mae_cfg['mae_mask_ratio']:.0f}% of the patches masked, "
                f"{mae_cfg['ssl_epochs']} epochs on {mae_cfg['synth_unlabeled_kind']} CT")
    return (f"UNETR trained with labels on {cfg['synth_labeled_control']} control volumes, {cfg['ft_iterations']} "
            f"iterations (its own tuning Dice {100 * provenance['tuning_dice']:.1f}%)")


def study_encoder(out: str, arm: str, make, log=print) -> tuple[str, dict[str, Any]]:
    """The encoder arm ``arm`` fine-tunes from: ``out/encoders/<arm>.pt`` (the ViT in UNETR's key names,
    ``ssl_utils.models.export_encoder``) and its provenance (``<arm>.json``: the source run's history, the
    control's tuning Dice). Made once by ``make()`` (a ``pretrain`` result or the control's checkpoint path)
    and reused afterwards, also in a study continued elsewhere from its saved state, so that every
    machine fine-tunes from the same weights."""
    from .checkpoint import load_checkpoint
    from .finetune.loop import final_from_history
    from .models import export_encoder

    folder = os.path.join(out, "encoders")
    path, meta_path = os.path.join(folder, f"{arm}.pt"), os.path.join(folder, f"{arm}.json")
    if os.path.isfile(path) and os.path.isfile(meta_path):
        log(f"    {arm} encoder: reused {path}")
        with open(meta_path) as f:
            return path, json.load(f)
    os.makedirs(folder, exist_ok=True)
    made = make()
    source = made if isinstance(made, str) else made["best"]
    history = (load_checkpoint(source).get("history") if isinstance(made, str) else made["history"]) or []
    meta: dict[str, Any] = {"arm": arm, "source": os.path.relpath(source, out), "history": history}
    if arm == "control":
        cfg = load_checkpoint(source)["config"]
        meta["tuning_dice"] = float((final_from_history(history, int(cfg["ft_final_evals"])) or {}).get("mean_dice", float("nan")))
    export_encoder(source, path)
    write_json(meta_path, meta)
    return path, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="output folder (default: runs/study)")
    parser.add_argument("--preset", default="demo", choices=["demo", "smoke", "paper"])
    parser.add_argument("--seeds", type=int, default=5, help="paired seeds per arm (default: 5)")
    parser.add_argument("--ssl_epochs", type=int, default=None, help="pre-training epochs (default: the preset's)")
    parser.add_argument("--train_sizes", type=int, nargs="+", default=None, help="labeled training volumes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set ft_iterations=400 (values parsed as JSON when possible)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs side by side in separate processes (default: 2 on a CPU-only machine, 1 with a GPU)")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ENCODER_ARMS),
                        help="encoder arms to run beside random initialisation (default: all); a later run with all "
                             "of them reuses what this one finished")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--cohort_root", default=None,
                        help="folder of the embedded cohort (default: data/synthetic of this repository)")
    parser.add_argument("--save_state", metavar="DIR", default=None,
                        help="copy what the study in --out has finished (records, no weights) to DIR, then exit")
    parser.add_argument("--from_state", metavar="DIR", default=None,
                        help="continue a study from the records in DIR (written by --save_state, e.g. on another machine)")
    args = parser.parse_args(argv)
    if args.save_state:
        save_state(args.out, args.save_state, cohort_root=args.cohort_root)
        return 0
    overrides: dict[str, Any] = dict(STUDY_OVERRIDES) if args.preset == "demo" else {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    run_study(args.out, args.preset, args.seeds, args.ssl_epochs, args.train_sizes, cohort_root=args.cohort_root,
              overrides=overrides,
              progress=not args.no_progress, workers=args.workers, from_state=args.from_state, arms=args.arms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
