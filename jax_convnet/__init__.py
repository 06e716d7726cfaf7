"""jax_convnet: cuda-convnet's convolution and pooling operators as JAX primitives.

Every op lowers to an XLA FFI custom call into our own kernels (C++ on the CPU, CUDA on NVIDIA
GPUs) and falls back to the pure-lax reference (``jax_convnet.reference``) anywhere else.
"""
from . import geometry, reference
from .conv import explain, filter_acts, image_acts, weight_acts
from .geometry import filter_acts_output_size, max_pool_output_size
from .local import local_filter_acts, local_image_acts, local_weight_acts
from .norm import cross_map_norm, response_norm
from .pool import avg_pool, max_pool
from ._native import FFI_TARGETS, allow_reference_lowering, export_safety_checks, has_native

__version__ = "0.1.0"

__all__ = [
    "filter_acts", "image_acts", "weight_acts", "max_pool", "avg_pool",
    "cross_map_norm", "response_norm",
    "local_filter_acts", "local_image_acts", "local_weight_acts",
    "filter_acts_output_size", "max_pool_output_size",
    "geometry", "reference", "has_native", "explain",
    "FFI_TARGETS", "export_safety_checks", "allow_reference_lowering",
]
