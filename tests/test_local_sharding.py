"""The locally connected family in programs split across devices: each device runs the custom
calls on its own batch (and filter) slices instead of gathering the whole tensors, the filter
gradients of the batch slices are added, and the results equal the single-device ones. Runs in
a subprocess with four virtual CPU devices (test_in_four_cpu_devices starts it)."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_convnet as jcn
from jax_convnet import geometry as G
from conftest import (FOUR_DEVICES, LAYOUTS, assert_close, check_batch_split_step, images,
                      one_device, rand, run_in_cpu_devices, spec_of)


def test_in_four_cpu_devices():
    run_in_cpu_devices(__file__, FOUR_DEVICES)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step_splits_the_batch(mesh, layout):
    x = images(0, layout, 8, 5, 8, 7)
    w1 = rand(1, G.local_filter_shape(layout, (8, 7), 6, 5, 3, 3)) * 0.3
    w2 = rand(2, G.local_filter_shape(layout, (4, 4), 4, 6, 2, 2)) * 0.3

    def loss(x, w1, w2):
        h = jnp.tanh(jcn.local_filter_acts(x, w1, pad=1, layout=layout))
        return jnp.sum(jcn.local_filter_acts(h, w2, stride=2, layout=layout) ** 2)
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    spec = [None] * 4
    spec[G.image_axes(layout)["n"]] = "data"
    xs = jax.device_put(x, NamedSharding(mesh, P(*spec)))
    hlo = check_batch_split_step(step, xs, x, w1, w2)
    assert "all-gather" not in hlo  # no device ever holds the whole batch
    assert "all-reduce" in hlo  # the filter gradients of the batch slices are added
    # 2 forward calls; backward: 2 image_acts, 2 weight_acts
    assert len(re.findall(r'custom_call_target="jax_convnet_local_', hlo)) == 6


def test_filters_split_over_a_model_axis(mesh):
    x = images(3, "NHWC", 8, 5, 6, 6)
    w = rand(4, G.local_filter_shape("NHWC", (6, 6), 8, 5, 3, 3))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, None, None, None, "model")))
    local = jax.jit(lambda x, w: jcn.local_filter_acts(x, w, padding="SAME", layout="NHWC"))
    out = local(xs, ws)
    assert_close(out, one_device(local, x, w), jnp.float32)
    assert spec_of(out) == ("data", None, None, "model")
    assert "all-gather" not in local.lower(xs, ws).compile().as_text()
