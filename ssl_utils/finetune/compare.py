"""Random initialisation against the pre-trained encoder: both arms, paired by seed, every size.

``compare_init`` runs ``finetune`` for every (training-set size, seed, arm) with the same budget
and writes ``results.json`` (every run, updated after each one) and ``results_table.md``. The
training sets of the sizes come from one datalist (its first N training entries, nested), from
one datalist per size (``json_template``), or from the embedded cohort.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..config import get_config
from ..engine import Result
from ..io import jsonable, write_json, write_text
from ..parallel import auto_workers, run_jobs
from . import report
from .inputs import comparison_datalists, resolve_ft_data
from .loop import _RUN_IGNORE, LAST_NAME, _fingerprint, finetune
from .report import ARM_LABELS, ARMS


@dataclass
class CompareResult(Result):
    """What ``compare_init`` returns; ``to_dict()`` is the content of ``results.json``."""

    runs: list[dict[str, Any]]  # one summary per run: size, seed, arm, n_train, n_val, curve, final, best, per_organ, ...
    config: dict[str, Any]
    seeds: list[int]
    arms: list[str]
    table: str
    table_best: str
    per_organ_table: str
    paired: dict[int, dict[str, Any]]
    paired_table: str
    paths: dict[str, str]
    time_s: float
    class_names: list[str] = dataclasses.field(default_factory=list)  # every class, background first

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def compare_run_dir(logdir: str, size: int, seed: int, arm: str) -> str:
    """The folder ``compare_init`` uses for one run: ``logdir/n{size}/seed{seed}/{arm}``."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    return os.path.join(logdir, f"n{int(size)}", f"seed{int(seed)}", arm)


def run_summary(res, size: int, seed: int, arm: str, seconds: float) -> dict[str, Any]:
    """The ``results.json`` entry of one fine-tuning run (``FinetuneResult``)."""
    history = res.history
    best_row = max(history, key=lambda r: r["val_mean_dice"]) if history else {}
    final = res.final or {}
    return {
        "size": int(size),
        "seed": int(seed),
        "arm": arm,
        "n_train": int(res.n_train),
        "n_val": int(res.n_val),
        "curve": [[int(i), float(d)] for i, d in res.curve],
        "final": float(final.get("mean_dice", float("nan"))),
        "final_with_bg": float(final.get("mean_dice_with_bg", float("nan"))),
        "best": float(best_row.get("val_mean_dice", float("nan"))),
        "best_iteration": int(best_row.get("iteration", 0)),
        "per_organ": {k: float(v) for k, v in (final.get("per_organ") or {}).items()},
        "per_organ_best": {k[5:]: float(v) for k, v in best_row.items() if k.startswith("dice_")},
        "iterations": int(res.iteration),
        "logdir": res.logdir,
        "time_s": float(seconds),
        "transfer": str(res.transfer) if res.transfer is not None else None,
    }


# A finished run without its weights: enough for a comparison to reuse it on another machine.
RECORD_NAME = "run_record.json"


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def finished_run_record(logdir: str, summary: dict[str, Any], class_names: Sequence[str], datalist: str) -> dict[str, Any] | None:
    """The record of the finished run in ``logdir`` (``RECORD_NAME``'s content): its settings (from
    ``last_model.pt``), the digests of the datalist it trained on and of the pre-trained encoder's
    weights it started from, its classes and its ``run_summary``. None when the run has not
    finished or its pre-trained file is no longer the one it started from."""
    from ..checkpoint import load_checkpoint, weights_digest

    ckpt = load_checkpoint(os.path.join(logdir, LAST_NAME))
    cfg = dict(ckpt.get("config") or {})
    if not cfg or int(ckpt.get("iteration", 0)) < int(cfg["ft_iterations"]):
        return None
    digest = None
    if ckpt.get("use_pretrained"):
        path = ckpt.get("pretrained_path")
        if not path or ckpt.get("pretrained_fingerprint") != _fingerprint(path):
            return None  # which encoder it started from can no longer be told
        digest = weights_digest(path)
    return {"config": cfg, "n_train": int(ckpt["n_train"]), "use_pretrained": bool(ckpt.get("use_pretrained")),
            "pretrained_digest": digest, "datalist_digest": _file_digest(datalist), "iteration": int(ckpt["iteration"]),
            "class_names": list(class_names), "summary": {k: v for k, v in summary.items() if k != "logdir"}}


def _recorded_run(logdir: str, cfg: Any, size: int, seed: int, arm: str, datalist: str,
                  pretrained_path: str | None) -> tuple[tuple[dict[str, Any], list[str]] | None, str | None]:
    """``((summary, classes), note)`` when ``logdir`` holds the record of exactly this run (same
    settings, datalist and pre-trained weights) and no checkpoint, else ``(None, why not or None)``."""
    from ..checkpoint import weights_digest
    from ..config import config_differences

    path = os.path.join(logdir, RECORD_NAME)
    if not os.path.isfile(path) or os.path.exists(os.path.join(logdir, LAST_NAME)):
        return None, None
    with open(path) as f:
        rec = json.load(f)
    diffs = config_differences(rec["config"], cfg, [k for k in cfg if k not in _RUN_IGNORE + ("out_channels",)])
    summary = rec["summary"]
    if (summary["size"], summary["seed"], summary["arm"]) != (int(size), int(seed), arm):
        diffs.append(f"run: recorded {summary['size']} volumes, seed {summary['seed']}, {summary['arm']}")
    if rec["datalist_digest"] != _file_digest(datalist):
        diffs.append(f"the datalist {datalist} is not the one the run trained on")
    if arm != "random" and rec["pretrained_digest"] != weights_digest(str(pretrained_path)):
        diffs.append(f"the weights of {pretrained_path} are not those the run started from")
    if not os.path.isfile(os.path.join(logdir, "history.json")):
        diffs.append("its history.json is missing")
    if diffs:
        return None, f"the record {path} is not reused ({'; '.join(diffs)}): the run starts again"
    return ((dict(summary, logdir=logdir, reused_record=True), list(rec["class_names"])),
            f"reused the finished run recorded in {path}")


def _compare_run(cfg: dict[str, Any], size: int, seed: int, arm: str, data_root: str | None, json_path: str | None,
                 logdir: str, pretrained_path: str | None, resume: bool, device: str | None, progress: bool,
                 cohort_root: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """One run of a comparison (picklable, so it can run in a worker process): its ``run_summary``,
    the classes, and the run's messages about resuming, reusing or starting afresh.

    A finished run leaves ``RECORD_NAME`` in its folder; with ``resume``, a folder that holds such
    a record of exactly this run and no checkpoint (copied from another machine, e.g. with
    ``python -m ssl_utils.study --save_state``) is reused without training."""
    notes: list[str] = []
    run_cfg = get_config(cfg).replace(seed=seed)
    datalist = resolve_ft_data(run_cfg, data_root, json_path, cohort_root, size)[1]
    if resume:
        reused, note = _recorded_run(logdir, run_cfg, size, seed, arm, datalist, pretrained_path)
        if reused is not None:
            return reused[0], reused[1], [str(note)]
        notes += [note] if note else []
    t0 = time.perf_counter()
    res = finetune(
        run_cfg, data_root=data_root, json_path=json_path, logdir=logdir,
        pretrained_path=pretrained_path, use_pretrained=arm != "random", resume="auto" if resume else False,
        device=device, progress=progress, cohort_root=cohort_root, n_train=size,
        log=lambda msg: notes.append(msg) if ("resumed" in msg or "new run" in msg) else None,
    )
    summary = run_summary(res, size, seed, arm, time.perf_counter() - t0)
    record = finished_run_record(logdir, summary, res.class_names, datalist)
    if record is not None and not _same_record(os.path.join(logdir, RECORD_NAME), record):
        write_json(os.path.join(logdir, RECORD_NAME), record)
    return summary, list(res.class_names), notes


def _same_record(path: str, record: dict[str, Any]) -> bool:
    """Whether ``path`` already records this run (a finished run reused from its checkpoint keeps
    the record, and the time, of the call that trained it)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    untimed = lambda r: {**r, "summary": {**r["summary"], "time_s": None}}  # noqa: E731
    return untimed(old) == untimed(json.loads(json.dumps(jsonable(record))))


def _encoders(pretrained_path: str | None, encoders: Mapping[str, str] | None,
              log: Callable[[str], None]) -> dict[str, str]:
    """``{arm: checkpoint}`` of the arms that start from an encoder (``pretrained_path`` is the
    ``pretrained`` arm's; ``encoders`` adds ``mae`` / ``control``), every file checked to exist."""
    found = {**({"pretrained": pretrained_path} if pretrained_path else {}), **dict(encoders or {})}
    if not found:
        log("no pre-trained checkpoint given: only the random-initialisation arm runs")
    for arm, path in found.items():
        if arm not in ARMS or arm == "random":
            raise ValueError(f"encoder arm {arm!r}: expected one of {list(ARMS[1:])}")
        if not os.path.isfile(str(path)):
            raise FileNotFoundError(
                f"{ARM_LABELS[arm].lower()} checkpoint {path} not found; run ssl_train.ipynb first or pass "
                "pretrained_path=None to run the random-initialisation arm only"
            )
    return {arm: str(found[arm]) for arm in ARMS if arm in found}


def compare_init(
    cfg: Mapping[str, Any] | str,
    train_sizes: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    pretrained_path: str | None = None,
    data_root: str | None = None,
    json_template: str | None = None,
    logdir: str = "runs/compare",
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = True,
    device: str | None = None,
    cohort_root: str = "data/synthetic",
    json_path: str | None = None,
    workers: int | None = None,
    encoders: Mapping[str, str] | None = None,
) -> CompareResult:
    """Fine-tune from random initialisation and from the pre-trained encoder, with the same budget,
    for every training-set size and seed; write ``results.json`` and ``results_table.md`` to
    ``logdir``.

    ``train_sizes``: numbers of labeled training volumes (default: ``cfg["synth_train_sizes"]``
    on the embedded cohort, 6/12/24 with ``json_template``, and with ``json_path``
    ``default_train_sizes`` of its training count: 6/12/24 where they fit, and all of them). ``seeds``: default ``[0, 1]``; with the same
    seed both arms see the same data order, crops and decoder initialisation. ``pretrained_path``:
    ``None`` runs the random arm only (the pre-trained column then reads "n/a"); a path that does
    not exist is an error. ``encoders``: more arms, ``{"mae": path, "control": path}``, each fine-tuned
    exactly as the ``pretrained`` arm from its own encoder checkpoint. Own data: ``json_path``, a labeled datalist (paths relative to
    ``data_root``, default its folder); each size N trains on its first N training entries
    (nested subsets, written to ``logdir/datalists/``) and all sizes share its validation list.
    Or one datalist per size: ``data_root`` and ``json_template`` such as
    ``"json_files/btcv/dataset_0_init_{n}.json"``. The classes (UNETR's output channels, every
    table) come from the datalist's ``labels`` map, BTCV's 13 organs without one. With ``resume=True`` (default) a run whose
    folder already holds a checkpoint with the same settings is continued or, when finished, reused.
    Dice values in the result are fractions in [0, 1]; the tables show percent. ``workers``: runs
    side by side in separate processes (default ``ssl_utils.parallel.auto_workers``: 2 on a
    CPU-only machine, 1 with a GPU); a run gives the same result either way, up to floating-point
    rounding (the number of threads changes the order of sums).
    """
    cfg = get_config(cfg)
    if train_sizes is not None and not list(train_sizes):
        raise ValueError("train_sizes is empty; give at least one training-set size")
    sizes, datalists, subsets = comparison_datalists(cfg, data_root, json_path, json_template, train_sizes,
                                                     os.path.join(logdir, "datalists"))
    seeds = [0, 1] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    starts = _encoders(pretrained_path, encoders, log)
    arms = ["random", *starts]
    os.makedirs(logdir, exist_ok=True)
    plan = [(n, s, arm) for n in sizes for s in seeds for arm in arms]
    log(f"comparison: {len(plan)} runs ({len(sizes)} training-set sizes x {len(seeds)} seeds x {len(arms)} arms), "
        f"{cfg['ft_iterations']} iterations each, evaluation every {cfg['ft_eval_every']}")
    workers = max(1, min(auto_workers(device) if workers is None else int(workers), len(plan)))
    if workers > 1:
        log(f"{workers} runs side by side ({max(1, (os.cpu_count() or 1) // workers)} thread(s) each)")
    runs: list[dict[str, Any] | None] = [None] * len(plan)
    class_names: list[str] = []
    paths = {"json": os.path.join(logdir, "results.json"), "table": os.path.join(logdir, "results_table.md")}
    t_all = time.perf_counter()
    jobs = []
    for n, seed, arm in plan:
        jobs.append((_compare_run, dict(
            cfg=cfg.to_dict(), size=n, seed=seed, arm=arm, data_root=None if subsets else data_root,
            json_path=datalists[n], logdir=compare_run_dir(logdir, n, seed, arm),
            pretrained_path=starts.get(arm), resume=resume, device=device,
            progress=progress and workers == 1, cohort_root=cohort_root,
        )))
    if workers > 1:
        from ..synthetic import make_cohort_from_config

        if not data_root and not json_path and not json_template:  # the embedded cohort: written once, here
            make_cohort_from_config(cfg, cohort_root, progress=False)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), desc="comparison runs", unit="run", disable=not progress or workers == 1)
    for done, (i, (summary, names, notes)) in enumerate(run_jobs(jobs, workers), start=1):
        n, seed, arm = plan[i]
        runs[i] = summary
        class_names = names
        bar.update(1)
        for note in notes:
            log("    " + note)
        log(f"[{done}/{len(plan)}] {n} training volumes, seed {seed}, {ARM_LABELS[arm].lower()}: final mean Dice "
            f"{100 * summary['final']:.2f}% (best {100 * summary['best']:.2f}% at iteration {summary['best_iteration']}) "
            f"in {summary['time_s']:.0f} s")
        write_json(paths["json"], {"config": cfg, "runs": [r for r in runs if r is not None]})
    bar.close()
    runs = [r for r in runs if r is not None]
    if class_names and len(class_names) != int(cfg["out_channels"]):
        cfg = cfg.replace(out_channels=len(class_names))  # as the runs were configured (the datalist's classes)
    partial = {"runs": runs, "config": jsonable(cfg), "seeds": seeds, "arms": arms, "class_names": class_names}
    paired = report.paired_summary(partial, metric="final")
    paired_tables = "\n".join(report.paired_table_markdown(report.paired_summary(partial, "final", treatment=arm), arm)
                              for arm in arms if arm != "random") or report.paired_table_markdown({})
    results = CompareResult(
        runs, partial["config"], seeds, arms, report.results_table_markdown(partial, "final"),
        report.results_table_markdown(partial, "best"), report.per_organ_table_markdown(partial, "final"), paired,
        paired_tables, paths, time.perf_counter() - t_all, class_names,
    )
    write_json(paths["json"], results)
    write_text(paths["table"], report.comparison_report_markdown(results))
    log(f"comparison done in {results.time_s / 60:.1f} min; table in {paths['table']}")
    return results
