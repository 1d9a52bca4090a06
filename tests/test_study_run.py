"""``make experiment`` end to end at the smoke preset: the four arms (random, pretrained, mae,
control), what study.json keeps, the corrected intervals, the positive control read first, the
probe's baselines, two runs side by side, and resuming without retraining."""

import json
import os

import pytest

pytestmark = pytest.mark.slow  # a whole study at smoke size (minutes)


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
    assert sorted((r["size"], r["seed"], r["arm"]) for r in runs) == sorted(
        (1, s, a) for s in (0, 1) for a in ("random", "pretrained", "mae", "control"))
    for r in runs:
        assert {"size", "seed", "arm", "final", "per_organ", "auc", "curve"} <= set(r)
        assert len(r["per_organ"]) == 13 and 0.0 <= r["final"] <= 1.0
        # final = the mean of the last 3 of the 4 evaluations
        assert r["final_iterations"] == [2, 3, 4]
        hist = json.load(open(os.path.join(out, "compare", "n1", f"seed{r['seed']}", r["arm"], "history.json")))
        assert r["final"] == pytest.approx(sum(h["val_mean_dice"] for h in hist[-3:]) / 3)
    probe_arms = sorted({r["arm"] for r in saved["probe_runs"]})
    assert probe_arms == ["control", "intensity", "mae", "patch_embedding", "pretrained", "random"]
    # each encoder arm started from its own encoder: the MAE's and the control's are not the two-view one
    transfers = {r["arm"]: r["transfer"] for r in json.load(open(os.path.join(out, "compare", "results.json")))["runs"]}
    assert all(f"encoders/{arm}.pt" in transfers[arm] for arm in ("pretrained", "mae", "control"))
    assert transfers["random"] is None
    assert all(r["encoder_unchanged"] for r in saved["probe_runs"])


def test_intervals_are_corrected_for_every_comparison(study):
    from ssl_utils.stats import paired_comparison

    _, res, _ = study
    comp = res["comparisons"]
    # fine-tuning: 1 size x 3 encoder arms; probe: 6 comparisons; all on final Dice
    assert comp["m"] == 9 and comp["method"] == "Bonferroni"
    assert comp["per_interval_level"] == pytest.approx(1 - 0.05 / 9)
    runs = {(r["seed"], r["arm"]): r["final"] for r in res["finetune_runs"]}
    for arm in ("pretrained", "mae", "control"):
        ref = paired_comparison([runs[(s, "random")] for s in (0, 1)], [runs[(s, arm)] for s in (0, 1)],
                                level=1 - 0.05 / 9)
        assert res["finetune_stats"][f"1|{arm}"]["t_ci"] == pytest.approx(ref["t_ci"])
    assert set(res["probe_stats"]) == {"1|pretrained|random", "1|pretrained|patch_embedding", "1|pretrained|intensity",
                                       "1|mae|random", "1|mae|pretrained", "1|control|random"}
    report = res["report"]
    assert "9 headline comparisons" in report and "Bonferroni" in report
    # the positive control's verdict comes before any verdict on self-supervision
    assert report.index("Positive control") < report.index("Full fine-tuning")
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
    """--save_state keeps the finished runs and the encoders, without training checkpoints; --from_state
    on a bare folder (another machine) trains nothing: no encoder, no fine-tuning run."""
    from ssl_utils.study import main, run_study

    out, res, _ = study
    state = str(tmp_path / "state")
    assert main(["--out", out, "--save_state", state]) == 0
    kept = sorted(os.path.relpath(os.path.join(r, f), state) for r, _, files in os.walk(state) for f in files)
    # no training checkpoint; the three encoders the arms start from (the ViT alone, in UNETR's names)
    assert sorted(k for k in kept if k.endswith(".pt")) == [f"encoders/{a}.pt" for a in ("control", "mae", "pretrained")]
    assert sum(k.endswith("run_record.json") for k in kept) == 8 and sum(k.startswith("probe") for k in kept) == 12
    elsewhere = str(tmp_path / "elsewhere")
    logs: list[str] = []
    again = run_study(elsewhere, preset="smoke", seeds=2, train_sizes=[1], cohort_root=smoke_cohort["root"],
                      progress=False, log=logs.append, workers=1, from_state=state,
                      overrides={"ft_iterations": 4, "ft_eval_every": 1, "ft_final_evals": 3, "probe_iterations": 2})
    trained = [os.path.join(r, f) for r, _, files in os.walk(elsewhere) for f in files
               if f.endswith(".pt") and os.path.basename(r) != "encoders"]
    assert trained == []  # no pre-training, no control, every fine-tuning run reused (same encoder weights)
    assert "\n".join(logs).count("reused the finished run recorded in") == 8
    assert again["reused_runs"] == 8 and "8 of the 8 fine-tuning runs were recorded by an earlier invocation" in again["report"]
    assert [r["final"] for r in again["finetune_runs"]] == [r["final"] for r in res["finetune_runs"]]
    assert [r["final"] for r in again["probe_runs"]] == [r["final"] for r in res["probe_runs"]]
