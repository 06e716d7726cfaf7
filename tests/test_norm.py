"""cross_map_norm and response_norm: forward, JVP, gradient and higher derivatives against the
pure-lax reference, on every platform; their argument checks and the handlers' own checks."""
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

SCALES = dict(add_scale=0.3, pow_scale=0.75, min_div=1.5)


def op(module, kind, size, layout, **scales):
    """x -> the op of ``module`` (jcn or the reference): kind "cross", "blocked" or "same"."""
    scales = {**SCALES, **scales}
    if kind == "same":
        return lambda x: module.response_norm(x, size, layout=layout, **scales)
    return lambda x: module.cross_map_norm(x, size, blocked=kind == "blocked", layout=layout,
                                           **scales)


def check_norm(x, kind, size, layout, **scales):
    """Value, JVP and gradient of ours (outputs poisoned) equal the reference's (whose gradient
    JAX derives from the lax formulation)."""
    t, g = rand(11, x.shape, x.dtype), rand(12, x.shape, x.dtype)
    got = run_poisoned(value_jvp_vjp(op(jcn, kind, size, layout, **scales)), x, t, g)
    want = value_jvp_vjp(op(ref, kind, size, layout, **scales))(x, t, g)
    for a, b in zip(got, want):
        assert a.dtype == x.dtype
        assert_close(a, b, x.dtype)


# (kind, size): sizes 1, 3, 5, 9 and an even one; 9 exceeds the 7 channels and the 6x5 image.
CASES = [("cross", 1), ("cross", 4), ("cross", 5), ("cross", 9), ("blocked", 3),
         ("blocked", 9), ("same", 1), ("same", 3), ("same", 4), ("same", 9)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,size", CASES)
def test_against_the_reference(platform, layout, kind, size):
    # the kernels take sqrt for the common powers 0.5, 0.75 and 1, std::pow for others
    pow_scale = {1: 1.0, 3: 0.75, 4: 0.5, 5: 0.75, 9: 0.6}[size]
    check_norm(images(0, layout, 3, 7, 6, 5), kind, size, layout, pow_scale=pow_scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("kind", ["cross", "same"])
def test_every_dtype(platform, layout, dtype, kind):
    if platform == "gpu" and dtype == jnp.float64:
        pytest.skip("float64 runs the reference on the GPU")
    check_norm(images(1, layout, 2, 10, 5, 6, dtype), kind, 5 if kind == "cross" else 3, layout)


def test_definition_by_hand():
    # C01B, one pixel, channels 0..4: window of channel f is [f - 2, f + 3) clipped (size 5);
    # blocked size 2: {0, 1}, {2, 3}, {4}.
    x = jnp.arange(1.0, 6.0).reshape(5, 1, 1, 1)
    sq = np.arange(1.0, 6.0) ** 2
    s = np.array([sq[0:3].sum(), sq[0:4].sum(), sq[0:5].sum(), sq[1:5].sum(), sq[2:5].sum()])
    want = np.arange(1.0, 6.0) * (2.0 + 0.1 * s) ** -0.75
    y = jcn.cross_map_norm(x, 5, add_scale=0.1, pow_scale=0.75, min_div=2.0)
    np.testing.assert_allclose(np.asarray(y).ravel(), want, rtol=1e-6)
    s = np.array([sq[0:2].sum()] * 2 + [sq[2:4].sum()] * 2 + [sq[4]])
    y = jcn.cross_map_norm(x, 2, add_scale=0.1, pow_scale=0.75, min_div=2.0, blocked=True)
    np.testing.assert_allclose(np.asarray(y).ravel(), np.arange(1.0, 6.0) * (2 + 0.1 * s) ** -0.75,
                               rtol=1e-6)
    # size 4: window of f is [f - 2, f + 2)
    s = np.array([sq[0:2].sum(), sq[0:3].sum(), sq[0:4].sum(), sq[1:5].sum(), sq[2:5].sum()])
    y = jcn.cross_map_norm(x, 4, add_scale=0.1, pow_scale=0.75, min_div=2.0)
    np.testing.assert_allclose(np.asarray(y).ravel(), np.arange(1.0, 6.0) * (2 + 0.1 * s) ** -0.75,
                               rtol=1e-6)
    # same-map: 3x3 image, size 2: window of (y, x) has top-left (y - 1, x - 1)
    img = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    sq = np.arange(1.0, 10.0).reshape(3, 3) ** 2
    s = np.array([[sq[max(i - 1, 0):i + 1, max(j - 1, 0):j + 1].sum() for j in range(3)]
                  for i in range(3)])
    y = jcn.response_norm(img, 2, add_scale=0.01, pow_scale=0.5)
    np.testing.assert_allclose(np.asarray(y)[0, :, :, 0],
                               np.arange(1.0, 10.0).reshape(3, 3) * (1 + 0.01 * s) ** -0.5,
                               rtol=1e-6)


def test_alexnet_parameters_on_a_larger_tensor(platform):
    # cmrnorm size 5, cfg scale 1e-4 (add_scale = scale / size), pow 0.75, over 96 channels
    x = images(2, "C01B", 16, 96, 7, 7) * 20
    check_norm(x, "cross", 5, "C01B", add_scale=1e-4 / 5, pow_scale=0.75, min_div=2.0)
    x = images(3, "NHWC", 4, 32, 13, 11)
    check_norm(x, "same", 3, "NHWC", add_scale=1e-3 / 9, pow_scale=0.75, min_div=1.0)


@pytest.mark.parametrize("kind", ["cross", "same"])
def test_derivatives_to_second_order(kind):
    x = rand(6, (6, 4, 5, 3), jnp.float64)
    f = op(jcn, kind, 3, "C01B", add_scale=0.5, pow_scale=0.8)
    check_grads(f, (x,), order=2, modes=["fwd", "rev"])
    # and they equal the reference's second derivatives (Hessian-vector products)
    g = lambda module: jax.grad(lambda x: jnp.sum(jnp.sin(op(module, kind, 4, "NHWC")(x))))
    v = rand(7, x.shape, jnp.float64)
    hvp = lambda module: jax.jvp(g(module), (x,), (v,))[1]
    assert_close(hvp(jcn), hvp(ref))


def test_third_order_reverse_over_forward():
    x = rand(8, (4, 2, 2, 1), jnp.float64)
    check_grads(op(jcn, "cross", 3, "C01B"), (x,), order=3, modes=["rev"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["cross", "same"])
def test_vmap(platform, layout, kind):
    xs = jnp.stack([images(k, layout, 2, 6, 5, 5) for k in range(3)], axis=1)
    f = lambda module: op(module, kind, 3, layout)
    got = jax.jit(jax.vmap(f(jcn), 1))(xs)
    assert_close(got, jax.vmap(f(ref), 1)(xs))
    loss = lambda module: jax.grad(lambda x: jnp.sum(f(module)(x) ** 2))
    assert_close(jax.jit(jax.vmap(loss(jcn), 1))(xs), jax.vmap(loss(ref), 1)(xs))


def test_vmap_of_jvp_with_unmapped_x(platform):
    x = rand(0, (6, 4, 4, 2))
    ts = rand(1, (3, 6, 4, 4, 2))
    jvp = lambda module: jax.vmap(lambda t: jax.jvp(op(module, "cross", 5, "C01B"), (x,), (t,))[1])
    assert_close(jax.jit(jvp(jcn))(ts), jvp(ref)(ts))


def test_eager_call_equals_jit():
    x = rand(0, (5, 4, 4, 3))
    f = op(jcn, "same", 3, "C01B")
    np.testing.assert_array_equal(f(x), jax.jit(f)(x))


def custom_calls(text):
    return re.findall(r"custom_call @(\w+)\(", text)


def test_training_step_keeps_the_denominators(platform):
    x = rand(0, (6, 5, 5, 4))
    step = jax.value_and_grad(lambda x: jnp.sum(jcn.cross_map_norm(x, 5, **SCALES) ** 2))
    eqns = jax.make_jaxpr(step)(x).eqns
    names = [e.primitive.name for e in eqns if e.primitive.name.startswith("jax_convnet")]
    assert names == ["jax_convnet_norm_fwd", "jax_convnet_norm_grad"]
    text = hlo_text(step, x)
    assert custom_calls(text) == ["jax_convnet_norm_fwd", "jax_convnet_norm_grad"]
    assert "reduce_window" not in text
    # not differentiated: the plain forward, no denominators
    assert custom_calls(hlo_text(op(jcn, "cross", 5, "C01B"), x)) == ["jax_convnet_norm"]


def test_bfloat16_keeps_bfloat16_and_float16_float32_denominators():
    for dtype, residual in [(jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32),
                            (jnp.float32, jnp.float32), (jnp.float64, jnp.float64)]:
        x = rand(0, (4, 3, 3, 2), dtype)
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(
            jcn.response_norm(x, 3, **SCALES).astype(jnp.float32))))(x)
        fwd = next(e for e in jaxpr.eqns if e.primitive.name == "jax_convnet_norm_fwd")
        assert fwd.outvars[1].aval.dtype == residual


def test_bitwise_repeatable(platform):
    x = images(4, "C01B", 8, 16, 9, 9)
    step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.cos(jcn.cross_map_norm(x, 5, **SCALES)))))
    first = step(x)
    for _ in range(2):
        for a, b in zip(first, step(x)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_large_denominators_in_float16_do_not_overflow():
    # add_scale * S far above float16's 65504: the float32 residual keeps the gradient finite
    x = (rand(5, (5, 3, 3, 2)) * 200).astype(jnp.float16)
    g = jax.grad(lambda x: jnp.sum(jcn.cross_map_norm(x, 5, add_scale=10.0, pow_scale=0.75)
                                   .astype(jnp.float32)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(ref.cross_map_norm(x.astype(jnp.float32), 5,
                                                          add_scale=10.0, pow_scale=0.75)))(x)
    assert_close(g, g_ref, jnp.float16)


# ----------------------------------------------------------------------------- bad input

X = rand(0, (4, 3, 3, 2))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(size=0), ValueError, "size"),
    (dict(size=-3), ValueError, "size"),
    (dict(size=2.0), TypeError, "size"),
    (dict(size=True), TypeError, "size"),
    (dict(size=2**31), ValueError, "size"),
    (dict(add_scale=float("nan")), ValueError, "add_scale"),
    (dict(add_scale=-0.1), ValueError, "add_scale"),
    (dict(add_scale="1"), TypeError, "add_scale"),
    (dict(add_scale=jnp.float32(1.0)), TypeError, "add_scale"),
    (dict(pow_scale=float("inf")), ValueError, "pow_scale"),
    (dict(pow_scale=None), TypeError, "pow_scale"),
    (dict(min_div=0.0), ValueError, "min_div"),
    (dict(min_div=-1), ValueError, "min_div"),
    (dict(blocked=1), TypeError, "blocked"),
    (dict(layout="NCHW"), ValueError, "layout"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(size=3, add_scale=0.1, pow_scale=0.75, min_div=1.0, blocked=False, layout="C01B")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        jcn.cross_map_norm(X, **args)
    if "blocked" not in kwargs:
        args.pop("blocked")
        with pytest.raises(error, match=match):
            jcn.response_norm(X, **args)


def test_bad_operands():
    with pytest.raises(ValueError, match="blocked"):  # response_norm has no blocked windows
        G.norm_geometry(X, 3, kind="same_map", add_scale=0.1, pow_scale=0.75, min_div=1.0,
                        blocked=True, layout="C01B")
    with pytest.raises(ValueError, match="rank 4"):
        jcn.cross_map_norm(X[0], 3, add_scale=0.1, pow_scale=0.75)
    with pytest.raises(TypeError, match="float32"):
        jcn.cross_map_norm(X.astype(jnp.int32), 3, add_scale=0.1, pow_scale=0.75)


@pytest.mark.parametrize("target,operands,attrs,match", [
    ("jax_convnet_norm", 1, dict(size=0), "size"),
    ("jax_convnet_norm", 1, dict(min_div=0.0), "min_div"),
    ("jax_convnet_norm", 1, dict(add_scale=float("nan")), "add_scale"),
    ("jax_convnet_norm", 1, dict(same_map=1, blocked=1), "blocked"),
    ("jax_convnet_norm", 1, dict(layout=7), "layout"),
    ("jax_convnet_norm_grad", 3, dict(), "denominators"),  # float64 residual for float32
])
def test_handlers_refuse_bad_calls(target, operands, attrs, match):
    if not jcn.has_native("cpu"):
        pytest.skip("needs the CPU module")
    geom = G.NormGeometry("C01B", "cross_map", 3, False, 0.1, 0.75, 1.0)
    full = {**geom.ffi_attrs(), **{k: (np.float64(v) if isinstance(v, float) else np.int64(v))
                                   for k, v in attrs.items()}}
    x = rand(0, (4, 3, 3, 2))
    args = [x] if operands == 1 else [x, x, x.astype(jnp.float64)]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype))
    with jax.default_device(jax.devices("cpu")[0]), pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(lambda *a: call(*a, **full))(*args))


# ----------------------------------------------------------------------------- Flax

def test_flax_modules():
    pytest.importorskip("flax")
    from flax import nnx
    from jax_convnet.flax import linen as cnn, nnx as cnnx
    x = rand(9, (2, 3, 5, 5, 7))  # NHWC with two leading batch axes, as flax allows
    cross = ref.cross_map_norm(x.reshape(6, 5, 5, 7), 5, add_scale=0.3, pow_scale=0.75,
                               layout="NHWC").reshape(x.shape)
    same = ref.response_norm(x.reshape(6, 5, 5, 7), 3, add_scale=0.3, pow_scale=0.75,
                             min_div=2.0, layout="NHWC").reshape(x.shape)
    linen_cross = cnn.CrossMapNorm(5, 0.3, 0.75)
    assert linen_cross.init(jax.random.key(0), x) == {}
    assert_close(linen_cross.apply({}, x), cross)
    assert_close(cnn.ResponseNorm(3, 0.3, 0.75, min_div=2.0).apply({}, x), same)
    assert_close(cnnx.CrossMapNorm(5, 0.3, 0.75)(x), cross)
    assert_close(cnnx.ResponseNorm(3, 0.3, 0.75, 2.0)(x), same)
    assert nnx.state(cnnx.CrossMapNorm(5, 0.3, 0.75), nnx.Param) == nnx.State({})
    xc = jnp.moveaxis(x[0], 0, -1).transpose(3, 1, 2, 0)  # (C, H, W, B)
    assert_close(cnn.CrossMapNorm(3, 0.1, 0.5, blocked=True, layout="C01B").apply({}, xc),
                 ref.cross_map_norm(xc, 3, add_scale=0.1, pow_scale=0.5, blocked=True))
    with pytest.raises(ValueError, match="CrossMapNorm: size"):
        cnn.CrossMapNorm(0, 0.3, 0.75)
    with pytest.raises(TypeError, match="ResponseNorm: add_scale"):
        cnnx.ResponseNorm(3, "0.3", 0.75)


# ----------------------------------------------------------------------------- benchmark

def test_benchmark_rows(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from jax_convnet import benchmark
    rows = benchmark.main(["--quick", "--set", "cpu", "--ops", "norm", "--filter",
                           "norm2/train/f32-slices/NHWC", "--reps", "1", "--out", str(tmp_path)])
    assert [r["name"] for r in rows] == ["norm/norm2/train/f32-slices/NHWC"]
    # ours against both XLA composites, the training rows with their floor
    assert all("error" not in r and r["max_rel_err"] < 1e-5 for r in rows)
    assert all(r["floor_ms"] > 0 for r in rows if r["op"] == "train")


def test_vmap_over_an_empty_axis_and_export_with_a_symbolic_batch():
    xs = jnp.zeros((0, 5, 3, 3, 2))
    assert jax.vmap(op(jcn, "cross", 3, "C01B"))(xs).shape == xs.shape
    assert jax.vmap(jax.grad(lambda x: jnp.sum(op(jcn, "same", 3, "C01B")(x))))(xs).shape == \
        xs.shape
    from jax import export
    b, = export.symbolic_shape("b")
    f = jax.grad(lambda x: jnp.sum(op(jcn, "cross", 5, "NHWC")(x) ** 2))
    exported = export.export(jax.jit(f), disabled_checks=jcn.export_safety_checks())(
        jax.ShapeDtypeStruct((b, 4, 4, 6), jnp.float32))
    x = rand(3, (3, 4, 4, 6))
    assert_close(exported.call(x), jax.grad(lambda x: jnp.sum(op(ref, "cross", 5, "NHWC")(x) ** 2))(x))
