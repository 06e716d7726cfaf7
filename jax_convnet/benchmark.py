"""Benchmark jax_convnet's ops against XLA's on the current device.

    python -m jax_convnet.benchmark [--quick] [--ops conv,pool,avgpool,norm,local,groups]
                                    [--filter L1/]
                                    [--out DIR]
    python -m jax_convnet.benchmark --nets [--batch N] [--alexnet-size PX] [--out DIR]
    python -m jax_convnet.benchmark --nets --devices 2,4,8 [--batch N] ...
    jax-convnet-benchmark ...

On a GPU: the convnet-benchmarks layers L1-L5 and AlexNet conv1-3 (``jax_convnet._layers``):
fprop, bprop_data (``jax.vjp`` of ``filter_acts`` in the images)
and bprop_filter (in the filters), in float32 (default precision, which may use TF32), float32
``"highest"`` and bfloat16, layouts C01B and NHWC; XLA runs ``lax.conv_general_dilated`` in the
same layout. Pools: the AlexNet pools (64x55x55, 192x27x27, 256x13x13, batch 128) and VGG's
(128x112x112, batch 64), 3x3 stride 2 and 2x2 stride 2 windows (VALID), float32 and bfloat16, both
layouts, forward, backward as ``jax.grad`` runs it, and "train": forward + backward as
``jax.value_and_grad`` runs them in a training step (printed with its floor: the bytes the design
must move, images read and pooled values and winners written forward, cotangents and winners read
and image gradient written backward, at the copy rate of the same run); XLA runs
``lax.reduce_window``. Average pools ("avgpool" rows) run on the same shapes, windows, dtypes and
layouts: ``avg_pool`` against XLA's ``lax.reduce_window`` sum divided by the window area (as
``flax.linen.avg_pool`` computes it); their bytes are images read and pooled values written
forward, cotangents read and image gradient written backward (no winners).
On the CPU a small set (32x32 and 16x16 images, 5x5 filters, batch 64; a 2x2 and a 3x3/2 pool).
``--ops norm`` (not in the default set): the response norms of AlexNet (cmrnorm size 5 on
96x55x55 and 256x27x27, batch 128) and the CIFAR-10 nets (rnorm 3 on 32x16x16, cmrnorm 9 on
64x16x16), float32 and bfloat16, both layouts, forward and "train" (with its floor, as the pools'),
against the pure-lax reference (a ``lax.reduce_window`` sum) as XLA compiles it.
``--ops local``: the locally connected layers of cuda-convnet's CIFAR-10 11% net (local3, local4:
3x3 filters on 8x8 images, 64 and 32 channels, 32 filters, batch 128; 32 on the CPU), fprop,
bprop_data and bprop_filter of ``local_filter_acts`` against ``lax.conv_general_dilated_local``
(the conv rows' configs and layouts; each given the filters in its own layout, so our
bprop_filter includes rearranging its gradient into lax's).
``--ops groups``: grouped convolutions, AlexNet's two-group layers (conv2: 96 -> 256 channels,
5x5 pad 2 on 27x27; conv4 / conv5: 384 -> 384 / 256, 3x3 pad 1 on 13x13; batch 128; smaller on
the CPU): fprop, bprop_data and bprop_filter of ``filter_acts(..., groups=2)`` against
``lax.conv_general_dilated(..., feature_group_count=2)``, the conv rows' configs and layouts.

Each function is compiled, warmed up and timed as the median of ``--reps`` measurements. On a GPU
the function is repeated n and 2n times inside one executable and the time per call is the
difference over n, which removes host dispatch and synchronisation (without that, every kernel
under ~30 us would measure as the dispatch time). ``--inner`` times loops of host calls instead.
Each row also compares our output with XLA's (max |ours - XLA| / max |XLA|); float32 "highest"
rows (and every conv row with ``--ref-err``) compare both with a float64 reference (XLA's float64
convolution), which shows whose result has float32 accuracy. ``--xla-no-tf32`` sets
``NVIDIA_TF32_OVERRIDE=0`` before the GPU starts, so that cuDNN may not use TF32 for any of XLA's
float32 convolutions (for the "highest" rows, in a run of their own: their times and errors were
the same either way, benchmarks/history/2026-11-29_session5_fft.md). Convolutions report
TFLOP/s (2 * N * F * Ho * Wo * C * fh * fw), pools GB/s counting (input + output) bytes forward and
(2 * input + output) backward; with pool rows the run also measures the
device's copy bandwidth (``measure_copy_gbps``) and records it as ``copy_gbps``. The ratio is XLA's time over ours (> 1: ours is
faster). Results go to ``--out`` as ``benchmark.json`` and ``benchmark.png``.

``--nets`` times whole training steps instead (``jax_convnet._nets``): AlexNet ("one weird
trick", batch 128, 224x224) and cuda-convnet's CIFAR-10 net (batch 128, 32x32), forward, backward
and SGD update in one ``jax.jit``, built from ``filter_acts`` + ``max_pool`` and from
``lax.conv_general_dilated`` + ``lax.reduce_window``, in both layouts, float32 and bfloat16
(float32 parameters cast inside the step). Then cuda-convnet's cfg networks of
``jax_convnet.models`` (batch 128): ``cifar18`` (18% net: average pools and same-map response
norms, 32x32), ``alexnet_cmr`` (cuda-convnet2's AlexNet with cross-map norms, 224x224) and
``cifar11`` (cross-map norms and two locally connected layers, 32x32), the Flax module against
the same network on XLA's ops (``lax.conv_general_dilated_local``, ``reduce_window`` pools, a jnp
response norm; ``_nets.XLA_OPS``). The ``--devices`` table keeps to the first two. Before timing, each pair of steps runs once on the same
parameters and data and must agree on the loss and on every parameter's update (``NET_TOLERANCE``;
on a GPU, float32 steps compiled at precision highest within tight bounds, then the timed ones,
which may use TF32, within loose ones); a pair that does not gets an error instead of times.
Each step is timed as the median of ``--reps`` loops of ``--inner`` calls (default 11 x 5 on a
GPU, 3 x 1 on the CPU) after warm-up; the table gives XLA's time over ours in the same layout and
in XLA's faster layout (``ratio``, ``ratio_best``), and goes to ``--out`` as ``nets.json``.

``--nets --devices 2,4,8`` runs the same steps over a ``Mesh`` of the first N devices (axes
"data", "model"; one ``jax.jit`` with the parameters' and the batch's ``NamedSharding`` as in and
out shardings): the batch split over N with the batch per device fixed (``weak/N``: N times the
net's batch) and with the global batch fixed (``strong/N``), and for AlexNet where N is even
``model/N``, an (N/2) x 2 mesh with conv3-conv5's filters split over "model"
(``_nets.step_shardings``). Each row is checked against XLA's step and against our one-device
step at the same global batch (``NET_TOLERANCE``; the sums over the batch run in another order)
and run twice (``reproducible``: bitwise the same), then timed; it reports the scaling efficiency
against the group's one-device row (``.../1``) and the collectives in each compiled step's HLO
(operations and arrays moved). Written to ``--out`` as ``nets_devices.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform as _platform
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_convnet as jcn
from jax_convnet import geometry as G
from jax_convnet._layers import CPU_LAYERS, CPU_NORMS, CPU_POOLS, GPU_LAYERS, GPU_NORMS, GPU_POOLS
from jax_convnet._layers import CPU_GROUPED_LAYERS, CPU_LOCAL_LAYERS, GPU_GROUPED_LAYERS
from jax_convnet._layers import GPU_LOCAL_LAYERS

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
    kind: str  # "conv" | "pool" (max pool) | "avgpool" | "norm" | "local" | "groups"
    op: str
    layer: str
    layout: str
    dtype: str
    config: str
    shape: tuple  # conv: (N, C, H, W, F, fh, fw, stride, pad); pool: (N, C, H, W, ds, stride);
    # norm: a _layers.NormLayer as a tuple; groups: conv's and the group count G
    inputs_key: tuple = ()

    def info(self) -> dict:
        return dict(name=self.name, kind=self.kind, op=self.op, layer=self.layer,
                    layout=self.layout, dtype=self.dtype, config=self.config,
                    shape=list(self.shape))


def _conv_family_rows(kind, layer, shape, configs) -> list[Row]:
    """The fprop / bprop_data / bprop_filter rows of one layer in both layouts and each config;
    consecutive configs of one dtype share their inputs."""
    return [Row(f"{kind}/{layer}/{op}/{config}/{layout}", kind, op, layer, layout,
                CONV_CONFIGS[config][0], config, shape,
                (kind, layer, layout, CONV_CONFIGS[config][0], shape))
            for layout in LAYOUTS for config in configs
            for op in ("fprop", "bprop_data", "bprop_filter")]


def build_rows(device_platform: str, *, quick=False, ops=("conv", "pool", "avgpool"), batch=None,
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
            rows += _conv_family_rows("conv", layer, shape, configs)
    pool_kinds = [kind for kind in ("pool", "avgpool") if kind in ops]
    if pool_kinds:
        pools = GPU_POOLS if gpu else CPU_POOLS
        if gpu and quick:
            pools = {k: v for k, v in pools.items() if k in GPU_QUICK_POOLS}
        dtypes = ["f32"] if (quick and not gpu) else list(POOL_DTYPES)
        for layer, (nchw, windows) in pools.items():
            if batch:
                nchw = (batch,) + nchw[1:]
            for config in dtypes:
                for layout in LAYOUTS:  # consecutive rows share their inputs
                    for kind in pool_kinds:
                        for ds, stride in windows:
                            for op in ("fwd", "bwd", "train"):
                                name = f"{kind}/{layer}/{ds}x{ds}s{stride}/{op}/{config}/{layout}"
                                rows.append(Row(name, kind, op, layer, layout,
                                                POOL_DTYPES[config], config, nchw + (ds, stride),
                                                ("pool", layer, layout, config, nchw)))
    if "norm" in ops:
        norms = GPU_NORMS if gpu else CPU_NORMS
        dtypes = ["f32"] if (quick and not gpu) else list(POOL_DTYPES)
        for layer, spec in norms.items():
            if batch:
                spec = spec._replace(batch=batch)
            for dtype in dtypes:
                for layout in LAYOUTS:  # consecutive rows share their inputs
                    for op in ("fwd", "train"):
                        for xla in NORM_XLA:
                            config = dtype + xla
                            rows.append(Row(f"norm/{layer}/{op}/{config}/{layout}", "norm", op,
                                            layer, layout, POOL_DTYPES[dtype], config, tuple(spec),
                                            ("norm", layer, layout, dtype, tuple(spec))))
    if "local" in ops:  # locally connected layers: conv's configs, ops and shapes
        configs = (["f32", "bf16"] if quick else list(CONV_CONFIGS)) if gpu else ["f32"]
        for layer, shape in (GPU_LOCAL_LAYERS if gpu else CPU_LOCAL_LAYERS).items():
            if batch:
                shape = (batch,) + shape[1:]
            rows += _conv_family_rows("local", layer, shape, configs)
    if "groups" in ops:  # grouped convolutions: conv's ops and layouts, float32 and bfloat16
        configs = ["f32"] if quick and not gpu else ["f32", "bf16"]
        for layer, (shape, groups) in (GPU_GROUPED_LAYERS if gpu else CPU_GROUPED_LAYERS).items():
            if batch:
                shape = shape._replace(batch=batch)
            rows += _conv_family_rows("groups", layer, tuple(shape) + (groups,), configs)
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
    if row.kind in ("conv", "groups"):
        n, c, h, w, f, fh, fw, stride, pad = row.shape[:9]
        groups = row.shape[9] if row.kind == "groups" else 1
        pads = ((pad, pad), (pad, pad))
        oh, ow = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, padding=pads)
        x = _normal(k1, G.image_shape(row.layout, n, c, h, w), row.dtype)
        filt = _normal(k2, G.filter_shape(row.layout, f, c // groups, fh, fw), row.dtype) * \
            jnp.asarray(0.05, row.dtype)
        g = _normal(k3, G.image_shape(row.layout, n, f, oh, ow), row.dtype)
        return x, filt, g
    if row.kind == "local":  # (x, our filters, g, the same filters as lax's local kernel)
        n, c, h, w, f, fh, fw, stride, pad = row.shape
        out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, pad=pad)
        x = _normal(k1, G.image_shape(row.layout, n, c, h, w), row.dtype)
        filt = _normal(k2, G.local_filter_shape(row.layout, out_hw, f, c, fh, fw), row.dtype) * \
            jnp.asarray(0.05, row.dtype)
        g = _normal(k3, G.image_shape(row.layout, n, f, *out_hw), row.dtype)
        return x, filt, g, _lax_local_kernel(filt, row.layout)
    if row.kind == "norm":
        n, c, h, w = row.shape[1:5]
        return (_normal(k1, G.image_shape(row.layout, n, c, h, w), row.dtype),)
    n, c, h, w = row.shape[:4]
    return (_normal(k1, G.image_shape(row.layout, n, c, h, w), row.dtype),)


def _lax_local_kernel(filters, layout):
    """Our locally connected filters as lax.conv_general_dilated_local's kernel
    (Ho, Wo, C * fh * fw, F), rows in (c, i, j) order: C01B's filters reshaped."""
    if layout == "NHWC":
        filters = jnp.transpose(filters, (0, 1, 4, 2, 3, 5))
    return filters.reshape(*filters.shape[:2], -1, filters.shape[-1])


def _local_functions(row: Row, inputs):
    """Locally connected rows: ours (local_filter_acts) against lax.conv_general_dilated_local,
    each given the filters in its own layout. bprop_filter returns lax's kernel layout, so ours
    includes the rearrangement of its gradient (a transpose in NHWC, a reshape in C01B)."""
    n, c, h, w, f, fh, fw, stride, pad = row.shape
    _, ours_prec, xla_prec = CONV_CONFIGS[row.config]
    out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, pad=pad)
    pads = G.conv_padding((h, w), (fh, fw), stride, pad, None)[1]
    flop = 2 * n * f * out_hw[0] * out_hw[1] * c * fh * fw
    dimension_numbers = (_DIMENSION_NUMBERS[row.layout][0], "HWIO",
                         _DIMENSION_NUMBERS[row.layout][2])

    def ours(x, k):
        return jcn.local_filter_acts(x, k, stride=stride, pad=pad, layout=row.layout,
                                     precision=ours_prec)

    def xla(x, k):
        return lax.conv_general_dilated_local(x, k, (stride, stride), pads, (fh, fw),
                                              dimension_numbers=dimension_numbers,
                                              precision=xla_prec)

    x, k, g, k_lax = inputs
    if row.op == "fprop":
        return (lambda x, k, k_lax: ours(x, k)), (lambda x, k, k_lax: xla(x, k_lax)), \
            (x, k, k_lax), flop
    if row.op == "bprop_data":
        wrap = lambda conv: lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]
        return (lambda x, k, k_lax, g: wrap(ours)(x, k, g)), \
            (lambda x, k, k_lax, g: wrap(xla)(x, k_lax, g)), (x, k, k_lax, g), flop
    wrap = lambda conv: lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]
    return (lambda x, k, k_lax, g: _lax_local_kernel(wrap(ours)(x, k, g), row.layout)), \
        (lambda x, k, k_lax, g: wrap(xla)(x, k_lax, g)), (x, k, k_lax, g), flop


def row_functions(row: Row, inputs, partial_sum=None):
    """(ours, xla, args, work): two functions of ``args`` and the flop / byte count."""
    if row.kind == "local":
        return _local_functions(row, inputs)
    if row.kind in ("conv", "groups"):
        n, c, h, w, f, fh, fw, stride, pad = row.shape[:9]
        groups = row.shape[9] if row.kind == "groups" else 1
        pads = ((pad, pad), (pad, pad))
        _, ours_prec, xla_prec = CONV_CONFIGS[row.config]
        oh, ow = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, padding=pads)
        flop = 2 * n * f * oh * ow * (c // groups) * fh * fw
        group_kw = dict(groups=groups) if groups > 1 else {}

        def ours(x, k):
            return jcn.filter_acts(x, k, stride=stride, padding=pads, layout=row.layout,
                                   precision=ours_prec, partial_sum=partial_sum, **group_kw)

        def xla(x, k):
            return lax.conv_general_dilated(x, k, (stride, stride), pads,
                                            dimension_numbers=_DIMENSION_NUMBERS[row.layout],
                                            feature_group_count=groups, precision=xla_prec)

        x, k, g = inputs
        if row.op == "fprop":
            return ours, xla, (x, k), flop
        if row.op == "bprop_data":
            wrap = lambda conv: lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]
        else:
            wrap = lambda conv: lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]
        return wrap(ours), wrap(xla), (x, k, g), flop

    if row.kind == "norm":
        return _norm_functions(row, inputs)
    n, c, h, w, ds, stride = row.shape
    itemsize = np.dtype(jnp.dtype(row.dtype)).itemsize
    (x,) = inputs
    window = [1] * 4
    strides = [1] * 4
    ax = G.image_axes(row.layout)
    window[ax["h"]] = window[ax["w"]] = ds
    strides[ax["h"]] = strides[ax["w"]] = stride

    if row.kind == "avgpool":
        def ours(x):
            return jcn.avg_pool(x, ds, stride=stride, padding="VALID", layout=row.layout)

        def xla(x):  # flax.linen.avg_pool's formula
            return lax.reduce_window(x, 0.0, lax.add, tuple(window), tuple(strides),
                                     "VALID") / (ds * ds)
    else:
        def ours(x):
            return jcn.max_pool(x, ds, stride=stride, padding="VALID", layout=row.layout)

        def xla(x):
            return lax.reduce_window(x, -jnp.inf, lax.max, tuple(window),
                                     tuple(strides), "VALID")

    nx = n * c * h * w
    ny = math.prod(jax.eval_shape(ours, x).shape)
    if row.op == "fwd":
        return ours, xla, (x,), (nx + ny) * itemsize
    g = _normal(jax.random.key(1), jax.eval_shape(ours, x).shape, row.dtype)
    if row.kind == "avgpool":  # bytes: x, y forward; g, dx backward (itemsize each)
        if row.op == "train":
            wrap = lambda pool: lambda x, g: jax.value_and_grad(lambda x: jnp.vdot(pool(x), g))(x)
            return wrap(ours), wrap(xla), (x, g), 2 * (nx + ny) * itemsize
        wrap = lambda pool: lambda x, g: jax.grad(lambda x: jnp.vdot(pool(x), g))(x)
        return wrap(ours), wrap(xla), (x, g), (nx + ny) * itemsize
    if row.op == "train":  # bytes: x, dx, y, g (itemsize each); winners written and read
        wrap = lambda pool: lambda x, g: jax.value_and_grad(lambda x: jnp.vdot(pool(x), g))(x)
        winner_bytes = 1 if ds * ds <= 256 else 4
        return wrap(ours), wrap(xla), (x, g), 2 * (nx + ny) * itemsize + 2 * ny * winner_bytes
    wrap = lambda pool: lambda x, g: jax.grad(lambda x: jnp.vdot(pool(x), g))(x)
    return wrap(ours), wrap(xla), (x, g), (2 * nx + ny) * itemsize


def _shifted_norm(x, kind, size, *, add_scale, pow_scale, min_div, layout):
    """A response norm in jnp whose window sums add ``size`` shifted slices of the padded squares
    (per axis: rows then columns for the same-map op), which XLA fuses into one loop."""
    ax = G.image_axes(layout)
    f = jnp.float32 if x.dtype != jnp.float64 else jnp.float64
    xf = x.astype(f)
    s = xf * xf
    for axis in ((ax["c"],) if kind == "cross" else (ax["h"], ax["w"])):
        pads = [(0, 0)] * x.ndim
        pads[axis] = (size // 2, size - 1 - size // 2)
        padded = jnp.pad(s, pads)
        s = sum(lax.slice_in_dim(padded, j, j + x.shape[axis], axis=axis) for j in range(size))
    return (xf * (min_div + add_scale * s) ** -pow_scale).astype(x.dtype)


# The XLA composites the norm rows time ours against (suffix of the row's config): the reference
# (a lax.reduce_window sum) and the shifted-slices sum.
NORM_XLA = {"": "reduce_window", "-slices": "shifted slices"}


def _norm_functions(row: Row, inputs):
    """Response-norm rows: ours against an XLA composite (``NORM_XLA``: config "f32" the pure-lax
    reference ``jax_convnet.reference``, a ``lax.reduce_window`` sum of squares; "f32-slices"
    ``_shifted_norm``). Bytes: "fwd" reads x and writes y;
    "train" (``jax.value_and_grad``) moves the design's bytes: x read, y and the denominators d
    written forward, the cotangents, x and d read and the gradient written backward (d is float32
    for float16, the operands' dtype otherwise)."""
    kind, n, c, h, w, size, add_scale, pow_scale, min_div = row.shape
    itemsize = np.dtype(jnp.dtype(row.dtype)).itemsize
    d_itemsize = G.norm_residual_dtype(jnp.dtype(row.dtype)).itemsize
    kw = dict(add_scale=add_scale, pow_scale=pow_scale, min_div=min_div, layout=row.layout)
    (x,) = inputs
    module_op = lambda m: ((lambda x: m.response_norm(x, size, **kw)) if kind == "same"
                           else (lambda x: m.cross_map_norm(x, size, **kw)))
    ours = module_op(jcn)
    if row.config.endswith("-slices"):
        xla = functools.partial(_shifted_norm, kind=kind, size=size, **kw)
    else:
        xla = module_op(jcn.reference)
    nx = n * c * h * w
    if row.op == "fwd":
        return ours, xla, (x,), 2 * nx * itemsize
    g = _normal(jax.random.key(1), x.shape, row.dtype)
    wrap = lambda norm: lambda x, g: jax.value_and_grad(
        lambda x: jnp.vdot(norm(x), g).astype(jnp.float32))(x)
    return wrap(ours), wrap(xla), (x, g), nx * (5 * itemsize + 2 * d_itemsize)


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


# ----------------------------------------------------------------------------- networks

NET_DTYPES = {"f32": "float32", "bf16": "bfloat16"}
# Our step against XLA's on the same parameters and data, before timing: bounds on
# |loss difference| / |loss| and, for every parameter, ||our update - XLA's|| / ||XLA's update||
# (update: learning rate times gradient). float32 at full precision (the CPU; on a GPU, steps
# compiled at precision highest) agrees to ~1e-6 (CPU, AlexNet: 1e-7 and 3e-6). In bfloat16 the
# rounding points differ and pooled ties break on different values: up to ~1e-1 on the first
# layer's update (AlexNet, CPU); "tf32" bounds the timed float32 steps on a GPU, which may round
# to TF32 (10 bits) on either side. XLA's own float32 convolutions at precision highest on a GPU
# are not float32-exact (cuDNN's algorithms; tests/test_gpu.py judges ours against float64
# instead): "f32-gpu" bounds that check (H200, AlexNet: 1.7e-5 and 6.5e-3 seen). A different
# network (say, flipped filters) is off by order 1.
NET_TOLERANCE = {"f32": (1e-5, 1e-3), "f32-gpu": (1e-4, 2e-2), "tf32": (2e-2, 0.2),
                 "bf16": (2e-2, 0.2)}
NET_HEADER = (f"{'net':<11} {'dtype':<5} {'layout':<6} {'XLA ms':>9} {'ours ms':>9} "
              f"{'XLA/ours':>8} {'XLA best/ours':>13}  check: loss, update err")


def net_rows(*, batch=None, alexnet_size=None, filters=None, models=True) -> list[dict]:
    """One row per net, dtype and layout: name, net, config, dtype, layout, batch, image_size;
    with ``models`` the cfg networks of ``jax_convnet.models`` too (``_nets.MODEL_NETS``), which
    need Flax (left out without it)."""
    import importlib.util
    from jax_convnet import _nets
    rows = []
    models = models and importlib.util.find_spec("flax") is not None
    for net in (_nets.ALL_NETS if models else _nets.NETS).values():
        size = (alexnet_size if net.name.startswith("alexnet") and alexnet_size
                else net.image_size)
        _nets.feature_sizes(net, size)  # ValueError now if the images are too small
        for config, dtype in NET_DTYPES.items():
            for layout in LAYOUTS:
                rows.append(dict(name=f"net/{net.name}/{config}/{layout}", kind="net",
                                 op="train_step", layer=net.name, net=net.name, layout=layout,
                                 dtype=dtype, config=config, batch=batch or net.batch,
                                 image_size=size))
    if filters:
        rows = [r for r in rows if any(f in r["name"] for f in filters)]
    return rows


@jax.jit
def _update_errors(params, ours, xla):
    """||ours - xla|| / ||xla - params|| per parameter (float32 differences of float32 values are
    exact to rounding of the result)."""
    return [jnp.linalg.norm((a - b).ravel()) /
            jnp.maximum(jnp.linalg.norm((b - p).ravel()), 1e-30)
            for p, a, b in zip(*(jax.tree.leaves(t) for t in (params, ours, xla)))]


def _net_step_check(steps, params, x, y) -> tuple[float, float, float, float]:
    """(our loss, XLA's loss, loss relative error, largest update relative error)."""
    (p_ours, loss_ours), (p_xla, loss_xla) = (steps[o](params, x, y) for o in ("ours", "xla"))
    loss_ours, loss_xla = float(loss_ours), float(loss_xla)
    loss_err = abs(loss_ours - loss_xla) / max(abs(loss_xla), 1e-30)
    update_err = max(float(e) for e in _update_errors(params, p_ours, p_xla))
    return loss_ours, loss_xla, loss_err, update_err


def _compile_both(fns: dict, args, *, threads: int, **jit_kwargs) -> dict:
    """{name: (executable, seconds)}: traced here (under the caller's config), then compiled
    in ``threads`` threads (XLA's compiler releases the GIL; on the CPU compiling is most of a
    --nets run; on a GPU one at a time, as XLA's autotuning times kernels while compiling)."""
    import concurrent.futures

    def compile_lowered(lowered):
        t = time.perf_counter()
        return lowered.compile(), time.perf_counter() - t
    lowered = {name: jax.jit(fn, **jit_kwargs).lower(*args) for name, fn in fns.items()}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = {name: pool.submit(compile_lowered, low) for name, low in lowered.items()}
        return {name: f.result() for name, f in futures.items()}


def run_net_row(row: dict, *, gpu: bool, reps: int, inner: int) -> dict:
    """Compiles our training step and XLA's, checks that they agree, times both."""
    from jax_convnet import _nets
    net, layout, dtype = _nets.ALL_NETS[row["net"]], row["layout"], jnp.dtype(row["dtype"])
    size, batch = row["image_size"], row["batch"]
    params = _nets.init_params(net, layout, 0, size)
    x, y = _nets.make_batch(net, layout, 1, batch=batch, image_size=size)
    args = (params, x, y)

    def compile_steps():
        return _compile_both({ops: _nets.train_step(net, ops=ops, layout=layout, dtype=dtype)
                              for ops in _nets.OPS}, args, threads=1 if gpu else 2)
    compiled = compile_steps()
    steps = {ops: c for ops, (c, _) in compiled.items()}
    # (precision, executables, bounds); the first check is the tightest, shown in the table.
    if gpu and row["config"] == "f32":  # the same steps at float32 accuracy, then the timed ones
        with jax.default_matmul_precision("highest"):
            highest = {ops: c for ops, (c, _) in compile_steps().items()}
        checks = [("highest", highest, NET_TOLERANCE["f32-gpu"]),
                  ("default", steps, NET_TOLERANCE["tf32"])]
        del highest
    else:
        checks = [("default", steps, NET_TOLERANCE[row["config"]])]
    r = dict(row, checks=[])
    for precision, executables, (loss_tol, update_tol) in checks:
        loss, xla_loss, loss_err, update_err = _net_step_check(executables, *args)
        r["checks"].append(dict(precision=precision, loss=loss, xla_loss=xla_loss,
                                loss_rel_err=loss_err, update_rel_err=update_err,
                                bounds=[loss_tol, update_tol]))
        if not (loss_err <= loss_tol and update_err <= update_tol):
            r["error"] = (f"our step and XLA's disagree (precision {precision}): loss "
                          f"{loss:.6g} vs {xla_loss:.6g} (relative error {loss_err:.1e}, bound "
                          f"{loss_tol:g}), update error {update_err:.1e} (bound {update_tol:g})")
    del checks
    r.update({k: r["checks"][0][k] for k in ("loss", "xla_loss", "loss_rel_err",
                                             "update_rel_err")})
    if "error" in r:
        return r
    return _time_steps(r, steps, compiled, args, gpu=gpu, reps=reps, inner=inner)


def _time_steps(r: dict, steps, compiled, args, *, gpu, reps, inner) -> dict:
    """r with our step's and XLA's times, their ratio and compile times. The checks ran the
    steps once already: on the CPU (~1 s a step) that is their warm-up."""
    warmup = 2 if gpu else 0
    ms = time_fn(steps["ours"], args, reps=reps, inner=inner, warmup=warmup)
    xla_ms = time_fn(steps["xla"], args, reps=reps, inner=inner, warmup=warmup)
    r.update(ms=ms, xla_ms=xla_ms, ratio=xla_ms / ms, compile_s=round(compiled["ours"][1], 3),
             xla_compile_s=round(compiled["xla"][1], 3))
    return r


def add_best_layout_ratios(results) -> None:
    """ratio_best: XLA's time in its faster layout (same net and dtype) over ours."""
    best = {}
    for r in results:
        if "xla_ms" in r:
            key = (r["net"], r["config"])
            if key not in best or r["xla_ms"] < best[key][0]:
                best[key] = (r["xla_ms"], r["layout"])
    for r in results:
        if "ms" in r:
            r["xla_best_ms"], r["xla_best_layout"] = best[(r["net"], r["config"])]
            r["ratio_best"] = r["xla_best_ms"] / r["ms"]


def format_net_row(r) -> str:
    head = f"{r['net']:<11} {r['config']:<5} {r['layout']:<6}"
    check = ""
    if "loss_rel_err" in r:
        check = f"  {r['loss_rel_err']:.1e}, {r['update_rel_err']:.1e}"
    if "ms" not in r:
        return f"{head} ERROR {r.get('error')}"
    best = (f"{r['ratio_best']:9.2f} ({r['xla_best_layout']})" if "ratio_best" in r
            else " " * 13)
    return (f"{head} {r['xla_ms']:9.3f} {r['ms']:9.3f} {r['ratio']:8.2f} {best}{check}")


def _write_json(args, device, native, results, path, **meta):
    os.makedirs(args.out, exist_ok=True)
    meta = dict(jax_convnet=jcn.__version__, jax=jax.__version__, platform=device.platform,
                device_kind=device.device_kind, native_kernels=native,
                python=_platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                args=vars(args), nvidia_tf32_override=os.environ.get("NVIDIA_TF32_OVERRIDE"),
                **meta)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=results), f, indent=1)


def _run_step_row(run, row: dict, device) -> dict:
    """``run()``'s row (or the row with the error that ended it: one failing row must not end
    the run), stamped with the jax version and device, its times printed as it ends."""
    try:
        r = run()
    except Exception as e:
        r = dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    r.update(jax=jax.__version__, platform=device.platform, device_kind=device.device_kind)
    print(f"  {r['name']}: " + ("ERROR " + r["error"] if "error" in r else
                                f"ours {r['ms']:.3f} ms, XLA {r['xla_ms']:.3f} ms"), flush=True)
    return r


def _net_repetitions(args, gpu: bool) -> tuple[int, int]:
    """(timed measurements, calls per measurement) of a training-step run."""
    return args.reps or (11 if gpu else 3), args.inner or (5 if gpu else 1)


def _print_net_header(device, native, n_rows, reps, inner, *, devices):
    print(f"jax_convnet {jcn.__version__}, jax {jax.__version__}, {devices}{device.platform} "
          f"({device.device_kind}); native kernels: "
          f"{'yes' if native else 'NO (ours lowers the pure-lax reference)'}; {n_rows} "
          f"training steps, median of {reps} x {inner} calls", flush=True)


def run_nets(args, device, native) -> list[dict]:
    """``--nets``: the training-step table, printed and written to ``--out``/nets.json."""
    gpu = device.platform != "cpu"
    rows = net_rows(batch=args.batch, alexnet_size=args.alexnet_size, filters=args.filter)
    if args.list:
        print("\n".join(r["name"] for r in rows))
        return []
    reps, inner = _net_repetitions(args, gpu)
    _print_net_header(device, native, len(rows), reps, inner, devices="")
    t_start = time.perf_counter()
    results = []
    for row in rows:
        results.append(_run_step_row(
            lambda: run_net_row(row, gpu=gpu, reps=reps, inner=inner), row, device))
    add_best_layout_ratios(results)
    wall = time.perf_counter() - t_start
    print(f"\nwhole training steps (forward, backward, SGD) in {wall:.1f} s; batch and image size:"
          + "".join(f" {n} {b}x{s}x{s}" for n, b, s in
                    dict.fromkeys((r["net"], r["batch"], r["image_size"]) for r in results)))
    print(NET_HEADER)
    print("\n".join(format_net_row(r) for r in results))
    path = os.path.join(args.out, "nets.json")
    _write_json(args, device, native, results, path, reps=reps, inner=inner,
                wall_s=round(wall, 1))
    print(f"wrote {path}")
    return results


# ----------------------------------------------------------------------------- several devices

# Collective operations counted in a compiled step's HLO (async pairs count once, by -start).
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"=\s*(\S.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# mode: (mesh shape (data, model) for N devices, global batch for the net's batch b)
DEVICE_MODES = {
    "weak": (lambda n: (n, 1), lambda b, n: b * n),    # per-device batch fixed
    "strong": (lambda n: (n, 1), lambda b, n: b),      # global batch fixed
    "model": (lambda n: (n // 2, 2), lambda b, n: b),  # global batch fixed, filters split in 2
}
DEVICE_HEADER = (f"{'row':<34} {'mesh':>5} {'batch':>5} {'XLA ms':>9} {'ours ms':>9} "
                 f"{'XLA/ours':>8} {'XLA eff':>7} {'ours eff':>8}  collectives ours | XLA "
                 f"(ag ar rs a2a cp)  check: vs XLA, vs 1 device")


def count_collectives(hlo_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """How many of each collective a compiled module (``compiled.as_text()``) runs, and how
    many arrays they move in all (XLA combines collectives into ones over tuples)."""
    ops, arrays = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0)
    for result_type, kind in _COLLECTIVE_RE.findall(hlo_text):
        ops[kind] += 1
        arrays[kind] += len(re.findall(r"\b[a-z]\w*\[", result_type))
    return ops, arrays


def device_net_rows(counts, *, batch=None, alexnet_size=None, filters=None) -> list[dict]:
    """``--nets --devices``: per net, dtype and layout, the one-device step (``.../1``), then for
    each N in ``counts`` the data-parallel step with the batch per device fixed (``weak/N``) and
    the global batch fixed (``strong/N``), and for nets with ``model_split`` where N is even,
    the (N/2 data) x (2 model) step at the global batch (``model/N``). Rows of a group share
    their one-device row, which ``--filter`` always keeps."""
    from jax_convnet import _nets
    rows = []
    for base in net_rows(batch=batch, alexnet_size=alexnet_size, models=False):
        net, b = _nets.NETS[base["net"]], base["batch"]
        group = [dict(base, name=base["name"] + "/1", mode="one", devices=1, mesh=(1, 1),
                      global_batch=b)]
        for n in counts:
            for mode, (mesh_shape, global_batch) in DEVICE_MODES.items():
                if mode == "model" and (n % 2 or not net.model_split):
                    continue
                shape = mesh_shape(n)
                if global_batch(b, n) % shape[0]:
                    raise ValueError(f"batch {b} does not split evenly over {shape[0]} devices "
                                     f"({mode}/{n}): choose --batch divisible by each N")
                group.append(dict(base, name=f"{base['name']}/{mode}/{n}", mode=mode,
                                  devices=n, mesh=shape, global_batch=global_batch(b, n)))
        chosen = [r for r in group[1:] if not filters or any(f in r["name"] for f in filters)]
        if chosen or not filters or any(f in group[0]["name"] for f in filters):
            rows += group[:1] + chosen
    return rows


def _to_host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def run_device_row(row: dict, *, gpu: bool, reps: int, inner: int, one_device: dict) -> dict:
    """Compiles our step and XLA's with the batch (and filters) split over a mesh of
    ``row["devices"]`` devices, checks ours against XLA's and against the one-device step at the
    same global batch (``one_device``: {global batch: (params, new params, loss)} on the host,
    filled here), counts the collectives, times both."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax_convnet import _nets
    net, layout, dtype = _nets.NETS[row["net"]], row["layout"], jnp.dtype(row["dtype"])
    size, batch, n = row["image_size"], row["global_batch"], row["devices"]
    if len(jax.devices()) < n:
        raise ValueError(f"{n} devices wanted, {len(jax.devices())} present")
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(row["mesh"]), ("data", "model"))
    p_sh, x_sh, y_sh = _nets.step_shardings(net, layout, mesh, model=row["mode"] == "model")
    params = _nets.init_params(net, layout, 0, size)
    x, y = _nets.make_batch(net, layout, 1, batch=batch, image_size=size)
    args = (jax.device_put(params, p_sh), jax.device_put(x, x_sh), jax.device_put(y, y_sh))
    compiled = _compile_both(
        {ops: _nets.train_step(net, ops=ops, layout=layout, dtype=dtype) for ops in _nets.OPS},
        args, threads=1 if gpu else 2, in_shardings=(p_sh, x_sh, y_sh),
        out_shardings=(p_sh, NamedSharding(mesh, P())))
    steps = {ops: c for ops, (c, _) in compiled.items()}
    # The timed steps on both sides: on a GPU float32 may round to TF32 in either.
    loss_tol, update_tol = NET_TOLERANCE["tf32" if gpu and row["config"] == "f32"
                                          else row["config"]]
    r = dict(row, bounds=[loss_tol, update_tol])
    for prefix, ops in (("", "ours"), ("xla_", "xla")):
        r[prefix + "collectives"], r[prefix + "collective_arrays"] = count_collectives(
            steps[ops].as_text())
    ours_out, xla_out = (_to_host(steps[ops](*args)) for ops in ("ours", "xla"))
    host_params = _to_host(params)
    loss, xla_loss = float(ours_out[1]), float(xla_out[1])
    loss_err = abs(loss - xla_loss) / max(abs(xla_loss), 1e-30)
    update_err = max(float(e) for e in _update_errors(host_params, ours_out[0], xla_out[0]))
    r.update(loss=loss, xla_loss=xla_loss, loss_rel_err=loss_err, update_rel_err=update_err)
    if n == 1:  # this is the one-device step; later rows of the group compare with it
        one_device[batch] = ours_out
    elif batch not in one_device:  # the one-device step of this global batch (ours)
        one = jax.devices()[0]
        single = jax.jit(_nets.train_step(net, ops="ours", layout=layout, dtype=dtype))
        one_device[batch] = _to_host(single(*jax.device_put((params, x, y), one)))
    want_params, want_loss = one_device[batch]
    r["one_device_loss_rel_err"] = abs(float(ours_out[1]) - float(want_loss)) / max(
        abs(float(want_loss)), 1e-30)
    r["one_device_update_rel_err"] = max(float(e) for e in _update_errors(
        host_params, ours_out[0], want_params))
    again = _to_host(steps["ours"](*args))
    r["reproducible"] = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(again), jax.tree.leaves(ours_out)))
    problems = []
    if not (loss_err <= loss_tol and update_err <= update_tol):
        problems.append(f"our step and XLA's disagree: loss relative error {loss_err:.1e}, "
                        f"update error {update_err:.1e}")
    if not (r["one_device_loss_rel_err"] <= loss_tol
            and r["one_device_update_rel_err"] <= update_tol):
        problems.append(f"the step on {n} devices differs from one device's: loss relative "
                        f"error {r['one_device_loss_rel_err']:.1e}, update error "
                        f"{r['one_device_update_rel_err']:.1e}")
    if problems:
        r["error"] = f"{'; '.join(problems)} (bounds {loss_tol:g}, {update_tol:g})"
        return r
    return _time_steps(r, steps, compiled, args, gpu=gpu, reps=reps, inner=inner)


def add_scaling_efficiency(results) -> None:
    """efficiency (ours), xla_efficiency: the one-device time of the group over N times the
    time per sample on N devices, i.e. t1 / tN for weak scaling (N times the samples in tN) and
    t1 / (N tN) for a fixed global batch; 1 is perfect scaling."""
    one = {}
    for r in results:
        if r["mode"] == "one" and "ms" in r:
            one[(r["net"], r["config"], r["layout"])] = r
    for r in results:
        base = one.get((r["net"], r["config"], r["layout"]))
        if "ms" not in r or base is None:
            continue
        samples = r["global_batch"] / base["global_batch"]  # N (weak) or 1
        for key, eff in (("ms", "efficiency"), ("xla_ms", "xla_efficiency")):
            r[eff] = base[key] * samples / (r["devices"] * r[key])


def format_device_row(r) -> str:
    head = f"{r['name']:<34} {'x'.join(map(str, r['mesh'])):>5} {r['global_batch']:>5}"
    if "ms" not in r:
        return f"{head} ERROR {r.get('error')}"

    def coll(c):
        return " ".join(str(c[k]) for k in COLLECTIVES)
    eff = (f"{r['xla_efficiency']:7.2f} {r['efficiency']:8.2f}" if "efficiency" in r
           else " " * 16)
    return (f"{head} {r['xla_ms']:9.3f} {r['ms']:9.3f} {r['ratio']:8.2f} {eff}  "
            f"{coll(r['collectives'])} | {coll(r['xla_collectives'])}  "
            f"{r['update_rel_err']:.1e}, {r['one_device_update_rel_err']:.1e}")


def run_nets_devices(args, device, native) -> list[dict]:
    """``--nets --devices``: the scaling table, printed and written to --out/nets_devices.json."""
    gpu = device.platform != "cpu"
    try:
        counts = sorted({int(c) for c in args.devices.split(",") if c.strip()})
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or (max(counts) > len(jax.devices()) and not args.list):
        raise SystemExit(f"--devices takes counts from 1 to the {len(jax.devices())} devices "
                         f"present, got {args.devices!r}")
    counts = [c for c in counts if c > 1]
    try:
        rows = device_net_rows(counts, batch=args.batch, alexnet_size=args.alexnet_size,
                               filters=args.filter)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.list:
        print("\n".join(r["name"] for r in rows))
        return []
    reps, inner = _net_repetitions(args, gpu)
    _print_net_header(device, native, len(rows), reps, inner,
                      devices=f"{len(jax.devices())} x ")
    t_start = time.perf_counter()
    results, one_device = [], {}
    for row in rows:
        if row["mode"] == "one":
            one_device = {}  # a new group: new network, dtype or layout
        results.append(_run_step_row(
            lambda: run_device_row(row, gpu=gpu, reps=reps, inner=inner, one_device=one_device),
            row, device))
    add_scaling_efficiency(results)
    wall = time.perf_counter() - t_start
    print(f"\ntraining steps over several devices in {wall:.1f} s; eff: scaling efficiency "
          f"against the one-device row (weak: same batch per device; strong, model: same "
          f"global batch)")
    print(DEVICE_HEADER)
    print("\n".join(format_device_row(r) for r in results))
    path = os.path.join(args.out, "nets_devices.json")
    _write_json(args, device, native, results, path, reps=reps, inner=inner,
                wall_s=round(wall, 1), device_count=len(jax.devices()))
    print(f"wrote {path}")
    return results


# ----------------------------------------------------------------------------- main

class _HelpFormatter(argparse.HelpFormatter):
    """Each default said once: appended where the help text does not already say it, and not
    for flags and options that default to nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jax_convnet.benchmark", description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller set of rows")
    p.add_argument("--ops", default="conv,pool,avgpool",
                   help="comma-separated: conv, pool (max pool), avgpool, norm (cross_map_norm / "
                        "response_norm), local (the CIFAR-10 11%% net's locally connected "
                        "layers), groups (AlexNet's two-group convolutions)")
    p.add_argument("--filter", action="append", default=None, metavar="TEXT",
                   help="keep rows whose name contains TEXT (repeat: any of them); names look "
                        "like conv/L1/fprop/f32-highest/NHWC, pool/alexpool1/3x3s2/bwd/bf16/C01B")
    p.add_argument("--reps", type=int, default=None,
                   help="timed measurements per function (median taken; default 11 on GPU, "
                        "7 on CPU, 3 on CPU with --nets)")
    p.add_argument("--inner", type=int, default=None,
                   help="time loops of this many host calls per measurement (default: 1 on "
                        "CPU; on GPU the calls are repeated inside one executable instead; "
                        "--nets on GPU: 5)")
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
    p.add_argument("--nets", action="store_true",
                   help="time whole training steps (AlexNet, cuda-convnet's CIFAR-10 net, "
                        "jax_convnet.models' cifar18, alexnet_cmr, cifar11) instead of single "
                        "ops; writes nets.json")
    p.add_argument("--alexnet-size", type=int, default=None, metavar="PX",
                   help="--nets: AlexNet's (and alexnet_cmr's) input height and width (default "
                        "224; at least 51, alexnet_cmr 52; the dense layer's input follows)")
    p.add_argument("--devices", default=None, metavar="N[,N...]",
                   help="--nets: the steps with the batch split over the first N devices (weak "
                        "and strong scaling; AlexNet also with conv3-conv5's filters split over "
                        "2), each against the one-device step; writes nets_devices.json")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    bad = [o for o in ops if o not in ("conv", "pool", "avgpool", "norm", "local", "groups")]
    if bad or not ops:
        raise SystemExit(f"--ops takes conv, pool, avgpool, norm, local and / or groups, got "
                         f"{args.ops!r}")
    partial_sum = args.partial_sum
    if partial_sum not in (None, "auto"):
        partial_sum = int(partial_sum)

    if args.no_fft:
        jcn.conv.FFT_WORKSPACE_CAP_BYTES = 0
    if args.xla_no_tf32:  # read when cuDNN starts: before the first use of the GPU
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    device = jax.devices()[0]
    gpu = device.platform != "cpu"
    native_platform = "cuda" if device.platform == "gpu" else device.platform
    native = jcn.has_native(native_platform) if native_platform in ("cpu", "cuda") else False
    if args.devices and not args.nets:
        raise SystemExit("--devices goes with --nets")
    if args.nets:
        if args.devices:
            return run_nets_devices(args, device, native)
        return run_nets(args, device, native)
    row_set = device.platform if args.set == "auto" else args.set
    rows = build_rows(row_set, quick=args.quick, ops=ops, batch=args.batch,
                      filters=args.filter)
    if args.list:
        print("\n".join(r.name for r in rows))
        return []
    reps = args.reps or (11 if gpu else 7)
    inner = args.inner or 1

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
    if any(r.kind in ("pool", "avgpool", "norm") for r in rows):  # judged against it
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
                # A memory-bound row faster than the measured copy rate allows is a timing fault
                # (noise in the difference of two medians): timed again, at most twice.
                for _ in range(2 if row.kind not in ("conv", "local") and copy_gbps else 0):
                    if ms < work / (1.1 * copy_gbps * 1e6):
                        ms = time_on_device(ours_fn, ours, fn_args, reps=reps)
                    if xla_ms < work / (1.1 * copy_gbps * 1e6):
                        xla_ms = time_on_device(xla_fn, xla, fn_args, reps=reps)
            else:
                ms = time_fn(ours, fn_args, reps=reps, inner=inner)
                xla_ms = time_fn(xla, fn_args, reps=reps, inner=inner)
            r.update(ms=ms, xla_ms=xla_ms, ratio=xla_ms / ms, max_rel_err=err,
                     compile_s=round(t_ours, 3), xla_compile_s=round(t_xla, 3))
            if row.kind in ("conv", "local", "groups"):
                r.update(flop=work, tflops=work / ms / 1e9, xla_tflops=work / xla_ms / 1e9)
                if row.kind in ("conv", "groups"):  # each conv call's workspace parts
                    # (jcn.explain; a grouped call's: each of its per-group calls'), and on an
                    # H200 (the device explain describes) its route and tile
                    h200 = "H200" in jax.devices()[0].device_kind
                    r["paths"] = [dict(op=c["op"], workspace=c["paths"],
                                       **({"route": c["route"], "tile_n": c["tile_n"]} if h200
                                          else {}))
                                  for c in jcn.explain(ours_fn, *fn_args)]
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

    json_path = os.path.join(args.out, "benchmark.json")
    _write_json(args, device, native, results, json_path, reps=reps, wall_s=round(wall, 1),
                rows_skipped=skipped, copy_gbps=copy_gbps)
    png = plot(results, os.path.join(args.out, "benchmark.png"),
               f"jax_convnet vs XLA on {device.device_kind} ({device.platform}), "
               f"jax {jax.__version__}")
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
