"""Rules shared by the conv-like families (the locally connected family, local.py; conv.py holds
its own copy of the same rules). Such a family is three bilinear primitives,
``filter_acts(images, filters) -> hidden``, ``image_acts(hidden, filters) -> images`` and
``weight_acts(images, hidden) -> filters``, each one's transposes being the other two. Families
differ only in their filters' axes (``G.filter_axes``, ``G.local_filter_axes``); images and
hidden activations are image tensors (``G.image_axes``) in every family.
"""
from __future__ import annotations

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
    """Each primitive's transposes in both operands, as the family's table says:

    =================  ===========================  ===========================
    primitive(a, b)    transpose w.r.t. a           transpose w.r.t. b
    =================  ===========================  ===========================
    filter_acts(x, w)  image_acts(ct, w)            weight_acts(x, ct)
    image_acts(h, w)   filter_acts(ct, w)           weight_acts(ct, h)
    weight_acts(x, h)  image_acts(h, ct)            filter_acts(x, ct)
    =================  ===========================  ===========================

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
# operand, and the result's (kind, axis) that each lands in.
FOLDS = (
    ((("image", "n"), ("filter", "f")), (("image", "n"), ("image", "c"))),
    ((("image", "n"), ("filter", "c")), (("image", "n"), ("image", "c"))),
    ((("image", "c"), ("image", "c")), (("filter", "c"), ("filter", "f"))),
)


def dimension_rules(filter_factors):
    """The three primitives' rules across devices, ``filter_factors(layout)`` being the factor
    string of the filters (channels c, filters f, taps i j, any other factors of their own). The
    batch b and the filters f split freely (and the channels c of image_acts' result);
    weight_acts' per-device filter gradients over batch slices are added."""

    def tensors(layout):
        # images, filters, hidden: image rows / cols h w, output rows / cols o p
        return (factors(G.image_axes(layout), n="b", c="c", h="h", w="w"),
                filter_factors(layout),
                factors(G.image_axes(layout), n="b", c="f", h="o", w="p"))

    def filter_acts_rule(*, geom, **_):
        images, filters, hidden = tensors(geom.layout)
        return DimensionRule((images, filters), hidden, split=frozenset("bf"))

    def image_acts_rule(*, geom, **_):
        images, filters, hidden = tensors(geom.layout)
        return DimensionRule((hidden, filters), images, split=frozenset("bc"))

    def weight_acts_rule(*, geom, **_):
        images, filters, hidden = tensors(geom.layout)
        return DimensionRule((images, hidden), filters, split=frozenset("cf"),
                             summed=frozenset("b"))

    return filter_acts_rule, image_acts_rule, weight_acts_rule
