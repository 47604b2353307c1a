#!/usr/bin/env bash
# The GPU parts of the open work, on the GPU machine, from the project root, each under `timeout`,
# each logging to LOGDIR/<part>.log; LOGDIR/summary.txt gets one line per part (exit status and
# seconds).  A part that fails does not stop the next.
#
#   bash bench/run_gpu.sh LOGDIR PART...
#
# Parts (in the order given):
#   build   fsagen build --arch sm90 --grid bench/grids/layer_gpu.toml (the layer's kernels)
#   smoke   bench/bench_layer.py --smoke            -> LOGDIR/smoke/layer_bench.{md,csv,png}
#   bench   bench/bench_layer.py (N 8K..64K, G 1 4 16) -> LOGDIR/results/layer_bench.{md,csv,png}
#   llama   examples/llama_nsa.py                   -> LOGDIR/llama_nsa.md
#   ddp1    examples/ddp_train.py, world size 1     -> LOGDIR/ddp_world1.md
#   ddp2    torchrun --nproc_per_node 2 examples/ddp_train.py (needs 2 GPUs) -> LOGDIR/ddp_world2.md
#   recall_nsa / recall_dense  examples/train_recall.py, easier setting, 4000 steps, with the NSA layer
#           and with its dense-attention control -> LOGDIR/recall_*/loss.{csv,png}
#   prebuild  bench/prebuild_gpu_tests.py: compile newtests' artifacts on 16 cores (run it first)
#   sweep_qu  bench/sweep.py of bench/variants/q_outer_union.toml (q_tokens), G 8 16 -> LOGDIR/sweep_*.md
#   slctests  every slc GPU test (tests/gpu/test_slc_gpu.py: the whole grid in both loop orders, special
#           cases, opcheck, torch.compile, CUDA-graph capture) -> LOGDIR/gpu_errors.log
#   newtests  the GPU tests of the knobs and kernels not yet run on a GPU: q_outer forward over the
#           union of several tokens' blocks (q_tokens) -> LOGDIR/gpu_errors.log
#           (earlier ones, all passed: gated sum, dense dK/dV gather_async, query chunks, async gather)
#   alltests  every GPU test but the sm80 PTX one (tests/gpu: every family, the default grid in all loop
#           orders) -> LOGDIR/gpu_errors.log; building ahead compiles the whole default grid, all orders
#   slcbench bench/bench_slc.py (issue 2's table: both orders, SDPA, G 1..16) -> LOGDIR/slcbench/slc_bench.{md,csv,png}
#   scaling  bench/bench_slc_scaling.py (N 8K..128K eager and CUDA-graph replays, mixed batch) -> LOGDIR/scaling/
#   hostops  bench/count_host_ops.py --device cuda (top-level aten ops and host reads per call) -> LOGDIR/host_ops_cuda.md
#   profile  bench/profile_slc.py (G 1 4 16): GPU time per generated stage and per glue op -> LOGDIR/slc_profile_kernels.md
#   sweep_dense / sweep_q / sweep_kv / sweep_kvbwd  bench/sweep.py of bench/variants/{dense_dkdv,
#           q_outer_occupancy, kv_outer_occupancy, kv_bwd}.toml (build on 16 cores, check, time)
#           -> LOGDIR/sweep_*.md
#
# Needs .gpu/ set up as ../shared/gpu/README.md says (TileLang bundle + env.sh), and for `llama`,
# when the machine has no transformers, .gpu/transformers-py312.tar.xz from bench/hf_bundle.sh.
# Each part fits a 600 s device call on its own; e.g. with the device tool, carrying .gpu:
#   bash bench/run_gpu.sh $OUT build smoke llama ddp1      (H100)
#   bash bench/run_gpu.sh $OUT bench                       (H100, same warm machine: kernels built)
#   bash bench/run_gpu.sh $OUT build ddp2                  (nvidia-h200-x2)
#
# Compile ahead on the CPU machine (device time is scarce; compiling there costs nothing):
#   FSAGEN_BUILD_ONLY=1 FSAGEN_CACHE_DIR=/tmp/pre bash bench/run_gpu.sh /tmp/prelog build newtests sweep_kv
#   tar -C /tmp/pre -cJf .gpu/prebuilt.tar.xz sm90     # a few MB; carry .gpu
# compiles every artifact those parts load (GPU-only parts are skipped), and on the GPU machine
#   FSAGEN_PREBUILT=.gpu/prebuilt.tar.xz bash bench/run_gpu.sh $OUT build newtests sweep_kv
# unpacks them into the user cache first, so the parts load instead of compiling.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,38p' "$0"; exit 2
fi
log=$1; shift
mkdir -p "$log"; log=$(cd "$log" && pwd)
BUILD_ONLY=${FSAGEN_BUILD_ONLY:-0}
if [ "$BUILD_ONLY" = 1 ]; then
  jobs=$(nproc)
  [ -n "${FSAGEN_CACHE_DIR:-}" ] || { echo "FSAGEN_BUILD_ONLY=1 needs FSAGEN_CACHE_DIR (the folder to pack)"; exit 2; }
else
  jobs=16
  # shellcheck disable=SC1091
  source .gpu/env.sh || { echo "source .gpu/env.sh failed (see ../shared/gpu/README.md)" | tee -a "$log/summary.txt"; exit 1; }
  if [ -n "${FSAGEN_PREBUILT:-}" ]; then
    export FSAGEN_CACHE_DIR=${FSAGEN_CACHE_DIR:-/tmp/fsagen-prebuilt}
    mkdir -p "$FSAGEN_CACHE_DIR" && tar -C "$FSAGEN_CACHE_DIR" -xJf "$FSAGEN_PREBUILT" \
      && echo "prebuilt: $(ls "$FSAGEN_CACHE_DIR"/sm90 | wc -l) artifacts in $FSAGEN_CACHE_DIR" | tee -a "$log/summary.txt"
  fi
fi
PREBUILD_GROUPS=(token_tiles)  # bench/prebuild_gpu_tests.py groups of the newtests part
sweep_flags=(--jobs "$jobs"); [ "$BUILD_ONLY" = 1 ] && sweep_flags+=(--build-only)
# where `build` writes: the repo's generated/ on the GPU machine, the folder to pack when building ahead
# (and with FSAGEN_PREBUILT, that same folder: the packed artifacts are then up to date)
build_out=(); [ "$BUILD_ONLY" = 1 ] || [ -n "${FSAGEN_PREBUILT:-}" ] && build_out=(--out "$FSAGEN_CACHE_DIR")
export FSAGEN_GPU_LOG=${FSAGEN_GPU_LOG:-$log/gpu_errors.log}

hf_path() {  # transformers from the bundle, behind the machine's own packages, unless it has its own
  python3 -c "import transformers" 2>/dev/null && return 0
  if [ ! -d /tmp/site-hf312/transformers ]; then
    [ -f .gpu/transformers-py312.tar.xz ] || { echo "no transformers: build .gpu/transformers-py312.tar.xz with bench/hf_bundle.sh"; return 1; }
    tar -C /tmp -xJf .gpu/transformers-py312.tar.xz || return 1
  fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site-hf312
  python3 -c "import transformers; print('transformers', transformers.__version__, 'from', transformers.__file__)"
}

run_part() {  # NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  [ "$BUILD_ONLY" = 1 ] && secs=7200  # compiling on a few CPU cores takes longer than a device call
  local t0=$SECONDS
  echo "== $name: $*" | tee "$log/$name.log"
  timeout --kill-after=10 "$secs" "$@" >>"$log/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$log/$name.log"
  local what="ok"; [ $rc -eq 124 ] && what="TIMEOUT after ${secs}s"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED"
  printf '%-6s rc=%-3s %5ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$what" | tee -a "$log/summary.txt"
}

for part in "$@"; do
  if [ "$BUILD_ONLY" = 1 ]; then
    case $part in
      build|prebuild|sweep_*|slctests|alltests) ;;
      slcbench|scaling) part=slctests ;;
      hostops) part=alltests ;;  # the default grid's specs  # the bench loads the slc grid's D = 128 bf16 artifacts
      newtests) part=prebuild ;;  # the tests' artifacts are exactly what prebuild compiles
      *) echo "$part: needs the GPU, skipped (FSAGEN_BUILD_ONLY=1)" | tee -a "$log/summary.txt"; continue ;;
    esac
  fi
  case $part in
    build) run_part build 540 python3 -m fsagen.cli build --arch sm90 --grid bench/grids/layer_gpu.toml --jobs "$jobs" \
             "${build_out[@]}" ;;
    smoke) run_part smoke 300 python3 bench/bench_layer.py --smoke --out "$log/smoke" ;;
    bench) run_part bench 590 python3 bench/bench_layer.py --out "$log/results" ;;
    llama) if hf_path >"$log/llama_env.log" 2>&1; then
             run_part llama 400 python3 examples/llama_nsa.py --out "$log/llama_nsa.md"
           else
             cat "$log/llama_env.log"; echo "llama  rc=-   no transformers on this machine" | tee -a "$log/summary.txt"
           fi ;;
    ddp1)  run_part ddp1 400 python3 examples/ddp_train.py --out "$log/ddp_world1.md" ;;
    ddp2)  run_part ddp2 500 python3 -m torch.distributed.run --standalone --nproc_per_node 2 examples/ddp_train.py \
             --out "$log/ddp_world2.md" ;;
    prebuild) run_part prebuild 500 python3 bench/prebuild_gpu_tests.py --jobs "$jobs" --group "${PREBUILD_GROUPS[@]}" ;;
    recall_nsa|recall_dense)  # the easier recall setting (bench/results/train_recall.md), NSA and its dense control
           run_part "$part" 560 python3 examples/train_recall.py --attention "${part#recall_}" --pairs 16 --queries 16 \
             --keys 64 --values 64 --lr 3e-3 --steps 4000 --log-every 200 --out "$log/$part" ;;
    slctests) if [ "$BUILD_ONLY" = 1 ]; then  # test_grid's artifacts: the default grid's slc specs, both orders
               run_part slctests 0 python3 -m fsagen.cli build --arch sm90 --branch slc --loop-orders all \
                 --jobs "$jobs" "${build_out[@]}"
             else
               run_part slctests 560 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_slc_gpu.py
             fi ;;
    newtests) run_part newtests 500 python3 -m pytest -q -m gpu -p no:cacheprovider \
             "tests/gpu/test_slc_gpu.py::test_q_outer_token_tiles" ;;
    alltests) if [ "$BUILD_ONLY" = 1 ]; then
               run_part alltests 0 python3 -m fsagen.cli build --arch sm90 --loop-orders all --jobs "$jobs" "${build_out[@]}"
             else
               run_part alltests 580 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_sm80_ptx.py
             fi ;;
    slcbench) run_part slcbench 590 python3 bench/bench_slc.py --out "$log/slcbench" ;;
    scaling) run_part scaling 590 python3 bench/bench_slc_scaling.py --out "$log/scaling" ;;
    hostops) run_part hostops 300 python3 bench/count_host_ops.py --device cuda --out "$log/host_ops_cuda.md" ;;
    profile) run_part profile 300 python3 bench/profile_slc.py --groups 1 4 16 --out "$log" ;;
    sweep_dense) run_part sweep_dense 560 python3 bench/sweep.py bench/variants/dense_dkdv.toml --groups 1 4 16 \
             "${sweep_flags[@]}" --out "$log" ;;
    sweep_q) run_part sweep_q 400 python3 bench/sweep.py bench/variants/q_outer_occupancy.toml --groups 8 16 \
             "${sweep_flags[@]}" --out "$log" ;;
    sweep_qu) run_part sweep_qu 500 python3 bench/sweep.py bench/variants/q_outer_union.toml --groups 8 16 \
             "${sweep_flags[@]}" --out "$log" ;;
    sweep_kv) run_part sweep_kv 560 python3 bench/sweep.py bench/variants/kv_outer_occupancy.toml --groups 1 4 8 16 \
             "${sweep_flags[@]}" --out "$log" ;;
    sweep_kvbwd) run_part sweep_kvbwd 560 python3 bench/sweep.py bench/variants/kv_bwd.toml --groups 1 4 8 16 \
             "${sweep_flags[@]}" --out "$log" ;;
    *) echo "unknown part $part (build smoke bench llama ddp1 ddp2 recall_nsa recall_dense prebuild slctests newtests alltests slcbench scaling hostops profile sweep_dense" \
         "sweep_q sweep_qu sweep_kv sweep_kvbwd)" \
         | tee -a "$log/summary.txt" ;;
  esac
done
echo "== summary ($log/summary.txt)"; cat "$log/summary.txt"
