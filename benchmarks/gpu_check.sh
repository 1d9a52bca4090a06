#!/usr/bin/env bash
# The benchmark at the paper configuration on one GPU (ViT-B/16 at 96^3, 4 volumes x 2 crops;
# UNETR feature 16; sliding window over 250 x 250 x 125 voxels), plus the end-to-end pre-training
# throughput: crop pairs per second per GPU including data loading (ssl_utils.pretrain.pretrain on
# a synthetic cohort, median of epochs 2..N).
#
# Beside every timed variant, its learning check at the paper size (--check bench): the variant's own
# step trained on the embedded cohort (generated under data/synthetic when missing) for
# CHECK_STEPS pre-training steps (reference fp32, ours in amp="auto" = bf16 on recent GPUs, ours
# fp32: validation L1 / constant side by side) and CHECK_FT_STEPS fine-tuning iterations (tuning
# Dice). It answers whether the paper recipe learns in bf16 on this GPU; a variant that fails is
# marked in benchmarks/results/gpu.md and meets no target.
#
#   bash benchmarks/gpu_check.sh                 # writes benchmarks/results/gpu.{json,md}
#   CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_check.sh --steps 20
#
# Extra arguments go to benchmarks/run.py. A second, optional run adds a torch.compile variant of
# the pre-training step (benchmarks/results/gpu_compile.{json,md}); its failure does not fail this
# script. Needs the project's environment (make venv) with a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch: this script is for a GPU machine")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv

WORKERS="${WORKERS:-$("$PY" -c 'import os; print(min(8, os.cpu_count() or 1))')}"
CHECK_STEPS="${CHECK_STEPS:-300}"
CHECK_FT_STEPS="${CHECK_FT_STEPS:-300}"
"$PY" benchmarks/run.py --device cuda --out benchmarks/results --name gpu \
    --sections pretrain,loss,attention,data,finetune,sliding,e2e \
    --memory pretrain,loss,finetune,sliding \
    --warmup 3 --steps 10 --sw-steps 3 \
    --check bench --check-steps "$CHECK_STEPS" --check-ft-steps "$CHECK_FT_STEPS" \
    --e2e-volumes 32 --e2e-epochs 4 --e2e-workers "$WORKERS" "$@"

"$PY" benchmarks/run.py --device cuda --out benchmarks/results --name gpu_compile \
    --sections pretrain --memory none --compile --warmup 3 --steps 10 --check none "$@" \
    || echo "optional torch.compile run failed (see above); benchmarks/results/gpu.* are complete" >&2
