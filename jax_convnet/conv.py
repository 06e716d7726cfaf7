"""The conv family: filter_acts, image_acts, weight_acts and all their rules.

The three primitives are bilinear and each one's transposes are the other two, so the family is
closed under differentiation to any order:

=================  ===========================  ===========================
primitive(a, b)    transpose w.r.t. a           transpose w.r.t. b
=================  ===========================  ===========================
filter_acts(x, w)  image_acts(ct, w)            weight_acts(x, ct)
image_acts(h, w)   filter_acts(ct, w)           weight_acts(ct, h)
weight_acts(x, h)  image_acts(h, ct)            filter_acts(x, ct)
=================  ===========================  ===========================

With ``groups=G`` (cuda-convnet's numGroups, XLA's feature_group_count) the images' C channels
and the F filters split into G equal parts; filter f reads the C // G channels of group
f // (F // G), so the filters are (C // G, fh, fw, F) in C01B and (fh, fw, C // G, F) in NHWC.
The geometry carries G, so every transpose and derivative is grouped alike.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Jaxpr, Primitive
from jax.interpreters import batching

from . import _conv_family as family
from . import geometry as G
from . import reference
from ._native import def_impl_via_jit, native_module, register_lowerings
from ._sharding import factors

filter_acts_p = Primitive("jax_convnet_filter_acts")
image_acts_p = Primitive("jax_convnet_image_acts")
weight_acts_p = Primitive("jax_convnet_weight_acts")


# ----------------------------------------------------------------------------- public functions

def filter_acts(images, filters, *, stride=1, pad=0, padding=None, partial_sum=None,
                layout="C01B", precision=None, groups=1):
    """cuda-convnet's FilterActs: cross-correlation of ``images`` with ``filters``.

    C01B: images (C, H, W, B), filters (C // groups, fh, fw, F) -> (F, Ho, Wo, B).
    NHWC: images (B, H, W, C), filters (fh, fw, C // groups, F) -> (B, Ho, Wo, F).
    ``pad=`` uses cuda-convnet's ceil rule, ``padding=`` XLA's (see ``jax_convnet.geometry``).
    ``partial_sum`` only changes how the filter gradient is computed. ``groups`` (cuda-convnet's
    numGroups, XLA's feature_group_count) must divide C and F; output channel f reads the input
    channels of group f // (F // groups).
    """
    images, filters = G.canonical_operand(images), G.canonical_operand(filters)
    geom = G.filter_acts_geometry(images, filters, stride=stride, pad=pad, padding=padding,
                                  partial_sum=partial_sum, layout=layout, precision=precision,
                                  groups=groups)
    return filter_acts_p.bind(images, filters, geom=geom)


def image_acts(hid_acts, filters, image_shape, *, stride=1, pad=0, padding=None, partial_sum=None,
               layout="C01B", precision=None, groups=1):
    """cuda-convnet's ImageActs: the adjoint of ``filter_acts`` in its images argument.

    ``image_shape`` is the images' full shape (in the layout's order) or their (H, W): several
    image sizes give one output size under the ceil rule. With ``groups`` the images have
    ``groups`` times the filters' channels.
    """
    hid_acts, filters = G.canonical_operand(hid_acts), G.canonical_operand(filters)
    geom, image_hw = G.image_acts_geometry(hid_acts, filters, image_shape, stride=stride, pad=pad,
                                           padding=padding, partial_sum=partial_sum, layout=layout,
                                           precision=precision, groups=groups)
    return image_acts_p.bind(hid_acts, filters, geom=geom, image_hw=image_hw)


def weight_acts(images, hid_grads, filter_shape, *, stride=1, pad=0, padding=None,
                partial_sum=None, layout="C01B", precision=None, groups=1):
    """cuda-convnet's WeightActs: the adjoint of ``filter_acts`` in its filters argument,
    summed as Ho*Wo/partial_sum partial sums over runs of ``partial_sum`` output positions.
    With ``groups`` the filters have C // groups channels."""
    images, hid_grads = G.canonical_operand(images), G.canonical_operand(hid_grads)
    geom, filter_hw = G.weight_acts_geometry(images, hid_grads, filter_shape, stride=stride,
                                             pad=pad, padding=padding, partial_sum=partial_sum,
                                             layout=layout, precision=precision, groups=groups)
    return weight_acts_p.bind(images, hid_grads, geom=geom, filter_hw=filter_hw)


# ----------------------------------------------------------------------------- abstract eval

def _filter_hw(w, layout):
    ax = G.filter_axes(layout)
    return w.shape[ax["h"]], w.shape[ax["w"]]


def _filter_acts_abstract(images, filters, *, geom):
    layout = geom.layout
    n = images.shape[G.image_axes(layout)["n"]]
    f = filters.shape[G.filter_axes(layout)["f"]]
    out_hw = geom.output_hw(family.image_hw(images, layout), _filter_hw(filters, layout))
    return jax.core.ShapedArray(G.image_shape(layout, n, f, *out_hw), images.dtype)


def _image_acts_abstract(hid_acts, filters, *, geom, image_hw):
    layout = geom.layout
    n = hid_acts.shape[G.image_axes(layout)["n"]]
    c = filters.shape[G.filter_axes(layout)["c"]] * geom.groups
    return jax.core.ShapedArray(G.image_shape(layout, n, c, *image_hw), hid_acts.dtype)


def _weight_acts_abstract(images, hid_grads, *, geom, filter_hw):
    layout = geom.layout
    c = images.shape[G.image_axes(layout)["c"]] // geom.groups
    f = hid_grads.shape[G.image_axes(layout)["c"]]
    return jax.core.ShapedArray(G.filter_shape(layout, f, c, *filter_hw), images.dtype)


filter_acts_p.def_abstract_eval(_filter_acts_abstract)
image_acts_p.def_abstract_eval(_image_acts_abstract)
weight_acts_p.def_abstract_eval(_weight_acts_abstract)


# ----------------------------------------------------------------------------- transposes, batching
# The family's table (module docstring) and its folds of a mapped axis: _conv_family.py, shared
# with the locally connected family.

_PRIMITIVES = (filter_acts_p, image_acts_p, weight_acts_p)

family.define_transposes(*_PRIMITIVES, G.filter_axes)

for _p, _folds in zip(_PRIMITIVES, family.FOLDS):
    batching.primitive_batchers[_p] = family.batch_rule(_p, _folds, G.filter_axes)


# ----------------------------------------------------------------------------- impl and lowering

for _p in _PRIMITIVES:
    def_impl_via_jit(_p)


# Across devices: the family's rules (_conv_family.dimension_rules).
_filter_acts_split, _image_acts_split, _weight_acts_split = family.dimension_rules(
    lambda layout: factors(G.filter_axes(layout), c="c", f="f", h="i", w="j"))


# The kinds of tensor of each primitive's operands and result.
_KINDS = {
    filter_acts_p: (("image", "filter"), "image"),
    image_acts_p: (("image", "filter"), "image"),
    weight_acts_p: (("image", "image"), "filter"),
}


def _gpu_per_group_calls(primitive):
    """How groups > 1 run on the GPU until its kernels take groups: one ungrouped custom call per
    group on that group's slices of the operands, the results concatenated. Returns the
    ``cuda_decomposition`` of register_lowerings (None for groups == 1: the call as it is)."""
    (a_kind, b_kind), out_kind = _KINDS[primitive]

    def decomposition(bind, *, geom, **params):
        if geom.groups == 1:
            return None
        groups, ungrouped = geom.groups, dataclasses.replace(geom, groups=1)
        a_axis, b_axis, out_axis = (family.kind_axis(kind, family.GROUPED_AXIS[kind], geom.layout)
                                    for kind in (a_kind, b_kind, out_kind))

        def per_group(a, b):
            def part(x, axis, g):
                size = x.shape[axis] // groups
                return lax.slice_in_dim(x, g * size, (g + 1) * size, axis=axis)
            return lax.concatenate([bind(part(a, a_axis, g), part(b, b_axis, g),
                                         geom=ungrouped, **params) for g in range(groups)],
                                   out_axis)
        return per_group

    return decomposition


def _one_group(primitive, operand_avals, result_aval, geom):
    """The operand and result avals and the geometry of each of the ungrouped calls that a call
    of ``primitive`` with groups > 1 runs as on the GPU (_gpu_per_group_calls)."""
    (a_kind, b_kind), out_kind = _KINDS[primitive]

    def part(aval, kind):
        shape = list(aval.shape)
        shape[family.kind_axis(kind, family.GROUPED_AXIS[kind], geom.layout)] //= geom.groups
        return aval.update(shape=tuple(shape))
    return ([part(a, kind) for a, kind in zip(operand_avals, (a_kind, b_kind))],
            part(result_aval, out_kind), dataclasses.replace(geom, groups=1))


# ----------------------------------------------------------------------------- CUDA workspace

# The CUDA custom calls take an extra uint8 result as temporary memory (a handler captured into a
# CUDA graph cannot allocate), sized by the one rule in csrc/common/conv_workspace.h, which the
# kernels also read; the lowering asks it through the CPU module. These caps bound its parts
# (bytes; 0 turns a path off): the FFT path's spectra, image_acts' column buffer of whole images
# (few channels, large filters: fewer, larger chunks run faster, so the cap trades memory for
# speed), and weight_acts' copy of NHWC images of fewer than 4 channels padded to 4.
FFT_WORKSPACE_CAP_BYTES, IMAGE_ACTS_COLUMN_CAP_BYTES, WEIGHT_ACTS_PADDED_IMAGE_CAP_BYTES = getattr(
    native_module("cpu"), "CONV_WORKSPACE_DEFAULT_CAPS", (0, 0, 0))

_OP_CODES = {filter_acts_p: 0, image_acts_p: 1, weight_acts_p: 2}


def _tensors(primitive, operand_avals, result_aval):
    """(images, filters, hidden) avals of a call of ``primitive``."""
    a, b = operand_avals
    if primitive is filter_acts_p:
        return a, b, result_aval
    if primitive is image_acts_p:
        return result_aval, b, a
    return a, result_aval, b


def _native_call(primitive, operand_avals, result_aval, geom):
    """(module, call arguments, batch known) of the CPU module's conv rules for one call: the op,
    the three tensors' dims (a symbolic batch as 1), the FFI attributes, itemsize, float32."""
    module = native_module("cpu")
    if module is None:
        raise RuntimeError("jax_convnet: the CPU module, which holds the CUDA kernels' plan and "
                           "workspace rules, did not load")
    images, filters, hidden = _tensors(primitive, operand_avals, result_aval)
    n = G.image_axes(geom.layout)["n"]
    batch_known = all(isinstance(t.shape[n], int) for t in (images, hidden))

    def dims(t, batch_axis):
        return [1 if (i == batch_axis and not batch_known) else int(d)
                for i, d in enumerate(t.shape)]

    args = (_OP_CODES[primitive], dims(images, n), dims(filters, None), dims(hidden, n),
            {k: int(v) for k, v in geom.ffi_attrs().items()}, images.dtype.itemsize,
            images.dtype == jnp.float32)
    return module, args, batch_known


def _workspace_parts(module, args, batch_known) -> dict:
    return module.conv_workspace(*args, batch_known, FFT_WORKSPACE_CAP_BYTES,
                                 IMAGE_ACTS_COLUMN_CAP_BYTES, WEIGHT_ACTS_PADDED_IMAGE_CAP_BYTES)


def cuda_workspace(primitive, operand_avals, result_aval, geom) -> dict:
    """The workspace of a CUDA call of ``primitive`` by part (bytes: fft, ia_columns,
    tf32_copies, wa_partial_sums, wa_padded_images, and their total) from the rule in
    csrc/common/conv_workspace.h. A symbolic batch (jax.export) turns off what depends on it."""
    return _workspace_parts(*_native_call(primitive, operand_avals, result_aval, geom))


# The device jcn.explain plans for unless told otherwise: an NVIDIA H200 (compute capability 9.0,
# 132 SMs, 227 KiB of shared memory per block) with the sm_90a kernels built.
H200 = dict(cc_major=9, cc_minor=0, sm_count=132, smem_optin=232448, tma=True)


def cuda_plan(primitive, operand_avals, result_aval, geom, device=H200) -> dict:
    """The route of a CUDA call of ``primitive`` on ``device`` (keys of ``H200``) and, on the TMA
    core, its tile width and whether it runs as 3xTF32 (``split``: float32 above default
    precision, where ``JAX_CONVNET_TMA_3XTF32=1``), from csrc/common/conv_plan.h, which the
    kernels follow: ``tma``, ``tma_via_nhwc_copies``, ``tma_weights``,
    ``tma_weights_via_c01b_copies``, ``fft`` or ``cuda_cores`` (the other kernels, chosen at
    launch); None for a symbolic batch."""
    module, args, batch_known = _native_call(primitive, operand_avals, result_aval, geom)
    if not batch_known:
        return None
    workspace = _workspace_parts(module, args, batch_known)["total"]
    return module.conv_plan(*args, workspace, **device)


def _cuda_workspace_bytes(primitive):
    def nbytes(operand_avals, result_aval, *, geom, **_):
        return cuda_workspace(primitive, operand_avals, result_aval, geom)["total"]
    return nbytes


register_lowerings(filter_acts_p, "jax_convnet_filter_acts", reference.filter_acts_canonical,
                   cuda_workspace_bytes=_cuda_workspace_bytes(filter_acts_p),
                   dimension_rule=_filter_acts_split,
                   cuda_decomposition=_gpu_per_group_calls(filter_acts_p))
register_lowerings(image_acts_p, "jax_convnet_image_acts", reference.image_acts_canonical,
                   cuda_workspace_bytes=_cuda_workspace_bytes(image_acts_p),
                   dimension_rule=_image_acts_split,
                   cuda_decomposition=_gpu_per_group_calls(image_acts_p))
register_lowerings(weight_acts_p, "jax_convnet_weight_acts", reference.weight_acts_canonical,
                   cuda_workspace_bytes=_cuda_workspace_bytes(weight_acts_p),
                   dimension_rule=_weight_acts_split,
                   cuda_decomposition=_gpu_per_group_calls(weight_acts_p))


# ----------------------------------------------------------------------------- explain

def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs its equations hold (jit, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if isinstance(inner, Jaxpr):
                    yield from _equations(inner)


def explain(fn, *args, device=H200, **kwargs) -> list[dict]:
    """What each conv custom call of ``fn(*args, **kwargs)`` (as ``jax.jit`` would trace it, its
    derivatives included) gets on a CUDA GPU described by ``device`` (default ``H200``): the op,
    its tensors' shapes (images, filters, hidden), dtype, layout and precision, the route and
    tile the kernels take and whether as 3xTF32 (``cuda_plan``), and the workspace by part
    (``cuda_workspace``), with ``paths`` naming the parts that are nonzero. ``args`` may be
    ``jax.ShapeDtypeStruct``s.
    A call with ``groups`` > 1 runs on the GPU as ``groups`` ungrouped calls on each group's
    slices: its route and workspace are those of each of them."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    calls = []
    for eqn in _equations(closed.jaxpr):
        if eqn.primitive not in _OP_CODES:
            continue
        geom = eqn.params["geom"]
        avals, result = [v.aval for v in eqn.invars], eqn.outvars[0].aval
        images, filters, hidden = _tensors(eqn.primitive, avals, result)
        per_call = (avals, result, geom) if geom.groups == 1 else \
            _one_group(eqn.primitive, avals, result, geom)
        workspace = cuda_workspace(eqn.primitive, *per_call)
        plan = cuda_plan(eqn.primitive, *per_call, device) or {}
        calls.append(dict(
            op=eqn.primitive.name.removeprefix("jax_convnet_"), images=tuple(images.shape),
            filters=tuple(filters.shape), hidden=tuple(hidden.shape),
            dtype=str(images.dtype), layout=geom.layout, precision=geom.precision,
            groups=geom.groups, route=plan.get("route"), tile_n=plan.get("tile_n"),
            split=plan.get("split"), workspace=workspace,
            paths=[k for k, v in workspace.items() if k != "total" and v > 0]))
    return calls
