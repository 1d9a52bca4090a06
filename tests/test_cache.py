"""Cohorts larger than memory: each volume read once during set-up, the disk cache reused by a
second and a resumed run, the same views whichever cache, checks split across ranks (2 real gloo
processes), and 100k-entry datalists without quadratic work.

Reads are counted at the file-system boundary (``file_reads.count_reads``: every ``open`` of a
volume and the compressed bytes read through it) on real NIfTI files of noise, which gzip cannot
shrink much, so one full read and a header peek differ by a factor of ten or more.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from file_reads import count_reads
from ssl_utils import get_config
from ssl_utils.data import DatalistError, check_datalist
from ssl_utils.datasets import SeededCacheDataset, pretrain_datasets
from ssl_utils.pretrain import pretrain
from ssl_utils.transforms import pretrain_cache_settings, pretrain_transforms

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
QUIET = dict(progress=False, log=lambda _msg: None, device="cpu")
HEADER_BYTES = 32 * 1024  # what one header peek may read of a .nii.gz (gzip reads ahead in blocks)


def noise_volume(path: Path, seed: int, shape=(48, 48, 36)) -> str:
    """A CT-like box of noise (-1000..1000 HU, 6 x 6 x 8 mm voxels), about 150 KB compressed."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, shape).astype(np.int16), np.diag([6.0, 6.0, 8.0, 1.0])), str(path))
    return str(path)


def make_cohort(root: Path, n_train: int = 4, n_val: int = 2) -> tuple[str, list[str]]:
    """``(datalist path, volume paths)`` of a small noise cohort under ``root``."""
    names = [f"data/v{i}.nii.gz" for i in range(n_train + n_val)]
    paths = [noise_volume(root / name, i) for i, name in enumerate(names)]
    datalist = {"training": [{"image": n} for n in names[:n_train]], "validation": [{"image": n} for n in names[n_train:]]}
    (root / "dataset.json").write_text(json.dumps(datalist))
    return str(root / "dataset.json"), paths


@pytest.fixture()
def cohort(tmp_path):
    return make_cohort(tmp_path / "cohort")


def cache_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}


# --------------------------------------------------------------------------------------------
# one read per volume
# --------------------------------------------------------------------------------------------


def test_header_check_opens_each_file_once_and_reads_its_header_only(cohort):
    json_path, paths = cohort
    with count_reads(paths) as reads:
        checked = check_datalist(json_path, check_values=False, progress=False)
    assert not checked.problems and checked.total == len(paths)
    for p in paths:
        assert reads.opens[p] == 1, (p, reads.opens[p])
        assert 0 < reads.bytes[p] <= HEADER_BYTES < os.path.getsize(p) / 4, (p, reads.bytes[p], os.path.getsize(p))


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_setup_reads_each_volume_once(cohort, tmp_path, cache):
    """A whole (one-epoch) pre-training run: every volume's bytes are read once, plus one header
    peek (before, the pre-flight check and the cache each read every volume in full)."""
    json_path, paths = cohort
    cfg = get_config("smoke", cache=cache, cache_dir=str(tmp_path / "cache") if cache == "disk" else None)
    with count_reads(paths) as reads:
        out = pretrain(cfg, str(Path(json_path).parent), json_path, str(tmp_path / "run"), epochs=1, **QUIET)
    assert [r["epoch"] for r in out["history"]] == [1]
    for p in paths:
        size = os.path.getsize(p)
        assert size <= reads.bytes[p] <= size + 2 * HEADER_BYTES, (p, reads.bytes[p], size)
    if cache == "disk":
        assert len(cache_files(tmp_path / "cache")) == len(paths)


def test_second_and_resumed_run_reuse_the_disk_cache(cohort, tmp_path):
    """The first run fills the cache (and is interrupted after epoch 1); a second run, then the
    resumed first run, read each volume's header only; the cache is not rewritten; and the
    views are those of the memory cache (same losses, bitwise)."""
    json_path, paths = cohort
    root, cache = str(Path(json_path).parent), tmp_path / "cache"
    cfg = get_config("smoke", ssl_epochs=2, cache="disk", cache_dir=str(cache))
    first = pretrain(cfg, root, json_path, str(tmp_path / "first"), stop_after=1, **QUIET)
    filled = cache_files(cache)
    assert len(filled) == len(paths) and [r["epoch"] for r in first["history"]] == [1]
    for run, kw in (("second", {}), ("first", {"resume": True})):
        with count_reads(paths) as reads:
            out = pretrain(cfg, root, json_path, str(tmp_path / run), **kw, **QUIET)
        assert [r["epoch"] for r in out["history"]] == [1, 2]
        for p in paths:
            assert reads.opens[p] == 1 and reads.bytes[p] <= HEADER_BYTES, (run, p, reads.opens[p], reads.bytes[p])
        assert cache_files(cache) == filled
    memory = pretrain(get_config("smoke", ssl_epochs=2), root, json_path, str(tmp_path / "memory"), **QUIET)
    for a, b in zip(memory["history"], out["history"]):
        assert (a["train_total"], a["val_total"]) == (b["train_total"], b["val_total"])


def test_views_are_the_same_whichever_cache(cohort, tmp_path):
    json_path, _ = cohort
    entries = check_datalist(json_path, check_values=False, progress=False).entries
    memory = pretrain_datasets(get_config("smoke"), entries["training"], entries["validation"], progress=False)
    disk_cfg = get_config("smoke", cache="disk", cache_dir=str(tmp_path / "cache"))
    pretrain_datasets(disk_cfg, entries["training"], entries["validation"], progress=False)  # fills the cache
    disk = pretrain_datasets(disk_cfg, entries["training"], entries["validation"], progress=False)  # reads it back
    for m, d in zip(memory, disk):
        for epoch in (1, 2):
            m.set_epoch(epoch), d.set_epoch(epoch)
            for i in range(len(m)):
                for a, b in zip(m[i], d[i]):
                    for key in ("image", "image_2", "gt_image"):
                        assert torch.equal(a[key].as_tensor(), b[key].as_tensor()), (epoch, i, key)
                        torch.testing.assert_close(a[key].affine, b[key].affine)


def test_cache_key_follows_the_file_and_the_settings(cohort, tmp_path):
    """An edited volume or another spacing is a new cache entry, never a stale one; an unreadable
    cache file is recomputed."""
    json_path, paths = cohort
    entries = [{"image": p} for p in paths[:2]]
    cache = tmp_path / "cache"
    cfg = get_config("smoke", cache="disk", cache_dir=str(cache))
    pretrain_datasets(cfg, entries, entries[:1], progress=False)
    assert len(cache_files(cache)) == 2
    noise_volume(Path(paths[0]), seed=99)  # same path, new content
    with count_reads(paths[:2]) as reads:
        pretrain_datasets(cfg, entries, entries[:1], progress=False)
    assert reads.bytes[paths[0]] >= os.path.getsize(paths[0]) and reads.bytes[paths[1]] == 0
    assert len(cache_files(cache)) == 3
    pretrain_datasets(cfg.replace(ssl_spacing=(5.0, 5.0, 5.0)), entries, entries[:1], progress=False)
    assert len(cache_files(cache)) == 5
    ds = SeededCacheDataset(entries[1:], pretrain_transforms(cfg, checked=True), cache_dir=str(cache),
                            cache_settings=pretrain_cache_settings(cfg))
    torn = ds.store.path(entries[1])
    torn.write_bytes(torn.read_bytes()[:100])
    with pytest.warns(UserWarning, match="cannot be read"):
        item = ds[0]
    assert item[0]["image"].shape == (1, 32, 32, 32)
    torch.load(torn, weights_only=True)  # rewritten whole


def test_unwritable_disk_cache_is_a_clear_error(cohort, tmp_path):
    json_path, _ = cohort
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    cfg = get_config("smoke", cache="disk", cache_dir=str(blocker / "cache"))
    with pytest.raises(OSError):
        pretrain(cfg, str(Path(json_path).parent), json_path, str(tmp_path / "run"), epochs=1, **QUIET)
    assert not (tmp_path / "run" / "last_model.pt").exists()


def test_disk_cache_needs_a_folder():
    from ssl_utils.config import ConfigError

    with pytest.raises(ConfigError, match="cache='disk' needs cache_dir"):
        get_config("smoke", cache="disk")
    with pytest.raises(ConfigError, match="'cache'"):
        get_config("smoke", cache="ssd")


# --------------------------------------------------------------------------------------------
# 100k entries: no quadratic work in the checks, the shards, the sampler
# --------------------------------------------------------------------------------------------


def test_100k_entry_datalist(tmp_path):
    """Every entry of a 100k-entry datalist is checked and every bad one listed; the shards and
    the sampler take it (quadratic work would not finish within the suite's time limit)."""
    from torch.utils.data import DistributedSampler

    from ssl_utils.distributed import shard

    n = 100_000
    (tmp_path / "dataset.json").write_text(json.dumps({
        "training": [{"image": f"data/v{i:06d}.nii.gz"} for i in range(n)], "validation": [{"image": "data/v.nii.gz"}]}))
    checked = check_datalist(tmp_path / "dataset.json", check_values=False, progress=False)
    assert len(checked.problems) == n + 1
    with pytest.raises(DatalistError) as info:
        checked.report(skip_bad=False, log=print)
    assert f"{n + 1} of {n + 1} entries cannot be used" in str(info.value)
    assert "training entry 99999: image 'data/v099999.nii.gz'" in str(info.value)
    entries = [e for e in checked.entries["training"]]
    parts = [shard(entries, r, 2, seed=3, pad=True) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == n // 2
    assert {e["image"] for part in parts for e in part} == {e["image"] for e in entries}
    sampler = DistributedSampler(parts[0], num_replicas=1, rank=0, shuffle=True, seed=1)
    assert sorted(sampler) == list(range(n // 2))


# --------------------------------------------------------------------------------------------
# two real gloo processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_cache_run(tmp_path_factory):
    """``tests/ddp_cache_worker.py`` under torchrun with 2 processes: its per-rank reports."""
    out = tmp_path_factory.mktemp("ddp_cache")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore::FutureWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_cache_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return reports, out


@pytest.mark.slow
def test_sharded_header_check_with_two_processes(ddp_cache_run):
    """Each rank opens only its share of the files, the shares cover the datalist, and both ranks
    get the same verdict: the same result, or the same error listing the bad entries of both."""
    (r0, r1), _ = ddp_cache_run
    mine = [set(r["header"]["opened"]) for r in (r0, r1)]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(r0["header"]["volumes"])
    assert r0["header"]["usable"] == r1["header"]["usable"] == r0["header"]["volumes"]
    assert r0["header_error"] == r1["header_error"]
    msg = r0["header_error"]
    assert msg.startswith("DatalistError:") and "2 of 10 entries cannot be used" in msg, msg
    assert "training entry 3: image 'data/gone.nii.gz'" in msg and "file not found" in msg, msg
    assert "validation entry 1: image 'data/flat.nii.gz'" in msg and "expected a 3D volume" in msg, msg


@pytest.mark.slow
def test_content_error_while_caching_stops_every_rank_with_the_list(ddp_cache_run):
    (r0, r1), out = ddp_cache_run
    assert r0["content_error"] == r1["content_error"]
    msg = r0["content_error"]
    assert msg.startswith("DatalistError:") and "2 of 8 entries cannot be used" in msg, msg
    assert re.search(r"training entry 1: image 'data/nan.nii.gz' \(resolved: [^)]*\): 1 voxel\(s\) are NaN or Inf\n", msg), msg
    assert re.search(r"training entry 4: image 'data/air.nii.gz' \(resolved: [^)]*\): no voxel above -57 HU", msg), msg
    assert not (out / "content_run" / "last_model.pt").exists()  # no training step, nothing written
    assert r0["content_cache_files"] == 6  # the good volumes only


@pytest.mark.slow
def test_every_rank_reuses_the_disk_cache(ddp_cache_run):
    """A second 2-process run reads the headers of its share only: every volume came from the cache
    the first run wrote (each rank filling its own shard)."""
    (r0, r1), _ = ddp_cache_run
    for r in (r0, r1):
        assert r["first_epochs"] == [1] and r["second_epochs"] == [1]
        assert r["second_bytes_max"] <= r["header_bytes_limit"], r
        assert r["first_bytes_read"] > 0
    assert r0["first_cache_files"] == r0["second_cache_files"] == r0["n_volumes"]
