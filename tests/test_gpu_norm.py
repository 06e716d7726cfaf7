"""The CUDA response-norm kernels on AlexNet's and the CIFAR-10 nets' shapes: equal to the
float64 reference and to the CPU kernels, bitwise reproducible, 64-bit indexing. Skipped
without a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from jax_convnet import reference as ref
from jax_convnet._layers import GPU_NORMS
from conftest import (LAYOUTS, assert_close, cpu, exact, gpu, images, rand, run_poisoned,
                      value_jvp_vjp)

pytestmark = pytest.mark.gpu

BATCH = 8


def norm_of(module, layer, layout):
    kw = dict(add_scale=layer.add_scale, pow_scale=layer.pow_scale, min_div=layer.min_div,
              layout=layout)
    if layer.kind == "same":
        return lambda x: module.response_norm(x, layer.size, **kw)
    return lambda x: module.cross_map_norm(x, layer.size, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", list(GPU_NORMS))
def test_layers_match_reference_and_cpu_kernels(name, dtype, layout):
    layer = GPU_NORMS[name]
    x = images(1, layout, BATCH, layer.channels, layer.height, layer.width, dtype) * 3
    t, g = rand(2, x.shape, dtype), rand(3, x.shape, dtype)
    ours = run_poisoned(value_jvp_vjp(norm_of(jcn, layer, layout)),
                        *jax.device_put((x, t, g), gpu()))
    want = value_jvp_vjp(norm_of(ref, layer, layout))(*exact(x, t, g))
    on_cpu = value_jvp_vjp(norm_of(jcn, layer, layout))(*jax.device_put((x, t, g), cpu()))
    for a, b, c_ in zip(ours, want, on_cpu):
        assert a.dtype == dtype
        assert_close(a, b, dtype, scale=2)
        assert_close(a, c_, dtype, scale=2)


@pytest.mark.parametrize("kind,size", [("cross", 1), ("cross", 4), ("cross", 9), ("blocked", 3),
                                       ("same", 1), ("same", 4), ("same", 9)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_sizes_and_shapes(kind, size, layout):
    x = images(4, layout, 3, 7, 6, 5)
    t, g = rand(5, x.shape), rand(6, x.shape)
    kw = dict(add_scale=0.3, pow_scale=0.75, min_div=1.5, layout=layout)
    f = (lambda m: lambda x: m.response_norm(x, size, **kw)) if kind == "same" else \
        (lambda m: lambda x: m.cross_map_norm(x, size, blocked=kind == "blocked", **kw))
    ours = run_poisoned(value_jvp_vjp(f(jcn)), *jax.device_put((x, t, g), gpu()))
    want = value_jvp_vjp(f(ref))(*exact(x, t, g))
    for a, b in zip(ours, want):
        assert_close(a, b, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_bitwise_repeatable(dtype):
    x = jax.device_put(images(7, "C01B", 32, 96, 27, 27, dtype), gpu())
    step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.cos(
        jcn.cross_map_norm(x, 5, add_scale=2e-5, pow_scale=0.75).astype(jnp.float32)))))
    first = step(x)
    for _ in range(10):
        for a, b in zip(first, step(x)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layout,kind", [("C01B", "cross"), ("NHWC", "same")])
def test_more_than_2_31_elements(layout, kind):
    # 4 x 1024 x 1024 x 520 bfloat16: 2.18e9 elements, 64-bit indices (C01B cross-map: the tiled
    # kernel; NHWC same-map: the other). Batch elements are normalised independently, so the
    # last three equal the op on them alone.
    shape = jcn.geometry.image_shape(layout, 520, 4, 1024, 1024)
    key = jax.device_put(jax.random.key(0), gpu())
    x = jax.jit(lambda k: jax.random.normal(k, shape, jnp.bfloat16))(key)
    kw = dict(add_scale=0.5, pow_scale=0.75, layout=layout)
    f = (lambda m: lambda x: m.cross_map_norm(x, 3, **kw)) if kind == "cross" else \
        (lambda m: lambda x: m.response_norm(x, 3, **kw))
    last = (lambda x: x[..., -3:]) if layout == "C01B" else (lambda x: x[-3:])
    tail = jax.jit(lambda x: last(f(jcn)(x)))(x)
    want = f(ref)(last(x))
    del x
    assert_close(tail, want, jnp.bfloat16)
