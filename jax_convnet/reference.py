"""Every jax_convnet op in pure ``jax.lax``: the test oracle and the fallback lowering.

The public functions take the same arguments as ``jax_convnet``'s; the ``*_canonical``
functions take the canonical geometry (what the primitives carry) and are what the fallback
lowering uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import geometry as G

_DIMENSION_NUMBERS = {"C01B": ("CHWN", "IHWO", "CHWN"), "NHWC": ("NHWC", "HWIO", "NHWC")}
# "high" promises float32 accuracy, which only HIGHEST guarantees in XLA.
_LAX_PRECISION = {"default": lax.Precision.DEFAULT, "high": lax.Precision.HIGHEST,
                  "highest": lax.Precision.HIGHEST}


# ----------------------------------------------------------------------------- canonical

def filter_acts_canonical(images, filters, *, geom: G.ConvGeometry):
    accumulate = jnp.float64 if images.dtype == jnp.float64 else jnp.float32
    out = lax.conv_general_dilated(
        images, filters, geom.strides, geom.padding,
        dimension_numbers=_DIMENSION_NUMBERS[geom.layout], feature_group_count=geom.groups,
        precision=_LAX_PRECISION[geom.precision], preferred_element_type=accumulate)
    return out.astype(images.dtype)


def image_acts_canonical(hid_acts, filters, *, geom: G.ConvGeometry, image_hw):
    n = hid_acts.shape[G.image_axes(geom.layout)["n"]]
    c = filters.shape[G.filter_axes(geom.layout)["c"]] * geom.groups
    images = jax.ShapeDtypeStruct(G.image_shape(geom.layout, n, c, *image_hw), hid_acts.dtype)
    forward = lambda x: filter_acts_canonical(x, filters, geom=geom)
    return jax.linear_transpose(forward, images)(hid_acts)[0]


def weight_acts_canonical(images, hid_grads, *, geom: G.ConvGeometry, filter_hw):
    c = images.shape[G.image_axes(geom.layout)["c"]] // geom.groups
    f = hid_grads.shape[G.image_axes(geom.layout)["c"]]
    filters = jax.ShapeDtypeStruct(G.filter_shape(geom.layout, f, c, *filter_hw), images.dtype)
    forward = lambda w: filter_acts_canonical(images, w, geom=geom)
    return jax.linear_transpose(forward, filters)(hid_grads)[0]


def _local_patches(images, geom: G.ConvGeometry, filter_hw, out_hw):
    """Every output position's patch, (B, Ho, Wo, fh, fw, C), zeros where it reads padding."""
    x = jnp.transpose(images, (3, 1, 2, 0)) if geom.layout == "C01B" else images
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*geom.padding[0], 0),
                                             (*geom.padding[1], 0), (0, 0, 0)))
    sh, sw = geom.strides
    taps = [[lax.slice(x, (0, i, j, 0),
                       (x.shape[0], i + (out_hw[0] - 1) * sh + 1, j + (out_hw[1] - 1) * sw + 1,
                        x.shape[3]), (1, sh, sw, 1))
             for j in range(filter_hw[1])] for i in range(filter_hw[0])]
    return jnp.stack([jnp.stack(row, axis=3) for row in taps], axis=3)


def local_filter_acts_canonical(images, filters, *, geom: G.ConvGeometry):
    """out[b, y, x, f] = sum over (i, j, c) of patch[b, y, x, i, j, c] * filters[y, x, ..., f]."""
    accumulate = jnp.float64 if images.dtype == jnp.float64 else jnp.float32
    fax = G.local_filter_axes(geom.layout)
    out_hw = filters.shape[fax["oh"]], filters.shape[fax["ow"]]
    filter_hw = filters.shape[fax["h"]], filters.shape[fax["w"]]
    patches = _local_patches(images, geom, filter_hw, out_hw)
    w = jnp.transpose(filters, (0, 1, 3, 4, 2, 5)) if geom.layout == "C01B" else filters
    out = jnp.einsum("byxijc,yxijcf->byxf", patches, w,
                     precision=_LAX_PRECISION[geom.precision], preferred_element_type=accumulate)
    out = out.astype(images.dtype)
    return jnp.transpose(out, (3, 1, 2, 0)) if geom.layout == "C01B" else out


def local_image_acts_canonical(hid_acts, filters, *, geom: G.ConvGeometry, image_hw):
    n = hid_acts.shape[G.image_axes(geom.layout)["n"]]
    c = filters.shape[G.local_filter_axes(geom.layout)["c"]]
    images = jax.ShapeDtypeStruct(G.image_shape(geom.layout, n, c, *image_hw), hid_acts.dtype)
    forward = lambda x: local_filter_acts_canonical(x, filters, geom=geom)
    return jax.linear_transpose(forward, images)(hid_acts)[0]


def local_weight_acts_canonical(images, hid_grads, *, geom: G.ConvGeometry, filter_hw):
    ax = G.image_axes(geom.layout)
    c, f = images.shape[ax["c"]], hid_grads.shape[ax["c"]]
    out_hw = hid_grads.shape[ax["h"]], hid_grads.shape[ax["w"]]
    filters = jax.ShapeDtypeStruct(G.local_filter_shape(geom.layout, out_hw, f, c, *filter_hw),
                                   images.dtype)
    forward = lambda w: local_filter_acts_canonical(images, w, geom=geom)
    return jax.linear_transpose(forward, filters)(hid_grads)[0]


def _window_elements(x, geom: G.PoolGeometry, fill):
    """Stack of every window's elements in row-major window order: (wh*ww, *pooled_shape)."""
    ax = G.image_axes(geom.layout)
    image_hw = (x.shape[ax["h"]], x.shape[ax["w"]])
    out_hw = geom.output_hw(image_hw)
    config = [(0, 0, 0)] * 4
    config[ax["h"]] = (*geom.padding[0], 0)
    config[ax["w"]] = (*geom.padding[1], 0)
    padded = lax.pad(x, jnp.asarray(fill, x.dtype), config)
    parts = []
    for i in range(geom.window[0]):
        for j in range(geom.window[1]):
            start = [0] * 4
            start[ax["h"]], start[ax["w"]] = i, j
            limit = list(padded.shape)
            limit[ax["h"]] = i + (out_hw[0] - 1) * geom.strides[0] + 1
            limit[ax["w"]] = j + (out_hw[1] - 1) * geom.strides[1] + 1
            strides = [1] * 4
            strides[ax["h"]], strides[ax["w"]] = geom.strides
            parts.append(lax.slice(padded, start, limit, strides))
    return jnp.stack(parts)


def _selected(images, geom: G.PoolGeometry):
    """Index (into the window stack) of each window's selected element: the first NaN if there is
    one, otherwise the first maximal element; 0 (a padding slot) for an empty window."""
    values = _window_elements(images, geom, -jnp.inf)
    inside = _window_elements(jnp.ones(images.shape, jnp.bool_), geom, False)
    is_nan = inside & jnp.isnan(values)
    ordinary = inside & ~jnp.isnan(values)
    top = jnp.max(jnp.where(ordinary, values, -jnp.inf), axis=0)
    first_max = jnp.argmax((ordinary & (values == top)).astype(jnp.int8), axis=0)
    first_nan = jnp.argmax(is_nan.astype(jnp.int8), axis=0)
    return values, jnp.where(jnp.any(is_nan, axis=0), first_nan, first_max)


def max_pool_canonical(images, *, geom: G.PoolGeometry):
    values, index = _selected(images, geom)
    return jnp.take_along_axis(values, index[None], axis=0)[0]


def max_pool_winners_canonical(images, *, geom: G.PoolGeometry):
    """(pooled, winners): each window's selected element as its row-major offset in the whole
    window, ``i * window_w + j``, in ``geom.winner_dtype()`` (0 for an empty window)."""
    values, index = _selected(images, geom)
    pooled = jnp.take_along_axis(values, index[None], axis=0)[0]
    return pooled, index.astype(geom.winner_dtype())


def max_pool_jvp_canonical(tangents, winners, *, geom: G.PoolGeometry):
    """The tangent at each window's winner (0 for an empty window: its winner is padding)."""
    index = winners.astype(jnp.int32)[None]
    return jnp.take_along_axis(_window_elements(tangents, geom, 0), index, axis=0)[0]


def max_pool_grad_canonical(cotangents, winners, *, geom: G.PoolGeometry, image_hw):
    ax = G.image_axes(geom.layout)
    shape = G.image_shape(geom.layout, cotangents.shape[ax["n"]], cotangents.shape[ax["c"]],
                          *image_hw)
    jvp = lambda t: max_pool_jvp_canonical(t, winners, geom=geom)
    return jax.linear_transpose(jvp, jax.ShapeDtypeStruct(shape, cotangents.dtype))(cotangents)[0]


# Response norms: every function computes in float32 (float64 for float64) and rounds once.

def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def norm_window_sum(v, *, geom: G.NormGeometry, transposed=False):
    """Each element's sum of ``v`` over its window (``geom.window``), clipped to the tensor."""
    ax = G.image_axes(geom.layout)
    axes = (ax["c"],) if geom.kind == "cross_map" else (ax["h"], ax["w"])
    size = geom.size
    if geom.blocked:
        c_axis = axes[0]
        c = v.shape[c_axis]
        blocks = -(-c // size)
        pads = [(0, 0)] * v.ndim
        pads[c_axis] = (0, blocks * size - c)
        padded = jnp.pad(v, pads)
        shape = padded.shape[:c_axis] + (blocks, size) + padded.shape[c_axis + 1:]
        sums = jnp.sum(padded.reshape(shape), axis=c_axis + 1, keepdims=True)
        full = jnp.broadcast_to(sums, shape).reshape(padded.shape)
        return lax.slice_in_dim(full, 0, c, axis=c_axis)
    lo = -geom.window_lo(transposed)  # elements before the centre
    dims, pads = [1] * v.ndim, [(0, 0)] * v.ndim
    for a in axes:
        dims[a], pads[a] = size, (lo, size - 1 - lo)
    return lax.reduce_window(v, np.zeros((), v.dtype), lax.add, tuple(dims), (1,) * v.ndim,
                             tuple(pads))


def _denominators(x, geom):
    xf = x.astype(_compute_dtype(x.dtype))
    return xf, geom.min_div + geom.add_scale * norm_window_sum(xf * xf, geom=geom)


def norm_canonical(x, *, geom: G.NormGeometry):
    xf, d = _denominators(x, geom)
    return (xf * d ** -geom.pow_scale).astype(x.dtype)


def norm_fwd_canonical(x, *, geom: G.NormGeometry):
    """(y, d): the output and the denominators in ``G.norm_residual_dtype``."""
    xf, d = _denominators(x, geom)
    return ((xf * d ** -geom.pow_scale).astype(x.dtype),
            d.astype(G.norm_residual_dtype(x.dtype)))


def norm_jvp_canonical(tangents, x, denominators, *, geom: G.NormGeometry):
    """``t d^-p - 2 a p x d^(-p-1) W(x t)``: linear in the tangents."""
    f = _compute_dtype(x.dtype)
    t, xf, d = tangents.astype(f), x.astype(f), denominators.astype(f)
    scale = d ** -geom.pow_scale
    s = norm_window_sum(xf * t, geom=geom)
    out = t * scale - (2 * geom.add_scale * geom.pow_scale) * xf * (scale / d) * s
    return out.astype(tangents.dtype)


def norm_grad_canonical(cotangents, x, denominators, *, geom: G.NormGeometry):
    """``c d^-p - 2 a p x W^T(c x d^(-p-1))``: linear in the cotangents, the JVP's transpose."""
    f = _compute_dtype(x.dtype)
    c, xf, d = cotangents.astype(f), x.astype(f), denominators.astype(f)
    scale = d ** -geom.pow_scale
    s = norm_window_sum(c * xf * (scale / d), geom=geom, transposed=True)
    out = c * scale - (2 * geom.add_scale * geom.pow_scale) * xf * s
    return out.astype(cotangents.dtype)
def _window_sums(x, geom: G.PoolGeometry):
    """lax.reduce_window sum over each window's in-image elements (the geometry's padding,
    negative where cuda-convnet's ``start`` crops, applied by lax.pad first)."""
    ax = G.image_axes(geom.layout)
    config = [(0, 0, 0)] * 4
    config[ax["h"]] = (*geom.padding[0], 0)
    config[ax["w"]] = (*geom.padding[1], 0)
    zero = np.zeros((), x.dtype)  # concrete: lax picks its transposable window sum
    padded = lax.pad(x, zero, config)
    window, strides = [1] * 4, [1] * 4
    window[ax["h"]], window[ax["w"]] = geom.window
    strides[ax["h"]], strides[ax["w"]] = geom.strides
    return lax.reduce_window(padded, zero, lax.add, window, strides, "VALID")


def avg_pool_canonical(images, *, geom: G.AvgPoolGeometry):
    """Each window's sum (in float32; float64 for float64) divided by its area
    (``count_include_pad``) or by its in-image element count."""
    accumulate = jnp.float64 if images.dtype == jnp.float64 else jnp.float32
    sums = _window_sums(images.astype(accumulate), geom)
    if geom.count_include_pad:
        counts = jnp.asarray(geom.window[0] * geom.window[1], accumulate)
    else:
        ax = G.image_axes(geom.layout)
        ones = np.ones([images.shape[a] if a in (ax["h"], ax["w"]) else 1 for a in range(4)])
        counts = _window_sums(jnp.asarray(ones, accumulate), geom)
    return (sums / counts).astype(images.dtype)


def avg_pool_grad_canonical(cotangents, *, geom: G.AvgPoolGeometry, image_hw):
    ax = G.image_axes(geom.layout)
    shape = G.image_shape(geom.layout, cotangents.shape[ax["n"]], cotangents.shape[ax["c"]],
                          *image_hw)
    forward = lambda x: avg_pool_canonical(x, geom=geom)
    return jax.linear_transpose(forward, jax.ShapeDtypeStruct(shape, cotangents.dtype))(
        cotangents)[0]


# ----------------------------------------------------------------------------- public API

def filter_acts(images, filters, *, stride=1, pad=0, padding=None, partial_sum=None,
                layout="C01B", precision=None, groups=1):
    geom = G.filter_acts_geometry(images, filters, stride=stride, pad=pad, padding=padding,
                                  partial_sum=partial_sum, layout=layout, precision=precision,
                                  groups=groups)
    return filter_acts_canonical(images, filters, geom=geom)


def image_acts(hid_acts, filters, image_shape, *, stride=1, pad=0, padding=None, partial_sum=None,
               layout="C01B", precision=None, groups=1):
    geom, image_hw = G.image_acts_geometry(hid_acts, filters, image_shape, stride=stride, pad=pad,
                                           padding=padding, partial_sum=partial_sum, layout=layout,
                                           precision=precision, groups=groups)
    return image_acts_canonical(hid_acts, filters, geom=geom, image_hw=image_hw)


def weight_acts(images, hid_grads, filter_shape, *, stride=1, pad=0, padding=None,
                partial_sum=None, layout="C01B", precision=None, groups=1):
    geom, filter_hw = G.weight_acts_geometry(images, hid_grads, filter_shape, stride=stride,
                                             pad=pad, padding=padding, partial_sum=partial_sum,
                                             layout=layout, precision=precision, groups=groups)
    return weight_acts_canonical(images, hid_grads, geom=geom, filter_hw=filter_hw)


def max_pool(images, ds, *, stride=None, start=0, padding=None, layout="C01B"):
    geom = G.max_pool_geometry(images, ds, stride=stride, start=start, padding=padding,
                               layout=layout)
    return max_pool_canonical(images, geom=geom)


def cross_map_norm(x, size, *, add_scale, pow_scale, min_div=1.0, blocked=False, layout="C01B"):
    geom = G.norm_geometry(x, size, kind="cross_map", add_scale=add_scale, pow_scale=pow_scale,
                           min_div=min_div, blocked=blocked, layout=layout)
    return norm_canonical(x, geom=geom)


def response_norm(x, size, *, add_scale, pow_scale, min_div=1.0, layout="C01B"):
    geom = G.norm_geometry(x, size, kind="same_map", add_scale=add_scale, pow_scale=pow_scale,
                           min_div=min_div, blocked=False, layout=layout)
    return norm_canonical(x, geom=geom)


def avg_pool(images, ds, *, stride=None, start=0, padding=None, count_include_pad=True,
             layout="C01B"):
    geom = G.avg_pool_geometry(images, ds, stride=stride, start=start, padding=padding,
                               count_include_pad=count_include_pad, layout=layout)
    return avg_pool_canonical(images, geom=geom)


def local_filter_acts(images, filters, *, stride=1, pad=0, padding=None, layout="C01B",
                      precision=None):
    geom = G.local_filter_acts_geometry(images, filters, stride=stride, pad=pad, padding=padding,
                                        layout=layout, precision=precision)
    return local_filter_acts_canonical(images, filters, geom=geom)


def local_image_acts(hid_acts, filters, image_shape, *, stride=1, pad=0, padding=None,
                     layout="C01B", precision=None):
    geom, image_hw = G.local_image_acts_geometry(hid_acts, filters, image_shape, stride=stride,
                                                 pad=pad, padding=padding, layout=layout,
                                                 precision=precision)
    return local_image_acts_canonical(hid_acts, filters, geom=geom, image_hw=image_hw)


def local_weight_acts(images, hid_grads, filter_shape, *, stride=1, pad=0, padding=None,
                      layout="C01B", precision=None):
    geom, filter_hw = G.local_weight_acts_geometry(images, hid_grads, filter_shape,
                                                   stride=stride, pad=pad, padding=padding,
                                                   layout=layout, precision=precision)
    return local_weight_acts_canonical(images, hid_grads, geom=geom, filter_hw=filter_hw)
