#!/usr/bin/env bash
# The GPU run, the first thing to do in a session lent a GPU: correctness, then the
# headline table, in at most 8 minutes of device time on an H100, installs and compilation
# included.
#
#   IBOT_FAST_GIT=<sha> bash benchmarks/run_gpu.sh    # on the GPU machine, repository root
#   STAGES="table summary" bash benchmarks/run_gpu.sh  # stages by name, in that order
#   SMOKE=1 bash benchmarks/run_gpu.sh                 # the same plumbing on the CPU (minutes)
#
# (IBOT_FAST_GIT: the SHA to record where the copy has no .git, as on the lent machines.)
# The default (STAGES unset) is four stages; each step has a time limit (`timeout`, in
# seconds), and the limits add up to 465 s (7.75 min; the script's own start and checks
# take a few seconds more):
#   packages   40  DALI (and xformers) from ./wheels, when present (below): unpacked (20),
#                  pip-installed (10); versions printed (10). Expected ~5 s, ~20 s with
#                  DALI's three parts (one xz archive to unpack).
#   gputests  115  the kernel tests (80) and the gpu-marked tests (35), compiled on the GPU.
#                  Expected ~60-80 s and 10-20 s (H100: benchmarks/results/logs/h100_*.run_gpu.log,
#                  when there were 205 kernel tests; there are 285 now).
#   table     300  bench_train, one process per model: ViT-S/16 (140) then ViT-B/16 (160), the
#                  paper presets at batch 128, 2 x 224 + 10 x 96 crops, 3 warm-up and 15 timed
#                  steps per row. Rows: reference with the math attention (the official
#                  code's), reference with SDPA, the preset as a user gets it (compiled per
#                  block, fused AdamW + EMA), the same fed by DALI from 500 x 375 JPEGs on
#                  disk (made here once, ~5 s), the DINOv2-style preset. Without DALI that row
#                  says "DALI not installed" and a row of the CPU pipeline with 16 workers
#                  stands beside it. Expected per model (H100 logs): start-up ~10 s, an eager
#                  row ~7 s (build ~3 s, steps of 90-390 ms), the DALI row ~10 s (it should reuse
#                  the preset's compiled graphs), so ~45 s (ViT-S) and ~50 s (ViT-B) besides
#                  the two compilations (preset, DINOv2-style: 8 and 5 block graphs, forward
#                  and backward). Regional compilation is not yet timed on a GPU: this leaves
#                  it ~95 s (ViT-S) and ~110 s (ViT-B) for the two; each row records its own
#                  in startup_s (the table prints it) and graphs_compiled.
#   summary    10  the table of this run, printed last, and headline.md beside the rows (the
#                  same table in Markdown with date, device and git SHA, for the README).
# A stage that hits its limit keeps the rows it recorded; the table marks the others
# "not run". Other stages, by name:
#   train        bench_train on synthetic batches, every row with the per-phase breakdown
#                (TRAIN_ARGS adds arguments);
#   variants     the preset's options one at a time, each a row against it (ViT-B/16;
#                VARIANTS="k=v k=v;k=v": only those);
#   train_data   fed from disk: ImageFolder and webdataset shards, DALI and the CPU pipeline;
#   train_large  ViT-L/16 at batch 64;  trace  the top kernels of each row (ViT-B/16);
#   memory       bench_memory's op-by-op count of the step's peak beside the allocator's
#                (MEMORY_MODELS, MEMORY_PATHS: a subset);
#   dalitests    the DALI tests (CPU and GPU);  data  bench_data: DALI vs the CPU pipeline;
#   ce, ce_tiles the centred-CE kernels; tilings of its forward;  ema  EMA / AdamW+EMA;
#   head         masked head;  attn  attention backends, packed vs two-pass;
#   pytest       the tests named in $PYTEST_ARGS;  gpumarked  the gpu-marked tests only;
#   tests        the whole test suite on this machine (the demo test excluded);
#   demo         the demo k-NN test.
# Packages: there is no registry on the GPU machines (../shared/GPU.md);
# benchmarks/prepare_wheels.sh makes the pieces on a connected machine: every *.whl under
# ./wheels, wheels split into `NAME.whl.part-*` and unpacked-site archives `*.tar.xz` (split
# the same way, parts in any sub-folders) are reassembled and installed into /tmp/site.
# Rows land in $RESULTS (default /tmp/ibot_fast_results when the device tool sets OUT,
# benchmarks/results/smoke with SMOKE=1, else benchmarks/results) with the device name;
# with OUT set, everything is also packed into $OUT/results.tgz after every stage, so an
# interrupted run still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SMOKE=${SMOKE:-0}
RESULTS=${RESULTS:-${OUT:+/tmp/ibot_fast_results}}
[ "$SMOKE" = "1" ] && RESULTS=${RESULTS:-benchmarks/results/smoke}
RESULTS=${RESULTS:-benchmarks/results}
export IBOT_FAST_RESULTS=$RESULTS PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
LOG="$RESULTS/run_gpu.log"
SMOKE_FLAG=""
[ "$SMOKE" = "1" ] && SMOKE_FLAG="--smoke"
STAGES=${STAGES:-packages gputests table summary}
TABLE_PRESETS=${TABLE_PRESETS:-vit_small_16_paper vit_base_16_paper}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)-${IBOT_FAST_GIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}}
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
  # smoke: collect only (the selection exists and imports; the kernels need the GPU)
  [ "$SMOKE" = "1" ] && set -- --collect-only "$@"
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

limit_of() {  # a table stage's seconds for one preset
  case $1 in
  vit_small*) echo "${S_LIMIT:-140}" ;;
  vit_base*) echo "${B_LIMIT:-160}" ;;
  *) echo "${OTHER_LIMIT:-240}" ;;
  esac
}

has_dali() { $PY -c "import nvidia.dali" 2>/dev/null; }

for stage in $STAGES; do
  case $stage in
  packages)
    step "packages"
    if [ -d wheels ]; then
      reassemble | tee -a "$LOG"
      for archive in /tmp/*.tar.xz $(find wheels -name '*.tar.xz'); do
        [ -e "$archive" ] || continue
        mkdir -p /tmp/site && timeout 20 tar xJf "$archive" -C /tmp/site && echo "unpacked $archive"
      done
      rm -f /tmp/site/nvidia/__init__.py  # keep `nvidia` a namespace shared with torch's libs
      whls=$( (find wheels -name '*.whl'; ls /tmp/*.whl 2>/dev/null) | sort -u)
      [ -n "$whls" ] && timeout 10 $PY -m pip install -q --no-index --no-deps --no-compile \
        --upgrade --target /tmp/site $whls 2>&1 | tail -2
    fi
    timeout 10 $PY - <<'PY' 2>&1 | tee -a "$LOG"
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
    pytest_run kernels "${KTESTS_LIMIT:-80}" --timeout=60 tests/test_kernel_centered_ce.py \
      tests/test_kernel_fused_head.py tests/test_kernel_masked_gather.py tests/test_kernel_ema.py \
      tests/test_kernel_adamw_ema.py
    pytest_run gpu "${GTESTS_LIMIT:-35}" --timeout=30 -m gpu tests ;;
  table)
    step "headline table: reference (math / sdpa), the preset, fed by DALI, DINOv2-style (run $RUN_ID)"
    rows=() extra=()
    if ! has_dali; then  # the DALI row says so; the CPU pipeline's row stands beside it
      rows=(--rows reference_math,reference_sdpa,preset,dinov2style)
      extra=(--data-variant "data.pipeline=cpu data.num_workers=16")
    fi
    for preset in $TABLE_PRESETS; do
      bench "$(limit_of "$preset")" bench_train --preset "$preset" --with-data folder \
        --steps "${STEPS:-15}" --warmup "${WARMUP:-3}" --run-id "$RUN_ID" "${rows[@]}" \
        "${extra[@]}" ${TABLE_ARGS:-}
    done ;;
  train) step "full step on synthetic batches, with the per-phase breakdown"
    bench "${TRAIN_LIMIT:-300}" bench_train --phases all --run-id "$RUN_ID-train" ${TRAIN_ARGS:-} ;;
  variants) step "the preset's options one at a time (ViT-B/16)"
    variants=${VARIANTS:-"masks.sampler=stratified;loss.center2_from=masked;\
model.pack_crops=true;model.efficient_drop_path=true;model.layernorm_fp32=false;\
optim.fuse_ema=false;optim.clip_mode=global;loss.fused_last_layer=true;\
model.activation_checkpointing=selective;model.activation_checkpointing=selective_mlp;\
model.activation_checkpointing=full;model.pack_crops=true model.attention=varlen;\
train.cuda_graphs=true;model.pack_crops=true train.cuda_graphs=true;train.compile=false"}
    IFS=';' read -ra options <<< "$variants"
    args=()
    for opt in "${options[@]}"; do args+=(--variant "$opt"); done
    bench "${VARIANTS_LIMIT:-420}" bench_train --preset vit_base_16_paper --rows preset \
      --steps 10 --warmup 3 --phases none --run-id "$RUN_ID-variants" "${args[@]}" ;;
  train_data) step "full step fed from disk: ImageFolder and webdataset, DALI and CPU workers"
    bench "${TRAIN_DATA_LIMIT:-300}" bench_train --preset vit_small_16_paper --rows preset,data \
      --with-data folder,webdataset --data-variant "data.pipeline=cpu data.num_workers=16" \
      --phases none --run-id "$RUN_ID-data" ;;
  train_large) step "full step: ViT-L/16, batch 64"
    bench 240 bench_train --preset vit_large_16_paper --rows reference_sdpa,preset \
      --run-id "$RUN_ID-large" ;;
  trace) step "full step: the kernels with the most device time (ViT-B/16)"
    bench 180 bench_train --preset vit_base_16_paper --rows reference_sdpa,preset,dinov2style \
      --steps 5 --warmup 3 --phases none --trace 25 --run-id "$RUN_ID-trace" ;;
  memory) step "peak memory counted op by op vs the allocator's (bench_memory)"
    bench 230 bench_memory --models ${MEMORY_MODELS:-vit_small,vit_base} --batch 8,16 --paths \
      "${MEMORY_PATHS:-reference (math),reference (math) fp32 residual,reference (sdpa),fast,fast fp32 layernorm,fast selective,fast selective_mlp,fast full}" ;;
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
  summary) step "summary"
    which=()  # this run's table when it ran one, else the last run's
    [[ " $STAGES " == *" table "* ]] && which=(--run "$RUN_ID" --expect "${TABLE_PRESETS// /,}")
    timeout 10 $PY -m benchmarks.summary --results "$RESULTS" "${which[@]}" \
      --markdown "$RESULTS/headline.md" 2>&1 | tee -a "$LOG" ;;
  *) echo "unknown stage '$stage' (see the header of benchmarks/run_gpu.sh)"; exit 2 ;;
  esac
  pack
done
