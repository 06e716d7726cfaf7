"""``flax.nnx`` modules on jax_convnet's ops: :class:`Conv`, :class:`MaxPool`, :func:`max_pool`,
:class:`AvgPool`, :func:`avg_pool`, :class:`CrossMapNorm`, :class:`ResponseNorm`,
:class:`ConvLocal`.

``Conv`` mirrors ``flax.nnx.Conv``: same arguments (2-d, zero padding), same parameter
attributes ``kernel`` (HWIO ``(fh, fw, C, F)`` in NHWC) and ``bias`` ``(F,)``, same default
initialisers drawn in the same order from ``rngs.params()`` -- so a module built with the same
``Rngs`` seed starts from the same weights as ``flax.nnx.Conv``. ``layout="C01B"`` takes inputs
``(C, H, W, B)`` and keeps ``kernel`` as ``(C, fh, fw, F)`` (the transpose of the HWIO draw).
See :mod:`jax_convnet.flax.linen` for the padding rules and the unsupported arguments.

Example::

    from flax import nnx
    from jax_convnet.flax import nnx as cnn

    conv = cnn.Conv(3, 32, (5, 5), padding="SAME", rngs=nnx.Rngs(0))
    pool = cnn.MaxPool((3, 3), strides=(2, 2), padding="SAME")
    y = pool(nnx.relu(conv(x)))                    # x: (B, H, W, 3)
"""
from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax.numpy as jnp
from flax import nnx as _nnx

from . import _common as C

try:  # flax's own defaults, so the initial weights equal flax.nnx.Conv's
    from flax.nnx.nn.linear import default_bias_init, default_kernel_init
except ImportError:  # pragma: no cover - older layouts of flax
    default_kernel_init = _nnx.initializers.lecun_normal()
    default_bias_init = _nnx.initializers.zeros_init()

__all__ = ["Conv", "MaxPool", "max_pool", "AvgPool", "avg_pool", "CrossMapNorm", "ResponseNorm",
           "ConvLocal"]

_none_data = getattr(_nnx, "data", lambda x: x)

# The constructor arguments both conv modules keep as attributes, as flax.nnx.Conv does.
_CONV_SETTINGS = ("in_features", "out_features", "kernel_size", "strides", "padding",
                  "input_dilation", "kernel_dilation", "feature_group_count", "use_bias", "mask",
                  "dtype", "param_dtype", "precision", "promote_dtype", "preferred_element_type",
                  "layout")


def _init_conv_module(module, arguments, settings, *, kernel_shape, kernel_init, bias_shape,
                      rngs):
    """Draws ``module``'s kernel (and bias where ``use_bias``) as flax.nnx.Conv does, and keeps
    the named ``settings`` of the constructor's (checked, normalised) ``arguments``."""
    module.kernel_shape = kernel_shape
    module.kernel = _nnx.Param(
        kernel_init(rngs.params(), kernel_shape, arguments["param_dtype"]),
        **arguments["kernel_metadata"])
    if arguments["use_bias"]:
        module.bias = _nnx.Param(
            arguments["bias_init"](rngs.params(), bias_shape, arguments["param_dtype"]),
            **arguments["bias_metadata"])
    else:
        module.bias = _none_data(None)
    for name in settings:
        setattr(module, name, arguments[name])


class Conv(_nnx.Module):
    """2-d convolution with ``jax_convnet.filter_acts``; a drop-in for ``flax.nnx.Conv``.

    Args (as ``flax.nnx.Conv``'s, plus ``layout`` and ``partial_sum``):
      in_features, out_features: channels C and filters F.
      kernel_size: (fh, fw); an int (flax: a 1-d kernel) raises, saying to pass (k, k).
      strides: int or (rows, cols); None means 1.
      padding: "SAME", "VALID", int p, or ((top, bottom), (left, right)) / (p_rows, p_cols).
      feature_group_count: groups G (dividing C and F) as flax: the kernel is (fh, fw, C // G, F)
        in NHWC and (C // G, fh, fw, F) in C01B (jax_convnet's ``groups``).
      input_dilation, kernel_dilation, mask, conv_general_dilated, preferred_element_type: only
        their defaults are supported (``ValueError`` otherwise).
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as flax.
      promote_dtype: optional ``fn((inputs, kernel, bias), dtype=...)`` as in flax.nnx; None is
        flax's default promotion.
      rngs: ``nnx.Rngs``; the kernel then the bias key come from ``rngs.params()``.
      kernel_metadata, bias_metadata: metadata for the ``nnx.Param`` s.
      layout: "NHWC" (default) or "C01B".
      partial_sum: cuda-convnet's partial_sum for the kernel gradient (None, int or "auto").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tp.Sequence[int],
        strides: None | int | tp.Sequence[int] = 1,
        *,
        padding: tp.Any = "SAME",
        input_dilation: None | int | tp.Sequence[int] = 1,
        kernel_dilation: None | int | tp.Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: tp.Any = None,
        dtype: tp.Any = None,
        param_dtype: tp.Any = jnp.float32,
        precision: tp.Any = None,
        kernel_init: tp.Callable = default_kernel_init,
        bias_init: tp.Callable = default_bias_init,
        conv_general_dilated: tp.Any = None,
        promote_dtype: tp.Callable | None = None,
        preferred_element_type: tp.Any = None,
        rngs: _nnx.Rngs,
        kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        layout: str = "NHWC",
        partial_sum: int | str | None = None,
    ):
        owner = type(self).__name__
        layout, kernel_size, _, _ = C.check_conv_module(
            owner, "filter_acts", layout=layout, kernel_size=kernel_size, strides=strides,
            padding=padding, input_dilation=input_dilation, kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count, mask=mask,
            conv_general_dilated=conv_general_dilated,
            preferred_element_type=preferred_element_type)
        C.check_features(owner, in_features=in_features, out_features=out_features)
        kernel_in = C.group_channels(owner, feature_group_count, in_features, out_features)

        kernel_shape = C.kernel_shape(layout, kernel_size, kernel_in, out_features)
        init = C.layout_initializer(kernel_init, layout, kernel_size, kernel_in, out_features)
        _init_conv_module(self, locals(), _CONV_SETTINGS + ("partial_sum",),
                          kernel_shape=kernel_shape, kernel_init=init,
                          bias_shape=(out_features,), rngs=rngs)

    def __call__(self, inputs, out_sharding=None):
        owner = type(self).__name__
        inputs, kernel, bias = C.nnx_operands(self, inputs, out_sharding, owner)
        return C.conv(inputs, kernel, bias,
                      strides=C.stride_pair(self.strides, "strides", owner),
                      padding=C.conv_padding(self.padding, owner), layout=self.layout,
                      partial_sum=self.partial_sum, precision=self.precision, owner=owner,
                      groups=int(self.feature_group_count))


def max_pool(inputs, window_shape, strides=None, padding="VALID", *, layout="NHWC"):
    """``flax.nnx.max_pool`` (= ``flax.linen.max_pool``) with jax_convnet's max_pool; see
    :func:`jax_convnet.flax.linen.max_pool`."""
    return C.max_pool(inputs, window_shape, strides, padding, layout=layout, owner="max_pool")


class MaxPool(_nnx.Module):
    """:func:`max_pool` as a module (no parameters)."""

    def __init__(self, window_shape, strides=None, padding="VALID", *, layout="NHWC"):
        owner = type(self).__name__
        self.layout = C.check_layout(layout, owner)
        self.window_shape = C.window_pair(window_shape, "window_shape", owner)
        C.stride_pair(strides, "strides", owner)
        C.conv_padding(padding, owner)
        self.strides = strides
        self.padding = padding

    def __call__(self, inputs):
        return C.max_pool(inputs, self.window_shape, self.strides, self.padding,
                          layout=self.layout, owner=type(self).__name__)


class CrossMapNorm(_nnx.Module):
    """``jax_convnet.cross_map_norm`` as a module (no parameters); see
    :class:`jax_convnet.flax.linen.CrossMapNorm`."""

    def __init__(self, size, add_scale, pow_scale, min_div=1.0, blocked=False, *,
                 layout="NHWC"):
        C.norm_params(type(self).__name__, size=size, kind="cross_map", add_scale=add_scale,
                      pow_scale=pow_scale, min_div=min_div, blocked=blocked, layout=layout)
        self.size, self.add_scale, self.pow_scale = size, add_scale, pow_scale
        self.min_div, self.blocked, self.layout = min_div, blocked, layout

    def __call__(self, inputs):
        return C.apply_norm(self, inputs, "cross_map")


class ResponseNorm(_nnx.Module):
    """``jax_convnet.response_norm`` as a module (no parameters); see
    :class:`jax_convnet.flax.linen.ResponseNorm`."""

    def __init__(self, size, add_scale, pow_scale, min_div=1.0, *, layout="NHWC"):
        C.norm_params(type(self).__name__, size=size, kind="same_map", add_scale=add_scale,
                      pow_scale=pow_scale, min_div=min_div, blocked=False, layout=layout)
        self.size, self.add_scale, self.pow_scale = size, add_scale, pow_scale
        self.min_div, self.layout = min_div, layout

    def __call__(self, inputs):
        return C.apply_norm(self, inputs, "same_map")


def avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True, *,
             layout="NHWC"):
    """``flax.nnx.avg_pool`` (= ``flax.linen.avg_pool``) with jax_convnet's avg_pool; see
    :func:`jax_convnet.flax.linen.avg_pool`."""
    return C.avg_pool(inputs, window_shape, strides, padding, count_include_pad, layout=layout,
                      owner="avg_pool")


class AvgPool(_nnx.Module):
    """:func:`avg_pool` as a module (no parameters)."""

    def __init__(self, window_shape, strides=None, padding="VALID", count_include_pad=True, *,
                 layout="NHWC"):
        owner = type(self).__name__
        self.layout = C.check_layout(layout, owner)
        self.window_shape = C.window_pair(window_shape, "window_shape", owner)
        C.stride_pair(strides, "strides", owner)
        C.conv_padding(padding, owner)
        self.count_include_pad = C.check_count_include_pad(count_include_pad, owner)
        self.strides = strides
        self.padding = padding

    def __call__(self, inputs):
        return C.avg_pool(inputs, self.window_shape, self.strides, self.padding,
                          self.count_include_pad, layout=self.layout, owner=type(self).__name__)


class ConvLocal(_nnx.Module):
    """Locally connected layer (cuda-convnet's ``local``) with ``jax_convnet.local_filter_acts``,
    for ``flax.nnx`` (which has no ConvLocal): ``flax.nnx.Conv``'s arguments plus
    ``input_size``, the (H, W) of the images it will see (its parameters, one filter bank per
    output position, depend on the output size).

    ``kernel`` is ``(Ho, Wo, fh, fw, C, F)`` in NHWC and ``(Ho, Wo, C, fh, fw, F)`` in C01B,
    drawn by ``kernel_init`` in ``flax.linen.ConvLocal``'s kernel shape ``(Ho, Wo, C * fh * fw,
    F)`` (so with its fans) and rearranged; ``bias`` is ``(Ho, Wo, F)``. The kernel then the bias
    key come from ``rngs.params()``. See :class:`jax_convnet.flax.linen.ConvLocal`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tp.Sequence[int],
        strides: None | int | tp.Sequence[int] = 1,
        *,
        input_size: tp.Sequence[int],
        padding: tp.Any = "SAME",
        input_dilation: None | int | tp.Sequence[int] = 1,
        kernel_dilation: None | int | tp.Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: tp.Any = None,
        dtype: tp.Any = None,
        param_dtype: tp.Any = jnp.float32,
        precision: tp.Any = None,
        kernel_init: tp.Callable = default_kernel_init,
        bias_init: tp.Callable = default_bias_init,
        conv_general_dilated: tp.Any = None,
        promote_dtype: tp.Callable | None = None,
        preferred_element_type: tp.Any = None,
        rngs: _nnx.Rngs,
        kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        layout: str = "NHWC",
    ):
        owner = type(self).__name__
        layout, kernel_size, stride_hw, pads = C.check_conv_module(
            owner, "local_filter_acts", layout=layout, kernel_size=kernel_size, strides=strides,
            padding=padding, input_dilation=input_dilation, kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count, mask=mask,
            conv_general_dilated=conv_general_dilated,
            preferred_element_type=preferred_element_type)
        C.check_features(owner, in_features=in_features, out_features=out_features)
        input_size = C.window_pair(input_size, "input_size", owner)
        out_hw = C.local_output_hw(input_size, kernel_size, stride_hw, pads)

        kernel_shape = C.local_kernel_shape(layout, out_hw, kernel_size, in_features,
                                            out_features)
        init = C.local_layout_initializer(kernel_init, layout, out_hw, kernel_size, in_features,
                                          out_features)
        _init_conv_module(self, locals(), _CONV_SETTINGS + ("input_size",),
                          kernel_shape=kernel_shape, kernel_init=init,
                          bias_shape=(*out_hw, out_features), rngs=rngs)

    def __call__(self, inputs, out_sharding=None):
        owner = type(self).__name__
        inputs, kernel, bias = C.nnx_operands(self, inputs, out_sharding, owner)
        return C.conv_local(inputs, kernel, bias,
                            strides=C.stride_pair(self.strides, "strides", owner),
                            padding=C.conv_padding(self.padding, owner), layout=self.layout,
                            precision=self.precision, owner=owner)
