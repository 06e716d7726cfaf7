#!/usr/bin/env bash
# One command on the GPU machine, from the repository root: build in place (no network, reusing
# build/ in the tree), run the whole test suite on the GPU, compute-sanitizer over a small subset,
# and the benchmark table last. Stages can be picked: gpu_check.sh build test sanitize bench
# (default: all, in that order), plus `profile` (Nsight Compute over benchmark rows, not in the
# default). Logs go to $OUT (or ./gpu_check_out). Environment: PYTEST_K (a -k expression),
# PYTEST_PATHS (test files, relative to tests/; default all), PYTEST_ARGS, BENCH_ARGS,
# PROFILE_ROWS, PROFILE_KERNELS, PROFILE_LAUNCHES (kernels per row: the FFT path launches 4 per
# op), SANITIZE_TOOLS, SANITIZE_KERNELS, JAX_CONVNET_GPU_FUZZ_CONFIGS (tests/test_gpu_fuzz.py)
# and per-stage *_TIMEOUT_S.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}; mkdir -p "$OUT"
stages=${*:-build test sanitize bench}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
step() { echo "=== $1 ($(date +%T))"; }

for stage in $stages; do
case $stage in
build)
  step build
  export JAX_CONVNET_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a ${CMAKE_ARGS:-}"
  # The conv ops compile as separate translation units: in parallel under any generator.
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  python3 -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  python3 -P -c "import jax, jax_convnet as j; print(jax.__version__, jax.devices(), 'cuda module:', j.has_native('cuda'))"
  ;;
test)
  step "tests (log: $OUT/pytest.log)"
  # From tests/ so that the installed package, not the source tree, is imported. One line per
  # test in the log and no stop at the first failure: a run cut by its timeout still shows which
  # tests ran and how they ended. With pytest-xdist (on the GPU machine's image), TEST_WORKERS
  # processes share the GPU: the suite's time is mostly XLA compilation, which runs on the CPUs.
  # --dist loadgroup: tests marked with one xdist_group run in one worker, one after another
  # (test_gpu_large.py's cases, each of which takes up to about half of the GPU's memory).
  workers=""
  if python3 -c "import xdist" 2>/dev/null; then
    workers="-n ${TEST_WORKERS:-4}"
    python3 -c "from xdist.scheduler import LoadGroupScheduling" 2>/dev/null \
      && workers+=" --dist loadgroup"
  fi
  (cd tests && timeout ${TEST_TIMEOUT_S:-540} python3 -m pytest -v --maxfail=20 --durations=15 \
     -p no:cacheprovider $workers ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} ${PYTEST_PATHS:-.} \
     >"$OUT/pytest.log" 2>&1); rc=$?
  grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
  [ $rc -eq 0 ] || { grep -E "^(FAILED|ERROR)|^E " "$OUT/pytest.log" | head -30; status=1; }
  ;;
sanitize)
  # compute-sanitizer over benchmarks/sanitize_subset.py (every kernel path at tiny shapes), the
  # tools one after another (run in parallel, initcheck crashed during XLA's compilation and
  # racecheck ran out of time: benchmarks/history/2026-12-02_session12_gpu_check.md).
  # memcheck and initcheck run on JAX's platform allocator: every buffer its own cudaMalloc, so
  # an access past a buffer, or a read of a buffer (a workspace) that nothing wrote since its
  # allocation, is seen instead of landing in XLA's memory pool.
  # initcheck: every kernel instrumented (a kernel it does not instrument writes memory it
  # cannot see, whose reads it would then report), cudaMemcpy / cudaMemset not checked (XLA's
  # own copies; --check-api-memory-access no), unused-memory tracking off (its default: the
  # option takes no value, so never write `--track-unused-memory no`). SANITIZE_KERNELS: a regex
  # on mangled kernel names limiting memcheck and racecheck to those kernels (ours are all
  # named *_kernel: SANITIZE_KERNELS=_kernel skips XLA's fusions); empty (default): all.
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
    step "compute-sanitizer $tool (log: $OUT/sanitize_$tool.log)"
    args=(--tool "$tool" --error-exitcode 17)
    alloc=platform
    case $tool in
      initcheck) args+=(--check-api-memory-access no);;
      racecheck) alloc=;;
    esac
    if [ -n "${SANITIZE_KERNELS:-}" ] && [ "$tool" != initcheck ]; then
      args+=(--kernel-name "regex=$SANITIZE_KERNELS")
    fi
    env ${alloc:+XLA_PYTHON_CLIENT_ALLOCATOR=$alloc} timeout ${SANITIZE_TIMEOUT_S:-240} \
      compute-sanitizer "${args[@]}" python3 -P benchmarks/sanitize_subset.py \
      >"$OUT/sanitize_$tool.log" 2>&1; rc=$?
    echo "--- $tool: exit $rc ($(date +%T))"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|subset ok" "$OUT/sanitize_$tool.log" | tail -3
    [ $rc -eq 0 ] || { tail -30 "$OUT/sanitize_$tool.log"; status=1; }
  done
  ;;
bench)
  step benchmark
  # --quick keeps the whole script under 10 minutes; BENCH_ARGS="" runs every row (~5 minutes).
  timeout ${BENCH_TIMEOUT_S:-300} python3 -P -m jax_convnet.benchmark --out "$OUT" \
    ${BENCH_ARGS---quick} \
    2>"$OUT/bench.err" | tee "$OUT/bench.log" | tail -${BENCH_TAIL:-80} || status=1
  ;;
profile)
  # One ncu report per row: the second call of the row's op (the first compiles and warms up),
  # its first PROFILE_LAUNCHES kernels matching PROFILE_KERNELS; the sections say where the time
  # goes.
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  # Why warps wait: cycles stalled per issued instruction, by reason (the sections give totals).
  stalls=sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
  for r in barrier long_scoreboard short_scoreboard mio_throttle math_pipe_throttle wait \
           not_selected dispatch_stall lg_throttle no_instruction; do
    stalls+=,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio
  done
  for row in ${PROFILE_ROWS:-conv/L2/fprop/bf16/NHWC conv/L2/bprop_data/bf16/NHWC}; do
    step "ncu $row (log: $OUT/profile.txt)"
    echo "=== $row" >>"$OUT/profile.txt"
    launches=${PROFILE_LAUNCHES:-1}
    timeout ${PROFILE_TIMEOUT_S:-120} "$ncu" \
      --kernel-name "${PROFILE_KERNELS:-regex:conv_(gemm|mma|wgmma)|max_pool|fft_|cgemm_}" \
      --launch-skip $launches --launch-count $launches --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --metrics "$stalls" \
      python3 -P benchmarks/profile_rows.py "$row" \
      >>"$OUT/profile.txt" 2>&1 || { tail -20 "$OUT/profile.txt"; status=1; }
    grep -E "Duration|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|issue_stalled|pipe_tensor" \
      "$OUT/profile.txt" | tail -$((15 * launches))
  done
  ;;
*) echo "unknown stage $stage (build test sanitize bench profile)"; exit 2;;
esac
done
exit $status
