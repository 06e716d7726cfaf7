"""A small representative run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).
`sanitize_subset.py tma` runs only the Hopper TMA kernels' part."""
import itertools
import math
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


tma_kernels()
if sys.argv[1:] == ["tma"]:
    print("subset ok")
    sys.exit(0)
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
