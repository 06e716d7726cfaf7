"""max_pool and all its rules.

Three primitives: ``max_pool_p`` (the forward), ``max_pool_jvp_p`` (linear in the tangents: the
tangent of each window's selected element) and ``max_pool_grad_p`` (linear in the cotangents:
the transpose of the JVP). The JVP and the gradient are each other's transposes, so derivatives
of any order need no other primitive; the selection depends on the images only, whose own
derivative through the selection is zero almost everywhere.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from . import geometry as G
from . import reference
from ._native import def_impl_via_jit, register_lowerings
from ._sharding import DimensionRule, factors

max_pool_p = Primitive("jax_convnet_max_pool")
max_pool_jvp_p = Primitive("jax_convnet_max_pool_jvp")
max_pool_grad_p = Primitive("jax_convnet_max_pool_grad")


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


def _pooled_abstract(images, *, geom):
    ax = G.image_axes(geom.layout)
    out_hw = geom.output_hw((images.shape[ax["h"]], images.shape[ax["w"]]))
    return jax.core.ShapedArray(
        G.image_shape(geom.layout, images.shape[ax["n"]], images.shape[ax["c"]], *out_hw),
        images.dtype)


def _same_as_images(images, _, *, geom):
    return jax.core.ShapedArray(images.shape, images.dtype)


max_pool_p.def_abstract_eval(_pooled_abstract)
max_pool_jvp_p.def_abstract_eval(lambda images, tangents, *, geom: _pooled_abstract(images, geom=geom))
max_pool_grad_p.def_abstract_eval(_same_as_images)


# ----------------------------------------------------------------------------- differentiation

def _max_pool_jvp_rule(primals, tangents, *, geom):
    (images,), (t,) = primals, tangents
    out = max_pool_p.bind(images, geom=geom)
    t = ad.instantiate_zeros(t)
    return out, max_pool_jvp_p.bind(images, t, geom=geom)


def _linear_in_second(primitive):
    """JVP of ``primitive(images, v)``, linear in ``v`` and locally constant in ``images``."""
    def rule(primals, tangents, *, geom):
        images, v = primals
        out = primitive.bind(images, v, geom=geom)
        dv = tangents[1]
        if type(dv) is ad.Zero:
            return out, ad.Zero.from_primal_value(out)
        return out, primitive.bind(images, dv, geom=geom)
    return rule


def _transpose_to(other):
    def rule(ct, images, v, *, geom):
        if ad.is_undefined_primal(images):
            raise ValueError("max_pool's JVP and gradient are linear in their second operand "
                             "only; the images must be known when transposing")
        if type(ct) is ad.Zero:
            return None, ad.Zero(v.aval)
        return None, other.bind(images, ct, geom=geom)
    return rule


ad.primitive_jvps[max_pool_p] = _max_pool_jvp_rule
ad.primitive_jvps[max_pool_jvp_p] = _linear_in_second(max_pool_jvp_p)
ad.primitive_jvps[max_pool_grad_p] = _linear_in_second(max_pool_grad_p)
ad.primitive_transposes[max_pool_jvp_p] = _transpose_to(max_pool_grad_p)
ad.primitive_transposes[max_pool_grad_p] = _transpose_to(max_pool_jvp_p)


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
    def rule(args, dims, *, geom):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if isinstance(size, int) and size == 0:  # an empty result, as lax gives it
            unmapped = [jax.ShapeDtypeStruct(
                a.shape if d is None else a.shape[:d] + a.shape[d + 1:], a.dtype)
                for a, d in zip(args, dims)]
            out = jax.eval_shape(lambda *xs: primitive.bind(*xs, geom=geom), *unmapped)
            return jnp.zeros((0, *out.shape), out.dtype), 0
        folded = [_fold_batch(a, d, size, geom.layout) for a, d in zip(args, dims)]
        out = primitive.bind(*folded, geom=geom)
        n_axis = G.image_axes(geom.layout)["n"]
        shape = out.shape
        return out.reshape(shape[:n_axis] + (size, shape[n_axis] // size) + shape[n_axis + 1:]), n_axis
    return rule


def _pool_split(primitive):
    """Across devices the batch and the channels split freely; rows and columns are gathered."""
    def rule(*, geom):
        images = factors(G.image_axes(geom.layout), n="b", c="c", h="h", w="w")
        pooled = factors(G.image_axes(geom.layout), n="b", c="c", h="o", w="p")
        operands, result = {max_pool_p: ((images,), pooled),
                            max_pool_jvp_p: ((images, images), pooled),
                            max_pool_grad_p: ((images, pooled), images)}[primitive]
        return DimensionRule(operands, result, split=frozenset("bc"))
    return rule


def _grad_cuda_workspace_bytes(operand_avals, result_aval, **_):
    """One byte per pooled element: the two-pass gradient records each window's selected element
    there (csrc/cuda/pool.cu; the kernels decide when to use it)."""
    return math.prod(operand_avals[1].shape)


for _p, _ref, _target in (
        (max_pool_p, reference.max_pool_canonical, "jax_convnet_max_pool"),
        (max_pool_jvp_p, reference.max_pool_jvp_canonical, "jax_convnet_max_pool_jvp"),
        (max_pool_grad_p, reference.max_pool_grad_canonical, "jax_convnet_max_pool_grad")):
    batching.primitive_batchers[_p] = _batch_rule(_p)
    def_impl_via_jit(_p)
    register_lowerings(_p, _target, _ref, dimension_rule=_pool_split(_p),
                       cuda_workspace_bytes=(_grad_cuda_workspace_bytes
                                             if _p is max_pool_grad_p else None))
