#!/usr/bin/env bash
# GPU checks in one short go (about 8-11 minutes on one GPU). Without CUDA it prints why and exits 0.
#
#   bash bench/gpu_check.sh                 # from the repository root or anywhere
#   PORT_DIR=/path/to/port bash bench/gpu_check.sh   # also time the HF port network on the GPU
#
# 1. parity: the detector on CUDA vs the golden data and vs CPU, batch invariance, bf16 head agreement
#    (tests/test_detector_gpu.py; needs the golden folder: ../shared/golden or $LXMERT_PL_SHARED/golden); the matcher
#    on CUDA vs the golden data (fused QKV, SDPA), compile + CUDA graphs vs eager (tests/test_matcher_gpu.py);
# 2. RoIMaxPool vs torchvision's CUDA roi_pool (bench/roi_pool_speed.py: speed, bit-identity);
#    detector img/s at full size (600x800), batch 1 and 8, fp32 and bf16 (bench/extract_speed.py --device cuda);
# 3. the matcher on cuda against transformers' LxmertModel + matching head, fp32 and bf16 (bench/model_throughput.py:
#    eager, then with model.compile = torch.compile + CUDA graphs, whose first-call compile time it prints; the
#    logit check runs the CUDA paths: fused QKV, SDPA's flash / memory-efficient kernels), bf16 agreement
#    (bench/bf16_speed.py).
# Every step has its own time limit; a failing step is reported and the others still run. Logs go to $OUT (the
# device runner's output folder) or outputs/gpu_check.
set -u
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch: skipped (nothing was run)"
    exit 0
fi
LOGS="${OUT:-outputs/gpu_check}"
mkdir -p "$LOGS"
python -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$LOGS/device.txt"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv >> "$LOGS/device.txt" 2>/dev/null || true

failed=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    if timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1; then
        echo "   ok in $((SECONDS - start))s"
    else
        echo "   FAILED (exit $?) after $((SECONDS - start))s"
        failed+=("$name")
    fi
    grep -v -i "warning" "$LOGS/$name.txt" | tail -n 25
}

step parity 240 python -m pytest -q -rs tests/test_detector_gpu.py tests/test_detector_speed.py tests/test_matcher_gpu.py
step roi_pool 60 python bench/roi_pool_speed.py --device cuda
port_args=()
if [ -n "${PORT_DIR:-}" ]; then port_args=(--port-dir "$PORT_DIR"); fi
step detector_speed 300 python bench/extract_speed.py --device cuda --rounds 3 --batch-sizes 1 8 \
    --weights-dir "$LOGS/frcnn_full_random" "${port_args[@]}"
step matcher_speed 150 python bench/model_throughput.py --device cuda --rounds 10
step matcher_speed_compiled 300 python bench/model_throughput.py --device cuda --rounds 10 --compile
step bf16_speed 180 python bench/bf16_speed.py --device cuda --repeats 5

if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed; logs in $LOGS"
else
    echo "gpu_check: FAILED steps: ${failed[*]}; logs in $LOGS"
    exit 1
fi
