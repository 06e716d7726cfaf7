"""Our ops in programs split across devices: each device runs the custom calls on its own slices
(batch, channels, filters) instead of gathering the whole tensors, and the results equal the
single-device ones. The device count is fixed when JAX starts, so the tests run in a subprocess
with four virtual CPU devices (test_in_four_cpu_devices starts it)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_convnet as jcn
from jax_convnet._sharding import DimensionRule, _factor_axes
from conftest import (FOUR_DEVICES, LAYOUTS, assert_close, check_batch_split_step, filters, images,
                      one_device, rand, run_in_cpu_devices, spec_of)


def test_in_four_cpu_devices():
    run_in_cpu_devices(__file__, FOUR_DEVICES)


def put(x, mesh, layout, **roles):
    """x on the mesh with image roles ('n', 'c', ...) sharded over the given mesh axes."""
    spec = [None] * x.ndim
    for role, axis in roles.items():
        spec[jcn.geometry.image_axes(layout)[role]] = axis
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def compiled_text(fn, *args):
    return fn.lower(*args).compile().as_text()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step_splits_the_batch(mesh, layout):
    x = images(0, layout, 8, 5, 12, 11)
    w1 = filters(1, layout, 8, 5, 3, 3) * 0.3
    w2 = filters(2, layout, 6, 8, 3, 3) * 0.3

    def loss(x, w1, w2):
        h = jcn.max_pool(jcn.filter_acts(x, w1, pad=1, layout=layout), 3, stride=2, layout=layout)
        return jnp.sum(jcn.filter_acts(h, w2, padding="SAME", layout=layout) ** 2)
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    xs = put(x, mesh, layout, n="data")
    hlo = check_batch_split_step(step, xs, x, w1, w2)
    assert "all-gather" not in hlo  # no device ever holds the whole batch
    assert "all-reduce" in hlo  # the filter gradients of the batch slices are added
    # 3 forward calls; backward: 2 image_acts, 2 weight_acts, 1 max_pool gradient
    assert len(re.findall(r'custom_call_target="jax_convnet_', hlo)) == 8


@pytest.mark.parametrize("layout", LAYOUTS)
def test_filters_split_over_a_model_axis(mesh, layout):
    x = images(3, layout, 8, 5, 10, 10)
    w = filters(4, layout, 6, 5, 3, 3)
    f_axis = jcn.geometry.filter_axes(layout)["f"]
    ws = jax.device_put(w, NamedSharding(mesh, P(*[("model" if a == f_axis else None)
                                                   for a in range(4)])))
    xs = put(x, mesh, layout, n="data")
    conv = jax.jit(lambda x, w: jcn.filter_acts(x, w, stride=2, pad=1, layout=layout))
    out = conv(xs, ws)
    assert_close(out, one_device(conv, x, w), jnp.float32)
    spec = [None] * 4
    spec[jcn.geometry.image_axes(layout)["n"]] = "data"
    spec[jcn.geometry.image_axes(layout)["c"]] = "model"
    assert spec_of(out) == tuple(spec)
    assert "all-gather" not in compiled_text(conv, xs, ws)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_splits_batch_and_channels(mesh, layout):
    x = images(5, layout, 8, 6, 13, 13)
    g = rand(6, jax.eval_shape(lambda x: jcn.max_pool(x, 3, stride=2, layout=layout), x).shape)
    xs = put(x, mesh, layout, n="data", c="model")
    gs = put(g, mesh, layout, n="data", c="model")

    def run(x, g):
        pool = lambda x: jcn.max_pool(x, 3, stride=2, layout=layout)
        y, vjp = jax.vjp(pool, x)
        return y, jax.jvp(pool, (x,), (x,))[1], vjp(g)[0]
    run = jax.jit(run)
    for got, want in zip(run(xs, gs), one_device(run, x, g)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    hlo = compiled_text(run, xs, gs)
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    # the forward with winners, the JVP and the gradient each run on the local slices
    for target in ("max_pool_winners", "max_pool_jvp", "max_pool_grad"):
        assert f'custom_call_target="jax_convnet_{target}"' in hlo


@pytest.mark.parametrize("layout", LAYOUTS)
def test_avg_pool_splits_batch_and_channels(mesh, layout):
    pool = lambda x: jcn.avg_pool(x, 3, stride=2, layout=layout)
    x = images(5, layout, 8, 6, 13, 13)
    g = rand(6, jax.eval_shape(pool, x).shape)
    xs = put(x, mesh, layout, n="data", c="model")
    gs = put(g, mesh, layout, n="data", c="model")
    run = jax.jit(lambda x, g: (pool(x), jax.vjp(pool, x)[1](g)[0]))
    for got, want in zip(run(xs, gs), one_device(run, x, g)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    hlo = compiled_text(run, xs, gs)
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    for target in ("avg_pool", "avg_pool_grad"):
        assert f'custom_call_target="jax_convnet_{target}"' in hlo


def test_a_dimension_splits_only_where_it_divides_evenly(mesh):
    # XLA would pad uneven slices, and padding must never reach a sum (weight_acts' batch).
    rule = DimensionRule(("b h w c", "b o p f"), "i j c f", split=frozenset("cf"),
                         summed=frozenset("b"))

    def arg(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))
    four_ways, two_ways = P(("data", "model")), P(None, None, None, "model")
    assert _factor_axes(rule, [arg((8, 9, 9, 4), P("data")), arg((8, 9, 9, 6), two_ways)]) == {
        "b": ("data",), "f": ("model",)}
    # a mesh axis serves one factor only: the first operand's claim wins
    assert _factor_axes(rule, [arg((8, 9, 9, 4), four_ways), arg((8, 9, 9, 6), two_ways)]) == {
        "b": ("data", "model")}
    assert _factor_axes(rule, [arg((6, 9, 9, 4), four_ways), arg((6, 9, 9, 6), P())]) == {}
    assert _factor_axes(rule, [arg((8, 9, 9, 3), P(None, None, None, "model")),
                               arg((8, 9, 9, 6), P())]) == {}


def test_inside_shard_map(mesh):
    x = images(9, "NHWC", 8, 4, 10, 10)
    w = filters(10, "NHWC", 6, 4, 3, 3)
    per_device = jax.jit(jax.shard_map(
        lambda x, w: jcn.max_pool(jcn.filter_acts(x, w, pad=1, layout="NHWC"), 2, layout="NHWC"),
        mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
    whole = jax.jit(lambda x, w: jcn.max_pool(jcn.filter_acts(x, w, pad=1, layout="NHWC"), 2,
                                              layout="NHWC"))
    assert_close(per_device(x, w), one_device(whole, x, w), jnp.float32)


@pytest.mark.parametrize("kind", ["cross_map", "same_map"])
def test_response_norms_split_batch_and_their_independent_axes(mesh, kind):
    # cross-map: batch and rows split, channels gathered; same-map: batch and channels split
    layout = "NHWC"
    x = images(7, layout, 8, 6, 12, 12)
    g = rand(8, x.shape)
    second = dict(h="model") if kind == "cross_map" else dict(c="model")
    xs, gs = put(x, mesh, layout, n="data", **second), put(g, mesh, layout, n="data", **second)
    norm = (lambda x: jcn.cross_map_norm(x, 5, add_scale=0.3, pow_scale=0.75, layout=layout)) \
        if kind == "cross_map" else \
        (lambda x: jcn.response_norm(x, 3, add_scale=0.3, pow_scale=0.75, layout=layout))

    def run(x, g):
        y, vjp = jax.vjp(norm, x)
        return y, jax.jvp(norm, (x,), (g,))[1], vjp(g)[0]
    run = jax.jit(run)
    for got, want in zip(run(xs, gs), one_device(run, x, g)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    hlo = compiled_text(run, xs, gs)
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    for target in ("norm_fwd", "norm_jvp", "norm_grad"):
        assert f'custom_call_target="jax_convnet_{target}"' in hlo
