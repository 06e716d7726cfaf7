"""Grouped convolutions (``groups=G``, cuda-convnet's numGroups, XLA's feature_group_count):
filters of C // G channels, output channel f reading the channels of group f // (F // G).
The three ops, their derivatives and vmap against the pure-lax reference (lax's
feature_group_count), the bad-argument errors, the GPU's per-group lowering, and the Flax Conv's
feature_group_count against flax's."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_convnet as jcn
from jax_convnet import _native, conv
from jax_convnet import geometry as G
from jax_convnet import reference as ref
from conftest import LAYOUTS, assert_close, check_all_three, cpu, rand

# (n, c, h, w, f, fh, fw, groups, conv kwargs): two and three groups, one channel per group
# (depthwise with a multiplier of 2), strides > 1, both padding conventions, rectangles.
CASES = {
    "g2_pad": (3, 6, 7, 8, 4, 3, 2, 2, dict(pad=1)),
    "g3_stride2_padding": (2, 6, 9, 7, 9, 3, 3, 3, dict(stride=2, padding=((1, 0), (2, 1)))),
    "depthwise": (4, 4, 6, 5, 8, 3, 3, 4, dict(stride=(1, 2), padding="SAME")),
    "depthwise_x1": (3, 5, 6, 7, 5, 3, 2, 5, dict(stride=2, pad=1)),
    "g3_ceil_rule": (5, 9, 8, 7, 6, 2, 3, 3, dict(stride=3, pad=(0, 1))),
}


def operands(layout, dtype, n, c, h, w, f, fh, fw, groups, seed=0):
    return (rand(seed, G.image_shape(layout, n, c, h, w), dtype),
            rand(seed + 1, G.filter_shape(layout, f, c // groups, fh, fw), dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_three_ops_match_the_reference(platform, layout, case):
    *shape, kw = CASES[case]
    x, k = operands(layout, jnp.float32, *shape)
    y = check_all_three(x, k, groups=shape[-1], layout=layout, **kw)
    assert y.shape[G.image_axes(layout)["c"]] == shape[4]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16, jnp.float16],
                         ids=lambda d: jnp.dtype(d).name)
def test_dtypes(platform, layout, dtype):
    if platform == "gpu" and dtype == jnp.float64:
        pytest.skip("float64 runs the reference on the GPU")
    *shape, kw = CASES["g3_stride2_padding"]
    x, k = operands(layout, dtype, *shape)
    check_all_three(x, k, dtype, groups=shape[-1], layout=layout, **kw)


def test_each_group_reads_only_its_channels():
    """Output channel f depends on input channels [g*C/G, (g+1)*C/G) only, g = f // (F/G):
    the grouped result is the concatenation of ungrouped convolutions of the slices."""
    x, k = operands("NHWC", jnp.float64, 2, 6, 5, 5, 9, 3, 3, 3)
    y = jcn.filter_acts(x, k, layout="NHWC", groups=3, pad=1)
    parts = [jcn.filter_acts(x[..., 2 * g:2 * g + 2], k[..., 3 * g:3 * g + 3], layout="NHWC",
                             pad=1) for g in range(3)]
    np.testing.assert_allclose(y, jnp.concatenate(parts, axis=-1), rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["g2_pad", "depthwise_x1"])
def test_weight_acts_partial_sums_and_determinism(layout, case):
    *shape, kw = CASES[case]
    groups = shape[-1]
    x, k = operands(layout, jnp.float32, *shape)
    g = rand(3, jcn.filter_acts(x, k, groups=groups, layout=layout, **kw).shape)
    want = ref.weight_acts(x, g, k.shape, groups=groups, layout=layout, **kw)
    positions = g.shape[G.image_axes(layout)["h"]] * g.shape[G.image_axes(layout)["w"]]
    divisor = next(p for p in range(2, positions + 1) if positions % p == 0)
    for ps in (None, 1, divisor, "auto"):
        dk = jcn.weight_acts(x, g, k.shape, partial_sum=ps, groups=groups, layout=layout, **kw)
        assert_close(dk, want)
        again = jcn.weight_acts(x, g, k.shape, partial_sum=ps, groups=groups, layout=layout,
                                **kw)
        assert np.array_equal(np.asarray(dk), np.asarray(again))


# ----------------------------------------------------------------------------- derivatives

@pytest.mark.parametrize("layout,case", [("C01B", "g3_stride2_padding"), ("NHWC", "depthwise")])
def test_derivatives_to_second_order(layout, case):
    """JVP and VJP against finite differences (float64; filter_acts to second order, whose
    derivatives are the other two ops), and the gradients of a loss with a second-order term
    against the reference's."""
    n, c, h, w, f, fh, fw, groups, kw = CASES[case]
    x, k = operands(layout, jnp.float64, n, c, h, w, f, fh, fw, groups)
    kw = dict(kw, groups=groups, layout=layout)
    check_grads(lambda x, k: jcn.filter_acts(x, k, **kw), (x, k), order=2, modes=("fwd", "rev"))
    y = jcn.filter_acts(x, k, **kw)
    g = rand(5, y.shape, jnp.float64)
    check_grads(lambda g, k: jcn.image_acts(g, k, x.shape, **kw), (g, k), order=1,
                modes=("fwd", "rev"))
    check_grads(lambda x, g: jcn.weight_acts(x, g, k.shape, **kw), (x, g), order=1,
                modes=("fwd", "rev"))

    def loss(mod):
        def f(x, k):
            y = mod.filter_acts(x, k, **kw)
            dk = jax.grad(lambda k: jnp.sum(jnp.tanh(mod.filter_acts(x, k, **kw))))(k)
            return jnp.sum(y ** 2) + jnp.sum(dk * k)
        return f
    for ours, want in zip(jax.grad(loss(jcn), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
        assert_close(ours, want)


# ----------------------------------------------------------------------------- vmap

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mapped", ["first", "second", "both"])
def test_vmap(layout, mapped):
    """Mapped images, hidden tensors or filters fold into the batch or into the grouped axes
    (each group's slices kept together); both mapped runs one call per slice."""
    n, c, h, w, f, fh, fw, groups, kw = CASES["g3_stride2_padding"]
    kw = dict(kw, groups=groups, layout=layout)
    x, k = operands(layout, jnp.float32, n, c, h, w, f, fh, fw, groups)
    hid = jcn.filter_acts(x, k, **kw)
    m = 2
    xs, ks, hs = (jnp.stack([rand(10 + i, a.shape) for i in range(m)], axis=1)
                  for a in (x, k, hid))  # mapped along axis 1
    in_axes = {"first": (1, None), "second": (None, 1), "both": (1, 1)}[mapped]

    def pick(a, stacked, axis):
        return a if axis is None else stacked
    ops = [
        (lambda a, b, mod: mod.filter_acts(a, b, **kw), (x, xs), (k, ks)),
        (lambda a, b, mod: mod.image_acts(a, b, x.shape, **kw), (hid, hs), (k, ks)),
        (lambda a, b, mod: mod.weight_acts(a, b, k.shape, **kw), (x, xs), (hid, hs)),
    ]
    for op, (a, a_s), (b, b_s) in ops:
        args = (pick(a, a_s, in_axes[0]), pick(b, b_s, in_axes[1]))
        ours = jax.vmap(lambda a, b: op(a, b, jcn), in_axes=in_axes, out_axes=2)(*args)
        want = jax.vmap(lambda a, b: op(a, b, ref), in_axes=in_axes, out_axes=2)(*args)
        assert_close(ours, want)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("groups,error,match", [
    (0, ValueError, r"groups must be in \[1"), (-2, ValueError, "groups must be in"),
    (True, TypeError, "groups must be a positive int"),
    (2.0, TypeError, "groups must be a positive int"),
    ("2", TypeError, "groups must be a positive int"),
    (4, ValueError, r"groups=4 must divide the images' channel count C=6"),
])
def test_bad_groups(groups, error, match):
    x, k = operands("C01B", jnp.float32, 2, 6, 5, 5, 4, 3, 3, 2)
    g = jcn.filter_acts(x, k, groups=2)
    with pytest.raises(error, match=match):
        jcn.filter_acts(x, k, groups=groups)
    with pytest.raises(error, match=match):
        jcn.weight_acts(x, g, k.shape, groups=groups)


def test_inconsistent_shapes_name_groups():
    x, k = operands("NHWC", jnp.float32, 2, 6, 5, 5, 6, 3, 3, 2)  # filters of 3 channels
    with pytest.raises(ValueError, match=r"filters have 3 input channels.*groups=3 need "
                                         r"C // groups = 2"):
        jcn.filter_acts(x, k, groups=3, layout="NHWC")
    with pytest.raises(ValueError, match="filters have 3 input channels but images have 6"):
        jcn.filter_acts(x, k, layout="NHWC")  # groups=1: as before
    k5 = rand(1, (3, 3, 3, 5))  # 5 filters: not a multiple of 2 groups
    with pytest.raises(ValueError, match=r"groups=2 must divide the filter count F=5"):
        jcn.filter_acts(x, k5, groups=2, layout="NHWC")
    g = jcn.filter_acts(x, k, groups=2, layout="NHWC")
    with pytest.raises(ValueError, match=r"groups=4 must divide the filter count F=6"):
        jcn.image_acts(g, rand(2, (3, 3, 1, 6)), x.shape, groups=4, layout="NHWC")
    with pytest.raises(ValueError, match=r"image_shape .* must have batch 2 and 6 channels"):
        jcn.image_acts(g, k, (2, 5, 5, 3), groups=2, layout="NHWC")
    with pytest.raises(ValueError, match=r"filter_shape .* must have 3 channels \(C // groups, "
                                         r"groups=2\)"):
        jcn.weight_acts(x, g, (3, 3, 6, 6), groups=2, layout="NHWC")
    with pytest.raises(ValueError, match=r"groups=4 must divide the filter count F=6"):
        jcn.weight_acts(rand(3, (2, 5, 5, 8)), g, (3, 3), groups=4, layout="NHWC")


def test_cpu_handler_rejects_inconsistent_groups():
    """The C++ CPU handler re-checks the groups attribute against the buffers (the CUDA handlers
    take no groups attribute: the GPU runs grouped convolutions as ungrouped calls)."""
    x, k = jax.device_put(operands("C01B", jnp.float32, 2, 6, 5, 5, 4, 3, 3, 2), cpu())
    geom = G.filter_acts_geometry(x, k, stride=1, pad=0, padding=None, partial_sum=None,
                                  layout="C01B", precision=None, groups=2)
    bad = jax.ffi.ffi_call("jax_convnet_filter_acts",
                           jax.ShapeDtypeStruct((4, 3, 3, 2), jnp.float32))
    attrs = dict(geom.ffi_attrs(), groups=np.int64(3))
    with pytest.raises(Exception, match="groups"):
        jax.block_until_ready(jax.jit(lambda x, k: bad(x, k, **attrs))(x, k))


# ----------------------------------------------------------------------------- lowering

def test_groups_attribute_only_where_grouped():
    """Ungrouped calls keep today's attributes; grouped CPU calls pass ``groups`` (the operands
    on the CPU: a GPU lowers grouped calls as ungrouped ones)."""
    x, k, k6 = jax.device_put(
        (*operands("C01B", jnp.float32, 2, 6, 5, 5, 4, 3, 3, 2), rand(2, (6, 3, 3, 4))), cpu())
    plain = jax.jit(lambda x, k: jcn.filter_acts(x, k)).lower(x, k6).as_text()
    assert "groups" not in plain
    assert plain == jax.jit(lambda x, k: jcn.filter_acts(x, k, groups=1)).lower(x, k6).as_text()
    grouped = jax.jit(lambda x, k: jcn.filter_acts(x, k, groups=2)).lower(x, k).as_text()
    assert "groups = 2" in grouped


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_per_group_decomposition_computes_the_op(layout):
    """The GPU's lowering of groups > 1 (ungrouped calls on each group's slices, concatenated),
    run here with the CPU kernels as the ungrouped call: it equals the grouped op."""
    n, c, h, w, f, fh, fw, groups, kw = CASES["g3_stride2_padding"]
    x, k = operands(layout, jnp.float32, n, c, h, w, f, fh, fw, groups)
    geom = G.filter_acts_geometry(x, k, stride=kw["stride"], pad=0, padding=kw["padding"],
                                  partial_sum=None, layout=layout, precision=None, groups=groups)
    hid = jcn.filter_acts(x, k, groups=groups, layout=layout, **kw)
    image_hw = G.image_axes(layout)
    image_hw = (x.shape[image_hw["h"]], x.shape[image_hw["w"]])
    fax = G.filter_axes(layout)
    filter_hw = (k.shape[fax["h"]], k.shape[fax["w"]])
    for p, a, b, params in [(conv.filter_acts_p, x, k, {}),
                            (conv.image_acts_p, hid, k, dict(image_hw=image_hw)),
                            (conv.weight_acts_p, x, hid, dict(filter_hw=filter_hw))]:
        split = conv._gpu_per_group_calls(p)
        assert split(p.bind, geom=G.ConvGeometry(layout, (1, 1), ((0, 0), (0, 0)), 0,
                                                  "default"), **params) is None
        ours = jax.jit(split(p.bind, geom=geom, **params))(a, b)
        assert_close(ours, p.bind(a, b, geom=geom, **params))


def test_gpu_lowering_is_one_call_per_group(monkeypatch):
    """Exported for CUDA (its module pretended present: nothing runs), a grouped training step
    has G ungrouped custom calls per op, none with a groups attribute; G = 1 one call per op."""
    monkeypatch.setitem(_native._LOADED, "cuda", (object(), None))
    x = jax.ShapeDtypeStruct((4, 5, 5, 2), jnp.float32)
    k = jax.ShapeDtypeStruct((4, 3, 3, 6), jnp.float32)
    for groups in (1, 2):
        def loss(x, k):
            return jnp.sum(jcn.filter_acts(x, k[:4 // groups], groups=groups) ** 2)
        exported = jax.export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=["cuda"],
                                     disabled_checks=jcn.export_safety_checks())(x, k)
        text = exported.mlir_module()
        calls = re.findall(r"custom_call @(jax_convnet_\w+)\(.*mhlo.backend_config = \{([^}]*)\}",
                           text)
        assert sorted(name for name, _ in calls) == sorted(
            ["jax_convnet_filter_acts", "jax_convnet_image_acts",
             "jax_convnet_weight_acts"] * groups)
        assert not any("groups" in attrs for _, attrs in calls)


# ----------------------------------------------------------------------------- flax

flax = pytest.importorskip("flax")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [2, 6])
def test_flax_conv_feature_group_count(layout, groups):
    """linen and nnx Conv with feature_group_count equal flax.linen.Conv given the same kernel
    ((fh, fw, C // G, F); in C01B the kernel transposed to (C // G, fh, fw, F)), outputs and
    gradients."""
    import flax.linen as nn
    from flax import nnx
    from jax_convnet.flax import linen as cl
    from jax_convnet.flax import nnx as cn
    x = rand(0, (2, 7, 6, 6))
    module = nn.Conv(12, (3, 2), strides=2, padding="SAME", feature_group_count=groups,
                     precision="highest")
    params = module.init(jax.random.key(0), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    assert kernel.shape == (3, 2, 6 // groups, 12)
    want, want_grad = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(module.apply(p, x))))(params)

    to_layout = (lambda a: a) if layout == "NHWC" else (lambda a: jnp.transpose(a, (3, 1, 2, 0)))
    ours = cl.Conv(12, (3, 2), strides=2, padding="SAME", feature_group_count=groups,
                   precision="highest", layout=layout)
    ours_params = ours.init(jax.random.key(0), to_layout(x))
    ours_kernel = ours_params["params"]["kernel"]
    # The same draw as flax's (same fans), in the layout's order.
    assert_close(ours_kernel, kernel if layout == "NHWC" else jnp.transpose(kernel, (2, 0, 1, 3)))
    got, got_grad = jax.value_and_grad(
        lambda p: jnp.sum(jnp.sin(ours.apply(p, to_layout(x)))))(ours_params)
    assert_close(got, want)
    grad_kernel = got_grad["params"]["kernel"]
    assert_close(grad_kernel if layout == "NHWC" else jnp.transpose(grad_kernel, (1, 2, 0, 3)),
                 want_grad["params"]["kernel"])

    conv_nnx = cn.Conv(6, 12, (3, 2), strides=2, padding="SAME", feature_group_count=groups,
                       precision="highest", layout=layout, rngs=nnx.Rngs(0))
    assert conv_nnx.kernel[...].shape == ours_kernel.shape
    conv_nnx.kernel[...], conv_nnx.bias[...] = ours_kernel, bias
    assert_close(to_layout(conv_nnx(to_layout(x))), module.apply(params, x))


def test_flax_conv_bad_feature_group_count():
    from flax import nnx
    from jax_convnet.flax import linen as cl
    from jax_convnet.flax import nnx as cn
    x = rand(0, (2, 5, 5, 6))
    with pytest.raises(ValueError, match="feature_group_count=4 must divide in_features=6"):
        cl.Conv(8, (3, 3), feature_group_count=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_group_count=3 must divide features=8"):
        cl.Conv(8, (3, 3), feature_group_count=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_group_count must be a positive int"):
        cl.Conv(8, (3, 3), feature_group_count=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_group_count=4 must divide in_features=6"):
        cn.Conv(6, 8, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0))


def test_explain_gives_the_workspace_of_each_per_group_call():
    """jcn.explain of a grouped training step: each call with its grouped shapes and groups,
    and the workspace of one of the ungrouped calls it runs as on the GPU (that of the same op
    on one group's slices)."""
    S = jax.ShapeDtypeStruct
    x, w = S((128, 13, 13, 384), jnp.float32), S((3, 3, 192, 256), jnp.float32)
    loss = lambda x, w: jnp.sum(jcn.filter_acts(x, w, pad=1, layout="NHWC", groups=2) ** 2)
    calls = jcn.explain(jax.jit(jax.grad(loss, (0, 1))), x, w)
    assert [c["op"] for c in calls] == ["filter_acts", "weight_acts", "image_acts"]
    assert all(c["groups"] == 2 and c["images"] == x.shape and c["filters"] == w.shape
               and c["hidden"] == (128, 13, 13, 256) for c in calls)
    xg, hg = S((128, 13, 13, 192), jnp.float32), S((128, 13, 13, 128), jnp.float32)
    wg = S((3, 3, 192, 128), jnp.float32)
    one = lambda x, w: jnp.sum(jcn.filter_acts(x, w, pad=1, layout="NHWC") ** 2)
    ungrouped = jcn.explain(jax.jit(jax.grad(one, (0, 1))), xg, wg)
    assert [(c["workspace"], c["route"], c["tile_n"]) for c in calls] == \
        [(c["workspace"], c["route"], c["tile_n"]) for c in ungrouped]
    assert all(c["hidden"] == hg.shape and c["groups"] == 1 for c in ungrouped)
