#!/usr/bin/env bash
# The whole GPU check in one short run (at most 8 minutes: each step has its own time limit): the
# CUDA-only tests, then the benchmark's CUDA section (models fp32/bf16 + compiled, then per-layer).
# Logs and JSON go to $OUT (default benchmarks/results); the JSON keeps every finished case.
# LAYERS=flex limits the per-layer part to labels containing 'flex'.
set -o pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_info.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu_info.txt"
status=0
timeout 110 $PY -m pytest -q -m gpu -s -p no:cacheprovider -p no:logging tests/test_attention.py tests/test_models.py \
    2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 200 $PY benchmarks/bench.py --what models --compile --json "$OUT/cuda_models.json" \
    2>&1 | tee "$OUT/bench_models.log" || status=1
timeout ${LAYER_S:-170} $PY benchmarks/bench.py --what layers --quick --only "${LAYERS:-}" --json "$OUT/cuda_layers.json" \
    2>&1 | tee "$OUT/bench_layers.log" || status=1
exit $status
