"""Whole networks for ``python -m jax_convnet.benchmark --nets``: AlexNet and cuda-convnet's
CIFAR-10 net (``NETS``), and the cfg networks of ``jax_convnet.models`` (``MODEL_NETS``, below), as
one jitted training step (forward, backward, SGD update), built either from
jax_convnet's ops (``filter_acts`` + ``max_pool``) or from XLA's (``lax.conv_general_dilated`` +
``lax.reduce_window``), in either layout and compute dtype.

Both variants compute the same network on the same parameters:

* convolutions take XLA's ``padding=`` (floor rule) in both: under cuda-convnet's ceil rule
  (``pad=``) AlexNet's conv1 (224 + 2*2 - 11 over stride 4) would have 56 outputs, not 55;
* pools are cuda-convnet's 3x3 windows every 2 pixels with the ceil rule (our ``max_pool``'s
  default), and XLA's ``reduce_window`` gets the same windows as -inf padding at the bottom/right
  from ``geometry.pool_geometry`` (none for AlexNet at 224, where the rule agrees with VALID; one
  pixel for the CIFAR-10 net: 32 -> 16 -> 8 -> 4 as in cuda-convnet, where VALID gives 15, 7, 3).

Parameters are float32 and cast to the compute dtype inside the step (as
``baselines/xla_e2e.py``); no biases; logits go to float32 for the softmax cross entropy.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import geometry as G
from .conv import filter_acts
from .pool import max_pool

OPS = ("ours", "xla")
_DIMENSION_NUMBERS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "C01B": ("CHWN", "IHWO", "CHWN")}
POOL_WINDOW, POOL_STRIDE = 3, 2
LEARNING_RATE = 0.01


@dataclasses.dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    pool: bool  # a 3x3 / 2 max pool after the ReLU


@dataclasses.dataclass(frozen=True)
class Net:
    name: str
    image_size: int  # input height = width
    batch: int
    convs: tuple[Conv, ...]
    dense: tuple[int, ...]  # output widths of the dense layers (ReLU between them); last: classes
    # convs whose filters (output channels) split over the mesh axis "model" in model_shardings
    model_split: tuple[int, ...] = ()


NETS = {
    # Krizhevsky's "one weird trick" AlexNet, as baselines/xla_e2e.py.
    "alexnet": Net("alexnet", 224, 128, (
        Conv(3, 64, 11, 4, 2, True), Conv(64, 192, 5, 1, 2, True), Conv(192, 384, 3, 1, 1, False),
        Conv(384, 256, 3, 1, 1, False), Conv(256, 256, 3, 1, 1, True)), (4096, 4096, 1000),
        model_split=(2, 3, 4)),  # conv3-conv5: the widest (384, 256, 256 filters)
    # cuda-convnet's layers-18pct / layers-80sec CIFAR-10 net: three 5x5 conv + pool blocks
    # (all max pools here, no response normalization).
    "cifar10": Net("cifar10", 32, 128, (
        Conv(3, 32, 5, 1, 2, True), Conv(32, 32, 5, 1, 2, True), Conv(32, 64, 5, 1, 2, True)),
        (10,)),
}


def _pads(c: Conv):
    return ((c.pad, c.pad), (c.pad, c.pad))


def _pool_padding(hw):
    """-inf padding ((top, bottom), (left, right)) that gives XLA the ceil rule's windows."""
    return G.pool_geometry(hw, POOL_WINDOW, stride=POOL_STRIDE).padding


def feature_sizes(net: Net, image_size: int | None = None) -> list[int]:
    """Height (= width) after each conv block, from the geometry rules; ValueError when an image
    of ``image_size`` is too small for the network."""
    if isinstance(net, ModelNet):
        return _model_feature_sizes(net, image_size)
    size = image_size or net.image_size
    sizes = []
    try:
        for c in net.convs:
            size = G.filter_acts_output_size(size, c.k, stride=c.stride, padding=_pads(c))[0]
            if c.pool:
                size = G.max_pool_output_size(size, POOL_WINDOW, stride=POOL_STRIDE)[0]
            sizes.append(size)
    except ValueError as e:
        raise ValueError(f"image_size={image_size or net.image_size} is too small for "
                         f"{net.name} (block {len(sizes) + 1}: {e})") from None
    return sizes


def dense_input_size(net: Net, image_size: int | None = None) -> int:
    return net.convs[-1].cout * feature_sizes(net, image_size)[-1] ** 2


def param_shapes(net: Net, layout: str, image_size: int | None = None) -> list[tuple]:
    """The filters' shapes (the layout's filter order), then the dense weights' (in, out)."""
    shapes = [G.filter_shape(layout, c.cout, c.cin, c.k, c.k) for c in net.convs]
    width = dense_input_size(net, image_size)
    for out in net.dense:
        shapes.append((width, out))
        width = out
    return shapes


def init_params(net: Net, layout: str, seed: int = 0, image_size: int | None = None) -> list:
    """He-normal float32 parameters, drawn by NumPy (no compilation per shape, as
    ``jax.random`` would need)."""
    if isinstance(net, ModelNet):
        return _model_init_params(net, layout, seed, image_size)
    rng = np.random.default_rng(seed)
    params = []
    for shape in param_shapes(net, layout, image_size):
        fan_in = math.prod(shape[:-1])  # filters: C * fh * fw in either layout
        gain = 2.0 if len(shape) == 4 else 1.0
        params.append(rng.standard_normal(shape, np.float32) * np.float32((gain / fan_in) ** 0.5))
    return [jnp.asarray(p) for p in params]


def make_batch(net: Net, layout: str, seed: int = 1, *, batch: int | None = None,
               image_size: int | None = None):
    """(float32 images in the layout, int32 labels)."""
    n, size = batch or net.batch, image_size or net.image_size
    if isinstance(net, ModelNet):
        model = net.model(layout, image_size=size)
        channels, classes = model.channels, model.num_classes
    else:
        channels, classes = net.convs[0].cin, net.dense[-1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(G.image_shape(layout, n, channels, size, size), np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, classes, n, dtype=np.int32))


def _conv(ops, h, w, c: Conv, layout):
    if ops == "ours":
        return filter_acts(h, w, stride=c.stride, padding=_pads(c), layout=layout)
    return lax.conv_general_dilated(h, w, (c.stride, c.stride), _pads(c),
                                    dimension_numbers=_DIMENSION_NUMBERS[layout])


def _pool(ops, h, layout):
    if ops == "ours":
        return max_pool(h, POOL_WINDOW, stride=POOL_STRIDE, layout=layout)
    ax = G.image_axes(layout)
    window, strides, padding = [1] * 4, [1] * 4, [(0, 0)] * 4
    hw_pads = _pool_padding((h.shape[ax["h"]], h.shape[ax["w"]]))
    for axis, pads in zip(("h", "w"), hw_pads):
        window[ax[axis]], strides[ax[axis]], padding[ax[axis]] = POOL_WINDOW, POOL_STRIDE, pads
    return lax.reduce_window(h, -jnp.inf, lax.max, tuple(window), tuple(strides), padding)


def forward(params, x, net: Net, *, ops: str, layout: str, dtype):
    """float32 logits of ``x`` (float32, cast to ``dtype`` like the parameters)."""
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    h = x.astype(dtype)
    for w, c in zip(params, net.convs):
        h = jax.nn.relu(_conv(ops, h, w.astype(dtype), c, layout))
        if c.pool:
            h = _pool(ops, h, layout)
    if layout == "C01B":
        h = jnp.transpose(h, (3, 0, 1, 2))
    h = h.reshape(h.shape[0], -1)
    dense = params[len(net.convs):]
    for i, w in enumerate(dense):
        h = h @ w.astype(dtype)
        if i < len(dense) - 1:
            h = jax.nn.relu(h)
    return h.astype(jnp.float32)


def loss(params, x, y, net: Net, *, ops: str, layout: str, dtype):
    """Mean softmax cross entropy."""
    logits = forward(params, x, net, ops=ops, layout=layout, dtype=dtype)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def train_step(net: Net, *, ops: str, layout: str, dtype, learning_rate=LEARNING_RATE):
    """``(params, x, y) -> (params after one SGD step, loss)``, not jitted."""
    if isinstance(net, ModelNet):
        return _model_train_step(net, ops=ops, layout=layout, dtype=dtype,
                                 learning_rate=learning_rate)
    value_and_grad = jax.value_and_grad(
        lambda p, x, y: loss(p, x, y, net, ops=ops, layout=layout, dtype=dtype))

    def step(params, x, y):
        value, grads = value_and_grad(params, x, y)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), value
    return step


def step_shardings(net: Net, layout: str, mesh, *, model: bool = False):
    """(parameter shardings, image sharding, label sharding) on ``mesh`` (axes "data" and, with
    ``model``, "model"): the batch split over "data", the parameters replicated, except with
    ``model`` the filters of ``net.model_split`` split over "model" on their output-channel axis
    (cuda-convnet2's model parallelism, here left to the ops' sharding rules)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    if model and not net.model_split:
        raise ValueError(f"{net.name} has no layers to split over a model axis")
    f_axis = G.filter_axes(layout)["f"]
    params = []
    for i in range(len(net.convs) + len(net.dense)):
        spec = [None] * (4 if i < len(net.convs) else 2)
        if model and i in net.model_split:
            spec[f_axis] = "model"
        params.append(NamedSharding(mesh, P(*spec)))
    image = [None] * 4
    image[G.image_axes(layout)["n"]] = "data"
    return params, NamedSharding(mesh, P(*image)), NamedSharding(mesh, P("data"))


# ----------------------------------------------------------------------------- cuda-convnet's cfg nets
# The three networks of jax_convnet.models (Flax modules on our layers: convolutions, locally
# connected layers, cuda-convnet's max and average pools, cross-map and same-map response
# normalization) against the same networks on XLA's ops, run by models.forward_with on the
# module's parameter tree: lax.conv_general_dilated, lax.conv_general_dilated_local (its kernel,
# flax's (Ho, Wo, C * fh * fw, F), rearranged from ours inside the step: a reshape in C01B, a
# transpose in NHWC), lax.reduce_window max and sum (divided by the in-image count) with the
# ceil rule's windows as padding, and the response norms in jnp (a reduce_window sum of squares
# in float32 over the channel or spatial window). Parameters are float32 and the module's dtype
# is the compute dtype; the benchmark draws He-normal weights and zero biases (the cfg's initW /
# initB would leave the updates of biases initialised to 1 under float32's resolution, where the
# two steps' updates cannot be compared).

@dataclasses.dataclass(frozen=True)
class ModelNet:
    name: str  # a key of jax_convnet.models.MODELS
    image_size: int
    batch: int
    model_split: tuple[int, ...] = ()

    def model(self, layout: str, dtype=None, image_size: int | None = None):
        from . import models
        return models.MODELS[self.name](layout=layout, image_size=image_size or self.image_size,
                                        dtype=dtype)


MODEL_NETS = {
    "cifar18": ModelNet("cifar18", 32, 128),  # layers-18pct.cfg
    "alexnet_cmr": ModelNet("alexnet_cmr", 224, 128),  # cuda-convnet2 layers-imagenet-1gpu.cfg
    "cifar11": ModelNet("cifar11", 32, 128),  # layers-conv-local-11pct.cfg
}
ALL_NETS = {**NETS, **MODEL_NETS}


def _model_feature_sizes(net: ModelNet, image_size=None) -> list[int]:
    try:
        return list(net.model("NHWC", image_size=image_size).feature_sizes().values())
    except ValueError as e:
        raise ValueError(f"{net.name}: {e}") from None


def _model_init_params(net: ModelNet, layout: str, seed: int = 0, image_size=None):
    """He-normal float32 kernels (fan-in: C * fh * fw), zero biases, drawn by NumPy."""
    model = net.model(layout, image_size=image_size)
    x = jax.ShapeDtypeStruct(model.input_shape(1), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['bias']"):
            return jnp.zeros(leaf.shape, jnp.float32)
        shape = leaf.shape
        fan_in = math.prod(shape[2:-1] if len(shape) == 6 else shape[:-1])  # local: (Ho, Wo, ..)
        gain = 1.0 if len(shape) == 2 else 2.0
        return jnp.asarray(rng.standard_normal(shape, np.float32)
                           * np.float32((gain / fan_in) ** 0.5))
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _model_train_step(net: ModelNet, *, ops: str, layout: str, dtype,
                      learning_rate=LEARNING_RATE):
    from . import models
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")

    def loss(params, x, y):
        model = net.model(layout, dtype, x.shape[G.image_axes(layout)["h"]])
        if ops == "ours":
            logits = model.apply({"params": params}, x)
        else:
            logits = models.forward_with(XLA_OPS, model, params, x)
        return models.cross_entropy(logits, y)
    value_and_grad = jax.value_and_grad(loss)

    def step(params, x, y):
        value, grads = value_and_grad(params, x, y)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), value
    return step


def _xla_pool_window(h, ds, stride, layout):
    """reduce_window's window, strides and padding giving cuda-convnet's pool windows."""
    ax = G.image_axes(layout)
    hw = (h.shape[ax["h"]], h.shape[ax["w"]])
    geom = G.pool_geometry(hw, ds, stride=stride)
    window, strides, padding = [1] * 4, [1] * 4, [(0, 0)] * 4
    for k, axis in enumerate(("h", "w")):
        window[ax[axis]], strides[ax[axis]] = geom.window[k], geom.strides[k]
        padding[ax[axis]] = geom.padding[k]
    return tuple(window), tuple(strides), padding, geom, hw


def _xla_max_pool(h, ds, stride, layout):
    window, strides, padding, _, _ = _xla_pool_window(h, ds, stride, layout)
    return lax.reduce_window(h, -jnp.inf, lax.max, window, strides, padding)


def _xla_avg_pool(h, ds, stride, layout):
    """The window sums over the count of in-image elements (a constant)."""
    window, strides, padding, geom, hw = _xla_pool_window(h, ds, stride, layout)
    sums = lax.reduce_window(h.astype(jnp.float32), 0.0, lax.add, window, strides, padding)
    counts = []
    for k in range(2):
        starts = np.arange(geom.output_hw(hw)[k]) * geom.strides[k] - geom.padding[k][0]
        counts.append(np.minimum(starts + geom.window[k], hw[k]) - np.maximum(starts, 0))
    count = np.outer(*counts).astype(np.float32)
    count = count[None, :, :, None]  # (1, Ho, Wo, 1): the spatial axes are 1, 2 in both layouts
    return (sums / count).astype(h.dtype)


def _xla_norm(x, size, add_scale, pow_scale, min_div, axes):
    """x * (min_div + add_scale * S) ** -pow_scale, S the sum of squares over the window of
    ``size`` starting ``size // 2`` before each element along ``axes``, clipped."""
    window, padding = [1] * 4, [(0, 0)] * 4
    for a in axes:
        window[a], padding[a] = size, (size // 2, size - 1 - size // 2)
    xf = x.astype(jnp.float32)
    s = lax.reduce_window(xf * xf, 0.0, lax.add, tuple(window), (1,) * 4, padding)
    return (xf * (min_div + add_scale * s) ** -pow_scale).astype(x.dtype)


def _xla_local(x, kernel, stride, pads, layout):
    """lax.conv_general_dilated_local on our ConvLocal kernel rearranged as flax's."""
    fax = G.local_filter_axes(layout)
    filter_hw = (kernel.shape[fax["h"]], kernel.shape[fax["w"]])
    if layout == "NHWC":  # (Ho, Wo, fh, fw, C, F) -> (Ho, Wo, C, fh, fw, F)
        kernel = jnp.transpose(kernel, (0, 1, 4, 2, 3, 5))
    kernel = kernel.reshape(*kernel.shape[:2], -1, kernel.shape[-1])
    lhs = _DIMENSION_NUMBERS[layout][0]
    return lax.conv_general_dilated_local(x, kernel, (stride, stride), pads, filter_hw,
                                          dimension_numbers=(lhs, "HWIO", lhs))


XLA_OPS = {
    "conv": lambda x, k, s, pads, layout: lax.conv_general_dilated(
        x, k, (s, s), pads, dimension_numbers=_DIMENSION_NUMBERS[layout]),
    "local": _xla_local,
    "max_pool": _xla_max_pool,
    "avg_pool": _xla_avg_pool,
    "cross_map_norm": lambda x, n, a, b, m, layout: _xla_norm(
        x, n, a, b, m, (G.image_axes(layout)["c"],)),
    "response_norm": lambda x, n, a, b, m, layout: _xla_norm(
        x, n, a, b, m, (G.image_axes(layout)["h"], G.image_axes(layout)["w"])),
}
