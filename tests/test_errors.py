"""Bad input: a ValueError or TypeError at trace time that names the parameter, never a crash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from conftest import rand

X = rand(0, (3, 10, 9, 5))  # C01B images
W = rand(1, (3, 4, 4, 16))  # C01B filters
H = rand(2, (16, 7, 6, 5))  # filter_acts(X, W)


@pytest.mark.parametrize("kwargs,error,names", [
    (dict(pad=1, padding="SAME"), ValueError, ["pad", "padding"]),
    (dict(pad=-1), ValueError, ["pad"]),
    (dict(pad=1.5), TypeError, ["pad"]),
    (dict(stride=0), ValueError, ["stride"]),
    (dict(stride=(1, 2, 3)), TypeError, ["stride"]),
    (dict(padding="FULL"), ValueError, ["padding"]),
    (dict(padding=((1, 1),)), TypeError, ["padding"]),
    (dict(padding=((1, -1), (0, 0))), ValueError, ["padding"]),
    (dict(layout="NCHW"), ValueError, ["layout"]),
    (dict(partial_sum=5), ValueError, ["partial_sum", "42"]),
    (dict(partial_sum=-2), ValueError, ["partial_sum"]),
    (dict(partial_sum="sometimes"), ValueError, ["partial_sum"]),
    (dict(precision="quadruple"), ValueError, ["precision"]),
])
def test_filter_acts_bad_arguments(kwargs, error, names):
    with pytest.raises(error) as e:
        jcn.filter_acts(X, W, **kwargs)
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("images,filters,error,names", [
    (X[0], W, ValueError, ["images", "rank"]),
    (X, W[..., 0], ValueError, ["filters", "rank"]),
    (X, W.astype(jnp.float16), TypeError, ["images", "filters", "dtype"]),
    (X.astype(jnp.int32), W.astype(jnp.int32), TypeError, ["images", "int32"]),
    (X, rand(3, (4, 4, 4, 16)), ValueError, ["channels", "4", "3"]),
    (rand(4, (3, 3, 3, 5)), W, ValueError, ["larger than the padded image"]),
    ([[1.0]], W, TypeError, ["images"]),
])
def test_filter_acts_bad_operands(images, filters, error, names):
    with pytest.raises(error) as e:
        jcn.filter_acts(images, filters)
    for name in names:
        assert name in str(e.value)


def test_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="stride"):
        jax.jit(lambda x, w: jcn.filter_acts(x, w, stride=0)).lower(X, W)


def test_image_acts_checks_image_shape():
    with pytest.raises(ValueError, match="hid_acts has spatial size"):
        jcn.image_acts(H, W, (20, 20))
    with pytest.raises(ValueError, match="image_shape"):
        jcn.image_acts(H, W, (4, 10, 9, 5))  # 4 channels, filters have 3
    with pytest.raises(TypeError, match="image_shape"):
        jcn.image_acts(H, W, "big")
    with pytest.raises(ValueError, match="hid_acts has 16 channels but there are 8 filters"):
        jcn.image_acts(H, W[..., :8], (10, 9))


def test_weight_acts_checks_filter_shape_and_batch():
    with pytest.raises(ValueError, match="hid_grads has spatial size"):
        jcn.weight_acts(X, H, (3, 3))
    with pytest.raises(ValueError, match="filter_shape"):
        jcn.weight_acts(X, H, (3, 4, 4, 8))
    with pytest.raises(ValueError, match="batch size"):
        jcn.weight_acts(X, H[..., :4], (4, 4))
    with pytest.raises(ValueError, match="partial_sum=5 must divide"):
        jcn.weight_acts(X, H, (4, 4), partial_sum=5)


@pytest.mark.parametrize("args,kwargs,error,names", [
    ((4,), dict(stride=5), ValueError, ["stride", "ds"]),
    ((11,), {}, ValueError, ["ds", "image size"]),
    ((0,), {}, ValueError, ["ds"]),
    ((3,), dict(start=10), ValueError, ["start"]),
    ((3,), dict(start=-1), ValueError, ["start"]),
    ((3,), dict(start=1, padding="SAME"), ValueError, ["start", "padding"]),
    ((3,), dict(padding="CIRCULAR"), ValueError, ["padding"]),
    ((3,), dict(layout="NCHW"), ValueError, ["layout"]),
    (((3, 3, 3),), {}, TypeError, ["ds"]),
    ((3,), dict(start=8, stride=2), ValueError, ["start", "no window"]),
])
def test_max_pool_bad_arguments(args, kwargs, error, names):
    with pytest.raises(error) as e:
        jcn.max_pool(X, *args, **kwargs)
    for name in names:
        assert name in str(e.value)


def test_max_pool_bad_images():
    with pytest.raises(ValueError, match="images must have rank 4"):
        jcn.max_pool(X[0], 2)
    with pytest.raises(TypeError, match="images must be float32"):
        jcn.max_pool(X.astype(jnp.int8), 2)


def test_native_handler_rejects_inconsistent_calls_without_crashing():
    """The C++ handlers re-check what they receive and return an error, never abort (the CUDA
    handlers where the default device is a GPU)."""
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if not jcn.has_native(platform):  # (also registers its targets, which ffi_call needs)
        pytest.fail(f"native {platform} module missing")
    attrs = jcn.geometry.conv_geometry(
        image_hw=(10, 9), filter_hw=(4, 4), channels=3, filters=16, stride=1, pad=0,
        padding=None, partial_sum=None, layout="C01B", precision=None).ffi_attrs()
    # On the GPU filter_acts' custom call has a second result: its (here empty) workspace.
    workspace = (jax.ShapeDtypeStruct((0,), np.uint8),) if platform == "cuda" else ()

    def filter_acts_call(hidden_shape):
        return jax.ffi.ffi_call("jax_convnet_filter_acts",
                                (jax.ShapeDtypeStruct(hidden_shape, X.dtype), *workspace))

    call = filter_acts_call((16, 5, 5, 5))
    with pytest.raises(Exception, match="hidden spatial size"):
        jax.block_until_ready(call(X, W, **attrs))
    bad = dict(attrs, stride_h=np.int64(0))
    call = filter_acts_call((16, 7, 6, 5))
    with pytest.raises(Exception, match="strides"):
        jax.block_until_ready(call(X, W, **bad))
    pool = jax.ffi.ffi_call("jax_convnet_max_pool", jax.ShapeDtypeStruct((3, 5, 5, 4), X.dtype))
    pattrs = jcn.geometry.pool_geometry((10, 9), 2).ffi_attrs()
    with pytest.raises(Exception, match="batch"):
        jax.block_until_ready(pool(X, **pattrs))


# ----------------------------------------------------------------------------- the argument matrix
# Every public function (and the Flax wrappers) x every class of bad argument: a ValueError or
# TypeError naming the parameter, raised in this process (no argument reaches XLA's shape
# arithmetic or the kernels out of range, so none can abort it).

BIG = 2**31  # one past the largest extent (jax_convnet.geometry.MAX_EXTENT = 2**31 - 1)
XN = rand(5, (5, 10, 9, 3))  # NHWC images
WN = rand(6, (4, 4, 3, 16))  # NHWC (HWIO) filters


def _fa(**kw):
    return lambda: jcn.filter_acts(X, W, **kw)


def _ia(image_shape, **kw):
    return lambda: jcn.image_acts(H, W, image_shape, **kw)


def _wa(filter_shape, **kw):
    return lambda: jcn.weight_acts(X, H, filter_shape, **kw)


def _mp(*args, **kw):
    return lambda: jcn.max_pool(X, *args, **kw)


def _flax_conv(**kw):
    def run():
        from jax_convnet.flax import linen
        module = linen.Conv(**{"features": 4, "kernel_size": (3, 3), **kw})
        return module.init(jax.random.key(0), XN)
    return run


def _flax_pool(**kw):
    def run():
        from jax_convnet.flax import linen
        return linen.MaxPool(**{"window_shape": 2, **kw}).apply({}, XN)
    return run


MATRIX = {
    # sizes, strides and pads past the kernels' range (these aborted the process through XLA)
    "fa-stride-2**31": (_fa(stride=BIG), ValueError, ["stride", str(BIG)]),
    "fa-stride-2**62": (_fa(stride=2**62), ValueError, ["stride"]),
    "fa-stride-2**63": (_fa(stride=2**63), ValueError, ["stride"]),
    "fa-stride-pair": (_fa(stride=(1, 2**40)), ValueError, ["stride"]),
    "fa-stride-bool": (_fa(stride=True), TypeError, ["stride"]),
    "fa-stride-float": (_fa(stride=2.0), TypeError, ["stride"]),
    "fa-pad-2**40": (_fa(pad=2**40), ValueError, ["pad"]),
    "fa-pad-2**63": (_fa(pad=2**63), ValueError, ["pad"]),
    "fa-pad-pair": (_fa(pad=(0, -3)), ValueError, ["pad"]),
    "fa-padding-2**62": (_fa(padding=((2**62, 0), (0, 0))), ValueError, ["padding"]),
    "fa-padding-str": (_fa(padding=(("a", 0), (0, 0))), TypeError, ["padding"]),
    "fa-padded-extent": (_fa(padding=((2**30, 2**30), (0, 0))), ValueError,
                         ["padding", "padded image"]),
    "fa-ceil-overhang": (_fa(stride=2**31 - 1), ValueError, ["pad", "stride", "padded image"]),
    "fa-output-elements": (_fa(padding=((2**30, 2**30 - 100), (2**30, 2**30 - 100))),
                           ValueError, ["filter_acts' output", "elements"]),
    "fa-partial_sum-2**63": (_fa(partial_sum=2**63), ValueError, ["partial_sum"]),
    "fa-partial_sum-bool": (_fa(partial_sum=True), TypeError, ["partial_sum"]),
    "fa-partial_sum-float": (_fa(partial_sum=2.0), TypeError, ["partial_sum"]),
    "fa-precision-int": (_fa(precision=3), ValueError, ["precision"]),
    "fa-layout-none": (_fa(layout=None), ValueError, ["layout"]),
    # operands: dtypes, ranks, empty arrays, channels
    "fa-bool": (lambda: jcn.filter_acts(X > 0, W > 0), TypeError, ["images", "bool"]),
    "fa-complex": (lambda: jcn.filter_acts(X.astype(jnp.complex64), W.astype(jnp.complex64)),
                   TypeError, ["images", "complex64"]),
    "fa-int-filters": (lambda: jcn.filter_acts(X, W.astype(jnp.int8)), TypeError,
                       ["filters", "int8"]),
    "fa-empty-images": (lambda: jcn.filter_acts(X[..., :0], W), ValueError, ["images", "empty"]),
    "fa-empty-filters": (lambda: jcn.filter_acts(X, W[..., :0]), ValueError,
                         ["filters", "empty"]),
    "fa-rank-5": (lambda: jcn.filter_acts(X[None], W), ValueError, ["images", "rank"]),
    "fa-scalar": (lambda: jcn.filter_acts(1.0, W), TypeError, ["images"]),
    "fa-nhwc-channels": (lambda: jcn.filter_acts(XN, WN[:, :, :2], layout="NHWC"), ValueError,
                         ["channels"]),
    # image_acts' image_shape in both forms
    "ia-4d-negative": (_ia((3, 10, -9, 5)), ValueError, ["image_shape", "-9"]),
    "ia-4d-zero": (_ia((3, 0, 9, 5)), ValueError, ["image_shape"]),
    "ia-4d-huge": (_ia((3, 2**40, 9, 5)), ValueError, ["image_shape"]),
    "ia-hw-zero": (_ia((0, 9)), ValueError, ["image_shape"]),
    "ia-hw-huge": (_ia((2**40, 9)), ValueError, ["image_shape"]),
    "ia-hw-2**63": (_ia((2**63, 9)), ValueError, ["image_shape"]),
    "ia-elements": (_ia((2**31 - 1, 2**31 - 1)), ValueError, ["image_shape", "elements"]),
    "ia-3-entries": (_ia((3, 10, 9)), TypeError, ["image_shape"]),
    "ia-float": (_ia((10.0, 9)), TypeError, ["image_shape"]),
    "ia-batch": (_ia((3, 10, 9, 4)), ValueError, ["image_shape", "batch"]),
    "ia-stride": (_ia((10, 9), stride=BIG), ValueError, ["stride"]),
    "ia-pad": (_ia((10, 9), pad=2**63), ValueError, ["pad"]),
    "ia-hid-dtype": (lambda: jcn.image_acts(H.astype(jnp.float16), W, (10, 9)), TypeError,
                     ["hid_acts", "filters", "dtype"]),
    "ia-empty": (lambda: jcn.image_acts(H[..., :0], W, (10, 9)), ValueError,
                 ["hid_acts", "empty"]),
    # weight_acts' filter_shape in both forms
    "wa-4d-negative": (_wa((3, -4, 4, 16)), ValueError, ["filter_shape", "-4"]),
    "wa-4d-zero": (_wa((3, 4, 4, 0)), ValueError, ["filter_shape"]),
    "wa-4d-huge": (_wa((3, 4, 2**62, 16)), ValueError, ["filter_shape"]),
    "wa-hw-negative": (_wa((4, -4)), ValueError, ["filter_shape"]),
    "wa-hw-huge": (_wa((4, 2**40)), ValueError, ["filter_shape"]),
    "wa-string": (_wa("4x4"), TypeError, ["filter_shape"]),
    "wa-channels": (_wa((2, 4, 4, 16)), ValueError, ["filter_shape", "channels"]),
    "wa-padding": (_wa((4, 4), padding=((0, 2**62), (0, 0))), ValueError, ["padding"]),
    "wa-partial_sum": (_wa((4, 4), partial_sum=2**40), ValueError, ["partial_sum"]),
    "wa-hid-rank": (lambda: jcn.weight_acts(X, H[0], (4, 4)), ValueError, ["hid_grads", "rank"]),
    # max_pool
    "mp-ds-2**31": (_mp(BIG), ValueError, ["ds"]),
    "mp-ds-negative": (_mp(-2), ValueError, ["ds"]),
    "mp-ds-float": (_mp(2.5), TypeError, ["ds"]),
    "mp-stride-2**62-padding": (_mp(2, stride=2**62, padding=((1, 1), (1, 1))), ValueError,
                                ["stride"]),
    "mp-stride-2**63": (_mp(2, stride=2**63, padding="SAME"), ValueError, ["stride"]),
    "mp-stride-zero": (_mp(2, stride=0), ValueError, ["stride"]),
    "mp-padding-2**62": (_mp(2, padding=((2**62, 0), (0, 0))), ValueError, ["padding"]),
    "mp-padded-extent": (_mp(2, padding=((2**30, 2**30), (0, 0))), ValueError,
                         ["padding", "padded image"]),
    "mp-output-elements": (_mp(1, stride=1, padding=((2**30, 2**30 - 20), (2**30, 2**30 - 20))),
                           ValueError, ["max_pool's output", "elements"]),
    "mp-start-2**40": (_mp(2, start=2**40), ValueError, ["start"]),
    "mp-start-negative-2**63": (_mp(2, start=-2**63), ValueError, ["start"]),
    "mp-empty": (lambda: jcn.max_pool(X[:0], 2), ValueError, ["images", "empty"]),
    "mp-complex": (lambda: jcn.max_pool(X.astype(jnp.complex64), 2), TypeError, ["images"]),
    "mp-list": (lambda: jcn.max_pool([[1.0]], 2), TypeError, ["images"]),
    # output-size helpers
    "fa-size-huge": (lambda: jcn.filter_acts_output_size(2**40, 3), ValueError, ["image_size"]),
    "fa-size-stride": (lambda: jcn.filter_acts_output_size(10, 3, stride=2**63), ValueError,
                       ["stride"]),
    "mp-size-padding": (lambda: jcn.max_pool_output_size(10, 3, padding=((2**62, 0), (0, 0))),
                        ValueError, ["padding"]),
    # the Flax wrappers pass their arguments through the same checks
    "flax-conv-strides": (_flax_conv(strides=2**63), ValueError, ["stride"]),
    "flax-conv-padding": (_flax_conv(padding=((2**62, 0), (0, 0))), ValueError, ["padding"]),
    "flax-pool-strides": (_flax_pool(strides=2**62, padding="SAME"), ValueError, ["stride"]),
    "flax-pool-window": (_flax_pool(window_shape=0), ValueError, ["window_shape"]),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_argument_matrix(case):
    call, error, names = MATRIX[case]
    with pytest.raises(error) as e:
        jax.block_until_ready(call())
    for name in names:
        assert name in str(e.value), f"{name!r} not in {str(e.value)!r}"


@pytest.mark.parametrize("call", [
    lambda m: m.filter_acts(X, W, stride=2**31 - 1, padding="VALID"),
    lambda m: m.filter_acts(X, W, stride=(2**31 - 1, 1), padding=((0, 2**16), (3, 0))),
    lambda m: m.image_acts(H[:, :1, :1], W, (10, 9), stride=2**31 - 1, padding="VALID"),
    lambda m: m.max_pool(X, 2, stride=2**31 - 1, padding="SAME"),
    lambda m: m.max_pool(X, (3, 2), stride=(2**31 - 1, 1), padding=((2, 2**16), (1, 1))),
    lambda m: m.avg_pool(X, 2, stride=2**31 - 1, padding="SAME"),
    lambda m: m.avg_pool(X, (3, 2), stride=(2**31 - 1, 1), padding=((2, 2**16), (1, 1)),
                         count_include_pad=False),
], ids=["fa-stride", "fa-padding", "ia-stride", "mp-stride", "mp-padding", "ap-stride",
        "ap-padding"])
def test_extreme_valid_arguments_run(call):
    """At the edge of the range (strides of 2**31 - 1, large pads) the ops run and agree
    with the reference (at float32 accuracy: on a GPU the default may be TF32)."""
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(call(jcn), call(jcn.reference), rtol=1e-5, atol=1e-5)


def test_avg_pool_windows_of_more_than_2_to_the_31_elements():
    """The divisor window_h * window_w overflows int32; the kernels use int64 (the reference
    would pad the image to 2**16 x 2**16)."""
    pads = ((2**16, 2**17 - 10), (2**16, 2**17 - 9))  # windows: padding, the image, padding
    pool = lambda x, include: jcn.avg_pool(x, 2**16, stride=2**16, padding=pads,
                                           count_include_pad=include)
    y = pool(X, True)  # 3 x 3 windows; the middle one holds the whole image
    assert y.shape == (3, 3, 3, 5)
    np.testing.assert_allclose(y[:, 1, 1], X.sum(axis=(1, 2)) / 2**32, rtol=1e-5)
    assert np.count_nonzero(y) == 3 * 5
    y = pool(X, False)
    np.testing.assert_allclose(y[:, 1, 1], X.mean(axis=(1, 2)), rtol=1e-5)
    assert np.count_nonzero(np.isnan(y)) == 8 * 3 * 5
    dx = jax.vjp(lambda x: pool(x, True), X)[1](jnp.ones(y.shape, y.dtype))[0]
    np.testing.assert_array_equal(dx, np.full(X.shape, 2.0**-32, np.float32))


def test_bad_arguments_are_caught_when_traced():
    """Under jit nothing out of range reaches lowering: the same error at trace time."""
    for fn in (lambda x, w: jcn.filter_acts(x, w, pad=2**40),
               lambda x, w: jcn.max_pool(x, 2, padding=((2**62, 0), (0, 0)))):
        with pytest.raises(ValueError, match="pad"):
            jax.jit(fn).trace(X, W)


# ----------------------------------------------------------------------------- inputs as JAX treats them

def test_numpy_float64_operands_are_canonicalized_like_jax_numpy():
    """With x64 off a float64 NumPy array becomes float32, as jax.numpy makes it; two JAX arrays
    of different dtypes stay an error (lax.conv_general_dilated's rule)."""
    x64, w64 = np.asarray(X, np.float64), np.asarray(W, np.float64)
    with jax.enable_x64(False):
        y = jcn.filter_acts(x64, W)
        assert y.dtype == jnp.float32
        np.testing.assert_array_equal(y, jcn.filter_acts(X, W))
        assert jcn.max_pool(x64, 3, stride=2).dtype == jnp.float32
        h = jcn.image_acts(np.asarray(H, np.float64), w64, (10, 9))
        assert h.dtype == jnp.float32
        assert jcn.weight_acts(x64, np.asarray(H), (4, 4)).dtype == jnp.float32
    with jax.enable_x64(True):
        assert jcn.filter_acts(x64, w64).dtype == jnp.float64
        with pytest.raises(TypeError, match="images and filters must share one dtype"):
            jcn.filter_acts(jnp.asarray(x64), W)


@pytest.mark.parametrize("op", ["filter_acts-images", "filter_acts-filters", "filter_acts-both",
                                "image_acts", "weight_acts", "max_pool", "max_pool-grad",
                                "avg_pool", "avg_pool-grad"])
def test_vmap_over_an_empty_axis_gives_an_empty_result(op):
    """As lax does: the mapped axis of size 0 in front, the rest of the shape as for one slice."""
    xs, ws, hs = (jnp.zeros((0, *a.shape), a.dtype) for a in (X, W, H))
    fns = {
        "filter_acts-images": (lambda m: jax.vmap(lambda x: m.filter_acts(x, W)), (xs,)),
        "filter_acts-filters": (lambda m: jax.vmap(lambda w: m.filter_acts(X, w)), (ws,)),
        "filter_acts-both": (lambda m: jax.vmap(m.filter_acts), (xs, ws)),
        "image_acts": (lambda m: jax.vmap(lambda h: m.image_acts(h, W, (10, 9))), (hs,)),
        "weight_acts": (lambda m: jax.vmap(lambda h: m.weight_acts(X, h, (4, 4))), (hs,)),
        "max_pool": (lambda m: jax.vmap(lambda x: m.max_pool(x, 3, stride=2)), (xs,)),
        "max_pool-grad": (lambda m: jax.vmap(jax.grad(lambda x: m.max_pool(x, 2).sum())), (xs,)),
        "avg_pool": (lambda m: jax.vmap(lambda x: m.avg_pool(x, 3, stride=2)), (xs,)),
        "avg_pool-grad": (lambda m: jax.vmap(jax.grad(lambda x: m.avg_pool(x, 2).sum())), (xs,)),
    }
    make, args = fns[op]
    got = make(jcn)(*args)
    want = make(jcn.reference)(*args)
    assert got.shape == want.shape and got.dtype == want.dtype and got.shape[0] == 0


def test_symbolic_batch_under_jax_export():
    """Shape-polymorphic export with a symbolic batch size (the other sizes concrete): the
    exported forward and gradient run at any batch size and equal the eager result."""
    from jax import export
    targets = ["filter_acts", "image_acts", "weight_acts", "max_pool", "max_pool_winners",
               "max_pool_jvp", "max_pool_grad"]
    checks = [export.DisabledSafetyCheck.custom_call(f"jax_convnet_{t}") for t in targets]

    def f(x, w):
        def loss(x, w):
            return jnp.sum(jcn.max_pool(jcn.filter_acts(x, w, pad=1, layout="NHWC"), 3,
                                        stride=2, layout="NHWC") ** 2)
        return jax.grad(loss, argnums=(0, 1))(x, w)

    b, = export.symbolic_shape("b")
    exp = export.export(jax.jit(f), disabled_checks=checks)(
        jax.ShapeDtypeStruct((b, 10, 9, 3), jnp.float32), jax.ShapeDtypeStruct(WN.shape, WN.dtype))
    assert exp.out_avals[0].shape == (b, 10, 9, 3)
    for n in (5, 2):
        for got, want in zip(exp.call(XN[:n], WN), f(XN[:n], WN)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # The adjoints with the images' own (symbolic) shape as image_shape.
    def adjoints(x, w, h):
        return (jcn.image_acts(h, w, x.shape, layout="NHWC"),
                jcn.weight_acts(x, h, w.shape, layout="NHWC", partial_sum="auto"))

    hn = rand(7, (5, 7, 6, 16))
    exp = export.export(jax.jit(adjoints), disabled_checks=checks)(
        jax.ShapeDtypeStruct((b, 10, 9, 3), jnp.float32), jax.ShapeDtypeStruct(WN.shape, WN.dtype),
        jax.ShapeDtypeStruct((b, 7, 6, 16), jnp.float32))
    for n in (5, 1):
        for got, want in zip(exp.call(XN[:n], WN, hn[:n]), adjoints(XN[:n], WN, hn[:n])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_only_the_batch_may_be_symbolic():
    from jax import export
    h, = export.symbolic_shape("h")
    with pytest.raises(ValueError, match="images .*only the batch dimension may be symbolic"):
        export.export(jax.jit(lambda x: jcn.filter_acts(x, WN, layout="NHWC")))(
            jax.ShapeDtypeStruct((5, h, 9, 3), jnp.float32))


_ISA_SCRIPT = """
import warnings, jax, jax.numpy as jnp, numpy as np
with warnings.catch_warnings(record=True) as caught:  # the native modules load at import
    warnings.simplefilter("always")
    import jax_convnet as jcn
    jcn.has_native("cpu")
rng = np.random.default_rng(0)  # (jax.random would compile its sampler: seconds)
x = jnp.asarray(rng.standard_normal((3, 10, 9, 5), np.float32))
w = jnp.asarray(rng.standard_normal((3, 4, 4, 16), np.float32))
print("WARNED", any("JAX_CONVNET_CPU_ISA" in str(c.message) for c in caught))
try:
    y = jax.block_until_ready(jcn.filter_acts(x, w))
    err = np.max(np.abs(np.asarray(y) - np.asarray(jcn.reference.filter_acts(x, w))))
    print("RAN", err < 1e-4)
except Exception as e:
    print("ERROR", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
"""


@pytest.mark.parametrize("value,runs", [("AVX2", True), ("Sse2", True), ("", True),
                                        ("foo", False), ("avx3", False)])
def test_cpu_isa_switch_rejects_unknown_values(value, runs):
    """JAX_CONVNET_CPU_ISA takes sse2 / avx2 / avx512 in any case; anything else warns as the
    module loads and the CPU conv kernels return an error naming the variable (in a subprocess:
    the variable is read once per process)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, JAX_CONVNET_CPU_ISA=value, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-P", "-c", _ISA_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300).stdout
    if runs:
        assert "WARNED False" in out and "RAN True" in out, out
    else:
        assert "WARNED True" in out, out
        assert "ERROR" in out and "JAX_CONVNET_CPU_ISA" in out and "avx512" in out, out


def test_native_handler_rejects_out_of_range_attributes():
    """What slips past Python (here an ffi_call made by hand) gets an FFI error from the
    handlers' own range checks, never an abort."""
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    assert jcn.has_native(platform)
    workspace = (jax.ShapeDtypeStruct((0,), np.uint8),) if platform == "cuda" else ()
    attrs = jcn.geometry.conv_geometry(
        image_hw=(10, 9), filter_hw=(4, 4), channels=3, filters=16, stride=1, pad=0,
        padding=None, partial_sum=None, layout="C01B", precision=None).ffi_attrs()
    call = jax.ffi.ffi_call("jax_convnet_filter_acts",
                            (jax.ShapeDtypeStruct((16, 7, 6, 5), X.dtype), *workspace))
    for bad in (dict(stride_h=np.int64(2**40)), dict(pad_bottom=np.int64(2**62)),
                dict(pad_right=np.int64(-2**63))):
        with pytest.raises(Exception, match="strides and padding|padding must be >= 0"):
            jax.block_until_ready(call(X, W, **dict(attrs, **bad)))
    pool = jax.ffi.ffi_call("jax_convnet_max_pool", jax.ShapeDtypeStruct((3, 5, 5, 5), X.dtype))
    pattrs = jcn.geometry.pool_geometry((10, 9), 2).ffi_attrs()
    for bad in (dict(stride_h=np.int64(2**62)), dict(pad_top=np.int64(-2**62)),
                dict(window_w=np.int64(2**40))):
        with pytest.raises(Exception, match="at most 2\\*\\*31 - 1"):
            jax.block_until_ready(pool(X, **dict(pattrs, **bad)))
