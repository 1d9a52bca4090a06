"""The multi-GPU script under real ``torchrun`` processes (gloo on CPU, 2 processes, smoke preset).

- ``--help`` lists the flags; default paths work from the repository root and from multi_gpu/;
- a 2-process run ends, logs world size and backend first, writes a checkpoint that loads into
  UNETR, and leaves identical parameters on both ranks;
- one DDP step on 2 x b crops with global negatives equals one process on 2b crops (and without
  the gather it does not);
- a worker killed after epoch 1 under ``--max-restarts 1 ... --resume`` ends in a finished run that
  resumed from epoch 1, with the weights of an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "multi_gpu", "mgpu_ssl_train.py")
WORKER = os.path.join(ROOT, "tests", "ddp_step_worker.py")

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
    return [
        "--preset", "smoke", "--epochs", "2", "--global_negatives",
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
    assert "_crash_at_epoch" not in proc.stdout


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
    """One uninterrupted 2-process run (2 epochs, global negatives); every rank saves its weights."""
    logdir = str(tmp_path_factory.mktemp("ddp_run"))
    proc = torchrun(SCRIPT, _train_args(smoke_cohort, logdir) + ["--_save_rank_params"])
    assert proc.returncode == 0, _explain(proc)
    return logdir, proc


@pytest.mark.timeout(600)
def test_two_processes_train_and_write_a_checkpoint_unetr_loads(ddp_run):
    from ssl_utils import build_unetr, get_config, load_pretrained_vit

    logdir, proc = ddp_run
    with open(os.path.join(logdir, "train.log")) as f:
        lines = f.read().splitlines()
    assert "world_size=2" in lines[0] and "backend=gloo" in lines[0] and "preset=smoke" in lines[0], lines[0]
    assert any(line.startswith("epoch 2/2") for line in lines), lines
    assert proc.stdout.count("world_size=2 backend=gloo") == 1, "only rank 0 logs"

    ckpt = torch.load(os.path.join(logdir, "last_model.pt"), weights_only=True)
    assert ckpt["epoch"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    unetr = build_unetr(get_config("smoke"))
    report = load_pretrained_vit(unetr, os.path.join(logdir, "best_model.pt"))
    assert report.loaded and not report.missing
    key = report.loaded[0]
    assert torch.equal(unetr.vit.state_dict()[key], torch.load(os.path.join(logdir, "best_model.pt"), weights_only=True)["state_dict"][key])


def test_both_ranks_hold_identical_parameters(ddp_run):
    logdir, _ = ddp_run
    p0 = torch.load(os.path.join(logdir, "rank0_params.pt"), weights_only=True)
    p1 = torch.load(os.path.join(logdir, "rank1_params.pt"), weights_only=True)
    assert p0.keys() == p1.keys()
    different = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert not different, f"ranks disagree on {different[:5]}"
    saved = torch.load(os.path.join(logdir, "last_model.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(p0[k], saved[k]) for k in p0)


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
        SCRIPT, _train_args(smoke_cohort, logdir) + ["--resume", "--_crash_at_epoch", "1"], launcher=("--max-restarts=1",)
    )
    assert proc.returncode == 0, _explain(proc)
    assert "rank 1: simulated crash after epoch 1" in proc.stderr, _explain(proc)
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
