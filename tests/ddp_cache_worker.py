"""Pre-training set-up in 2 processes: the header check split across ranks, a content error found
while caching, the disk cache reused by every rank.

Run by ``tests/test_cache.py`` under ``torchrun --nproc_per_node=2``:
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_cache_worker.py OUT_DIR``.
Rank 0 writes a cohort of noise volumes (and a NaN, an all-air, a 2D one) under ``OUT_DIR/data``;
every rank writes ``OUT_DIR/rank{r}.json``: the files its header check opened, the errors it
raised (``"<type>: <message>"``), the bytes it read of each volume in a first and a second
disk-cached run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


import nibabel as nib
import numpy as np
import torch.distributed as dist

from file_reads import count_reads
from ssl_utils import get_config
from ssl_utils.data import check_datalist
from ssl_utils.pretrain import pretrain
from test_cache import HEADER_BYTES, noise_volume

QUIET = dict(progress=False, log=lambda _msg: None, device="cpu")


def write_cohort(data: Path) -> None:
    for i in range(8):
        noise_volume(data / f"v{i}.nii.gz", i)
    nan = np.random.default_rng(8).integers(-1000, 1000, (48, 48, 36)).astype(np.float32)
    nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([6.0, 6.0, 8.0, 1.0])), str(data / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((48, 48, 36), -1000, np.int16), np.diag([6.0, 6.0, 8.0, 1.0])), str(data / "air.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((48, 48), np.int16), np.diag([6.0, 6.0, 8.0, 1.0])), str(data / "flat.nii.gz"))


def datalist(out: Path, name: str, training: list[str], validation: list[str]) -> str:
    path = out / f"{name}.json"
    if dist.get_rank() == 0:
        path.write_text(json.dumps({"training": [{"image": f"data/{v}.nii.gz"} for v in training],
                                    "validation": [{"image": f"data/{v}.nii.gz"} for v in validation]}))
    dist.barrier()
    return str(path)


def outcome(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "finished"


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        write_cohort(out / "data")
    dist.barrier()
    volumes = [str(out / "data" / f"v{i}.nii.gz") for i in range(8)]
    good = datalist(out, "good", [f"v{i}" for i in range(6)], ["v6", "v7"])
    report: dict = {"n_volumes": len(volumes), "header_bytes_limit": HEADER_BYTES}

    with count_reads(volumes) as reads:
        checked = check_datalist(good, check_values=False, progress=False, split_across_ranks=True)
    usable = sorted(e["image"] for key in ("training", "validation") for _, e in checked.usable(key))
    report["header"] = {"opened": sorted(p for p in volumes if reads.opens[p]), "volumes": volumes, "usable": usable}

    bad_headers = datalist(out, "bad_headers", ["v0", "v1", "v2", "gone", "v3", "v4", "v5"], ["v6", "flat", "v7"])
    report["header_error"] = outcome(lambda: pretrain("smoke", str(out), bad_headers, str(out / "header_run"), **QUIET))

    bad_content = datalist(out, "bad_content", ["v0", "nan", "v1", "v2", "air", "v3"], ["v6", "v7"])
    content_cfg = get_config("smoke", cache="disk", cache_dir=str(out / "content_cache"))
    report["content_error"] = outcome(lambda: pretrain(content_cfg, str(out), bad_content, str(out / "content_run"), **QUIET))
    dist.barrier()
    report["content_cache_files"] = len(list((out / "content_cache").glob("*.pt")))

    cfg = get_config("smoke", ssl_epochs=1, cache="disk", cache_dir=str(out / "cache"))
    for run in ("first", "second"):
        with count_reads(volumes) as reads:
            result = pretrain(cfg, str(out), good, str(out / f"{run}_run"), **QUIET)
        dist.barrier()
        report[f"{run}_epochs"] = [row["epoch"] for row in result["history"]]
        report[f"{run}_bytes_read"] = sum(reads.bytes.values())
        report[f"{run}_bytes_max"] = max(reads.bytes.values())
        report[f"{run}_cache_files"] = len(list((out / "cache").glob("*.pt")))
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
