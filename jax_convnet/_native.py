"""Loading the native modules, registering their FFI targets, and the lowering rules.

Each primitive lowers to its FFI target on ``cpu`` (module ``_cpu_kernels``) and ``cuda``
(module ``_cuda_kernels``, imported lazily); on any other platform, or when a module is missing,
the pure-lax reference is lowered instead (with one warning). In programs split across devices
the custom calls are split by each op's dimension rule (``_sharding``).
"""
from __future__ import annotations

import functools
import importlib
import warnings

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import _sharding

_MODULES = {"cpu": "_cpu_kernels", "cuda": "_cuda_kernels"}
# Dtypes each backend's kernels take; others use the reference lowering.
_NATIVE_DTYPES = {
    "cpu": {np.dtype("float32"), np.dtype("float16"), np.dtype(jax.numpy.bfloat16),
            np.dtype("float64")},
    "cuda": {np.dtype("float32"), np.dtype("float16"), np.dtype(jax.numpy.bfloat16)},
}


@functools.cache
def native_module(platform: str):
    """The imported kernel module for ``platform`` with its targets registered, or None."""
    try:
        module = importlib.import_module(f"jax_convnet.{_MODULES[platform]}")
    except ImportError as e:
        warnings.warn(f"jax_convnet: native {platform} kernels are unavailable ({e}); "
                      f"falling back to the pure-lax reference on {platform}", stacklevel=3)
        return None
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform.upper()
                                    if platform == "cuda" else platform)
    return module


def has_native(platform: str) -> bool:
    return native_module(platform) is not None


@functools.cache
def _warn_fallback(platform: str):
    warnings.warn(f"jax_convnet: no native kernels for platform {platform!r}; lowering the "
                  f"pure-lax reference", stacklevel=4)


def register_lowerings(primitive, target: str, reference, *, cuda_workspace_bytes=None,
                       dimension_rule=None):
    """``reference(*operands, **params)`` is the pure-lax twin; ``params['geom'].ffi_attrs()``
    gives the FFI attributes. ``cuda_workspace_bytes(operand_avals, result_aval, **params)``, if
    given, sizes an extra uint8 result of the CUDA custom call that its kernels use as temporary
    memory (a handler captured into a CUDA graph cannot allocate). ``dimension_rule(**params)``, if
    given, says how the custom call splits across devices (``_sharding.DimensionRule``). A
    primitive with ``multiple_results`` lowers to a custom call with one result per output."""
    multiple = primitive.multiple_results

    def reference_rule(ctx, *operands, **params):
        return mlir.lower_fun(functools.partial(reference, **params),
                              multiple_results=multiple)(ctx, *operands)

    def fallback_rule(ctx, *operands, **params):
        platform = ctx.module_context.platforms[0] if ctx.module_context.platforms else "?"
        _warn_fallback(platform)
        return reference_rule(ctx, *operands, **params)

    def has_kernel(ctx, platform):
        return np.dtype(ctx.avals_in[0].dtype) in _NATIVE_DTYPES[platform] and has_native(platform)

    def custom_call_rule(platform):
        def rule(ctx, *operands, geom, **params):
            if not has_kernel(ctx, platform):
                return reference_rule(ctx, *operands, geom=geom, **params)
            if platform == "cuda" and cuda_workspace_bytes is not None:
                nbytes = cuda_workspace_bytes(ctx.avals_in, ctx.avals_out[0], geom=geom,
                                              **params)
                ctx = ctx.replace(avals_out=[*ctx.avals_out,
                                             jax.core.ShapedArray((nbytes,), np.uint8)])
                return jax.ffi.ffi_lowering(target)(ctx, *operands, **geom.ffi_attrs())[:1]
            return jax.ffi.ffi_lowering(target)(ctx, *operands, **geom.ffi_attrs())
        return rule

    # The custom call as each device runs it in a program split across devices.
    on_device = Primitive(primitive.name + "_on_device")
    on_device.multiple_results = multiple
    on_device.def_effectful_abstract_eval(primitive.abstract_eval)

    def native_rule(platform):
        plain = custom_call_rule(platform)

        def rule(ctx, *operands, **params):
            if (dimension_rule is None or not _sharding.multi_device(ctx)
                    or not has_kernel(ctx, platform)):
                return plain(ctx, *operands, **params)
            split = _sharding.partitioned(on_device, dimension_rule(**params),
                                          tuple(sorted(params.items())))
            return mlir.lower_fun(split, multiple_results=multiple)(ctx, *operands)
        return rule

    for prim, rule in ((primitive, native_rule), (on_device, custom_call_rule)):
        mlir.register_lowering(prim, fallback_rule)
        for platform in _MODULES:
            mlir.register_lowering(prim, rule(platform), platform=platform)
    if dimension_rule is not None:
        _sharding.needs_devices_when_lowered(primitive)


@functools.lru_cache(maxsize=None)
def _jitted_bind(primitive, params):
    return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))


def def_impl_via_jit(primitive):
    """Eager calls compile the primitive alone (cached per parameter set) and run it."""
    primitive.def_impl(lambda *args, **params: _jitted_bind(
        primitive, tuple(sorted(params.items())))(*args))
