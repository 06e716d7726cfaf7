"""max_pool: forward, JVP and gradient against the pure-lax reference, on every platform."""
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

# pylearn2's max-pool shape list (C01B: channels, rows, cols, batch), ds 1..3, stride 1..ds.
SHAPES = [(16, 5, 5, 2), (3, 7, 9, 5), (4, 8, 8, 16), (1, 3, 4, 1), (2, 12, 11, 3)]
CASES = [(shape, ds, stride) for shape in SHAPES for ds in (1, 2, 3) for stride in range(1, ds + 1)
         if ds <= min(shape[1:3])]


def check_pool(x, ds, dtype=None, **kw):
    """Forward, JVP and gradient of max_pool equal the reference's."""
    out_shape = jax.eval_shape(lambda x: ref.max_pool(x, ds, **kw), x).shape
    t, g = rand(11, x.shape, x.dtype), rand(12, out_shape, x.dtype)
    y, ty, dx = run_poisoned(value_jvp_vjp(lambda x: jcn.max_pool(x, ds, **kw)), x, t, g)
    y_ref, ty_ref, dx_ref = value_jvp_vjp(lambda x: ref.max_pool(x, ds, **kw))(x, t, g)
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref, np.float64))
    np.testing.assert_array_equal(np.asarray(ty, np.float64), np.asarray(ty_ref, np.float64))
    assert_close(dx, dx_ref, dtype)
    return y


@pytest.mark.parametrize("shape,ds,stride", CASES)
def test_pylearn2_shape_list(platform, shape, ds, stride):
    x = rand(0, shape)
    y = check_pool(x, ds, stride=stride)
    assert y.shape[1:3] == jcn.max_pool_output_size(shape[1:3], ds, stride=stride)


def test_ceil_rule_sizes():
    # cuda-convnet: Ho = ceil((H - start - ds) / stride) + 1, last window clipped.
    assert jcn.max_pool_output_size(55, 3, stride=2) == (27, 27)
    assert jcn.max_pool_output_size(8, 3, stride=2) == (4, 4)  # floor rule would give 3
    assert jcn.max_pool_output_size((7, 10), (3, 2), stride=(2, 2), start=(1, 0)) == (3, 5)
    assert jcn.max_pool_output_size(8, 3, stride=2, padding="VALID") == (3, 3)
    assert jcn.max_pool_output_size(8, 3, stride=2, padding="SAME") == (4, 4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_every_dtype_and_layout(platform, layout, dtype):
    x = images(1, layout, 3, 5, 9, 8, dtype)
    check_pool(x, (3, 2), dtype, stride=(2, 1), layout=layout)
    check_pool(x, 3, dtype, stride=2, start=(1, 2), layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2), (0, 1))])
def test_xla_padding_convention_equals_reduce_window(platform, layout, padding):
    x = images(2, layout, 2, 4, 9, 10)
    y = check_pool(x, 3, stride=2, padding=padding, layout=layout)
    window = (1, 3, 3, 1)
    lax_pad = padding if isinstance(padding, str) else ((0, 0),) + tuple(padding) + ((0, 0),)
    if layout == "C01B":
        lax_out = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), lax_pad)
    else:
        lax_out = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1, 2, 2, 1), lax_pad)
    np.testing.assert_array_equal(y, lax_out)


def test_strides_larger_than_window_with_padding(platform):
    x = images(3, "NHWC", 2, 3, 11, 11)
    check_pool(x, 2, stride=3, padding="VALID", layout="NHWC")


def test_nan_propagates_and_gets_the_gradient(platform):
    x = rand(4, (1, 4, 4, 1))
    x = x.at[0, 1, 2, 0].set(jnp.nan)
    y = jcn.max_pool(x, 2)
    assert jnp.isnan(y[0, 0, 1, 0]) and jnp.sum(jnp.isnan(y)) == 1
    dx = jax.vjp(lambda x: jcn.max_pool(x, 2), x)[1](jnp.ones(y.shape, y.dtype))[0]
    assert dx[0, 1, 2, 0] == 1.0 and dx[0, 0:2, 2:4, 0].sum() == 1.0
    check_pool(x, 2)


def test_ties_go_to_the_first_element_in_row_major_order(platform):
    x = jnp.array([[1., 3., 3.], [3., 2., 0.], [3., 1., 3.]]).reshape(1, 3, 3, 1)
    dx = jax.grad(lambda x: jnp.sum(jcn.max_pool(x, 3)))(x)
    expected = np.zeros((3, 3)); expected[0, 1] = 1
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)
    # forward and reverse mode agree on the chosen element
    e = jnp.zeros_like(x).at[0, 0, 1, 0].set(1.0)
    assert jax.jvp(lambda x: jcn.max_pool(x, 3), (x,), (e,))[1].item() == 1.0


def test_overlapping_windows_add_their_gradients(platform):
    x = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(5.0) + rand(1, (1, 5, 5, 1)) * 0.01
    dx = jax.grad(lambda x: jnp.sum(jcn.max_pool(x, 3, stride=1)))(x)
    assert dx[0, 2, 2, 0] == 9.0


def test_integer_valued_data_with_many_ties(platform):
    x = jnp.round(rand(5, (3, 10, 11, 4)) * 1.5)
    for ds, stride in [(2, 1), (3, 2), (3, 3)]:
        check_pool(x, ds, stride=stride)


def test_derivatives_to_second_order():
    x = rand(6, (2, 7, 6, 3), jnp.float64)
    check_grads(lambda x: jcn.max_pool(x, 3, stride=2), (x,), order=2, modes=["fwd", "rev"])
    check_grads(lambda x: jcn.max_pool(x, 2, padding="SAME", layout="NHWC"), (x,), order=2,
                modes=["fwd", "rev"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap(platform, layout):
    xs = jnp.stack([images(k, layout, 2, 3, 7, 7) for k in range(3)], axis=1)
    got = jax.jit(jax.vmap(lambda x: jcn.max_pool(x, 3, stride=2, layout=layout), 1))(xs)
    want = jax.jit(jax.vmap(lambda x: ref.max_pool(x, 3, stride=2, layout=layout), 1))(xs)
    np.testing.assert_array_equal(got, want)
    grad = lambda pool: jax.vmap(jax.grad(
        lambda x: jnp.sum(pool(x, 3, stride=2, layout=layout) ** 2)), 1)
    assert_close(grad(jcn.max_pool)(xs), jax.jit(grad(ref.max_pool))(xs))  # ours op by op


def test_vmap_of_jvp_with_unmapped_images(platform):
    x = rand(0, (2, 6, 6, 2))
    ts = rand(1, (4, 2, 6, 6, 2))
    got = jax.vmap(lambda t: jax.jvp(lambda x: jcn.max_pool(x, 2), (x,), (t,))[1])(ts)
    want = jax.vmap(lambda t: jax.jvp(lambda x: ref.max_pool(x, 2), (x,), (t,))[1])(ts)
    np.testing.assert_array_equal(got, want)


def test_lowers_to_our_custom_calls_only(platform):
    x = rand(0, (3, 9, 9, 4))
    text = hlo_text(jax.grad(lambda x: jnp.sum(jcn.max_pool(x, 3, stride=2) ** 2)), x)
    assert "jax_convnet_max_pool_winners" in text and "jax_convnet_max_pool_grad" in text
    assert "reduce_window" not in text and "select_and_scatter" not in text


def custom_calls(text):
    """{target: [operand types]} of each custom call in StableHLO text, in order."""
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"custom_call @(\w+)\(.*?:\s*\(([^)]*)\)\s*->", text)]


def test_training_step_finds_the_winners_once_and_never_reads_the_images_again(platform):
    x = rand(0, (3, 9, 9, 4))
    step = jax.value_and_grad(lambda x: jnp.sum(jcn.max_pool(x, 3, stride=2) ** 2))
    eqns = jax.make_jaxpr(step)(x).eqns
    names = [e.primitive.name for e in eqns if e.primitive.name.startswith("jax_convnet")]
    assert names == ["jax_convnet_max_pool_winners", "jax_convnet_max_pool_grad"]
    grad = eqns[[e.primitive.name for e in eqns].index("jax_convnet_max_pool_grad")]
    assert [v.aval.dtype for v in grad.invars] == [jnp.float32, jnp.uint8]
    assert all(v.aval.shape == (3, 4, 4, 4) for v in grad.invars)  # cotangents and winners
    calls = custom_calls(hlo_text(step, x))
    assert [target for target, _ in calls] == ["jax_convnet_max_pool_winners",
                                               "jax_convnet_max_pool_grad"]
    assert calls[1][1] == "tensor<3x4x4x4xf32>, tensor<3x4x4x4xui8>"  # no image-sized operand


def test_a_forward_that_is_not_differentiated_finds_no_winners(platform):
    x, w = rand(0, (3, 9, 9, 4)), rand(1, (3, 4, 4, 4))
    assert [t for t, _ in custom_calls(hlo_text(lambda x: jcn.max_pool(x, 3, stride=2), x))] == [
        "jax_convnet_max_pool"]
    # differentiated in another argument only: the pool's input is a constant of the derivative
    grad_w = jax.grad(lambda w, x: jnp.sum(jcn.max_pool(x, 3, stride=2) * w))
    assert [t for t, _ in custom_calls(hlo_text(grad_w, w, x))] == ["jax_convnet_max_pool"]
    np.testing.assert_array_equal(grad_w(w, x), ref.max_pool(x, 3, stride=2))


def test_winners_take_one_byte_up_to_256_window_elements():
    assert G.pool_geometry((40, 40), 16).winner_dtype() == np.uint8
    assert G.pool_geometry((40, 40), (16, 17)).winner_dtype() == np.int32
    x = rand(0, (2, 20, 20, 3))
    for ds, dtype in [((16, 16), jnp.uint8), ((17, 16), jnp.int32)]:
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(jcn.max_pool(x, ds, stride=3))))(x)
        winners = next(e for e in jaxpr.eqns if e.primitive.name.endswith("winners"))
        assert winners.outvars[1].aval.dtype == dtype


def test_windows_of_more_than_256_elements(platform):
    # int32 winners; the gradient's order check also checks which element each window selects
    x = jnp.round(rand(2, (2, 20, 21, 3)) * 2)  # ties
    y = jax.jit(lambda x: jcn.max_pool(x, (17, 16), stride=(3, 5)))(x)
    geom = G.max_pool_geometry(x, (17, 16), stride=(3, 5), start=0, padding=None, layout="C01B")
    np.testing.assert_array_equal(y, reference_winners(x, geom)[0])
    check_gradient_order(x, (17, 16), stride=(3, 5))


def test_empty_windows_yield_minus_infinity_and_no_tangent(platform):
    x = rand(3, (2, 4, 5, 3))
    pool = lambda x: jcn.max_pool(x, 2, stride=2, padding=((3, 3), (0, 1)))
    y, ty = jax.jvp(pool, (x,), (rand(4, x.shape),))
    assert np.all(np.isneginf(y[:, 0])) and np.all(np.isneginf(y[:, -1]))
    assert np.all(ty[:, 0] == 0) and np.all(ty[:, -1] == 0)
    check_pool(x, 2, stride=2, padding=((3, 3), (0, 1)))
    check_gradient_order(x, 2, stride=2, padding=((3, 3), (0, 1)))


# The reference's (pooled, winners), compiled once per geometry and shape (its compile time
# grows with the window).
reference_winners = jax.jit(lambda x, geom: ref.max_pool_winners_canonical(x, geom=geom),
                            static_argnames="geom")


def gradient_in_window_order(x, g, ds, **kw):
    """The documented gradient, in numpy: each image element is 0 + ct(w1) + ct(w2) + ... over
    the windows whose winner it is (the reference's selection), in increasing (oy, ox), in
    float32 (float64 for float64), rounded once to the dtype."""
    kw = dict(dict(stride=None, start=0, padding=None, layout="C01B"), **kw)
    geom = G.max_pool_geometry(x, ds, **kw)
    winners = np.asarray(reference_winners(x, geom)[1], np.int64)
    ax = G.image_axes(geom.layout)
    hw = lambda a: np.moveaxis(np.asarray(a), (ax["h"], ax["w"]), (0, 1))
    acc_dtype = np.float64 if x.dtype == jnp.float64 else np.float32
    g, winners = hw(g).astype(acc_dtype), hw(winners)
    dx = np.zeros(hw(x).shape, acc_dtype)
    (top, _), (left, _) = geom.padding
    lanes = np.indices(dx.shape[2:])
    for oy in range(g.shape[0]):
        for ox in range(g.shape[1]):
            k = winners[oy, ox]
            y = oy * geom.strides[0] - top + k // geom.window[1]
            x_ = ox * geom.strides[1] - left + k % geom.window[1]
            inside = (y >= 0) & (y < dx.shape[0]) & (x_ >= 0) & (x_ < dx.shape[1])
            dx[y[inside], x_[inside], lanes[0][inside], lanes[1][inside]] += g[oy, ox][inside]
    return np.moveaxis(dx, (0, 1), (ax["h"], ax["w"])).astype(x.dtype)


def check_gradient_order(x, ds, **kw):
    """Our gradient equals gradient_in_window_order bit for bit, on random cotangents."""
    pool = lambda x: jcn.max_pool(x, ds, **kw)
    g = rand(13, jax.eval_shape(pool, x).shape, x.dtype)
    dx = run_poisoned(jax.jit(lambda x, g: jax.vjp(pool, x)[1](g)[0]), x, g)
    want = gradient_in_window_order(x, g, ds, **kw)
    np.testing.assert_array_equal(np.asarray(dx, np.float64), np.asarray(want, np.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("ds,kw", [(3, dict(stride=1)), ((2, 3), dict(stride=(2, 1), start=1)),
                                   (3, dict(stride=2, padding="SAME"))])
def test_gradient_adds_in_window_order_bitwise(platform, layout, dtype, ds, kw):
    # Ties (integer-valued data), a NaN, overlapping and clipped windows, both conventions.
    x = jnp.round(images(5, layout, 3, 4, 11, 10) * 2).astype(dtype)
    x = x.at[(0,) * 4].set(jnp.nan)
    check_gradient_order(x, ds, layout=layout, **kw)


def test_hessian_and_jvp_of_gradient_equal_the_reference():
    x = rand(6, (2, 6, 7, 2), jnp.float64)
    t = rand(7, x.shape, jnp.float64)
    loss = lambda pool: lambda x: jnp.sum(pool(x, 3, stride=2, start=1) ** 3)
    # (the reference compiled too: op by op it compiles each of its many small steps)
    h = jax.jit(jax.hessian(loss(jcn.max_pool)))(x)
    np.testing.assert_allclose(h, jax.jit(jax.hessian(loss(ref.max_pool)))(x), rtol=1e-12,
                               atol=1e-12)
    assert np.count_nonzero(h) > 0
    jvp_of_grad = lambda pool: jax.jit(lambda: jax.jvp(jax.grad(loss(pool)), (x,), (t,)))()
    for got, want in zip(jvp_of_grad(jcn.max_pool), jvp_of_grad(ref.max_pool)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # reverse over reverse, under vmap
    hvp = jax.vmap(lambda v: jax.grad(lambda x: jnp.vdot(jax.grad(loss(jcn.max_pool))(x), v))(x))
    np.testing.assert_allclose(jax.jit(hvp)(jnp.stack([t, x])),
                               jnp.stack([jnp.tensordot(h, v, 4) for v in (t, x)]),
                               rtol=1e-12, atol=1e-12)


def test_handlers_check_the_winners(platform):
    # The checks every pool handler shares (csrc/common/pool_checks.h), on the default device.
    name = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    assert jcn.has_native(name)  # (registers the targets ffi_call needs)
    x = rand(0, (3, 9, 9, 4))
    attrs = G.pool_geometry((9, 9), 3, stride=2).ffi_attrs()
    grad = lambda winners_dtype, winners_shape=(3, 4, 4, 4): jax.ffi.ffi_call(
        "jax_convnet_max_pool_grad", jax.ShapeDtypeStruct(x.shape, x.dtype))(
            jnp.ones((3, 4, 4, 4), x.dtype), jnp.zeros(winners_shape, winners_dtype), **attrs)
    dx = grad(jnp.uint8)  # every winner at its window's origin (2*oy, 2*ox)
    np.testing.assert_array_equal(dx[:, 0:8:2, 0:8:2, :], 1.0)
    assert float(dx.sum()) == 3 * 16 * 4
    with pytest.raises(Exception, match="winners must be uint8"):
        jax.block_until_ready(grad(jnp.int32))
    with pytest.raises(Exception, match="winners' shape differs"):
        jax.block_until_ready(grad(jnp.uint8, (3, 4, 4, 5)))
    jvp = jax.ffi.ffi_call("jax_convnet_max_pool_jvp", jax.ShapeDtypeStruct((3, 4, 4, 4), x.dtype))
    with pytest.raises(Exception, match="winners must be uint8"):
        jax.block_until_ready(jvp(x, jnp.zeros((3, 4, 4, 4), jnp.int8), **attrs))
    winners = jax.ffi.ffi_call("jax_convnet_max_pool_winners",
                               (jax.ShapeDtypeStruct((3, 4, 4, 4), x.dtype),
                                jax.ShapeDtypeStruct((3, 4, 4, 4), jnp.int32)))
    with pytest.raises(Exception, match="winners must be uint8"):
        jax.block_until_ready(winners(x, **attrs))
