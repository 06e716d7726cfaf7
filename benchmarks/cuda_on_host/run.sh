#!/usr/bin/env bash
# Runs csrc/cuda/local.cu's kernel on the host, without a GPU: the source compiled by g++ with
# the stand-in CUDA headers in fake/ (one block at a time, one std::thread per CUDA thread,
# __syncthreads as a std::barrier, the launch limited to 5 blocks so that the grid-stride loop
# runs), and its three ops checked against a direct float64 computation on random
# configurations (both layouts, float32 and bfloat16, partial tiles, several r chunks).
# It checks the kernel's logic (index math, pipelining, barriers), not its speed or the
# device's memory model. Needs g++ with C++20 and the Python environment with jax (FFI headers).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 - "$root/csrc/cuda/local.cu" "$work/local_emu.cc" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
launch = re.compile(r"local_gemm_kernel<T, Op><<<.*?>>>\((.*?)\);", re.S)
assert launch.search(src), "the kernel launch in local.cu changed: update run.sh"
src = launch.sub(lambda m: "emu_launch(EMU_BLOCKS(blocks), kThreads, [&] { local_gemm_kernel<T, Op>("
                 + m.group(1) + "); });", src)
open(sys.argv[2], "w").write(src)
PY
include="$(python3 -c 'import jax.ffi; print(jax.ffi.include_dir())')"
g++ -std=c++20 -O1 -pthread -I "$here/fake" -I "$work" -I "$root/csrc/common" -I "$root/csrc/cpu" \
  -isystem "$include" "$here/local_harness.cc" -o "$work/local_harness"
"$work/local_harness"
