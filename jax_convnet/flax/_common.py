"""Argument handling shared by the linen and nnx wrappers.

Flax's arguments are turned into what :func:`jax_convnet.filter_acts`,
:func:`jax_convnet.max_pool` and :func:`jax_convnet.avg_pool` take (the XLA ``padding=`` convention, as flax uses); sizes and
all remaining checks are left to :mod:`jax_convnet.geometry`. Arguments that flax accepts and
jax_convnet cannot honour raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as _flax_dtypes
from jax import lax

from .. import conv as _conv
from .. import geometry as G
from .. import local as _local
from .. import norm as _norm
from .. import pool as _pool

LAYOUTS = G.LAYOUTS
_UNSUPPORTED_PADDING = {
    "CIRCULAR": "pad the inputs yourself, e.g. jnp.pad(x, ..., mode='wrap'), and use "
                "padding='VALID'",
    "REFLECT": "pad the inputs yourself, e.g. jnp.pad(x, ..., mode='reflect'), and use "
               "padding='VALID'",
    "CAUSAL": "CAUSAL padding is for 1-d convolutions, which jax_convnet does not have; "
              "use explicit pairs ((k - 1, 0), (0, 0)) instead",
}


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- arguments

def check_layout(layout, owner: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{owner}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def kernel_pair(value, owner: str) -> tuple[int, int]:
    """``kernel_size``: two ints (rows, cols). An int k means a 1-d (k,) kernel in flax's Conv,
    which jax_convnet (2-d only, as cuda-convnet) cannot do: ``ValueError`` saying to pass (k, k)."""
    if _is_int(value):
        raise ValueError(f"{owner}: kernel_size={value!r} is a 1-d ({value},) kernel, as in "
                         f"flax's Conv; jax_convnet convolves 2-d images only: pass "
                         f"kernel_size=({value}, {value}) for a square kernel")
    return window_pair(value, "kernel_size", owner)


def window_pair(value, name: str, owner: str) -> tuple[int, int]:
    """``window_shape`` (and ``strides``): an int (square, which flax's pools do not take) or two
    ints (rows, cols)."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) \
            and all(_is_int(v) for v in value):
        if len(value) != 2:
            raise ValueError(
                f"{owner}: {name}={tuple(value)!r} describes a {len(value)}-d window; only 2-d "
                f"convolutions and pools are supported (give two sizes (rows, cols))")
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{owner}: {name} must be an int or a pair of ints (rows, cols), "
                         f"got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value!r}")
    return pair


def stride_pair(value, name: str, owner: str, *, default: int = 1) -> tuple[int, int]:
    """``strides``: None (``default``), an int or two ints, as flax broadcasts them."""
    if value is None:
        value = default
    return window_pair(value, name, owner)


def check_ones(value, name: str, owner: str, what: str) -> None:
    """``input_dilation`` / ``kernel_dilation``: only 1 (or None, or all ones) is supported."""
    if value is None:
        return
    values = (value,) if _is_int(value) else tuple(value) if isinstance(value, Sequence) else None
    if values is None or not all(_is_int(v) and v == 1 for v in values):
        raise ValueError(f"{owner}: {name}={value!r} is not supported ({what}); "
                         f"jax_convnet supports only {name}=1")


def check_unsupported(owner: str, *, input_dilation=1, kernel_dilation=1, feature_group_count=1,
                      mask=None, conv_general_dilated=None, preferred_element_type=None,
                      grouped: bool = False) -> None:
    """Raises ``ValueError`` for flax arguments jax_convnet cannot honour; ``grouped``: the layer
    takes ``feature_group_count`` (Conv; flax's ConvLocal refuses it too)."""
    check_ones(input_dilation, "input_dilation", owner, "transposed convolution")
    check_ones(kernel_dilation, "kernel_dilation", owner, "atrous convolution")
    if grouped:
        if not (_is_int(feature_group_count) and feature_group_count >= 1):
            raise ValueError(f"{owner}: feature_group_count must be a positive int, got "
                             f"{feature_group_count!r}")
    elif not (_is_int(feature_group_count) and feature_group_count == 1):
        raise ValueError(f"{owner}: feature_group_count={feature_group_count!r} is not supported "
                         f"(grouped convolutions); jax_convnet supports only "
                         f"feature_group_count=1")
    if mask is not None:
        raise ValueError(f"{owner}: mask is not supported; multiply the kernel parameter by the "
                         f"mask outside the module instead")
    if conv_general_dilated is not None and conv_general_dilated is not lax.conv_general_dilated:
        raise ValueError(f"{owner}: conv_general_dilated cannot be replaced; the convolution is "
                         f"jax_convnet.filter_acts")
    if preferred_element_type is not None:
        raise ValueError(f"{owner}: preferred_element_type={preferred_element_type!r} is not "
                         f"supported; jax_convnet accumulates in float32 and returns the "
                         f"operands' dtype (use dtype= to choose it)")


def check_conv_module(owner: str, op: str, *, layout, kernel_size, strides, padding,
                      conv_general_dilated_cls=None, **unsupported):
    """The constructor checks Conv and ConvLocal share (linen and nnx): layout, kernel size,
    strides and padding, the flax arguments jax_convnet cannot honour (``check_unsupported``), and
    ``conv_general_dilated_cls``, which ``op`` (the jax_convnet op) replaces. Returns (layout,
    kernel (h, w), strides (h, w), padding) as jax_convnet takes them."""
    layout = check_layout(layout, owner)
    kernel_hw = kernel_pair(kernel_size, owner)
    stride_hw = stride_pair(strides, "strides", owner)
    pads = conv_padding(padding, owner)
    check_unsupported(owner, grouped=op == "filter_acts", **unsupported)
    if conv_general_dilated_cls is not None:
        raise ValueError(f"{owner}: conv_general_dilated_cls cannot be replaced; the "
                         f"{'convolution' if op == 'filter_acts' else 'layer'} is "
                         f"jax_convnet.{op}")
    return layout, kernel_hw, stride_hw, pads


def group_channels(owner: str, feature_group_count, in_features: int, out_features: int) -> int:
    """The kernel's input channels, in_features // feature_group_count, as flax's Conv has them;
    ``ValueError`` unless feature_group_count divides both feature counts."""
    groups = int(feature_group_count)
    for name, value in (("in_features", in_features), ("features", out_features)):
        if value % groups:
            raise ValueError(f"{owner}: feature_group_count={groups} must divide {name}="
                             f"{value}")
    return in_features // groups


def check_features(owner: str, **features) -> None:
    """nnx's in_features / out_features: positive ints."""
    for name, value in features.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def nnx_operands(module, inputs, out_sharding, owner: str):
    """An nnx Conv / ConvLocal's inputs, kernel and bias, promoted as flax.nnx does
    (``promote_dtype``); ``out_sharding`` is refused."""
    if out_sharding is not None:
        raise ValueError(f"{owner}: out_sharding is not supported; shard the inputs over the "
                         f"batch axis instead")
    kernel = module.kernel[...]
    bias = module.bias[...] if module.bias is not None else None
    if module.promote_dtype is None:
        return promote(inputs, kernel, bias, module.dtype)
    return module.promote_dtype((inputs, kernel, bias), dtype=module.dtype)


def conv_padding(padding, owner: str, name: str = "padding"):
    """flax's padding for a 2-d conv -> what ``padding=`` of jax_convnet takes.

    "SAME" / "VALID" (any case) pass through; an int p means ((p, p), (p, p)); a pair whose items
    are ints p (meaning (p, p)) or (low, high) pairs gives explicit padding. "SAME_LOWER" is kept
    as a string and resolved against the input size by :func:`resolve_same_lower`.
    """
    if isinstance(padding, str):
        upper = padding.upper()
        if upper in ("SAME", "VALID", "SAME_LOWER"):
            return upper
        if upper in _UNSUPPORTED_PADDING:
            raise ValueError(f"{owner}: {name}={padding!r} is not supported (jax_convnet pads with "
                             f"zeros only): {_UNSUPPORTED_PADDING[upper]}")
        raise ValueError(f"{owner}: {name} must be 'SAME', 'VALID', an int or "
                         f"((top, bottom), (left, right)), got {padding!r}")
    if _is_int(padding):
        return ((int(padding), int(padding)),) * 2
    pairs = None
    if isinstance(padding, Sequence) and len(padding) == 2:
        pairs = []
        for p in padding:
            if _is_int(p):
                pairs.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2 and all(_is_int(v) for v in p):
                pairs.append((int(p[0]), int(p[1])))
            else:
                pairs = None
                break
    if pairs is None:
        n = len(padding) if isinstance(padding, Sequence) else None
        extra = (f" ({n} spatial dimensions given; only 2-d convolutions and pools are supported)"
                 if n not in (None, 2) else "")
        raise ValueError(f"{owner}: {name} must be 'SAME', 'VALID', an int or "
                         f"((top, bottom), (left, right)), got {padding!r}{extra}")
    if min(min(p) for p in pairs) < 0:
        raise ValueError(f"{owner}: {name} must be non-negative (jax_convnet does not crop), "
                         f"got {padding!r}")
    return tuple(pairs)


def resolve_same_lower(padding, image_hw, window, strides):
    """'SAME_LOWER' is lax's SAME with the odd pad on the low side: made explicit here."""
    if padding != "SAME_LOWER":
        return padding
    return tuple((int(lo), int(hi))
                 for lo, hi in lax.padtype_to_pads(image_hw, window, strides, "SAME_LOWER"))


# ----------------------------------------------------------------------------- inputs

def flatten_batch(inputs, layout: str, owner: str, *, what: str = "inputs"):
    """4-d inputs in the layout's order; NHWC inputs may, as in flax, have several leading batch
    axes (flattened) or none (an unbatched (H, W, C) image gets a batch axis of 1). Returns
    (flat inputs, the batch shape to restore, or None)."""
    ndim = getattr(inputs, "ndim", None)
    if ndim is None:
        raise TypeError(f"{owner}: {what} must be an array, got {type(inputs).__name__}")
    if layout == "NHWC":
        if ndim == 3:
            return inputs[None], ()
        if ndim < 3:
            raise ValueError(f"{owner}: {what} of shape {tuple(inputs.shape)} have rank {ndim}; "
                             f"only 2-d images (B, H, W, C) are supported")
        if ndim > 4:
            batch = tuple(inputs.shape[:-3])
            return jnp.reshape(inputs, (-1,) + tuple(inputs.shape[-3:])), batch
        return inputs, None
    if ndim != 4:
        raise ValueError(f"{owner}: {what} of shape {tuple(inputs.shape)} must have rank 4 "
                         f"(C, H, W, B) in layout C01B")
    return inputs, None


def unflatten_batch(y, batch):
    return y if batch is None else jnp.reshape(y, batch + tuple(y.shape[1:]))


def image_hw(inputs, layout):
    ax = G.image_axes(layout)
    return int(inputs.shape[ax["h"]]), int(inputs.shape[ax["w"]])


def in_channels(inputs, layout):
    return int(inputs.shape[G.image_axes(layout)["c"]])


# ----------------------------------------------------------------------------- parameters

def kernel_shape(layout, kernel_hw, in_features, out_features):
    """HWIO (fh, fw, C, F) in NHWC, (C, fh, fw, F) in C01B."""
    return G.filter_shape(layout, out_features, in_features, *kernel_hw)


def layout_initializer(kernel_init, layout, kernel_hw, in_features, out_features):
    """In NHWC ``kernel_init`` itself (so the draw equals flax's); in C01B an initializer that
    draws the HWIO kernel flax would draw (same fans) and transposes it to (C, fh, fw, F), so
    both layouts start from the same weights."""
    if layout == "NHWC":
        return kernel_init
    hwio = (*kernel_hw, in_features, out_features)

    def init(key, shape, dtype=jnp.float32):
        return jnp.transpose(kernel_init(key, hwio, dtype), (2, 0, 1, 3))

    return init


def promote(inputs, kernel, bias, dtype):
    """flax's default promotion: ``dtype`` if given, else the result type of the three (inexact)."""
    dtype = _flax_dtypes.canonicalize_dtype(inputs, kernel, bias, dtype=dtype)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return cast(inputs), cast(kernel), cast(bias)


# ----------------------------------------------------------------------------- the computation

def conv(inputs, kernel, bias, *, strides, padding, layout, partial_sum, precision, owner,
         groups=1):
    """filter_acts with flax's padding conventions on (possibly multi-batch) inputs; adds bias.
    ``groups``: flax's feature_group_count (the kernel holds C // groups channels)."""
    x, batch = flatten_batch(inputs, layout, owner)
    kernel_hw = (int(kernel.shape[G.filter_axes(layout)["h"]]),
                 int(kernel.shape[G.filter_axes(layout)["w"]]))
    padding = resolve_same_lower(padding, image_hw(x, layout), kernel_hw, strides)
    y = _conv.filter_acts(x, kernel, stride=strides, padding=padding, partial_sum=partial_sum,
                          layout=layout, precision=precision, groups=groups)
    if bias is not None:
        if layout == "NHWC":
            y = y + bias.reshape((1, 1, 1, -1))
        else:
            y = y + bias.reshape((-1, 1, 1, 1))
    return unflatten_batch(y, batch)


def max_pool(inputs, window_shape, strides=None, padding="VALID", *, layout="NHWC",
             owner="max_pool"):
    """flax.linen.max_pool's semantics (``strides`` defaults to 1, -inf padding, floor rule) with
    jax_convnet's max_pool."""
    layout = check_layout(layout, owner)
    window = window_pair(window_shape, "window_shape", owner)
    strides = stride_pair(strides, "strides", owner)
    padding = conv_padding(padding, owner)
    x, batch = flatten_batch(inputs, layout, owner)
    padding = resolve_same_lower(padding, image_hw(x, layout), window, strides)
    y = _pool.max_pool(x, window, stride=strides, padding=padding, layout=layout)
    return unflatten_batch(y, batch)


def norm_params(owner: str, **kwargs):
    """geometry.norm_params, its errors prefixed with ``owner``."""
    try:
        return G.norm_params(**kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{owner}: {e}") from None


def response_norm(inputs, size, *, kind, add_scale, pow_scale, min_div, blocked, layout, owner):
    """cross_map_norm (kind "cross_map") / response_norm ("same_map") on flax-style inputs."""
    norm_params(owner, size=size, kind=kind, add_scale=add_scale, pow_scale=pow_scale,
                min_div=min_div, blocked=blocked, layout=layout)
    x, batch = flatten_batch(inputs, layout, owner)
    if kind == "cross_map":
        y = _norm.cross_map_norm(x, size, add_scale=add_scale, pow_scale=pow_scale,
                                 min_div=min_div, blocked=blocked, layout=layout)
    else:
        y = _norm.response_norm(x, size, add_scale=add_scale, pow_scale=pow_scale,
                                min_div=min_div, layout=layout)
    return unflatten_batch(y, batch)


def apply_norm(module, inputs, kind):
    """``response_norm`` with a norm module's settings (linen and nnx modules alike: fields
    size, add_scale, pow_scale, min_div, layout, and blocked for kind "cross_map")."""
    return response_norm(inputs, module.size, kind=kind, add_scale=module.add_scale,
                         pow_scale=module.pow_scale, min_div=module.min_div,
                         blocked=module.blocked if kind == "cross_map" else False,
                         layout=module.layout, owner=type(module).__name__)


def check_count_include_pad(value, owner: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: count_include_pad must be True or False, got {value!r}")
    return bool(value)


def avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True, *,
             layout="NHWC", owner="avg_pool"):
    """flax.linen.avg_pool's semantics (``strides`` defaults to 1, zero padding, floor rule,
    ``count_include_pad``) with jax_convnet's avg_pool."""
    layout = check_layout(layout, owner)
    window = window_pair(window_shape, "window_shape", owner)
    strides = stride_pair(strides, "strides", owner)
    padding = conv_padding(padding, owner)
    include = check_count_include_pad(count_include_pad, owner)
    x, batch = flatten_batch(inputs, layout, owner)
    padding = resolve_same_lower(padding, image_hw(x, layout), window, strides)
    y = _pool.avg_pool(x, window, stride=strides, padding=padding, count_include_pad=include,
                       layout=layout)
    return unflatten_batch(y, batch)


# ----------------------------------------------------------------------------- locally connected
# ConvLocal's kernel holds one filter bank per output position: jax_convnet's local filters,
# (Ho, Wo, fh, fw, C, F) in NHWC and (Ho, Wo, C, fh, fw, F) in C01B. flax.linen.ConvLocal's
# kernel is (Ho, Wo, C * fh * fw, F) with rows in (c, i, j) order, which is the C01B kernel
# reshaped; its bias is (Ho, Wo, F), as here in both layouts.

def local_output_hw(image_hw, kernel_hw, strides, padding):
    """(Ho, Wo) of a ConvLocal on images of ``image_hw`` (flax's padding, as conv_padding gives)."""
    padding = resolve_same_lower(padding, image_hw, kernel_hw, strides)
    return G.filter_acts_output_size(image_hw, kernel_hw, stride=strides, padding=padding)


def local_kernel_shape(layout, out_hw, kernel_hw, in_features, out_features):
    return G.local_filter_shape(layout, out_hw, out_features, in_features, *kernel_hw)


def local_kernel_to_flax(kernel, layout):
    """Our ConvLocal kernel as flax.linen.ConvLocal's (Ho, Wo, C * fh * fw, F)."""
    if layout == "NHWC":
        kernel = jnp.transpose(kernel, (0, 1, 4, 2, 3, 5))
    return jnp.reshape(kernel, (*kernel.shape[:2], -1, kernel.shape[-1]))


def local_kernel_from_flax(kernel, kernel_size, layout):
    """flax.linen.ConvLocal's kernel (Ho, Wo, C * fh * fw, F) as ours, for ``kernel_size``
    (fh, fw) and ``layout``."""
    oh, ow, rows, f = kernel.shape
    fh, fw = kernel_size
    kernel = jnp.reshape(kernel, (oh, ow, rows // (fh * fw), fh, fw, f))
    return kernel if layout == "C01B" else jnp.transpose(kernel, (0, 1, 3, 4, 2, 5))


def local_layout_initializer(kernel_init, layout, out_hw, kernel_hw, in_features, out_features):
    """Draws flax.linen.ConvLocal's kernel (same shape, so same fans and values) and rearranges
    it into the layout's filters, so that both start from flax's weights."""
    flax_shape = (*out_hw, in_features * kernel_hw[0] * kernel_hw[1], out_features)

    def init(key, shape, dtype=jnp.float32):
        return local_kernel_from_flax(kernel_init(key, flax_shape, dtype), kernel_hw, layout)

    return init


def conv_local(inputs, kernel, bias, *, strides, padding, layout, precision, owner):
    """local_filter_acts with flax's padding conventions on (possibly multi-batch) inputs; adds
    the (Ho, Wo, F) bias."""
    x, batch = flatten_batch(inputs, layout, owner)
    fax = G.local_filter_axes(layout)
    kernel_hw = (int(kernel.shape[fax["h"]]), int(kernel.shape[fax["w"]]))
    padding = resolve_same_lower(padding, image_hw(x, layout), kernel_hw, strides)
    y = _local.local_filter_acts(x, kernel, stride=strides, padding=padding, layout=layout,
                                 precision=precision)
    if bias is not None:
        y = y + (bias[None] if layout == "NHWC" else jnp.transpose(bias, (2, 0, 1))[..., None])
    return unflatten_batch(y, batch)
