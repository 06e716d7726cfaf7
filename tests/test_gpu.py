"""The CUDA kernels on the baseline layers: equal to the reference and to the CPU kernels,
bitwise reproducible, and the TF32 path within TF32's error. Skipped without a GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from jax_convnet import reference as ref
from jax_convnet._layers import GPU_LAYERS
from conftest import (LAYOUTS, assert_close, cpu, exact, filters, gpu, images, rand, run_poisoned,
                      run_poisoned_twice, tolerance_dtype, value_jvp_vjp)

pytestmark = pytest.mark.gpu

# The benchmark's GPU layers (convnet-benchmarks L1-L5, AlexNet conv1-3), at a reduced batch.
BATCH = 4


def all_three(layout, pad, stride, precision, partial_sum=None):
    kw = dict(pad=pad, stride=stride, layout=layout, precision=precision)

    def run(x, w, g):
        return (jcn.filter_acts(x, w, **kw), jcn.image_acts(g, w, x.shape, **kw),
                jcn.weight_acts(x, g, w.shape, partial_sum=partial_sum, **kw))
    return jax.jit(run)


def exact_three(layout, pad, stride):
    """The oracle: the pure-lax reference in float64 on the CPU. (XLA's own float32 convolutions on
    the GPU are not exact enough to judge ours: on alex2 its filter gradient at "highest" is off by
    3e-3 of the largest magnitude.)"""
    kw = dict(pad=pad, stride=stride, layout=layout, precision="highest")
    run = jax.jit(lambda x, w, g: (ref.filter_acts(x, w, **kw), ref.image_acts(g, w, x.shape, **kw),
                                   ref.weight_acts(x, g, w.shape, **kw)))
    return lambda *args: run(*exact(*args))


def layer_operands(name, layout, dtype, batch=BATCH):
    _, c, h, w, f, fh, fw, stride, pad = GPU_LAYERS[name]
    x = images(1, layout, batch, c, h, w, dtype)
    wt = filters(2, layout, f, c, fh, fw, dtype) * 0.05
    out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, pad=pad)
    g = rand(3, jcn.geometry.image_shape(layout, batch, f, *out_hw), dtype)
    return (x, wt, g), stride, pad


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(GPU_LAYERS))
def test_baseline_layers_match_reference_and_cpu_kernels(name, layout):
    (x, w, g), stride, pad = layer_operands(name, layout, jnp.float32)
    ours = run_poisoned(all_three(layout, pad, stride, "highest"), *jax.device_put((x, w, g), gpu()))
    want = exact_three(layout, pad, stride)(x, w, g)
    for a, b in zip(ours, want):
        assert_close(a, b, jnp.float32, scale=5)
    if name in ("L1", "L4", "L5", "alex1", "alex3"):  # the CPU is slow on the largest ones
        on_cpu = all_three(layout, pad, stride, "highest")(*jax.device_put((x, w, g), cpu()))
        for a, b in zip(ours, on_cpu):
            assert_close(a, b, jnp.float32, scale=5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["L4", "alex1", "alex2"])
def test_half_precision_layers(name, dtype, layout):
    (x, w, g), stride, pad = layer_operands(name, layout, dtype)
    ours = run_poisoned(all_three(layout, pad, stride, None), *jax.device_put((x, w, g), gpu()))
    for a, b in zip(ours, exact_three(layout, pad, stride)(x, w, g)):
        assert a.dtype == dtype
        assert_close(a, b, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision,dtype",
                         [("highest", jnp.float32), (None, jnp.float32), (None, jnp.bfloat16)],
                         ids=["f32-highest", "f32", "bf16"])
@pytest.mark.parametrize("channels,n_filters",
                         [(3, 16), (3, 40), (24, 40), (24, 96), (24, 192), (136, 128)])
@pytest.mark.parametrize("partial_sum", [None, "auto"])
def test_tensor_core_path_matches_reference(channels, n_filters, precision, dtype, layout,
                                            partial_sum):
    """Batch and filters multiples of 8, channels too but for RGB (the baseline layers above run
    at batch 4, so in C01B they take the other kernels): the three ops take the cp.async /
    mma.sync kernel in both layouts (3-channel NHWC images only in float32, copied one float at a
    time; image_acts into RGB in float32 takes the direct kernel), with all four tile widths (32
    for up to 32 columns: 16 filters or image_acts into 24 channels, 64 for 40 filters, 96 for
    96 or 192 in 16-bit types, 128; on Hopper filter_acts into 192 takes a wgmma kernel), filter_acts of
    C01B images with and without its k table (16-bit types only), partial tiles, a k tail and every
    weight_acts plan."""
    x = images(7, layout, 8, channels, 17, 15, dtype)
    w = filters(8, layout, n_filters, channels, 5, 3, dtype) * 0.1
    pad, stride = (2, 1), (2, 1)
    out_hw = jcn.filter_acts_output_size((17, 15), (5, 3), stride=stride, pad=pad)
    g = rand(9, jcn.geometry.image_shape(layout, 8, n_filters, *out_hw), dtype)
    ours = run_poisoned(all_three(layout, pad, stride, precision, partial_sum=partial_sum),
                        *jax.device_put((x, w, g), gpu()))
    for a, b in zip(ours, exact_three(layout, pad, stride)(x, w, g)):
        assert a.dtype == dtype
        assert_close(a, b, tolerance_dtype(dtype, precision), scale=5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("channels,n_filters", [(24, 192), (40, 384)])
def test_filter_acts_into_multiples_of_192_filters(channels, n_filters, dtype, layout):
    """filter_acts into 192 or 384 filters, in 16-bit types or float32 at default precision: on
    Hopper the wgmma kernels (float32 as TF32, its operands transposed into shared memory on the
    way), with images contiguous along the batch (C01B, with the k table) or the channels (NHWC),
    a partial last row tile, one or two column tiles and a k tail (K = 360 / 600)."""
    x = images(10, layout, 8, channels, 17, 15, dtype)
    w = filters(11, layout, n_filters, channels, 5, 3, dtype) * 0.1
    pad, stride = (2, 1), (2, 1)
    fa = jax.jit(lambda x, w: jcn.filter_acts(x, w, pad=pad, stride=stride, layout=layout,
                                              precision="default"))
    ours = run_poisoned_twice(fa, *jax.device_put((x, w), gpu()))
    want = jax.jit(lambda x, w: ref.filter_acts(x, w, pad=pad, stride=stride, layout=layout,
                                                precision="highest"))(*exact(x, w))
    assert ours.dtype == dtype
    assert_close(ours, want, tolerance_dtype(dtype, "default"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_precision_float32_is_within_tf32_error(layout):
    (x, w, g), stride, pad = layer_operands("alex2", layout, jnp.float32)
    with jax.default_matmul_precision("default"):
        ours = all_three(layout, pad, stride, None)(*jax.device_put((x, w, g), gpu()))
    for a, b in zip(ours, exact_three(layout, pad, stride)(x, w, g)):
        assert_close(a, b, jnp.bfloat16)  # TF32 keeps 10 mantissa bits; bf16's bound is looser


@pytest.mark.parametrize("seed", range(16))
def test_random_small_configurations(seed):
    rng = np.random.default_rng(100 + seed)
    layout = LAYOUTS[seed % 2]
    dtype = [jnp.float32, jnp.bfloat16, jnp.float16][seed % 3]
    fh, fw = (int(v) for v in rng.integers(1, 8, 2))
    sh, sw = (int(v) for v in rng.integers(1, 5, 2))
    h, w = fh + int(rng.integers(0, 20)), fw + int(rng.integers(0, 20))
    n, c, f = (int(v) for v in rng.integers(1, 70, 3))
    pad = tuple(int(v) for v in rng.integers(0, 4, 2))
    x = images(seed, layout, n, c, h, w, dtype)
    wt = filters(seed + 1, layout, f, c, fh, fw, dtype)
    out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), stride=(sh, sw), pad=pad)
    g = rand(seed + 2, jcn.geometry.image_shape(layout, n, f, *out_hw), dtype)
    args = jax.device_put((x, wt, g), gpu())
    ours = run_poisoned(all_three(layout, pad, (sh, sw), "highest", partial_sum="auto"), *args)
    for a, b in zip(ours, exact_three(layout, pad, (sh, sw))(x, wt, g)):
        assert_close(a, b, dtype, scale=5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("channels,window,stride,pad,precision", [
    (1, (11, 11), 1, 0, None),              # 11 rows of taps: the longest register window
    (2, (5, 3), (2, 3), (2, 1), None),      # uneven residue classes
    (3, (11, 11), 4, 2, None),              # AlexNet conv1: 16 classes of 2-3 rows of taps
    (4, (7, 2), (3, 1), (0, 1), None),
    (3, (13, 13), 1, 1, "highest"),         # 13 rows of taps: the implicit GEMM instead
])
def test_image_acts_into_few_channels(channels, window, stride, pad, precision, dtype, layout,
                                      monkeypatch):
    """image_acts into 1-4 channels (the gradient of an RGB first layer) without a column buffer
    (test_image_acts_through_columns) runs a direct FFMA kernel in float32, float32-exact at every
    precision, and in 16-bit types where the tensor cores cannot read the operands (here C01B,
    whose 37 images are not a multiple of 8). 37 images: C01B lanes are 32 images, a partial
    group; 40 filters: NHWC lanes are 8 filters per column, a partial group; image heights ending
    inside a block of rows; output poisoned."""
    monkeypatch.setattr(jcn.conv, "IMAGE_ACTS_COLUMN_CAP_BYTES", 0)
    monkeypatch.setattr(jcn.conv, "FFT_WORKSPACE_CAP_BYTES", 0)  # stride 1: else the FFT path
    x_shape = jcn.geometry.image_shape(layout, 37, channels, 35, 29)
    w = filters(12, layout, 40, channels, *window, dtype) * 0.1
    out_hw = jcn.filter_acts_output_size((35, 29), window, stride=stride, pad=pad)
    g = rand(13, jcn.geometry.image_shape(layout, 37, 40, *out_hw), dtype)
    kw = dict(pad=pad, stride=stride, layout=layout)
    run = jax.jit(lambda g, w: jcn.image_acts(g, w, x_shape, precision=precision, **kw))
    ours = run_poisoned(run, *jax.device_put((g, w), gpu()))
    assert ours.dtype == dtype
    assert_close(ours, ref.image_acts(*exact(g, w), x_shape, **kw), dtype, scale=5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels,window,stride,pad,precision,chunk_images", [
    (3, (11, 11), 4, 2, None, None),       # AlexNet conv1: 16 residue classes of 2-3 x 2-3 taps
    (3, (13, 13), 1, 1, "highest", None),  # L1-like: stride 1, every tap reaches every pixel
    (4, (7, 5), (2, 3), (1, 2), None, 17),  # uneven classes; chunks of 14 / 16 images
    (1, (9, 8), (3, 2), 0, None, 11),      # one channel; chunks of 10 / 8 images
])
def test_image_acts_through_columns(channels, window, stride, pad, precision, chunk_images, dtype,
                                    layout, monkeypatch):
    """image_acts into a few channels with large filters takes a GEMM into float32 columns and a
    gather, in chunks of whole images when the column buffer (the custom call's workspace) holds
    fewer than the batch: 40 images (C01B chunks are multiples of the 16-byte vector: 8 images in
    16-bit types), 24 filters, odd image sizes, output poisoned. float32 accumulation
    throughout; at precision highest float32-exact (3xTF32)."""
    monkeypatch.setattr(jcn.conv, "FFT_WORKSPACE_CAP_BYTES", 0)  # stride 1: else the FFT path
    n, hw = 40, (37, 29)
    x_shape = jcn.geometry.image_shape(layout, n, channels, *hw)
    w = filters(14, layout, 24, channels, *window, dtype) * 0.1
    out_hw = jcn.filter_acts_output_size(hw, window, stride=stride, pad=pad)
    g = rand(15, jcn.geometry.image_shape(layout, n, 24, *out_hw), dtype)
    if chunk_images is not None:
        image_bytes = 4 * channels * window[0] * window[1] * out_hw[0] * out_hw[1]
        monkeypatch.setattr(jcn.conv, "IMAGE_ACTS_COLUMN_CAP_BYTES", chunk_images * image_bytes)
    kw = dict(pad=pad, stride=stride, layout=layout, precision=precision)
    run = jax.jit(lambda g, w: jcn.image_acts(g, w, x_shape, **kw))
    args = jax.device_put((g, w), gpu())
    (call,) = jcn.explain(run, *args)
    workspace = call["workspace"]["ia_columns"]
    assert workspace > 0 and call["workspace"]["total"] == workspace
    assert f"tensor<{workspace}xui8>" in run.lower(*args).as_text()  # the buffer is there
    ours = run_poisoned_twice(run, *args)
    assert ours.dtype == dtype
    assert_close(ours, ref.image_acts(*exact(g, w), x_shape, pad=pad, stride=stride,
                                      layout=layout), tolerance_dtype(dtype, precision), scale=5)


@pytest.mark.parametrize("dtype,precision", [(jnp.float32, "highest"), (jnp.float32, None),
                                             (jnp.bfloat16, None), (jnp.float16, None)],
                         ids=["f32-highest", "f32", "bfloat16", "float16"])
@pytest.mark.parametrize("channels,window,stride,pad,partial_sum", [
    (3, (11, 11), 4, 2, None),        # AlexNet conv1's geometry
    (1, (5, 3), (2, 1), (2, 1), 17),  # one channel; 14 x 17 positions in 14 segments
    (2, (7, 7), 1, 0, "auto"),
])
def test_weight_acts_of_few_channel_nhwc_images(channels, window, stride, pad, partial_sum,
                                                dtype, precision):
    """weight_acts of NHWC images of 1-3 channels (RGB first layers) copies them into its
    workspace padded with zero channels to 4, which the tensor cores read a pixel at a time; the
    padded channels' rows never reach the filters. 5 images, 40 filters, odd image sizes, output
    poisoned; float32 accumulation, at precision highest float32-exact (3xTF32); reproducible."""
    n, hw, n_filters = 5, (27, 17), 40
    x = images(16, "NHWC", n, channels, *hw, dtype)
    w_shape = jcn.geometry.filter_shape("NHWC", n_filters, channels, *window)
    out_hw = jcn.filter_acts_output_size(hw, window, stride=stride, pad=pad)
    g = rand(17, jcn.geometry.image_shape("NHWC", n, n_filters, *out_hw), dtype)
    kw = dict(pad=pad, stride=stride, layout="NHWC")
    run = jax.jit(lambda x, g: jcn.weight_acts(x, g, w_shape, partial_sum=partial_sum,
                                               precision=precision, **kw))
    args = jax.device_put((x, g), gpu())
    (call,) = jcn.explain(run, *args)
    assert call["workspace"]["wa_padded_images"] > 0
    assert f"tensor<{call['workspace']['total']}xui8>" in run.lower(*args).as_text()  # the copy
    ours = run_poisoned_twice(run, *args)
    assert ours.dtype == dtype
    assert_close(ours, ref.weight_acts(*exact(x, g), w_shape, **kw),
                 tolerance_dtype(dtype, precision), scale=5)


# Stride-1 convolutions with large filters take the FFT path (csrc/cuda/conv_fft.cuh):
# (n, c, (h, w), f, (fh, fw), padding) and the dtypes / precisions whose rule takes it there.
F32, F32_TF32 = (jnp.float32, "highest"), (jnp.float32, None)
FFT_CASES = {
    "square": ((5, 70, (26, 26), 72, (11, 11), ((3, 3), (3, 3))), [F32, F32_TF32]),  # 2 f tiles
    "rectangular": ((4, 6, (27, 13), 9, (11, 7), ((2, 1), (0, 3))), [F32, F32_TF32]),  # 32 x 16
    "rgb": ((3, 3, (28, 28), 5, (13, 13), ((1, 1), (1, 1))), [F32, F32_TF32]),
    "64x64": ((2, 8, (50, 40), 20, (9, 9), ((0, 0), (0, 0))), [F32, F32_TF32]),
    "huge-filters": ((3, 5, (56, 48), 7, (21, 17), ((0, 0), (0, 0))),               # 16-bit too
                     [F32, (jnp.bfloat16, None), (jnp.float16, None)]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case,dtype,precision", [
    pytest.param(case, dtype, precision, id=f"{case}-{jnp.dtype(dtype).name}-{precision}")
    for case, (_, configs) in FFT_CASES.items() for dtype, precision in configs])
def test_fft_path_matches_reference(case, dtype, precision, layout):
    """The three ops through 2-d FFTs (the spectra are the custom calls' workspace): float32
    transforms and a bin GEMM in 3xTF32 for float32 above default precision, so float32's
    accuracy there, TF32's at default precision, 16-bit types their own rounding of the result
    (the lowered text shows the spectra the kernels were given); an odd number of planes
    (transformed in pairs), planes partly filling a block, bins partly filling a GEMM tile,
    rectangular transforms and uneven padding; outputs poisoned; bitwise reproducible."""
    n, c, hw, f, window, padding = FFT_CASES[case][0]
    x = images(20, layout, n, c, *hw, dtype)
    w = filters(21, layout, f, c, *window, dtype) * 0.1
    out_hw = jcn.filter_acts_output_size(hw, window, padding=padding)
    g = rand(22, jcn.geometry.image_shape(layout, n, f, *out_hw), dtype)
    kw = dict(padding=padding, layout=layout, precision=precision)
    ops = (jax.jit(lambda x, w, g: jcn.filter_acts(x, w, **kw)),
           jax.jit(lambda x, w, g: jcn.image_acts(g, w, x.shape, **kw)),
           jax.jit(lambda x, w, g: jcn.weight_acts(x, g, w.shape, **kw)))
    (call,) = jcn.explain(ops[0], x, w, g)
    spectra = call["workspace"]["fft"]
    assert spectra > 0 and call["workspace"]["total"] == spectra
    exact_kw = dict(padding=padding, layout=layout, precision="highest")
    want = (ref.filter_acts(*exact(x, w), **exact_kw),
            ref.image_acts(*exact(g, w), x.shape, **exact_kw),
            ref.weight_acts(*exact(x, g), w.shape, **exact_kw))
    args = jax.device_put((x, w, g), gpu())
    for op, expected in zip(ops, want):
        assert f"tensor<{spectra}xui8>" in op.lower(*args).as_text()  # the spectra are there
        ours = run_poisoned_twice(op, *args)
        assert ours.dtype == dtype
        assert_close(ours, expected, tolerance_dtype(dtype, precision), scale=5)


@pytest.mark.parametrize("partial_sum", [None, 1, 13, "auto"])
def test_weight_acts_bitwise_reproducible(partial_sum):
    (x, w, g), stride, pad = layer_operands("alex3", "C01B", jnp.float32, batch=8)
    run = jax.jit(lambda x, g: jcn.weight_acts(x, g, w.shape, pad=pad, partial_sum=partial_sum,
                                               precision="highest"))
    x, g = jax.device_put((x, g), gpu())
    first = np.asarray(run(x, g))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(run(x, g)), first)
    assert_close(first, ref.weight_acts(*exact(x, g), w.shape, pad=pad), jnp.float32, scale=5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["float32", "bfloat16", "float16"])
# Unrolled 2x2 / 3x3 kernels and runtime windows; uint8 winners up to 16 x 16 (offsets to 255),
# int32 winners beyond (17 x 16).
@pytest.mark.parametrize("shape,ds,stride", [((16, 55, 55), 3, 2), ((8, 27, 27), 2, 2),
                                             ((24, 13, 13), 3, 2), ((5, 12, 11), 3, 1),
                                             ((8, 20, 40), (15, 16), (2, 5)),
                                             ((8, 40, 21), 16, 3), ((8, 40, 21), (17, 16), 3)])
def test_pools_match_cpu_kernels_bitwise(shape, ds, stride, dtype, layout):
    c, h, w = shape
    x = images(4, layout, 6, c, h, w, dtype)
    x = jnp.round(x * 4) / 4  # ties on purpose
    y_shape = jax.eval_shape(lambda x: jcn.max_pool(x, ds, stride=stride, layout=layout), x).shape
    t, g = rand(5, x.shape, dtype), rand(6, y_shape, dtype)
    run = value_jvp_vjp(lambda x: jcn.max_pool(x, ds, stride=stride, layout=layout))
    on_gpu = run_poisoned(run, *jax.device_put((x, t, g), gpu()))
    on_cpu = run(*jax.device_put((x, t, g), cpu()))
    for a, b in zip(on_gpu, on_cpu):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# A NaN with a payload of its own, a canonical NaN, infinities and signed zeros, in ties.
SPECIAL_BITS = {jnp.float32: (np.uint32, [0x7fc12345, 0x7fc00000, 0xff800000, 0x7f800000,
                                          0x80000000, 0x00000000, 0x3f800000, 0xbf800000]),
                jnp.bfloat16: (np.uint16, [0x7fc5, 0x7fc0, 0xff80, 0x7f80, 0x8000, 0x0000,
                                           0x3f80, 0xbf80]),
                jnp.float16: (np.uint16, [0x7e55, 0x7e00, 0xfc00, 0x7c00, 0x8000, 0x0000,
                                          0x3c00, 0xbc00])}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(SPECIAL_BITS), ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("ds,stride,padding", [(3, 2, "SAME"), (2, 2, "VALID"), (3, 1, None)])
def test_pools_on_special_values_match_cpu_kernels_bit_for_bit(ds, stride, padding, dtype,
                                                               layout):
    # Mostly -inf (windows of -inf select their first element), NaNs (the first one wins, with
    # its payload), signed zeros (the first of equal maxima wins). The cotangents are finite, so
    # the gradients too compare bit for bit.
    uint, bits = SPECIAL_BITS[dtype]
    p = np.array([0.03, 0.03, 0.6, 0.01, 0.12, 0.12, 0.05, 0.04])
    raw = np.random.default_rng(11).choice(np.array(bits, uint), size=8 * 9 * 10 * 16, p=p)
    x = jnp.asarray(raw.view(jnp.dtype(dtype)).reshape(
        (16, 9, 10, 8) if layout == "C01B" else (8, 9, 10, 16)))
    pool = lambda x: jcn.max_pool(x, ds, stride=stride, padding=padding, layout=layout)
    t = rand(12, x.shape, dtype)
    g = rand(13, jax.eval_shape(pool, x).shape, dtype)
    run = value_jvp_vjp(pool)
    on_gpu = run_poisoned(run, *jax.device_put((x, t, g), gpu()))
    on_cpu = run(*jax.device_put((x, t, g), cpu()))
    for a, b in zip(on_gpu, on_cpu):  # pooled values, tangents and gradients, bit for bit
        np.testing.assert_array_equal(np.asarray(a).view(uint), np.asarray(b).view(uint))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("ds,stride,padding", [(3, 2, None), (2, 2, None), ((17, 16), 3, None),
                                               (2, 2, ((3, 3), (0, 1))), (5, 1, "SAME")])
def test_pool_winners_match_cpu_kernels_bitwise(ds, stride, padding, dtype, layout):
    # The forward with winners, the JVP and the gradient custom calls, each on its own, against
    # the CPU kernels and the reference (windows of more than 256 elements: int32 winners; empty
    # windows: padding rows only).
    from jax_convnet import geometry as G
    from jax_convnet import pool as P
    x = jnp.round(images(14, layout, 6, 8, 23, 21, dtype) * 4) / 4  # ties
    x = x.at[(1,) * 4].set(jnp.nan)
    geom = G.max_pool_geometry(x, ds, stride=stride, start=0, padding=padding, layout=layout)
    ax = G.image_axes(layout)
    image_hw = (x.shape[ax["h"]], x.shape[ax["w"]])

    def run(x, t):
        pooled, winners = P.max_pool_winners_p.bind(x, geom=geom)
        tangent = P.max_pool_jvp_p.bind(t, winners, geom=geom)
        grad = P.max_pool_grad_p.bind(tangent, winners, geom=geom, image_hw=image_hw)  # finite
        return pooled, winners, tangent, grad
    t = rand(15, x.shape, dtype)
    on_gpu = run_poisoned(jax.jit(run), *jax.device_put((x, t), gpu()))
    on_cpu = jax.jit(run)(*jax.device_put((x, t), cpu()))
    pooled, winners = ref.max_pool_winners_canonical(*jax.device_put((x,), cpu()), geom=geom)
    np.testing.assert_array_equal(np.asarray(on_gpu[1]), np.asarray(winners))
    for a, b in zip(on_gpu, on_cpu):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_training_step_on_the_gpu_finds_the_winners_once():
    x = jax.device_put(images(16, "NHWC", 8, 16, 27, 27), gpu())
    step = jax.jit(jax.value_and_grad(
        lambda x: jnp.sum(jcn.max_pool(x, 3, stride=2, layout="NHWC") ** 2)))
    hlo = step.lower(x).compile().as_text()
    targets = [t for t in re.findall(r'custom_call_target="(\w+)"', hlo) if "jax_convnet" in t]
    assert sorted(targets) == ["jax_convnet_max_pool_grad", "jax_convnet_max_pool_winners"]
    _, grad = step(x)
    _, want_grad = step(jax.device_put(x, cpu()))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_derivatives_of_second_order_match_cpu_kernels_bitwise(layout):
    x = jnp.round(images(17, layout, 4, 8, 13, 12) * 4) / 4
    t = rand(18, x.shape)
    loss = lambda x: jnp.sum(jcn.max_pool(x, 3, stride=2, layout=layout) ** 2)  # exact
    jvp_of_grad = jax.jit(lambda x, t: jax.jvp(jax.grad(loss), (x,), (t,)))
    hvp = jax.jit(jax.vmap(lambda v, x: jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x),
                           (0, None)))
    on_gpu = jvp_of_grad(*jax.device_put((x, t), gpu())), hvp(*jax.device_put((t[None], x), gpu()))
    on_cpu = jvp_of_grad(*jax.device_put((x, t), cpu())), hvp(*jax.device_put((t[None], x), cpu()))
    for a, b in zip(jax.tree.leaves(on_gpu), jax.tree.leaves(on_cpu)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_pool_gradient_bitwise_reproducible(dtype):
    x = jax.device_put(images(7, "NHWC", 16, 64, 55, 55, dtype), gpu())
    g = jax.device_put(rand(8, (16, 27, 27, 64), dtype), gpu())
    run = jax.jit(lambda x, g: jax.vjp(lambda x: jcn.max_pool(x, 3, stride=2, layout="NHWC"),
                                       x)[1](g)[0])
    first = np.asarray(run(x, g), np.float32)
    for _ in range(10):
        np.testing.assert_array_equal(np.asarray(run(x, g), np.float32), first)


def test_large_channel_count_and_batch_one():
    # cuda-convnet crashed on large channel counts; we take any size.
    x = images(9, "C01B", 1, 2048, 5, 5)
    w = filters(10, "C01B", 3, 2048, 3, 3) * 0.02
    ours = jcn.filter_acts(*jax.device_put((x, w), gpu()), pad=1, precision="highest")
    assert_close(ours, ref.filter_acts(*exact(x, w), pad=1), jnp.float32, scale=5)
