"""Benchmark jax_convnet's ops against XLA's on the current device.

    python -m jax_convnet.benchmark [--quick] [--ops conv,pool] [--filter L1/] [--out DIR]
    jax-convnet-benchmark ...

On a GPU: the convnet-benchmarks layers L1-L5 and AlexNet conv1-3 (as in
``baselines/xla_baseline.py``): fprop, bprop_data (``jax.vjp`` of ``filter_acts`` in the images)
and bprop_filter (in the filters), in float32 (default precision, which may use TF32), float32
``"highest"`` and bfloat16, layouts C01B and NHWC; XLA runs ``lax.conv_general_dilated`` in the
same layout. Pools: the AlexNet pools (64x55x55, 192x27x27, 256x13x13, batch 128) and VGG's
(128x112x112, batch 64), 3x3 stride 2 and 2x2 stride 2 windows (VALID), float32 and bfloat16, both
layouts, forward, backward as ``jax.grad`` runs it, and "train": forward + backward as
``jax.value_and_grad`` runs them in a training step (printed with its floor: the bytes the design
must move, images read and pooled values and winners written forward, cotangents and winners read
and image gradient written backward, at the copy rate of the same run); XLA runs
``lax.reduce_window``.
On the CPU a small set (32x32 and 16x16 images, 5x5 filters, batch 64; a 2x2 and a 3x3/2 pool).

Each function is compiled, warmed up and timed as the median of ``--reps`` measurements. On a GPU
the function is repeated n and 2n times inside one executable and the time per call is the
difference over n, which removes host dispatch and synchronisation (without that, every kernel
under ~30 us would measure as the dispatch time). ``--inner`` times loops of host calls instead.
Each row also compares our output with XLA's (max |ours - XLA| / max |XLA|); float32 "highest"
rows (and every conv row with ``--ref-err``) compare both with a float64 reference (XLA's float64
convolution), which shows whose result has float32 accuracy. ``--xla-no-tf32`` sets
``NVIDIA_TF32_OVERRIDE=0`` before the GPU starts, so that cuDNN may not use TF32 for any of XLA's
float32 convolutions (for the "highest" rows, in a run of their own: on the H200 their times and
errors are the same either way, see benchmarks/RESULTS.md). Convolutions report
TFLOP/s (2 * N * F * Ho * Wo * C * fh * fw), pools GB/s counting (input + output) bytes forward and
(2 * input + output) backward, as the baselines do; with pool rows the run also measures the
device's copy bandwidth (``measure_copy_gbps``) and records it as ``copy_gbps``. The ratio is XLA's time over ours (> 1: ours is
faster). Results go to ``--out`` as ``benchmark.json`` and ``benchmark.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform as _platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_convnet as jcn
from jax_convnet import geometry as G

# (N, C, H, W, F, fh, fw, stride, pad), as baselines/xla_baseline.py
GPU_LAYERS = {
    "L1": (128, 3, 128, 128, 96, 11, 11, 1, 0),
    "L2": (128, 64, 64, 64, 128, 9, 9, 1, 0),
    "L3": (128, 128, 32, 32, 128, 9, 9, 1, 0),
    "L4": (128, 128, 16, 16, 128, 7, 7, 1, 0),
    "L5": (128, 384, 13, 13, 384, 3, 3, 1, 0),
    "alex1": (128, 3, 224, 224, 64, 11, 11, 4, 2),
    "alex2": (128, 64, 27, 27, 192, 5, 5, 1, 2),
    "alex3": (128, 192, 13, 13, 384, 3, 3, 1, 1),
}
CPU_LAYERS = {
    "conv1": (64, 3, 32, 32, 32, 5, 5, 1, 2),
    "conv2": (64, 32, 16, 16, 64, 5, 5, 1, 2),
}
# (N, C, H, W), windows (ds, stride)
GPU_POOLS = {
    "alexpool1": ((128, 64, 55, 55), [(3, 2), (2, 2)]),
    "alexpool2": ((128, 192, 27, 27), [(3, 2), (2, 2)]),
    "alexpool3": ((128, 256, 13, 13), [(3, 2), (2, 2)]),
    "vggpool": ((64, 128, 112, 112), [(3, 2), (2, 2)]),
}
CPU_POOLS = {
    "pool1": ((64, 32, 32, 32), [(2, 2)]),
    "pool2": ((64, 64, 16, 16), [(3, 2)]),
}
GPU_QUICK_LAYERS = ("L2", "L5", "alex2")
GPU_QUICK_POOLS = ("alexpool1", "vggpool")

# name: (dtype, our precision, XLA precision)
CONV_CONFIGS = {
    "f32": ("float32", None, None),
    "f32-highest": ("float32", "highest", lax.Precision.HIGHEST),
    "bf16": ("bfloat16", None, None),
}
POOL_DTYPES = {"f32": "float32", "bf16": "bfloat16"}
LAYOUTS = ("NHWC", "C01B")
_DIMENSION_NUMBERS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "C01B": ("CHWN", "IHWO", "CHWN")}


# ----------------------------------------------------------------------------- rows

@dataclasses.dataclass
class Row:
    """One benchmark row: builds its inputs and the two functions to time on demand."""
    name: str
    kind: str  # "conv" | "pool"
    op: str
    layer: str
    layout: str
    dtype: str
    config: str
    shape: tuple  # conv: (N, C, H, W, F, fh, fw, stride, pad); pool: (N, C, H, W, ds, stride)
    inputs_key: tuple = ()

    def info(self) -> dict:
        return dict(name=self.name, kind=self.kind, op=self.op, layer=self.layer,
                    layout=self.layout, dtype=self.dtype, config=self.config,
                    shape=list(self.shape))


def build_rows(device_platform: str, *, quick=False, ops=("conv", "pool"), batch=None,
               filters=None) -> list[Row]:
    gpu = device_platform != "cpu"
    rows = []
    if "conv" in ops:
        layers = GPU_LAYERS if gpu else CPU_LAYERS
        if gpu and quick:
            layers = {k: v for k, v in layers.items() if k in GPU_QUICK_LAYERS}
        if gpu:  # (on the CPU "highest" is what float32 does anyway)
            configs = ["f32", "bf16"] if quick else list(CONV_CONFIGS)
        else:
            configs = ["f32"] if quick else ["f32", "bf16"]
        for layer, shape in layers.items():
            if batch:
                shape = (batch,) + shape[1:]
            for layout in LAYOUTS:
                for config in configs:  # consecutive configs of one dtype share their inputs
                    dtype = CONV_CONFIGS[config][0]
                    for op in ("fprop", "bprop_data", "bprop_filter"):
                        rows.append(Row(f"conv/{layer}/{op}/{config}/{layout}", "conv", op, layer,
                                        layout, dtype, config, shape,
                                        ("conv", layer, layout, dtype, shape)))
    if "pool" in ops:
        pools = GPU_POOLS if gpu else CPU_POOLS
        if gpu and quick:
            pools = {k: v for k, v in pools.items() if k in GPU_QUICK_POOLS}
        dtypes = ["f32"] if (quick and not gpu) else list(POOL_DTYPES)
        for layer, (nchw, windows) in pools.items():
            if batch:
                nchw = (batch,) + nchw[1:]
            for config in dtypes:
                for layout in LAYOUTS:  # consecutive rows share their inputs
                    for ds, stride in windows:
                        for op in ("fwd", "bwd", "train"):
                            name = f"pool/{layer}/{ds}x{ds}s{stride}/{op}/{config}/{layout}"
                            rows.append(Row(name, "pool", op, layer, layout, POOL_DTYPES[config],
                                            config, nchw + (ds, stride),
                                            ("pool", layer, layout, config, nchw)))
    if filters:
        rows = [r for r in rows if any(f in r.name for f in filters)]
    return rows


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def make_inputs(row: Row):
    """Device arrays for ``row`` (never zeros): conv (x, w, g), pool (x, g_fwd_shape)."""
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    if row.kind == "conv":
        n, c, h, w, f, fh, fw, stride, pad = row.shape
        pads = ((pad, pad), (pad, pad))
        oh, ow = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, padding=pads)
        x = _normal(k1, G.image_shape(row.layout, n, c, h, w), row.dtype)
        filt = _normal(k2, G.filter_shape(row.layout, f, c, fh, fw), row.dtype) * \
            jnp.asarray(0.05, row.dtype)
        g = _normal(k3, G.image_shape(row.layout, n, f, oh, ow), row.dtype)
        return x, filt, g
    n, c, h, w = row.shape[:4]
    return (_normal(k1, G.image_shape(row.layout, n, c, h, w), row.dtype),)


def row_functions(row: Row, inputs, partial_sum=None):
    """(ours, xla, args, work): two functions of ``args`` and the flop / byte count."""
    if row.kind == "conv":
        n, c, h, w, f, fh, fw, stride, pad = row.shape
        pads = ((pad, pad), (pad, pad))
        _, ours_prec, xla_prec = CONV_CONFIGS[row.config]
        oh, ow = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, padding=pads)
        flop = 2 * n * f * oh * ow * c * fh * fw

        def ours(x, k):
            return jcn.filter_acts(x, k, stride=stride, padding=pads, layout=row.layout,
                                   precision=ours_prec, partial_sum=partial_sum)

        def xla(x, k):
            return lax.conv_general_dilated(x, k, (stride, stride), pads,
                                            dimension_numbers=_DIMENSION_NUMBERS[row.layout],
                                            precision=xla_prec)

        x, k, g = inputs
        if row.op == "fprop":
            return ours, xla, (x, k), flop
        if row.op == "bprop_data":
            wrap = lambda conv: lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]
        else:
            wrap = lambda conv: lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]
        return wrap(ours), wrap(xla), (x, k, g), flop

    n, c, h, w, ds, stride = row.shape
    itemsize = np.dtype(jnp.dtype(row.dtype)).itemsize
    (x,) = inputs

    def ours(x):
        return jcn.max_pool(x, ds, stride=stride, padding="VALID", layout=row.layout)

    def xla(x):
        window = [1] * 4
        strides = [1] * 4
        ax = G.image_axes(row.layout)
        window[ax["h"]] = window[ax["w"]] = ds
        strides[ax["h"]] = strides[ax["w"]] = stride
        return lax.reduce_window(x, -jnp.inf, lax.max, tuple(window),
                                 tuple(strides), "VALID")

    nx = n * c * h * w
    ny = math.prod(jax.eval_shape(ours, x).shape)
    if row.op == "fwd":
        return ours, xla, (x,), (nx + ny) * itemsize
    g = _normal(jax.random.key(1), jax.eval_shape(ours, x).shape, row.dtype)
    if row.op == "train":  # bytes: x, dx, y, g (itemsize each); winners written and read
        wrap = lambda pool: lambda x, g: jax.value_and_grad(lambda x: jnp.vdot(pool(x), g))(x)
        winner_bytes = 1 if ds * ds <= 256 else 4
        return wrap(ours), wrap(xla), (x, g), 2 * (nx + ny) * itemsize + 2 * ny * winner_bytes
    wrap = lambda pool: lambda x, g: jax.grad(lambda x: jnp.vdot(pool(x), g))(x)
    return wrap(ours), wrap(xla), (x, g), (2 * nx + ny) * itemsize


def _float64_reference_errors(xla_fn, fn_args, outputs) -> list[float]:
    """max |y - ref| / max |ref| of each output against XLA's float64 convolution."""
    with jax.enable_x64(True):
        ref = jax.jit(xla_fn)(*(a.astype(jnp.float64) for a in fn_args))
        return [float(_max_rel_err(y, ref, jnp.float64)) for y in outputs]


@functools.partial(jax.jit, static_argnums=2)
def _max_rel_err(a, b, dtype=jnp.float32):
    """max |a - b| / max |b|, computed in ``dtype`` (float32, or float64 against a reference)."""
    tiny = 1e-30 if dtype == jnp.float32 else 1e-300
    a, b = a.astype(dtype), b.astype(dtype)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), jnp.asarray(tiny, dtype))


# ----------------------------------------------------------------------------- timing

def compile_fn(fn: Callable, args):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def time_fn(compiled, args, *, reps: int, inner: int, warmup: int = 2) -> float:
    """Median milliseconds per call over ``reps`` measurements of ``inner`` back-to-back calls."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return float(np.median(times)) * 1e3


def _once(compiled, args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t


def repeated(fn: Callable, n: int, copies: int = 1) -> Callable:
    """``fn`` called ``n`` times in one executable, back to back with no host work between them;
    the result takes ``copies`` sets of ``fn``'s arguments and call i uses set i % copies (so the
    data the calls touch can exceed the L2 cache, as one call's does in a real network).
    Every argument of each call gets one element of the previous call's output written into it
    (an in-place one-element update), so XLA can neither drop the earlier calls as dead nor merge
    them as common subexpressions. All arguments, because an op need not depend on its first one
    (bprop_data ignores the images); and through an optimization barrier, because XLA otherwise
    narrows the earlier calls to the one element used (it slices through reduce_window)."""
    def run(*flat_sets):
        arity = len(flat_sets) // copies
        sets = [flat_sets[i * arity:(i + 1) * arity] for i in range(copies)]
        out = fn(*sets[0])
        for i in range(1, n):
            # every output feeds the seed (value_and_grad: else the earlier gradients are dead)
            leaves = lax.optimization_barrier(jax.tree_util.tree_leaves(out))
            seed = sum(leaf.reshape(-1)[:1].astype(jnp.float32) for leaf in leaves)
            sets[i % copies] = tuple(
                lax.dynamic_update_slice(a, seed.astype(a.dtype).reshape((1,) * a.ndim),
                                         (0,) * a.ndim) for a in sets[i % copies])
            out = fn(*sets[i % copies])
        return out
    return run


# Bytes the repeated calls cycle through at least: several times the largest L2 cache (50 MiB on
# the H100 / H200), so every call reads its operands from memory, not from the previous call's
# cached copy.
COLD_WORKING_SET_BYTES = 256 << 20


def time_on_device(fn: Callable, compiled, args, *, reps: int, target_s: float = 0.003,
                   max_calls: int = 16) -> float:
    """Milliseconds per call on an accelerator, free of host dispatch and synchronisation: ``fn``
    repeated n and 2n times in one executable each (n fills about ``target_s``), and the per-call
    time is the difference of the two medians over n. Launch-bound small kernels (a pool of 256 x
    13 x 13 x 128 takes ~10 us) are otherwise hidden under ~30 us of dispatch per call. The calls
    cycle through copies of the arguments worth COLD_WORKING_SET_BYTES (memory-bound ops would
    otherwise run from L2)."""
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    single = min(_once(compiled, args) for _ in range(3))
    n = int(min(max_calls, max(1, round(target_s / max(single, 1e-6)))))
    arg_bytes = sum(a.nbytes for a in args)
    copies = int(min(n, max(1, -(-COLD_WORKING_SET_BYTES // arg_bytes))))
    flat_sets = [a if i == 0 else jnp.copy(a) for i in range(copies) for a in args]
    medians = []
    for calls in (n, 2 * n):
        run = jax.jit(repeated(fn, calls, copies)).lower(*flat_sets).compile()
        for _ in range(2):
            jax.block_until_ready(run(*flat_sets))
        medians.append(float(np.median([_once(run, flat_sets) for _ in range(reps)])))
    if medians[1] <= medians[0]:  # noise above the signal (a GPU shared with other work):
        return medians[1] / (2 * n) * 1e3  # the upper bound, dispatch included
    return (medians[1] - medians[0]) / n * 1e3


def measure_copy_gbps(gpu: bool, *, reps: int, inner: int | None = None,
                      nbytes: int | None = None) -> float:
    """The device's copy bandwidth, bytes read + written per second (GB/s), the yardstick of the
    memory-bound pool rows: XLA scaling a float32 array (one read, one write per element; a plain
    copy could be elided), timed like the rows (``inner``: as ``--inner``). Default size: 1 GiB
    on an accelerator (far past any cache; ``time_on_device`` then needs no copies), 64 MiB on
    the CPU."""
    nbytes = nbytes or ((1 << 30) if gpu else (64 << 20))
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)
    scale = lambda x: x * 0.5
    compiled = jax.jit(scale).lower(x).compile()
    if gpu and inner is None:
        ms = time_on_device(scale, compiled, (x,), reps=reps)
    else:
        ms = time_fn(compiled, (x,), reps=reps, inner=inner or 1)
    return 2 * x.nbytes / ms / 1e6


# ----------------------------------------------------------------------------- output

def _fmt_rate(row_result):
    if row_result.get("tflops") is not None:
        def flops(t):  # small (CPU) rates in GFLOP/s
            return f"{t:8.2f} TF/s" if t >= 1 else f"{t * 1e3:8.1f} GF/s"
        return flops(row_result["tflops"]), flops(row_result["xla_tflops"])
    if row_result.get("gbps") is not None:
        return f"{row_result['gbps']:8.1f} GB/s", f"{row_result['xla_gbps']:8.1f} GB/s"
    return "", ""


HEADER = (f"{'row':<40} {'ours ms':>9} {'XLA ms':>9} {'ours':>13} {'XLA':>13} "
          f"{'XLA/ours':>8} {'max rel err':>11}")


def format_row(r) -> str:
    if "error" in r:
        return f"{r['name']:<40} ERROR {r['error']}"
    ours, xla = _fmt_rate(r)
    line = (f"{r['name']:<40} {r['ms']:9.4f} {r['xla_ms']:9.4f} {ours:>13} {xla:>13} "
            f"{r['ratio']:8.2f} {r['max_rel_err']:11.2e}")
    if "ref_err" in r:
        line += f"  vs float64: ours {r['ref_err']:.1e}, XLA {r['xla_ref_err']:.1e}"
    if "floor_ms" in r:
        line += f"  floor {r['floor_ms']:.4f} ms (ours {r['ms'] / r['floor_ms']:.2f}x)"
    return line


def summarize(results) -> list[str]:
    """Geometric mean of XLA/ours per (kind, op, config)."""
    groups = {}
    for r in results:
        if "ratio" in r:
            groups.setdefault(f"{r['kind']}/{r['op']}/{r['config']}", []).append(r["ratio"])
    return [f"  {k:<30} {math.exp(np.mean(np.log(v))):6.2f}  ({len(v)} rows)"
            for k, v in groups.items()]


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "ratio" in r]
    if not ok:
        return None
    colors = {"fprop": "tab:blue", "bprop_data": "tab:orange", "bprop_filter": "tab:green",
              "fwd": "tab:purple", "bwd": "tab:red", "train": "tab:brown"}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.2 * len(ok)))
    y = np.arange(len(ok))[::-1]
    ratios = np.array([r["ratio"] for r in ok])
    # bars grow from 1 (parity): right when ours is faster, left when slower
    ax.barh(y, ratios - 1.0, left=1.0, color=[colors.get(r["op"], "gray") for r in ok])
    for yi, ratio in zip(y, ratios):
        ax.text(ratio * (1.03 if ratio >= 1 else 1 / 1.03), yi, f"{ratio:.2f}", va="center",
                ha="left" if ratio >= 1 else "right", fontsize=6)
    lo, hi = min(ratios.min(), 1.0), max(ratios.max(), 1.0)
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_yticks(y)
    ax.set_yticklabels([r["name"] for r in ok], fontsize=7)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("XLA time / our time  (> 1: jax_convnet is faster)")
    ax.set_ylim(-0.7, len(ok) - 0.3)
    ax.grid(axis="x", alpha=0.3, which="both")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for op, c in colors.items()
               if any(r["op"] == op for r in ok)]
    ax.legend(handles, [op for op in colors if any(r["op"] == op for r in ok)], loc="best",
              fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jax_convnet.benchmark", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller set of rows")
    p.add_argument("--ops", default="conv,pool", help="comma-separated: conv, pool")
    p.add_argument("--filter", action="append", default=None, metavar="TEXT",
                   help="keep rows whose name contains TEXT (repeat: any of them); names look "
                        "like conv/L1/fprop/f32-highest/NHWC, pool/alexpool1/3x3s2/bwd/bf16/C01B")
    p.add_argument("--reps", type=int, default=None,
                   help="timed measurements per function (median taken; default 11 on GPU, "
                        "7 on CPU)")
    p.add_argument("--inner", type=int, default=None,
                   help="time loops of this many host calls per measurement (default: 1 on "
                        "CPU; on GPU the calls are repeated inside one executable instead)")
    p.add_argument("--batch", type=int, default=None, help="override every row's batch size")
    p.add_argument("--partial-sum", default=None,
                   help="partial_sum for our filter_acts (an int, or 'auto'; default None)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rows after this many seconds")
    p.add_argument("--out", default="benchmark_out", help="directory for JSON and PNG")
    p.add_argument("--set", choices=["auto", "gpu", "cpu"], default="auto",
                   help="which row set: the GPU's (large layers) or the CPU's (small); auto: "
                        "by the device")
    p.add_argument("--ref-err", action="store_true",
                   help="compare every conv row's results with a float64 reference (always done "
                        "for f32-highest rows)")
    p.add_argument("--xla-no-tf32", action="store_true",
                   help="NVIDIA_TF32_OVERRIDE=0: cuDNN keeps XLA's float32 convolutions off TF32 "
                        "(for f32-highest rows, in a run of their own)")
    p.add_argument("--no-fft", action="store_true",
                   help="keep our convolutions off the FFT path (jax_convnet.conv."
                        "FFT_WORKSPACE_CAP_BYTES = 0): the direct kernels' times")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    bad = [o for o in ops if o not in ("conv", "pool")]
    if bad or not ops:
        raise SystemExit(f"--ops takes conv and/or pool, got {args.ops!r}")
    partial_sum = args.partial_sum
    if partial_sum not in (None, "auto"):
        partial_sum = int(partial_sum)

    if args.no_fft:
        jcn.conv.FFT_WORKSPACE_CAP_BYTES = 0
    if args.xla_no_tf32:  # read when cuDNN starts: before the first use of the GPU
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    device = jax.devices()[0]
    gpu = device.platform != "cpu"
    row_set = device.platform if args.set == "auto" else args.set
    rows = build_rows(row_set, quick=args.quick, ops=ops, batch=args.batch,
                      filters=args.filter)
    if args.list:
        print("\n".join(r.name for r in rows))
        return []
    reps = args.reps or (11 if gpu else 7)
    inner = args.inner or 1
    native_platform = "cuda" if device.platform == "gpu" else device.platform
    native = jcn.has_native(native_platform) if native_platform in ("cpu", "cuda") else False

    print(f"jax_convnet {jcn.__version__}, jax {jax.__version__}, {device.platform} "
          f"({device.device_kind}); native {native_platform} kernels: "
          f"{'yes' if native else 'NO (ours lowers the pure-lax reference)'}; "
          f"{len(rows)} rows, {reps} reps", flush=True)
    if not rows:
        print("no rows selected")
        return []

    try:
        from tqdm.auto import tqdm
        import matplotlib  # noqa: F401  (for the chart, before any time is spent)
    except ImportError as e:
        raise SystemExit(f"the benchmark needs tqdm and matplotlib ({e}): "
                         "pip install 'jax_convnet[examples]'") from None

    t_start = time.perf_counter()
    copy_gbps = None
    if any(r.kind == "pool" for r in rows):  # pool rows are judged against it
        copy_gbps = measure_copy_gbps(gpu, reps=reps, inner=args.inner)
        print(f"copy bandwidth (read + write): {copy_gbps:.1f} GB/s", flush=True)
    results = []
    cache_key, cache = None, None
    skipped = 0
    bar = tqdm(rows, desc="benchmark", unit="row", dynamic_ncols=True, file=sys.stderr)
    tqdm.write(HEADER)
    for row in bar:
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            skipped = len(rows) - len(results)
            break
        bar.set_postfix_str(row.name)
        r = row.info()
        try:
            if row.inputs_key != cache_key:
                cache_key, cache = None, None  # free the previous inputs first
                cache = make_inputs(row)
                cache_key = row.inputs_key
            ours_fn, xla_fn, fn_args, work = row_functions(row, cache, partial_sum)
            ours, t_ours = compile_fn(ours_fn, fn_args)
            xla, t_xla = compile_fn(xla_fn, fn_args)
            outputs = ours(*fn_args), xla(*fn_args)
            err = max(float(_max_rel_err(a, b)) for a, b in
                      zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1])))
            if gpu and args.inner is None:
                ms = time_on_device(ours_fn, ours, fn_args, reps=reps)
                xla_ms = time_on_device(xla_fn, xla, fn_args, reps=reps)
            else:
                ms = time_fn(ours, fn_args, reps=reps, inner=inner)
                xla_ms = time_fn(xla, fn_args, reps=reps, inner=inner)
            r.update(ms=ms, xla_ms=xla_ms, ratio=xla_ms / ms, max_rel_err=err,
                     compile_s=round(t_ours, 3), xla_compile_s=round(t_xla, 3))
            if row.kind == "conv":
                r.update(flop=work, tflops=work / ms / 1e9, xla_tflops=work / xla_ms / 1e9)
                if args.ref_err or row.config == "f32-highest":
                    r["ref_err"], r["xla_ref_err"] = _float64_reference_errors(
                        xla_fn, fn_args, outputs)
            else:
                r.update(bytes=work, gbps=work / ms / 1e6, xla_gbps=work / xla_ms / 1e6)
                if row.op == "train":  # the design's bytes at the copy rate
                    r["floor_ms"] = work / copy_gbps / 1e6
            del ours, xla, fn_args, outputs
        except Exception as e:  # one failing row must not end the run
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        results.append(r)
        tqdm.write(format_row(r))
    bar.close()
    cache = None
    wall = time.perf_counter() - t_start

    if skipped:
        print(f"--budget-s {args.budget_s} reached: {skipped} rows not run")
    print(f"\n{len(results)} rows in {wall:.1f} s; geometric mean of XLA/ours:")
    print("\n".join(summarize(results)))

    os.makedirs(args.out, exist_ok=True)
    meta = dict(jax_convnet=jcn.__version__, jax=jax.__version__, platform=device.platform,
                device_kind=device.device_kind, native_kernels=native,
                python=_platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                args=vars(args), reps=reps, wall_s=round(wall, 1), rows_skipped=skipped,
                copy_gbps=copy_gbps, nvidia_tf32_override=os.environ.get("NVIDIA_TF32_OVERRIDE"))
    json_path = os.path.join(args.out, "benchmark.json")
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, rows=results), f, indent=1)
    png = plot(results, os.path.join(args.out, "benchmark.png"),
               f"jax_convnet vs XLA on {device.device_kind} ({device.platform}), "
               f"jax {jax.__version__}")
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
