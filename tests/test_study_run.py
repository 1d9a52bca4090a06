"""``make experiment`` end to end at the smoke preset: what study.json keeps, the corrected
intervals, the probe's baselines, two runs side by side, and resuming without retraining."""

import json
import os

import pytest


@pytest.fixture(scope="module")
def study(smoke_cohort, tmp_path_factory):
    from ssl_utils.study import run_study

    out = str(tmp_path_factory.mktemp("study"))
    logs: list[str] = []
    res = run_study(out, preset="smoke", seeds=2, train_sizes=[1], cohort_root=smoke_cohort["root"],
                    progress=False, log=logs.append, workers=2,
                    overrides={"ft_iterations": 4, "ft_eval_every": 1, "ft_final_evals": 3, "probe_iterations": 2})
    return out, res, logs


def test_study_json_keeps_every_run(study):
    out, res, _ = study
    with open(os.path.join(out, "study.json")) as f:
        saved = json.load(f)
    runs = saved["finetune_runs"]
    assert sorted((r["size"], r["seed"], r["arm"]) for r in runs) == [
        (1, 0, "pretrained"), (1, 0, "random"), (1, 1, "pretrained"), (1, 1, "random")]
    for r in runs:
        assert {"size", "seed", "arm", "final", "per_organ", "auc", "curve"} <= set(r)
        assert len(r["per_organ"]) == 13 and 0.0 <= r["final"] <= 1.0
        # final = the mean of the last 3 of the 4 evaluations
        assert r["final_iterations"] == [2, 3, 4]
        hist = json.load(open(os.path.join(out, "compare", "n1", f"seed{r['seed']}", r["arm"], "history.json")))
        assert r["final"] == pytest.approx(sum(h["val_mean_dice"] for h in hist[-3:]) / 3)
    probe_arms = sorted({r["arm"] for r in saved["probe_runs"]})
    assert probe_arms == ["intensity", "patch_embedding", "pretrained", "random"]
    assert all(r["encoder_unchanged"] for r in saved["probe_runs"])


def test_intervals_are_corrected_for_every_comparison(study):
    from ssl_utils.stats import paired_comparison

    _, res, _ = study
    comp = res["comparisons"]
    # fine-tuning: 1 size x (final, auc); probe: 3 baselines x (final, auc)
    assert comp["m"] == 8 and comp["method"] == "Bonferroni"
    assert comp["per_interval_level"] == pytest.approx(1 - 0.05 / 8)
    st = res["finetune_stats"]["1|final"]
    runs = {(r["seed"], r["arm"]): r["final"] for r in res["finetune_runs"]}
    ref = paired_comparison([runs[(s, "random")] for s in (0, 1)], [runs[(s, "pretrained")] for s in (0, 1)],
                            level=1 - 0.05 / 8)
    assert st["t_ci"] == pytest.approx(ref["t_ci"])
    assert set(res["probe_stats"]) == {f"1|{m}|{b}" for m in ("final", "auc") for b in ("random", "patch_embedding", "intensity")}
    report = res["report"]
    assert "8 headline comparisons" in report and "Bonferroni" in report
    # the paired difference leads the tables
    assert report.index("Difference (Dice points)") < report.index("Baseline")


def test_rerun_reuses_every_finished_run(study, smoke_cohort):
    from ssl_utils.study import run_study

    out, res, _ = study
    stamps = {os.path.join(root, p): os.stat(os.path.join(root, p)).st_mtime_ns for root, _, files in os.walk(out) for p in files
              if p.endswith(".pt")}
    logs: list[str] = []
    again = run_study(out, preset="smoke", seeds=2, train_sizes=[1], cohort_root=smoke_cohort["root"], progress=False,
                      log=logs.append, workers=1,
                      overrides={"ft_iterations": 4, "ft_eval_every": 1, "ft_final_evals": 3, "probe_iterations": 2})
    after = {os.path.join(root, p): os.stat(os.path.join(root, p)).st_mtime_ns for root, _, files in os.walk(out) for p in files
             if p.endswith(".pt")}
    assert after == stamps  # no checkpoint was written again
    assert [r["final"] for r in again["finetune_runs"]] == [r["final"] for r in res["finetune_runs"]]
    assert [r["final"] for r in again["probe_runs"]] == [r["final"] for r in res["probe_runs"]]


def test_a_study_continues_elsewhere_from_its_saved_state(study, smoke_cohort, tmp_path):
    """--save_state keeps the finished runs without weights; --from_state on a bare folder (another
    machine) pre-trains again, recognises the same encoder by its weights, and trains nothing else."""
    from ssl_utils.study import main, run_study

    out, res, _ = study
    state = str(tmp_path / "state")
    assert main(["--out", out, "--save_state", state]) == 0
    kept = sorted(os.path.relpath(os.path.join(r, f), state) for r, _, files in os.walk(state) for f in files)
    assert not [k for k in kept if k.endswith(".pt")]
    assert sum(k.endswith("run_record.json") for k in kept) == 4 and sum(k.startswith("probe") for k in kept) == 8
    elsewhere = str(tmp_path / "elsewhere")
    logs: list[str] = []
    again = run_study(elsewhere, preset="smoke", seeds=2, train_sizes=[1], cohort_root=smoke_cohort["root"],
                      progress=False, log=logs.append, workers=1, from_state=state,
                      overrides={"ft_iterations": 4, "ft_eval_every": 1, "ft_final_evals": 3, "probe_iterations": 2})
    trained = [os.path.join(r, f) for r, _, files in os.walk(os.path.join(elsewhere, "compare")) for f in files if f.endswith(".pt")]
    assert trained == []  # every fine-tuning run was reused, the pre-trained ones too (same encoder weights)
    assert "\n".join(logs).count("reused the finished run recorded in") == 4
    assert again["reused_runs"] == 4 and "4 of the 4 fine-tuning runs were recorded by an earlier invocation" in again["report"]
    assert [r["final"] for r in again["finetune_runs"]] == [r["final"] for r in res["finetune_runs"]]
    assert [r["final"] for r in again["probe_runs"]] == [r["final"] for r in res["probe_runs"]]
