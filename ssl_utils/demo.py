"""``make demo``: run both notebooks top to bottom on the embedded synthetic cohort.

    python -m ssl_utils.demo --out runs/demo [--preset demo]

Writes the executed notebooks to ``--out`` (``ssl_train.ipynb``, ``ssl_finetune.ipynb``), the
pre-training run to ``runs/ssl`` and the fine-tuning runs to ``runs/finetune`` (tables, figures,
JSON), and prints how long each step took. The executed copies are made to be committed and read
on a static page: progress bars as text (``SSL_UTILS_PROGRESS=text`` in the kernels), then no
widget state and no path of this machine (``ssl_utils.notebooks.clean_notebook``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see the Makefile
os.environ.setdefault("SSL_UTILS_PROGRESS", "text")  # the kernels papermill starts inherit it (ssl_utils.progress)

from .io import write_json  # noqa: E402 (no torch import)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name: str, out_dir: str, parameters: dict, timeout: int) -> float:
    """Execute ``name`` with papermill into ``out_dir``, then clean the copy for a static page
    (``clean_notebook``: paths relative to the repository); returns the seconds it took."""
    import papermill as pm

    from .notebooks import clean_notebook

    t0 = time.perf_counter()
    out = os.path.join(out_dir, name)
    pm.execute_notebook(
        os.path.join(REPO, name),
        out,
        parameters=parameters,
        cwd=REPO,
        kernel_name="python3",
        execution_timeout=timeout,
        progress_bar=True,
    )
    clean_notebook(out, REPO)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for the executed notebooks (default: runs/demo)")
    parser.add_argument("--preset", default="demo", choices=["demo", "smoke", "paper"], help="preset (default: demo)")
    parser.add_argument("--ssl_logdir", default="runs/ssl", help="pre-training run folder (default: runs/ssl)")
    parser.add_argument("--ft_logdir", default="runs/finetune", help="fine-tuning run folder (default: runs/finetune)")
    parser.add_argument("--cell_timeout", type=int, default=1800, help="seconds allowed per notebook cell")
    args = parser.parse_args(argv)

    from .config import get_config
    from .synthetic import make_cohort_from_config

    out_dir = os.path.join(REPO, args.out)
    os.makedirs(out_dir, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    info = make_cohort_from_config(get_config(args.preset), os.path.join(REPO, "data", "synthetic"))
    timings["cohort_s"] = time.perf_counter() - t0
    print(f"embedded cohort: {info['root']} ({'reused' if info.get('reused') else 'generated'} in {timings['cohort_s']:.1f} s)")

    timings["ssl_train_s"] = run_notebook(
        "ssl_train.ipynb", out_dir, {"preset": args.preset, "logdir": args.ssl_logdir}, args.cell_timeout
    )
    print(f"ssl_train.ipynb: {timings['ssl_train_s'] / 60:.1f} min")
    timings["ssl_finetune_s"] = run_notebook(
        "ssl_finetune.ipynb",
        out_dir,
        {
            "preset": args.preset,
            "logdir": args.ft_logdir,
            "pretrained_path": os.path.join(args.ssl_logdir, "best_model.pt"),
        },
        args.cell_timeout,
    )
    print(f"ssl_finetune.ipynb: {timings['ssl_finetune_s'] / 60:.1f} min")
    timings["total_s"] = time.perf_counter() - t0
    from .runtime import machine_line

    summary = {"preset": args.preset, "machine": machine_line(), "date": time.strftime("%Y-%m-%d"), **timings}
    write_json(os.path.join(out_dir, "demo_summary.json"), summary)
    print(f"demo done in {timings['total_s'] / 60:.1f} min on {summary['machine']}; executed notebooks in {out_dir}")
    table = os.path.join(REPO, args.ft_logdir, "compare", "results_table.md")
    if os.path.exists(table):
        print(open(table).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
