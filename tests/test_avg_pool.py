"""avg_pool: the spec (window means, both conventions), the reference, our kernels on every
platform, derivatives of every order, and the GPU kernels against the CPU kernels (GPU tests
skip without a GPU)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_convnet as jcn
from jax_convnet import geometry as G
from jax_convnet import reference as ref
from conftest import (DTYPES, LAYOUTS, assert_close, hlo_text, images, rand, run_poisoned,
                      value_jvp_vjp)


# ----------------------------------------------------------------------------- the spec in numpy

def _hw_first(a, layout):
    ax = G.image_axes(layout)
    return np.moveaxis(np.asarray(a), (ax["h"], ax["w"]), (0, 1))


def _hw_back(a, layout):
    ax = G.image_axes(layout)
    return np.moveaxis(a, (0, 1), (ax["h"], ax["w"]))


def _windows(x, ds, kw):
    """(geom, [(oy, ox, rows, cols, reciprocal of the divisor)]) in increasing (oy, ox); rows and
    cols are the window's in-image ranges."""
    kw = dict(dict(stride=None, start=0, padding=None, count_include_pad=True, layout="C01B"), **kw)
    geom = G.avg_pool_geometry(x, ds, **kw)
    ax = G.image_axes(geom.layout)
    (h, w), acc = (x.shape[ax["h"]], x.shape[ax["w"]]), _acc_dtype(x.dtype)
    out = []
    for oy in range(geom.output_hw((h, w))[0]):
        for ox in range(geom.output_hw((h, w))[1]):
            y0 = oy * geom.strides[0] - geom.padding[0][0]
            x0 = ox * geom.strides[1] - geom.padding[1][0]
            rows = range(max(y0, 0), min(y0 + geom.window[0], h))
            cols = range(max(x0, 0), min(x0 + geom.window[1], w))
            count = (geom.window[0] * geom.window[1] if geom.count_include_pad
                     else len(rows) * len(cols))
            with np.errstate(divide="ignore"):
                out.append((oy, ox, rows, cols, acc(1) / acc(count)))
    return geom, out


def _acc_dtype(dtype):
    return np.float64 if dtype == jnp.float64 else np.float32


def spec_avg_pool(x, ds, **kw):
    """Each window: 0 + its in-image elements in row-major order, in float32 (float64 for
    float64), times the float32 reciprocal of its divisor, rounded once to the dtype. A window
    wholly in the padding with count_include_pad=False gives 0 * inf = NaN."""
    geom, windows = _windows(x, ds, kw)
    acc = _acc_dtype(x.dtype)
    xs = _hw_first(x, geom.layout).astype(acc)
    out_hw = (windows[-1][0] + 1, windows[-1][1] + 1)
    y = np.zeros(out_hw + xs.shape[2:], acc)
    with np.errstate(invalid="ignore"):
        for oy, ox, rows, cols, r in windows:
            s = np.zeros(xs.shape[2:], acc)
            for i in rows:
                for j in cols:
                    s = s + xs[i, j]
            y[oy, ox] = s * r
    return _hw_back(y, geom.layout).astype(x.dtype)


def spec_avg_pool_grad(x, g, ds, **kw):
    """Each image element: 0 + (ct(w) * reciprocal of w's divisor) over the windows w containing
    it in increasing (oy, ox), in float32 (float64 for float64), rounded once to the dtype."""
    geom, windows = _windows(x, ds, kw)
    acc = _acc_dtype(x.dtype)
    gs = _hw_first(g, geom.layout).astype(acc)
    dx = np.zeros(_hw_first(x, geom.layout).shape, acc)
    for oy, ox, rows, cols, r in windows:
        scaled = gs[oy, ox] * r
        for i in rows:
            for j in cols:
                dx[i, j] = dx[i, j] + scaled
    return _hw_back(dx, geom.layout).astype(x.dtype)


def flax_avg_pool(x, window, strides, padding, count_include_pad, layout):
    """flax.linen.avg_pool's formula (lax.reduce_window sum, then / window area or / a pooled
    count of ones) in either layout, without flax."""
    ax = G.image_axes(layout)
    dims, steps = [1] * 4, [1] * 4
    dims[ax["h"]], dims[ax["w"]] = window
    steps[ax["h"]], steps[ax["w"]] = strides
    if not isinstance(padding, str):
        pads = [(0, 0)] * 4
        pads[ax["h"]], pads[ax["w"]] = padding
        padding = tuple(pads)
    pool = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, dims, steps, padding)
    y = pool(x)
    if count_include_pad:
        return y / np.prod(window)
    return y / pool(jnp.ones(x.shape, x.dtype))


# ----------------------------------------------------------------------------- helpers

def check_avg_pool(x, ds, **kw):
    """Ours (outputs poisoned) equals the spec bit for bit (value, JVP = the value of the
    tangents, gradient) and the reference within the dtype's tolerance. Returns the value.
    float64 on the GPU runs the reference (no float64 kernels there): it sums in XLA's order, so
    it is held to the spec within float64's tolerance."""
    out_shape = jax.eval_shape(lambda x: ref.avg_pool(x, ds, **kw), x).shape
    t, g = rand(11, x.shape, x.dtype), rand(12, out_shape, x.dtype)
    y, ty, dx = run_poisoned(value_jvp_vjp(lambda x: jcn.avg_pool(x, ds, **kw)), x, t, g)
    bits = lambda a: np.asarray(a, np.float64)
    if x.dtype == jnp.float64 and dx.devices().pop().platform == "gpu":
        check = lambda a, b: assert_close(a, b, x.dtype)
    else:
        check = lambda a, b: np.testing.assert_array_equal(bits(a), bits(b))
    check(y, spec_avg_pool(x, ds, **kw))
    check(ty, spec_avg_pool(t, ds, **kw))
    check(dx, spec_avg_pool_grad(x, g, ds, **kw))
    y_ref, ty_ref, dx_ref = value_jvp_vjp(lambda x: ref.avg_pool(x, ds, **kw))(x, t, g)
    for a, b in ((y, y_ref), (ty, ty_ref), (dx, dx_ref)):
        assert_close(a, b, x.dtype)
    return y


# ----------------------------------------------------------------------------- semantics

def test_cuda_convnet_windows_are_max_pools_and_divide_by_their_in_image_pixels():
    # 7 x 8 image, 3 x 3 windows every 2: Ho, Wo = ceil((7-3)/2)+1, ceil((8-3)/2)+1 = 3, 4; the
    # last column of windows covers cols 6..7 only and divides by 3 * 2 = 6.
    x = jnp.arange(56, dtype=jnp.float32).reshape(1, 7, 8, 1)
    y = ref.avg_pool(x, 3, stride=2)
    assert y.shape == (1, 3, 4, 1) == jax.eval_shape(lambda x: jcn.max_pool(x, 3, stride=2), x).shape
    assert float(y[0, 0, 0, 0]) == float(x[0, 0:3, 0:3, 0].mean())
    assert float(y[0, 2, 3, 0]) == pytest.approx(float(x[0, 4:7, 6:8, 0].mean()))
    # start shifts the windows (the first rows / cols are skipped), still clipped at the end
    y = ref.avg_pool(x, (3, 2), stride=(2, 2), start=(1, 1))
    assert y.shape[1:3] == jcn.max_pool_output_size((7, 8), (3, 2), stride=2, start=1) == (3, 4)
    assert float(y[0, 2, 3, 0]) == pytest.approx(float(x[0, 5:7, 7:8, 0].mean()))
    np.testing.assert_allclose(y, spec_avg_pool(x, (3, 2), stride=2, start=1), rtol=1e-6)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2), (0, 1))])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_convention_is_flax_avg_pool(layout, padding, count_include_pad):
    x = images(2, layout, 2, 3, 9, 10, jnp.float64)
    kw = dict(stride=2, padding=padding, count_include_pad=count_include_pad, layout=layout)
    want = flax_avg_pool(x, (3, 3), (2, 2), padding, count_include_pad, layout)
    np.testing.assert_allclose(ref.avg_pool(x, 3, **kw), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jcn.avg_pool(x, 3, **kw), want, rtol=1e-12, atol=1e-12)


def test_count_include_pad_matters_only_with_padding():
    x = rand(3, (2, 8, 8, 3))
    a = jcn.avg_pool(x, 3, stride=2, count_include_pad=True)
    np.testing.assert_array_equal(a, jcn.avg_pool(x, 3, stride=2, count_include_pad=False))
    # SAME pads (0, 1): the last window holds rows 6, 7 and cols 6, 7 of the image
    border = jcn.avg_pool(x, 3, stride=2, padding="SAME")[:, -1, -1]
    assert_close(border, x[:, 6:, 6:].sum(axis=(1, 2)) / 9)
    border = jcn.avg_pool(x, 3, stride=2, padding="SAME", count_include_pad=False)[:, -1, -1]
    assert_close(border, x[:, 6:, 6:].mean(axis=(1, 2)))


def test_window_wholly_in_padding_is_nan_without_count_include_pad_as_in_flax(platform):
    x = rand(3, (2, 4, 5, 3))
    kw = dict(stride=2, padding=((3, 3), (0, 1)))
    y = jcn.avg_pool(x, 2, count_include_pad=False, **kw)
    assert np.all(np.isnan(y[:, 0])) and np.all(np.isnan(y[:, -1]))
    assert not np.any(np.isnan(y[:, 1:-1]))
    assert np.all(jcn.avg_pool(x, 2, **kw)[:, 0] == 0)  # count_include_pad: 0 / 4
    check_avg_pool(x, 2, **kw)
    # the gradient never sees those windows: finite everywhere
    dx = jax.grad(lambda x: jnp.sum(jnp.nan_to_num(jcn.avg_pool(x, 2, count_include_pad=False,
                                                                **kw))))(x)
    assert np.all(np.isfinite(dx))


# ----------------------------------------------------------------------------- our kernels

# (C, H, W, B) shapes, windows ds x ds every 1..ds: overlapping, rectangular, clipped.
CASES = [((16, 5, 5, 2), 3, 2), ((3, 7, 9, 5), 2, 1), ((4, 8, 8, 16), 3, 3), ((1, 3, 4, 1), 3, 1),
         ((2, 12, 11, 3), (3, 2), (2, 1)), ((5, 13, 13, 4), 3, 2)]


@pytest.mark.parametrize("shape,ds,stride", CASES, ids=str)
def test_cuda_convnet_convention(platform, shape, ds, stride):
    y = check_avg_pool(rand(0, shape), ds, stride=stride)
    assert y.shape[1:3] == jcn.max_pool_output_size(shape[1:3], ds, stride=stride)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_every_dtype_and_layout(platform, layout, dtype):
    x = images(1, layout, 3, 5, 9, 8, dtype)
    check_avg_pool(x, (3, 2), stride=(2, 1), layout=layout)
    check_avg_pool(x, 3, stride=2, start=(1, 2), layout=layout)
    check_avg_pool(x, 3, stride=2, padding="SAME", count_include_pad=False, layout=layout)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("padding", ["SAME", ((2, 1), (0, 2))])
def test_padding_convention(platform, padding, count_include_pad):
    x = images(2, "NHWC", 2, 4, 9, 10)
    check_avg_pool(x, (3, 2), stride=(2, 3), padding=padding,
                   count_include_pad=count_include_pad, layout="NHWC")


def test_large_windows_and_wide_rows(platform):
    # windows wider than any unrolled kernel; 9 lanes (no vector path), 8 lanes (vector path)
    check_avg_pool(rand(1, (2, 20, 21, 9)), (17, 6), stride=(3, 5))
    check_avg_pool(rand(2, (3, 20, 21, 8)), (5, 7), stride=(1, 2), layout="NHWC")
    # windows larger than the image (padding=): every window covers every row
    for include in (True, False):
        check_avg_pool(rand(3, (2, 3, 4, 5)), (6, 7), stride=1, padding=((4, 4), (5, 5)),
                       count_include_pad=include)


def test_derivatives_to_second_order():
    x = rand(6, (2, 7, 6, 3), jnp.float64)
    check_grads(lambda x: jcn.avg_pool(x, 3, stride=2), (x,), order=2, modes=["fwd", "rev"])
    check_grads(lambda x: jcn.avg_pool(x, 2, padding="SAME", count_include_pad=False,
                                       layout="NHWC"), (x,), order=2, modes=["fwd", "rev"])


def test_hessian_and_jvp_of_gradient_equal_the_reference():
    x = rand(6, (2, 6, 7, 2), jnp.float64)
    t = rand(7, x.shape, jnp.float64)
    loss = lambda pool: lambda x: jnp.sum(pool(x, 3, stride=2, start=1) ** 3)
    h = jax.jit(jax.hessian(loss(jcn.avg_pool)))(x)
    np.testing.assert_allclose(h, jax.jit(jax.hessian(loss(ref.avg_pool)))(x), rtol=1e-12,
                               atol=1e-12)
    jvp_of_grad = lambda pool: jax.jvp(jax.grad(loss(pool)), (x,), (t,))
    for got, want in zip(jax.jit(lambda: jvp_of_grad(jcn.avg_pool))(),
                         jax.jit(lambda: jvp_of_grad(ref.avg_pool))()):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the derivatives of the gradient run our two primitives only
    names = {e.primitive.name for e in jax.make_jaxpr(jax.hessian(loss(jcn.avg_pool)))(x).eqns
             if e.primitive.name.startswith("jax_convnet")}
    assert names == {"jax_convnet_avg_pool", "jax_convnet_avg_pool_grad"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap(platform, layout):
    xs = jnp.stack([images(k, layout, 2, 3, 7, 7) for k in range(3)], axis=1)
    pool = lambda x: jcn.avg_pool(x, 3, stride=2, layout=layout)
    got = jax.jit(jax.vmap(pool, 1))(xs)
    assert_close(got, jax.vmap(lambda x: ref.avg_pool(x, 3, stride=2, layout=layout), 1)(xs))
    np.testing.assert_array_equal(got[1], pool(xs[:, 1]))
    g = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(pool(x) ** 2)), 1))(xs)
    g_ref = jax.vmap(jax.grad(lambda x: jnp.sum(ref.avg_pool(x, 3, stride=2,
                                                             layout=layout) ** 2)), 1)(xs)
    assert_close(g, g_ref)


def test_vmap_of_the_gradient_with_unmapped_images_and_empty_batches(platform):
    x = rand(0, (2, 6, 6, 2))
    gs = rand(1, (4, 2, 3, 3, 2))
    vjp = jax.vjp(lambda x: jcn.avg_pool(x, 2), x)[1]
    got = jax.vmap(lambda g: vjp(g)[0])(gs)
    np.testing.assert_array_equal(got[2], vjp(gs[2])[0])
    assert jax.vmap(lambda g: vjp(g)[0])(gs[:0]).shape == (0, 2, 6, 6, 2)


def test_lowers_to_our_custom_calls_only(platform):
    x = rand(0, (3, 9, 9, 4))
    text = hlo_text(jax.grad(lambda x: jnp.sum(jcn.avg_pool(x, 3, stride=2) ** 2)), x)
    calls = re.findall(r"custom_call @(\w+)", text)
    assert calls == ["jax_convnet_avg_pool", "jax_convnet_avg_pool_grad"]
    assert "reduce_window" not in text


def test_bad_arguments_name_the_parameter():
    x = rand(0, (3, 9, 9, 4))
    with pytest.raises(TypeError, match="count_include_pad"):
        jcn.avg_pool(x, 2, count_include_pad=1)
    with pytest.raises(TypeError, match="count_include_pad"):
        jcn.avg_pool(x, 2, padding="SAME", count_include_pad="no")
    # the checks max_pool makes (geometry.pool_geometry), naming their parameter
    for kw, error, name in [(dict(ds=10), ValueError, "ds"), (dict(ds=0), ValueError, "ds"),
                            (dict(ds=2, stride=3), ValueError, "stride"),
                            (dict(ds=2, start=9), ValueError, "start"),
                            (dict(ds=2, start=1, padding="SAME"), ValueError, "start"),
                            (dict(ds=2, padding="FULL"), ValueError, "padding"),
                            (dict(ds=(2, 2, 2)), TypeError, "ds"),
                            (dict(ds=2, layout="NCHW"), ValueError, "layout")]:
        with pytest.raises(error, match=name):
            jcn.avg_pool(x, **kw)
    with pytest.raises(ValueError, match="images"):
        jcn.avg_pool(x[0], 2)
    with pytest.raises(TypeError, match="images"):
        jcn.avg_pool(x.astype(jnp.int32), 2)
    with pytest.raises(ValueError, match="avg_pool's output"):
        jcn.avg_pool(x, 1, padding=((2**30, 2**30 - 20), (2**30, 2**30 - 20)))


def test_handlers_check_what_they_receive(platform):
    name = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    assert jcn.has_native(name)  # (registers the targets ffi_call needs)
    x = rand(0, (3, 9, 9, 4))
    attrs = G.avg_pool_geometry(x, 3, stride=2, start=0, padding=None, count_include_pad=True,
                                layout="C01B").ffi_attrs()
    pool = lambda shape, dtype=x.dtype: jax.ffi.ffi_call(
        "jax_convnet_avg_pool", jax.ShapeDtypeStruct(shape, dtype))
    np.testing.assert_array_equal(pool((3, 4, 4, 4))(x, **attrs), jcn.avg_pool(x, 3, stride=2))
    with pytest.raises(Exception, match="batch/channels differ"):
        jax.block_until_ready(pool((3, 4, 4, 5))(x, **attrs))
    with pytest.raises(Exception, match="share one dtype"):
        jax.block_until_ready(pool((3, 4, 4, 4), jnp.float16)(x, **attrs))
    with pytest.raises(Exception, match="count_include_pad must be 0 or 1"):
        jax.block_until_ready(pool((3, 4, 4, 4))(x, **dict(attrs, count_include_pad=np.int64(2))))
    grad = jax.ffi.ffi_call("jax_convnet_avg_pool_grad", jax.ShapeDtypeStruct(x.shape, x.dtype))
    with pytest.raises(Exception, match="window must be >= 1"):
        jax.block_until_ready(grad(rand(1, (3, 4, 4, 4)), **dict(attrs, window_h=np.int64(0))))


# ----------------------------------------------------------------------------- on the GPU

def _gpu():
    return jax.devices("gpu")[0]


def _cpu():
    return jax.devices("cpu")[0]


def assert_same_bits(a, b):
    """Bit for bit, except that NaN payloads may differ (the GPU makes canonical NaNs)."""
    a, b = np.asarray(a), np.asarray(b)
    nan = np.isnan(a.astype(np.float32))
    np.testing.assert_array_equal(nan, np.isnan(b.astype(np.float32)))
    uint = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    np.testing.assert_array_equal(a.view(uint)[~nan], b.view(uint)[~nan])


GPU_CASES = [  # (C, H, W), ds, stride, padding, count_include_pad: unrolled 2x2 / 3x3 windows,
    # runtime windows, both conventions, clipped and padded borders
    ((16, 55, 55), 3, 2, None, True), ((8, 27, 27), 2, 2, None, True),
    ((24, 13, 13), 3, 1, None, True), ((8, 20, 40), (15, 16), (2, 5), None, True),
    ((8, 23, 21), 3, 2, "SAME", True), ((8, 23, 21), 3, 2, "SAME", False),
    ((5, 12, 11), (2, 3), (2, 1), ((3, 3), (0, 1)), False)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape,ds,stride,padding,include", GPU_CASES, ids=str)
@pytest.mark.parametrize("batch", [6, 16])  # C01B: scalar and vector paths (NHWC: by C)
def test_gpu_kernels_equal_the_cpu_kernels_bitwise(batch, shape, ds, stride, padding, include,
                                                   dtype, layout):
    c, h, w = shape
    x = images(4, layout, batch, c, h, w, dtype)
    pool = lambda x: jcn.avg_pool(x, ds, stride=stride, padding=padding,
                                  count_include_pad=include, layout=layout)
    g = rand(6, jax.eval_shape(pool, x).shape, dtype)
    run = jax.jit(lambda x, g: (pool(x), jax.vjp(pool, x)[1](g)[0]))
    on_gpu = run_poisoned(run, *jax.device_put((x, g), _gpu()))
    on_cpu = run(*jax.device_put((x, g), _cpu()))
    for a, b in zip(on_gpu, on_cpu):
        assert_same_bits(a, b)
    want = ref.avg_pool(*jax.device_put((x,), _cpu()), ds, stride=stride, padding=padding,
                        count_include_pad=include, layout=layout)
    finite = np.isfinite(np.asarray(want, np.float32))
    assert_close(np.asarray(on_gpu[0], np.float32)[finite], np.asarray(want, np.float32)[finite],
                 dtype)


@pytest.mark.gpu
def test_gpu_second_order_derivatives_equal_the_cpu_kernels_bitwise():
    x = images(17, "NHWC", 4, 8, 13, 12)
    t = rand(18, x.shape)
    loss = lambda x: jnp.sum(jcn.avg_pool(x, 3, stride=2, layout="NHWC") ** 2)
    jvp_of_grad = jax.jit(lambda x, t: jax.jvp(jax.grad(loss), (x,), (t,)))
    on_gpu = jvp_of_grad(*jax.device_put((x, t), _gpu()))
    on_cpu = jvp_of_grad(*jax.device_put((x, t), _cpu()))
    for a, b in zip(on_gpu, on_cpu):
        assert_same_bits(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_bitwise_reproducible(dtype):
    x = jax.device_put(images(7, "NHWC", 16, 64, 55, 55, dtype), _gpu())
    g = jax.device_put(rand(8, (16, 27, 27, 64), dtype), _gpu())
    run = jax.jit(lambda x, g: jax.vjp(lambda x: jcn.avg_pool(x, 3, stride=2, layout="NHWC"),
                                       x)[1](g))
    first = [np.asarray(a, np.float32) for a in run(x, g)]
    for _ in range(10):
        for a, b in zip(run(x, g), first):
            np.testing.assert_array_equal(np.asarray(a, np.float32), b)


@pytest.mark.gpu
def test_gpu_64_bit_indexing():
    # an image of more than 2**30 elements takes the 64-bit index path (float16: 2 GiB); the last
    # row of windows is clipped to one image row
    pool = lambda x: jcn.avg_pool(x, 2, layout="NHWC")
    x = jax.device_put(jnp.ones((1, 2**15 + 1, 2**15, 1), jnp.float16), _gpu())
    g = jax.device_put(jnp.ones((1, 2**14 + 1, 2**14, 1), jnp.float16), _gpu())
    y, dx = jax.jit(lambda x, g: (pool(x), jax.vjp(pool, x)[1](g)[0]))(x, g)
    assert float(jnp.min(y)) == float(jnp.max(y)) == 1.0
    assert float(jnp.min(dx[:, :-1])) == float(jnp.max(dx[:, :-1])) == 0.25
    assert float(jnp.min(dx[:, -1])) == float(jnp.max(dx[:, -1])) == 0.5  # clipped: 1 / 2
