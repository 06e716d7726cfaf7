"""``flax.linen`` modules on jax_convnet's ops: :class:`Conv`, :class:`MaxPool`, :func:`max_pool`,
:class:`AvgPool`, :func:`avg_pool`, :class:`CrossMapNorm`, :class:`ResponseNorm`,
:class:`ConvLocal`.

``Conv`` takes ``flax.linen.Conv``'s arguments (2-d, zero padding) and names and shapes its
parameters like it: in NHWC ``kernel`` is HWIO ``(fh, fw, C, F)`` and ``bias`` ``(F,)``, so a
parameter tree made for ``flax.linen.Conv`` works unchanged. In ``layout="C01B"`` inputs are
``(C, H, W, B)``, outputs ``(F, Ho, Wo, B)`` and ``kernel`` is ``(C, fh, fw, F)``; it is
initialised as the transpose of the HWIO kernel flax would draw, so both layouts start equal.

Padding follows flax (XLA's floor rule): ``"SAME"``, ``"VALID"``, an int ``p`` meaning
``((p, p), (p, p))``, or a pair of ints / ``(low, high)`` pairs. Inputs may have several leading
batch axes or none (an unbatched ``(H, W, C)`` image), as in flax. An int ``kernel_size`` means a
1-d kernel in flax, so it raises here (pass ``(k, k)``). Arguments flax takes that jax_convnet
cannot honour (CIRCULAR / REFLECT / CAUSAL padding, dilations, feature groups, masks, 1-d or 3-d
windows) raise ``ValueError`` naming the argument.

Example::

    import flax.linen as nn
    from jax_convnet.flax import linen as cnn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):                     # (B, 32, 32, 3)
            x = nn.relu(cnn.Conv(32, (5, 5))(x))
            x = cnn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            return nn.Dense(10)(x.reshape(x.shape[0], -1))
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.linear import default_kernel_init

from . import _common as C

__all__ = ["Conv", "MaxPool", "max_pool", "AvgPool", "avg_pool", "CrossMapNorm", "ResponseNorm",
           "ConvLocal", "local_kernel_from_flax", "local_kernel_to_flax"]

PaddingLike = Any


class _ConvModule(nn.Module):
    """The attributes, checks and dtype promotion Conv and ConvLocal share: flax.linen.Conv's
    attributes plus ``layout``; ``_op`` names the jax_convnet op that checks them."""

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = initializers.zeros_init()
    promote_dtype: Callable | None = None
    layout: str = "NHWC"
    conv_general_dilated: Any = None
    conv_general_dilated_cls: Any = None
    _op = "filter_acts"

    def __post_init__(self):
        C.check_conv_module(type(self).__name__, self._op, layout=self.layout,
                            kernel_size=self.kernel_size, strides=self.strides,
                            padding=self.padding,
                            conv_general_dilated_cls=self.conv_general_dilated_cls,
                            input_dilation=self.input_dilation,
                            kernel_dilation=self.kernel_dilation,
                            feature_group_count=self.feature_group_count, mask=self.mask,
                            conv_general_dilated=self.conv_general_dilated)
        super().__post_init__()

    def _arguments(self, inputs):
        """The op's arguments from the attributes: owner (the class name, for errors), kernel
        (h, w), strides, padding, and the inputs with their batch axes flattened to one."""
        owner = type(self).__name__
        kernel_hw = C.kernel_pair(self.kernel_size, owner)
        strides = C.stride_pair(self.strides, "strides", owner)
        padding = C.conv_padding(self.padding, owner)
        flat, _ = C.flatten_batch(inputs, self.layout, owner)
        return owner, kernel_hw, strides, padding, flat

    def _promote(self, inputs, kernel, bias):
        if self.promote_dtype is None:
            return C.promote(inputs, kernel, bias, self.dtype)
        return self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)


class Conv(_ConvModule):
    """2-d convolution with ``jax_convnet.filter_acts``; a drop-in for ``flax.linen.Conv``.

    Attributes (as ``flax.linen.Conv``'s, plus ``layout`` and ``partial_sum``):
      features: number of filters F.
      kernel_size: (fh, fw); an int (flax: a 1-d kernel) raises, saying to pass (k, k).
      strides: int or (rows, cols); None means 1.
      padding: "SAME", "VALID", int p, or ((top, bottom), (left, right)) / (p_rows, p_cols).
      feature_group_count: groups G (dividing C and F) as flax: the kernel is (fh, fw, C // G, F)
        in NHWC and (C // G, fh, fw, F) in C01B; filter f reads the channels of group
        f // (F // G) (jax_convnet's ``groups``).
      input_dilation, kernel_dilation, mask: only their defaults (1, 1, None) are supported;
        kept so code that passes them explicitly keeps working.
      use_bias: add a bias (F,).
      dtype: computation dtype (default: inferred from inputs and parameters, as flax).
      param_dtype: parameter dtype.
      precision: ``None`` (``jax_default_matmul_precision``), a ``jax.lax.Precision`` or its name.
      kernel_init, bias_init: initializers (flax's defaults).
      promote_dtype: optional ``fn(inputs, kernel, bias, dtype=...)`` as in flax.linen; None
        is flax's default promotion.
      layout: "NHWC" (default) or "C01B".
      partial_sum: cuda-convnet's partial_sum for the kernel gradient (None, an int dividing
        Ho*Wo, or "auto"); changes speed and memory only.
    """

    partial_sum: int | str | None = None

    @nn.compact
    def __call__(self, inputs):
        layout = self.layout
        owner, kernel_hw, strides, padding, flat = self._arguments(inputs)
        kernel_in = C.group_channels(owner, self.feature_group_count,
                                     C.in_channels(flat, layout), self.features)

        kernel = self.param(
            "kernel",
            C.layout_initializer(self.kernel_init, layout, kernel_hw, kernel_in, self.features),
            C.kernel_shape(layout, kernel_hw, kernel_in, self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)

        inputs, kernel, bias = self._promote(inputs, kernel, bias)
        return C.conv(inputs, kernel, bias, strides=strides, padding=padding, layout=layout,
                      partial_sum=self.partial_sum, precision=self.precision, owner=owner,
                      groups=int(self.feature_group_count))


def max_pool(inputs, window_shape, strides=None, padding="VALID", *, layout="NHWC"):
    """``flax.linen.max_pool`` with jax_convnet's max_pool.

    Same semantics: ``strides`` defaults to 1 (not the window), padding is "SAME", "VALID" or
    explicit (low, high) pairs (padded elements are -inf) and sizes follow XLA's floor rule.
    NHWC inputs are (B, H, W, C) (more leading batch axes are flattened); ``layout="C01B"`` takes
    (C, H, W, B). The gradient goes to the first maximal element of each window.
    """
    return C.max_pool(inputs, window_shape, strides, padding, layout=layout, owner="max_pool")


def _check_window_fields(module):
    """A pool module's layout, window_shape, strides and padding, checked at construction."""
    owner = type(module).__name__
    C.check_layout(module.layout, owner)
    C.window_pair(module.window_shape, "window_shape", owner)
    C.stride_pair(module.strides, "strides", owner)
    C.conv_padding(module.padding, owner)


class MaxPool(nn.Module):
    """:func:`max_pool` as a module (no parameters)."""

    window_shape: int | Sequence[int]
    strides: None | int | Sequence[int] = None
    padding: PaddingLike = "VALID"
    layout: str = "NHWC"

    def __post_init__(self):
        _check_window_fields(self)
        super().__post_init__()

    def __call__(self, inputs):
        return C.max_pool(inputs, self.window_shape, self.strides, self.padding,
                          layout=self.layout, owner=type(self).__name__)


class CrossMapNorm(nn.Module):
    """``jax_convnet.cross_map_norm`` as a module (no parameters): cuda-convnet's ``cmrnorm``,
    pylearn2's ``CrossMapNorm``. ``add_scale`` is applied as given (a cuda-convnet cfg ``scale``
    is ``add_scale * size``). NHWC inputs may have several leading batch axes or none."""

    size: int
    add_scale: float
    pow_scale: float
    min_div: float = 1.0
    blocked: bool = False
    layout: str = "NHWC"

    def __post_init__(self):
        C.norm_params(type(self).__name__, size=self.size, kind="cross_map",
                      add_scale=self.add_scale, pow_scale=self.pow_scale, min_div=self.min_div,
                      blocked=self.blocked, layout=self.layout)
        super().__post_init__()

    def __call__(self, inputs):
        return C.apply_norm(self, inputs, "cross_map")


class ResponseNorm(nn.Module):
    """``jax_convnet.response_norm`` as a module (no parameters): cuda-convnet's ``rnorm``.
    ``add_scale`` is applied as given (a cuda-convnet cfg ``scale`` is ``add_scale * size**2``).
    NHWC inputs may have several leading batch axes or none."""

    size: int
    add_scale: float
    pow_scale: float
    min_div: float = 1.0
    layout: str = "NHWC"

    def __post_init__(self):
        C.norm_params(type(self).__name__, size=self.size, kind="same_map",
                      add_scale=self.add_scale, pow_scale=self.pow_scale, min_div=self.min_div,
                      blocked=False, layout=self.layout)
        super().__post_init__()

    def __call__(self, inputs):
        return C.apply_norm(self, inputs, "same_map")


def avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True, *,
             layout="NHWC"):
    """``flax.linen.avg_pool`` with jax_convnet's avg_pool.

    Same semantics: ``strides`` defaults to 1 (not the window), padding is "SAME", "VALID" or
    explicit (low, high) pairs (padded elements are zeros), sizes follow XLA's floor rule, and each
    window is divided by its area (``count_include_pad=True``) or by its in-image element count.
    Sums are taken in float32 and the result keeps the inputs' dtype (flax's
    ``count_include_pad=False`` returns float32 for 16-bit inputs). NHWC inputs are (B, H, W, C)
    (more leading batch axes are flattened); ``layout="C01B"`` takes (C, H, W, B). For
    cuda-convnet's ceil-rule windows use :func:`jax_convnet.avg_pool` itself.
    """
    return C.avg_pool(inputs, window_shape, strides, padding, count_include_pad, layout=layout,
                      owner="avg_pool")


class AvgPool(nn.Module):
    """:func:`avg_pool` as a module (no parameters)."""

    window_shape: int | Sequence[int]
    strides: None | int | Sequence[int] = None
    padding: PaddingLike = "VALID"
    count_include_pad: bool = True
    layout: str = "NHWC"

    def __post_init__(self):
        _check_window_fields(self)
        C.check_count_include_pad(self.count_include_pad, type(self).__name__)
        super().__post_init__()

    def __call__(self, inputs):
        return C.avg_pool(inputs, self.window_shape, self.strides, self.padding,
                          self.count_include_pad, layout=self.layout, owner=type(self).__name__)


class ConvLocal(_ConvModule):
    """Locally connected layer (cuda-convnet's ``local``) with ``jax_convnet.local_filter_acts``;
    the arguments and parameter names of ``flax.linen.ConvLocal``.

    ``kernel`` holds one filter bank per output position as ``local_filter_acts`` takes it:
    ``(Ho, Wo, fh, fw, C, F)`` in NHWC, ``(Ho, Wo, C, fh, fw, F)`` in C01B (flax's
    ``(Ho, Wo, C * fh * fw, F)`` is the C01B kernel reshaped: ``local_kernel_from_flax`` /
    ``local_kernel_to_flax`` convert); it is initialised with flax's draw, so both layouts start
    from ``flax.linen.ConvLocal``'s weights. ``bias`` is ``(Ho, Wo, F)`` as in flax. Padding,
    strides and the unsupported arguments as in :class:`Conv`.
    """

    _op = "local_filter_acts"

    @nn.compact
    def __call__(self, inputs):
        layout = self.layout
        owner, kernel_hw, strides, padding, flat = self._arguments(inputs)
        in_features = C.in_channels(flat, layout)
        out_hw = C.local_output_hw(C.image_hw(flat, layout), kernel_hw, strides, padding)

        kernel = self.param(
            "kernel",
            C.local_layout_initializer(self.kernel_init, layout, out_hw, kernel_hw, in_features,
                                       self.features),
            C.local_kernel_shape(layout, out_hw, kernel_hw, in_features, self.features),
            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (*out_hw, self.features), self.param_dtype)
                if self.use_bias else None)

        inputs, kernel, bias = self._promote(inputs, kernel, bias)
        return C.conv_local(inputs, kernel, bias, strides=strides, padding=padding, layout=layout,
                            precision=self.precision, owner=owner)


local_kernel_from_flax = C.local_kernel_from_flax
local_kernel_to_flax = C.local_kernel_to_flax
