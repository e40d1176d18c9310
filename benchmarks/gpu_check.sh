#!/usr/bin/env bash
# The whole GPU check in one short run (at most TOTAL_S seconds, default 540: each step has its own time
# limit, cut to what is left of the total less 10 s for a cut step's exit), most wanted first: whole
# models in bf16 and fp32 side by side, then torch.compile'd against eager (bf16), the CUDA-only tests
# (the whole-model FlexAttention tests in a step of their own: they compile a dozen kernels), then the
# all-FlexAttention model and per-layer bf16 tables with the time left. Logs and JSON go to $OUT
# (default benchmarks/results); the JSON keeps every finished case (a model case's training numbers
# even when its inference part does not finish), and a case that faults in CUDA is rerun with
# CUDA_LAUNCH_BLOCKING=1 so its log names the faulting operation. LAYERS=flex limits the per-layer part
# to labels containing 'flex'; LAYER_S sets its time limit.
set -o pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
# the last step's limit ends 10 s before TOTAL_S: its process gets SIGTERM then, SIGKILL 5 s later if it
# has not exited (stuck in a driver call, a signal handler), so the script itself ends within TOTAL_S
END=$((SECONDS + ${TOTAL_S:-540} - 10))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_info.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu_info.txt"
status=0
step() {  # step <seconds> <log name> <command...>: a time limit per step, so one slow step cannot eat the rest
    local limit=$1 log=$2 left=$((END - SECONDS)) rc; shift 2
    ((limit > left)) && limit=$left
    if ((limit < 15)); then echo "== $log: skipped (${left}s left)" | tee "$OUT/$log.log"; status=1; return; fi
    echo "== $log (limit ${limit}s): $*" | tee "$OUT/$log.log"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$log.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 124)); then echo "== $log: timed out after ${limit}s" | tee -a "$OUT/$log.log"; status=1
    elif ((rc)); then echo "== $log: failed (exit $rc)" | tee -a "$OUT/$log.log"; status=1; fi
}
# case_limit <step limit> <reserve> <cap>: seconds for each model case of the next step. A case cut by
# bench.py's --case_timeout keeps its training numbers (the driver records them); one cut by the step's
# `timeout` leaves nothing (the driver dies with it). So the case limit stays inside the step's limit (as
# cut to the time left), less <reserve> for the cases before it in the step.
case_limit() {
    local s=$((END - SECONDS)); ((s > $1)) && s=$1; s=$((s - $2)); ((s > $3)) && s=$3
    echo $((s > 5 ? s : 5))
}
MODELS="biformer_tiny,biformer_tiny[original algorithm],swin_tiny_patch4_window7_224,biformer_stl"
step 130 bench_models $PY benchmarks/bench.py --what models --dtypes bf16,fp32 --models "$MODELS" \
    --case_timeout "$(case_limit 130 5 60)" --json "$OUT/cuda_models.json"
step 150 bench_compiled $PY benchmarks/bench.py --what models --dtypes bf16 --models biformer_tiny --compile \
    --case_timeout "$(case_limit 150 30 150)" --json "$OUT/cuda_compiled.json"
# -v: each test's name is printed as it starts, so a step cut by its limit shows where; -s: the tests'
# printed errors and peak memory (what README quotes)
step 75 gpu_tests_attention $PY -m pytest -v -s -m gpu -p no:cacheprovider tests/test_attention.py
step 150 gpu_tests_models $PY -m pytest -v -s -m gpu -p no:cacheprovider tests/test_models.py
step 100 bench_flex_model $PY benchmarks/bench.py --what models --dtypes bf16 --models "biformer_tiny[flex]" \
    --case_timeout "$(case_limit 100 5 100)" --json "$OUT/cuda_flex_model.json"
step ${LAYER_S:-60} bench_layers $PY benchmarks/bench.py --what layers --quick --dtypes bf16 --only "${LAYERS:-}" \
    --json "$OUT/cuda_layers.json"
exit $status
