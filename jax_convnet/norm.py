"""cross_map_norm and response_norm (cuda-convnet's cmrnorm and rnorm) and all their rules.

Both compute ``y = x * d ** (-pow_scale)`` with the denominators
``d = min_div + add_scale * S``, ``S`` each element's sum of ``x**2`` over its window
(``geometry.NormGeometry``: channels for cross_map_norm, a square of the same channel for
response_norm). One family of four primitives serves both (``geom.kind`` says which):

- ``norm_p(x)``: y; what a program that is not differentiated runs.
- ``norm_fwd_p(x)``: (y, d), d in ``geometry.norm_residual_dtype``. The JVP of norm runs it
  instead of ``norm_p``, so under differentiation the forward pass keeps the denominators as
  the residual and the backward never recomputes the window sums of ``x**2``.
- ``norm_jvp_p(t, x, d)``: ``t d^-p - 2 a p x d^(-p-1) W(x t)``, linear in ``t``.
- ``norm_grad_p(c, x, d)``: ``c d^-p - 2 a p x W^T(c x d^(-p-1))``, linear in ``c``; the JVP's
  transpose (``W^T`` sums over the transposed windows).
The JVP and the gradient are each other's transposes. Their derivatives in ``x`` and ``d`` (and
that of ``d`` in ``x``), needed only from the second order on, are the JAX derivatives of their
pure-lax twins in ``reference``, so derivatives of any order exist.
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

norm_p = Primitive("jax_convnet_norm")
norm_fwd_p = Primitive("jax_convnet_norm_fwd")
norm_fwd_p.multiple_results = True
norm_jvp_p = Primitive("jax_convnet_norm_jvp")
norm_grad_p = Primitive("jax_convnet_norm_grad")


def cross_map_norm(x, size, *, add_scale, pow_scale, min_div=1.0, blocked=False,
                   layout="C01B"):
    """cuda-convnet's cross-map response normalization (``cmrnorm``; pylearn2's ``CrossMapNorm``
    is the ``min_div=1`` case): ``x * (min_div + add_scale * S) ** (-pow_scale)``, ``S`` at
    channel ``f`` the sum of ``x**2`` over channels ``[f - size // 2, f - size // 2 + size)``
    clipped to ``[0, C)``, or with ``blocked=True`` over the block
    ``[(f // size) * size, (f // size) * size + size)`` clipped.

    ``add_scale`` is applied as given: cuda-convnet's layer parser divides the layer's ``scale``
    by ``size`` before the kernel, so a cfg ``scale`` becomes ``add_scale=scale / size``.
    Requires ``size >= 1`` (it may exceed C), ``add_scale >= 0``, ``min_div > 0``.
    """
    x = G.canonical_operand(x)
    geom = G.norm_geometry(x, size, kind="cross_map", add_scale=add_scale, pow_scale=pow_scale,
                           min_div=min_div, blocked=blocked, layout=layout)
    return norm_p.bind(x, geom=geom)


def response_norm(x, size, *, add_scale, pow_scale, min_div=1.0, layout="C01B"):
    """cuda-convnet's same-map response normalization (``rnorm``):
    ``x * (min_div + add_scale * S) ** (-pow_scale)``, ``S`` at pixel ``(y, x)`` the sum of
    ``x**2`` of the same channel over the ``size x size`` window whose top-left corner is
    ``(y - size // 2, x - size // 2)``, clipped to the image.

    ``add_scale`` is applied as given: cuda-convnet's layer parser divides the layer's ``scale``
    by ``size**2`` before the kernel, so a cfg ``scale`` becomes ``add_scale=scale / size**2``.
    Requires ``size >= 1``, ``add_scale >= 0``, ``min_div > 0``.
    """
    x = G.canonical_operand(x)
    geom = G.norm_geometry(x, size, kind="same_map", add_scale=add_scale, pow_scale=pow_scale,
                           min_div=min_div, blocked=False, layout=layout)
    return norm_p.bind(x, geom=geom)


# ----------------------------------------------------------------------------- abstract eval

def _check_like(name, a, x):
    if a.shape != x.shape:
        raise ValueError(f"response norm {name} of shape {a.shape} does not fit x of shape "
                         f"{x.shape}")


def _norm_abstract(x, *, geom):
    return jax.core.ShapedArray(x.shape, x.dtype)


def _fwd_abstract(x, *, geom):
    return [jax.core.ShapedArray(x.shape, x.dtype),
            jax.core.ShapedArray(x.shape, G.norm_residual_dtype(x.dtype))]


def _linear_abstract(v, x, d, *, geom):
    _check_like("operand", v, x)
    _check_like("denominators", d, x)
    if v.dtype != x.dtype or d.dtype != G.norm_residual_dtype(x.dtype):
        raise TypeError(f"response norm operands of dtypes {v.dtype}, {x.dtype}, {d.dtype}: the "
                        f"first two must match and the denominators be "
                        f"{G.norm_residual_dtype(x.dtype)}")
    return jax.core.ShapedArray(x.shape, x.dtype)


norm_p.def_abstract_eval(_norm_abstract)
norm_fwd_p.def_abstract_eval(_fwd_abstract)
norm_jvp_p.def_abstract_eval(_linear_abstract)
norm_grad_p.def_abstract_eval(_linear_abstract)


# ----------------------------------------------------------------------------- differentiation

def _zero_like(x):
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _norm_jvp_rule(primals, tangents, *, geom):
    (x,), (t,) = primals, tangents
    y, d = norm_fwd_p.bind(x, geom=geom)
    if type(t) is ad.Zero:
        return y, _zero_like(y)
    return y, norm_jvp_p.bind(t, x, d, geom=geom)


def _fwd_jvp_rule(primals, tangents, *, geom):
    (x,), (t,) = primals, tangents
    y, d = norm_fwd_p.bind(x, geom=geom)
    if type(t) is ad.Zero:
        return (y, d), (_zero_like(y), _zero_like(d))
    dd = jax.jvp(lambda x_: reference.norm_fwd_canonical(x_, geom=geom)[1], (x,), (t,))[1]
    return (y, d), (norm_jvp_p.bind(t, x, d, geom=geom), dd)


def _linear_in_first_jvp(primitive, twin):
    """JVP of ``primitive(v, x, d)``, linear in ``v``: the primitive itself on ``dv``, plus the
    derivative in ``x`` and ``d`` of its pure-lax ``twin`` (second order and beyond)."""
    def rule(primals, tangents, *, geom):
        v, x, d = primals
        dv, dx, dd = tangents
        out = primitive.bind(v, x, d, geom=geom)
        parts = []
        if type(dv) is not ad.Zero:
            parts.append(primitive.bind(dv, x, d, geom=geom))
        if type(dx) is not ad.Zero or type(dd) is not ad.Zero:
            parts.append(jax.jvp(lambda x_, d_: twin(v, x_, d_, geom=geom), (x, d),
                                 (ad.instantiate_zeros(dx), ad.instantiate_zeros(dd)))[1])
        if not parts:
            return out, _zero_like(out)
        return out, parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return rule


def _transpose_to(other, what):
    def rule(ct, v, x, d, *, geom):
        if ad.is_undefined_primal(x) or ad.is_undefined_primal(d):
            raise ValueError(f"response norm's {what} is linear in its first operand only; x "
                             f"and the denominators must be known when transposing")
        if type(ct) is ad.Zero:
            return ad.Zero(v.aval), None, None
        return other.bind(ct, x, d, geom=geom), None, None
    return rule


ad.primitive_jvps[norm_p] = _norm_jvp_rule
ad.primitive_jvps[norm_fwd_p] = _fwd_jvp_rule
ad.primitive_jvps[norm_jvp_p] = _linear_in_first_jvp(norm_jvp_p, reference.norm_jvp_canonical)
ad.primitive_jvps[norm_grad_p] = _linear_in_first_jvp(norm_grad_p,
                                                      reference.norm_grad_canonical)
ad.primitive_transposes[norm_jvp_p] = _transpose_to(norm_grad_p, "JVP")
ad.primitive_transposes[norm_grad_p] = _transpose_to(norm_jvp_p, "gradient")


# ----------------------------------------------------------------------------- batching
# Windows never mix batch elements: a mapped axis folds into the batch axis.

def _batch_rule(primitive):
    def rule(args, dims, *, geom):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        n_axis = G.image_axes(geom.layout)["n"]

        def fold(x, bdim):
            if bdim is None:
                x, bdim = jnp.broadcast_to(x[None], (size,) + x.shape), 0
            x = jnp.moveaxis(x, bdim, n_axis)
            s = x.shape
            return x.reshape(s[:n_axis] + (s[n_axis] * s[n_axis + 1],) + s[n_axis + 2:])

        def unfold(out):
            s = out.shape
            return out.reshape(s[:n_axis] + (size, s[n_axis] // size) + s[n_axis + 1:])

        if isinstance(size, int) and size == 0:  # an empty result, as lax gives it
            out = jax.eval_shape(lambda *xs: primitive.bind(*xs, geom=geom), *[
                jax.ShapeDtypeStruct(a.shape if d is None else a.shape[:d] + a.shape[d + 1:],
                                     a.dtype) for a, d in zip(args, dims)])
            if primitive.multiple_results:
                return [jnp.zeros((0, *o.shape), o.dtype) for o in out], [0] * len(out)
            return jnp.zeros((0, *out.shape), out.dtype), 0
        out = primitive.bind(*[fold(a, d) for a, d in zip(args, dims)], geom=geom)
        if primitive.multiple_results:
            return [unfold(o) for o in out], [n_axis] * len(out)
        return unfold(out), n_axis
    return rule


def _norm_split(primitive):
    """Across devices the batch splits freely, and so do the rows and columns (cross-map) or
    the channels (same-map); the windowed axes are gathered."""
    def rule(*, geom):
        keep = "bhw" if geom.kind == "cross_map" else "bc"
        x = factors(G.image_axes(geom.layout), n="b", c="c", h="h", w="w")
        operands, result = {norm_p: ((x,), x), norm_fwd_p: ((x,), (x, x)),
                            norm_jvp_p: ((x, x, x), x), norm_grad_p: ((x, x, x), x)}[primitive]
        return DimensionRule(operands, result, split=frozenset(keep))
    return rule


for _p, _ref, _target in (
        (norm_p, reference.norm_canonical, "jax_convnet_norm"),
        (norm_fwd_p, reference.norm_fwd_canonical, "jax_convnet_norm_fwd"),
        (norm_jvp_p, reference.norm_jvp_canonical, "jax_convnet_norm_jvp"),
        (norm_grad_p, reference.norm_grad_canonical, "jax_convnet_norm_grad")):
    batching.primitive_batchers[_p] = _batch_rule(_p)
    def_impl_via_jit(_p)
    register_lowerings(_p, _target, _ref, dimension_rule=_norm_split(_p))
