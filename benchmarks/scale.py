#!/usr/bin/env python
"""How pre-training's set-up, memory and epoch time grow with the cohort and the number of ranks.

    python benchmarks/scale.py                                  # N = 100, 1,000, 10,000; 1 and 2 ranks
    python benchmarks/scale.py --sizes 100 1000 --out /tmp/scale # a quicker look
    python benchmarks/scale.py --demo --baseline /path/to/older/checkout   # + the demo cohort's set-up

Workload: N small generated CT-like volumes (36 x 36 x 28 voxels of 6 x 6 x 8 mm: a box of soft
tissue in air with noise; about 10 ms each to write) under ``--work`` (default ``data/scale``),
plus N/50 (at least 2) validation volumes; the datalist for N takes the first N. Each
configuration is one real run of ``multi_gpu/mgpu_ssl_train.py --preset smoke --epochs 1`` under
``torchrun --standalone --nproc_per_node=W`` (gloo, CPU, ``OMP_NUM_THREADS=1`` per rank, so a
rank's share of the machine is the same at W = 1 and 2), for W in ``--ranks`` and each cache:

- ``memory``: each rank keeps its shard in memory;
- ``disk`` (cold): an empty ``--cache_dir``, filled by the run;
- ``disk-warm``: a second run on the cache the cold run left (every volume reused).

Measured per run:

- set-up: from the launch to rank 0's ``pre-training:`` line, which it prints just before the
  first training step (process start, imports and the process group included), and its data part
  (header check + cache fill, the slowest rank's, from the ``data:`` line);
- peak RSS per rank: each worker process's ``VmHWM`` (polled every 0.2 s; it is a high-water mark);
- epoch time: the first epoch's training time (``epoch_time_s`` in ``history.json``), for the
  sizes in ``--epoch_sizes`` (default 100 and 1,000: an epoch of 10,000 smoke-preset steps takes
  most of an hour on 2 shared cores); the other runs, and every warm one, are stopped ``--train_s``
  seconds after their first training step.

The growth exponent of a quantity q is the slope of log q against log N (least squares over the
sizes run, and from the second-largest to the largest size alone).

``--demo``: the set-up time of the demo preset on its embedded cohort (single process, memory
cache, probe monitor off), from ``pretrain()``'s call to its ``pre-training:`` line, median of
``--repeats`` runs, with this code and, given ``--baseline DIR``, with the checkout in DIR.

Writes ``<out>/scale.json`` (machine, date, disk used, every run), ``<out>/scale.md`` (tables,
exponents, targets met or not) and ``<out>/scale.png`` (log-log). ``--report`` rewrites the last
two from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("multi_gpu", "mgpu_ssl_train.py")
SHAPE, SPACING = (36, 36, 28), (6.0, 6.0, 8.0)


# ------------------------------------------------------------------------------------------------
# the workload
# ------------------------------------------------------------------------------------------------


def write_volumes(folder: str, prefix: str, n: int, seed: int) -> list[str]:
    """``n`` volumes ``<prefix>-00000.nii.gz`` ... (written once: existing files are kept)."""
    import nibabel as nib
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    names = []
    affine = np.diag([*SPACING, 1.0])
    for i in range(n):
        name = f"{prefix}-{i:05d}.nii.gz"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            rng = np.random.default_rng([seed, i])
            vol = np.full(SHAPE, -1000.0)
            lo = rng.integers(3, 7, size=3)
            vol[lo[0]:-lo[0], lo[1]:-lo[1], 2:-2] = 40.0
            vol += rng.normal(0, 20, SHAPE)
            nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), path + ".tmp.nii.gz")
            os.replace(path + ".tmp.nii.gz", path)
        names.append(f"volumes/{name}")
    return names


def datalists(work: str, sizes: list[int]) -> dict[int, str]:
    """One datalist per size (the first N training volumes, the first max(2, N/50) validation ones)."""
    train = write_volumes(os.path.join(work, "volumes"), "train", max(sizes), seed=1)
    val = write_volumes(os.path.join(work, "volumes"), "val", max(2, max(sizes) // 50), seed=2)
    out = {}
    for n in sizes:
        path = os.path.join(work, f"datalist_{n}.json")
        with open(path, "w") as f:
            json.dump({"training": [{"image": p} for p in train[:n]],
                       "validation": [{"image": p} for p in val[:max(2, n // 50)]]}, f)
        out[n] = path
    return out


def du(path: str) -> int:
    """Bytes under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


# ------------------------------------------------------------------------------------------------
# one run: torchrun, timed from outside, its workers' peak RSS polled
# ------------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        children = [c for c, pp in parents.items() if pp == p]
        out += children
        frontier += children
    return out


def _peak_rss_mb(pid: int) -> float | None:
    """``VmHWM`` of a worker process (``None`` for torchrun's own processes)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace").split("\0")
        if not any(a.endswith("mgpu_ssl_train.py") for a in cmd) or "torch.distributed.run" in cmd:
            return None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


DATA_LINE = re.compile(r"headers checked in ([\d.]+) s on \d+ rank\(s\); (\d+) volume reads into .*?([\d.]+) s \(slowest rank\)")


def run_one(code: str, work: str, datalist: str, ranks: int, cache: str, cache_dir: str, logdir: str,
            whole_epoch: bool, train_s: float) -> dict[str, Any]:
    """One ``torchrun`` of the DDP script (1 epoch, smoke preset); its timings and peak RSS.
    Without ``whole_epoch`` the run is stopped (SIGTERM to its process group) ``train_s`` seconds
    after its first training step: set-up and peak RSS are measured, the epoch time is not."""
    shutil.rmtree(logdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(code, SCRIPT), "--preset", "smoke", "--epochs", "1", "--data_root", work,
           "--json_path", datalist, "--logdir_path", logdir]
    if cache == "disk":
        cmd += ["--cache", "disk", "--cache_dir", cache_dir]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=code, PYTHONWARNINGS="ignore")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks: dict[int, float] = {}
    stopped = False
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            mb = _peak_rss_mb(pid)
            if mb is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), mb)
        started = next((t for t, line in list(lines) if line.startswith("pre-training:")), None)
        if not whole_epoch and not stopped and started is not None and time.perf_counter() - t0 > started + train_s:
            os.killpg(proc.pid, signal.SIGTERM)
            stopped = True
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and not stopped:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit code {proc.returncode}):\n{tail}")
    setup = next(t for t, line in lines if line.startswith("pre-training:"))
    data = next((DATA_LINE.search(line) for _, line in lines if DATA_LINE.search(line)), None)
    history = None
    if not stopped:
        with open(os.path.join(logdir, "history.json")) as f:
            history = json.load(f)
    return {
        "setup_s": round(setup, 2),
        "data_setup_s": round(float(data.group(1)) + float(data.group(3)), 2) if data else None,
        "header_check_s": float(data.group(1)) if data else None,
        "cache_fill_s": float(data.group(3)) if data else None,
        "volume_reads": int(data.group(2)) if data else None,
        "epoch_s": round(history[0]["epoch_time_s"], 2) if history else None,
        "wall_s": round(wall, 2),
        "peak_rss_mb_per_rank": sorted(round(v, 1) for v in peaks.values()),
        "load_average": [round(x, 2) for x in (*load_start, *os.getloadavg())],
        "data_line": next((line for _, line in lines if DATA_LINE.search(line)), None),
    }


# ------------------------------------------------------------------------------------------------
# the demo cohort's set-up, this code against a baseline checkout
# ------------------------------------------------------------------------------------------------


DEMO_SNIPPET = """
import sys, time
from ssl_utils import get_config
from ssl_utils.pretrain import pretrain
marks = {}
def log(msg):
    if msg.startswith("pre-training:"):
        marks["setup"] = time.perf_counter() - t0
cfg = get_config("demo", probe_every=0)
t0 = time.perf_counter()
pretrain(cfg, None, None, sys.argv[1], stop_after=0, progress=False, device="cpu", cohort_root=sys.argv[2], log=log)
print("SETUP", marks["setup"])
"""


def demo_setup(code: str, cohort_root: str, logdir: str) -> float:
    """Seconds from ``pretrain("demo")``'s call to its first training step (cohort already written)."""
    shutil.rmtree(logdir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=code, PYTHONWARNINGS="ignore", OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", DEMO_SNIPPET, logdir, cohort_root], cwd=code, env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"SETUP ([\d.]+)", out).group(1))


def demo_comparison(work: str, baseline: str | None, repeats: int) -> dict[str, Any]:
    """Median demo set-up with this code and the baseline (alternating, so drift hits both)."""
    from ssl_utils import get_config
    from ssl_utils.synthetic import make_cohort_from_config

    cohort = os.path.join(work, "demo_cohort")
    make_cohort_from_config(get_config("demo"), cohort, progress=False)
    codes = {"this code": ROOT, **({"baseline": os.path.abspath(baseline)} if baseline else {})}
    times: dict[str, list[float]] = {k: [] for k in codes}
    for _ in range(repeats):
        for name, code in codes.items():
            times[name].append(round(demo_setup(code, cohort, os.path.join(work, "demo_run")), 2))
    return {name: {"median_s": statistics.median(t), "runs_s": t} for name, t in times.items()}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def exponent(sizes: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(size)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(sizes, values) if v and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def series(runs: list[dict], ranks: int, cache: str, key: str) -> tuple[list[int], list[float]]:
    rows = sorted((r for r in runs if r["ranks"] == ranks and r["cache"] == cache), key=lambda r: r["n"])
    vals = [max(r[key]) if isinstance(r[key], list) and r[key] else (None if isinstance(r[key], list) else r[key]) for r in rows]
    return [r["n"] for r in rows], vals


def analysis(runs: list[dict]) -> dict[str, Any]:
    """Growth exponents, the 2-rank / 1-rank ratios and the RSS ratio, each against its target."""
    out: dict[str, Any] = {"exponents": {}, "two_vs_one_rank": {}, "rss_growth": {}}
    for ranks in sorted({r["ranks"] for r in runs}):
        for cache in ("memory", "disk", "disk-warm"):
            for key in ("setup_s", "data_setup_s", "peak_rss_mb_per_rank", "epoch_s"):
                n, v = series(runs, ranks, cache, key)
                n, v = [a for a, b in zip(n, v) if b], [b for b in v if b]
                if len(n) >= 2:
                    out["exponents"][f"{key} W={ranks} {cache}"] = {
                        "all": round(exponent(n, v), 3), f"{n[-2]}->{n[-1]}": round(exponent(n[-2:], v[-2:]), 3)}
    for cache in ("memory", "disk", "disk-warm"):
        for key in ("setup_s", "data_setup_s"):
            n1, v1 = series(runs, 1, cache, key)
            n2, v2 = series(runs, 2, cache, key)
            for n, a in zip(n1, v1):
                if n in n2 and a and v2[n2.index(n)]:
                    out["two_vs_one_rank"][f"{key} {cache} N={n}"] = round(v2[n2.index(n)] / a, 3)
        for ranks in (1, 2):
            n, v = series(runs, ranks, cache, "peak_rss_mb_per_rank")
            if 1000 in n and 10000 in n:
                out["rss_growth"][f"W={ranks} {cache} 1000->10000"] = round(v[n.index(10000)] / v[n.index(1000)], 3)
    return out


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def write_report(result: dict[str, Any], out: str) -> None:
    runs, a = result["runs"], result["analysis"]
    m = result["machine"]
    lines = [
        "# Scaling of pre-training's set-up: N volumes, W gloo ranks, memory or disk cache",
        "",
        f"Measured {result['date']} with `python benchmarks/scale.py` (commit {result['commit']}) on {m.get('cpu')}, "
        f"{m.get('logical_cores')} logical cores, {m.get('memory_gb')} GB; torch {m.get('torch')}, MONAI {m.get('monai')}. "
        f"Each rank runs with OMP_NUM_THREADS=1 and fills its cache in one thread. The 2 cores were shared with other "
        f"work (load average before/after each run in scale.json), so the timings are noisy; the 2-rank runs had at most "
        f"the two cores for themselves.",
        "",
        f"Workload: {result['workload']}. Disk: {result['disk']}.",
        "",
        "Set-up = launch to the first training step (process start, imports, process group, header check, cache fill, "
        "model); data = header check + cache fill (slowest rank). Peak RSS per rank = the largest worker's VmHWM. "
        "Epoch = the first epoch's training time.",
        "",
        "| N | W | cache | set-up (s) | data (s) | header check (s) | cache fill (s) | volume reads | peak RSS per rank (MB) | epoch (s) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r["cache"], r["ranks"], r["n"])):
        lines.append(f"| {r['n']:,} | {r['ranks']} | {r['cache']} | {_fmt(r['setup_s'])} | {_fmt(r['data_setup_s'])} | "
                     f"{_fmt(r['header_check_s'])} | {_fmt(r['cache_fill_s'])} | {r['volume_reads'] if r['volume_reads'] is not None else '-'} | "
                     f"{' / '.join(_fmt(x, 0) for x in r['peak_rss_mb_per_rank'])} | {_fmt(r['epoch_s'])} |")
    lines += ["", "## Growth exponents (slope of log q against log N)", "", "| quantity | all sizes | last two sizes |", "|---|---:|---:|"]
    for name, e in a["exponents"].items():
        last = [v for k, v in e.items() if k != "all"][0]
        lines.append(f"| {name} | {e['all']:.2f} | {last:.2f} |")
    lines += ["", "## Targets", ""]
    lines += _targets(a)
    lines += projection(result)
    if result.get("demo"):
        lines += ["", "## The demo cohort's set-up (single process, memory cache, probe monitor off)", "",
                  "| code | median set-up (s) | runs (s) |", "|---|---:|---|"]
        for name, d in result["demo"].items():
            lines.append(f"| {name} | {d['median_s']:.2f} | {', '.join(map(str, d['runs_s']))} |")
    lines += ["", "![set-up and peak RSS against N](scale.png)", ""]
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write("\n".join(lines))


def _targets(a: dict[str, Any]) -> list[str]:
    """One line per target: the measured value and whether it is met."""
    out = []
    for name, e in a["exponents"].items():
        if name.startswith(("setup_s", "data_setup_s")) and "disk-warm" not in name:
            last = [v for k, v in e.items() if k != "all"][0]
            met = "met" if last <= 1.05 else "NOT met"
            out.append(f"- set-up grows at most as N (exponent <= 1.05), {name}: {last:.2f} over the last two sizes "
                       f"({e['all']:.2f} over all) - {met}")
    largest = max((int(k.rsplit("N=", 1)[1]) for k in a["two_vs_one_rank"]), default=None)
    for name, ratio in a["two_vs_one_rank"].items():
        if "disk-warm" not in name and name.endswith(f"N={largest}"):
            out.append(f"- 2 ranks take <= 0.6x the set-up of 1 rank, {name}: {ratio:.2f}x - {'met' if ratio <= 0.6 else 'NOT met'}")
    for name, ratio in a["rss_growth"].items():
        if "disk" in name:
            out.append(f"- with the disk cache, peak RSS per rank <= 1.2x from N = 1,000 to 10,000, {name}: {ratio:.2f}x - "
                       f"{'met' if ratio <= 1.2 else 'NOT met'}")
    return out


def per_volume_costs(result: dict[str, Any]) -> dict[str, float]:
    """Seconds per volume per rank at the largest size run with 1 rank: header check, first
    (cold) cache fill, and a later run's fill (every volume reused); and the deterministic stage of
    a real-size CT volume from ``benchmarks/results/cpu.json`` (its ``data`` section)."""
    out: dict[str, float] = {}
    one = [r for r in result["runs"] if r["ranks"] == 1 and r["header_check_s"] is not None]
    n = max((r["n"] for r in one), default=None)
    for r in one:
        if r["n"] == n:
            volumes = r["n"] + max(2, r["n"] // 50)
            out["header_check"] = r["header_check_s"] / volumes
            key = {"disk": "fill_cold", "disk-warm": "fill_warm", "memory": "fill_memory"}[r["cache"]]
            out[key] = r["cache_fill_s"] / volumes
    try:
        with open(os.path.join(ROOT, "benchmarks", "results", "cpu.json")) as f:
            data = json.load(f)["sections"]["data"]
        out["fill_real_ct"] = data["variants"]["reference"]["median_s"] / len(data["volumes"])
    except (OSError, KeyError, ValueError):
        pass
    return out


def projection(result: dict[str, Any], volumes: int = 50_000, ranks_per_node: int = 8) -> list[str]:
    """A projection (not a measurement) of the data set-up for ``volumes`` on 1..16 nodes, from
    the per-volume costs measured here, assuming the work divides evenly over the ranks and the
    file system keeps up."""
    c = per_volume_costs(result)
    if "header_check" not in c:
        return []
    lines = ["", f"## Projection (not a measurement): {volumes:,} volumes, {ranks_per_node} ranks per node", "",
             "Per volume and rank, measured above with 1 rank at the largest N: header check "
             f"{c['header_check'] * 1e3:.2f} ms" + (f", first-run cache fill {c['fill_cold'] * 1e3:.1f} ms" if "fill_cold" in c else "")
             + (f", later-run fill (reused) {c['fill_warm'] * 1e3:.2f} ms" if "fill_warm" in c else "")
             + " (these small volumes); and a real-size CT volume's deterministic stage "
             + (f"{c['fill_real_ct']:.2f} s (512 x 512 x ~110 voxels at 0.75 x 0.75 x 2.5 mm resampled to 2 mm, "
                "one thread, benchmarks/results/cpu.json, `data` section: the reference's per-epoch load of the whole chain, "
                "random stage included, so an upper bound for the deterministic stage)." if "fill_real_ct" in c else "."),
             "Assumed: the work divides evenly over the ranks (as measured above for 1 -> 2 ranks) and the file "
             "system serves every rank at that rate; one rank per GPU; each rank's cache fill in one thread.", "",
             "| nodes | ranks | header check | first run, small volumes | first run, real CT | later runs (cache reused) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for nodes in (1, 2, 4, 8, 16):
        ranks = nodes * ranks_per_node
        cells = [volumes * c["header_check"] / ranks, volumes * c.get("fill_cold", float("nan")) / ranks,
                 volumes * c.get("fill_real_ct", float("nan")) / ranks,
                 volumes * (c["header_check"] + c.get("fill_warm", float("nan"))) / ranks]
        lines.append(f"| {nodes} | {ranks} | " + " | ".join(_duration(x) for x in cells) + " |")
    return lines


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")


def write_figure(result: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("setup_s", "peak_rss_mb_per_rank", "epoch_s"),
                              ("set-up until the first training step (s)", "peak RSS per rank (MB)", "first epoch (s)")):
        for ranks in sorted({r["ranks"] for r in runs}):
            for cache, style in (("memory", "-o"), ("disk", "--s"), ("disk-warm", ":^")):
                n, v = series(runs, ranks, cache, key)
                n, v = [a for a, b in zip(n, v) if b], [b for b in v if b]
                if n:
                    ax.plot(n, v, style, label=f"W={ranks}, {cache}")
        n_all = sorted({r["n"] for r in runs})
        if key == "setup_s" and n_all:
            ref = [r for r in runs if r["n"] == n_all[-1] and r["ranks"] == 1 and r["cache"] == "memory"]
            if ref:
                y = ref[0][key]
                ax.plot(n_all, [y * n / n_all[-1] for n in n_all], color="grey", lw=0.8, label="proportional to N")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("volumes N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"pre-training set-up, memory and epoch time against the cohort size ({result['date']}, "
                 f"{result['machine'].get('logical_cores')} shared CPU cores, smoke preset)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scale.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine description every report carries (``ssl_utils.runtime.machine_info``), on the CPU."""
    from ssl_utils.runtime import machine_info

    return machine_info("cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--caches", nargs="+", default=["memory", "disk", "disk-warm"], choices=["memory", "disk", "disk-warm"])
    p.add_argument("--epoch_sizes", type=int, nargs="+", default=[100, 1000],
                   help="sizes whose memory and cold disk runs train the whole epoch; the other runs stop --train_s "
                        "seconds after the first training step (set-up and peak RSS only)")
    p.add_argument("--train_s", type=float, default=15.0)
    p.add_argument("--work", default=os.path.join(ROOT, "data", "scale"), help="volumes, caches and runs (default: data/scale)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--code", default=ROOT, help="the checkout whose DDP script runs (default: this one)")
    p.add_argument("--demo", action="store_true", help="also time the demo cohort's set-up")
    p.add_argument("--baseline", default=None, help="a checkout of earlier code, for --demo's comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report", action="store_true", help="only rewrite scale.md and scale.png from scale.json")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scale.json")
    if args.report:
        with open(path) as f:
            result = json.load(f)
        write_report(result, args.out)
        write_figure(result, args.out)
        return 0
    work = os.path.abspath(args.work)
    t0 = time.perf_counter()
    lists = datalists(work, args.sizes)
    generate_s = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code, capture_output=True, text=True).stdout.strip()
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"), "commit": commit, "machine": machine(),
        "workload": f"{max(args.sizes):,} training + {max(2, max(args.sizes) // 50)} validation volumes of "
                    f"{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16 voxels at {SPACING} mm (written in {generate_s:.0f} s), "
                    "smoke preset (32^3 crops at 6 mm, batch 2 volumes x 2 crops per rank), 1 epoch",
        "runs": [],
    }
    for n in args.sizes:
        for ranks in args.ranks:
            cache_dir = os.path.join(work, "cache", f"n{n}_w{ranks}")
            for cache in args.caches:
                if cache == "disk":
                    shutil.rmtree(cache_dir, ignore_errors=True)
                label = f"N={n} W={ranks} {cache}"
                print(f"{label} ...", flush=True)
                whole = n in args.epoch_sizes and cache != "disk-warm"
                row = run_one(args.code, work, lists[n], ranks, "disk" if cache.startswith("disk") else "memory", cache_dir,
                              os.path.join(work, "runs", f"n{n}_w{ranks}_{cache}"), whole, args.train_s)
                row.update(n=n, ranks=ranks, cache=cache)
                if cache.startswith("disk"):
                    row["cache_bytes"] = du(cache_dir)
                result["runs"].append(row)
                print(f"  set-up {row['setup_s']} s (data {row['data_setup_s']} s), peak RSS per rank "
                      f"{row['peak_rss_mb_per_rank']} MB, epoch {row['epoch_s']} s", flush=True)
                with open(path, "w") as f:  # after every run: a long benchmark killed half-way keeps its rows
                    json.dump(result, f, indent=1)
    result["disk"] = (f"volumes {du(os.path.join(work, 'volumes')) / 2**20:,.0f} MiB; disk caches "
                      + ", ".join(f"N={r['n']:,}: {r['cache_bytes'] / 2**20:,.0f} MiB" for r in result["runs"]
                                  if r["cache"] == "disk" and r["ranks"] == args.ranks[0]) + f"; under {work}")
    if args.demo:
        result["demo"] = demo_comparison(work, args.baseline, args.repeats)
    result["analysis"] = analysis(result["runs"])
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    write_report(result, args.out)
    write_figure(result, args.out)
    print(open(os.path.join(args.out, "scale.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
