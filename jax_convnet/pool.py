"""max_pool and all its rules.

Four primitives:
- ``max_pool_p(images)``: the pooled values; what a program that is not differentiated runs.
- ``max_pool_winners_p(images)``: the pooled values and each window's **winner**, its selected
  element as the row-major offset ``i * window_w + j`` in the whole (unclipped) window, in
  ``geom.winner_dtype()`` (one byte while a window has at most 256 elements). The JVP of max_pool
  runs it instead of ``max_pool_p``, so under differentiation the forward pass finds the winners
  once and keeps them as the residual.
- ``max_pool_jvp_p(tangents, winners)``: each window's tangent at its winner (0 for an empty
  window), linear in the tangents.
- ``max_pool_grad_p(cotangents, winners, image_hw)``: each image element gets the sum of the
  cotangents of the windows whose winner it is, linear in the cotangents; the transpose of the JVP.
Neither the JVP nor the gradient reads the images. The winners are integers (no derivative), the
JVP and the gradient are each other's transposes, so derivatives of any order need no other
primitive.

avg_pool is linear, so two primitives close it under differentiation:
- ``avg_pool_p(images)``: each window's sum divided by its count (geometry.AvgPoolGeometry); its
  JVP is itself applied to the tangents, its transpose the gradient;
- ``avg_pool_grad_p(cotangents, image_hw)``: each image element gets the sum, over the windows
  that contain it in increasing (oy, ox), of the window's cotangent divided by its count (a
  gather, no atomics); its transpose is ``avg_pool_p``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from . import geometry as G
from . import reference
from ._native import def_impl_via_jit, register_lowerings
from ._sharding import DimensionRule, factors

max_pool_p = Primitive("jax_convnet_max_pool")
max_pool_winners_p = Primitive("jax_convnet_max_pool_winners")
max_pool_winners_p.multiple_results = True
max_pool_jvp_p = Primitive("jax_convnet_max_pool_jvp")
max_pool_grad_p = Primitive("jax_convnet_max_pool_grad")
avg_pool_p = Primitive("jax_convnet_avg_pool")
avg_pool_grad_p = Primitive("jax_convnet_avg_pool_grad")


def max_pool(images, ds, *, stride=None, start=0, padding=None, layout="C01B"):
    """cuda-convnet's MaxPool over ``ds`` windows every ``stride`` (default ``ds``) pixels.

    Default: cuda-convnet's convention, windows from ``start`` with the ceil rule
    ``Ho = ceil((H - start - ds) / stride) + 1``, the last window clipped to the image.
    ``padding=`` ("SAME", "VALID" or pairs) gives ``flax.linen.max_pool`` semantics instead.
    NaN propagates; the gradient goes to the first maximal element of each window.
    """
    images = G.canonical_operand(images)
    geom = G.max_pool_geometry(images, ds, stride=stride, start=start, padding=padding,
                               layout=layout)
    return max_pool_p.bind(images, geom=geom)


def avg_pool(images, ds, *, stride=None, start=0, padding=None, count_include_pad=True,
             layout="C01B"):
    """cuda-convnet's AvgPool over ``ds`` windows every ``stride`` (default ``ds``) pixels.

    Default: cuda-convnet's convention, max_pool's windows (from ``start``, the ceil rule, the last
    window clipped to the image), each output the mean of its window's in-image elements.
    ``padding=`` ("SAME", "VALID" or pairs) gives ``flax.linen.avg_pool`` semantics instead: zero
    padding, the floor rule, a divisor of ``ds[0] * ds[1]`` (``count_include_pad=True``) or the
    window's in-image element count (``False``; NaN for a window wholly in the padding, as in
    flax). ``count_include_pad`` matters only with ``padding=``. Sums are taken in float32
    (float64 for float64) and the result has the images' dtype.
    """
    images = G.canonical_operand(images)
    geom = G.avg_pool_geometry(images, ds, stride=stride, start=start, padding=padding,
                               count_include_pad=count_include_pad, layout=layout)
    return avg_pool_p.bind(images, geom=geom)


def _pooled_abstract(images, *, geom):
    ax = G.image_axes(geom.layout)
    out_hw = geom.output_hw((images.shape[ax["h"]], images.shape[ax["w"]]))
    return jax.core.ShapedArray(
        G.image_shape(geom.layout, images.shape[ax["n"]], images.shape[ax["c"]], *out_hw),
        images.dtype)


def _winners_abstract(images, *, geom):
    pooled = _pooled_abstract(images, geom=geom)
    return [pooled, jax.core.ShapedArray(pooled.shape, geom.winner_dtype())]


def _check_winners(winners, geom):
    if winners.dtype != geom.winner_dtype():
        raise TypeError(f"max_pool winners must be {geom.winner_dtype()} for ds={geom.window}, "
                        f"got {winners.dtype}")


def _jvp_abstract(tangents, winners, *, geom):
    _check_winners(winners, geom)
    pooled = _pooled_abstract(tangents, geom=geom)
    if pooled.shape != winners.shape:
        raise ValueError(f"max_pool winners of shape {winners.shape} do not fit tangents of "
                         f"shape {tangents.shape} (pooled shape {pooled.shape})")
    return pooled


def _grad_abstract(cotangents, winners, *, geom, image_hw):
    _check_winners(winners, geom)
    ax = G.image_axes(geom.layout)
    shape = G.image_shape(geom.layout, cotangents.shape[ax["n"]], cotangents.shape[ax["c"]],
                          *image_hw)
    if (cotangents.shape != winners.shape
            or geom.output_hw(image_hw) != (cotangents.shape[ax["h"]], cotangents.shape[ax["w"]])):
        raise ValueError(f"max_pool cotangents {cotangents.shape} and winners {winners.shape} do "
                         f"not fit images of shape {shape}")
    return jax.core.ShapedArray(shape, cotangents.dtype)


def _avg_grad_abstract(cotangents, *, geom, image_hw):
    ax = G.image_axes(geom.layout)
    shape = G.image_shape(geom.layout, cotangents.shape[ax["n"]], cotangents.shape[ax["c"]],
                          *image_hw)
    if geom.output_hw(image_hw) != (cotangents.shape[ax["h"]], cotangents.shape[ax["w"]]):
        raise ValueError(f"avg_pool cotangents {cotangents.shape} do not fit images of shape "
                         f"{shape}")
    return jax.core.ShapedArray(shape, cotangents.dtype)


max_pool_p.def_abstract_eval(_pooled_abstract)
avg_pool_p.def_abstract_eval(_pooled_abstract)
avg_pool_grad_p.def_abstract_eval(_avg_grad_abstract)
max_pool_winners_p.def_abstract_eval(_winners_abstract)
max_pool_jvp_p.def_abstract_eval(_jvp_abstract)
max_pool_grad_p.def_abstract_eval(_grad_abstract)


# ----------------------------------------------------------------------------- differentiation

def _image_hw(x, geom):
    ax = G.image_axes(geom.layout)
    return (x.shape[ax["h"]], x.shape[ax["w"]])


def _zero_tangent(x):
    """The symbolic zero tangent of ``x`` (float0 for the integer winners)."""
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _max_pool_jvp_rule(primals, tangents, *, geom):
    (images,), (t,) = primals, tangents
    pooled, winners = max_pool_winners_p.bind(images, geom=geom)
    if type(t) is ad.Zero:
        return pooled, _zero_tangent(pooled)
    return pooled, max_pool_jvp_p.bind(t, winners, geom=geom)


def _winners_jvp_rule(primals, tangents, *, geom):
    (images,), (t,) = primals, tangents
    pooled, winners = max_pool_winners_p.bind(images, geom=geom)
    dpooled = (_zero_tangent(pooled) if type(t) is ad.Zero
               else max_pool_jvp_p.bind(t, winners, geom=geom))
    return (pooled, winners), (dpooled, _zero_tangent(winners))


def _linear_in_first(primitive):
    """JVP of ``primitive(v, winners)``: linear in ``v``; the integer winners have no tangent."""
    def rule(primals, tangents, **params):
        v, winners = primals
        out = primitive.bind(v, winners, **params)
        dv = tangents[0]
        if type(dv) is ad.Zero:
            return out, _zero_tangent(out)
        return out, primitive.bind(dv, winners, **params)
    return rule


def _jvp_transpose(ct, tangents, winners, *, geom):
    if ad.is_undefined_primal(winners):
        raise ValueError("max_pool's JVP is linear in the tangents only; the winners must be "
                         "known when transposing")
    if type(ct) is ad.Zero:
        return ad.Zero(tangents.aval), None
    return max_pool_grad_p.bind(ct, winners, geom=geom,
                                image_hw=_image_hw(tangents.aval, geom)), None


def _grad_transpose(ct, cotangents, winners, *, geom, image_hw):
    if ad.is_undefined_primal(winners):
        raise ValueError("max_pool's gradient is linear in the cotangents only; the winners must "
                         "be known when transposing")
    if type(ct) is ad.Zero:
        return ad.Zero(cotangents.aval), None
    return max_pool_jvp_p.bind(ct, winners, geom=geom), None


ad.primitive_jvps[max_pool_p] = _max_pool_jvp_rule
ad.primitive_jvps[max_pool_winners_p] = _winners_jvp_rule
ad.primitive_jvps[max_pool_jvp_p] = _linear_in_first(max_pool_jvp_p)
ad.primitive_jvps[max_pool_grad_p] = _linear_in_first(max_pool_grad_p)
ad.primitive_transposes[max_pool_jvp_p] = _jvp_transpose
ad.primitive_transposes[max_pool_grad_p] = _grad_transpose


# Both are linear: the JVP applies the primitive to the tangents, the transpose is the other one.
def _linear(primitive):
    def rule(primals, tangents, **params):
        out = primitive.bind(*primals, **params)
        if type(tangents[0]) is ad.Zero:
            return out, _zero_tangent(out)
        return out, primitive.bind(tangents[0], **params)
    return rule


def _avg_pool_transpose(ct, images, *, geom):
    if type(ct) is ad.Zero:
        return (ad.Zero(images.aval),)
    return (avg_pool_grad_p.bind(ct, geom=geom, image_hw=_image_hw(images.aval, geom)),)


def _avg_grad_transpose(ct, cotangents, *, geom, image_hw):
    if type(ct) is ad.Zero:
        return (ad.Zero(cotangents.aval),)
    return (avg_pool_p.bind(ct, geom=geom),)


ad.primitive_jvps[avg_pool_p] = _linear(avg_pool_p)
ad.primitive_jvps[avg_pool_grad_p] = _linear(avg_pool_grad_p)
ad.primitive_transposes[avg_pool_p] = _avg_pool_transpose
ad.primitive_transposes[avg_pool_grad_p] = _avg_grad_transpose


# ----------------------------------------------------------------------------- batching
# Windows never mix batch elements: any mapped axis folds into the batch axis.

def _fold_batch(x, bdim, size, layout):
    n_axis = G.image_axes(layout)["n"]
    if bdim is None:
        x = jnp.broadcast_to(x[None], (size,) + x.shape)
        bdim = 0
    x = jnp.moveaxis(x, bdim, n_axis)
    shape = x.shape
    return x.reshape(shape[:n_axis] + (shape[n_axis] * shape[n_axis + 1],) + shape[n_axis + 2:])


def _batch_rule(primitive):
    def rule(args, dims, *, geom, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if isinstance(size, int) and size == 0:  # an empty result, as lax gives it
            unmapped = [jax.ShapeDtypeStruct(
                a.shape if d is None else a.shape[:d] + a.shape[d + 1:], a.dtype)
                for a, d in zip(args, dims)]
            out = jax.eval_shape(lambda *xs: primitive.bind(*xs, geom=geom, **params),
                                 *unmapped)
            if primitive.multiple_results:
                return [jnp.zeros((0, *o.shape), o.dtype) for o in out], [0] * len(out)
            return jnp.zeros((0, *out.shape), out.dtype), 0
        folded = [_fold_batch(a, d, size, geom.layout) for a, d in zip(args, dims)]
        n_axis = G.image_axes(geom.layout)["n"]

        def unfold(out):
            shape = out.shape
            return out.reshape(shape[:n_axis] + (size, shape[n_axis] // size)
                               + shape[n_axis + 1:])
        out = primitive.bind(*folded, geom=geom, **params)
        if primitive.multiple_results:
            return [unfold(o) for o in out], [n_axis] * len(out)
        return unfold(out), n_axis
    return rule


def _pool_split(primitive):
    """Across devices the batch and the channels split freely; rows and columns are gathered."""
    def rule(*, geom, **_):
        images = factors(G.image_axes(geom.layout), n="b", c="c", h="h", w="w")
        pooled = factors(G.image_axes(geom.layout), n="b", c="c", h="o", w="p")
        operands, result = {max_pool_p: ((images,), pooled),
                            max_pool_winners_p: ((images,), (pooled, pooled)),
                            max_pool_jvp_p: ((images, pooled), pooled),
                            max_pool_grad_p: ((pooled, pooled), images),
                            avg_pool_p: ((images,), pooled),
                            avg_pool_grad_p: ((pooled,), images)}[primitive]
        return DimensionRule(operands, result, split=frozenset("bc"))
    return rule


for _p, _ref, _target in (
        (max_pool_p, reference.max_pool_canonical, "jax_convnet_max_pool"),
        (max_pool_winners_p, reference.max_pool_winners_canonical, "jax_convnet_max_pool_winners"),
        (max_pool_jvp_p, reference.max_pool_jvp_canonical, "jax_convnet_max_pool_jvp"),
        (max_pool_grad_p, reference.max_pool_grad_canonical, "jax_convnet_max_pool_grad"),
        (avg_pool_p, reference.avg_pool_canonical, "jax_convnet_avg_pool"),
        (avg_pool_grad_p, reference.avg_pool_grad_canonical, "jax_convnet_avg_pool_grad")):
    batching.primitive_batchers[_p] = _batch_rule(_p)
    def_impl_via_jit(_p)
    register_lowerings(_p, _target, _ref, dimension_rule=_pool_split(_p))
