"""Tensors past 2**31 elements on the GPU: filter_acts, image_acts, weight_acts and max_pool
(forward and gradient) on operands and results of more than 2**31 elements, checked against the
reference run in chunks small enough for any index type. Skipped without a GPU, and where the
process may use less than 64 GB of it. A conv case holds 18 GB of operands and results and, per
batch element, the float32 reference's copies (and XLA's conv autotuning): about 60-80 GB at its
peak. Two at once could exhaust a 141 GB card, so under pytest-xdist the cases share one worker
(xdist_group; benchmarks/gpu_check.sh runs --dist loadgroup) and run one after another."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from jax_convnet import reference as ref
from conftest import LAYOUTS, gpu

pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu_large")]

LIMIT = 2**31


@pytest.fixture(autouse=True)
def _large_gpu(_gpu_marker):  # after conftest's skip where there is no GPU
    stats = gpu().memory_stats() or {}
    if stats.get("bytes_limit", 0) < 64 << 30:
        pytest.skip("needs a GPU with 64 GB or more")
    with jax.default_device(gpu()):
        yield


def max_rel_err(actual, expected):
    """On the device: max |actual - expected| over max |expected|, in float32."""
    actual, expected = actual.astype(jnp.float32), expected.astype(jnp.float32)
    return float(jnp.max(jnp.abs(actual - expected)) / jnp.maximum(jnp.max(jnp.abs(expected)),
                                                                   1e-30))


def take_batch(x, layout, b):
    """Batch element ``b`` of an image tensor, keeping its rank (batch 1)."""
    axis = jcn.geometry.image_axes(layout)["n"]
    return jax.lax.slice_in_dim(x, b, b + 1, axis=axis)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_family_past_2_31_elements(layout):
    """Images of 2.29e9 elements and a hidden tensor of 2.15e9 (bfloat16, batch 2, 17 channels,
    16 3x3 filters): the forward, image_acts and weight_acts of one VJP, checked per batch
    element (1.1e9 elements each) against the reference in float32."""
    check_conv_family(layout, n=2, c=17, h=8200, w=8200, f=16, k=3, over=LIMIT)


def check_conv_family(layout, *, n, c, h, w, f, k, over):
    """The forward, image_acts and weight_acts of one VJP (bfloat16, VALID, stride 1) against
    the reference per batch element; the images and the hidden tensor have more than ``over``
    elements."""
    x_shape = jcn.geometry.image_shape(layout, n, c, h, w)
    w_shape = jcn.geometry.filter_shape(layout, f, c, k, k)
    h_shape = jcn.geometry.image_shape(layout, n, f, h - k + 1, w - k + 1)
    assert np.prod(x_shape) > over and np.prod(h_shape) > over
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape, jnp.bfloat16)
    wt = jax.random.normal(keys[1], w_shape, jnp.bfloat16)
    ct = jax.random.normal(keys[2], h_shape, jnp.bfloat16)

    @jax.jit
    def ours(x, wt, ct):
        y, vjp = jax.vjp(lambda x, wt: jcn.filter_acts(x, wt, layout=layout), x, wt)
        return (y, *vjp(ct))

    y, dx, dw = ours(x, wt, ct)
    assert y.shape == h_shape and dx.shape == x_shape and dw.shape == w_shape

    @jax.jit
    def reference(x, wt, ct):
        x, wt, ct = (a.astype(jnp.float32) for a in (x, wt, ct))
        kw = dict(layout=layout, precision="highest")
        return (ref.filter_acts(x, wt, **kw), ref.image_acts(ct, wt, x.shape, **kw),
                ref.weight_acts(x, ct, wt.shape, **kw))

    dw_ref = jnp.zeros(w_shape, jnp.float32)
    for b in range(n):
        y_b, dx_b, dw_b = reference(take_batch(x, layout, b), wt, take_batch(ct, layout, b))
        assert max_rel_err(take_batch(y, layout, b), y_b) < 2e-2, ("forward", b)
        assert max_rel_err(take_batch(dx, layout, b), dx_b) < 2e-2, ("image_acts", b)
        dw_ref = dw_ref + dw_b
        del y_b, dx_b
    assert max_rel_err(dw, dw_ref) < 2e-2, "weight_acts"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool_past_2_31_elements(layout):
    """max_pool 3/2 (cuda-convnet's overlapping AlexNet pool) on 2.18e9 bfloat16 elements, its
    forward exactly and its gradient (integer cotangents: sums exact in bfloat16) exactly,
    against the reference run per channel chunk."""
    check_max_pool(layout, n=8, c=260, h=1024, w=1024, chunk=65, over=LIMIT)


def check_max_pool(layout, *, n, c, h, w, chunk, over):
    """max_pool 3/2 forward and gradient against the reference per ``chunk`` channels."""
    shape = jcn.geometry.image_shape(layout, n, c, h, w)
    assert np.prod(shape) > over
    x = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
    pool = lambda x: jcn.max_pool(x, 3, stride=2, layout=layout)
    out_shape = jax.eval_shape(pool, x).shape
    g = jax.random.randint(jax.random.key(2), out_shape, -2, 3).astype(jnp.bfloat16)

    @jax.jit
    def ours(x, g):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(g)[0]

    y, dx = ours(x, g)

    @jax.jit
    def reference(x, g):
        y, vjp = jax.vjp(lambda x: ref.max_pool(x, 3, stride=2, layout=layout), x)
        return y, vjp(g)[0]

    axis = jcn.geometry.image_axes(layout)["c"]
    for c0 in range(0, c, chunk):
        part = lambda a: jax.lax.slice_in_dim(a, c0, min(c0 + chunk, c), axis=axis)
        y_ref, dx_ref = reference(part(x), part(g))
        assert bool(jnp.array_equal(part(y), y_ref)), ("forward", c0)
        assert bool(jnp.array_equal(part(dx), dx_ref)), ("gradient", c0)
