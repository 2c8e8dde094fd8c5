#!/usr/bin/env bash
# Check and time everything on a GPU machine in one go (target: under 10 minutes).
#
#   bash benchmarks/run_gpu.sh            # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/run_gpu.sh    # the same steps in smoke mode (CPU, seconds)
#
# 1. packages: wheels found in ./wheels (xformers, DALI parts `*.whl.part-*`) are installed
#    with --no-index --no-deps into /tmp/site (see ../shared/GPU.md: no registry there);
# 2. correctness first: every kernel test and the gpu-marked tests, on the GPU;
# 3. timings: kernels (centered CE, gather/EMA/AdamW+EMA), masked head, attention, the
#    full step (reference vs fast, ViT-S/16 and ViT-B/16), the data pipeline;
# 4. a short table last. Rows land in $RESULTS (default $OUT/results when the device tool
#    sets OUT, else benchmarks/results) with the device name; commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-${OUT:+$OUT/results}}
RESULTS=${RESULTS:-benchmarks/results}
export IBOT_FAST_RESULTS=$RESULTS
mkdir -p "$RESULTS"
LOG="$RESULTS/run_gpu.log"
SMOKE_FLAG=""
[ "${SMOKE:-0}" = "1" ] && SMOKE_FLAG="--smoke"
step() { echo; echo "=== $* ($(date +%T))" | tee -a "$LOG"; }

step "packages"
if [ -d wheels ]; then
  for first in wheels/*.whl.part-aa; do
    [ -e "$first" ] || continue
    whl="${first%.part-aa}"; cat "$whl".part-* > "$whl" && echo "reassembled $whl"
  done
  ls wheels/*.whl >/dev/null 2>&1 && \
    python -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a source checkout that is not pip-installed: make kernels/ importable as ibot_fast.kernels
python -c "import ibot_fast.kernels" 2>/dev/null || ln -sfn ../kernels ibot_fast/kernels
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for name in ("xformers", "nvidia.dali", "apex"):
    try:
        m = __import__(name, fromlist=["_"]); print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "unavailable:", type(e).__name__)
PY

step "correctness: kernel tests and gpu-marked tests"
python -m pytest -q -p no:cacheprovider tests/test_kernel_centered_ce.py \
  tests/test_kernel_masked_gather.py tests/test_kernel_ema.py tests/test_kernel_adamw_ema.py \
  2>&1 | tail -5 | tee -a "$LOG"
python -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 | tee -a "$LOG"

step "centered CE kernels"
timeout 150 python -m benchmarks.bench_centered_ce $SMOKE_FLAG 2>&1 | tail -25 | tee -a "$LOG"
step "EMA / AdamW+EMA"
timeout 60 python -m benchmarks.bench_ema $SMOKE_FLAG 2>&1 | tail -20 | tee -a "$LOG"
step "masked head"
timeout 60 python -m benchmarks.bench_masked_head $SMOKE_FLAG 2>&1 | tail -14 | tee -a "$LOG"
step "attention"
timeout 90 python -m benchmarks.bench_attention $SMOKE_FLAG 2>&1 | tail -24 | tee -a "$LOG"
step "full training step"
timeout 200 python -m benchmarks.bench_train $SMOKE_FLAG 2>&1 | tail -12 | tee -a "$LOG"
step "data pipeline"
timeout 180 python -m benchmarks.bench_data $SMOKE_FLAG 2>&1 | tail -12 | tee -a "$LOG"

step "summary"
python -m benchmarks.summary --results "$RESULTS" 2>&1 | tee -a "$LOG"
