"""Hopper's TMA-fed wgmma kernels (csrc/cuda/conv_tma.cuh): filter_acts and weight_acts in
16-bit types in both layouts, and image_acts at stride 1; float32 at default precision (TF32) in
NHWC filter_acts / image_acts and C01B weight_acts (its other cases run the other kernels). Every
case against the float64 reference with poisoned outputs, and bitwise equal from one run to the
next. On other GPUs the same cases run the other kernels (and must pass there too); skipped
without a GPU."""

import jax
import jax.numpy as jnp
import pytest

import jax_convnet as jcn
from jax_convnet import reference as ref
from conftest import (LAYOUTS, assert_close, exact, filters, gpu, images, rand, run_poisoned_twice,
                      tolerance_dtype)

pytestmark = pytest.mark.gpu

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
DTYPE_IDS = ["bfloat16", "float16", "float32"]

# (batch, channels, height, width, filters, window, stride, pad). In C01B the kernels take a
# batch of at least 64: runs of 64 images (72: a partial run), two output columns per tile
# (odd widths: a half-empty last pair). In NHWC 128 consecutive output pixels per tile cross rows
# and images (weight_acts: 64 per k-block). Channels past a multiple of 64 (48, 112) are the
# copies' zero fill; convolutions using under 3/4 of their channel blocks (8 channels) or into
# fewer than 48 channels (32 filters) take the other kernels; image_acts into 48 channels fills
# 3/4 of the narrowest tile. Filter
# counts pick each tile width (64, 128, 192, 256) and partial last column tiles (96, 200);
# weight_acts' columns are (tap, channel) pairs, its rows the filters.
CASES = {
    "alex2-like": (64, 64, 27, 27, 192, (5, 5), 1, 2),
    "alex3-like": (64, 192, 13, 13, 384, (3, 3), 1, 1),
    "partial-run": (72, 48, 9, 11, 96, (3, 3), 1, 1),
    "wide-tile": (64, 112, 8, 7, 256, (3, 2), 1, (1, 0)),
    "narrow-tile": (128, 64, 6, 9, 64, (1, 1), 1, 0),
    "mid-tile": (64, 64, 10, 10, 200, (4, 4), 1, (2, 1)),
    "few-channels": (64, 8, 10, 10, 64, (3, 3), 1, 1),
    "few-filters": (64, 64, 10, 10, 32, (3, 3), 1, 1),
    "ceil-rule": (64, 64, 7, 8, 128, (2, 2), 2, 0),
    "strided": (64, 64, 23, 19, 96, (5, 3), (2, 3), (2, 1)),
    "alex1-like": (64, 64, 35, 35, 64, (11, 11), 4, 2),
}


def operands(name, layout, dtype):
    n, c, h, w, f, window, stride, pad = CASES[name]
    x = images(1, layout, n, c, h, w, dtype)
    wt = filters(2, layout, f, c, *window, dtype) * 0.1
    out_hw = jcn.filter_acts_output_size((h, w), window, stride=stride, pad=pad)
    g = rand(3, jcn.geometry.image_shape(layout, n, f, *out_hw), dtype)
    return x, wt, g, dict(stride=stride, pad=pad, layout=layout)


def check(op, reference, args, dtype):
    """``op`` on the GPU (outputs poisoned, run twice: bitwise equal) against ``reference`` on
    the float64 oracle, within ``dtype``'s bound (TF32's for float32)."""
    ours = run_poisoned_twice(jax.jit(op), *jax.device_put(args, gpu()))
    want = jax.jit(reference)(*exact(*args))
    assert ours.dtype == dtype
    assert_close(ours, want, tolerance_dtype(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_filter_acts_matches_reference_and_repeats_bitwise(name, dtype, layout):
    x, w, _, kw = operands(name, layout, dtype)
    check(lambda x, w: jcn.filter_acts(x, w, **kw),
          lambda x, w: ref.filter_acts(x, w, precision="highest", **kw), (x, w), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", [k for k, v in CASES.items() if v[6] == 1])
def test_image_acts_at_stride_1_matches_reference_and_repeats_bitwise(name, dtype, layout):
    x, w, g, kw = operands(name, layout, dtype)
    check(lambda g, w: jcn.image_acts(g, w, x.shape, **kw),
          lambda g, w: ref.image_acts(g, w, x.shape, precision="highest", **kw), (g, w), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_weight_acts_matches_reference_and_repeats_bitwise(name, dtype, layout):
    x, w, g, kw = operands(name, layout, dtype)
    check(lambda x, g: jcn.weight_acts(x, g, w.shape, **kw),
          lambda x, g: ref.weight_acts(x, g, w.shape, precision="highest", **kw), (x, g), dtype)


@pytest.mark.parametrize("partial_sum", [1, 13, "auto"])
def test_weight_acts_partial_sum_changes_rounding_only(partial_sum):
    x, w, g, kw = operands("alex3-like", "NHWC", jnp.bfloat16)
    args = jax.device_put((x, g), gpu())
    ours = jax.jit(lambda x, g: jcn.weight_acts(x, g, w.shape, partial_sum=partial_sum, **kw))(
        *args)
    want = jax.jit(lambda x, g: ref.weight_acts(x, g, w.shape, precision="highest", **kw))(
        *exact(x, g))
    assert_close(ours, want, jnp.bfloat16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_gradient_of_a_training_loss_runs_all_three_kernels(layout, dtype):
    """jax.grad of a conv + ReLU loss: filter_acts forward, image_acts (stride 1) and
    weight_acts backward."""
    x, w, g, kw = operands("alex3-like", layout, dtype)

    def loss(x, w):
        return jnp.sum(jax.nn.relu(jcn.filter_acts(x, w, **kw)).astype(jnp.float32) ** 2)

    def ref_loss(x, w):
        return jnp.sum(jax.nn.relu(ref.filter_acts(x, w, precision="highest", **kw)) ** 2)

    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(*jax.device_put((x, w), gpu()))
    want_dx, want_dw = jax.jit(jax.grad(ref_loss, (0, 1)))(*exact(x, w))
    assert_close(dx, want_dx, tolerance_dtype(dtype), scale=2)
    assert_close(dw, want_dw, tolerance_dtype(dtype), scale=2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["alex3-like", "partial-run", "wide-tile", "strided"])
def test_3xtf32_gives_float32_accuracy_on_the_tma_core(name, layout, monkeypatch):
    """float32 at precision highest on the TMA core as 3xTF32 (JAX_CONVNET_TMA_3XTF32=1): every
    TF32 route (NHWC in place, C01B through NHWC copies, weight_acts both ways), within
    float32's bound of the float64 reference and bitwise repeatable."""
    monkeypatch.setenv("JAX_CONVNET_TMA_3XTF32", "1")
    x, w, g, kw = operands(name, layout, jnp.float32)
    kw = dict(kw, precision="highest")
    ops = [(lambda x, w: jcn.filter_acts(x, w, **kw),
            lambda x, w: ref.filter_acts(x, w, **kw), (x, w)),
           (lambda x, g: jcn.weight_acts(x, g, w.shape, **kw),
            lambda x, g: ref.weight_acts(x, g, w.shape, **kw), (x, g))]
    if CASES[name][6] == 1:
        ops.append((lambda g, w: jcn.image_acts(g, w, x.shape, **kw),
                    lambda g, w: ref.image_acts(g, w, x.shape, **kw), (g, w)))
    for op, reference, args in ops:
        (call,) = jcn.explain(op, *args)
        assert call["split"], call  # the plan takes 3xTF32 here
        ours = run_poisoned_twice(jax.jit(op), *jax.device_put(args, gpu()))
        assert_close(ours, jax.jit(reference)(*exact(*args)), jnp.float32, scale=2)
