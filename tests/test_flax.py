"""The Flax wrappers (jax_convnet.flax.linen / .nnx) against flax's own modules.

Same parameters in, same outputs and gradients out (float32, precision "highest"), in NHWC and in
C01B (inputs, kernels and outputs transposed), for every padding form flax accepts here; and
clear ValueErrors for the arguments flax accepts and jax_convnet does not.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from jax_convnet.flax import linen as cl  # noqa: E402
from jax_convnet.flax import nnx as cn  # noqa: E402
import conftest  # noqa: E402
from conftest import assert_close_sum  # noqa: E402

PADDINGS = ["SAME", "VALID", 1, ((1, 2), (0, 1))]
STRIDES = [1, 2]
LAYOUTS = ["NHWC", "C01B"]
X_SHAPE = (2, 7, 8, 3)  # NHWC; odd and even sizes so SAME pads unevenly with stride 2
KERNEL = (3, 2)  # rectangular
FEATURES = 4


def rand(seed, shape, dtype=jnp.float32):
    # NumPy's generator: jax.random would compile for every shape.
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


# NHWC <-> C01B
def to_c01b(x):
    return jnp.transpose(x, (3, 1, 2, 0))


def from_c01b(x):
    return jnp.transpose(x, (3, 1, 2, 0))


def kernel_to_c01b(k):  # HWIO -> (C, fh, fw, F)
    return jnp.transpose(k, (2, 0, 1, 3))


def kernel_from_c01b(k):
    return jnp.transpose(k, (1, 2, 0, 3))


def assert_close(actual, expected, dtype=jnp.float32):
    """Within dtype's bound (float32's by default: some references here are float64)."""
    conftest.assert_close(actual, expected, dtype)


# ----------------------------------------------------------------------------- linen Conv

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
def test_linen_conv_matches_flax(padding, strides, layout):
    x = rand(0, X_SHAPE)
    ref = nn.Conv(FEATURES, KERNEL, strides=strides, padding=padding, precision="highest")
    ours = cl.Conv(FEATURES, KERNEL, strides=strides, padding=padding, precision="highest",
                   layout=layout)
    params = ref.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + rand(2, p.shape), params)  # non-zero bias too
    y_ref = ref.apply(params, x)
    g = rand(3, y_ref.shape)

    if layout == "NHWC":
        ours_params, x_in, g_in, back = params, x, g, lambda y: y
    else:
        p = params["params"]
        ours_params = {"params": {"kernel": kernel_to_c01b(p["kernel"]), "bias": p["bias"]}}
        x_in, g_in, back = to_c01b(x), to_c01b(g), from_c01b

    def loss(module, g):
        return lambda params, x: jnp.vdot(module.apply(params, x), g, precision="highest")

    val_ref, (dp_ref, dx_ref) = jax.jit(jax.value_and_grad(loss(ref, g), argnums=(0, 1)))(
        params, x)
    y, (val, (dp, dx)) = jax.jit(lambda p, x: (ours.apply(p, x), jax.value_and_grad(
        loss(ours, g_in), argnums=(0, 1))(p, x)))(ours_params, x_in)

    assert y.dtype == y_ref.dtype
    assert_close(back(y), y_ref)
    assert_close_sum(val, val_ref, jnp.vdot(jnp.abs(y_ref), jnp.abs(g)))
    assert_close(back(dx), dx_ref)
    dk = dp["params"]["kernel"]
    assert_close(dk if layout == "NHWC" else kernel_from_c01b(dk), dp_ref["params"]["kernel"])
    assert_close(dp["params"]["bias"], dp_ref["params"]["bias"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_linen_conv_init_equals_flax(layout):
    """Same names, shapes and initial values (C01B: the transposed HWIO draw)."""
    x = rand(0, X_SHAPE)
    p_ref = nn.Conv(FEATURES, KERNEL, padding="SAME").init(jax.random.key(5), x)
    x_in = x if layout == "NHWC" else to_c01b(x)
    p = cl.Conv(FEATURES, KERNEL, padding="SAME", layout=layout).init(jax.random.key(5), x_in)
    assert jax.tree.structure(p) == jax.tree.structure(p_ref)
    k = p["params"]["kernel"]
    if layout == "C01B":
        assert k.shape == (3, *KERNEL, FEATURES)
        k = kernel_from_c01b(k)
    np.testing.assert_array_equal(k, p_ref["params"]["kernel"])
    np.testing.assert_array_equal(p["params"]["bias"], p_ref["params"]["bias"])


def test_linen_conv_options():
    """use_bias=False, custom initialisers, padding given as (rows, cols) ints, param_dtype,
    extra leading batch axes (flattened, as flax does)."""
    x = rand(0, (2, 2, 6, 5, 3))
    kw = dict(use_bias=False, padding=(2, 1), kernel_init=nn.initializers.normal(0.3),
              precision="highest", param_dtype=jnp.float32)
    ref, ours = nn.Conv(FEATURES, (3, 3), **kw), cl.Conv(FEATURES, (3, 3), **kw)
    params = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(0), x))
    assert_close(ours.apply(params, x), ref.apply(params, x))


def test_linen_conv_bfloat16():
    """dtype= sets the computation dtype as in flax (float32 params, bfloat16 output)."""
    x = rand(0, X_SHAPE)
    ref = nn.Conv(FEATURES, KERNEL, dtype=jnp.bfloat16)
    ours = cl.Conv(FEATURES, KERNEL, dtype=jnp.bfloat16)
    params = ref.init(jax.random.key(1), x)
    y, y_ref = ours.apply(params, x), ref.apply(params, x)
    assert y.dtype == y_ref.dtype == jnp.bfloat16
    assert_close(y, y_ref, jnp.bfloat16)


def test_linen_conv_partial_sum():
    x = rand(0, X_SHAPE)
    m = cl.Conv(FEATURES, (3, 3), padding="SAME", precision="highest")
    ps = cl.Conv(FEATURES, (3, 3), padding="SAME", precision="highest", partial_sum=8)
    params = m.init(jax.random.key(0), x)
    grad = lambda mod: jax.grad(lambda p: jnp.sum(mod.apply(p, x) ** 2))(params)
    assert_close(grad(ps)["params"]["kernel"], grad(m)["params"]["kernel"])


# ----------------------------------------------------------------------------- nnx Conv

def _nnx_pair(padding, strides, layout, **kw):
    ref = nnx.Conv(3, FEATURES, KERNEL, strides=strides, padding=padding, precision="highest",
                   rngs=nnx.Rngs(0), **kw)
    ours = cn.Conv(3, FEATURES, KERNEL, strides=strides, padding=padding, precision="highest",
                   layout=layout, rngs=nnx.Rngs(0), **kw)
    return ref, ours


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strides", STRIDES)
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
def test_nnx_conv_matches_flax(padding, strides, layout):
    ref, ours = _nnx_pair(padding, strides, layout)
    # Same Rngs seed: the same initial weights (C01B: transposed).
    k = ours.kernel[...]
    np.testing.assert_array_equal(k if layout == "NHWC" else kernel_from_c01b(k), ref.kernel[...])
    ref.bias = nnx.Param(rand(4, (FEATURES,)))
    ours.bias = nnx.Param(ref.bias[...])

    x = rand(0, X_SHAPE)
    y_ref = ref(x)
    g = rand(3, y_ref.shape)
    x_in, g_in, back = (x, g, lambda y: y) if layout == "NHWC" else (to_c01b(x), to_c01b(g),
                                                                    from_c01b)

    def grads(module, x, g):
        graphdef, state = nnx.split(module)

        def loss(state, x):
            return jnp.vdot(nnx.merge(graphdef, state)(x), g, precision="highest")

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)

    val_ref, (ds_ref, dx_ref) = grads(ref, x, g)
    val, (ds, dx) = grads(ours, x_in, g_in)
    assert_close(back(ours(x_in)), y_ref)
    assert_close_sum(val, val_ref, jnp.vdot(jnp.abs(y_ref), jnp.abs(g)))
    assert_close(back(dx), dx_ref)
    dk = ds["kernel"][...]
    assert_close(dk if layout == "NHWC" else kernel_from_c01b(dk), ds_ref["kernel"][...])
    assert_close(ds["bias"][...], ds_ref["bias"][...])


def test_nnx_conv_attributes():
    ref, ours = _nnx_pair("SAME", 1, "NHWC", use_bias=False)
    assert ours.bias is None and ref.bias is None
    assert ours.kernel.shape == ref.kernel.shape == (*KERNEL, 3, FEATURES)
    assert jax.tree.structure(nnx.state(ours, nnx.Param)) == \
        jax.tree.structure(nnx.state(ref, nnx.Param))
    # flax's own state loads unchanged
    nnx.update(ours, nnx.state(ref, nnx.Param))
    x = rand(0, X_SHAPE)
    assert_close(ours(x), ref(x))


# ----------------------------------------------------------------------------- max_pool

POOLS = [((2, 2), None, "VALID"), ((3, 3), (2, 2), "VALID"), ((3, 3), (2, 2), "SAME"),
         ((2, 3), (1, 2), ((1, 0), (1, 1))), ((3, 3), (2, 2), 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window,strides,padding", POOLS, ids=str)
def test_max_pool_matches_flax(window, strides, padding, layout):
    x = rand(0, (2, 7, 8, 3))
    flax_padding = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    ref = lambda x: nn.max_pool(x, window, strides, flax_padding)
    y_ref = ref(x)
    g = rand(1, y_ref.shape)
    dx_ref = jax.jit(jax.grad(lambda x: jnp.vdot(ref(x), g)))(x)
    x_in, g_in, back = (x, g, lambda y: y) if layout == "NHWC" else (to_c01b(x), to_c01b(g),
                                                                    from_c01b)
    pools = [lambda x: cl.max_pool(x, window, strides, padding, layout=layout),
             cl.MaxPool(window, strides, padding, layout=layout),
             cn.MaxPool(window, strides, padding, layout=layout),
             lambda x: cn.max_pool(x, window, strides, padding, layout=layout)]
    for pool in pools:
        y = pool(x_in) if not isinstance(pool, nn.Module) else pool.apply({}, x_in)
        np.testing.assert_array_equal(back(y), y_ref)
    apply = lambda x: cl.max_pool(x, window, strides, padding, layout=layout)
    dx = jax.jit(jax.grad(lambda x: jnp.vdot(apply(x), g_in)))(x_in)
    assert_close(back(dx), dx_ref)


def test_max_pool_default_strides_are_one():
    """As flax: strides=None means 1, not the window."""
    x = rand(0, (1, 5, 5, 2))
    assert cl.max_pool(x, (2, 2)).shape == nn.max_pool(x, (2, 2)).shape == (1, 4, 4, 2)


# ----------------------------------------------------------------------------- avg_pool

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("window,strides,padding", POOLS[2:], ids=str)
def test_avg_pool_matches_flax(window, strides, padding, count_include_pad, layout):
    x = rand(0, (2, 7, 8, 3))
    flax_padding = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    ref = lambda x: nn.avg_pool(x, window, strides, flax_padding, count_include_pad)
    y_ref = ref(x)
    g = rand(1, y_ref.shape)
    dx_ref = jax.jit(jax.grad(lambda x: jnp.vdot(ref(x), g)))(x)
    x_in, g_in, back = (x, g, lambda y: y) if layout == "NHWC" else (to_c01b(x), to_c01b(g),
                                                                    from_c01b)
    args = (window, strides, padding, count_include_pad)
    pools = [lambda x: cl.avg_pool(x, *args, layout=layout), cl.AvgPool(*args, layout=layout),
             cn.AvgPool(*args, layout=layout), lambda x: cn.avg_pool(x, *args, layout=layout)]
    for pool in pools:
        y = pool(x_in) if not isinstance(pool, nn.Module) else pool.apply({}, x_in)
        assert_close(back(y), y_ref)
    apply = lambda x: cl.avg_pool(x, *args, layout=layout)
    dx = jax.jit(jax.grad(lambda x: jnp.vdot(apply(x), g_in)))(x_in)
    assert_close(back(dx), dx_ref)


def test_avg_pool_defaults_and_unbatched_inputs_as_in_flax():
    x = rand(0, (2, 5, 5, 3))
    assert cl.avg_pool(x, (2, 2)).shape == nn.avg_pool(x, (2, 2)).shape == (2, 4, 4, 3)
    assert_close(cn.AvgPool((3, 2), padding="SAME")(x[0]), nn.avg_pool(x[0], (3, 2), padding="SAME"))
    assert_close(cl.AvgPool((2, 2), (2, 2), "SAME", False).apply({}, x.reshape(1, 2, 5, 5, 3)),
                 nn.avg_pool(x, (2, 2), (2, 2), "SAME", False).reshape(1, 2, 3, 3, 3))


@pytest.mark.parametrize("kwargs,name", [
    (dict(window_shape=(2, 2, 2)), "window_shape"), (dict(padding="REFLECT"), "padding"),
    (dict(layout="NCHW"), "layout"), (dict(count_include_pad=None), "count_include_pad")], ids=str)
def test_avg_pool_unsupported_arguments(kwargs, name):
    kwargs = {"window_shape": (2, 2), **kwargs}
    x = rand(0, X_SHAPE)
    with pytest.raises(ValueError, match=name):
        cl.avg_pool(x, **kwargs)
    with pytest.raises(ValueError, match=name):
        cl.AvgPool(**kwargs).apply({}, x)
    with pytest.raises(ValueError, match=name):
        cn.AvgPool(**kwargs)


# ----------------------------------------------------------------------------- errors

UNSUPPORTED = [
    (dict(padding="CIRCULAR"), "padding"),
    (dict(padding="REFLECT"), "padding"),
    (dict(padding="CAUSAL"), "padding"),
    (dict(padding=((1, 1), (1, 1), (1, 1))), "padding"),
    (dict(kernel_dilation=2), "kernel_dilation"),
    (dict(input_dilation=(1, 2)), "input_dilation"),
    (dict(feature_group_count=3), "feature_group_count"),
    (dict(mask=jnp.ones((*KERNEL, 3, FEATURES))), "mask"),
    (dict(kernel_size=(3,)), "kernel_size"),
    (dict(kernel_size=3), r"kernel_size=3 is a 1-d \(3,\) kernel.*kernel_size=\(3, 3\)"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(layout="NCHW"), "layout"),
]


@pytest.mark.parametrize("kwargs,name", UNSUPPORTED, ids=lambda v: str(v)[:40])
def test_linen_unsupported_arguments(kwargs, name):
    kwargs = {"features": FEATURES, "kernel_size": KERNEL, **kwargs}
    with pytest.raises(ValueError, match=name):
        cl.Conv(**kwargs).init(jax.random.key(0), rand(0, X_SHAPE))


@pytest.mark.parametrize("kwargs,name", UNSUPPORTED + [(dict(preferred_element_type=jnp.float32),
                                                        "preferred_element_type")],
                         ids=lambda v: str(v)[:40])
def test_nnx_unsupported_arguments(kwargs, name):
    kwargs = {"kernel_size": KERNEL, **kwargs}
    with pytest.raises(ValueError, match=name):
        cn.Conv(3, FEATURES, rngs=nnx.Rngs(0), **kwargs)


def test_unbatched_inputs_as_in_flax():
    """An (H, W, C) image gives the (Ho, Wo, F) result flax gives (a batch axis of 1 inside)."""
    x = rand(0, X_SHAPE[1:])
    ref = nn.Conv(FEATURES, KERNEL, padding="SAME", precision="highest")
    params = ref.init(jax.random.key(1), x)
    y_ref = ref.apply(params, x)
    assert y_ref.shape == X_SHAPE[1:3] + (FEATURES,)
    assert_close(cl.Conv(FEATURES, KERNEL, padding="SAME", precision="highest").apply(params, x),
                 y_ref)
    conv = cn.Conv(3, FEATURES, KERNEL, padding="SAME", precision="highest", rngs=nnx.Rngs(0))
    conv.kernel[...], conv.bias[...] = params["params"]["kernel"], params["params"]["bias"]
    assert_close(conv(x), y_ref)
    assert_close(cl.max_pool(x, (2, 2), strides=(2, 2)), nn.max_pool(x, (2, 2), strides=(2, 2)))
    assert_close(cn.MaxPool((3, 2), padding="SAME")(x), nn.max_pool(x, (3, 2), padding="SAME"))
    with pytest.raises(ValueError, match="rank 4"):  # C01B has no unbatched form
        cl.Conv(FEATURES, KERNEL, layout="C01B").init(jax.random.key(0), rand(0, (3, 7, 8)))


@pytest.mark.parametrize("kwargs,name", [
    (dict(window_shape=(2,)), "window_shape"), (dict(window_shape=(2, 2, 2)), "window_shape"),
    (dict(padding="CIRCULAR"), "padding"), (dict(layout="NCHW"), "layout"),
    (dict(strides=(1, 1, 1)), "strides")], ids=str)
def test_max_pool_unsupported_arguments(kwargs, name):
    kwargs = {"window_shape": (2, 2), **kwargs}
    x = rand(0, X_SHAPE)
    with pytest.raises(ValueError, match=name):
        cl.max_pool(x, **kwargs)
    with pytest.raises(ValueError, match=name):
        cl.MaxPool(**kwargs).apply({}, x)
    with pytest.raises(ValueError, match=name):
        cn.MaxPool(**kwargs)


def test_missing_flax_message(monkeypatch):
    """Without flax, importing jax_convnet.flax says which extra to install."""
    import importlib
    import sys
    for mod in [m for m in sys.modules if m == "flax" or m.startswith("flax.")
                or m.startswith("jax_convnet.flax")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "flax", None)  # makes `import flax` raise ImportError
    with pytest.raises(ImportError, match=r"jax_convnet\[flax\]"):
        importlib.import_module("jax_convnet.flax.linen")
