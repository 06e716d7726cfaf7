"""filter_acts, image_acts and weight_acts against the pure-lax reference, on every platform."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_convnet as jcn
from jax_convnet import reference as ref
from jax_convnet._layers import GPU_LAYERS
from conftest import (DTYPES, LAYOUTS, assert_close, filters, hlo_text, images, rand,
                      run_poisoned)


def conv_case(layout, dtype, n, c, h, w, f, fh, fw, key=0):
    return (images(2 * key, layout, n, c, h, w, dtype),
            filters(2 * key + 1, layout, f, c, fh, fw, dtype))


def check_all_three(x, w, dtype=None, **kw):
    """Our three ops equal the reference's on these operands (and on random cotangents)."""
    # The reference under jit: one compilation instead of one per operation.
    y = run_poisoned(lambda x, w: jcn.filter_acts(x, w, **kw), x, w)
    assert_close(y, jax.jit(lambda x, w: ref.filter_acts(x, w, **kw))(x, w), dtype)
    g = rand(7, y.shape, x.dtype)
    dx = run_poisoned(lambda g, w: jcn.image_acts(g, w, x.shape, **kw), g, w)
    assert_close(dx, jax.jit(lambda g, w: ref.image_acts(g, w, x.shape, **kw))(g, w), dtype)
    dw = run_poisoned(lambda x, g: jcn.weight_acts(x, g, w.shape, **kw), x, g)
    assert_close(dw, jax.jit(lambda x, g: ref.weight_acts(x, g, w.shape, **kw))(x, g), dtype)
    return y


# ----------------------------------------------------------------------------- pylearn2's cases

@pytest.mark.parametrize("pad,stride,expected_hw", [
    (0, 1, (7, 6)), (1, 1, (9, 8)), (0, 2, (4, 4)), (1, 2, (5, 5)), (2, 3, (5, 4))])
def test_pylearn2_filter_acts_cases(platform, pad, stride, expected_hw):
    # cuda-convnet's test: 3x10x9x5 images (C01B), 16 filters of 3x4x4, ceil-rule output sizes.
    x, w = conv_case("C01B", jnp.float32, n=5, c=3, h=10, w=9, f=16, fh=4, fw=4)
    y = check_all_three(x, w, pad=pad, stride=stride)
    assert y.shape == (16, *expected_hw, 5)
    assert jcn.filter_acts_output_size((10, 9), 4, stride=stride, pad=pad) == expected_hw


@pytest.mark.parametrize("partial_sum", [0, None, 1, 4, 12, "auto"])
def test_pylearn2_weight_acts_partial_sum(platform, partial_sum):
    # 3 channels, 7x9 images, batch 8, 4x4 filters: 4*6 = 24 output positions.
    x = rand(1, (3, 7, 9, 8))
    g = rand(2, (16, 4, 6, 8))
    dw = run_poisoned(lambda x, g: jcn.weight_acts(x, g, (3, 4, 4, 16), partial_sum=partial_sum),
                      x, g)
    assert_close(dw, ref.weight_acts(x, g, (3, 4, 4, 16)))


def test_partial_sum_changes_nothing_but_rounding(platform):
    x, w = conv_case("NHWC", jnp.float32, n=4, c=5, h=9, w=8, f=7, fh=3, fw=2)
    g = rand(3, jcn.filter_acts(x, w, layout="NHWC").shape)
    sums = [jcn.weight_acts(x, g, w.shape, partial_sum=p, layout="NHWC")
            for p in (None, 1, 7, 49, "auto")]
    for s in sums[1:]:
        assert_close(s, sums[0])


# ----------------------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_odd_sizes_every_dtype(platform, layout, dtype):
    # batch 1, 5 channels, 7 filters, rectangular everything, asymmetric explicit padding
    x, w = conv_case(layout, dtype, n=1, c=5, h=7, w=8, f=7, fh=3, fw=2)
    check_all_three(x, w, dtype, stride=(2, 1), padding=((1, 2), (0, 1)), layout=layout)
    check_all_three(x, w, dtype, stride=(1, 3), pad=(2, 1), layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 3))])
def test_xla_padding_convention(platform, layout, padding):
    x, w = conv_case(layout, jnp.float32, n=3, c=4, h=11, w=10, f=6, fh=3, fw=4)
    y = check_all_three(x, w, stride=2, padding=padding, layout=layout)
    lax_out = jax.lax.conv_general_dilated(
        x, w, (2, 2), padding,
        dimension_numbers=("CHWN", "IHWO", "CHWN") if layout == "C01B" else ("NHWC", "HWIO", "NHWC"),
        precision="highest")
    assert_close(y, lax_out)


def test_ceil_rule_reads_zeros_past_the_edge(platform):
    # A 7x8 image, 2x2 filter, stride 2: 4x4 outputs; the last row's filters overhang the image.
    x = rand(0, (1, 7, 8, 1))
    w = jnp.ones((1, 2, 2, 1), jnp.float32)
    y = jcn.filter_acts(x, w, stride=2)
    assert y.shape == (1, 4, 4, 1)
    np.testing.assert_allclose(y[0, 3, :, 0], x[0, 6, 0::2, 0] + x[0, 6, 1::2, 0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_random_configurations(platform, seed):
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[seed % 2]
    fh, fw = rng.integers(1, 6, 2)
    sh, sw = rng.integers(1, 4, 2)
    h, w = fh + rng.integers(0, 9), fw + rng.integers(0, 9)
    n, c, f = rng.integers(1, 7, 3)
    x, wt = conv_case(layout, jnp.float32, int(n), int(c), int(h), int(w), int(f), int(fh),
                      int(fw), key=seed)
    if seed % 3 == 0:
        kw = dict(padding=tuple(tuple(int(v) for v in rng.integers(0, 3, 2)) for _ in range(2)))
    else:
        kw = dict(pad=tuple(int(v) for v in rng.integers(0, 3, 2)))
    check_all_three(x, wt, stride=(int(sh), int(sw)), layout=layout, **kw)


# ----------------------------------------------------------------------------- algebra

@pytest.mark.parametrize("layout", LAYOUTS)
def test_adjointness(platform, layout):
    # <filter_acts(x, w), g> = <x, image_acts(g, w)> = <w, weight_acts(x, g)>
    x, w = conv_case(layout, jnp.float64, n=3, c=4, h=9, w=7, f=5, fh=3, fw=3)
    kw = dict(stride=2, pad=1, layout=layout)
    g = rand(5, jcn.filter_acts(x, w, **kw).shape, jnp.float64)
    a = jnp.vdot(jcn.filter_acts(x, w, **kw), g)
    b = jnp.vdot(x, jcn.image_acts(g, w, x.shape, **kw))
    c = jnp.vdot(w, jcn.weight_acts(x, g, w.shape, **kw))
    np.testing.assert_allclose([b, c], [a, a], rtol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_derivatives_to_second_order(layout):
    x, w = conv_case(layout, jnp.float64, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2)
    kw = dict(stride=(2, 1), pad=1, layout=layout)
    check_grads(lambda x, w: jcn.filter_acts(x, w, **kw), (x, w), order=2, modes=["fwd", "rev"])
    g = rand(3, jcn.filter_acts(x, w, **kw).shape, jnp.float64)
    check_grads(lambda g, w: jcn.image_acts(g, w, x.shape, **kw), (g, w), order=2,
                modes=["fwd", "rev"])
    check_grads(lambda x, g: jcn.weight_acts(x, g, w.shape, partial_sum=2, **kw), (x, g),
                order=2, modes=["fwd", "rev"])


def test_gradients_under_jit_match_reference(platform):
    x, w = conv_case("C01B", jnp.float32, n=4, c=3, h=12, w=12, f=8, fh=5, fw=5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w, stride=2, pad=2)) ** 2)
    ours = jax.jit(jax.grad(loss(jcn.filter_acts), (0, 1)))(x, w)
    theirs = jax.grad(loss(ref.filter_acts), (0, 1))(x, w)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_linear_transpose(platform):
    x, w = conv_case("NHWC", jnp.float32, n=2, c=3, h=6, w=6, f=4, fh=3, fw=3)
    y = jcn.filter_acts(x, w, layout="NHWC")
    (dx,) = jax.linear_transpose(lambda x: jcn.filter_acts(x, w, layout="NHWC"), x)(y)
    assert_close(dx, jcn.image_acts(y, w, x.shape, layout="NHWC"))


# ----------------------------------------------------------------------------- vmap

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mapped", ["first", "second", "both"])
def test_vmap_every_op(platform, layout, mapped):
    x, w = conv_case(layout, jnp.float32, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2)
    kw = dict(stride=2, pad=1, layout=layout)
    g = rand(3, jcn.filter_acts(x, w, **kw).shape)
    ops = [
        (jcn.filter_acts, ref.filter_acts, x, w, {}),
        (jcn.image_acts, ref.image_acts, g, w, dict(image_shape=x.shape)),
        (jcn.weight_acts, ref.weight_acts, x, g, dict(filter_shape=w.shape)),
    ]
    for ours, theirs, a, b, extra in ops:
        stack = lambda v: jnp.stack([v, 1.5 * v + 0.25, -v])
        in_axes = {"first": (0, None), "second": (None, 0), "both": (0, 0)}[mapped]
        a3 = stack(a) if in_axes[0] == 0 else a
        b3 = stack(b) if in_axes[1] == 0 else b
        got = jax.jit(jax.vmap(lambda a, b: ours(a, b, **extra, **kw), in_axes))(a3, b3)
        want = jax.vmap(lambda a, b: theirs(a, b, **extra, **kw), in_axes)(a3, b3)
        assert_close(got, want)


def test_vmap_with_mapped_axis_in_the_middle(platform):
    x, w = conv_case("C01B", jnp.float32, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2)
    xs = jnp.stack([x, -x], axis=2)
    got = jax.vmap(lambda x: jcn.filter_acts(x, w), in_axes=2, out_axes=1)(xs)
    assert_close(got, jnp.stack([ref.filter_acts(x, w), ref.filter_acts(-x, w)], axis=1))


# ----------------------------------------------------------------------------- lowering

@pytest.mark.parametrize("layout", LAYOUTS)
def test_lowers_to_our_custom_calls_only(platform, layout):
    if not jcn.has_native(platform.replace("gpu", "cuda")):
        pytest.fail(f"native {platform} module missing")
    x, w = conv_case(layout, jnp.float32, n=2, c=3, h=8, w=8, f=4, fh=3, fw=3)
    loss = lambda x, w: jnp.sum(jcn.filter_acts(x, w, pad=1, layout=layout) ** 2)
    text = hlo_text(jax.grad(loss, (0, 1)), x, w)
    for target in ("jax_convnet_filter_acts", "jax_convnet_image_acts", "jax_convnet_weight_acts"):
        assert target in text
    assert "convolution" not in text


def test_image_acts_column_buffer_holds_whole_images():
    """On the GPU, image_acts into <= 4 channels with >= 64 (channel, tap) rows gets a float32
    column buffer (its custom call's workspace) of whole images, as many as the cap holds."""
    rule = jcn.geometry.image_acts_column_bytes
    alex1 = 4 * 3 * 11 * 11 * 55 * 55  # bytes of one AlexNet conv1 image's columns
    assert rule(128, 3, (11, 11), (55, 55), 128 << 20) == 30 * alex1
    assert rule(4, 3, (11, 11), (55, 55), 128 << 20) == 4 * alex1  # the whole batch fits
    assert rule(128, 3, (11, 11), (55, 55), alex1 - 1) == 0  # not one image: no buffer
    assert rule(128, 5, (11, 11), (55, 55), 128 << 20) == 0  # too many channels
    assert rule(128, 3, (4, 5), (55, 55), 128 << 20) == 0  # 60 rows: the direct kernel
    assert rule(128, 1, (8, 8), (10, 10), 128 << 20) == 128 * 4 * 64 * 100


def test_weight_acts_workspace_holds_padded_few_channel_images():
    """On the GPU, weight_acts' workspace holds its partial sums (at least 16 MiB, or one float32
    copy of the filters, plus a float32 running sum; 256-byte multiples) and, for NHWC images of
    fewer than 4 channels, a copy padded to 4 channels, where the cap allows."""
    rule = jcn.geometry.weight_acts_workspace_bytes
    sums = (16 << 20) + 139520  # L1's filters 96 x 3 x 11 x 11: 4 * 34848 bytes, rounded up
    l1 = dict(batch=128, image_hw=(128, 128), padded_cap_bytes=1 << 30)
    padded = 128 * 128 * 128 * 4 * 2  # bfloat16
    assert rule(96 * 363, layout="NHWC", channels=3, itemsize=2, **l1) == sums + padded
    assert rule(96 * 363, layout="C01B", channels=3, itemsize=2, **l1) == sums  # read in place
    assert rule(96 * 484, layout="NHWC", channels=4, itemsize=2, **l1) == (16 << 20) + 4 * 96 * 484
    assert rule(96 * 363, layout="NHWC", channels=3, itemsize=2,
                **{**l1, "padded_cap_bytes": padded - 1}) == sums  # over the cap: not padded
    big = 4 * 5_000_000  # filters larger than 16 MiB: one copy of them
    assert rule(5_000_000, layout="NHWC", channels=1, itemsize=4, batch=3, image_hw=(5, 7),
                padded_cap_bytes=1 << 30) == 2 * big + 1792  # 3 * 5 * 7 * 16 = 1680, rounded up


def test_tf32_kernel_copies_lead_the_float32_workspace():
    """On Hopper, float32 at default precision runs on the TF32 kernel, which reads both operands
    k-contiguous: the copies that gives it (256-byte multiples) where the shapes are ones it
    reads, and none elsewhere."""
    rule = jcn.geometry.tf32_copies_bytes
    alex2 = dict(batch=128, channels=64, filters=192, image_hw=(27, 27), hidden_hw=(27, 27),
                 filter_hw=(5, 5), stride=(1, 1))
    images, hidden, taps = 4 * 128 * 27 * 27 * 64, 4 * 128 * 27 * 27 * 192, 4 * 64 * 192 * 25
    assert rule("filter_acts", layout="NHWC", **alex2) == taps  # (fh, fw, F, C)
    assert rule("filter_acts", layout="C01B", **alex2) == images + hidden + taps  # as NHWC
    assert rule("image_acts", layout="C01B", **alex2) == images + hidden
    assert rule("image_acts", layout="NHWC", **alex2) == 0  # read in place
    assert rule("weight_acts", layout="NHWC", **alex2) == images + hidden  # as C01B
    assert rule("weight_acts", layout="C01B", **alex2) == 0
    assert rule("image_acts", layout="C01B", **{**alex2, "stride": (2, 2)}) == 0
    assert rule("filter_acts", layout="C01B", **{**alex2, "channels": 3}) == 0  # RGB
    assert rule("filter_acts", layout="C01B", **{**alex2, "filters": 32}) == 0
    assert rule("weight_acts", layout="NHWC", **{**alex2, "batch": 32}) == 0  # C01B runs of 64
    assert rule("filter_acts", layout="NHWC", **{**alex2, "channels": 3}) == 0


def test_fft_path_takes_stride_one_layers_with_large_filters():
    """On the GPU, stride-1 convolutions take the FFT path where the direct GEMM needs enough
    times the complex GEMM's multiply-adds for the dtype and precision (3x at float32 accuracy,
    12x for TF32, 40x for 16-bit types) and the padded image fits a 64 x 64 transform; the
    workspace holds the images', filters' and hidden tensor's spectra. Baseline layers at batch
    128: at float32 accuracy L2 / L3 (9x9), L4 (7x7) and AlexNet conv2 (5x5), for TF32 L2 / L3,
    in 16-bit types none; never L5 / conv3 (3x3), L1 (128 x 128 images) or conv1 (stride 4)."""
    layers = GPU_LAYERS  # batch 128

    def plan(name, itemsize=4, precision="highest", op="filter_acts", partial_sum=0,
             cap_bytes=jcn.geometry.FFT_MAX_BYTES):
        n, c, h, w, f, fh, fw, stride, pad = layers[name]
        return jcn.geometry.fft_conv_plan(
            op=op, batch=n, channels=c, filters=f, image_hw=(h, w), filter_hw=(fh, fw),
            stride=(stride, stride), pads=((pad, pad), (pad, pad)), partial_sum=partial_sum,
            itemsize=itemsize, precision=precision, cap_bytes=cap_bytes)

    def taken(itemsize, precision):
        return sorted(name for name in layers if plan(name, itemsize, precision)[2] > 0)

    assert taken(4, "highest") == taken(4, "high") == ["L2", "L3", "L4", "alex2"]
    assert taken(4, "default") == ["L2", "L3"]
    assert taken(2, "default") == []
    l2_spectra = (128 * 64 + 64 * 128 + 128 * 128) * 64 * 33 * 8
    assert plan("L2") == (64, 64, l2_spectra)
    assert plan("L3")[:2] == (32, 32) and plan("L4")[:2] == (16, 16)
    assert plan("alex2")[:2] == (32, 32)  # 27 + 2 * 2 padded: 31
    assert plan("L2", op="weight_acts", partial_sum=8)[2] == 0  # partial sums asked for
    assert plan("L2", op="weight_acts")[2] == l2_spectra
    assert plan("L2", cap_bytes=l2_spectra - 1)[2] == 0
    assert plan("L2", cap_bytes=0)[2] == 0


def test_eager_calls_and_dtype_preserved(platform):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x, w = conv_case("C01B", dtype, n=2, c=3, h=5, w=5, f=2, fh=2, fw=2)
        y = jcn.filter_acts(x, w)
        assert y.dtype == dtype and y.shape == (2, 4, 4, 2)


def test_precision_highest_gives_float32_accuracy(platform):
    x, w = conv_case("NHWC", jnp.float32, n=8, c=64, h=12, w=12, f=32, fh=3, fw=3)
    exact = ref.filter_acts(x.astype(jnp.float64), w.astype(jnp.float64), layout="NHWC")
    y = jcn.filter_acts(x, w, layout="NHWC", precision="highest")
    assert_close(y, exact, jnp.float32)
    with jax.default_matmul_precision("float32"):
        assert_close(jcn.filter_acts(x, w, layout="NHWC"), exact, jnp.float32)
