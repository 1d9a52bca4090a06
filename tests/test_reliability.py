"""What the user sees when something goes wrong: bad inputs, faults, untrusted files.

Every case runs the real thing: NIfTI files written to ``tmp_path``, ``pretrain`` / ``finetune``
themselves, checkpoints written by real (and really killed) processes.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ssl_utils import build_unetr, get_config, load_pretrained_vit
from ssl_utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssl_utils.data import DatalistError
from ssl_utils.pretrain import TrainingDiverged, pretrain

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; the children set one thread too
QUIET = dict(progress=False, log=lambda _msg: None)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (what "untouched" means)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def logdir_with_sentinel(tmp_path: Path) -> Path:
    """A log folder that already holds a checkpoint from an earlier run."""
    logdir = tmp_path / "run"
    save_checkpoint({"state_dict": {"w": torch.arange(5.0)}, "epoch": 7}, logdir / "last_model.pt")
    (logdir / "history.json").write_text("[]")
    return logdir


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([6.0, 6.0, 8.0, 1.0]) if affine is None else affine), str(path))
    return path


def patch_header(path: Path, pixdim1: float | None = None, srow_x: tuple | None = None) -> None:
    """Rewrite fields of a .nii.gz header in place (what a broken writer would have produced)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if pixdim1 is not None:
        raw[80:84] = struct.pack("<f", pixdim1)  # pixdim[1]
    if srow_x is not None:
        raw[280:296] = struct.pack("<4f", *srow_x)
    path.write_bytes(gzip.compress(bytes(raw)))


def body(shape=(20, 20, 12), dtype=np.int16) -> np.ndarray:
    """A box of soft tissue (40 HU) in air (-1000 HU)."""
    vol = np.full(shape, -1000, dtype)
    vol[3:-3, 3:-3, 2:-2] = 40
    return vol


@pytest.fixture()
def ssl_root(tmp_path, smoke_cohort):
    """A private copy of the smoke cohort's unlabeled volumes: data/volume-synth-000{0..5}.nii.gz."""
    src = Path(smoke_cohort["tcia_root"]) / "data"
    dst = tmp_path / "tcia" / "data"
    shutil.copytree(src, dst)
    return tmp_path / "tcia"


def vol(i: int) -> dict:
    return {"image": f"data/volume-synth-{i:04d}.nii.gz"}


def write_json(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------
# bad inputs: one clear error before any training, nothing in the log folder touched
# --------------------------------------------------------------------------------------------


def make_pretrain_case(name: str, root: Path):
    """Return (datalist, text the error must contain, index line the error must contain)."""
    good = [vol(0), vol(1)]
    val = [vol(4)]
    data = root / "data"

    def bad(entry, where="training"):
        lists = {"training": good + [entry], "validation": val}
        if where == "validation":
            lists = {"training": good, "validation": [entry]}
        return lists

    ok = data / "volume-synth-0002.nii.gz"
    if name == "missing file":
        return bad({"image": "data/gone.nii.gz"}), f"(resolved: {data / 'gone.nii.gz'}): file not found", "training entry 2:"
    if name == "missing file in validation":
        return bad({"image": "data/gone.nii.gz"}, "validation"), "file not found", "validation entry 0:"
    if name == "truncated .nii.gz":
        raw = ok.read_bytes()
        (data / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
        return bad({"image": "data/cut.nii.gz"}), "truncated or corrupt file", "training entry 2:"
    if name == "not a NIfTI file":
        (data / "notes.nii.gz").write_text("patient list, not an image\n" * 20)
        return bad({"image": "data/notes.nii.gz"}), "cannot be read as NIfTI", "training entry 2:"
    if name == "2D image":
        save_nifti(data / "flat.nii.gz", body()[:, :, 0])
        return bad({"image": "data/flat.nii.gz"}), "expected a 3D volume, found 2D", "training entry 2:"
    if name == "4D image":
        save_nifti(data / "series.nii.gz", np.stack([body()] * 3, axis=-1))
        return bad({"image": "data/series.nii.gz"}), "expected a 3D volume, found 4D", "training entry 2:"
    if name in ("NaN voxels", "Inf voxels"):
        v = body(dtype=np.float32)
        v[5, 5, 5] = np.nan if name == "NaN voxels" else np.inf
        save_nifti(data / "nonfinite.nii.gz", v)
        return bad({"image": "data/nonfinite.nii.gz"}), "1 voxel(s) are NaN or Inf", "training entry 2:"
    if name == "zero spacing":
        p = save_nifti(data / "zero.nii.gz", body())
        patch_header(p, pixdim1=0.0, srow_x=(0.0, 0.0, 0.0, 0.0))
        return bad({"image": "data/zero.nii.gz"}), "voxel spacing in the header must be positive, found (0.0, 6.0, 8.0)", "training entry 2:"
    if name == "negative spacing":
        p = save_nifti(data / "negative.nii.gz", body())
        patch_header(p, pixdim1=-6.0)
        return bad({"image": "data/negative.nii.gz"}), "must be positive, found (-6.0, 6.0, 8.0)", "training entry 2:"
    if name == "degenerate affine":
        p = save_nifti(data / "singular.nii.gz", body())
        patch_header(p, srow_x=(0.0, 0.0, 0.0, 0.0))
        return bad({"image": "data/singular.nii.gz"}), "the affine is degenerate", "training entry 2:"
    if name == "all-air volume":
        save_nifti(data / "air.nii.gz", np.full((20, 20, 12), -1000, np.int16))
        return bad({"image": "data/air.nii.gz"}), "an all-air volume", "training entry 2:"
    if name == "entry without image":
        return bad({"img": "data/volume-synth-0002.nii.gz"}), "no 'image' field (fields present: ['img'])", "training entry 2:"
    if name == "absolute path to nothing":
        missing = root.parent / "elsewhere" / "v.nii.gz"
        return bad({"image": str(missing)}), f"{missing}: file not found", "training entry 2:"
    if name == "'..' path to nothing":
        resolved = root.parent / "elsewhere" / "v.nii.gz"
        return bad({"image": "../elsewhere/v.nii.gz"}), f"'../elsewhere/v.nii.gz' (resolved: {resolved}): file not found", "training entry 2:"
    if name == "empty datalist":
        return {"training": [], "validation": val}, "key 'training': the list is empty", None
    if name == "malformed JSON":
        return '{"training": [{"image": "data/volume-synth-0000.nii.gz"}], "validation": [', "malformed JSON at line 1", None
    if name == "no training key":
        return {"validation": val}, "no key 'training' (keys present: ['validation'])", None
    if name == "no validation key":
        return {"training": good}, "no key 'validation' (keys present: ['training'])", None
    raise AssertionError(name)


PRETRAIN_CASES = [
    "missing file", "missing file in validation", "truncated .nii.gz", "not a NIfTI file", "2D image", "4D image",
    "NaN voxels", "Inf voxels", "zero spacing", "negative spacing", "degenerate affine", "all-air volume",
    "entry without image", "absolute path to nothing", "'..' path to nothing", "empty datalist",
    "malformed JSON", "no training key", "no validation key",
]


@pytest.mark.parametrize("case", PRETRAIN_CASES)
def test_bad_input_stops_pretraining_before_it_starts(ssl_root, tmp_path, case):
    datalist, reason, where = make_pretrain_case(case, ssl_root)
    json_path = write_json(tmp_path / "dataset.json", datalist)
    logdir = logdir_with_sentinel(tmp_path)
    before = snapshot(logdir)
    with pytest.raises(DatalistError) as info:
        pretrain("smoke", str(ssl_root), str(json_path), str(logdir), device="cpu", **QUIET)
    msg = str(info.value)
    assert str(json_path) in msg, msg
    assert reason in msg, msg
    if where is not None:
        assert where in msg, msg
    assert snapshot(logdir) == before


def make_finetune_case(name: str, root: Path):
    """A labeled folder (copied from the smoke cohort) with one broken training entry at index 1."""
    img0, lab0 = root / "imagesTr/img0001.nii.gz", root / "labelsTr/label0001.nii.gz"
    image = nib.load(str(img0))
    label = np.asanyarray(nib.load(str(lab0)).dataobj)
    entry = {"image": "imagesTr/img0001.nii.gz"}
    if name == "label outside 0..13":
        bad = label.copy()
        bad[0, 0, 0], bad[0, 0, 1] = 14, 20
        save_nifti(root / "labelsTr/wrong.nii.gz", bad, image.affine)
        entry["label"], reason = "labelsTr/wrong.nii.gz", "values must be in 0..13, found [14, 20]"
    elif name == "non-integer label":
        bad = label.astype(np.float32)
        bad[0, 0, 0] = 1.5
        save_nifti(root / "labelsTr/float.nii.gz", bad, image.affine)
        entry["label"], reason = "labelsTr/float.nii.gz", "labels must be integers, found [1.5]"
    elif name == "shape mismatch":
        save_nifti(root / "labelsTr/short.nii.gz", label[:, :, :-2], image.affine)
        entry["label"], reason = "labelsTr/short.nii.gz", f"differs from the image's {image.shape}"
    elif name == "affine mismatch":
        shifted = image.affine.copy()
        shifted[0, 3] += 30.0
        save_nifti(root / "labelsTr/moved.nii.gz", label, shifted)
        entry["label"], reason = "labelsTr/moved.nii.gz", "affine differs from the image's (by up to 30 mm)"
    elif name == "entry without label":
        reason = "no 'label' field"
    else:
        raise AssertionError(name)
    good = {"image": "imagesTr/img0002.nii.gz", "label": "labelsTr/label0002.nii.gz"}
    val = {"image": "imagesTr/img0004.nii.gz", "label": "labelsTr/label0004.nii.gz"}
    return {"training": [good, entry], "validation": [val]}, reason


@pytest.mark.parametrize("case", ["label outside 0..13", "non-integer label", "shape mismatch", "affine mismatch", "entry without label"])
def test_bad_labels_stop_finetuning_before_it_starts(smoke_cohort, tmp_path, case):
    from ssl_utils.finetune import finetune

    root = tmp_path / "btcv"
    shutil.copytree(smoke_cohort["btcv_root"], root)
    datalist, reason = make_finetune_case(case, root)
    json_path = write_json(tmp_path / "dataset.json", datalist)
    logdir = logdir_with_sentinel(tmp_path)
    before = snapshot(logdir)
    with pytest.raises(DatalistError) as info:
        finetune("smoke", str(root), str(json_path), str(logdir), use_pretrained=False, device="cpu", **QUIET)
    msg = str(info.value)
    assert str(json_path) in msg and "training entry 1:" in msg and reason in msg, msg
    assert snapshot(logdir) == before


def test_odd_but_valid_inputs_train(ssl_root, tmp_path):
    """Absolute paths and '..' that resolve to readable files are fine; a volume smaller than the
    ROI is padded and trains."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ssl_root / "data/volume-synth-0001.nii.gz", elsewhere / "v1.nii.gz")
    # 8 x 8 x 5 voxels of 6 x 6 x 8 mm: 48 x 48 x 40 mm, far below the 32^3 ROI at 6 mm (192 mm)
    save_nifti(ssl_root / "data/tiny.nii.gz", body((8, 8, 5)))
    datalist = {
        "training": [
            {"image": str(ssl_root / "data/volume-synth-0000.nii.gz")},  # absolute
            {"image": "../elsewhere/v1.nii.gz"},  # outside data_root
            {"image": "data/tiny.nii.gz"},
            vol(2),
        ],
        "validation": [{"image": "data/tiny.nii.gz"}],
    }
    json_path = write_json(tmp_path / "dataset.json", datalist)
    out = pretrain("smoke", str(ssl_root), str(json_path), str(tmp_path / "run"), epochs=1, device="cpu", **QUIET)
    assert [r["epoch"] for r in out["history"]] == [1]
    assert np.isfinite(out["history"][0]["train_total"]) and np.isfinite(out["history"][0]["val_recon"])
    assert len(out["train_dataset"]) == 4
    crops = out["val_dataset"][0]
    assert crops[0]["gt_image"].shape == (1, 32, 32, 32)
    assert load_checkpoint(out["last"])["epoch"] == 1


def test_every_bad_entry_listed_at_once_and_skip_bad_trains_on_the_rest(ssl_root, tmp_path, capsys):
    """Headers are checked before any volume is read: their problems are listed together first; the
    content problems (a truncated file, an all-air volume) together once the volumes are read."""
    data = ssl_root / "data"
    raw = (data / "volume-synth-0003.nii.gz").read_bytes()
    (data / "cut.nii.gz").write_bytes(raw[: len(raw) // 3])
    save_nifti(data / "air.nii.gz", np.full((20, 20, 12), -1000, np.int16))
    datalist = {
        "training": [vol(0), {"image": "data/gone.nii.gz"}, vol(1), {"image": "data/cut.nii.gz"}, {"img": "x"}, vol(2)],
        "validation": [vol(4), {"image": "data/air.nii.gz"}],
    }
    json_path = write_json(tmp_path / "dataset.json", datalist)
    logdir = tmp_path / "run"
    with pytest.raises(DatalistError) as info:
        pretrain("smoke", str(ssl_root), str(json_path), str(logdir), device="cpu", progress=True, log=print)
    msg = str(info.value)
    assert "2 of 8 entries cannot be used" in msg, msg
    assert "training entry 1:" in msg and "training entry 4:" in msg and "skip_bad=True" in msg, msg
    assert "checking dataset.json (8 entries)" in capsys.readouterr().err  # the progress bar
    assert not (logdir / "last_model.pt").exists()

    content_only = {"training": [vol(0), vol(1), {"image": "data/cut.nii.gz"}, vol(2)], "validation": [vol(4), {"image": "data/air.nii.gz"}]}
    with pytest.raises(DatalistError) as info:
        pretrain("smoke", str(ssl_root), str(write_json(tmp_path / "content.json", content_only)), str(logdir), device="cpu", **QUIET)
    msg = str(info.value)
    assert "2 of 6 entries cannot be used" in msg and "skip_bad=True" in msg, msg
    assert f"training entry 2: image 'data/cut.nii.gz' (resolved: {data / 'cut.nii.gz'}): truncated or corrupt file (EOFError" in msg, msg
    assert f"validation entry 1: image 'data/air.nii.gz' (resolved: {data / 'air.nii.gz'}): no voxel above -57 HU" in msg, msg
    assert not (logdir / "last_model.pt").exists()

    lines: list[str] = []
    out = pretrain("smoke", str(ssl_root), str(json_path), str(logdir), epochs=1, skip_bad=True, device="cpu",
                   progress=False, log=lines.append)
    skipped = "\n".join(line for line in lines if "skipped" in line)
    for where in ("training entry 1:", "training entry 3:", "training entry 4:", "validation entry 1:"):
        assert where in skipped, skipped
    assert len(out["train_dataset"]) == 3 and len(out["val_dataset"]) == 1
    assert [r["epoch"] for r in out["history"]] == [1]


# --------------------------------------------------------------------------------------------
# faults: killed processes, non-finite losses, failed writes, mismatched resumes
# --------------------------------------------------------------------------------------------


def python(script: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


# A child blocks (sleeps) right after printing a line that starts with this: the parent kills it
# on reading the line, so the kill lands at that exact point, every run.
MARK = "KILL-ME-NOW"


def kill_at_marker(proc: subprocess.Popen) -> list[str]:
    """Read the child's output up to the ``MARK`` line, then SIGKILL the child (blocked there)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(MARK):
            break
    running = proc.poll() is None
    proc.kill()
    proc.wait()
    assert seen and seen[-1].startswith(MARK), "".join(seen) + "\n(the child never reached the kill point)"
    assert running, "".join(seen) + "\n(the child ended before it could be killed)"
    assert proc.returncode == -signal.SIGKILL
    return seen


WRITER = f"""
import sys, time, torch
from ssl_utils.checkpoint import save_checkpoint
path, kill_after_bytes = sys.argv[1], int(sys.argv[2])
MB = 2**18  # float32 values in 1 MiB
save_checkpoint({{"step": 1, "data": [torch.full((MB,), 1.0) for _ in range(8)]}}, path)
print("saved 1", flush=True)

real_save = torch.save

class Tap:
    # passes torch.save's bytes to the checkpoint's temp file; after kill_after_bytes, makes sure
    # they are in the file, says so and blocks: the kill lands in the middle of the write
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, data):
        out = self.f.write(data)
        self.n += memoryview(data).nbytes
        if self.n >= kill_after_bytes:
            self.f.flush()
            print("{MARK}", self.n, flush=True)
            time.sleep(600)
        return out
    def flush(self):
        self.f.flush()

torch.save = lambda obj, f, **kw: real_save(obj, Tap(f), **kw)
save_checkpoint({{"step": 2, "data": [torch.full((MB,), 2.0) for _ in range(8)]}}, path)
print("the second write finished: it was never interrupted", flush=True)
"""


def test_kill_while_writing_checkpoint_keeps_previous_one(tmp_path):
    path = tmp_path / "ckpt" / "last_model.pt"
    proc = python(WRITER, str(path), str(3 * 2**20))  # killed after 3 of the 8 MiB of the second write
    first = proc.stdout.readline()
    assert first.startswith("saved 1"), first + proc.stdout.read()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    size = path.stat().st_size
    kill_at_marker(proc)
    stale = list(path.parent.glob("last_model.pt.*.tmp"))
    assert len(stale) == 1, "the killed write left no temp file: it did not write where the checkpoint goes"
    assert 3 * 2**20 <= stale[0].stat().st_size < size  # killed in the middle of the write
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the previous checkpoint, byte for byte
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and all(bool((t == 1.0).all()) and t.numel() == 2**18 for t in ckpt["data"])
    # the next save removes what the killed writer left behind
    save_checkpoint({"step": 0}, path)
    assert not list(path.parent.glob("*.tmp"))
    assert load_checkpoint(path) == {"step": 0}


PRETRAIN_RUN = f"""
import sys, time, torch
torch.set_num_threads(1)
from ssl_utils import get_config
from ssl_utils.pretrain import pretrain
data_root, json_path, logdir, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def on_epoch_end(epoch, row):  # epoch 1's checkpoint is written: killed here, before epoch 2
    if epoch == 1:
        print("{MARK}", flush=True)
        time.sleep(600)

cfg = get_config("smoke", deterministic=True, warmup_epochs=1, cosine=True)
pretrain(cfg, data_root, json_path, logdir, epochs=epochs, device="cpu", progress=False,
         log=lambda m: print(m, flush=True), on_epoch_end=on_epoch_end)
"""


def test_pretraining_killed_and_resumed_matches_uninterrupted_run(smoke_cohort, tmp_path):
    epochs = 3
    args = (smoke_cohort["tcia_root"], smoke_cohort["tcia_json"])
    killed = tmp_path / "killed"
    kill_at_marker(python(PRETRAIN_RUN, *args, str(killed), str(epochs)))
    assert load_checkpoint(killed / "last_model.pt")["epoch"] == 1
    cfg = get_config("smoke", deterministic=True, warmup_epochs=1, cosine=True)
    lines: list[str] = []
    resumed = pretrain(cfg, *args, str(killed), epochs=epochs, resume=True, device="cpu", progress=False, log=lines.append)
    assert any("continuing at epoch 2" in line for line in lines), lines
    full = pretrain(cfg, *args, str(tmp_path / "full"), epochs=epochs, device="cpu", **QUIET)
    a = load_checkpoint(resumed["last"])
    b = load_checkpoint(full["last"])
    assert a["epoch"] == b["epoch"] == epochs
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key
    assert [r["train_total"] for r in a["history"]] == [r["train_total"] for r in b["history"]]
    assert a["best_val_loss"] == b["best_val_loss"]


FINETUNE_RUN = f"""
import sys, time, torch
torch.set_num_threads(1)
from ssl_utils import get_config
from ssl_utils.finetune import finetune
data_root, json_path, logdir, iters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def log(msg):  # logged after iteration 2's evaluation and checkpoint: killed here, mid-epoch
    print(msg, flush=True)
    if msg.startswith("iteration 2/"):
        print("{MARK}", flush=True)
        time.sleep(600)

finetune(get_config("smoke", deterministic=True), data_root, json_path, logdir, use_pretrained=False,
         iterations=iters, eval_every=2, device="cpu", progress=False, save_every_s=0.0, log=log)
"""


def test_finetuning_killed_and_resumed_matches_uninterrupted_run(smoke_cohort, tmp_path):
    from ssl_utils.finetune import finetune

    iters = 4
    n = max(smoke_cohort["btcv_json"])  # 3 training volumes: iteration 2 is inside epoch 1
    args = (smoke_cohort["btcv_root"], smoke_cohort["btcv_json"][n])
    killed = tmp_path / "killed"
    kill_at_marker(python(FINETUNE_RUN, *args, str(killed), str(iters)))
    ck = load_checkpoint(killed / "last_model.pt")
    assert (ck["iteration"], ck["epoch"], ck["step_in_epoch"]) == (2, 1, 2)
    cfg = get_config("smoke", deterministic=True)
    kw = dict(use_pretrained=False, iterations=iters, eval_every=2, device="cpu", save_every_s=0.0, **QUIET)
    resumed = finetune(cfg, *args, str(killed), resume=True, **kw)  # crosses into epoch 2
    full = finetune(cfg, *args, str(tmp_path / "full"), **kw)
    a, b = load_checkpoint(resumed["last"]), load_checkpoint(full["last"])
    assert a["iteration"] == b["iteration"] == iters and a["epoch"] == b["epoch"] == 2
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key
    assert a["train_losses"] == b["train_losses"]


@pytest.fixture(scope="module")
def good_run(smoke_cohort, tmp_path_factory):
    """One finished smoke pre-training epoch: its log folder (do not modify; copy it)."""
    logdir = tmp_path_factory.mktemp("good_run")
    pretrain("smoke", smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(logdir), epochs=1, device="cpu", **QUIET)
    return logdir


@pytest.mark.parametrize("where", ["training step", "validation"])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(smoke_cohort, good_run, tmp_path, where):
    logdir = tmp_path / "run"
    shutil.copytree(good_run, logdir)
    before = snapshot(logdir)
    json_path = smoke_cohort["tcia_json"]
    if where == "validation":  # one step per epoch: the exploded weights first show in validation
        content = json.loads(Path(json_path).read_text())
        json_path = write_json(tmp_path / "two.json", {"training": content["training"][:2], "validation": content["validation"]})
    # Adam moves every weight by about lr per step: lr 1e30 sends the network to overflow at once
    cfg = get_config("smoke", ssl_lr=1e30)
    with pytest.raises(TrainingDiverged) as info:
        pretrain(cfg, smoke_cohort["tcia_root"], str(json_path), str(logdir), epochs=2, device="cpu", **QUIET)
    msg = str(info.value)
    expected = ("the loss is not finite (NaN or Inf) at epoch 1, step 2;" if where == "training step"
                else "the validation loss is not finite (NaN or Inf) at epoch 1 (validation);")
    assert expected in msg, msg
    assert f"The last good checkpoint is {logdir / 'last_model.pt'};" in msg and "'best' was not overwritten" in msg, msg
    assert snapshot(logdir) == before
    assert load_checkpoint(logdir / "last_model.pt")["epoch"] == 1


@pytest.mark.parametrize("eval_every, expected", [
    # no evaluation before the step whose loss is not finite
    (4, "the loss is not finite (NaN or Inf) at iteration 2 (epoch 2);"),
    # an evaluation right after the step that blew the weights up: NaN outputs (Dice 0, which would
    # beat any earlier best of a fresh run) must stop the run, not be saved as best or last
    (1, "the validation output is not finite (NaN or Inf) at iteration 1 (validation);"),
])
def test_nonfinite_loss_in_finetuning_stops_and_keeps_best(smoke_cohort, tmp_path, eval_every, expected):
    from ssl_utils.finetune import finetune

    logdir = logdir_with_sentinel(tmp_path)  # an earlier run's last_model.pt, history.json
    save_checkpoint({"state_dict": {"w": torch.ones(3)}, "iteration": 9}, logdir / "best_model.pt")
    before = snapshot(logdir)
    # AdamW moves every weight by about lr at the first step: the second loss is not finite.
    # 1 training volume: one iteration per epoch.
    cfg = get_config("smoke", ft_lr=1e30)
    with pytest.raises(TrainingDiverged) as info:
        finetune(cfg, smoke_cohort["btcv_root"], smoke_cohort["btcv_json"][1], str(logdir), use_pretrained=False,
                 iterations=4, eval_every=eval_every, device="cpu", **QUIET)
    msg = str(info.value)
    assert expected in msg, msg
    assert f"The last good checkpoint is {logdir / 'last_model.pt'};" in msg and "'best' was not overwritten" in msg, msg
    assert snapshot(logdir) == before  # best_model.pt (and everything else) untouched
    assert load_checkpoint(logdir / "best_model.pt")["iteration"] == 9


DISK_FULL_RUN = """
import hashlib, resource, signal, sys
from ssl_utils import get_config
from ssl_utils.checkpoint import CheckpointError
from ssl_utils.pretrain import pretrain
data_root, json_path, logdir = sys.argv[1:4]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write fails with an error instead of a kill

def log(msg):
    print(msg, flush=True)
    if msg.startswith("epoch 1/"):
        for name in ("last_model.pt", "best_model.pt"):
            print("sha256", name, hashlib.sha256(open(f"{logdir}/{name}", "rb").read()).hexdigest(), flush=True)
        # from now on the disk is "full": no file may grow past 64 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

try:
    pretrain(get_config("smoke"), data_root, json_path, logdir, epochs=2, device="cpu", progress=False, log=log)
except CheckpointError as exc:
    print("CheckpointError:", exc, flush=True)
    sys.exit(3)
"""


def test_failed_checkpoint_write_is_clear_and_keeps_previous(smoke_cohort, tmp_path):
    logdir = tmp_path / "run"
    content = json.loads(Path(smoke_cohort["tcia_json"]).read_text())
    small = write_json(tmp_path / "small.json", {"training": content["training"][:2], "validation": content["validation"][:1]})
    proc = python(DISK_FULL_RUN, smoke_cohort["tcia_root"], str(small), str(logdir))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out
    error = next(line for line in out.splitlines() if line.startswith("CheckpointError:"))
    assert "cannot write checkpoint" in error and "File too large" in error and "the previous file is intact" in error, error
    assert str(logdir) in error
    hashes = dict(line.split()[1:] for line in out.splitlines() if line.startswith("sha256"))
    for name, digest in hashes.items():
        assert hashlib.sha256((logdir / name).read_bytes()).hexdigest() == digest, name
    assert load_checkpoint(logdir / "last_model.pt")["epoch"] == 1
    assert not list(logdir.glob("*.tmp"))


def test_checkpoint_into_unusable_folder_is_clear(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the log folder should be")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*runs/last_model.pt: .*runs is a file, not a folder"):
        save_checkpoint({"epoch": 1}, blocker / "last_model.pt")


def test_resume_from_other_configuration_names_the_settings(smoke_cohort, good_run, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(good_run, logdir)
    before = snapshot(logdir)
    cfg = get_config("smoke", hidden_size=64, roi=48)
    with pytest.raises(CheckpointError) as info:  # refused before the data is read: these paths do not exist
        pretrain(cfg, str(tmp_path / "no-data"), str(tmp_path / "no.json"), str(logdir), resume=True, device="cpu", **QUIET)
    msg = str(info.value)
    trained = get_config("smoke")
    assert f"roi: checkpoint {trained['roi']}, this run 48" in msg, msg
    assert f"hidden_size: checkpoint {trained['hidden_size']}, this run 64" in msg, msg
    assert str(logdir / "last_model.pt") in msg
    assert snapshot(logdir) == before


# --------------------------------------------------------------------------------------------
# untrusted files
# --------------------------------------------------------------------------------------------


def _torch_load_calls(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                yield node


def test_every_checkpoint_read_uses_weights_only():
    files = [p for d in ("ssl_utils", "multi_gpu", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    sources = {str(p): p.read_text() for p in files}
    for nb in ROOT.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources[str(nb)] = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    calls = 0
    for name, source in sources.items():
        for call in _torch_load_calls(source):
            calls += 1
            flags = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in flags and getattr(flags["weights_only"], "value", None) is True, (
                f"{name}:{call.lineno}: torch.load without weights_only=True"
            )
    assert calls >= 1  # checkpoint.load_checkpoint at least


class RunsCode:
    """What a booby-trapped checkpoint holds: unpickling it executes code (here: writes a marker)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def booby_trapped(path: Path, marker: Path, plain_pickle: bool) -> Path:
    import pickle

    payload = {"state_dict": {"w": torch.zeros(2)}, "epoch": 1, "note": RunsCode(str(marker))}
    path.parent.mkdir(parents=True, exist_ok=True)
    if plain_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, str(path))
    assert not marker.exists()
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("plain_pickle", [False, True], ids=["torch.save", "pickle"])
def test_booby_trapped_checkpoint_refused_by_weight_transfer(tmp_path, plain_pickle):
    marker = tmp_path / "marker"
    path = booby_trapped(tmp_path / "best_model.pt", marker, plain_pickle)
    unetr = build_unetr(get_config("smoke"))
    with pytest.raises(CheckpointError, match="refused") as info:
        load_pretrained_vit(unetr, path)
    assert str(path) in str(info.value) and "weights_only=True" in str(info.value)
    assert not marker.exists(), "the checkpoint's code ran"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("plain_pickle", [False, True], ids=["torch.save", "pickle"])
def test_booby_trapped_checkpoint_refused_on_resume(smoke_cohort, tmp_path, plain_pickle):
    marker = tmp_path / "marker"
    logdir = tmp_path / "run"
    booby_trapped(logdir / "last_model.pt", marker, plain_pickle)
    before = snapshot(logdir)
    with pytest.raises(CheckpointError, match="refused"):
        pretrain("smoke", smoke_cohort["tcia_root"], smoke_cohort["tcia_json"], str(logdir), resume=True, device="cpu", **QUIET)
    assert not marker.exists(), "the checkpoint's code ran"
    assert snapshot(logdir) == before
