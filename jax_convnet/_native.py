"""Loading the native modules, registering their FFI targets, and the lowering rules.

Each primitive lowers to its FFI target on ``cpu`` (module ``_cpu_kernels``) and ``cuda``
(module ``_cuda_kernels``); on any other platform, or when a module is missing, the pure-lax
reference is lowered instead (with one warning). Both modules are imported and their targets
registered with XLA when this module is imported (no CUDA context is made), so a program
serialized with ``jax.export`` runs in a fresh process after ``import jax_convnet``. Lowering
for export onto a platform whose module is missing raises instead of baking in the reference,
unless :func:`allow_reference_lowering` says to. In programs split across devices the custom
calls are split by each op's dimension rule (``_sharding``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
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


# The XLA FFI target names, the same on every platform (csrc/common/targets.h).
FFI_TARGETS = ("jax_convnet_filter_acts", "jax_convnet_image_acts", "jax_convnet_weight_acts",
               "jax_convnet_max_pool", "jax_convnet_max_pool_winners", "jax_convnet_max_pool_jvp",
               "jax_convnet_max_pool_grad", "jax_convnet_avg_pool", "jax_convnet_avg_pool_grad",
               "jax_convnet_norm", "jax_convnet_norm_fwd", "jax_convnet_norm_jvp",
               "jax_convnet_norm_grad",
               "jax_convnet_local_filter_acts", "jax_convnet_local_image_acts",
               "jax_convnet_local_weight_acts")


CPU_ISA_VALUES = ("sse2", "avx2", "avx512")


def _check_cpu_isa_env():
    """JAX_CONVNET_CPU_ISA caps the CPU conv kernels' instruction set (any case; unset or empty:
    no cap). The kernels return an error naming an unrecognised value; warn as the module loads."""
    value = os.environ.get("JAX_CONVNET_CPU_ISA", "")
    if value and value.lower() not in CPU_ISA_VALUES:
        warnings.warn(f"JAX_CONVNET_CPU_ISA={value!r} is not one of {CPU_ISA_VALUES} "
                      f"(case-insensitive) or empty: the CPU conv kernels will refuse to run",
                      stacklevel=4)


def _load(platform: str):
    """(module, None) with the module's targets registered with XLA, or (None, the ImportError).
    Registration only records the handlers: no backend or CUDA context is started."""
    try:
        module = importlib.import_module(f"jax_convnet.{_MODULES[platform]}")
    except ImportError as e:
        return None, e
    if platform == "cpu":
        _check_cpu_isa_env()
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA" if platform == "cuda"
                                    else platform)
    return module, None


_LOADED = {platform: _load(platform) for platform in _MODULES}


def native_module(platform: str):
    """The imported kernel module for ``platform`` (its targets registered), or None."""
    return _LOADED[platform][0] if platform in _LOADED else None


def has_native(platform: str) -> bool:
    """Whether the native kernels for ``platform`` ("cpu" or "cuda") were built and load."""
    return native_module(platform) is not None


def export_safety_checks():
    """The ``jax.export.DisabledSafetyCheck`` list that lets ``jax.export`` serialize programs
    holding our custom calls: ``jax.export.export(f, disabled_checks=export_safety_checks())``.
    Their handlers are registered again by ``import jax_convnet`` in the process that
    deserializes and calls the program."""
    from jax import export
    return [export.DisabledSafetyCheck.custom_call(name) for name in FFI_TARGETS]


_reference_allowed = threading.local()


@contextlib.contextmanager
def allow_reference_lowering():
    """Inside this context, lowering for export onto a platform whose native module is missing
    lowers the pure-lax reference (with a warning) instead of raising."""
    previous = getattr(_reference_allowed, "value", False)
    _reference_allowed.value = True
    try:
        yield
    finally:
        _reference_allowed.value = previous


def _missing_module(ctx, platform: str):
    """Called where a native platform's module is missing: raises when lowering for export (the
    exported program would run the reference there without anyone knowing), else warns once."""
    if (ctx.module_context.lowering_parameters.for_export
            and not getattr(_reference_allowed, "value", False)):
        error = _LOADED[platform][1]
        raise ValueError(
            f"jax_convnet: cannot export for platform {platform!r}: the native {platform} module "
            f"was not built or does not load ({error}). Export for the platforms whose kernels "
            f"this install has (jax_convnet.has_native), install a build with them "
            f"(JAX_CONVNET_CUDA=ON), or export inside "
            f"jax_convnet.allow_reference_lowering() to put the pure-lax reference there.")
    _warn_missing(platform)


@functools.cache
def _warn_missing(platform: str):
    warnings.warn(f"jax_convnet: native {platform} kernels are unavailable "
                  f"({_LOADED[platform][1]}); lowering the pure-lax reference on {platform}",
                  stacklevel=4)


@functools.cache
def _warn_fallback(platform: str):
    warnings.warn(f"jax_convnet: no native kernels for platform {platform!r}; lowering the "
                  f"pure-lax reference", stacklevel=4)


def register_lowerings(primitive, target: str, reference, *, cuda_workspace_bytes=None,
                       dimension_rule=None, cuda_decomposition=None):
    """``reference(*operands, **params)`` is the pure-lax twin; ``params['geom'].ffi_attrs()``
    gives the FFI attributes. ``cuda_workspace_bytes(operand_avals, result_aval, **params)``, if
    given, sizes an extra uint8 result of the CUDA custom call that its kernels use as temporary
    memory (a handler captured into a CUDA graph cannot allocate). ``dimension_rule(**params)``, if
    given, says how the custom call splits across devices (``_sharding.DimensionRule``).
    ``cuda_decomposition(bind, **params)``, if given, returns None where the CUDA custom call
    takes ``params`` as they are, else a function of the operands that computes the op from
    calls ``bind(*operands, **other_params)`` of the plain custom call (parameters the CUDA
    kernels do not take yet). A primitive with ``multiple_results`` lowers to a custom call with
    one result per output."""
    multiple = primitive.multiple_results

    def reference_rule(ctx, *operands, **params):
        return mlir.lower_fun(functools.partial(reference, **params),
                              multiple_results=multiple)(ctx, *operands)

    def fallback_rule(ctx, *operands, **params):
        platform = ctx.module_context.platforms[0] if ctx.module_context.platforms else "?"
        _warn_fallback(platform)
        return reference_rule(ctx, *operands, **params)

    def has_kernel(ctx, platform):
        if np.dtype(ctx.avals_in[0].dtype) not in _NATIVE_DTYPES[platform]:
            return False
        if not has_native(platform):
            _missing_module(ctx, platform)
            return False
        return True

    def custom_call_rule(platform):
        def rule(ctx, *operands, geom, **params):
            if not has_kernel(ctx, platform):
                return reference_rule(ctx, *operands, geom=geom, **params)
            if platform == "cuda" and cuda_decomposition is not None:
                decomposed = cuda_decomposition(on_device.bind, geom=geom, **params)
                if decomposed is not None:
                    return mlir.lower_fun(decomposed, multiple_results=multiple)(ctx, *operands)
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
