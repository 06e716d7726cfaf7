"""max_pool: forward, JVP and gradient against the pure-lax reference, on every platform."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_convnet as jcn
from jax_convnet import reference as ref
from conftest import DTYPES, LAYOUTS, assert_close, hlo_text, images, rand, run_poisoned

# pylearn2's max-pool shape list (C01B: channels, rows, cols, batch), ds 1..3, stride 1..ds.
SHAPES = [(16, 5, 5, 2), (3, 7, 9, 5), (4, 8, 8, 16), (1, 3, 4, 1), (2, 12, 11, 3)]
CASES = [(shape, ds, stride) for shape in SHAPES for ds in (1, 2, 3) for stride in range(1, ds + 1)
         if ds <= min(shape[1:3])]


def pool_forward_jvp_vjp(pool, ds, **kw):
    """One compiled function: max_pool's value, a JVP and a VJP (``pool`` is ours or the reference)."""
    def run(x, t, g):
        y, ty = jax.jvp(lambda x: pool(x, ds, **kw), (x,), (t,))
        dx = jax.vjp(lambda x: pool(x, ds, **kw), x)[1](g)[0]
        return y, ty, dx
    return jax.jit(run)


def check_pool(x, ds, dtype=None, **kw):
    """Forward, JVP and gradient of max_pool equal the reference's."""
    out_shape = jax.eval_shape(lambda x: ref.max_pool(x, ds, **kw), x).shape
    t, g = rand(11, x.shape, x.dtype), rand(12, out_shape, x.dtype)
    y, ty, dx = run_poisoned(pool_forward_jvp_vjp(jcn.max_pool, ds, **kw), x, t, g)
    y_ref, ty_ref, dx_ref = pool_forward_jvp_vjp(ref.max_pool, ds, **kw)(x, t, g)
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
    want = jax.vmap(lambda x: ref.max_pool(x, 3, stride=2, layout=layout), 1)(xs)
    np.testing.assert_array_equal(got, want)
    g = jax.vmap(jax.grad(lambda x: jnp.sum(jcn.max_pool(x, 3, stride=2, layout=layout) ** 2)),
                 1)(xs)
    g_ref = jax.vmap(jax.grad(lambda x: jnp.sum(ref.max_pool(x, 3, stride=2, layout=layout) ** 2)),
                     1)(xs)
    assert_close(g, g_ref)


def test_vmap_of_jvp_with_unmapped_images(platform):
    x = rand(0, (2, 6, 6, 2))
    ts = rand(1, (4, 2, 6, 6, 2))
    got = jax.vmap(lambda t: jax.jvp(lambda x: jcn.max_pool(x, 2), (x,), (t,))[1])(ts)
    want = jax.vmap(lambda t: jax.jvp(lambda x: ref.max_pool(x, 2), (x,), (t,))[1])(ts)
    np.testing.assert_array_equal(got, want)


def test_lowers_to_our_custom_calls_only(platform):
    x = rand(0, (3, 9, 9, 4))
    text = hlo_text(jax.grad(lambda x: jnp.sum(jcn.max_pool(x, 3, stride=2) ** 2)), x)
    assert "jax_convnet_max_pool" in text and "jax_convnet_max_pool_grad" in text
    assert "reduce_window" not in text and "select_and_scatter" not in text
