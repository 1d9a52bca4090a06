"""The shared training engine and its plumbing, on tiny models: the schedule, the one training step
(fp32, clipping, the fp16 GradScaler), the divergence check, the run state (save / restore), data
shards, main-process calls, atomic writes and JSON conversion."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from ssl_utils import get_config
from ssl_utils.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state
from ssl_utils.config import from_flat
from ssl_utils.distributed import freeze_unused, run_on_main, shard
from ssl_utils.engine import RunState, TrainingDiverged, check_finite, check_weights_finite, train_step
from ssl_utils.io import WriteError, atomic_write, jsonable, write_json
from ssl_utils.runtime import Precision, lr_lambda

CPU = torch.device("cpu")
FP32 = Precision(CPU, None)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * ((model(x) - y) ** 2).mean()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def grad_norm(model: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


# ------------------------------------------------------------------------------------- schedule


def test_lr_lambda_warmup_then_cosine_to_zero():
    f = lr_lambda(4, 20, cosine=True)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear from 1/warmup to 1
    after = [f(s) for s in range(4, 21)]
    assert after[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(after, after[1:]))  # decreasing after the warm-up
    assert f(12) == pytest.approx(0.5)  # half-way through the decay
    assert f(20) == pytest.approx(0.0, abs=1e-12) and f(25) == pytest.approx(0.0, abs=1e-12)  # ends at 0, stays
    assert 0.0 < f(19) < 0.01


def test_lr_lambda_constant_and_without_warmup():
    f = lr_lambda(3, 10, cosine=False)
    assert [f(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(f(s) == 1.0 for s in range(3, 15))
    g = lr_lambda(0, 10, cosine=True)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0, abs=1e-12)
    h = lr_lambda(0, 10, cosine=False)
    assert all(h(s) == 1.0 for s in range(12))
    # what LambdaLR gives the optimiser, step by step
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 6, cosine=True))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.05, 0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)


# ------------------------------------------------------------------------------------- train_step


def test_train_step_equals_the_plain_pytorch_step():
    x, y = batch()
    ours, ref = tiny_model(), tiny_model()
    assert same(params(ours), params(ref))

    def make(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 5, cosine=True))

    opt, sched = make(ours)
    state = RunState(ours, opt, Precision(CPU, None), get_config("smoke"), sched)
    ref_opt, ref_sched = make(ref)
    for step in range(4):
        values = train_step(state, lambda: (mse(ours, x, y), mse(ours, x, y, 2.0)))  # the loss, and one logged value
        ref_opt.zero_grad()
        loss = mse(ref, x, y)
        loss.backward()
        ref_opt.step()
        ref_sched.step()
        assert values.dtype == torch.float64 and values.shape == (2,)
        assert values[0].item() == loss.item() and values[1].item() == pytest.approx(2 * loss.item())
        assert same(params(ours), params(ref)), f"step {step}"
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert not same(params(ours), params(tiny_model()))  # it did train


def test_grad_clip_clips():
    x, y = batch()
    max_norm = 0.05
    clipped, plain = tiny_model(), tiny_model()
    for model, clip in ((clipped, max_norm), (plain, 0.0)):
        state = RunState(model, torch.optim.SGD(model.parameters(), lr=0.5), Precision(CPU, None), {}, None, clip)
        train_step(state, lambda m=model: mse(m, x, y, scale=100.0))  # a large gradient
    assert grad_norm(plain) > 10 * max_norm  # the check is not vacuous
    assert grad_norm(clipped) <= max_norm * (1 + 1e-5)  # the gradients the step used
    assert not same(params(clipped), params(plain))
    # the clipped step moved the weights by lr * max_norm at most
    moved = torch.linalg.vector_norm(torch.cat([(a - b).flatten() for a, b in zip(params(clipped), params(tiny_model()))]))
    assert float(moved) <= 0.5 * max_norm * (1 + 1e-5)


def test_fp16_grad_scaler_skips_a_nonfinite_step_and_lowers_the_scale():
    precision = Precision(CPU, torch.float16)
    assert precision.scaler.is_enabled() and precision.name == "fp16"
    model = tiny_model()
    state = RunState(model, torch.optim.SGD(model.parameters(), lr=0.1), precision, {})
    x, y = batch()
    scale, before = precision.scaler.get_scale(), params(model)
    values = train_step(state, lambda: mse(model, x, y) * float("inf"))  # every gradient inf / NaN
    assert not torch.isfinite(values).all()
    assert same(params(model), before), "a step with non-finite gradients must be skipped"
    assert precision.scaler.get_scale() == scale * 0.5
    train_step(state, lambda: mse(model, x, y))  # a finite step updates
    assert not same(params(model), before)
    assert precision.scaler.get_scale() == scale * 0.5
    # the gradient the optimiser used (unscaled in place) is the true one: the scale was divided out
    ref = tiny_model()
    mse(ref, x, y).backward()
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- divergence


def test_check_finite_raises_naming_the_place(tmp_path):
    good = tmp_path / "last_model.pt"
    good.write_bytes(b"checkpoint")
    check_finite(torch.tensor([0.5, 1e30, -3.0]), "epoch 1, step 1", str(good))  # finite: nothing happens
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(TrainingDiverged) as info:
            check_finite(torch.tensor([0.5, bad]), "epoch 3, step 7", str(good))
        msg = str(info.value)
        assert "the loss is not finite (NaN or Inf) at epoch 3, step 7;" in msg, msg
        assert f"The last good checkpoint is {good};" in msg, msg
    with pytest.raises(TrainingDiverged, match=r"the validation loss .* at epoch 2 \(validation\).*\(none yet\)"):
        check_finite(torch.tensor([float("nan")]), "epoch 2 (validation)", str(tmp_path / "missing.pt"),
                     what="the validation loss")


def test_check_weights_finite():
    model = tiny_model()
    check_weights_finite(model, "epoch 1")
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(TrainingDiverged, match="a weight is not finite .* at epoch 4"):
        check_weights_finite(model, "epoch 4")


# ------------------------------------------------------------------------------------- run state


def make_state(seed: int, precision: Precision) -> RunState:
    model = tiny_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(3, 10, cosine=True))
    return RunState(model, opt, precision, get_config("smoke"), sched, counters={"epoch": 0, "history": []})


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_run_state_save_restore_round_trip(tmp_path):
    x, y = batch()
    state = make_state(0, Precision(CPU, torch.float16))
    train_step(state, lambda: mse(state.model, x, y) * float("inf"))  # the scaler backs off: state to keep
    for _ in range(2):
        train_step(state, lambda: mse(state.model, x, y))
    state["epoch"], state["history"] = 3, [{"epoch": 3, "loss": 0.25}]
    path = tmp_path / "last_model.pt"
    state.save(path, note="extra")
    after_save = draws()

    ckpt = load_checkpoint(path)  # weights_only: every part of the state is plain data
    assert ckpt["epoch"] == 3 and ckpt["note"] == "extra" and ckpt["config"] == get_config("smoke").to_dict()
    assert from_flat(ckpt["config"]) == get_config("smoke")
    fresh = make_state(1, Precision(CPU, torch.float16))  # other weights, an untouched optimiser and scaler
    assert not same(params(fresh.model), params(state.model))
    draws()  # move the RNGs on
    fresh.restore(ckpt, counters=("epoch", "history"))
    assert draws() == after_save  # Python, NumPy and torch RNGs as they were at the save

    assert same(params(fresh.model), params(state.model))
    assert fresh["epoch"] == 3 and fresh["history"] == state["history"]
    # the step the scaler skipped (inf gradients) did not advance the schedule: 2 of 3 steps count
    assert fresh.scheduler.last_epoch == state.scheduler.last_epoch == 2
    assert fresh.precision.scaler.get_scale() == state.precision.scaler.get_scale() == 32768.0
    # the next step from the restored state is the next step of the original, bitwise
    # (Adam's moments and step count, the scheduler's position, the scale)
    for s in (state, fresh):
        train_step(s, lambda s=s: mse(s.model, x, y))
    assert same(params(fresh.model), params(state.model))
    assert fresh.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_for_another_device_count_is_an_error():
    state = capture_rng_state()
    state["cuda"] = list(state["cuda"]) * 2  # a checkpoint from a process that saw twice the GPUs
    with pytest.raises(CheckpointError, match="CUDA random state.*CUDA_VISIBLE_DEVICES"):
        restore_rng_state(state)
    with pytest.raises(CheckpointError):
        RunState.restore_rng({"rng": state})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour without CUDA")
def test_cuda_rng_state_is_ignored_without_cuda():
    state = capture_rng_state()
    assert "cuda" not in state
    expected = draws()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # saved on a machine with 2 GPUs
    restore_rng_state(state)  # no CUDA here: the CUDA part is skipped, the rest restored
    assert draws() == expected


# ------------------------------------------------------------------------------------- distributed


def test_shard_with_fewer_entries_than_ranks():
    entries = ["a", "b", "c"]
    padded = [shard(entries, r, 5, seed=0, pad=True) for r in range(5)]
    assert all(len(part) == 1 for part in padded)  # every rank runs the same number of steps
    assert sorted(e for part in padded for e in part) == ["a", "a", "b", "b", "c"]  # cycling
    plain = [shard(entries, r, 5, seed=0, pad=False) for r in range(5)]
    assert [len(part) for part in plain] == [1, 1, 1, 0, 0]  # the first ranks one each, the rest none
    assert sorted(e for part in plain for e in part) == entries
    assert [shard([], r, 2, seed=0, pad=True) for r in range(2)] == [[], []]


def test_shard_normal_split():
    entries = list(range(10))
    parts = [shard(entries, r, 3, seed=4, pad=False) for r in range(3)]
    assert sorted(e for part in parts for e in part) == entries  # every entry exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [shard(entries, r, 3, seed=4, pad=False) for r in range(3)]  # a function of the seed
    padded = [shard(entries, r, 3, seed=4, pad=True) for r in range(3)]
    assert len({len(p) for p in padded}) == 1 and set(e for p in padded for e in p) == set(entries)
    assert shard(entries, 0, 1, seed=4, pad=True) == entries  # one process: everything, in order


def test_run_on_main_in_one_process():
    assert run_on_main(lambda: {"answer": 42}) == {"answer": 42}

    class Boom(ValueError):
        pass

    err = Boom("bad input")

    def fail():
        raise err

    with pytest.raises(Boom) as info:
        run_on_main(fail)
    assert info.value is err


def test_freeze_unused_leaves_only_parameters_that_get_gradients():
    from ssl_utils import build_vitautoenc

    cfg = get_config("smoke")
    torch.manual_seed(0)
    model = build_vitautoenc(cfg)
    n = freeze_unused(model)
    assert n == 2 * cfg["num_layers"]  # weight and bias of every block's cross-attention LayerNorm
    assert freeze_unused(model) == 0
    recon, _ = model(torch.rand(1, 1, cfg["roi"], cfg["roi"], cfg["roi"]))
    recon.mean().backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "norm_cross_attn" in name)


# ------------------------------------------------------------------------------------- io


@pytest.mark.parametrize("error", [ValueError, RuntimeError, OSError])
def test_atomic_write_keeps_the_previous_file_when_the_writer_fails(tmp_path, error):
    path = tmp_path / "results.json"
    path.write_text("previous")

    def writer(f):
        f.write(b"half of the new conte")
        raise error("the writer failed")

    expected = error if error is ValueError else WriteError  # OS and runtime errors become WriteError
    with pytest.raises(expected) as info:
        atomic_write(path, writer, what="results")
    if expected is WriteError:
        assert f"cannot write results {path}" in str(info.value) and "the previous file is intact" in str(info.value)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new"


def test_write_json_of_a_config_and_jsonable(tmp_path):
    cfg = get_config("smoke", ssl_spacing=(5.0, 5.0, 6.0))
    path = write_json(tmp_path / "sub" / "config.json", cfg)
    saved = json.loads(open(path).read())
    assert saved == cfg.to_dict() and saved["ssl_spacing"] == [5.0, 5.0, 6.0]
    assert from_flat(saved) == cfg

    obj = {"pair": (1, (2.5, "x")), 3: np.float32(1.5), "n": np.int64(7), "t": torch.tensor(0.25),
           "arr0": np.array(2.0), "rows": [{"d": np.float64(0.1)}]}
    out = jsonable(obj)
    assert out == {"pair": [1, [2.5, "x"]], "3": 1.5, "n": 7, "t": 0.25, "arr0": 2.0, "rows": [{"d": 0.1}]}
    assert type(out["3"]) is float and type(out["n"]) is int and type(out["t"]) is float
    assert json.loads(json.dumps(out)) == out
