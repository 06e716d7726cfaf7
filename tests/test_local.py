"""The locally connected family (local_filter_acts, local_image_acts, local_weight_acts) against
the pure-lax reference and lax.conv_general_dilated_local, on every platform; its rules
(transposes, second order, vmap, jit) and its bad arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_convnet as jcn
from jax_convnet import geometry as G
from jax_convnet import reference as ref
from conftest import DTYPES, LAYOUTS, assert_close, hlo_text, images, rand
from conftest import check_all_three as check_conv_family

_DIMENSION_NUMBERS = {"C01B": ("CHWN", "HWIO", "CHWN"), "NHWC": ("NHWC", "HWIO", "NHWC")}


def local_case(layout, dtype, n, c, h, w, f, fh, fw, key=0, **geometry):
    """Images and random locally connected filters for the output size ``geometry`` gives."""
    out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), **geometry)
    x = images(2 * key, layout, n, c, h, w, dtype)
    wt = rand(2 * key + 1, G.local_filter_shape(layout, out_hw, f, c, fh, fw), dtype)
    return x, wt


def check_all_three(x, w, dtype=None, **kw):
    """Our three local ops equal the reference's on these operands (and on random cotangents)."""
    return check_conv_family(x, w, dtype, family="local_", **kw)


def lax_local(x, w, layout, strides, padding, filter_hw):
    """lax.conv_general_dilated_local on our operands: its kernel is (Ho, Wo, C*fh*fw, F) with
    rows in (c, i, j) order, which is our C01B filters reshaped."""
    if layout == "NHWC":
        w = jnp.transpose(w, (0, 1, 4, 2, 3, 5))
    w = w.reshape(w.shape[0], w.shape[1], -1, w.shape[-1])
    return jax.lax.conv_general_dilated_local(
        x, w, strides, padding, filter_hw, dimension_numbers=_DIMENSION_NUMBERS[layout],
        precision="highest")


# ----------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_filter_bank_per_output_position(platform, layout):
    # out[y, x, f] = sum over (c, i, j) of image[c, y*s - pad + i, x*s - pad + j] * w[y, x, c, i, j, f]
    x, w = local_case(layout, jnp.float64, n=2, c=3, h=6, w=5, f=4, fh=3, fw=2, stride=2, pad=1)
    y = np.asarray(jcn.local_filter_acts(x, w, stride=2, pad=1, layout=layout))
    xn, wn = np.asarray(x), np.asarray(w)
    if layout == "NHWC":  # to C01B's order
        xn, wn, y = xn.transpose(3, 1, 2, 0), wn.transpose(0, 1, 4, 2, 3, 5), y.transpose(3, 1, 2, 0)
    padded = np.pad(xn, ((0, 0), (1, 3), (1, 3), (0, 0)))
    want = np.zeros(y.shape)
    for oy in range(y.shape[1]):
        for ox in range(y.shape[2]):
            patch = padded[:, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 2, :]  # (C, fh, fw, B)
            want[:, oy, ox, :] = np.einsum("cijb,cijf->fb", patch, wn[oy, ox])
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 3))])
def test_equals_lax_conv_general_dilated_local(platform, layout, padding):
    x, w = local_case(layout, jnp.float32, n=3, c=4, h=9, w=8, f=5, fh=3, fw=4, stride=2,
                      padding=padding)
    y = check_all_three(x, w, stride=2, padding=padding, layout=layout)
    pads = G.conv_padding((9, 8), (3, 4), 2, 0, padding)[1]
    assert_close(y, lax_local(x, w, layout, (2, 2), pads, (3, 4)))


@pytest.mark.parametrize("pad,stride,expected_hw", [
    (0, 1, (7, 6)), (1, 1, (9, 8)), (0, 2, (4, 4)), (1, 2, (5, 5)), (2, 3, (5, 4))])
def test_cuda_convnet_ceil_rule(platform, pad, stride, expected_hw):
    # filter_acts' pylearn2 sizes: 10x9 images, 4x4 filters; the last filters overhang the image.
    x, w = local_case("C01B", jnp.float32, n=5, c=3, h=10, w=9, f=6, fh=4, fw=4, pad=pad,
                      stride=stride)
    assert w.shape[:2] == expected_hw
    y = check_all_three(x, w, pad=pad, stride=stride)
    assert y.shape == (6, *expected_hw, 5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_odd_sizes_every_dtype(platform, layout, dtype):
    # batch 1, rectangular images, filters and strides, asymmetric explicit padding
    x, w = local_case(layout, dtype, n=1, c=5, h=7, w=8, f=7, fh=3, fw=2, stride=(2, 1),
                      padding=((1, 2), (0, 1)))
    check_all_three(x, w, dtype, stride=(2, 1), padding=((1, 2), (0, 1)), layout=layout)
    x, w = local_case(layout, dtype, n=3, c=2, h=7, w=8, f=3, fh=2, fw=3, stride=(1, 3),
                      pad=(2, 1))
    check_all_three(x, w, dtype, stride=(1, 3), pad=(2, 1), layout=layout)


@pytest.mark.parametrize("seed", range(8))
def test_random_configurations(platform, seed):
    rng = np.random.default_rng(100 + seed)
    layout = LAYOUTS[seed % 2]
    fh, fw = (int(v) for v in rng.integers(1, 5, 2))
    sh, sw = (int(v) for v in rng.integers(1, 4, 2))
    h, w = fh + int(rng.integers(0, 7)), fw + int(rng.integers(0, 7))
    n, c, f = (int(v) for v in rng.integers(1, 7, 3))
    if seed % 3 == 0:
        kw = dict(padding=tuple(tuple(int(v) for v in rng.integers(0, 3, 2)) for _ in range(2)))
    else:
        kw = dict(pad=tuple(int(v) for v in rng.integers(0, 3, 2)))
    x, wt = local_case(layout, jnp.float32, n, c, h, w, f, fh, fw, key=seed, stride=(sh, sw), **kw)
    check_all_three(x, wt, stride=(sh, sw), layout=layout, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cifar10_11pct_local_layers(platform, layout):
    # cuda-convnet's layers-conv-local-11pct: local3 (64 -> 32 channels) and local4 (32 -> 32),
    # 3x3 filters, 8x8 images, pad 1, stride 1 (batch reduced from 128).
    for c in (64, 32):
        x, w = local_case(layout, jnp.float32, n=8, c=c, h=8, w=8, f=32, fh=3, fw=3, pad=1)
        check_all_three(x, w, pad=1, layout=layout)


def test_a_filter_larger_than_the_register_tiles(platform):
    # more than 64 filters, more than 128 rows (C * fh * fw), batch not a multiple of 4
    x, w = local_case("NHWC", jnp.float32, n=7, c=17, h=4, w=5, f=70, fh=3, fw=3, pad=1)
    check_all_three(x, w, pad=1, layout="NHWC")


# ----------------------------------------------------------------------------- algebra

@pytest.mark.parametrize("layout", LAYOUTS)
def test_adjointness(platform, layout):
    # <local_filter_acts(x, w), g> = <x, local_image_acts(g, w)> = <w, local_weight_acts(x, g)>
    x, w = local_case(layout, jnp.float64, n=3, c=4, h=9, w=7, f=5, fh=3, fw=3, stride=2, pad=1)
    kw = dict(stride=2, pad=1, layout=layout)
    g = rand(5, jcn.local_filter_acts(x, w, **kw).shape, jnp.float64)
    a = jnp.vdot(jcn.local_filter_acts(x, w, **kw), g)
    b = jnp.vdot(x, jcn.local_image_acts(g, w, x.shape, **kw))
    c = jnp.vdot(w, jcn.local_weight_acts(x, g, w.shape, **kw))
    np.testing.assert_allclose([b, c], [a, a], rtol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_derivatives_to_second_order(platform, layout):
    x, w = local_case(layout, jnp.float64, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2, stride=(2, 1),
                      pad=1)
    kw = dict(stride=(2, 1), pad=1, layout=layout)
    check_grads(lambda x, w: jcn.local_filter_acts(x, w, **kw), (x, w), order=2,
                modes=["fwd", "rev"])
    g = rand(3, jcn.local_filter_acts(x, w, **kw).shape, jnp.float64)
    check_grads(lambda g, w: jcn.local_image_acts(g, w, x.shape, **kw), (g, w), order=2,
                modes=["fwd", "rev"])
    check_grads(lambda x, g: jcn.local_weight_acts(x, g, (3, 2), **kw), (x, g), order=2,
                modes=["fwd", "rev"])


def test_gradients_under_jit_match_lax(platform):
    x, w = local_case("NHWC", jnp.float32, n=4, c=3, h=10, w=9, f=6, fh=3, fw=3, stride=2,
                      padding="SAME")
    pads = G.conv_padding((10, 9), (3, 3), 2, 0, "SAME")[1]
    ours = lambda x, w: jcn.local_filter_acts(x, w, stride=2, padding="SAME", layout="NHWC")
    theirs = lambda x, w: lax_local(x, w, "NHWC", (2, 2), pads, (3, 3))
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)) ** 2)
    got = jax.jit(jax.grad(loss(ours), (0, 1)))(x, w)
    want = jax.grad(loss(theirs), (0, 1))(x, w)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mapped", ["first", "second", "both"])
def test_vmap_every_op(platform, layout, mapped):
    x, w = local_case(layout, jnp.float32, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2, stride=2, pad=1)
    kw = dict(stride=2, pad=1, layout=layout)
    g = rand(3, jcn.local_filter_acts(x, w, **kw).shape)
    ops = [
        (jcn.local_filter_acts, ref.local_filter_acts, x, w, {}),
        (jcn.local_image_acts, ref.local_image_acts, g, w, dict(image_shape=x.shape)),
        (jcn.local_weight_acts, ref.local_weight_acts, x, g, dict(filter_shape=w.shape)),
    ]
    in_axes = {"first": (0, None), "second": (None, 0), "both": (0, 0)}[mapped]
    stack = lambda v: jnp.stack([v, 1.5 * v + 0.25, -v])
    for ours, theirs, a, b, extra in ops:
        a3 = stack(a) if in_axes[0] == 0 else a
        b3 = stack(b) if in_axes[1] == 0 else b
        got = jax.jit(jax.vmap(lambda a, b: ours(a, b, **extra, **kw), in_axes))(a3, b3)
        want = jax.vmap(lambda a, b: theirs(a, b, **extra, **kw), in_axes)(a3, b3)
        assert_close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lowers_to_our_custom_calls_only(platform, layout):
    if not jcn.has_native(platform.replace("gpu", "cuda")):
        pytest.fail(f"native {platform} module missing")
    x, w = local_case(layout, jnp.float32, n=2, c=3, h=8, w=8, f=4, fh=3, fw=3, pad=1)
    loss = lambda x, w: jnp.sum(jcn.local_filter_acts(x, w, pad=1, layout=layout) ** 2)
    text = hlo_text(jax.grad(loss, (0, 1)), x, w)
    for target in ("local_filter_acts", "local_image_acts", "local_weight_acts"):
        assert f"jax_convnet_{target}" in text
    assert "convolution" not in text and "dot_general" not in text


def test_eager_calls_keep_the_dtype(platform):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x, w = local_case("C01B", dtype, n=2, c=3, h=5, w=5, f=2, fh=2, fw=2)
        y = jcn.local_filter_acts(x, w)
        assert y.dtype == dtype and y.shape == (2, 4, 4, 2)


def test_results_are_bitwise_reproducible(platform):
    x, w = local_case("NHWC", jnp.float32, n=16, c=16, h=8, w=8, f=32, fh=3, fw=3, pad=1)
    step = jax.jit(jax.grad(lambda x, w: jnp.sum(
        jcn.local_filter_acts(x, w, pad=1, layout="NHWC") ** 2), (0, 1)))
    first = [np.asarray(v) for v in step(x, w)]
    for _ in range(3):
        for a, b in zip(first, step(x, w)):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_precision_highest_gives_float32_accuracy(platform):
    x, w = local_case("NHWC", jnp.float32, n=8, c=64, h=8, w=8, f=32, fh=3, fw=3, pad=1)
    exact = ref.local_filter_acts(x.astype(jnp.float64), w.astype(jnp.float64), pad=1,
                                  layout="NHWC")
    for precision in ("highest", None):
        y = jcn.local_filter_acts(x, w, pad=1, layout="NHWC", precision=precision)
        assert_close(y, exact, jnp.float32)


def test_symbolic_batch_under_jax_export():
    """Shape-polymorphic export with a symbolic batch: the exported forward and gradients run at
    any batch size and equal the eager result."""
    from jax import export
    x, w = local_case("NHWC", jnp.float32, n=5, c=3, h=7, w=6, f=4, fh=3, fw=3, pad=1)
    loss = lambda x, w: jnp.sum(jcn.local_filter_acts(x, w, pad=1, layout="NHWC") ** 2)
    f = jax.grad(loss, (0, 1))
    b, = export.symbolic_shape("b")
    exp = export.export(jax.jit(f), disabled_checks=jcn.export_safety_checks())(
        jax.ShapeDtypeStruct((b, 7, 6, 3), jnp.float32), jax.ShapeDtypeStruct(w.shape, w.dtype))
    assert exp.out_avals[0].shape == (b, 7, 6, 3)
    for n in (5, 2):
        for got, want in zip(exp.call(x[:n], w), f(x[:n], w)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["filter_acts", "image_acts", "weight_acts"])
def test_vmap_over_an_empty_axis_gives_an_empty_result(op):
    x, w = local_case("C01B", jnp.float32, n=2, c=3, h=5, w=5, f=4, fh=2, fw=2)
    g = rand(3, jcn.local_filter_acts(x, w).shape)
    call, a, b = {
        "filter_acts": (jcn.local_filter_acts, x, w),
        "image_acts": (lambda g, w: jcn.local_image_acts(g, w, x.shape), g, w),
        "weight_acts": (lambda x, g: jcn.local_weight_acts(x, g, w.shape), x, g),
    }[op]
    out = jax.vmap(call, (0, None))(jnp.zeros((0, *a.shape), a.dtype), b)
    assert out.shape == (0, *jax.eval_shape(call, a, b).shape)


# ----------------------------------------------------------------------------- bad arguments

X = rand(0, (3, 10, 9, 5))  # C01B images
W = rand(1, (7, 6, 3, 4, 4, 16))  # 4x4 filters: a 7x6 output at stride 1, no padding


@pytest.mark.parametrize("call,error,names", [
    (lambda: jcn.local_filter_acts(X, W[:6]), ValueError, ["filters", "6x6", "(7, 6, 3, 4, 4, 16)"]),
    (lambda: jcn.local_filter_acts(X, W, stride=2), ValueError,
     ["filters", "7x6", "(4, 4, 3, 4, 4, 16)", "strides (2, 2)"]),
    (lambda: jcn.local_filter_acts(X, W[:, :, :2]), ValueError, ["input channels"]),
    (lambda: jcn.local_filter_acts(X, W[0]), ValueError, ["filters", "rank 6"]),
    (lambda: jcn.local_filter_acts(X[0], W), ValueError, ["images", "rank 4"]),
    (lambda: jcn.local_filter_acts(X, W.astype(jnp.float16)), TypeError, ["images", "filters"]),
    (lambda: jcn.local_filter_acts(X.astype(jnp.int32), W.astype(jnp.int32)), TypeError,
     ["images", "float32"]),
    (lambda: jcn.local_filter_acts(X, W, pad=1, padding="SAME"), ValueError, ["pad=", "padding="]),
    (lambda: jcn.local_filter_acts(X, W, stride=0), ValueError, ["stride"]),
    (lambda: jcn.local_filter_acts(X, W, padding="FULL"), ValueError, ["padding"]),
    (lambda: jcn.local_filter_acts(X, W, layout="NCHW"), ValueError, ["layout"]),
    (lambda: jcn.local_filter_acts(X, W, precision="fast"), ValueError, ["precision"]),
    (lambda: jcn.local_image_acts(rand(2, (16, 7, 6, 5)), W, (10, 10)), ValueError,
     ["hid_acts", "(7, 6)", "(7, 7)"]),
    (lambda: jcn.local_image_acts(rand(2, (16, 7, 6, 5)), W, (3, 10, 9, 4)), ValueError,
     ["image_shape", "batch 5"]),
    (lambda: jcn.local_image_acts(rand(2, (16, 7, 6, 5)), W, "10x9"), TypeError,
     ["image_shape"]),
    (lambda: jcn.local_weight_acts(X, rand(2, (16, 7, 6, 5)), (7, 6, 3, 4, 4, 8)), ValueError,
     ["filter_shape", "16 filters"]),
    (lambda: jcn.local_weight_acts(X, rand(2, (16, 7, 6, 5)), (5, 4)), ValueError,
     ["hid_grads", "(7, 6)"]),
    (lambda: jcn.local_weight_acts(X, rand(2, (16, 7, 6, 5)), 4), TypeError, ["filter_shape"]),
    (lambda: jcn.local_weight_acts(X, rand(2, (16, 7, 6, 4)), (4, 4)), ValueError,
     ["hid_grads", "batch size 4"]),
    (lambda: jcn.local_weight_acts(X, rand(2, (16, 7, 6, 5)), (4, 2**31)), ValueError,
     ["filter_shape", "2**31 - 1"]),
    (lambda: jcn.local_filter_acts(X, W, pad=2**40), ValueError, ["pad", "2**31 - 1"]),
    (lambda: jcn.local_filter_acts(X, W, stride=2**63), ValueError, ["stride"]),
    (lambda: jcn.local_filter_acts(X > 0, W > 0), TypeError, ["images", "bool"]),
    (lambda: jcn.local_filter_acts(X.astype(jnp.complex64), W.astype(jnp.complex64)), TypeError,
     ["images"]),
    (lambda: jcn.local_filter_acts(X, W[..., :0]), ValueError, ["filters", "empty"]),
    (lambda: jcn.local_filter_acts(1.0, W), TypeError, ["images"]),
])
def test_bad_arguments_name_the_parameter(call, error, names):
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="filters"):
        jax.jit(lambda x, w: jcn.local_filter_acts(x, w, stride=2)).lower(X, W)


def test_native_handler_rejects_inconsistent_calls_without_crashing():
    """The handlers re-check what they receive (here an ffi_call made by hand) and return an
    error, never abort."""
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    assert jcn.has_native(platform)
    attrs = G.local_filter_acts_geometry(X, W, stride=1, pad=0, padding=None, layout="C01B",
                                         precision=None).ffi_attrs()
    call = lambda shape: jax.ffi.ffi_call("jax_convnet_local_filter_acts",
                                          jax.ShapeDtypeStruct(shape, X.dtype))
    with pytest.raises(Exception, match="hidden spatial size"):
        jax.block_until_ready(call((16, 6, 6, 5))(X, W, **attrs))
    with pytest.raises(Exception, match="output positions"):
        jax.block_until_ready(call((16, 7, 6, 5))(X, W[:6], **attrs))
    with pytest.raises(Exception, match="strides and padding"):
        jax.block_until_ready(call((16, 7, 6, 5))(X, W, **dict(attrs, stride_h=np.int64(2**40))))
    with pytest.raises(Exception, match="rank 6"):
        jax.block_until_ready(call((16, 7, 6, 5))(X, W[0], **attrs))
