"""A small representative run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck,
initcheck; benchmarks/gpu_check.sh's sanitize stage). Every path the conv plan can choose
(csrc/cuda/conv_launch.cuh, run()) and every pool kernel (csrc/cuda/pool.cu) runs at least once,
at the smallest shapes that take it (a comment per block names its paths), except the 64-bit
index kernels of tensors past 2^30 elements (tests/test_gpu_large.py runs those).
`sanitize_subset.py tma` runs only the Hopper TMA kernels' part. New ops add their block at the
end of the file."""
import itertools
import math
import os
import sys

import jax
import jax.numpy as jnp

import jax_convnet as jcn

assert jcn.has_native("cuda"), "CUDA module missing"
key = jax.random.key(0)


def tma_kernels():
    """Hopper's TMA kernels (16-bit, and TF32 where it runs: NHWC filter_acts with its taps'
    copy, NHWC image_acts, C01B weight_acts): all three ops in both layouts, every mode
    (filter_acts, image_acts at stride 1, weight_acts' split sums), a partial run of images, a
    partial channel block, padding and a ceil-rule overhang, two tile widths."""
    for layout, dtype in itertools.product(("C01B", "NHWC"), (jnp.bfloat16, jnp.float32)):
        for f, c, window, kw in ((192, 64, (3, 3), dict(pad=1)),
                                 (40, 40, (2, 3), dict(pad=(0, 1), stride=(2, 1)))):
            x = jax.random.normal(key, jcn.geometry.image_shape(layout, 72, c, 9, 8), dtype)
            w = jax.random.normal(key, jcn.geometry.filter_shape(layout, f, c, *window), dtype)
            loss = lambda x, w: jnp.sum(jcn.filter_acts(
                x, w, layout=layout, **kw).astype(jnp.float32) ** 2)
            jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))


def tma_strided_kernels():
    """The TMA kernels at stride 2 (NHWC: im2col's traversal strides) with uneven padding, in
    float16 and TF32 (float32 at precision default, through the k-contiguous copies where the
    layout needs them): filter_acts (64 filters: 64-wide tiles) and weight_acts (3 x 3 taps:
    256-wide tiles); image_acts at stride 2 takes the mma kernel."""
    for (layout, n), dtype in itertools.product((("C01B", 64), ("NHWC", 8)),
                                              (jnp.float16, jnp.float32)):
        x = jax.random.normal(key, jcn.geometry.image_shape(layout, n, 64, 9, 8), dtype)
        w = jax.random.normal(key, jcn.geometry.filter_shape(layout, 64, 64, 3, 3), dtype)
        loss = lambda x, w: jnp.sum(jcn.filter_acts(
            x, w, layout=layout, stride=2, pad=(1, 0), precision="default").astype(
                jnp.float32) ** 2)
        jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))


def tma_3xtf32_kernels():
    """float32 at precision highest on the TMA kernels as 3xTF32 (JAX_CONVNET_TMA_3XTF32=1): the
    residue pass and three passes over K, every TF32 route (NHWC in place, C01B through NHWC
    copies, weight_acts in place and through C01B copies)."""
    os.environ["JAX_CONVNET_TMA_3XTF32"] = "1"
    try:
        for layout in ("C01B", "NHWC"):
            x = jax.random.normal(key, jcn.geometry.image_shape(layout, 72, 64, 9, 8))
            w = jax.random.normal(key, jcn.geometry.filter_shape(layout, 96, 64, 3, 3))
            loss = lambda x, w: jnp.sum(jcn.filter_acts(
                x, w, layout=layout, pad=1, precision="highest") ** 2)
            jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))
    finally:
        del os.environ["JAX_CONVNET_TMA_3XTF32"]


tma_kernels()
tma_strided_kernels()
tma_3xtf32_kernels()
if sys.argv[1:] == ["tma"]:
    print("subset ok")
    sys.exit(0)


# ---- The conv plan's paths the blocks further down do not reach ----

def conv_three(layout, dtype, n, c, f, hw, window, **kw):
    """filter_acts and its VJP in both operands (image_acts, weight_acts), in one jit."""
    x = jax.random.normal(key, jcn.geometry.image_shape(layout, n, c, *hw), dtype)
    w = jax.random.normal(key, jcn.geometry.filter_shape(layout, f, c, *window), dtype)
    loss = lambda x, w: jnp.sum(jcn.filter_acts(
        x, w, layout=layout, **kw).astype(jnp.float32) ** 2)
    jax.block_until_ready(jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w))


# FFMA with the 512 x 4 tile (N <= 8 columns, vector loads of A: 8 images in C01B): filter_acts
# into 6 filters and image_acts into 6 channels (more than the direct kernel's 4); weight_acts
# on the 128 x 64 FFMA tile. The mma kernel cannot read 6 filters 16 bytes at a time, and
# float32 at precision highest / 16-bit types with N < 16 take no wmma.
for dtype in (jnp.float32, jnp.bfloat16):
    conv_three("C01B", dtype, 8, 6, 6, (7, 7), (3, 3), pad=1, precision="highest")
# wmma (16-bit types; float32 at precision default as TF32) where the mma kernel cannot read
# the operands (C01B, 5 images): all three ops with N >= 16 (24 filters, 20 channels).
for dtype in (jnp.bfloat16, jnp.float32):
    conv_three("C01B", dtype, 5, 20, 24, (9, 8), (3, 3), pad=1, precision="default")
# mma.sync with the 128 x 128 tile (128 filters: filter_acts and weight_acts; image_acts into 16
# channels on the 128 x 32 one): bf16 C01B (filter_acts with the k table), float32 NHWC at
# precision highest (3xTF32). 16 channels fill too little of a 64-channel block for TMA.
conv_three("C01B", jnp.bfloat16, 8, 16, 128, (7, 6), (3, 3), pad=1)
conv_three("NHWC", jnp.float32, 8, 16, 128, (7, 6), (3, 3), pad=1, precision="highest")
# mma.sync reading NHWC images narrower than 16 bytes (kANarrowCopy): float32 of 5 channels one
# float at a time (filter_acts, weight_acts; 128 x 32 tiles); bfloat16 weight_acts of 12
# channels 4 at a time (8 bytes; its filter_acts of 12 channels takes wmma).
conv_three("NHWC", jnp.float32, 8, 5, 32, (9, 8), (3, 3), pad=1, precision="highest")
conv_three("NHWC", jnp.bfloat16, 8, 12, 32, (9, 8), (3, 3), pad=1)
# weight_acts' launch plan (float32 at precision highest, C01B: 16-bit NHWC would take TMA):
# - one segment with K (8 images x 144 positions) split into 3 chunks whose partial sums the
#   ordered reduce adds (2 tiles: fewer than the SMs);
conv_three("C01B", jnp.float32, 8, 16, 32, (12, 12), (3, 3), pad=1, precision="highest")
# - 144 segments (partial_sum 1) in two groups of partial-sum slots (16 MiB hold 113 of them),
#   folded into a float32 running sum;
conv_three("C01B", jnp.float32, 4, 64, 64, (12, 12), (3, 3), pad=1, precision="highest",
           partial_sum=1)
# - fused: each block folds the segments (2 positions, partial_sum 1) in registers, where there
#   are at least as many tiles as SMs (132 on H100 / H200): 1536 channels x 1536 filters, 1 x 1
#   filters, on mma.sync's 128 x 128 tiles (8 images: 144 tiles), FFMA's and wmma's 128 x 64
#   ones (5 images: no 16-byte vectors; 288 tiles). weight_acts alone: little work per tile.
def weight_acts_alone(n, c, f, hw, precision, partial_sum):
    x = jax.random.normal(key, jcn.geometry.image_shape("C01B", n, c, *hw), jnp.float32)
    g = jax.random.normal(key, jcn.geometry.image_shape("C01B", n, f, *hw), jnp.float32)
    w_shape = jcn.geometry.filter_shape("C01B", f, c, 1, 1)
    jax.block_until_ready(jax.jit(lambda x, g: jcn.weight_acts(
        x, g, w_shape, precision=precision, partial_sum=partial_sum))(x, g))


weight_acts_alone(8, 1536, 1536, (2, 1), "highest", 1)
for precision in ("highest", "default"):
    weight_acts_alone(5, 1536, 1536, (2, 1), precision, 1)


# ---- Pool kernels the pool block at the end does not reach ----
# Each window: the plain forward (not differentiated: no winners), the forward with winners, the
# JVP and the gradient, in one jit per case; 2 x 2 / 3 x 3 unrolled and runtime windows, a
# 17 x 16 window (more than 256 elements: int32 winners); vector (16 images / channels) and
# scalar (5) kernels; float16.
def pool_kernels(layout, dtype, inner):
    n, c = (inner, 3) if layout == "C01B" else (3, inner)
    x = jax.random.normal(key, jcn.geometry.image_shape(layout, n, c, 27, 26), dtype)

    def run(x):
        out = []
        for ds, kw in ((2, {}), (3, dict(stride=2)), ((17, 16), dict(stride=3))):
            pool = lambda x: jcn.max_pool(x, ds, layout=layout, **kw)
            y, vjp = jax.vjp(pool, x)
            out += [pool(x), y, jax.jvp(pool, (x,), (x,))[1], vjp(y)[0]]
        return out
    jax.block_until_ready(jax.jit(run)(x))


for layout in ("C01B", "NHWC"):
    for inner in (16, 5):
        pool_kernels(layout, jnp.float16, inner)
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16):
        for precision in ("highest", "default"):
            x = jax.random.normal(key, jcn.geometry.image_shape(layout, 5, 7, 13, 12), dtype)
            w = jax.random.normal(key, jcn.geometry.filter_shape(layout, 9, 7, 3, 4), dtype)
            for kw in (dict(pad=1, stride=2), dict(padding="SAME"), dict(pad=(2, 0), stride=(1, 3))):
                loss = lambda x, w: jnp.sum(jcn.max_pool(
                    jcn.filter_acts(x, w, layout=layout, precision=precision, partial_sum="auto",
                                    **kw), 2, layout=layout).astype(jnp.float32) ** 2)
                dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
                jax.block_until_ready((dx, dw))
            y, ty = jax.jvp(lambda x: jcn.max_pool(x, 3, stride=2, layout=layout), (x,), (x,))
            jax.block_until_ready(ty)
# Convolutions whose contiguous dimensions are a multiple of 16 bytes (batch 8, 16 channels, 24
# and 136 filters): the cp.async / mma.sync kernels, both tile widths, TF32 and 3xTF32.
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16):
        for precision in ("highest", "default"):
            for f in (24, 136):
                x = jax.random.normal(key, jcn.geometry.image_shape(layout, 8, 16, 11, 10), dtype)
                w = jax.random.normal(key, jcn.geometry.filter_shape(layout, f, 16, 3, 3), dtype)
                loss = lambda x, w: jnp.sum(jcn.filter_acts(
                    x, w, layout=layout, precision=precision, pad=1, stride=2,
                    partial_sum="auto").astype(jnp.float32) ** 2)
                jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))

# filter_acts into 192 filters in bf16 and float32 at default precision: on Hopper the wgmma
# kernels (C01B with the k table, NHWC; float32 stores transposed operands).
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.random.normal(key, jcn.geometry.image_shape(layout, 8, 16, 11, 10), dtype)
        w = jax.random.normal(key, jcn.geometry.filter_shape(layout, 192, 16, 3, 3), dtype)
        jax.block_until_ready(jax.jit(lambda x, w: jcn.filter_acts(
            x, w, layout=layout, pad=1, precision="default"))(x, w))


def image_acts_into_rgb(layout, dtype, n, f, hw, size, column_images, **kw):
    """image_acts into 3 channels with a column buffer of `column_images` images (0: none)."""
    w = jax.random.normal(key, jcn.geometry.filter_shape(layout, f, 3, size, size), dtype)
    x_shape = jcn.geometry.image_shape(layout, n, 3, *hw)
    out_hw = jcn.filter_acts_output_size(hw, size, **kw)
    g = jax.random.normal(key, jcn.geometry.image_shape(layout, n, f, *out_hw), dtype)
    default_caps = jcn.conv.IMAGE_ACTS_COLUMN_CAP_BYTES, jcn.conv.FFT_WORKSPACE_CAP_BYTES
    jcn.conv.IMAGE_ACTS_COLUMN_CAP_BYTES = column_images * 4 * 3 * size * size * math.prod(out_hw)
    jcn.conv.FFT_WORKSPACE_CAP_BYTES = 0  # (stride 1: else the FFT path)
    jax.block_until_ready(jax.jit(lambda g, w: jcn.image_acts(
        g, w, x_shape, layout=layout, **kw))(g, w))
    jcn.conv.IMAGE_ACTS_COLUMN_CAP_BYTES, jcn.conv.FFT_WORKSPACE_CAP_BYTES = default_caps


for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16):
        # The direct kernel (no column buffer; partial lane groups: 37 images, 20 filters; a
        # short and a long register window).
        image_acts_into_rgb(layout, dtype, 37, 20, (19, 21), 5, 0, stride=2, pad=1)
        image_acts_into_rgb(layout, dtype, 37, 20, (19, 21), 11, 0, stride=1)
        # Through the column buffer: a GEMM into columns and the gather, in two chunks of 8
        # images (AlexNet conv1's stride and a stride-1 filter).
        image_acts_into_rgb(layout, dtype, 16, 24, (23, 21), 11, 8, stride=4, pad=2)
        image_acts_into_rgb(layout, dtype, 16, 24, (23, 21), 9, 8, stride=1)
        # Columns of 3 x 7 x 7 = 147 rows: the 128 x 64 mma tile (the ones above: 128 x 128).
        image_acts_into_rgb(layout, dtype, 16, 24, (23, 21), 7, 8, stride=2, pad=1)
# weight_acts of NHWC images of 1 and 3 channels: padded to 4 channels in the workspace (40
# filters: the tensor cores read the hidden tensor 16 bytes at a time), one sum and 3 segments.
for dtype in (jnp.float32, jnp.bfloat16):
    for c, partial_sum in ((3, None), (1, 33)):
        x = jax.random.normal(key, jcn.geometry.image_shape("NHWC", 5, c, 15, 13), dtype)
        g = jax.random.normal(key, jcn.geometry.image_shape("NHWC", 5, 40, 9, 11), dtype)
        w_shape = jcn.geometry.filter_shape("NHWC", 40, c, 7, 3)
        jax.block_until_ready(jax.jit(lambda x, g: jcn.weight_acts(
            x, g, w_shape, layout="NHWC", partial_sum=partial_sum))(x, g))
# The FFT path (stride 1, large filters): all three ops, 32 x 16 and 64 x 64 transforms, an odd
# number of planes (transformed in pairs) partly filling a block (5 images, 7 channels, 70
# filters: two GEMM tiles), uneven padding; 16-bit types only with very large filters.
for layout in ("C01B", "NHWC"):
    for dtype, hw, window, padding in (
            (jnp.float32, (27, 13), (11, 7), ((2, 1), (0, 3))),
            (jnp.float32, (50, 40), (9, 9), ((0, 0), (0, 0))),
            (jnp.bfloat16, (56, 48), (21, 17), ((0, 0), (0, 0)))):
        x = jax.random.normal(key, jcn.geometry.image_shape(layout, 5, 7, *hw), dtype)
        w = jax.random.normal(key, jcn.geometry.filter_shape(layout, 70, 7, *window), dtype)
        loss = lambda x, w: jnp.sum(jcn.filter_acts(
            x, w, layout=layout, padding=padding).astype(jnp.float32) ** 2)
        jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))
# Pools on vector-friendly sizes (inner dimension a multiple of 8), where the vector kernels
# run: overlapping (two-pass gradient) and disjoint windows, clipped (ceil rule) and padded
# edges, and a window too tall for the selection byte (one-pass gradient).
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(key, jcn.geometry.image_shape(layout, 16, 32, 27, 26), dtype)
        for ds, kw in ((3, dict(stride=2)), (3, dict(stride=2, padding="SAME")), (2, {}),
                       (5, dict(stride=3, start=1)), (16, dict(stride=3))):
            pool = lambda x: jcn.max_pool(x, ds, layout=layout, **kw)
            y, vjp = jax.vjp(pool, x)
            jax.block_until_ready((y, jax.jvp(pool, (x,), (x,))[1], vjp(y)[0]))
# Response norms: every kernel (forward, forward with denominators, JVP, gradient), cross-map
# (plain, blocked, size > C) and same-map windows clipped at every edge, each GPU dtype.
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = jax.random.normal(key, jcn.geometry.image_shape(layout, 6, 10, 9, 7), dtype)
        kw = dict(add_scale=0.1, pow_scale=0.75, layout=layout)
        for norm in (lambda x: jcn.cross_map_norm(x, 5, **kw),
                     lambda x: jcn.cross_map_norm(x, 4, blocked=True, **kw),
                     lambda x: jcn.cross_map_norm(x, 13, **kw),
                     lambda x: jcn.response_norm(x, 3, **kw)):
            y, vjp = jax.vjp(norm, x)
            jax.block_until_ready((norm(x), y, jax.jvp(norm, (x,), (x,))[1], vjp(y)[0]))

# Average pools: the unrolled 2x2 / 3x3 forward and the runtime window, vector (inner 32) and
# scalar (inner 5) lanes, clipped (ceil rule) and padded edges, both divisors, the gradient.
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16):
        for inner in (32, 5):
            x = jax.random.normal(key, jcn.geometry.image_shape(layout, inner, inner, 13, 12),
                                  dtype)
            for ds, kw in ((3, dict(stride=2)), (2, {}), ((4, 5), dict(stride=(3, 1), start=1)),
                           (3, dict(stride=2, padding="SAME", count_include_pad=False))):
                y, vjp = jax.vjp(lambda x: jcn.avg_pool(x, ds, layout=layout, **kw), x)
                jax.block_until_ready((y, vjp(y)[0]))

# Locally connected layers (csrc/cuda/local.cu): all three ops, both layouts, float32 and
# bfloat16; partial tiles in every dimension (37 images, 20 channels, 35 filters), padding, a
# ceil-rule overhang, and a stride larger than the filter (image pixels no filter reads).
for layout in ("C01B", "NHWC"):
    for dtype in (jnp.float32, jnp.bfloat16):
        for hw, window, kw in (((9, 8), (3, 3), dict(pad=1)),
                               ((11, 10), (2, 3), dict(pad=(1, 0), stride=(3, 2)))):
            out_hw = jcn.filter_acts_output_size(hw, window, **kw)
            x = jax.random.normal(key, jcn.geometry.image_shape(layout, 37, 20, *hw), dtype)
            w = jax.random.normal(key, jcn.geometry.local_filter_shape(layout, out_hw, 35, 20,
                                                                       *window), dtype)
            loss = lambda x, w: jnp.sum(jcn.local_filter_acts(
                x, w, layout=layout, **kw).astype(jnp.float32) ** 2)
            jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, w))
print("subset ok")
