"""Rules shared by the conv-like families (conv.py, and the locally connected family, local.py). Such a family is three bilinear primitives,
``filter_acts(images, filters) -> hidden``, ``image_acts(hidden, filters) -> images`` and
``weight_acts(images, hidden) -> filters``, each one's transposes being the other two. Families
differ only in their filters' axes (``G.filter_axes``, ``G.local_filter_axes``); images and
hidden activations are image tensors (``G.image_axes``) in every family.
"""
from __future__ import annotations

import jax
from jax import lax
from jax.interpreters import ad

from . import geometry as G
from ._sharding import DimensionRule, factors


def aval(x):
    """Shape carrier of an operand, defined or undefined (being transposed)."""
    return getattr(x, "aval", x)


def image_hw(x, layout):
    ax = G.image_axes(layout)
    return x.shape[ax["h"]], x.shape[ax["w"]]


def define_transposes(filter_acts_p, image_acts_p, weight_acts_p, filter_axes):
    """Each primitive's transposes in both operands, as the family's table (the docstring of
    jax_convnet/conv.py, and of jax_convnet/local.py for the locally connected family) says.
    image_acts takes the images' (H, W) and weight_acts the filters' (fh, fw), read from the
    operand being transposed (``filter_axes(layout)`` names the filters' axes)."""

    def filter_hw(w, layout):
        ax = filter_axes(layout)
        return w.shape[ax["h"]], w.shape[ax["w"]]

    def to_images(hidden, filters, images, geom):
        return image_acts_p.bind(hidden, filters, geom=geom,
                                 image_hw=image_hw(aval(images), geom.layout))

    def to_filters(images, hidden, filters, geom):
        return weight_acts_p.bind(images, hidden, geom=geom,
                                  filter_hw=filter_hw(aval(filters), geom.layout))

    ad.defbilinear(filter_acts_p,
                   lambda ct, x, w, *, geom, **_: to_images(ct, w, x, geom),
                   lambda ct, x, w, *, geom, **_: to_filters(x, ct, w, geom))
    ad.defbilinear(image_acts_p,
                   lambda ct, h, w, *, geom, **_: filter_acts_p.bind(ct, w, geom=geom),
                   lambda ct, h, w, *, geom, **_: to_filters(ct, h, w, geom))
    ad.defbilinear(weight_acts_p,
                   lambda ct, x, h, *, geom, **_: to_images(h, ct, x, geom),
                   lambda ct, x, h, *, geom, **_: filter_acts_p.bind(x, ct, geom=geom))


# Batching: a mapped axis of one operand folds into an axis whose slices are independent (no
# loop). For filter_acts, image_acts, weight_acts in turn: (operand kind, axis folded) for each
# operand, and the result's (kind, axis) that each lands in. With groups (the conv family's
# geom.groups), an axis that holds whole groups (GROUPED_AXIS) takes the mapped axis inside each
# group, (group, mapped, rest), so that every group's slices stay contiguous and channel / filter
# k of the folded axis still belongs to group k // (size // groups).
FOLDS = (
    ((("image", "n"), ("filter", "f")), (("image", "n"), ("image", "c"))),
    ((("image", "n"), ("filter", "c")), (("image", "n"), ("image", "c"))),
    ((("image", "c"), ("image", "c")), (("filter", "c"), ("filter", "f"))),
)

# The axis of each kind of tensor that holds whole groups: the channels of images and hidden
# tensors, the filters' F (the filters' channel axis holds one group's channels).
GROUPED_AXIS = {"image": "c", "filter": "f"}


def groups_of(geom) -> int:
    return getattr(geom, "groups", 1)


def kind_axis(kind, name, layout, filter_axes=G.filter_axes):
    """The axis of role ``name`` ("n", "c", "f", ...) of a tensor of ``kind`` ("image" or
    "filter"; ``filter_axes`` by layout for the filters)."""
    return (G.image_axes if kind == "image" else filter_axes)(layout)[name]


def _fold(x, bdim, axis, groups=1):
    """Moves batch dim ``bdim`` in front of (unbatched) ``axis`` and merges the two; with
    ``groups`` > 1 in the order (group, mapped, rest of the group)."""
    x = jax.numpy.moveaxis(x, bdim, axis)
    shape = x.shape
    if groups > 1:
        x = x.reshape(shape[:axis] + (shape[axis], groups, shape[axis + 1] // groups)
                      + shape[axis + 2:])
        x = jax.numpy.swapaxes(x, axis, axis + 1)
    return x.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def _unfold(y, axis, size, groups=1):
    """The inverse of ``_fold``: ``axis`` of ``y`` split into (mapped ``size``, the rest)."""
    shape = y.shape
    if groups > 1:
        part = shape[axis] // (groups * size)
        y = y.reshape(shape[:axis] + (groups, size, part) + shape[axis + 1:])
        y = jax.numpy.swapaxes(y, axis, axis + 1)
        return y.reshape(shape[:axis] + (size, groups * part) + shape[axis + 1:])
    return y.reshape(shape[:axis] + (size, shape[axis] // size) + shape[axis + 1:])


def _empty_batch(primitive, args, dims, params):
    """The result of mapping ``primitive`` over a size-0 axis (as lax gives it: an empty array
    with the mapped axis in front), or None where the mapped axis is not empty."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if not (isinstance(size, int) and size == 0):
        return None
    unmapped = [jax.ShapeDtypeStruct(a.shape if d is None else a.shape[:d] + a.shape[d + 1:],
                                     a.dtype) for a, d in zip(args, dims)]
    out = jax.eval_shape(lambda *xs: primitive.bind(*xs, **params), *unmapped)
    return jax.numpy.zeros((0, *out.shape), out.dtype)


def batch_rule(primitive, folds, filter_axes):
    """The batching rule of a conv-like ``primitive``: ``folds`` its entry of FOLDS,
    ``filter_axes`` the filters' axes by layout."""
    operand_folds, result_folds = folds

    def _axis(kind, name, layout):
        return kind_axis(kind, name, layout, filter_axes)

    def rule(args, dims, **params):
        layout = params["geom"].layout
        batched = [d is not None for d in dims]
        empty = _empty_batch(primitive, args, dims, params)
        if empty is not None:
            return empty, 0
        if all(batched):
            # Both operands mapped (e.g. per-example gradients): one call per slice.
            a = jax.numpy.moveaxis(args[0], dims[0], 0)
            b = jax.numpy.moveaxis(args[1], dims[1], 0)
            return lax.map(lambda ab: primitive.bind(*ab, **params), (a, b)), 0
        i = batched.index(True)
        size = args[i].shape[dims[i]]
        groups = groups_of(params["geom"])
        args = list(args)
        args[i] = _fold(args[i], dims[i], _axis(*operand_folds[i], layout),
                        groups if GROUPED_AXIS[operand_folds[i][0]] == operand_folds[i][1] else 1)
        out_axis = _axis(*result_folds[i], layout)
        return _unfold(primitive.bind(*args, **params), out_axis, size,
                       groups if GROUPED_AXIS[result_folds[i][0]] == result_folds[i][1] else 1), out_axis

    return rule


def dimension_rules(filter_factors):
    """The three primitives' rules across devices, ``filter_factors(layout)`` being the factor
    string of the filters (channels c, filters f, taps i j, any other factors of their own). The
    batch b and the filters f split freely (and the channels c of image_acts' result);
    weight_acts' per-device filter gradients over batch slices are added. With groups > 1 a
    slice of the filters or channels would have to hold whole groups (and the filters' channel
    axis indexes within a group), so only the batch splits."""

    def tensors(layout):
        # images, filters, hidden: image rows / cols h w, output rows / cols o p
        return (factors(G.image_axes(layout), n="b", c="c", h="h", w="w"),
                filter_factors(layout),
                factors(G.image_axes(layout), n="b", c="f", h="o", w="p"))

    def filter_acts_rule(*, geom, **_):
        images, filters, hidden = tensors(geom.layout)
        return DimensionRule((images, filters), hidden,
                             split=frozenset("bf" if groups_of(geom) == 1 else "b"))

    def image_acts_rule(*, geom, **_):
        images, filters, hidden = tensors(geom.layout)
        return DimensionRule((hidden, filters), images,
                             split=frozenset("bc" if groups_of(geom) == 1 else "b"))

    def weight_acts_rule(*, geom, **_):
        images, filters, hidden = tensors(geom.layout)
        return DimensionRule((images, hidden), filters,
                             split=frozenset("cf" if groups_of(geom) == 1 else ""),
                             summed=frozenset("b"))

    return filter_acts_rule, image_acts_rule, weight_acts_rule
