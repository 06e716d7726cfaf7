"""ConvLocal for flax.linen and flax.nnx: flax.linen.ConvLocal's arguments, parameter names and
initial weights, in both layouts, computed by jax_convnet.local_filter_acts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_convnet.flax import linen as cnn
from jax_convnet.flax import nnx as cnnx
from conftest import assert_close, rand


def to_c01b(x):
    return jnp.transpose(x, (3, 1, 2, 0))


@pytest.mark.parametrize("kw", [dict(padding="SAME"), dict(padding="VALID", strides=2),
                                dict(padding=((1, 0), (2, 1)), strides=(1, 2))])
def test_linen_convlocal_equals_flax(platform, kw):
    x = rand(0, (3, 9, 8, 5))
    theirs = nn.ConvLocal(6, (3, 2), **kw)
    params = theirs.init(jax.random.key(0), x)
    ours = cnn.ConvLocal(6, (3, 2), **kw)
    our_params = ours.init(jax.random.key(0), x)
    # same names; the kernel is flax's rearranged, drawn from the same key
    assert jax.tree.map(jnp.shape, our_params)["params"]["bias"] == \
        params["params"]["bias"].shape
    np.testing.assert_array_equal(cnn.local_kernel_to_flax(our_params["params"]["kernel"], "NHWC"),
                                  params["params"]["kernel"])
    params = jax.tree.map(lambda p: p + 0.1 * rand(1, p.shape), params)  # a nonzero bias
    mine = {"params": {"kernel": cnn.local_kernel_from_flax(params["params"]["kernel"], (3, 2),
                                                            "NHWC"),
                       "bias": params["params"]["bias"]}}
    with jax.default_matmul_precision("float32"):
        want = theirs.apply(params, x)
    assert_close(jax.jit(ours.apply)(mine, x), want)
    # C01B: the same layer on transposed images, kernel reshaped from flax's
    c01b = cnn.ConvLocal(6, (3, 2), layout="C01B", **kw)
    c01b_params = c01b.init(jax.random.key(0), to_c01b(x))
    np.testing.assert_array_equal(
        cnn.local_kernel_to_flax(c01b_params["params"]["kernel"], "C01B"),
        theirs.init(jax.random.key(0), x)["params"]["kernel"])
    mine_c01b = {"params": {"kernel": cnn.local_kernel_from_flax(params["params"]["kernel"],
                                                                 (3, 2), "C01B"),
                            "bias": params["params"]["bias"]}}
    assert_close(c01b.apply(mine_c01b, to_c01b(x)), to_c01b(want))


def test_linen_convlocal_gradients_and_batch_axes():
    x = rand(2, (2, 3, 6, 6, 4))  # two leading batch axes, as flax allows
    layer = cnn.ConvLocal(5, (3, 3), use_bias=False)
    params = layer.init(jax.random.key(1), x)
    assert params["params"]["kernel"].shape == (6, 6, 3, 3, 4, 5)
    assert layer.apply(params, x).shape == (2, 3, 6, 6, 5)
    flat = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
    theirs = nn.ConvLocal(5, (3, 3), use_bias=False)
    flax_params = {"params": {"kernel": cnn.local_kernel_to_flax(params["params"]["kernel"],
                                                                 "NHWC")}}
    with jax.default_matmul_precision("float32"):
        want = jax.grad(lambda p: jnp.sum(theirs.apply(p, x) ** 2))(flax_params)
    assert_close(cnn.local_kernel_to_flax(flat["params"]["kernel"], "NHWC"),
                 want["params"]["kernel"])


@pytest.mark.parametrize("layout", ["NHWC", "C01B"])
def test_nnx_convlocal_equals_linen(layout):
    x = rand(3, (4, 7, 7, 3))
    x = x if layout == "NHWC" else to_c01b(x)
    layer = cnnx.ConvLocal(3, 8, (3, 3), strides=2, input_size=(7, 7), padding="SAME",
                           rngs=nnx.Rngs(0), layout=layout)
    assert layer.kernel.shape == cnn.ConvLocal(8, (3, 3), strides=2, layout=layout).init(
        jax.random.key(0), x)["params"]["kernel"].shape
    assert layer.bias.shape == (4, 4, 8)
    layer.bias[...] = rand(4, (4, 4, 8))
    params = {"params": {"kernel": layer.kernel[...], "bias": layer.bias[...]}}
    want = cnn.ConvLocal(8, (3, 3), strides=2, layout=layout).apply(params, x)
    assert_close(layer(x), want)
    # the kernel is drawn in flax.linen.ConvLocal's shape (same fans) from rngs.params(), as
    # flax.nnx.Conv draws its kernel
    want = cnnx.default_kernel_init(nnx.Rngs(0).params(), (4, 4, 27, 8), jnp.float32)
    ours = cnnx.ConvLocal(3, 8, (3, 3), strides=2, input_size=(7, 7), rngs=nnx.Rngs(0),
                          layout=layout)
    np.testing.assert_array_equal(cnn.local_kernel_to_flax(ours.kernel[...], layout), want)


@pytest.mark.parametrize("make,match", [
    (lambda: cnn.ConvLocal(4, 3).init(jax.random.key(0), jnp.ones((1, 5, 5, 2))), "kernel_size"),
    (lambda: cnn.ConvLocal(4, (3, 3), mask=jnp.ones(1)).init(jax.random.key(0),
                                                            jnp.ones((1, 5, 5, 2))), "mask"),
    (lambda: cnn.ConvLocal(4, (3, 3), kernel_dilation=2), "kernel_dilation"),
    (lambda: cnn.ConvLocal(4, (3, 3), padding="CIRCULAR"), "padding"),
    (lambda: cnn.ConvLocal(4, (3, 3), layout="NCHW"), "layout"),
    (lambda: cnnx.ConvLocal(2, 4, (3, 3), input_size=5.5, rngs=nnx.Rngs(0)), "input_size"),
    (lambda: cnnx.ConvLocal(2, 4, (3, 3), input_size=(5, 5), feature_group_count=2,
                            rngs=nnx.Rngs(0)), "feature_group_count"),
    (lambda: cnnx.ConvLocal(2, 4, (7, 7), input_size=(5, 5), padding="VALID",
                            rngs=nnx.Rngs(0)), "filter"),
])
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nnx_convlocal_refuses_images_of_another_size():
    layer = cnnx.ConvLocal(2, 4, (3, 3), input_size=(6, 6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output positions"):
        layer(jnp.ones((1, 8, 8, 2)))
