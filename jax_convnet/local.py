"""The locally connected family (cuda-convnet's ``local`` layer): local_filter_acts,
local_image_acts, local_weight_acts and all their rules.

A locally connected layer is filter_acts with unshared weights: one filter bank per output
position, so filters are 6-d, C01B ``(Ho, Wo, C, fh, fw, F)`` and NHWC ``(Ho, Wo, fh, fw, C, F)``.
Output sizes and both padding conventions are filter_acts' (``jax_convnet.geometry``). As in the
conv family the three primitives are bilinear and each one's transposes are the other two, so
the family is closed under differentiation to any order:

=======================  ===========================  ===========================
primitive(a, b)          transpose w.r.t. a           transpose w.r.t. b
=======================  ===========================  ===========================
local_filter_acts(x, w)  local_image_acts(ct, w)      local_weight_acts(x, ct)
local_image_acts(h, w)   local_filter_acts(ct, w)     local_weight_acts(ct, h)
local_weight_acts(x, h)  local_image_acts(h, ct)      local_filter_acts(x, ct)
=======================  ===========================  ===========================

The kernels compute in float32 (float64 for float64) at every ``precision``: each output is a
sum in a fixed order, so results are bitwise reproducible.
"""
from __future__ import annotations

import jax
from jax.extend.core import Primitive
from jax.interpreters import batching

from . import _conv_family as family
from . import geometry as G
from . import reference
from ._native import def_impl_via_jit, register_lowerings
from ._sharding import factors

local_filter_acts_p = Primitive("jax_convnet_local_filter_acts")
local_image_acts_p = Primitive("jax_convnet_local_image_acts")
local_weight_acts_p = Primitive("jax_convnet_local_weight_acts")


# ----------------------------------------------------------------------------- public functions

def local_filter_acts(images, filters, *, stride=1, pad=0, padding=None, layout="C01B",
                      precision=None):
    """cuda-convnet's locally connected layer: a cross-correlation whose filters differ at every
    output position.

    C01B: images (C, H, W, B), filters (Ho, Wo, C, fh, fw, F) -> (F, Ho, Wo, B).
    NHWC: images (B, H, W, C), filters (Ho, Wo, fh, fw, C, F) -> (B, Ho, Wo, F).
    ``out[y, x, f] = sum over (c, i, j) of image[c, y*sy - top + i, x*sx - left + j] *
    filters[y, x, c, i, j, f]`` (zeros outside the image). ``pad=`` uses cuda-convnet's ceil
    rule, ``padding=`` XLA's, exactly as in ``filter_acts``; (Ho, Wo) must be the output size
    they give.
    """
    images, filters = G.canonical_operand(images), G.canonical_operand(filters)
    geom = G.local_filter_acts_geometry(images, filters, stride=stride, pad=pad, padding=padding,
                                        layout=layout, precision=precision)
    return local_filter_acts_p.bind(images, filters, geom=geom)


def local_image_acts(hid_acts, filters, image_shape, *, stride=1, pad=0, padding=None,
                     layout="C01B", precision=None):
    """The adjoint of ``local_filter_acts`` in its images argument. ``image_shape`` is the
    images' full shape (in the layout's order) or their (H, W)."""
    hid_acts, filters = G.canonical_operand(hid_acts), G.canonical_operand(filters)
    geom, image_hw = G.local_image_acts_geometry(hid_acts, filters, image_shape, stride=stride,
                                                 pad=pad, padding=padding, layout=layout,
                                                 precision=precision)
    return local_image_acts_p.bind(hid_acts, filters, geom=geom, image_hw=image_hw)


def local_weight_acts(images, hid_grads, filter_shape, *, stride=1, pad=0, padding=None,
                      layout="C01B", precision=None):
    """The adjoint of ``local_filter_acts`` in its filters argument: each position's filter
    gradient summed over the batch. ``filter_shape`` is the filters' 6-d shape (in the layout's
    order) or their (fh, fw)."""
    images, hid_grads = G.canonical_operand(images), G.canonical_operand(hid_grads)
    geom, filter_hw = G.local_weight_acts_geometry(images, hid_grads, filter_shape,
                                                   stride=stride, pad=pad, padding=padding,
                                                   layout=layout, precision=precision)
    return local_weight_acts_p.bind(images, hid_grads, geom=geom, filter_hw=filter_hw)


# ----------------------------------------------------------------------------- abstract eval

def _filter_acts_abstract(images, filters, *, geom):
    layout = geom.layout
    n = images.shape[G.image_axes(layout)["n"]]
    fax = G.local_filter_axes(layout)
    return jax.core.ShapedArray(
        G.image_shape(layout, n, filters.shape[fax["f"]], filters.shape[fax["oh"]],
                      filters.shape[fax["ow"]]), images.dtype)


def _image_acts_abstract(hid_acts, filters, *, geom, image_hw):
    layout = geom.layout
    n = hid_acts.shape[G.image_axes(layout)["n"]]
    c = filters.shape[G.local_filter_axes(layout)["c"]]
    return jax.core.ShapedArray(G.image_shape(layout, n, c, *image_hw), hid_acts.dtype)


def _weight_acts_abstract(images, hid_grads, *, geom, filter_hw):
    layout = geom.layout
    ax = G.image_axes(layout)
    return jax.core.ShapedArray(
        G.local_filter_shape(layout, (hid_grads.shape[ax["h"]], hid_grads.shape[ax["w"]]),
                             hid_grads.shape[ax["c"]], images.shape[ax["c"]], *filter_hw),
        images.dtype)


local_filter_acts_p.def_abstract_eval(_filter_acts_abstract)
local_image_acts_p.def_abstract_eval(_image_acts_abstract)
local_weight_acts_p.def_abstract_eval(_weight_acts_abstract)


# ----------------------------------------------------------------------------- transposes, batching

_PRIMITIVES = (local_filter_acts_p, local_image_acts_p, local_weight_acts_p)

family.define_transposes(*_PRIMITIVES, G.local_filter_axes)

for _p, _folds in zip(_PRIMITIVES, family.FOLDS):
    batching.primitive_batchers[_p] = family.batch_rule(_p, _folds, G.local_filter_axes)


# ----------------------------------------------------------------------------- impl and lowering

for _p in _PRIMITIVES:
    def_impl_via_jit(_p)

# Across devices: the conv family's rules, with filters of output rows / cols o p too.
_filter_acts_split, _image_acts_split, _weight_acts_split = family.dimension_rules(
    lambda layout: factors(G.local_filter_axes(layout), oh="o", ow="p", c="c", h="i", w="j",
                           f="f"))

register_lowerings(local_filter_acts_p, "jax_convnet_local_filter_acts",
                   reference.local_filter_acts_canonical, dimension_rule=_filter_acts_split)
register_lowerings(local_image_acts_p, "jax_convnet_local_image_acts",
                   reference.local_image_acts_canonical, dimension_rule=_image_acts_split)
register_lowerings(local_weight_acts_p, "jax_convnet_local_weight_acts",
                   reference.local_weight_acts_canonical, dimension_rule=_weight_acts_split)
