"""The classic cuda-convnet networks as ``flax.linen`` modules built only from jax_convnet's layers.

* :class:`Cifar18` -- the CIFAR-10 "18% in 20 minutes" net, cuda-convnet's
  ``example-layers/layers-18pct.cfg`` with ``layer-params-18pct.cfg``: conv 5x5/32 (pad 2), max
  pool 3x3/2, ReLU, ``rnorm`` size 3; conv 5x5/32 + ReLU, avg pool 3x3/2, ``rnorm`` size 3;
  conv 5x5/64 + ReLU, avg pool 3x3/2; fc 10. ``rnorm``: scale 0.00005, pow 0.75.
* :class:`AlexNet` -- AlexNet as cuda-convnet2 ships it (``layers/layers-imagenet-1gpu.cfg``
  with ``layer-params-imagenet-1gpu.cfg``, the "one weird trick" net): conv 11x11/64 stride 4
  (pad 0), ``cmrnorm`` size 5, max pool 3x3/2, ReLU; conv 5x5/192 (pad 2) + ReLU, ``cmrnorm``
  size 5, max pool; conv 3x3/384, 3x3/256, 3x3/256 (pad 1, ReLU after the first two), max pool,
  ReLU; fc 4096 + ReLU, fc 4096 + ReLU, fc 1000. ``cmrnorm``: scale 0.0001, pow 0.75, minDiv 2.
* :class:`Cifar11` -- the CIFAR-10 11% net, cuda-convnet's ``layers-conv-local-11pct.cfg`` with
  ``layer-params-conv-local-11pct.cfg``: conv 5x5/64 + ReLU, max pool 3x3/2, ``cmrnorm`` size 9;
  conv 5x5/64 + ReLU, ``cmrnorm`` size 9, max pool 3x3/2; two locally connected layers 3x3 (pad
  1) with 64 and 32 filters + ReLU; fc 10. ``cmrnorm``: scale 0.001, pow 0.75.

Each module takes ``layout`` (``"NHWC"``: inputs ``(B, H, W, 3)``, or cuda-convnet's ``"C01B"``:
``(3, H, W, B)``), ``image_size`` (the input height = width; a smaller one runs the same layers on
smaller maps, as the tests do), ``width`` (multiplies every layer's filter and unit count but the
classes', for small test networks; 1 is the cfg's network) and ``dtype`` (the compute dtype;
parameters are float32, as flax). ``input_shape(batch)`` is the shape the module takes and
``feature_sizes()`` the map size after each layer. The output is the logits (float32).

What follows the cfg files exactly: the layer order (a cfg ``neuron=relu`` on a pool layer is a
ReLU after the pool), filter sizes, strides, cuda-convnet's ``pad`` with its ceil rule (AlexNet's
conv1 gives 55x55 from 224x224 with pad 0: the last window overhangs by 3 zero rows/cols),
cuda-convnet's pools (``start`` 0, ceil rule, the last window clipped, the average divided by the
in-image count), the norms' constants -- cuda-convnet's layer parser divides a cfg ``scale`` by
``size`` (``cmrnorm``) or ``size**2`` (``rnorm``) before the kernel, and our ops take that
quotient as ``add_scale`` -- and the initialisation: weights normal with the cfg's ``initW`` as
standard deviation, biases ``initB`` (default 0). Biases as cuda-convnet has them: one per filter
for conv layers (``sharedBiases=1``), one per output position and filter for locally connected
layers, one per unit for fc layers.

Simplified: no dropout (AlexNet's ``dropout2`` layers; the cuda-convnet2 copy in some mirrors
gives the second fc layer 8192 units, here 4096 as in the paper), no weight decay, momentum or
per-layer learning rates (those are the optimizer's business), no data augmentation, and the
loss is the mean softmax cross entropy of the logits (cuda-convnet's ``cost.logreg`` on
``softmax``). The fc layers read the maps flattened per image in the layout's order: ``(H, W, C)``
in NHWC, ``(C, H, W)`` in C01B as cuda-convnet, so a parameter tree belongs to its layout.

:func:`forward_with` runs a module's network as a plain function of its parameter tree on any
table of ops (:data:`REFERENCE_OPS`: the pure-lax references of ``jax_convnet.reference``; the
benchmark passes XLA's own ops): the same network, for checking ours against it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import geometry as G
from . import reference as _reference
from .flax import linen as cnn
from .pool import avg_pool, max_pool

__all__ = ["Cifar18", "AlexNet", "Cifar11", "MODELS", "forward_with", "REFERENCE_OPS",
           "cross_entropy"]


# ----------------------------------------------------------------------------- layer specs
# One record per cfg layer: the modules and forward_with both read these, so the architecture
# is written once.

@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """cfg ``type=conv`` (``local=True``: ``type=local``): ``filters`` of ``size`` x ``size``,
    cuda-convnet's ``pad`` (ceil rule), weights N(0, init_w**2), biases init_b."""
    name: str
    filters: int
    size: int
    stride: int
    pad: int
    init_w: float
    init_b: float = 0.0
    relu: bool = False
    local: bool = False


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """cfg ``type=pool``: ``pool`` "max" or "avg", sizeX 3, stride 2, start 0."""
    name: str
    pool: str
    size: int = 3
    stride: int = 2
    relu: bool = False


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """cfg ``type=cmrnorm`` (``cross_map``) or ``type=rnorm``, with the cfg's ``scale`` (before
    the parser's division), ``pow`` and ``minDiv``."""
    name: str
    cross_map: bool
    size: int
    scale: float
    pow: float
    min_div: float = 1.0

    @property
    def add_scale(self) -> float:
        """The scale the kernel applies: cuda-convnet's parser divides the cfg's by ``size``
        (cmrnorm) or ``size**2`` (rnorm)."""
        return self.scale / (self.size if self.cross_map else self.size ** 2)


@dataclasses.dataclass(frozen=True)
class FcSpec:
    """cfg ``type=fc``."""
    name: str
    outputs: int
    init_w: float
    init_b: float = 0.0
    relu: bool = False


def _scaled(n: int, width: float) -> int:
    return max(1, round(n * width))


def _cifar18(width, classes):
    w = lambda n: _scaled(n, width)
    return (ConvSpec("conv1", w(32), 5, 1, 2, 0.0001),
            PoolSpec("pool1", "max", relu=True),
            NormSpec("rnorm1", False, 3, 0.00005, 0.75),
            ConvSpec("conv2", w(32), 5, 1, 2, 0.01, relu=True),
            PoolSpec("pool2", "avg"),
            NormSpec("rnorm2", False, 3, 0.00005, 0.75),
            ConvSpec("conv3", w(64), 5, 1, 2, 0.01, relu=True),
            PoolSpec("pool3", "avg"),
            FcSpec("fc10", classes, 0.01))


def _alexnet(width, classes):
    w = lambda n: _scaled(n, width)
    return (ConvSpec("conv1", w(64), 11, 4, 0, 0.01),
            NormSpec("rnorm1", True, 5, 0.0001, 0.75, min_div=2.0),
            PoolSpec("pool1", "max", relu=True),
            ConvSpec("conv2", w(192), 5, 1, 2, 0.01, init_b=1.0, relu=True),
            NormSpec("rnorm2", True, 5, 0.0001, 0.75, min_div=2.0),
            PoolSpec("pool2", "max"),
            ConvSpec("conv3", w(384), 3, 1, 1, 0.03, relu=True),
            ConvSpec("conv4", w(256), 3, 1, 1, 0.03, init_b=1.0, relu=True),
            ConvSpec("conv5", w(256), 3, 1, 1, 0.03, init_b=1.0),
            PoolSpec("pool3", "max", relu=True),
            FcSpec("fc4096a", w(4096), 0.01, init_b=1.0, relu=True),
            FcSpec("fc4096b", w(4096), 0.01, init_b=1.0, relu=True),
            FcSpec("fc1000", classes, 0.01, init_b=-7.0))


def _cifar11(width, classes):
    w = lambda n: _scaled(n, width)
    return (ConvSpec("conv1", w(64), 5, 1, 2, 0.0001, relu=True),
            PoolSpec("pool1", "max"),
            NormSpec("rnorm1", True, 9, 0.001, 0.75),
            ConvSpec("conv2", w(64), 5, 1, 2, 0.01, relu=True),
            NormSpec("rnorm2", True, 9, 0.001, 0.75),
            PoolSpec("pool2", "max"),
            ConvSpec("local3", w(64), 3, 1, 1, 0.04, relu=True, local=True),
            ConvSpec("local4", w(32), 3, 1, 1, 0.04, relu=True, local=True),
            FcSpec("fc10", classes, 0.01))


# ----------------------------------------------------------------------------- geometry

def _conv_pads(hw, spec: ConvSpec):
    """cuda-convnet's ``pad`` (ceil rule) as explicit ((top, bottom), (left, right))."""
    return G.conv_padding(hw, (spec.size, spec.size), spec.stride, spec.pad, None)[1]


def _pool_out(hw, spec: PoolSpec):
    return G.pool_geometry(hw, spec.size, stride=spec.stride).output_hw(hw)


def _walk(specs, image_size: int, name: str):
    """[(spec, (H, W) of its input, (H, W) of its output)] for every layer; ValueError naming
    the layer when the maps get too small for it."""
    hw, out = (image_size, image_size), []
    for spec in specs:
        try:
            if isinstance(spec, ConvSpec):
                out_hw = G.filter_acts_output_size(hw, spec.size, stride=spec.stride,
                                                   padding=_conv_pads(hw, spec))
            elif isinstance(spec, PoolSpec):
                out_hw = _pool_out(hw, spec)
            else:
                out_hw = hw
        except ValueError as e:
            raise ValueError(f"image_size={image_size} is too small for {name} (layer "
                             f"{spec.name} on {hw[0]}x{hw[1]} maps: {e})") from None
        out.append((spec, hw, out_hw))
        hw = out_hw
    return out


def _flatten(x, layout):
    """Maps (B, H, W, C) or (C, H, W, B) -> (B, features) in cuda-convnet's per-image order."""
    if x.ndim == 2:
        return x
    if layout == "C01B":
        x = jnp.transpose(x, (3, 0, 1, 2))
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------- the modules

class _CudaConvnet(nn.Module):
    """A cuda-convnet cfg network; subclasses give ``_specs``, the default image size and
    classes."""
    layout: str = "NHWC"
    image_size: int = 32
    width: float = 1.0
    num_classes: int = 10
    dtype: Any = None

    _specs: ClassVar[Callable]  # (width, classes) -> the layer specs
    channels: ClassVar[int] = 3  # RGB images

    def __post_init__(self):
        G.check_layout(self.layout)
        if not (isinstance(self.width, (int, float)) and self.width > 0):
            raise ValueError(f"{type(self).__name__}: width must be > 0, got {self.width!r}")
        self.feature_sizes()  # ValueError now when image_size is too small
        super().__post_init__()

    def layers(self):
        return type(self)._specs(self.width, self.num_classes)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return G.image_shape(self.layout, batch, self.channels, self.image_size, self.image_size)

    def feature_sizes(self) -> dict[str, int]:
        """{layer name: height (= width) of its output maps} for the conv, local and pool
        layers."""
        return {spec.name: out_hw[0] for spec, _, out_hw in
                _walk(self.layers(), self.image_size, type(self).__name__)
                if isinstance(spec, (ConvSpec, PoolSpec))}

    @nn.compact
    def __call__(self, x):
        batch = x.shape[G.image_axes(self.layout)["n"]] if x.ndim == 4 else None
        if x.ndim != 4 or tuple(x.shape) != self.input_shape(batch):
            raise ValueError(f"{type(self).__name__}: inputs must have shape "
                             f"{self.input_shape('B')} (layout {self.layout}, image_size "
                             f"{self.image_size}), got {tuple(x.shape)}")
        layout = self.layout
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for spec, hw, _ in _walk(self.layers(), self.image_size, type(self).__name__):
            if isinstance(spec, ConvSpec):
                cls = cnn.ConvLocal if spec.local else cnn.Conv
                x = cls(spec.filters, (spec.size, spec.size), strides=spec.stride,
                        padding=_conv_pads(hw, spec), dtype=self.dtype, layout=layout,
                        kernel_init=nn.initializers.normal(spec.init_w),
                        bias_init=nn.initializers.constant(spec.init_b), name=spec.name)(x)
            elif isinstance(spec, PoolSpec):
                pool = max_pool if spec.pool == "max" else avg_pool
                x = pool(x, spec.size, stride=spec.stride, layout=layout)
            elif isinstance(spec, NormSpec):
                cls = cnn.CrossMapNorm if spec.cross_map else cnn.ResponseNorm
                x = cls(spec.size, add_scale=spec.add_scale, pow_scale=spec.pow,
                        min_div=spec.min_div, layout=layout, name=spec.name)(x)
            else:
                x = nn.Dense(spec.outputs, dtype=self.dtype,
                             kernel_init=nn.initializers.normal(spec.init_w),
                             bias_init=nn.initializers.constant(spec.init_b),
                             name=spec.name)(_flatten(x, layout))
            if getattr(spec, "relu", False):
                x = nn.relu(x)
        return x.astype(jnp.float32)


class Cifar18(_CudaConvnet):
    """cuda-convnet's CIFAR-10 18% net (``layers-18pct.cfg``); see the module docstring."""
    _specs = staticmethod(_cifar18)


class Cifar11(_CudaConvnet):
    """cuda-convnet's CIFAR-10 11% net with two locally connected layers
    (``layers-conv-local-11pct.cfg``); see the module docstring."""
    _specs = staticmethod(_cifar11)


class AlexNet(_CudaConvnet):
    """AlexNet as cuda-convnet2's ``layers-imagenet-1gpu.cfg`` (cross-map normalization after
    conv1 and conv2, no dropout); see the module docstring."""
    image_size: int = 224
    num_classes: int = 1000
    _specs = staticmethod(_alexnet)


MODELS = {"cifar18": Cifar18, "alexnet_cmr": AlexNet, "cifar11": Cifar11}


def cross_entropy(logits, labels):
    """Mean softmax cross entropy (cuda-convnet's ``cost.logreg`` on ``softmax``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


# ----------------------------------------------------------------------------- the same network
# as a plain function of the parameter tree, on a table of ops

def forward_with(ops: Mapping[str, Callable], model: _CudaConvnet, params, x):
    """``model.apply({"params": params}, x)`` computed with ``ops`` instead of our layers: a
    mapping with

    * ``conv(x, kernel, strides, padding, layout)``: ``kernel`` as our ``Conv`` holds it
      (HWIO in NHWC, (C, fh, fw, F) in C01B), ``padding`` explicit pairs (floor rule);
    * ``local(x, kernel, strides, padding, layout)``: ``kernel`` as our ``ConvLocal`` holds it
      (``(Ho, Wo, fh, fw, C, F)`` in NHWC, ``(Ho, Wo, C, fh, fw, F)`` in C01B);
    * ``max_pool(x, size, stride, layout)``, ``avg_pool(...)``: cuda-convnet's pools;
    * ``cross_map_norm(x, size, add_scale, pow_scale, min_div, layout)``, ``response_norm(...)``.

    Biases, ReLUs, the flattening and the fc layers are computed here, in ``model.dtype``.
    """
    layout, dtype = model.layout, model.dtype or x.dtype
    x = x.astype(dtype)
    for spec, hw, _ in _walk(model.layers(), model.image_size, type(model).__name__):
        if isinstance(spec, ConvSpec):
            p = params[spec.name]
            kernel, bias = p["kernel"].astype(dtype), p["bias"].astype(dtype)
            pads = _conv_pads(hw, spec)
            if spec.local:
                x = ops["local"](x, kernel, spec.stride, pads, layout)
                x = x + (bias[None] if layout == "NHWC" else
                         jnp.transpose(bias, (2, 0, 1))[..., None])
            else:
                x = ops["conv"](x, kernel, spec.stride, pads, layout)
                x = x + bias.reshape((1, 1, 1, -1) if layout == "NHWC" else (-1, 1, 1, 1))
        elif isinstance(spec, PoolSpec):
            x = ops[f"{spec.pool}_pool"](x, spec.size, spec.stride, layout)
        elif isinstance(spec, NormSpec):
            op = ops["cross_map_norm" if spec.cross_map else "response_norm"]
            x = op(x, spec.size, spec.add_scale, spec.pow, spec.min_div, layout)
        else:
            p = params[spec.name]
            x = _flatten(x, layout) @ p["kernel"].astype(dtype) + p["bias"].astype(dtype)
        if getattr(spec, "relu", False):
            x = jax.nn.relu(x)
    return x.astype(jnp.float32)


REFERENCE_OPS = {
    "conv": lambda x, k, s, pads, layout: _reference.filter_acts(x, k, stride=s, padding=pads,
                                                                  layout=layout),
    "local": lambda x, k, s, pads, layout: _reference.local_filter_acts(
        x, k, stride=s, padding=pads, layout=layout),
    "max_pool": lambda x, ds, s, layout: _reference.max_pool(x, ds, stride=s, layout=layout),
    "avg_pool": lambda x, ds, s, layout: _reference.avg_pool(x, ds, stride=s, layout=layout),
    "cross_map_norm": lambda x, n, a, b, m, layout: _reference.cross_map_norm(
        x, n, add_scale=a, pow_scale=b, min_div=m, layout=layout),
    "response_norm": lambda x, n, a, b, m, layout: _reference.response_norm(
        x, n, add_scale=a, pow_scale=b, min_div=m, layout=layout),
}
