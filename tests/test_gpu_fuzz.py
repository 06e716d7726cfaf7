"""Seeded differential fuzzing of the CUDA kernels: test_fuzz.py's configurations, drawn also at
the sizes that reach every kernel path, run on the GPU and checked against a CPU oracle; every GPU
result computed twice and compared bit for bit. Skipped without a GPU.

Each conv-family configuration (forward, VJP in both operands, JVP, vmap, the public image_acts /
weight_acts; test_fuzz.conv_program) is checked against the pure-lax reference in float64 on the
CPU: float32 at precision "highest" to float32's accuracy, float32 at precision "default" (TF32)
to bfloat16's bound, bfloat16 / float16 to theirs. Each max_pool configuration (value, JVP, VJP,
vmap; test_fuzz.pool_program) must equal the CPU kernels bit for bit (test_gpu.py's rule), and
every POOL_REFERENCE_EVERY-th also the reference (test_fuzz.check_pool_results) where its window
has at most 64 elements (the reference's compile time grows with the window).

Size classes (CONV_CLASSES, POOL_CLASSES), so that each path of csrc/cuda/conv_launch.cuh's plan
and of pool.cu gets random shapes: test_fuzz's small sizes (generic FFMA / wmma kernels, scalar
loads), contiguous dimensions in multiples of 16 bytes (cp.async / mma.sync with every tile width,
wgmma into 192 / 384 filters), the Hopper TMA kernels' shapes (16-bit or TF32, channels filling
3/4 of 128-byte k-blocks, >= 64 filters, C01B batches of 64+), few-channel first layers with large
filters (image_acts through columns or the direct kernel, weight_acts' padded copy), stride-1
large filters (the FFT path); pools with vector-friendly inner sizes and windows past 256
elements (int32 winners).

Compilation dominates (every configuration has new shapes): each test takes a chunk of CHUNK
configurations and compiles them (and runs the CPU oracle) in a pool of threads, XLA compiling
without the GIL, while the main thread runs the GPU; pytest-xdist spreads the chunks over
processes. A chunk reports all its failing configurations at once, each by index and config.

Environment: JAX_CONVNET_GPU_FUZZ_CONFIGS (default 500) configurations in all, 70% conv family,
30% max_pool; JAX_CONVNET_FUZZ_SEED (default 0, shared with test_fuzz.py, whose configurations
these are not); JAX_CONVNET_GPU_FUZZ_THREADS (default min(8, CPUs)) compiling threads per test;
JAX_CONVNET_GPU_FUZZ_ON_CPU=1 runs the whole suite with the CPU kernels standing in for the
GPU's (to debug the suite itself on a machine without a GPU).
"""
import math
import os
import traceback
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from jax_convnet import reference as ref
from conftest import TOLERANCE, cpu, exact
from test_fuzz import (SEED, check_conv_results, check_pool_results, conv_config, conv_operands,
                       conv_program, pool_config, pool_operands, pool_program)

CONFIGS = int(os.environ.get("JAX_CONVNET_GPU_FUZZ_CONFIGS", "500"))
CONV_CONFIGS = math.ceil(CONFIGS * 0.7)
POOL_CONFIGS = CONFIGS - CONV_CONFIGS
CHUNK = 25
THREADS = int(os.environ.get("JAX_CONVNET_GPU_FUZZ_THREADS", str(min(8, os.cpu_count() or 1))))
ON_CPU = os.environ.get("JAX_CONVNET_GPU_FUZZ_ON_CPU") == "1"
POOL_REFERENCE_EVERY = 10
GPU_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
HALF_DTYPES = [jnp.bfloat16, jnp.float16]

pytestmark = [] if ON_CPU else [pytest.mark.gpu]


def device_under_test():
    return jax.devices("cpu" if ON_CPU else "gpu")[0]


def _choice(rng, values):
    return int(values[int(rng.integers(len(values)))])


# ----------------------------------------------------------------------------- conv family
# Each class: (weight, sizes(rng, layout) -> (n, c, f, h, w, filter sides), dtypes, max stride).
# Sizes are kept small enough for the float64 reference on the CPU (about a second at most).

def _tensor_core_sizes(rng, layout):
    """Batch, channels and filters mostly multiples of 8: 16-byte rows for cp.async / mma.sync
    (tiles 32 / 64 / 96 / 128 wide, the k table of C01B images), wgmma into 192 / 384 filters
    (16-bit types where the TMA kernels do not take it, TF32), wmma elsewhere."""
    n = _choice(rng, [8, 16]) if rng.random() < 0.7 else int(rng.integers(1, 20))
    c = 8 * int(rng.integers(1, 6)) if rng.random() < 0.7 else int(rng.integers(1, 45))
    f = (_choice(rng, [16, 24, 32, 40, 64, 96, 128, 136, 192, 192, 384]) if rng.random() < 0.8
         else int(rng.integers(9, 200)))
    if f >= 192:  # (the reference's time)
        c = min(c, 24)
    h, w = (int(v) for v in rng.integers(3, 13, 2))
    return n, c, f, h, w, (1, 5)


# Channel counts that are multiples of 8 filling at least 3/4 of their 64-channel blocks, as
# conv_launch.cuh's tma_can_read requires of the images (filter_acts, weight_acts) and of the
# hidden tensor (image_acts at stride 1, whose input channels are the filters).
TMA_CHANNELS = [48, 56, 64, 96, 104, 112, 120, 128]


def _tma_sizes(rng, layout):
    """Hopper's TMA kernels (16-bit types; float32 as TF32, through k-contiguous copies of the
    operands where the layout needs them): channels from TMA_CHANNELS, 64 or more filters
    (mostly from TMA_CHANNELS too, else any multiple of 8), C01B batches of 64 or 72 images
    (vmap doubles them)."""
    if layout == "C01B":
        n, hw_max = _choice(rng, [64, 72]), 6
        c = _choice(rng, [48, 56, 64, 64])
    else:
        n, hw_max = int(rng.integers(1, 9)), 12
        c = _choice(rng, TMA_CHANNELS)
    f = _choice(rng, [64, 96, 128, 192]) if rng.random() < 0.8 else 8 * int(rng.integers(8, 20))
    h, w = (int(v) for v in rng.integers(2, hw_max + 1, 2))
    return n, c, f, h, w, (1, 3)


def _few_channel_sizes(rng, layout):
    """First layers: 1-4 channels and filters up to 11 x 11 (image_acts through float32 columns
    where channels * fh * fw >= 64, else the direct kernel; NHWC weight_acts copies the images
    padded to 4 channels; float32 NHWC images read a float at a time)."""
    n = _choice(rng, [8, 16]) if rng.random() < 0.5 else int(rng.integers(1, 12))
    c = int(rng.integers(1, 5))
    f = _choice(rng, [8, 16, 24, 40]) if rng.random() < 0.6 else int(rng.integers(1, 41))
    h, w = (int(v) for v in rng.integers(8, 25, 2))
    return n, c, f, h, w, (3, 11)


def _fft_sizes(rng, layout):
    """Stride 1 and large filters: the FFT path at float32 accuracy or TF32."""
    n, c, f = int(rng.integers(1, 7)), int(rng.integers(1, 13)), int(rng.integers(1, 25))
    h, w = (int(v) for v in rng.integers(10, 31, 2))
    return n, c, f, h, w, (5, 13)


def _fft16_sizes(rng, layout):
    """Stride 1 and very large filters: the FFT path in 16-bit types."""
    n, c, f = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 8))
    h, w = (int(v) for v in rng.integers(40, 57, 2))
    return n, c, f, h, w, (15, 21)


CONV_CLASSES = {
    "small": (0.30, None, GPU_DTYPES, 3),  # test_fuzz's sizes
    "tensor_core": (0.25, _tensor_core_sizes, GPU_DTYPES, 3),
    "tma": (0.08, _tma_sizes, GPU_DTYPES, 2),  # (float32: at precision default, TF32)
    "tma_stride1": (0.07, _tma_sizes, GPU_DTYPES, 1),  # (image_acts' TMA kernel)
    "few_channels": (0.15, _few_channel_sizes, GPU_DTYPES, 4),
    "fft": (0.10, _fft_sizes, [jnp.float32], 1),
    "fft16": (0.05, _fft16_sizes, HALF_DTYPES, 1),
}


def _class(rng, classes):
    names = list(classes)
    weights = np.array([classes[k][0] for k in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def gpu_conv_config(index):
    rng = np.random.default_rng([SEED, 2, index])  # (test_fuzz.py: 0 conv, 1 pool)
    name = _class(rng, CONV_CLASSES)
    _, sizes, dtypes, max_stride = CONV_CLASSES[name]
    cfg = conv_config(index, rng=rng, sizes=sizes, dtypes=dtypes, max_stride=max_stride)
    # float32: mostly at float32 accuracy (3xTF32 or FFMA), else TF32 (which the TMA kernels
    # run); 16-bit: either.
    cfg["kw"]["precision"] = "highest" if rng.random() < 0.75 else "default"
    if name.startswith("tma") and cfg["dtype"] == jnp.float32:
        cfg["kw"]["precision"] = "default"
    cfg["class"] = name
    return cfg


def conv_tolerance(cfg):
    if cfg["dtype"] == jnp.float32:
        # TF32 keeps 10 mantissa bits: judged by bfloat16's bound (as test_gpu.py).
        return (TOLERANCE[jnp.float32] * 5 if cfg["kw"]["precision"] == "highest" else
                TOLERANCE[jnp.bfloat16])
    return TOLERANCE[jnp.dtype(cfg["dtype"]).type]


def build_conv(index):
    """In a worker thread: the compiled program on the device under test, its operands there,
    and the float64 reference's results (computed on the CPU)."""
    cfg = gpu_conv_config(index)
    args = conv_operands(cfg)
    on_device = jax.device_put(args, device_under_test())
    oracle_args = exact(*args)
    ours = jax.jit(conv_program(jcn, cfg)[0]).lower(*on_device).compile()
    want = jax.jit(conv_program(ref, cfg)[0]).lower(*oracle_args).compile()(*oracle_args)
    return cfg, ours, on_device, jax.tree.map(np.asarray, want)


def check_conv(cfg, ours, args, want):
    poison([(v.shape, cfg["dtype"]) for v in want.values()])
    got = ours(*args)
    assert_same_bits(got, ours(*args), cfg)
    check_conv_results(got, want, cfg, conv_tolerance(cfg))


# ----------------------------------------------------------------------------- max_pool

def _vector_pool_sizes(rng, layout):
    """The contiguous dimension (C01B: batch, NHWC: channels) often a multiple of 8: the vector
    kernels (16 bytes per thread); unrolled 2 x 2 / 3 x 3 and runtime windows."""
    inner = _choice(rng, [4, 8, 16, 24]) if rng.random() < 0.8 else int(rng.integers(1, 20))
    outer = int(rng.integers(1, 5))
    n, c = (inner, outer) if layout == "C01B" else (outer, inner)
    h, w = (int(v) for v in rng.integers(2, 21, 2))
    return n, c, h, w, (1, 5)


def _large_window_sizes(rng, layout):
    """Windows up to 20 x 20: more than 256 elements take int32 winners."""
    inner = _choice(rng, [8, 16]) if rng.random() < 0.5 else int(rng.integers(1, 9))
    outer = int(rng.integers(1, 4))
    n, c = (inner, outer) if layout == "C01B" else (outer, inner)
    h, w = (int(v) for v in rng.integers(14, 25, 2))
    return n, c, h, w, (12, 20)


POOL_CLASSES = {
    "small": (0.4, None),  # test_fuzz's sizes
    "vector": (0.4, _vector_pool_sizes),
    "large_window": (0.2, _large_window_sizes),
}


def gpu_pool_config(index):
    rng = np.random.default_rng([SEED, 3, index])
    name = _class(rng, POOL_CLASSES)
    cfg = pool_config(index, rng=rng, sizes=POOL_CLASSES[name][1], dtypes=GPU_DTYPES)
    cfg["class"] = name
    return cfg


def build_pool(index):
    """In a worker thread: the compiled program on the device under test, its operands there,
    the CPU kernels' results and, every POOL_REFERENCE_EVERY-th configuration, the reference's."""
    cfg = gpu_pool_config(index)
    args = pool_operands(cfg)
    on_device = jax.device_put(args, device_under_test())
    on_cpu = jax.device_put(args, cpu())
    ours = jax.jit(pool_program(jcn, cfg)).lower(*on_device).compile()
    cpu_kernels = jax.jit(pool_program(jcn, cfg)).lower(*on_cpu).compile()(*on_cpu)
    reference = None
    if index % POOL_REFERENCE_EVERY == 0 and math.prod(_pair(cfg["ds"])) <= 64:
        reference = jax.tree.map(np.asarray, jax.jit(pool_program(ref, cfg))(*on_cpu))
    return cfg, ours, on_device, (jax.tree.map(np.asarray, cpu_kernels), reference)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def check_pool(cfg, ours, args, want):
    cpu_kernels, reference = want
    poison([(v.shape, v.dtype) for v in cpu_kernels.values()])
    got = ours(*args)
    assert_same_bits(got, ours(*args), cfg)
    assert_same_bits(got, cpu_kernels, cfg, what="the CPU kernels' result")
    if reference is not None:
        check_pool_results(got, reference, cfg)


# ----------------------------------------------------------------------------- the runner

def poison(shapes):
    """NaN-filled buffers of the outputs' sizes freed on the device right before the run (as
    conftest.run_poisoned): an allocator that hands the memory back shows unwritten outputs."""
    for shape, dtype in shapes:
        jax.block_until_ready(jax.device_put(np.full(shape, np.nan, dtype),
                                             device_under_test())).delete()


def assert_same_bits(got, again, cfg, what="a second run"):
    for name in got:
        a, b = np.asarray(got[name]), np.asarray(again[name])
        assert a.dtype == b.dtype and a.shape == b.shape, (name, cfg)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), \
            f"{name} differs from {what} in {np.sum(a != b)} elements: {cfg}"


def run_chunk(chunk, total, config, build, check):
    """Configurations [chunk * CHUNK, ...) of ``total``: built (compiled, oracle run) in
    THREADS threads, checked in order as they come; every failure collected and reported with
    its index and configuration (a failed check's message names the configuration)."""
    indices = range(chunk * CHUNK, min((chunk + 1) * CHUNK, total))
    failures = []
    with ThreadPoolExecutor(THREADS) as pool:
        for index, future in [(i, pool.submit(build, i)) for i in indices]:
            try:
                check(*future.result())
            except Exception as e:  # noqa: BLE001 (one configuration's failure, reported below)
                detail = "".join(traceback.format_exception_only(e)).strip()[:1500]
                if not isinstance(e, AssertionError):
                    detail += f" in {config(index)}"
                failures.append(f"configuration {index}: {detail}")
    assert not failures, f"{len(failures)} of {len(indices)} failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("chunk", range(math.ceil(CONV_CONFIGS / CHUNK)))
def test_conv_family_fuzz_on_gpu(chunk):
    run_chunk(chunk, CONV_CONFIGS, gpu_conv_config, build_conv, check_conv)


@pytest.mark.parametrize("chunk", range(math.ceil(POOL_CONFIGS / CHUNK)))
def test_max_pool_fuzz_on_gpu(chunk):
    run_chunk(chunk, POOL_CONFIGS, gpu_pool_config, build_pool, check_pool)

