#!/usr/bin/env bash
# Check and time everything on a GPU machine in one go (target: under 10 minutes).
#
#   bash benchmarks/run_gpu.sh                    # on the GPU machine, from the repository root
#   STAGES="tests train" bash benchmarks/run_gpu.sh   # a subset of the stages, in that order
#   SMOKE=1 bash benchmarks/run_gpu.sh            # the same steps in smoke mode (CPU, seconds)
#
# Stages. The default, in this order: packages gputests train train_official ce ce_tiles
# ema head attn data summary: about 9 minutes on an H100 with 16 cores, from the stage times
# measured on 2026-11-22 (benchmarks/results/logs/; ce_tiles not yet run there, and `data`
# then swept 1-16 workers in 4.3 min: by default it now times all cores only). More, by name:
#   packages  install what lies under ./wheels into /tmp/site (no registry on the GPU
#             machines, ../shared/GPU.md; benchmarks/prepare_wheels.sh makes the pieces
#             on a connected machine): every *.whl below it, wheels split into
#             `NAME.whl.part-*` (parts may lie in different sub-folders) and unpacked-site
#             archives `*.tar.xz` (split the same way) are reassembled first;
#   gputests  the kernel tests and every gpu-marked test, on the GPU (correctness first);
#   train     the full step, reference vs fast, ViT-S/16 and ViT-B/16;
#   ce        centered CE kernels; ce_tiles  tilings of its forward;
#   ema       EMA / AdamW+EMA; head  masked head;
#   attn      attention backends, packed vs two-pass;
#   train_compile, train_official, train_variants   the full step: torch.compile of the
#             fast path; the reference with the math attention; fast-path options one by one
#             (VARIANTS="opts;opts": only those);
#   train_data   the fast step fed by the DALI pipeline (needs `packages` first);
#   train_large  ViT-L/16 at batch 64;  trace  the top kernels of each path (ViT-B/16);
#   memory    bench_memory's op-by-op count of the step's peak beside the allocator's
#             (MEMORY_MODELS, MEMORY_PATHS: a subset);
#   dalitests the DALI tests (CPU and GPU);
#   data      the data pipeline (DALI on the GPU vs the CPU pipeline);
#   pytest    the tests named in $PYTEST_ARGS;  gpumarked  the gpu-marked tests only;
#   tests     the whole test suite on this machine (the demo test excluded: see `demo`);
#   demo      the demo k-NN test;
#   summary   a short table of every result row.
# Rows land in $RESULTS (default /tmp/ibot_fast_results when the device tool sets OUT, else
# benchmarks/results) with the device name; with OUT set, everything is also packed into
# $OUT/results.tgz after every stage, so an interrupted run still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
RESULTS=${RESULTS:-${OUT:+/tmp/ibot_fast_results}}
RESULTS=${RESULTS:-benchmarks/results}
export IBOT_FAST_RESULTS=$RESULTS PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
LOG="$RESULTS/run_gpu.log"
SMOKE_FLAG=""
[ "${SMOKE:-0}" = "1" ] && SMOKE_FLAG="--smoke"
STAGES=${STAGES:-packages gputests train train_official ce ce_tiles ema head attn data summary}
step() { echo; echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C "$(dirname "$RESULTS")" \
  "$(basename "$RESULTS")" 2>/dev/null; return 0; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a source checkout that is not pip-installed: make kernels/ importable as ibot_fast.kernels
$PY -c "import ibot_fast.kernels" 2>/dev/null || ln -sfn ../kernels ibot_fast/kernels

reassemble() {  # every NAME.part-aa below wheels/ -> NAME, from its parts in any sub-folder
  local first name
  for first in $(find wheels -name '*.part-aa' 2>/dev/null); do
    name=$(basename "${first%.part-aa}")
    find wheels -name "$name.part-*" -printf '%f %p\n' | sort | cut -d' ' -f2- \
      | xargs cat > "/tmp/$name" && echo "reassembled /tmp/$name ($(du -h "/tmp/$name" | cut -f1))"
  done
}

pytest_run() {  # name, seconds, pytest args...: full log under $RESULTS, the tail here
  local name=$1 limit=$2; shift 2
  timeout "$limit" $PY -m pytest -q -p no:cacheprovider -rfE "$@" > "$RESULTS/pytest_$name.log" 2>&1
  local rc=$?
  tail -25 "$RESULTS/pytest_$name.log" | tee -a "$LOG"
  echo "pytest $name exit code $rc" | tee -a "$LOG"
}

bench() {  # seconds, module, args...: full log in $RESULTS/<stage>.log, the tail here
  local limit=$1 module=$2; shift 2
  timeout "$limit" $PY -m "benchmarks.$module" $SMOKE_FLAG "$@" >> "$RESULTS/$stage.log" 2>&1
  local rc=$?
  grep -v " INFO " "$RESULTS/$stage.log" | tail -30 | tee -a "$LOG"
  [ $rc -ne 0 ] && echo "$module exit code $rc (124: stopped at its ${limit}s limit)" | tee -a "$LOG"
  return 0
}

for stage in $STAGES; do
  case $stage in
  packages)
    step "packages"
    if [ -d wheels ]; then
      reassemble | tee -a "$LOG"
      for archive in /tmp/*.tar.xz $(find wheels -name '*.tar.xz'); do
        [ -e "$archive" ] || continue
        mkdir -p /tmp/site && tar xJf "$archive" -C /tmp/site && echo "unpacked $archive"
      done
      rm -f /tmp/site/nvidia/__init__.py  # keep `nvidia` a namespace shared with torch's libs
      whls=$( (find wheels -name '*.whl'; ls /tmp/*.whl 2>/dev/null) | sort -u)
      [ -n "$whls" ] && $PY -m pip install -q --no-index --no-deps --no-compile \
        --upgrade --target /tmp/site $whls 2>&1 | tail -2
    fi
    $PY - <<'PY' 2>&1 | tee -a "$LOG"
import os, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
      "cores", os.cpu_count())
for name in ("xformers", "xformers.ops", "nvidia.dali", "nvidia.dali.plugin.pytorch", "apex"):
    try:
        m = __import__(name, fromlist=["_"]); print(name, getattr(m, "__version__", "ok"))
    except Exception as e:
        print(name, "unavailable:", type(e).__name__, str(e)[:200])
PY
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit \
      --format=csv 2>&1 | tee -a "$LOG" ;;
  gputests)
    step "correctness: kernel tests and gpu-marked tests"
    pytest_run kernels "${KTESTS_LIMIT:-300}" --timeout=300 tests/test_kernel_centered_ce.py \
      tests/test_kernel_fused_head.py tests/test_kernel_masked_gather.py tests/test_kernel_ema.py tests/test_kernel_adamw_ema.py
    pytest_run gpu "${GTESTS_LIMIT:-300}" --timeout=300 -m gpu tests ;;
  train) step "full training step"; bench "${TRAIN_LIMIT:-300}" bench_train ${TRAIN_ARGS:-} ;;
  train_compile) step "full step: torch.compile of the fast path"
    bench "${COMPILE_LIMIT:-240}" bench_train --impls fast --compile --results-name train ;;
  train_official) step "full step: reference path with the math attention (official code's)"
    bench 90 bench_train --impls reference --reference-math --results-name train ;;
  train_variants) step "full step: fast-path options one at a time (ViT-B/16)"
    # VARIANTS="--layernorm-fp32 true;--checkpointing selective_mlp": only those
    variants=${VARIANTS:-"--efficient-drop-path false;--pack false;--fused-last-layer true;\
--fuse-ema true;--clip-mode global;--fuse-ema true --clip-mode global;--center2 all;\
--checkpointing selective;--checkpointing selective_mlp;--checkpointing full;\
--attention varlen;--layernorm-fp32 true"}
    IFS=';' read -ra options <<< "$variants"
    for opt in "${options[@]}"; do
      echo "-- $opt" | tee -a "$LOG"
      bench 60 bench_train --models vit_base --impls fast --steps 10 --no-phases $opt \
        --results-name train_variants
    done ;;
  memory) step "peak memory counted op by op vs the allocator's (bench_memory)"
    bench 230 bench_memory --models ${MEMORY_MODELS:-vit_small,vit_base} --batch 8,16 --paths \
      "${MEMORY_PATHS:-reference (math),reference (math) fp32 residual,reference (sdpa),fast,fast fp32 layernorm,fast selective,fast selective_mlp,fast full}" ;;
  train_data) step "full step fed by DALI (synthetic JPEGs decoded and augmented on the GPU)"
    bench 240 bench_train --impls fast --with-data --pipeline dali --workers 16 --no-phases \
      --results-name train_data ;;
  train_large) step "full step: ViT-L/16, batch 64"
    bench 150 bench_train --models vit_large --batch 64 --results-name train ;;
  trace) step "full step: the kernels with the most device time (ViT-B/16)"
    bench 120 bench_train --models vit_base --steps 5 --warmup 2 --no-phases --trace 25 \
      --results-name train_trace ;;
  dalitests) step "DALI tests (CPU and GPU)"
    pytest_run dali "${DALI_TESTS_LIMIT:-300}" --timeout=200 tests/test_dali.py ;;
  ce) step "centered CE kernels"; bench "${CE_LIMIT:-150}" bench_centered_ce --max-minutes 2 ;;
  ce_tiles) step "centered CE forward: tilings (_ce_blocks' GPU choice)"
    bench 90 bench_centered_ce --rows 50176,7500 --K 8192,65536 --methods triton --max-minutes 1 \
      --tiles 16x256x4,8x256x2,32x256x8,16x512x4,4x1024x8 ;;
  ema) step "EMA / AdamW+EMA"; bench 90 bench_ema ;;
  head) step "masked head"; bench 90 bench_masked_head ;;
  attn) step "attention"; bench 120 bench_attention ;;
  data) step "data pipeline"  # one row each at all cores; DATA_ARGS="" for the worker sweep
    bench "${DATA_LIMIT:-180}" bench_data ${DATA_ARGS---workers 64 --dali-workers 64} ;;
  pytest) step "pytest $PYTEST_ARGS"; pytest_run selected 300 --timeout=200 $PYTEST_ARGS ;;
  gpumarked) step "gpu-marked tests"; pytest_run gpu 200 --timeout=200 -m gpu tests ;;
  tests)
    step "the test suite"
    pytest_run suite "${SUITE_LIMIT:-900}" --timeout=300 --deselect tests/test_knn.py::test_demo_beats_random_init \
      tests ;;
  demo) step "demo k-NN test"; pytest_run demo 600 --timeout=500 -s \
      tests/test_knn.py::test_demo_beats_random_init ;;
  summary) step "summary"; $PY -m benchmarks.summary --results "$RESULTS" 2>&1 | tee -a "$LOG" ;;
  *) echo "unknown stage '$stage' (see the header of benchmarks/run_gpu.sh)"; exit 2 ;;
  esac
  pack
done
