"""The multi-GPU script under real ``torchrun`` processes (gloo on CPU, 2 processes, smoke preset).

- ``--help`` lists the flags (and no test-only ones); default paths work from the repository root
  and from multi_gpu/; a missing CUDA device is a clear error with exit code 2;
- a 2-process run (2 epochs of 2 steps) ends, logs world size and backend first, writes a
  checkpoint that loads into UNETR, and leaves bitwise identical parameters on both ranks, with
  DDP built without ``find_unused_parameters`` and MONAI's never-used ``norm_cross_attn`` the only
  frozen parameters;
- one DDP step on 2 x b crops with global negatives equals one process on 2b crops (and without
  the gather it does not);
- a worker killed after epoch 1 under ``--max-restarts 1 ... --resume`` ends in a finished run that
  resumed from epoch 1, with the weights of an uninterrupted run;
- a NaN loss on one rank only stops both ranks at the same step with the same ``TrainingDiverged``
  message, promptly (no rank left waiting in a collective).

Runs that need test instruments (crash a worker once, save every rank's weights) go through
``tests/ddp_wrapper.py``, which calls the script's own ``run(args, on_epoch_end=hook)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "multi_gpu", "mgpu_ssl_train.py")
WRAPPER = os.path.join(ROOT, "tests", "ddp_wrapper.py")  # the script plus test instruments (hooks)
WORKER = os.path.join(ROOT, "tests", "ddp_step_worker.py")
DIVERGE_WORKER = os.path.join(ROOT, "tests", "ddp_diverge_worker.py")

pytestmark = pytest.mark.slow


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    return env


def torchrun(script: str, args: list[str], launcher: tuple[str, ...] = (), timeout: int = 280) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 [launcher] script args``
    (``--standalone``: a free port on localhost)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher, script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def _train_args(cohort: dict, logdir: str) -> list[str]:
    """2 epochs of batch size 1: the smoke cohort's 4 training volumes give 2 steps per epoch per rank."""
    return [
        "--preset", "smoke", "--epochs", "2", "--batch_size", "1", "--global_negatives",
        "--data_root", cohort["tcia_root"], "--json_path", cohort["tcia_json"], "--logdir_path", logdir,
    ]


# --------------------------------------------------------------------------------------------
# flags and paths
# --------------------------------------------------------------------------------------------


def test_help_lists_the_flags():
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--help"], cwd=os.path.join(ROOT, "multi_gpu"), env=_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, _explain(proc)
    for flag in (
        "--data_root", "--json_path", "--logdir_path", "--output", "--epochs", "--batch_size", "--base_lr",
        "--seed", "--deterministic", "--preset", "--resume", "--amp", "--global_negatives", "--num_workers",
        "--skip_bad", "--tensorboard", "--val_every", "--temperature", "--device", "torchrun",
    ):
        assert flag in proc.stdout, f"{flag} missing from --help"
    assert "_crash" not in proc.stdout and "_save_rank" not in proc.stdout  # no test-only flags


def test_missing_cuda_is_a_clear_error(tmp_path, monkeypatch, capsys):
    script = _load(SCRIPT, "mgpu_ssl_train")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logdir = tmp_path / "run"
    assert script.main(["--device", "cuda", "--preset", "smoke", "--logdir_path", str(logdir)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err, err
    assert not logdir.exists()  # refused before anything was written


@pytest.mark.parametrize("cwd", ["", "multi_gpu"])
def test_default_paths_resolve_from_the_repository(cwd, tmp_path, monkeypatch):
    script = _load(SCRIPT, "mgpu_ssl_train")
    monkeypatch.chdir(os.path.join(ROOT, cwd))
    args = script.parse_args(["--data_root", str(tmp_path)])
    assert args.json_path == os.path.join(ROOT, "json_files", "tcia_covid19", "dataset_split.json")
    assert args.output == args.logdir_path == os.path.join(ROOT, "runs", "mgpu_ssl")
    args = script.parse_args(["--data_root", str(tmp_path), "--json_path", "json_files/tcia_covid19/dataset_split.json"])
    assert os.path.isfile(args.json_path)
    assert script.parse_args([]).data_root == ""  # the embedded cohort
    with pytest.raises(SystemExit):
        script.parse_args(["--json_path", "json_files/tcia_covid19/dataset_split.json"])  # no --data_root
    with pytest.raises(SystemExit):
        script.parse_args(["--data_root", str(tmp_path / "missing")])


# --------------------------------------------------------------------------------------------
# a 2-process run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(smoke_cohort, tmp_path_factory):
    """One uninterrupted 2-process run (2 epochs of 2 steps, global negatives); every rank saves its
    weights and its DDP settings (``ddp_wrapper.py --save-rank-params``)."""
    logdir = str(tmp_path_factory.mktemp("ddp_run"))
    probe = ["--probe_every", "1", "--probe_json", smoke_cohort["btcv_json"][max(smoke_cohort["btcv_json"])]]
    proc = torchrun(WRAPPER, ["--save-rank-params"] + probe + _train_args(smoke_cohort, logdir))
    assert proc.returncode == 0, _explain(proc)
    return logdir, proc


@pytest.mark.timeout(600)
def test_two_processes_train_and_write_a_checkpoint_unetr_loads(ddp_run):
    from ssl_utils import build_unetr, get_config, load_pretrained_vit

    logdir, proc = ddp_run
    with open(os.path.join(logdir, "train.log")) as f:
        lines = f.read().splitlines()
    assert "world_size=2" in lines[0] and "backend=gloo" in lines[0] and "preset=smoke" in lines[0], lines[0]
    assert lines[1].startswith("joined: ") and "2 process(es) on cpu" in lines[1], lines[1]
    assert any("2 steps per epoch" in line for line in lines), lines
    assert any(line.startswith("epoch 2/2") for line in lines), lines
    assert lines[-1].startswith("done: epoch 2 reached"), lines[-1]
    assert proc.stdout.count("world_size=2 backend=gloo") == 1, "only rank 0 logs"
    # the probe monitor: rank 0 probes (once untrained, then every epoch), every rank's history gets its score
    assert proc.stdout.count("probe monitor: untrained encoder") == 1
    history = json.load(open(os.path.join(logdir, "history.json")))
    assert all(0.0 <= row["probe_dice"] <= 1.0 for row in history), history

    ckpt = torch.load(os.path.join(logdir, "last_model.pt"), weights_only=True)
    assert ckpt["epoch"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    unetr = build_unetr(get_config("smoke"))
    report = load_pretrained_vit(unetr, os.path.join(logdir, "best_model.pt"))
    assert report.loaded and not report.missing
    key = report.loaded[0]
    assert torch.equal(unetr.vit.state_dict()[key], torch.load(os.path.join(logdir, "best_model.pt"), weights_only=True)["state_dict"][key])


@pytest.mark.timeout(600)
def test_two_processes_pretrain_a_masked_autoencoder(smoke_cohort, tmp_path):
    """``--pretext mae`` under 2 processes: both ranks train the MAE through the same loop, and the
    checkpoint's every encoder tensor loads into UNETR (the final norm included)."""
    from ssl_utils import build_unetr, get_config, load_pretrained_vit

    logdir = str(tmp_path)
    args = ["--preset", "smoke", "--epochs", "2", "--batch_size", "1", "--pretext", "mae", "--mask_ratio", "0.5",
            "--data_root", smoke_cohort["tcia_root"], "--json_path", smoke_cohort["tcia_json"], "--logdir_path", logdir]
    proc = torchrun(SCRIPT, args)
    assert proc.returncode == 0, _explain(proc)
    log = open(os.path.join(logdir, "train.log")).read()
    assert "pretext=mae world_size=2" in log and "masked-patch loss" in log, log[-2000:]
    ckpt = torch.load(os.path.join(logdir, "last_model.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["pretext"] == "mae" and ckpt["config"]["mae_mask_ratio"] == 0.5
    assert "mask_tokens" in ckpt["state_dict"]
    unetr = build_unetr(get_config("smoke"))
    report = load_pretrained_vit(unetr, os.path.join(logdir, "last_model.pt"))
    assert sorted(report.loaded) == sorted(unetr.vit.state_dict()) and not report.missing


def test_both_ranks_hold_bitwise_identical_parameters(ddp_run):
    """4 DDP steps without ``find_unused_parameters``: every tensor equal bit for bit on both ranks
    (gradients are all-reduced, never the weights, so one differing step would persist)."""
    logdir, _ = ddp_run
    p0 = torch.load(os.path.join(logdir, "rank0_params.pt"), weights_only=True)
    p1 = torch.load(os.path.join(logdir, "rank1_params.pt"), weights_only=True)
    assert p0.keys() == p1.keys()
    different = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert not different, f"ranks disagree on {different[:5]}"
    saved = torch.load(os.path.join(logdir, "last_model.pt"), weights_only=True)["state_dict"]
    assert saved.keys() == p0.keys() and all(torch.equal(p0[k], saved[k]) for k in p0)

    from ssl_utils import build_vitautoenc, get_config

    initial = build_vitautoenc(get_config("smoke")).state_dict()
    unused = [k for k in initial if ".norm_cross_attn." in k]
    assert unused, "MONAI's TransformerBlock no longer has norm_cross_attn: revisit freeze_unused"
    moved = [k for k in p0 if k not in unused and p0[k].is_floating_point() and not torch.equal(p0[k], initial[k])]
    assert len(moved) > len(p0) // 2, "training changed few weights"
    for r in (0, 1):
        with open(os.path.join(logdir, f"rank{r}_ddp.json")) as f:
            info = json.load(f)
        assert info["find_unused_parameters"] == [False], info["find_unused_parameters"]
        assert sorted(info["frozen"]) == sorted(unused), "only the never-used norm_cross_attn is frozen"
    assert all(torch.equal(p0[k], initial[k]) for k in unused)  # frozen: still at their initial values


# --------------------------------------------------------------------------------------------
# one step: 2 ranks x b crops with global negatives == one process on 2b crops
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_ddp_step_with_global_negatives_equals_one_process_on_the_whole_batch(tmp_path):
    worker = _load(WORKER, "ddp_step_worker")
    proc = torchrun(WORKER, [str(tmp_path)])
    assert proc.returncode == 0, _explain(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    from ssl_utils import get_config

    cfg = get_config("smoke")
    batch = worker.fixed_batch(cfg, 2 * worker.CROPS_PER_RANK)
    initial = {k: v.detach().clone() for k, v in worker.fresh_model(cfg).named_parameters()}
    single = worker.step_parameters(worker.fresh_model(cfg), batch, cfg, gather=False)  # one process: all negatives

    def max_diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in b)

    assert max_diff(single, initial) > 0.5 * worker.LR  # the step moved the weights
    for r, result in enumerate(ranks):
        assert max_diff(result["gather"], single) < 1e-5, f"rank {r}: DDP step with gathered negatives differs"
        # without the gather each rank sees only its own negatives: another step, so the test can fail
        assert max_diff(result["local"], single) > 1e-4, f"rank {r}: local negatives unexpectedly match"
    for mode in ("gather", "local"):
        assert max_diff(ranks[0][mode], ranks[1][mode]) == 0.0


# --------------------------------------------------------------------------------------------
# a worker dies; torchrun restarts the job; --resume continues from the last checkpoint
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_killed_worker_resumes_from_the_last_checkpoint(smoke_cohort, ddp_run, tmp_path):
    logdir = str(tmp_path / "crash")
    proc = torchrun(
        WRAPPER, ["--crash-at-epoch", "1"] + _train_args(smoke_cohort, logdir) + ["--resume"], launcher=("--max-restarts=1",)
    )
    assert proc.returncode == 0, _explain(proc)
    assert "rank 1: simulated crash after epoch 1" in proc.stderr, _explain(proc)
    assert os.path.exists(os.path.join(logdir, "crash_rank1_epoch1.marker")), _explain(proc)  # it did crash
    assert not os.path.exists(os.path.join(logdir, "crash_rank0_epoch1.marker"))
    with open(os.path.join(logdir, "train.log")) as f:
        log = f.read()
    assert "does not exist: starting from scratch" in log  # the first attempt
    assert "(epoch 1 done); continuing at epoch 2" in log, log  # the restart
    ckpt = torch.load(os.path.join(logdir, "last_model.pt"), weights_only=True)
    assert ckpt["epoch"] == 2
    assert [row["epoch"] for row in ckpt["history"]] == [1, 2]
    # the resumed run ends with the weights of the uninterrupted one (same flags)
    reference = torch.load(os.path.join(ddp_run[0], "last_model.pt"), weights_only=True)["state_dict"]
    worst = max((ckpt["state_dict"][k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


# --------------------------------------------------------------------------------------------
# a NaN loss on one rank: both ranks stop together, with the same message
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_nan_loss_on_one_rank_stops_every_rank_with_the_same_error(smoke_cohort, tmp_path):
    # a rank left waiting for the other would hang in a collective: the subprocess timeout fails the test
    proc = torchrun(DIVERGE_WORKER, [str(tmp_path), smoke_cohort["tcia_root"], smoke_cohort["tcia_json"]], timeout=240)
    assert proc.returncode == 0, _explain(proc)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1], messages
    message = messages[0]
    assert message.startswith("TrainingDiverged: the loss is not finite"), message
    # rank 1 alone produced the NaN (4th training forward: epoch 2, step 2); rank 0's loss was finite
    assert "at epoch 2, step 2 on rank 1 of 2; training stopped" in message, message
    last = str(tmp_path / "run" / "last_model.pt")
    assert f"The last good checkpoint is {last};" in message, message
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
