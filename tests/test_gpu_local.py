"""The CUDA kernels of the locally connected family: equal to the float64 reference and to the
CPU kernels on the CIFAR-10 11% net's local layers and on random small configurations, outputs
poisoned, every dtype, both layouts, bitwise reproducible. Skipped without a GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from jax_convnet import geometry as G
from jax_convnet import reference as ref
from conftest import LAYOUTS, assert_close, cpu, exact, gpu, images, rand, run_poisoned

pytestmark = pytest.mark.gpu

# cuda-convnet's layers-conv-local-11pct.cfg: local3 (64 -> 32) and local4 (32 -> 32) on 8x8
# images, 3x3 filters, pad 1, stride 1 (batch 128 there).
LOCAL_11PCT = {"local3": (64, 32), "local4": (32, 32)}


def all_three(**kw):
    def run(x, w, g):
        return (jcn.local_filter_acts(x, w, **kw), jcn.local_image_acts(g, w, x.shape, **kw),
                jcn.local_weight_acts(x, g, w.shape, **kw))
    return jax.jit(run)


def exact_three(**kw):
    """The oracle: the pure-lax reference in float64 on the CPU."""
    run = jax.jit(lambda x, w, g: (ref.local_filter_acts(x, w, **kw),
                                   ref.local_image_acts(g, w, x.shape, **kw),
                                   ref.local_weight_acts(x, g, w.shape, **kw)))
    return lambda *args: run(*exact(*args))


def operands(layout, dtype, n, c, h, w, f, fh, fw, key=0, **geometry):
    out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), **geometry)
    x = images(3 * key, layout, n, c, h, w, dtype)
    wt = rand(3 * key + 1, G.local_filter_shape(layout, out_hw, f, c, fh, fw), dtype) * 0.1
    g = rand(3 * key + 2, G.image_shape(layout, n, f, *out_hw), dtype)
    return x, wt, g


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", sorted(LOCAL_11PCT))
def test_11pct_layers_match_reference_and_cpu_kernels(name, dtype, layout):
    c, f = LOCAL_11PCT[name]
    kw = dict(pad=1, layout=layout)
    args = jax.device_put(operands(layout, dtype, 128, c, 8, 8, f, 3, 3, pad=1), gpu())
    ours = run_poisoned(all_three(**kw), *args)
    for a, b in zip(ours, exact_three(**kw)(*args)):
        assert_close(a, b, dtype)
    on_cpu = all_three(**kw)(*jax.device_put(args, cpu()))
    for a, b in zip(ours, on_cpu):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("seed", range(12))
def test_random_small_configurations(seed):
    rng = np.random.default_rng(200 + seed)
    layout = LAYOUTS[seed % 2]
    dtype = [jnp.float32, jnp.bfloat16, jnp.float16][seed % 3]
    fh, fw = (int(v) for v in rng.integers(1, 6, 2))
    sh, sw = (int(v) for v in rng.integers(1, 4, 2))
    h, w = fh + int(rng.integers(0, 9)), fw + int(rng.integers(0, 9))
    # sizes around the kernel's 32 x 32 tiles and 16-step stages
    n, c, f = (int(v) for v in rng.integers(1, 70, 3))
    if seed % 3 == 0:
        kw = dict(padding=tuple(tuple(int(v) for v in rng.integers(0, 3, 2)) for _ in range(2)))
    else:
        kw = dict(pad=tuple(int(v) for v in rng.integers(0, 3, 2)))
    kw.update(stride=(sh, sw), layout=layout)
    args = jax.device_put(operands(layout, dtype, n, c, h, w, f, fh, fw, key=seed, **{
        k: v for k, v in kw.items() if k != "layout"}), gpu())
    ours = run_poisoned(all_three(**kw), *args)
    for a, b in zip(ours, exact_three(**kw)(*args)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step_matches_cpu_kernels(layout):
    x, w, _ = operands(layout, jnp.float32, 16, 32, 8, 8, 32, 3, 3, pad=1)
    step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(
        jcn.local_filter_acts(x, w, pad=1, layout=layout)) ** 2), (0, 1)))
    value, grads = step(*jax.device_put((x, w), gpu()))
    want_value, want_grads = step(*jax.device_put((x, w), cpu()))
    assert_close(value, want_value)
    for a, b in zip(grads, want_grads):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_bitwise_reproducible(dtype):
    kw = dict(pad=1, layout="NHWC")
    args = jax.device_put(operands("NHWC", dtype, 128, 64, 8, 8, 32, 3, 3, pad=1), gpu())
    run = all_three(**kw)
    first = [np.asarray(v) for v in run(*args)]
    for _ in range(5):
        for a, b in zip(first, run(*args)):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_handler_rejects_inconsistent_calls_without_crashing():
    x = jax.device_put(rand(0, (3, 10, 9, 5)), gpu())
    w = jax.device_put(rand(1, (7, 6, 3, 4, 4, 16)), gpu())
    attrs = G.local_filter_acts_geometry(x, w, stride=1, pad=0, padding=None, layout="C01B",
                                         precision=None).ffi_attrs()
    call = lambda shape: jax.ffi.ffi_call("jax_convnet_local_filter_acts",
                                          jax.ShapeDtypeStruct(shape, x.dtype))
    with jax.default_device(gpu()):
        with pytest.raises(Exception, match="hidden spatial size"):
            jax.block_until_ready(call((16, 6, 6, 5))(x, w, **attrs))
        with pytest.raises(Exception, match="output positions"):
            jax.block_until_ready(call((16, 7, 6, 5))(x, w[:6], **attrs))
