"""filter_acts, image_acts and weight_acts against the pure-lax reference, on every platform."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_convnet as jcn
from jax_convnet import reference as ref
from jax_convnet._layers import GPU_LAYERS
from conftest import (DTYPES, LAYOUTS, assert_close, check_all_three, filters, hlo_text,
                      images, rand, run_poisoned)


def conv_case(layout, dtype, n, c, h, w, f, fh, fw, key=0):
    return (images(2 * key, layout, n, c, h, w, dtype),
            filters(2 * key + 1, layout, f, c, fh, fw, dtype))


# ----------------------------------------------------------------------------- pylearn2's cases

@pytest.mark.parametrize("pad,stride,expected_hw", [
    (0, 1, (7, 6)), (1, 1, (9, 8)), (0, 2, (4, 4)), (1, 2, (5, 5)), (2, 3, (5, 4))])
def test_pylearn2_filter_acts_cases(platform, pad, stride, expected_hw):
    # cuda-convnet's test: 3x10x9x5 images (C01B), 16 filters of 3x4x4, ceil-rule output sizes.
    x, w = conv_case("C01B", jnp.float32, n=5, c=3, h=10, w=9, f=16, fh=4, fw=4)
    y = check_all_three(x, w, pad=pad, stride=stride)
    assert y.shape == (16, *expected_hw, 5)
    assert jcn.filter_acts_output_size((10, 9), 4, stride=stride, pad=pad) == expected_hw


@pytest.mark.parametrize("partial_sum", [0, None, 1, 4, 12, "auto"])
def test_pylearn2_weight_acts_partial_sum(platform, partial_sum):
    # 3 channels, 7x9 images, batch 8, 4x4 filters: 4*6 = 24 output positions.
    x = rand(1, (3, 7, 9, 8))
    g = rand(2, (16, 4, 6, 8))
    dw = run_poisoned(lambda x, g: jcn.weight_acts(x, g, (3, 4, 4, 16), partial_sum=partial_sum),
                      x, g)
    assert_close(dw, ref.weight_acts(x, g, (3, 4, 4, 16)))


def test_partial_sum_changes_nothing_but_rounding(platform):
    x, w = conv_case("NHWC", jnp.float32, n=4, c=5, h=9, w=8, f=7, fh=3, fw=2)
    g = rand(3, jcn.filter_acts(x, w, layout="NHWC").shape)
    sums = [jcn.weight_acts(x, g, w.shape, partial_sum=p, layout="NHWC")
            for p in (None, 1, 7, 49, "auto")]
    for s in sums[1:]:
        assert_close(s, sums[0])


# ----------------------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_odd_sizes_every_dtype(platform, layout, dtype):
    # batch 1, 5 channels, 7 filters, rectangular everything, asymmetric explicit padding
    x, w = conv_case(layout, dtype, n=1, c=5, h=7, w=8, f=7, fh=3, fw=2)
    check_all_three(x, w, dtype, stride=(2, 1), padding=((1, 2), (0, 1)), layout=layout)
    check_all_three(x, w, dtype, stride=(1, 3), pad=(2, 1), layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 3))])
def test_xla_padding_convention(platform, layout, padding):
    x, w = conv_case(layout, jnp.float32, n=3, c=4, h=11, w=10, f=6, fh=3, fw=4)
    y = check_all_three(x, w, stride=2, padding=padding, layout=layout)
    lax_out = jax.lax.conv_general_dilated(
        x, w, (2, 2), padding,
        dimension_numbers=("CHWN", "IHWO", "CHWN") if layout == "C01B" else ("NHWC", "HWIO", "NHWC"),
        precision="highest")
    assert_close(y, lax_out)


def test_ceil_rule_reads_zeros_past_the_edge(platform):
    # A 7x8 image, 2x2 filter, stride 2: 4x4 outputs; the last row's filters overhang the image.
    x = rand(0, (1, 7, 8, 1))
    w = jnp.ones((1, 2, 2, 1), jnp.float32)
    y = jcn.filter_acts(x, w, stride=2)
    assert y.shape == (1, 4, 4, 1)
    np.testing.assert_allclose(y[0, 3, :, 0], x[0, 6, 0::2, 0] + x[0, 6, 1::2, 0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_random_configurations(platform, seed):
    rng = np.random.default_rng(seed)
    layout = LAYOUTS[seed % 2]
    fh, fw = rng.integers(1, 6, 2)
    sh, sw = rng.integers(1, 4, 2)
    h, w = fh + rng.integers(0, 9), fw + rng.integers(0, 9)
    n, c, f = rng.integers(1, 7, 3)
    x, wt = conv_case(layout, jnp.float32, int(n), int(c), int(h), int(w), int(f), int(fh),
                      int(fw), key=seed)
    if seed % 3 == 0:
        kw = dict(padding=tuple(tuple(int(v) for v in rng.integers(0, 3, 2)) for _ in range(2)))
    else:
        kw = dict(pad=tuple(int(v) for v in rng.integers(0, 3, 2)))
    check_all_three(x, wt, stride=(int(sh), int(sw)), layout=layout, **kw)


# ----------------------------------------------------------------------------- algebra

@pytest.mark.parametrize("layout", LAYOUTS)
def test_adjointness(platform, layout):
    # <filter_acts(x, w), g> = <x, image_acts(g, w)> = <w, weight_acts(x, g)>
    x, w = conv_case(layout, jnp.float64, n=3, c=4, h=9, w=7, f=5, fh=3, fw=3)
    kw = dict(stride=2, pad=1, layout=layout)
    g = rand(5, jcn.filter_acts(x, w, **kw).shape, jnp.float64)
    a = jnp.vdot(jcn.filter_acts(x, w, **kw), g)
    b = jnp.vdot(x, jcn.image_acts(g, w, x.shape, **kw))
    c = jnp.vdot(w, jcn.weight_acts(x, g, w.shape, **kw))
    np.testing.assert_allclose([b, c], [a, a], rtol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_derivatives_to_second_order(layout):
    x, w = conv_case(layout, jnp.float64, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2)
    kw = dict(stride=(2, 1), pad=1, layout=layout)
    check_grads(lambda x, w: jcn.filter_acts(x, w, **kw), (x, w), order=2, modes=["fwd", "rev"])
    g = rand(3, jcn.filter_acts(x, w, **kw).shape, jnp.float64)
    check_grads(lambda g, w: jcn.image_acts(g, w, x.shape, **kw), (g, w), order=2,
                modes=["fwd", "rev"])
    check_grads(lambda x, g: jcn.weight_acts(x, g, w.shape, partial_sum=2, **kw), (x, g),
                order=2, modes=["fwd", "rev"])


def test_gradients_under_jit_match_reference(platform):
    x, w = conv_case("C01B", jnp.float32, n=4, c=3, h=12, w=12, f=8, fh=5, fw=5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w, stride=2, pad=2)) ** 2)
    ours = jax.jit(jax.grad(loss(jcn.filter_acts), (0, 1)))(x, w)
    theirs = jax.grad(loss(ref.filter_acts), (0, 1))(x, w)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_linear_transpose(platform):
    x, w = conv_case("NHWC", jnp.float32, n=2, c=3, h=6, w=6, f=4, fh=3, fw=3)
    y = jcn.filter_acts(x, w, layout="NHWC")
    (dx,) = jax.linear_transpose(lambda x: jcn.filter_acts(x, w, layout="NHWC"), x)(y)
    assert_close(dx, jcn.image_acts(y, w, x.shape, layout="NHWC"))


# ----------------------------------------------------------------------------- vmap

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mapped", ["first", "second", "both"])
def test_vmap_every_op(platform, layout, mapped):
    x, w = conv_case(layout, jnp.float32, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2)
    kw = dict(stride=2, pad=1, layout=layout)
    g = rand(3, jcn.filter_acts(x, w, **kw).shape)
    ops = [
        (jcn.filter_acts, ref.filter_acts, x, w, {}),
        (jcn.image_acts, ref.image_acts, g, w, dict(image_shape=x.shape)),
        (jcn.weight_acts, ref.weight_acts, x, g, dict(filter_shape=w.shape)),
    ]
    for ours, theirs, a, b, extra in ops:
        stack = lambda v: jnp.stack([v, 1.5 * v + 0.25, -v])
        in_axes = {"first": (0, None), "second": (None, 0), "both": (0, 0)}[mapped]
        a3 = stack(a) if in_axes[0] == 0 else a
        b3 = stack(b) if in_axes[1] == 0 else b
        got = jax.jit(jax.vmap(lambda a, b: ours(a, b, **extra, **kw), in_axes))(a3, b3)
        want = jax.vmap(lambda a, b: theirs(a, b, **extra, **kw), in_axes)(a3, b3)
        assert_close(got, want)


def test_vmap_with_mapped_axis_in_the_middle(platform):
    x, w = conv_case("C01B", jnp.float32, n=2, c=3, h=7, w=6, f=4, fh=3, fw=2)
    xs = jnp.stack([x, -x], axis=2)
    got = jax.vmap(lambda x: jcn.filter_acts(x, w), in_axes=2, out_axes=1)(xs)
    assert_close(got, jnp.stack([ref.filter_acts(x, w), ref.filter_acts(-x, w)], axis=1))


# ----------------------------------------------------------------------------- lowering

@pytest.mark.parametrize("layout", LAYOUTS)
def test_lowers_to_our_custom_calls_only(platform, layout):
    if not jcn.has_native(platform.replace("gpu", "cuda")):
        pytest.fail(f"native {platform} module missing")
    x, w = conv_case(layout, jnp.float32, n=2, c=3, h=8, w=8, f=4, fh=3, fw=3)
    loss = lambda x, w: jnp.sum(jcn.filter_acts(x, w, pad=1, layout=layout) ** 2)
    text = hlo_text(jax.grad(loss, (0, 1)), x, w)
    for target in ("jax_convnet_filter_acts", "jax_convnet_image_acts", "jax_convnet_weight_acts"):
        assert target in text
    assert "convolution" not in text


def cuda_workspace(op, layout, n, c, hw, f, window, *, dtype=jnp.float32, stride=1, pad=0,
                   padding=None, **kw):
    """The CUDA workspace by part that ``jcn.explain`` gives one call of ``op`` (shapes only)."""
    S = jax.ShapeDtypeStruct
    geo = dict(stride=stride, pad=pad, padding=padding)
    out_hw = jcn.filter_acts_output_size(hw, window, **geo)
    x = S(jcn.geometry.image_shape(layout, n, c, *hw), dtype)
    w = S(jcn.geometry.filter_shape(layout, f, c, *window), dtype)
    h = S(jcn.geometry.image_shape(layout, n, f, *out_hw), dtype)
    kw = dict(geo, layout=layout, **kw)
    fn = {"filter_acts": lambda x, w, h: jcn.filter_acts(x, w, **kw),
          "image_acts": lambda x, w, h: jcn.image_acts(h, w, x.shape, **kw),
          "weight_acts": lambda x, w, h: jcn.weight_acts(x, h, w.shape, **kw)}[op]
    (call,) = jcn.explain(fn, x, w, h)
    ws = call["workspace"]  # image_acts' columns and TF32 copies share bytes (one path runs)
    assert call["op"] == op
    assert ws["total"] == (ws["fft"] + max(ws["ia_columns"], ws["tf32_copies"])
                           + ws["wa_partial_sums"] + ws["wa_padded_images"])
    return ws


def test_explain_names_each_conv_call_of_a_training_step():
    """jcn.explain lists every conv custom call of a function, its derivatives included, with
    its tensors and the CUDA workspace (here float32 NHWC AlexNet conv2: the TF32 kernel's copy of
    the taps for filter_acts, the images and hidden tensor as C01B and the partial sums for
    weight_acts, nothing for image_acts, which reads both in place)."""
    S = jax.ShapeDtypeStruct
    x, w = S((128, 27, 27, 64), jnp.float32), S((5, 5, 64, 192), jnp.float32)
    loss = lambda x, w: jnp.sum(jcn.filter_acts(x, w, padding="SAME", layout="NHWC") ** 2)
    calls = jcn.explain(jax.jit(jax.grad(loss, (0, 1))), x, w)
    assert [c["op"] for c in calls] == ["filter_acts", "weight_acts", "image_acts"]
    assert all(c["images"] == x.shape and c["filters"] == w.shape and c["layout"] == "NHWC"
               and c["hidden"] == (128, 27, 27, 192) for c in calls)
    assert [c["paths"] for c in calls] == [["tf32_copies"], ["tf32_copies", "wa_partial_sums"],
                                           []]
    assert [c["route"] for c in calls] == ["tma", "tma_weights_via_c01b_copies", "tma"]


def routes_of(calls):
    return {c["op"]: c["route"] for c in calls}


def test_the_plan_routes_each_call_on_a_described_device():
    """jcn.explain(..., device=) says which route each call of a training step takes on a
    described GPU (csrc/common/conv_plan.h, which the CUDA kernels follow). On an H200: the TMA
    core wherever the channels fill its k-blocks, float32 (TF32) through copies where it cannot
    read in place (C01B filter_acts / image_acts via NHWC, NHWC weight_acts via C01B), the FFT
    path first for image_acts and NHWC weight_acts of 9x9 layers (L2), precision highest on the
    FFT path or the CUDA cores (3xTF32), 3-channel first layers (AlexNet conv1) on the CUDA
    cores. Without Hopper's kernels (an A100, or no TMA encoders), only the FFT path and the CUDA
    cores."""
    S = jax.ShapeDtypeStruct

    def routes(name, layout, dtype=jnp.float32, precision=None, **device):
        n, c, h, w, f, fh, fw, stride, pad = GPU_LAYERS[name]
        x = S(jcn.geometry.image_shape(layout, n, c, h, w), dtype)
        k = S(jcn.geometry.filter_shape(layout, f, c, fh, fw), dtype)
        loss = lambda x, k: jnp.sum(jcn.filter_acts(
            x, k, stride=stride, pad=pad, layout=layout, precision=precision).astype(jnp.float32))
        return routes_of(jcn.explain(jax.grad(loss, (0, 1)), x, k,
                                     device={**jcn.conv.H200, **device}))

    tma_weights = dict(weight_acts="tma_weights")
    assert routes("alex2", "NHWC") == dict(
        filter_acts="tma", weight_acts="tma_weights_via_c01b_copies", image_acts="tma")
    assert routes("alex2", "C01B") == dict(
        filter_acts="tma_via_nhwc_copies", image_acts="tma_via_nhwc_copies", **tma_weights)
    assert routes("alex2", "C01B", jnp.bfloat16) == dict(
        filter_acts="tma", image_acts="tma", **tma_weights)
    assert routes("L2", "NHWC") == dict(filter_acts="tma", weight_acts="fft", image_acts="fft")
    assert routes("L2", "C01B") == dict(
        filter_acts="tma_via_nhwc_copies", image_acts="fft", **tma_weights)
    assert set(routes("L2", "NHWC", precision="highest").values()) == {"fft"}
    assert set(routes("alex2", "NHWC", precision="highest").values()) == {"fft"}
    assert set(routes("L5", "NHWC", precision="highest").values()) == {"cuda_cores"}
    assert set(routes("alex1", "NHWC", jnp.bfloat16).values()) == {"cuda_cores"}
    a100 = dict(cc_major=8, cc_minor=0, sm_count=108, smem_optin=166912)
    assert set(routes("alex2", "C01B", jnp.bfloat16, **a100).values()) == {"cuda_cores"}
    assert set(routes("L2", "NHWC", **a100).values()) == {"fft"}  # TF32 saves 12x there
    assert set(routes("alex3", "NHWC", jnp.bfloat16, tma=False).values()) == {"cuda_cores"}
    # The TMA core's tile width: the fewest rounds of tiles over the SMs (192 of AlexNet conv3's
    # 384 filters on 132 SMs).
    (fa,) = jcn.explain(lambda x, k: jcn.filter_acts(x, k, pad=1, layout="NHWC"),
                        S((128, 13, 13, 256), jnp.bfloat16), S((3, 3, 256, 384), jnp.bfloat16))
    assert (fa["route"], fa["tile_n"]) == ("tma", 192)
    # Narrow convolutions: at least 48 output channels (3/4 of the 64-column tile) on the TMA
    # core, so the per-group image_acts of grouped AlexNet conv2 (48 channels a group) runs there;
    # 32 (the CIFAR-10 net) on the CUDA cores.
    def narrow(c, f):
        return routes_of(jcn.explain(
            jax.grad(lambda x, k: jnp.sum(jcn.filter_acts(x, k, pad=2, layout="NHWC")), (0, 1)),
            S((128, 27, 27, c), jnp.bfloat16), S((5, 5, c, f), jnp.bfloat16), device=jcn.conv.H200))
    assert narrow(128, 48) == dict(filter_acts="tma", weight_acts="tma_weights", image_acts="tma")
    assert narrow(48, 128) == dict(filter_acts="tma", weight_acts="tma_weights", image_acts="tma")
    assert narrow(128, 32)["filter_acts"] == "cuda_cores"
    assert narrow(32, 128)["image_acts"] == "cuda_cores"


def test_3xtf32_on_the_tma_core_where_switched_on(monkeypatch):
    """float32 above default precision on the TMA core as 3xTF32 (JAX_CONVNET_TMA_3XTF32=1, until
    it has run on a GPU): every TF32 route, with the residues of the op's two GEMM operands at
    the workspace's start (filter_acts: images and taps; image_acts: hidden tensor and filters;
    weight_acts: images and hidden tensor), after the FFT path where that applies (L2). Off,
    precision highest runs on the other kernels and takes no TF32 workspace."""
    S = jax.ShapeDtypeStruct

    def step(name, layout):
        n, c, h, w, f, fh, fw, stride, pad = GPU_LAYERS[name]
        x = S(jcn.geometry.image_shape(layout, n, c, h, w), jnp.float32)
        k = S(jcn.geometry.filter_shape(layout, f, c, fh, fw), jnp.float32)
        loss = lambda x, k: jnp.sum(jcn.filter_acts(x, k, stride=stride, pad=pad, layout=layout,
                                                    precision="highest"))
        return {c["op"]: c for c in jcn.explain(jax.grad(loss, (0, 1)), x, k)}

    monkeypatch.delenv("JAX_CONVNET_TMA_3XTF32", raising=False)
    off = step("L5", "NHWC")
    assert {c["route"] for c in off.values()} == {"cuda_cores"}
    assert all(not c["split"] and c["workspace"]["tf32_copies"] == 0 for c in off.values())

    monkeypatch.setenv("JAX_CONVNET_TMA_3XTF32", "1")
    nhwc, c01b = step("L5", "NHWC"), step("L5", "C01B")
    assert {op: c["route"] for op, c in nhwc.items()} == dict(
        filter_acts="tma", weight_acts="tma_weights_via_c01b_copies", image_acts="tma")
    assert {op: c["route"] for op, c in c01b.items()} == dict(
        filter_acts="tma_via_nhwc_copies", weight_acts="tma_weights",
        image_acts="tma_via_nhwc_copies")
    assert all(c["split"] for c in [*nhwc.values(), *c01b.values()])
    n, c, h, w, f, fh, fw, _, _ = GPU_LAYERS["L5"]
    images, hidden = 4 * n * c * h * w, 4 * n * f * (h - fh + 1) * (w - fw + 1)
    taps = 4 * c * f * fh * fw
    assert nhwc["filter_acts"]["workspace"]["tf32_copies"] == images + taps + taps
    assert nhwc["image_acts"]["workspace"]["tf32_copies"] == hidden + taps
    assert c01b["weight_acts"]["workspace"]["tf32_copies"] == images + hidden
    assert nhwc["weight_acts"]["workspace"]["tf32_copies"] == 2 * (images + hidden)
    assert {c["route"] for c in step("L2", "NHWC").values()} == {"fft"}


def test_image_acts_column_buffer_holds_whole_images(monkeypatch):
    """On the GPU, image_acts into <= 4 channels with >= 64 (channel, tap) rows gets a float32
    column buffer (its custom call's workspace) of whole images, as many as the cap holds."""
    monkeypatch.setattr(jcn.conv, "IMAGE_ACTS_COLUMN_CAP_BYTES", 128 << 20)
    alex1 = 4 * 3 * 11 * 11 * 55 * 55  # bytes of one AlexNet conv1 image's columns

    def columns(n, c, window, hw=(227, 227), stride=4):
        return cuda_workspace("image_acts", "NHWC", n, c, hw, 96, window,
                              stride=stride)["ia_columns"]

    assert columns(128, 3, (11, 11)) == 30 * alex1
    assert columns(4, 3, (11, 11)) == 4 * alex1  # the whole batch fits
    assert columns(128, 5, (11, 11)) == 0  # too many channels
    assert columns(128, 3, (4, 5)) == 0  # 60 rows: the direct kernel
    assert columns(128, 1, (8, 8), hw=(17, 17), stride=1) == 128 * 4 * 64 * 100
    monkeypatch.setattr(jcn.conv, "IMAGE_ACTS_COLUMN_CAP_BYTES", alex1 - 1)
    assert columns(128, 3, (11, 11)) == 0  # not one image: no buffer


def test_weight_acts_workspace_holds_padded_few_channel_images(monkeypatch):
    """On the GPU, weight_acts' workspace holds its partial sums (at least 16 MiB, or one float32
    copy of the filters, plus a float32 running sum; 256-byte multiples) and, for NHWC images of
    fewer than 4 channels, a copy padded to 4 channels, where the cap allows."""
    sums = (16 << 20) + 139520  # L1's filters 96 x 3 x 11 x 11: 4 * 34848 bytes, rounded up
    padded = 128 * 128 * 128 * 4 * 2  # bfloat16

    def workspace(layout, channels, **kw):
        w = cuda_workspace("weight_acts", layout, 128, channels, (128, 128), 96, (11, 11),
                           dtype=jnp.bfloat16, **kw)
        return w["wa_partial_sums"], w["wa_padded_images"]

    assert workspace("NHWC", 3) == (sums, padded)
    assert workspace("C01B", 3) == (sums, 0)  # read in place
    assert workspace("NHWC", 4) == ((16 << 20) + 4 * 96 * 484, 0)
    big = 4 * 5_000_000  # filters larger than 16 MiB: one copy of them
    w = cuda_workspace("weight_acts", "NHWC", 3, 1, (5, 7), 200_000, (5, 5))
    assert (w["wa_partial_sums"], w["wa_padded_images"]) == (2 * big, 1792)  # 3*5*7*16, rounded
    monkeypatch.setattr(jcn.conv, "WEIGHT_ACTS_PADDED_IMAGE_CAP_BYTES", padded - 1)
    assert workspace("NHWC", 3) == (sums, 0)  # over the cap: not padded


def test_tf32_kernel_copies_lead_the_float32_workspace():
    """On Hopper, float32 at default precision runs on the TF32 kernel, which reads both operands
    k-contiguous: the copies that gives it (256-byte multiples) where the shapes are ones it
    reads, and none elsewhere (nor at precision highest, nor in 16-bit types)."""
    alex2 = dict(n=128, c=64, hw=(27, 27), f=192, window=(5, 5), pad=2)
    images, hidden, taps = 4 * 128 * 27 * 27 * 64, 4 * 128 * 27 * 27 * 192, 4 * 64 * 192 * 25

    def copies(op, layout, **kw):
        return cuda_workspace(op, layout, **{**alex2, **kw})["tf32_copies"]

    assert copies("filter_acts", "NHWC") == taps  # (fh, fw, F, C)
    assert copies("filter_acts", "C01B") == images + hidden + taps  # as NHWC
    assert copies("image_acts", "C01B") == images + hidden
    assert copies("image_acts", "NHWC") == 0  # read in place
    assert copies("weight_acts", "NHWC") == images + hidden  # as C01B
    assert copies("weight_acts", "C01B") == 0
    assert copies("image_acts", "C01B", stride=2) == 0
    assert copies("filter_acts", "C01B", c=3) == 0  # RGB
    assert copies("filter_acts", "C01B", f=32) == 0
    assert copies("weight_acts", "NHWC", n=32) == 0  # C01B runs of 64
    assert copies("filter_acts", "NHWC", c=3) == 0
    assert copies("filter_acts", "NHWC", precision="highest") == 0
    assert copies("filter_acts", "NHWC", dtype=jnp.bfloat16) == 0


def test_fft_path_takes_stride_one_layers_with_large_filters(monkeypatch):
    """On the GPU, stride-1 convolutions take the FFT path where the direct GEMM needs enough
    times the complex GEMM's multiply-adds for the dtype and precision (3x at float32 accuracy,
    12x for TF32, 40x for 16-bit types) and the padded image fits a 64 x 64 transform; the
    workspace holds the images', filters' and hidden tensor's spectra. Baseline layers at batch
    128: at float32 accuracy L2 / L3 (9x9), L4 (7x7) and AlexNet conv2 (5x5), for TF32 L2 / L3,
    in 16-bit types none; never L5 / conv3 (3x3), L1 (128 x 128 images) or conv1 (stride 4)."""
    def spectra(name, dtype=jnp.float32, precision="highest", op="filter_acts", **kw):
        n, c, h, w, f, fh, fw, stride, pad = GPU_LAYERS[name]
        return cuda_workspace(op, "NHWC", n, c, (h, w), f, (fh, fw), stride=stride, pad=pad,
                              dtype=dtype, precision=precision, **kw)["fft"]

    def taken(dtype, precision):
        return sorted(name for name in GPU_LAYERS if spectra(name, dtype, precision) > 0)

    def expected(name, ph, pw):
        n, c, _, _, f = GPU_LAYERS[name][:5]
        return sum(-(-planes * ph * (pw // 2 + 1) * 8 // 256) * 256
                   for planes in (n * c, c * f, n * f))

    assert taken(jnp.float32, "highest") == taken(jnp.float32, "high") == \
        ["L2", "L3", "L4", "alex2"]
    assert taken(jnp.float32, "default") == ["L2", "L3"]
    assert taken(jnp.bfloat16, "default") == []
    l2_spectra = (128 * 64 + 64 * 128 + 128 * 128) * 64 * 33 * 8
    assert spectra("L2") == expected("L2", 64, 64) == l2_spectra
    assert spectra("L3") == expected("L3", 32, 32) and spectra("L4") == expected("L4", 16, 16)
    assert spectra("alex2") == expected("alex2", 32, 32)  # 27 + 2 * 2 padded: 31
    assert spectra("L2", op="weight_acts", partial_sum=8) == 0  # partial sums asked for
    assert spectra("L2", op="weight_acts") == l2_spectra
    monkeypatch.setattr(jcn.conv, "FFT_WORKSPACE_CAP_BYTES", l2_spectra - 1)
    assert spectra("L2") == 0
    monkeypatch.setattr(jcn.conv, "FFT_WORKSPACE_CAP_BYTES", 0)
    assert spectra("L2") == 0


def test_eager_calls_and_dtype_preserved(platform):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x, w = conv_case("C01B", dtype, n=2, c=3, h=5, w=5, f=2, fh=2, fw=2)
        y = jcn.filter_acts(x, w)
        assert y.dtype == dtype and y.shape == (2, 4, 4, 2)


def test_precision_highest_gives_float32_accuracy(platform):
    x, w = conv_case("NHWC", jnp.float32, n=8, c=64, h=12, w=12, f=32, fh=3, fw=3)
    exact = ref.filter_acts(x.astype(jnp.float64), w.astype(jnp.float64), layout="NHWC")
    y = jcn.filter_acts(x, w, layout="NHWC", precision="highest")
    assert_close(y, exact, jnp.float32)
    with jax.default_matmul_precision("float32"):
        assert_close(jcn.filter_acts(x, w, layout="NHWC"), exact, jnp.float32)
