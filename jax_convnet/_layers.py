"""The layer and pool shapes that the benchmark times and the tests check: one table for both.

GPU_LAYERS are the five layers of soumith/convnet-benchmarks (L1-L5) and AlexNet's conv1-3, batch
128; GPU_POOLS the AlexNet pools and VGG's first. The CPU sets are small enough for two cores.
Every shape is in NCHW order whatever layout a row runs in.
"""
from __future__ import annotations

from typing import NamedTuple


class ConvLayer(NamedTuple):
    """A convolution: images (batch, channels, height, width), `filters` filters of
    filter_h x filter_w, the same stride and pad along both axes."""
    batch: int
    channels: int
    height: int
    width: int
    filters: int
    filter_h: int
    filter_w: int
    stride: int
    pad: int


class PoolLayer(NamedTuple):
    """Pooled images (batch, channels, height, width) and the (ds, stride) windows run on them."""
    nchw: tuple
    windows: tuple


GPU_LAYERS = {
    "L1": ConvLayer(128, 3, 128, 128, 96, 11, 11, 1, 0),
    "L2": ConvLayer(128, 64, 64, 64, 128, 9, 9, 1, 0),
    "L3": ConvLayer(128, 128, 32, 32, 128, 9, 9, 1, 0),
    "L4": ConvLayer(128, 128, 16, 16, 128, 7, 7, 1, 0),
    "L5": ConvLayer(128, 384, 13, 13, 384, 3, 3, 1, 0),
    "alex1": ConvLayer(128, 3, 224, 224, 64, 11, 11, 4, 2),
    "alex2": ConvLayer(128, 64, 27, 27, 192, 5, 5, 1, 2),
    "alex3": ConvLayer(128, 192, 13, 13, 384, 3, 3, 1, 1),
}
CPU_LAYERS = {
    "conv1": ConvLayer(64, 3, 32, 32, 32, 5, 5, 1, 2),
    "conv2": ConvLayer(64, 32, 16, 16, 64, 5, 5, 1, 2),
}
GPU_POOLS = {
    "alexpool1": PoolLayer((128, 64, 55, 55), ((3, 2), (2, 2))),
    "alexpool2": PoolLayer((128, 192, 27, 27), ((3, 2), (2, 2))),
    "alexpool3": PoolLayer((128, 256, 13, 13), ((3, 2), (2, 2))),
    "vggpool": PoolLayer((64, 128, 112, 112), ((3, 2), (2, 2))),
}
CPU_POOLS = {
    "pool1": PoolLayer((64, 32, 32, 32), ((2, 2),)),
    "pool2": PoolLayer((64, 64, 16, 16), ((3, 2),)),
}


class NormLayer(NamedTuple):
    """A response norm: kind "cross" (cross_map_norm) or "same" (response_norm) over images
    (batch, channels, height, width), with its size and scales (``add_scale`` as the kernel
    takes it: the cfg ``scale`` / size for cmrnorm, / size**2 for rnorm)."""
    kind: str
    batch: int
    channels: int
    height: int
    width: int
    size: int
    add_scale: float
    pow_scale: float
    min_div: float


# AlexNet's two cmrnorms (cuda-convnet2, minDiv 2), the CIFAR-10 18% net's rnorm and the 11%
# net's cmrnorm (size 9).
GPU_NORMS = {
    "alexnorm1": NormLayer("cross", 128, 96, 55, 55, 5, 1e-4 / 5, 0.75, 2.0),
    "alexnorm2": NormLayer("cross", 128, 256, 27, 27, 5, 1e-4 / 5, 0.75, 2.0),
    "cifar18norm": NormLayer("same", 128, 32, 16, 16, 3, 5e-5 / 9, 0.75, 1.0),
    "cifar11norm": NormLayer("cross", 128, 64, 16, 16, 9, 1e-3 / 9, 0.75, 1.0),
}
CPU_NORMS = {
    "norm1": NormLayer("cross", 16, 96, 27, 27, 5, 1e-4 / 5, 0.75, 2.0),
    "norm2": NormLayer("same", 16, 32, 16, 16, 3, 5e-5 / 9, 0.75, 1.0),
}
# The locally connected layers of cuda-convnet's CIFAR-10 11% net (layers-conv-local-11pct):
# local3 (64 -> 32 channels) and local4 (32 -> 32), 3x3 filters on 8x8 images, pad 1; one filter
# bank per output position. The CPU set runs them at a quarter of the batch.
GPU_LOCAL_LAYERS = {
    "local3": ConvLayer(128, 64, 8, 8, 32, 3, 3, 1, 1),
    "local4": ConvLayer(128, 32, 8, 8, 32, 3, 3, 1, 1),
}
CPU_LOCAL_LAYERS = {name: layer._replace(batch=32) for name, layer in GPU_LOCAL_LAYERS.items()}
# Grouped convolutions (groups=G): AlexNet's two-group layers (Krizhevsky et al. 2012, one group
# per GPU) at batch 128: conv2 (96 -> 256 channels, 5x5 pad 2 on 27x27), conv4 (384 -> 384) and
# conv5 (384 -> 256), 3x3 pad 1 on 13x13, each (layer, groups). The CPU set runs conv2 and conv5
# at an eighth of the batch and a quarter of the channels.
GPU_GROUPED_LAYERS = {
    "alex2g": (ConvLayer(128, 96, 27, 27, 256, 5, 5, 1, 2), 2),
    "alex4g": (ConvLayer(128, 384, 13, 13, 384, 3, 3, 1, 1), 2),
    "alex5g": (ConvLayer(128, 384, 13, 13, 256, 3, 3, 1, 1), 2),
}
CPU_GROUPED_LAYERS = {
    "alex2g": (ConvLayer(16, 24, 27, 27, 64, 5, 5, 1, 2), 2),
    "alex5g": (ConvLayer(16, 96, 13, 13, 64, 3, 3, 1, 1), 2),
}
