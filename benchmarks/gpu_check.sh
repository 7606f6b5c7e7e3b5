#!/bin/bash
# What to run on a machine with a CUDA GPU (CI has none): the CUDA tests, the whole suite, and one
# compare point trained on the GPU. Logs go to $OUT (default benchmarks/results/gpu_check); the
# compare result to benchmarks/results/compare_lenet5_200x_2k_obdland_val_cuda.
#   MNIST=path/to/mnist.npz OUT=dir bash benchmarks/gpu_check.sh
# Assumes the package and its dependencies import (pip install -e ".[dev]", or PYTHONPATH=src).
set -o pipefail
export PYTHONUNBUFFERED=1
MNIST=${MNIST:-../shared/datasets/mnist/mnist.npz}
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
{ nvidia-smi -L; $PY -c "import torch,onnxruntime,transformers;print('torch',torch.__version__,torch.cuda.is_available(),'ort',onnxruntime.__version__,'transformers',transformers.__version__)"; } 2>&1 | tee "$OUT/env.log"
timeout 150 $PY -m pytest -o addopts="" -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 3
# the suite in parallel (test_report.py fetches a browser with apt-get: not on an offline machine)
OMP_NUM_THREADS=1 timeout 200 $PY -m pytest -o addopts="" -q -n 14 --dist loadfile --ignore tests/test_cuda.py \
    --ignore tests/test_report.py -p no:cacheprovider tests > "$OUT/suite_full.log" 2>&1
grep -E "^[0-9]+ (passed|failed)|FAILED|^ERROR" "$OUT/suite_full.log" | tee "$OUT/suite.log"
timeout 200 $PY benchmarks/compare_mnist.py --model lenet5 --seeds 3 --epochs 20 --teacher-epochs 15 --train-images 2000 \
    --variants joint-paced-obdland-none,sequential --ratios 200 --val-images 200 --device cuda --data "$MNIST" \
    --out benchmarks/results/compare_lenet5_200x_2k_obdland_val_cuda 2>&1 | tee "$OUT/bench.log" | tail -n 4
