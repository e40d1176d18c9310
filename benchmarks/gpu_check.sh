#!/usr/bin/env bash
# The whole GPU check in one short run (at most 10 minutes: each step has its own time limit), most
# wanted first: whole models in bf16 and fp32 side by side, then torch.compile'd against eager (bf16),
# the CUDA-only tests (the whole-model FlexAttention tests in a step of their own: they compile a dozen
# kernels), then per-layer bf16 tables and the all-FlexAttention model with the time left. Logs and JSON
# go to $OUT (default benchmarks/results); the JSON keeps every finished case, and a case that faults in
# CUDA is rerun with CUDA_LAUNCH_BLOCKING=1 so its log names the faulting operation.
# LAYERS=flex limits the per-layer part to labels containing 'flex'; LAYER_S sets its time limit.
set -o pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_info.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu_info.txt"
status=0
step() {  # step <seconds> <log name> <command...>: a time limit per step, so one slow step cannot eat the rest
    local limit=$1 log=$2; shift 2
    echo "== $log (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log.log" || { echo "== $log: failed or timed out"; status=1; }
}
MODELS="biformer_tiny,biformer_tiny[original algorithm],swin_tiny_patch4_window7_224,biformer_stl"
step 150 bench_models $PY benchmarks/bench.py --what models --dtypes bf16,fp32 --models "$MODELS" --json "$OUT/cuda_models.json"
step 150 bench_compiled $PY benchmarks/bench.py --what models --dtypes bf16 --models biformer_tiny --compile \
    --json "$OUT/cuda_compiled.json"
step 60 gpu_tests_attention $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py
step 120 gpu_tests_models $PY -m pytest -q -m gpu -s -p no:cacheprovider tests/test_models.py
step ${LAYER_S:-60} bench_layers $PY benchmarks/bench.py --what layers --quick --dtypes bf16 --only "${LAYERS:-}" \
    --json "$OUT/cuda_layers.json"
step 60 bench_flex_model $PY benchmarks/bench.py --what models --dtypes bf16 --models "biformer_tiny[flex]" \
    --json "$OUT/cuda_flex_model.json"
exit $status
