"""Seeded differential fuzzing on the CPU: random valid configurations of every op against the
pure-lax reference.

Each configuration draws a layout, rectangular images and filters, strides, one of the two padding
conventions (cuda-convnet's ``pad=`` / ``start=`` or XLA's ``padding=``), ``partial_sum``, a dtype
and, for pools, data with ties and NaN. The conv family is checked against the reference computed
in float64 on the same values (forward, VJP in both operands, JVP, vmap, and the public
image_acts / weight_acts with ``image_shape`` / ``filter_shape`` in either form); max_pool
against the reference in its own dtype (forward and JVP exactly, the gradient to rounding).

``JAX_CONVNET_FUZZ_CONFIGS`` (default 20) configurations per op family (40 in all), from
``JAX_CONVNET_FUZZ_SEED`` (default 0); a failure names its configuration.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_convnet as jcn
from jax_convnet import reference as ref
from conftest import TOLERANCE

CONFIGS = int(os.environ.get("JAX_CONVNET_FUZZ_CONFIGS", "20"))
SEED = int(os.environ.get("JAX_CONVNET_FUZZ_SEED", "0"))
FUZZ_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]


@pytest.fixture(autouse=True)
def _on_the_cpu():
    """The CPU kernels, also where a GPU is present (test_gpu_fuzz.py fuzzes the CUDA kernels)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _rng(family, index):
    return np.random.default_rng([SEED, {"conv": 0, "pool": 1}[family], index])


def _pair(rng, lo, hi):
    """(rows, cols), often equal, sometimes given as an int."""
    a, b = (int(v) for v in rng.integers(lo, hi + 1, 2))
    return a if rng.random() < 0.3 else (a, b)


def _as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------- conv family

def conv_config(index, *, rng=None, sizes=None, dtypes=FUZZ_DTYPES, max_stride=3, groups=False):
    """Configuration ``index`` of the conv family. The keywords draw from another distribution
    (tests/test_gpu_fuzz.py): ``rng`` instead of this suite's, ``sizes(rng, layout)`` ->
    (n, c, f, h, w, (smallest, largest) filter side) instead of this suite's small sizes,
    ``dtypes`` and ``max_stride``. ``groups``: draw last (the other draws stay as they were)
    ``groups`` of 2 to 4 for about 40% of the configurations, C and F then rounded up to
    multiples of it."""
    rng = _rng("conv", index) if rng is None else rng
    layout = str(rng.choice(["C01B", "NHWC"]))
    if sizes is None:
        n, c, f = (int(rng.integers(1, hi + 1)) for hi in (4, 7, 19))
        h, w = (int(v) for v in rng.integers(1, 13, 2))
        window = (1, 6)
    else:
        n, c, f, h, w, window = sizes(rng, layout)
    stride = _pair(rng, 1, max_stride)
    kw = dict(layout=layout, stride=stride)
    if rng.random() < 0.5:  # cuda-convnet: symmetric pad, ceil rule
        pad = _pair(rng, 0, 2)
        kw["pad"] = pad
        room = [s + 2 * p for s, p in zip((h, w), _as_pair(pad))]
    else:
        choice = rng.integers(3)
        if choice == 0:
            kw["padding"] = "SAME"
            room = [h, w]
        elif choice == 1:
            kw["padding"] = "VALID"
            room = [h, w]
        else:
            pads = tuple(tuple(int(v) for v in rng.integers(0, 4, 2)) for _ in range(2))
            kw["padding"] = pads
            room = [s + sum(p) for s, p in zip((h, w), pads)]
    fh, fw = (int(rng.integers(min(window[0], r), min(r, window[1]) + 1)) for r in room)
    dtype = dtypes[int(rng.integers(len(dtypes)))]
    out_hw = jcn.filter_acts_output_size((h, w), (fh, fw), stride=stride, pad=kw.get("pad", 0),
                                         padding=kw.get("padding"))
    positions = out_hw[0] * out_hw[1]
    ps = rng.integers(3)
    if ps == 1:
        kw["partial_sum"] = "auto"
    elif ps == 2:
        divisors = [d for d in range(1, positions + 1) if positions % d == 0]
        kw["partial_sum"] = int(rng.choice(divisors))
    cfg = dict(n=n, c=c, f=f, h=h, w=w, fh=fh, fw=fw, dtype=dtype, kw=kw,
               full_shapes=bool(rng.random() < 0.5), seed=int(rng.integers(2**31)))
    if groups and rng.random() < 0.4:
        g = kw["groups"] = int(rng.integers(2, 5))
        cfg["c"], cfg["f"] = (-(-v // g) * g for v in (c, f))
    return cfg


def _filter_shape(cfg):
    return jcn.geometry.filter_shape(cfg["kw"]["layout"], cfg["f"],
                                     cfg["c"] // cfg["kw"].get("groups", 1), cfg["fh"], cfg["fw"])


def conv_program(m, cfg):
    """One function computing everything checked, with the ops of module ``m`` (jcn or ref)."""
    kw, layout = cfg["kw"], cfg["kw"]["layout"]
    image_shape = jcn.geometry.image_shape(layout, cfg["n"], cfg["c"], cfg["h"], cfg["w"])
    filter_shape = _filter_shape(cfg)
    ishape = image_shape if cfg["full_shapes"] else (cfg["h"], cfg["w"])
    fshape = filter_shape if cfg["full_shapes"] else (cfg["fh"], cfg["fw"])

    def run(x, w, ct, tx, tw, xs):
        fa = lambda x, w: m.filter_acts(x, w, **kw)
        y, vjp = jax.vjp(fa, x, w)
        dx, dw = vjp(ct)
        _, ty = jax.jvp(fa, (x, w), (tx, tw))
        ys = jax.vmap(lambda x: fa(x, w), in_axes=-1, out_axes=-1)(xs)
        ia = m.image_acts(ct, w, ishape, **kw)
        wa = m.weight_acts(x, ct, fshape, **kw)
        return dict(y=y, dx=dx, dw=dw, ty=ty, ys=ys, ia=ia, wa=wa)
    return run, image_shape, filter_shape


def conv_operands(cfg):
    """The NumPy operands of conv_program's function (x, w, ct, tx, tw, xs) in the config's
    dtype. Made and compared in NumPy: eager JAX ops would compile once per new shape."""
    image_shape = jcn.geometry.image_shape(cfg["kw"]["layout"], cfg["n"], cfg["c"], cfg["h"],
                                           cfg["w"])
    filter_shape = _filter_shape(cfg)
    hidden_shape = jax.eval_shape(lambda x, w: ref.filter_acts(x, w, **cfg["kw"]),
                                  jax.ShapeDtypeStruct(image_shape, cfg["dtype"]),
                                  jax.ShapeDtypeStruct(filter_shape, cfg["dtype"])).shape
    rng = np.random.default_rng(cfg["seed"])
    shapes = (image_shape, filter_shape, hidden_shape, image_shape, filter_shape,
              image_shape + (2,))
    return [rng.standard_normal(s).astype(cfg["dtype"]) for s in shapes]


def check_conv_results(got, want, cfg, tol):
    """Every result of conv_program in the config's dtype, finite, within ``tol`` of the float64
    reference relative to its largest magnitude (each output element sums up to c*fh*fw
    (forward), f*fh*fw (image_acts) or n*Ho*Wo (weight_acts) rounded products)."""
    for name, value in got.items():
        assert value.dtype == cfg["dtype"] and value.shape == want[name].shape, (name, cfg)
        actual = np.asarray(value).astype(np.float64)
        expected = np.asarray(want[name])
        assert np.all(np.isfinite(actual)), (name, cfg)
        err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} in {cfg}"


@pytest.mark.parametrize("index", range(CONFIGS))
def test_conv_family_fuzz(index):
    cfg = conv_config(index, groups=True)
    dtype = cfg["dtype"]
    args = conv_operands(cfg)
    got = jax.jit(conv_program(jcn, cfg)[0])(*args)
    want = jax.jit(conv_program(ref, cfg)[0])(*(a.astype(np.float64) for a in args))
    check_conv_results(got, want, cfg,
                       TOLERANCE[jnp.dtype(dtype).type] * (4 if dtype == jnp.float32 else 1))


# ----------------------------------------------------------------------------- max_pool

def pool_config(index, *, rng=None, sizes=None, dtypes=FUZZ_DTYPES):
    """Configuration ``index`` of max_pool; the keywords as conv_config's (``sizes(rng, layout)``
    -> (n, c, h, w, (smallest, largest) window side))."""
    rng = _rng("pool", index) if rng is None else rng
    layout = str(rng.choice(["C01B", "NHWC"]))
    if sizes is None:
        n, c = (int(rng.integers(1, hi + 1)) for hi in (4, 6))
        h, w = (int(v) for v in rng.integers(1, 14, 2))
        window = (1, 4)
    else:
        n, c, h, w, window = sizes(rng, layout)
    ds = tuple(int(rng.integers(min(window[0], s), min(s, window[1]) + 1)) for s in (h, w))
    kw = dict(layout=layout)
    if rng.random() < 0.5:  # cuda-convnet: 1 <= stride <= ds, 0 <= start, a window in the image
        stride = tuple(int(rng.integers(1, d + 1)) for d in ds)
        start = tuple(int(rng.integers(0, s - d + 1)) for s, d in zip((h, w), ds))
        kw.update(stride=stride, start=start[0] if start[0] == start[1] else start)
    else:
        stride = tuple(int(v) for v in rng.integers(1, 5, 2))
        choice = rng.integers(3)
        kw.update(stride=stride, padding=("SAME", "VALID")[choice] if choice < 2 else
                  tuple(tuple(int(v) for v in rng.integers(0, d, 2)) for d in ds))
    dtype = dtypes[int(rng.integers(len(dtypes)))]
    # Few distinct values: many ties in a window; sometimes NaN and +-inf.
    levels = int(rng.integers(2, 6))
    return dict(n=n, c=c, h=h, w=w, ds=ds[0] if ds[0] == ds[1] else ds, kw=kw, dtype=dtype,
                levels=levels, nan=bool(rng.random() < 0.3), inf=bool(rng.random() < 0.3),
                seed=int(rng.integers(2**31)))


def pool_program(m, cfg):
    def run(x, t, g, xs):
        pool = lambda x: m.max_pool(x, cfg["ds"], **cfg["kw"])
        y, vjp = jax.vjp(pool, x)
        _, ty = jax.jvp(pool, (x,), (t,))
        ys = jax.vmap(pool, in_axes=0, out_axes=0)(xs)
        return dict(y=y, ty=ty, dx=vjp(g)[0], ys=ys)
    return run


def pool_operands(cfg):
    """The NumPy operands of pool_program's function (x, t, g, xs) in the config's dtype: few
    distinct values in x (ties), NaN and +-inf where the config asks."""
    dtype, layout = cfg["dtype"], cfg["kw"]["layout"]
    shape = jcn.geometry.image_shape(layout, cfg["n"], cfg["c"], cfg["h"], cfg["w"])
    rng = np.random.default_rng(cfg["seed"])
    x = rng.integers(0, cfg["levels"], shape).astype(np.float64)
    if cfg["nan"]:
        x.flat[rng.integers(x.size, size=max(1, x.size // 20))] = np.nan
    if cfg["inf"]:
        x.flat[rng.integers(x.size, size=max(1, x.size // 20))] = np.inf
        x.flat[rng.integers(x.size, size=max(1, x.size // 20))] = -np.inf
    out_shape = jax.eval_shape(lambda x: ref.max_pool(x, cfg["ds"], **cfg["kw"]),
                               jax.ShapeDtypeStruct(shape, dtype)).shape
    return [a.astype(dtype) for a in (x, rng.standard_normal(shape),
                                      rng.standard_normal(out_shape),
                                      rng.standard_normal((3, *shape)))]


def check_pool_results(got, want, cfg):
    """pool_program's results against the reference's in the same dtype: the selections (value,
    JVP, vmap) exactly, the gradient to rounding."""
    dtype = cfg["dtype"]
    for name in ("y", "ty", "ys"):  # a selection: exact, NaN where the reference has NaN
        np.testing.assert_array_equal(np.asarray(got[name]).astype(np.float64),
                                      np.asarray(want[name]).astype(np.float64),
                                      err_msg=f"{name} {cfg}")
    # The gradient adds overlapping windows' cotangents (in float32 for 16-bit types).
    actual = np.asarray(got["dx"]).astype(np.float64)
    expected = np.asarray(want["dx"]).astype(np.float64)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), cfg
    scale = max(np.nanmax(np.abs(expected), initial=0.0), 1e-30)
    tol = TOLERANCE[jnp.dtype(dtype).type] * 2
    assert np.nanmax(np.abs(actual - expected), initial=0.0) / scale <= tol, cfg


@pytest.mark.parametrize("index", range(CONFIGS))
def test_max_pool_fuzz(index):
    cfg = pool_config(index)
    args = pool_operands(cfg)
    check_pool_results(jax.jit(pool_program(jcn, cfg))(*args),
                       jax.jit(pool_program(ref, cfg))(*args), cfg)
