"""Splitting our custom calls across devices.

XLA cannot look inside a custom call, so without help it gathers every sharded operand onto every
device and runs the whole op there (each device computes the whole batch). Each op family states
its rule instead (`DimensionRule`): one factor name per dimension of each operand and of the
result, einsum-like; which factors may stay sharded (their slices are independent: batch,
channels, filters); and which factors are summed over (absent from the result: the batch in
weight_acts), whose per-device results are then added with a ``psum``. Every other dimension
(rows, columns, filter taps, contracted channels) is gathered. A factor stays sharded only where
its size divides evenly over its mesh axes (padded slices would add into sums).

The lowering of a primitive in a program over several devices goes through
``jax.experimental.custom_partitioning`` (which serves both the Shardy and the GSPMD partitioner);
the per-device computation binds a twin primitive whose lowering is the plain custom call.
Programs on one device, and bodies of ``shard_map``, lower the plain custom call directly.
"""
from __future__ import annotations

import dataclasses
import functools

from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class DimensionRule:
    operands: tuple[str, ...]  # factors of each operand's dimensions, e.g. ("b h w c", "i j c f")
    result: str | tuple[str, ...]  # e.g. "b o p f"; a tuple for several results
    split: frozenset[str]  # factors that may stay sharded, slices independent
    summed: frozenset[str] = frozenset()  # sharded factors absent from the result: psum

    def __post_init__(self):
        result = {f for spec in self.results for f in spec.split()}
        assert self.split <= result and not self.summed & result, self

    @property
    def results(self) -> tuple[str, ...]:
        return (self.result,) if isinstance(self.result, str) else tuple(self.result)

    def shardy_rule(self) -> tuple[str, dict]:
        # Shardy numbers the factors in order of first appearance and wants each kind's list in
        # that order.
        order = list(dict.fromkeys(f for spec in (*self.operands, *self.results)
                                   for f in spec.split()))
        keep = self.split | self.summed
        return (", ".join(self.operands) + " -> " + ", ".join(self.results),
                dict(reduction_factors=tuple(f for f in order if f in self.summed),
                     need_replication_factors=tuple(f for f in order if f not in keep)))


def factors(axes: dict[str, int], **names: str) -> str:
    """The factor string of a tensor: ``names[role]`` for each role in ``axes`` (role -> axis, as
    geometry.image_axes gives), in axis order."""
    return " ".join(names[role] for role, _ in sorted(axes.items(), key=lambda kv: kv[1]))


def needs_devices_when_lowered(primitive: Primitive):
    """JAX lowers programs without their devices (to reuse the lowering) unless a primitive in
    them asks for the devices, as custom_partitioning needs. Without that hook (a private one, so
    it may go away), programs over several devices gather our operands instead of splitting."""
    try:
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(primitive)
    except (ImportError, AttributeError):
        pass


def multi_device(ctx) -> bool:
    """Whether this lowering is for a program the partitioner will split across devices (not one
    device, and not inside a fully manual ``shard_map`` body)."""
    axis_context = ctx.module_context.axis_context
    num_devices = getattr(axis_context, "num_devices", None)  # jit over shardings
    if num_devices is not None:
        return num_devices > 1 and getattr(axis_context, "device_assignment", None) is not None
    mesh = getattr(axis_context, "mesh", None)
    manual = getattr(axis_context, "manual_axes", None)
    if mesh is not None and manual is not None:
        return set(manual) != set(mesh.axis_names)
    return False


def _factor_axes(rule: DimensionRule, arg_shapes) -> dict[str, tuple[str, ...]]:
    """Mesh axes each splittable factor keeps: taken from the first operand sharded along it, each
    mesh axis used by one factor at most, and only where the size divides evenly."""
    axes, used = {}, set()
    for factors, arg in zip(rule.operands, arg_shapes):
        sharding = arg.sharding
        if not isinstance(sharding, NamedSharding):
            continue
        spec = tuple(sharding.spec) + (None,) * (len(arg.shape) - len(sharding.spec))
        for factor, size, entry in zip(factors.split(), arg.shape, spec):
            if entry is None or factor in axes or factor not in rule.split | rule.summed:
                continue
            names = (entry,) if isinstance(entry, str) else tuple(entry)
            ways = 1
            for name in names:
                ways *= sharding.mesh.shape[name]
            if used & set(names) or size % ways:
                continue
            axes[factor] = names
            used |= set(names)
    return axes


def _mesh(mesh, arg_shapes):
    for arg in arg_shapes:
        if isinstance(arg.sharding, NamedSharding):
            return arg.sharding.mesh
    return mesh


def _sharding(mesh, factors: str, axes) -> NamedSharding:
    entries = [axes.get(f) for f in factors.split()]
    return NamedSharding(mesh, PartitionSpec(
        *[None if e is None else e[0] if len(e) == 1 else e for e in entries]))


@functools.cache
def partitioned(local: Primitive, rule: DimensionRule, params: tuple):
    """A custom_partitioning function running ``local`` (the plain custom call) on each device's
    slices under ``rule``; ``params`` are the primitive's parameters as sorted items."""
    kwargs = dict(params)

    @custom_partitioning
    def call(*operands):
        out = local.bind(*operands, **kwargs)
        return tuple(out) if local.multiple_results else out

    def result_shardings(mesh, axes):
        if isinstance(rule.result, str):
            return _sharding(mesh, rule.result, axes)
        return tuple(_sharding(mesh, f, axes) for f in rule.results)

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return result_shardings(_mesh(mesh, arg_shapes), _factor_axes(rule, arg_shapes))

    def partition(mesh, arg_shapes, result_shape):
        axes = _factor_axes(rule, arg_shapes)
        mesh = _mesh(mesh, arg_shapes)
        summed_axes = tuple(a for f in sorted(rule.summed) for a in axes.get(f, ()))

        def per_device(*operands):
            out = local.bind(*operands, **kwargs)
            if local.multiple_results:
                out = tuple(out)
            return lax.psum(out, summed_axes) if summed_axes else out

        return (mesh, per_device, result_shardings(mesh, axes),
                tuple(_sharding(mesh, f, axes) for f in rule.operands))

    rule_text, factor_kinds = rule.shardy_rule()
    call.def_partition(partition, infer_sharding_from_operands=infer_sharding_from_operands,
                       sharding_rule=rule_text, **factor_kinds)
    return call
