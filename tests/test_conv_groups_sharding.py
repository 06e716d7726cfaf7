"""Grouped convolutions in programs split across devices: the batch splits (each device runs the
grouped custom calls on its batch slice, the filter gradients of the slices are added); filters
or channels sharded across devices are gathered, since a slice would have to hold whole groups.
Runs in a subprocess with four virtual CPU devices (test_in_four_cpu_devices starts it)."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_convnet as jcn
from jax_convnet import geometry as G
from conftest import (FOUR_DEVICES, LAYOUTS, assert_close, check_batch_split_step, one_device,
                      rand, run_in_cpu_devices)


def test_in_four_cpu_devices():
    run_in_cpu_devices(__file__, FOUR_DEVICES)


def put(x, mesh, axes):
    """x with its axes (by position) split over the named mesh axes."""
    spec = [None] * x.ndim
    for axis, name in axes.items():
        spec[axis] = name
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_training_step_splits_the_batch(mesh, layout):
    x = rand(0, G.image_shape(layout, 8, 6, 9, 9))
    w1 = rand(1, G.filter_shape(layout, 8, 3, 3, 3)) * 0.3  # 2 groups
    w2 = rand(2, G.filter_shape(layout, 4, 2, 3, 3)) * 0.3  # 4 groups

    def loss(x, w1, w2):
        h = jnp.tanh(jcn.filter_acts(x, w1, pad=1, groups=2, layout=layout))
        return jnp.sum(jcn.filter_acts(h, w2, stride=2, padding="SAME", groups=4,
                                       layout=layout) ** 2)
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    xs = put(x, mesh, {G.image_axes(layout)["n"]: "data"})
    hlo = check_batch_split_step(step, xs, x, w1, w2)
    assert "all-gather" not in hlo  # no device holds the whole batch
    assert "all-reduce" in hlo  # the filter gradients of the batch slices are added
    # 2 forward calls; backward: 2 image_acts, 2 weight_acts
    assert len(re.findall(r'custom_call_target="jax_convnet_', hlo)) == 6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_filters_or_channels_are_gathered(mesh, layout):
    """Filters split over "model" along F, or images along C: with groups the custom call takes
    whole tensors there (the batch may stay split), and the results are right."""
    x = rand(3, G.image_shape(layout, 8, 6, 7, 7))
    w = rand(4, G.filter_shape(layout, 6, 2, 3, 3))  # 3 groups: 2 channels, 2 filters each
    g = rand(5, G.image_shape(layout, 8, 6, 5, 5))

    def run(x, w, g):
        y, vjp = jax.vjp(lambda x, w: jcn.filter_acts(x, w, groups=3, layout=layout), x, w)
        return (y, *vjp(g))
    run = jax.jit(run)
    ax, fax = G.image_axes(layout), G.filter_axes(layout)
    for xs, ws, gs in [
            (put(x, mesh, {ax["n"]: "data"}), put(w, mesh, {fax["f"]: "model"}),
             put(g, mesh, {ax["n"]: "data", ax["c"]: "model"})),
            (put(x, mesh, {ax["n"]: "data", ax["c"]: "model"}), w, g)]:
        for got, want in zip(run(xs, ws, gs), one_device(run, x, w, g)):
            assert_close(got, want, jnp.float32)
