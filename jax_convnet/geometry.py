"""Shape rules and argument checks: the one source of truth for sizes in jax_convnet.

Both public padding conventions end here as explicit per-side padding:

* ``pad=`` (cuda-convnet): symmetric zero padding and the ceil rule
  ``Ho = ceil((H + 2*pad - fh) / stride) + 1``; a filter overhanging the bottom/right edge reads
  zeros, which is the same as extra bottom/right padding.
* ``padding=`` (XLA/Flax): ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))`` with XLA's
  floor rule ``Ho = (H + top + bottom - fh) // stride + 1``.

The kernels (``csrc/common/geometry.h`` mirrors this module) only see the canonical
:class:`ConvGeometry` / :class:`PoolGeometry`. Every check raises ``ValueError`` or ``TypeError``
naming the parameter, at trace time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Sequence

import jax
import numpy as np
from jax import lax

LAYOUTS = ("C01B", "NHWC")
# Attribute codes shared with csrc/common/geometry.h (enum Layout, enum Precision).
LAYOUT_CODES = {"C01B": 0, "NHWC": 1}
PRECISION_CODES = {"default": 0, "high": 1, "highest": 2}

SUPPORTED_DTYPES = (np.dtype("float32"), np.dtype(jax.numpy.bfloat16), np.dtype("float16"),
                    np.dtype("float64"))

# Bounds of what the kernels (csrc/common/geometry.h checks the same) and XLA accept: every size,
# window, stride and pad, and every derived extent (a padded image, an output), fits a signed
# 32-bit int; every operand and result has at most MAX_ELEMENTS elements, so that its size in
# bytes fits int64 with room for index arithmetic. Larger values raise a ValueError naming the
# parameter instead of overflowing XLA's shape arithmetic (which aborts the process).
MAX_EXTENT = 2**31 - 1
MAX_ELEMENTS = 2**58


# ----------------------------------------------------------------------------- small parsers

def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


@functools.cache
def _symbolic_dim_type():
    from jax import export
    return type(export.symbolic_shape("b")[0])


def _is_symbolic(v) -> bool:
    """A symbolic size of shape-polymorphic ``jax.export``."""
    return isinstance(v, _symbolic_dim_type())


def _is_dim(v) -> bool:
    """A concrete size (a symbolic one, from shape-polymorphic export, is not)."""
    return isinstance(v, (int, np.integer))


def check_extent(value: int, name: str, *, what: str | None = None, minimum: int = 0) -> int:
    """``minimum <= value <= MAX_EXTENT``, else a ValueError naming ``name``."""
    if not minimum <= value <= MAX_EXTENT:
        raise ValueError(f"{name} must be in [{minimum}, {MAX_EXTENT}] (2**31 - 1, the largest "
                         f"extent the kernels take), got {value}"
                         + ("" if what is None else f" in {what!r}"))
    return value


def check_elements(shape, name: str) -> None:
    """At most MAX_ELEMENTS elements (symbolic batch sizes are not bounded here)."""
    if all(_is_dim(d) for d in shape) and math.prod(int(d) for d in shape) > MAX_ELEMENTS:
        raise ValueError(f"{name} would have shape {tuple(int(d) for d in shape)}: "
                         f"{math.prod(int(d) for d in shape)} elements, more than the "
                         f"{MAX_ELEMENTS} (2**58) the kernels take")


def int_pair(value, name: str, *, minimum: int | None = None) -> tuple[int, int]:
    """An int or a pair of ints as ``(rows, cols)``, each of magnitude at most MAX_EXTENT."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 \
            and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (rows, cols), got {value!r}")
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    for v in pair:
        check_extent(v, name, what=None if _is_int(value) else value,
                     minimum=-MAX_EXTENT if minimum is None else minimum)
    return pair


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def canonical_precision(precision) -> str:
    """``None`` honours ``jax_default_matmul_precision``; returns "default", "high" or "highest"."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
        if precision is None:
            return "default"
    if isinstance(precision, (tuple, list)) and len(precision) == 2 and precision[0] == precision[1]:
        precision = precision[0]
    if isinstance(precision, lax.Precision):
        return {lax.Precision.DEFAULT: "default", lax.Precision.HIGH: "high",
                lax.Precision.HIGHEST: "highest"}[precision]
    names = {"default": "default", "fastest": "default", "bfloat16": "default",
             "high": "high", "tensorfloat32": "high", "bfloat16_3x": "high",
             "highest": "highest", "float32": "highest"}
    if isinstance(precision, str) and precision.lower() in names:
        return names[precision.lower()]
    raise ValueError(f"precision must be None, a jax.lax.Precision or one of "
                     f"{sorted(names)}, got {precision!r}")


# ----------------------------------------------------------------------------- layouts

def image_axes(layout: str) -> dict[str, int]:
    """Axis of batch 'n', channels 'c', rows 'h', cols 'w' in an image / hidden tensor."""
    return {"C01B": dict(c=0, h=1, w=2, n=3), "NHWC": dict(n=0, h=1, w=2, c=3)}[layout]


def filter_axes(layout: str) -> dict[str, int]:
    """Axis of filters 'f', channels 'c', rows 'h', cols 'w' in a filter tensor."""
    return {"C01B": dict(c=0, h=1, w=2, f=3), "NHWC": dict(h=0, w=1, c=2, f=3)}[layout]


def image_shape(layout: str, n: int, c: int, h: int, w: int) -> tuple[int, ...]:
    return (c, h, w, n) if layout == "C01B" else (n, h, w, c)


def filter_shape(layout: str, f: int, c: int, h: int, w: int) -> tuple[int, ...]:
    return (c, h, w, f) if layout == "C01B" else (h, w, c, f)


# (image_shape / filter_shape are also parameter names of the entry points below.)
_image_shape_of, _filter_shape_of = image_shape, filter_shape


def _dims(shape, axes) -> dict[str, int]:
    """Sizes by axis name; a symbolic (batch) size stays symbolic."""
    return {k: int(shape[a]) if _is_dim(shape[a]) else shape[a] for k, a in axes.items()}


def check_array(x, name: str, *, rank: int = 4, batch_axis: int | None = None):
    """Shape and dtype of an operand; only its ``batch_axis`` may have a symbolic size."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(shape)}")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {dtype}") \
            from None
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {dtype}")
    for axis, d in enumerate(shape):
        if not _is_dim(d) and axis != batch_axis:
            raise ValueError(f"{name} has shape {tuple(shape)}: only the batch dimension may be "
                             f"symbolic (shape-polymorphic export); the others must be concrete")
    if min(int(d) for d in shape if _is_dim(d)) < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(shape)}")
    return shape, dtype


def canonical_operand(x):
    """NumPy arrays and scalars become JAX arrays as ``jax.numpy`` makes them (float64 becomes
    float32 when x64 is off); JAX arrays and tracers are returned as they are."""
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.numpy.asarray(x)
    return x


def check_same_dtype(**arrays):
    dtypes = {name: np.dtype(a.dtype) for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"{' and '.join(dtypes)} must share one dtype, got {listed}")


# ----------------------------------------------------------------------------- output sizes

def ceil_rule_size(size: int, window: int, stride: int, pad: int = 0) -> int:
    """cuda-convnet: ``ceil((size + 2*pad - window) / stride) + 1``."""
    return -(-(size + 2 * pad - window) // stride) + 1


def floor_rule_size(size: int, window: int, stride: int, lo: int = 0, hi: int = 0) -> int:
    """XLA: ``(size + lo + hi - window) // stride + 1``."""
    return (size + lo + hi - window) // stride + 1


def _explicit_padding(padding, sizes, windows, strides, name="padding"):
    """``"SAME"`` / ``"VALID"`` / pairs -> ((top, bottom), (left, right)) as XLA defines them."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{name} must be 'SAME', 'VALID' or ((top, bottom), (left, right)), "
                             f"got {padding!r}")
        pads = lax.padtype_to_pads(sizes, windows, strides, padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    try:
        pairs = tuple(tuple(p) for p in padding)
        ok = len(pairs) == 2 and all(len(p) == 2 and all(_is_int(v) for v in p) for p in pairs)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{name} must be 'SAME', 'VALID' or ((top, bottom), (left, right)), "
                        f"got {padding!r}")
    pairs = tuple((int(lo), int(hi)) for lo, hi in pairs)
    if min(min(p) for p in pairs) < 0:
        raise ValueError(f"{name} must be non-negative, got {padding!r}")
    for v in (v for p in pairs for v in p):
        check_extent(v, f"every pad in {name}", what=padding)
    return pairs


def check_padded_extents(image_hw, pads, name: str) -> None:
    """The padded image (explicit per-side padding, the ceil rule's overhang included) fits
    MAX_EXTENT in each axis."""
    for k in range(2):
        extent = image_hw[k] + pads[k][0] + pads[k][1]
        if extent > MAX_EXTENT:
            raise ValueError(f"{name} gives a padded image of {extent} "
                             f"{('rows', 'cols')[k]} (image {tuple(image_hw)}, padding "
                             f"{pads}), more than {MAX_EXTENT} (2**31 - 1), the largest extent "
                             f"the kernels take")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Canonical parameters of filter_acts / image_acts / weight_acts (hashable: a primitive param)."""
    layout: str
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right)), >= 0
    partial_sum: int  # 0: one sum over all output positions
    precision: str  # "default" | "high" | "highest"
    # cuda-convnet's numGroups (XLA's feature_group_count): C and F split into `groups` equal
    # parts; filter f reads the C // groups channels of group f // (F // groups).
    groups: int = 1

    def output_hw(self, image_hw, filter_hw) -> tuple[int, int]:
        return tuple(floor_rule_size(image_hw[k], filter_hw[k], self.strides[k], *self.padding[k])
                     for k in range(2))

    def ffi_attrs(self) -> dict:
        """The FFI attributes; ``groups`` only where it is not 1, so that ungrouped calls keep
        the attribute set every handler (and every exported program) has."""
        (pt, pb), (pl, pr) = self.padding
        i64 = np.int64
        attrs = dict(layout=i64(LAYOUT_CODES[self.layout]), stride_h=i64(self.strides[0]),
                     stride_w=i64(self.strides[1]), pad_top=i64(pt), pad_bottom=i64(pb),
                     pad_left=i64(pl), pad_right=i64(pr), partial_sum=i64(self.partial_sum),
                     precision=i64(PRECISION_CODES[self.precision]))
        if self.groups != 1:
            attrs["groups"] = i64(self.groups)
        return attrs


def conv_padding(image_hw, filter_hw, stride, pad, padding):
    """Explicit ((top, bottom), (left, right)) from either convention (exactly one may be given)."""
    stride = int_pair(stride, "stride", minimum=1)
    pad_given = not (pad is None or (_is_int(pad) and pad == 0) or
                     (not _is_int(pad) and isinstance(pad, Sequence) and tuple(pad) == (0, 0)))
    if padding is not None and pad_given:
        raise ValueError(f"give either pad= (cuda-convnet ceil rule) or padding= (XLA rule), "
                         f"not both: pad={pad!r}, padding={padding!r}")
    if padding is not None:
        pads = _explicit_padding(padding, image_hw, filter_hw, stride)
    else:
        pad = int_pair(0 if pad is None else pad, "pad", minimum=0)
        pads = []
        for k in range(2):
            if image_hw[k] + 2 * pad[k] < filter_hw[k]:
                raise ValueError(_too_big(image_hw, filter_hw, pad, k))
            out = ceil_rule_size(image_hw[k], filter_hw[k], stride[k], pad[k])
            # The ceil rule's overhang is extra bottom/right zero padding.
            pads.append((pad[k], (out - 1) * stride[k] + filter_hw[k] - image_hw[k] - pad[k]))
        pads = tuple(pads)
    for k in range(2):
        if image_hw[k] + sum(pads[k]) < filter_hw[k]:
            raise ValueError(_too_big(image_hw, filter_hw, pads, k))
    check_padded_extents(image_hw, pads, "padding" if padding is not None else
                         "pad with stride (the ceil rule's overhang)")
    return stride, pads


def _too_big(image_hw, filter_hw, pads, k):
    axis = ("rows", "cols")[k]
    return (f"filter {tuple(filter_hw)} is larger than the padded image {tuple(image_hw)} "
            f"(padding {pads}) in its {axis}")


def filter_acts_output_size(image_size, filter_size, *, stride=1, pad=0, padding=None):
    """(Ho, Wo) of ``filter_acts`` for an image of ``image_size`` (int or (H, W))."""
    image_hw = int_pair(image_size, "image_size", minimum=1)
    filter_hw = int_pair(filter_size, "filter_size", minimum=1)
    stride, pads = conv_padding(image_hw, filter_hw, stride, pad, padding)
    return tuple(floor_rule_size(image_hw[k], filter_hw[k], stride[k], *pads[k]) for k in range(2))


def resolve_partial_sum(partial_sum, out_hw, n_filter_elems: int) -> int:
    """0 (one sum), a divisor P of Ho*Wo, or "auto".

    "auto" picks the smallest divisor P of Ho*Wo that keeps the partial sums' temporary memory
    under 4M float32 elements (16 MiB) while giving at most 64 partial sums: enough independent
    work to fill a GPU on layers with few filter weights, bounded memory on large ones.
    """
    positions = out_hw[0] * out_hw[1]
    if partial_sum is None:
        return 0
    if isinstance(partial_sum, str):
        if partial_sum != "auto":
            raise ValueError(f"partial_sum must be None, 'auto' or a positive int dividing "
                             f"Ho*Wo={positions}, got {partial_sum!r}")
        budget = max(1, min(64, (4 << 20) // max(1, n_filter_elems)))
        # The smallest divisor P is Ho*Wo over the most partial sums (a divisor) within budget.
        sums = next(q for q in range(min(budget, positions), 0, -1) if positions % q == 0)
        return 0 if sums == 1 else positions // sums
    if not _is_int(partial_sum):
        raise TypeError(f"partial_sum must be None, 'auto' or an int, got {partial_sum!r}")
    partial_sum = int(partial_sum)
    if partial_sum < 0:
        raise ValueError(f"partial_sum must be >= 0, got {partial_sum}")
    if partial_sum == 0:  # cuda-convnet's spelling of "one sum"
        return 0
    if positions % partial_sum != 0:
        raise ValueError(f"partial_sum={partial_sum} must divide the number of output positions "
                         f"Ho*Wo = {out_hw[0]}*{out_hw[1]} = {positions}")
    return 0 if partial_sum == positions else partial_sum


def conv_geometry(*, image_hw, filter_hw, channels, filters, stride, pad, padding, partial_sum,
                  layout, precision, groups=1) -> ConvGeometry:
    """``channels``: the images' (all groups); the filters hold ``channels // groups`` each."""
    layout = check_layout(layout)
    groups = check_groups(groups)
    stride, pads = conv_padding(image_hw, filter_hw, stride, pad, padding)
    out_hw = tuple(floor_rule_size(image_hw[k], filter_hw[k], stride[k], *pads[k]) for k in range(2))
    ps = resolve_partial_sum(partial_sum, out_hw,
                             channels // groups * filter_hw[0] * filter_hw[1] * filters)
    return ConvGeometry(layout, stride, pads, ps, canonical_precision(precision), groups)


def check_groups(groups) -> int:
    """``groups`` (cuda-convnet's numGroups, XLA's feature_group_count): a positive int."""
    if not _is_int(groups):
        raise TypeError(f"groups must be a positive int, got {groups!r} "
                        f"of type {type(groups).__name__}")
    return check_extent(int(groups), "groups", minimum=1)


def group_channels(channels: int, groups: int) -> int:
    """The filters' channel count: C // groups (``groups`` must divide C)."""
    if channels % groups:
        raise ValueError(f"groups={groups} must divide the images' channel count C={channels}")
    return channels // groups


def _hidden_dims(hidden, images, d, layout):
    """The hidden tensor's name (hid_acts, or hid_grads beside images), shape and dims, checked
    against the batch and filter counts already read into ``d``."""
    name = "hid_acts" if images is None else "hid_grads"
    shape, _ = check_array(hidden, name, batch_axis=image_axes(layout)["n"])
    hi = _dims(shape, image_axes(layout))
    if "n" in d and hi["n"] != d["n"]:
        raise ValueError(f"{name} has batch size {hi['n']} but images have {d['n']}")
    if "f" in d and hi["c"] != d["f"]:
        raise ValueError(f"{name} has {hi['c']} channels but there are {d['f']} filters")
    return name, shape, hi


def conv_operand_dims(images=None, filters=None, hidden=None, *, layout, groups=1):
    """Logical sizes of the given operands, cross-checked. Returns a dict with n, c, f, h, w,
    fh, fw, oh, ow (those that the given operands determine); c counts the images' channels,
    the filters hold c // groups each (the rule every grouped shape follows: ``groups`` divides
    C and F)."""
    layout = check_layout(layout)
    groups = check_groups(groups)
    d = {}
    batch_axis = image_axes(layout)["n"]
    if images is not None:
        shape, _ = check_array(images, "images", batch_axis=batch_axis)
        im = _dims(shape, image_axes(layout))
        group_channels(im["c"], groups)
        d.update(n=im["n"], c=im["c"], h=im["h"], w=im["w"])
    if filters is not None:
        shape, _ = check_array(filters, "filters")
        fi = _dims(shape, filter_axes(layout))
        if "c" in d and fi["c"] * groups != d["c"]:
            if groups == 1:
                raise ValueError(f"filters have {fi['c']} input channels but images have "
                                 f"{d['c']} (layout {layout}: filters {tuple(shape)}, images "
                                 f"{tuple(images.shape)})")
            raise ValueError(f"filters have {fi['c']} input channels but images of {d['c']} "
                             f"channels with groups={groups} need C // groups = "
                             f"{d['c'] // groups} (layout {layout}: filters {tuple(shape)}, "
                             f"images {tuple(images.shape)})")
        if fi["f"] % groups:
            raise ValueError(f"groups={groups} must divide the filter count F={fi['f']} "
                             f"(filters {tuple(shape)}, layout {layout})")
        d.update(c=fi["c"] * groups, f=fi["f"], fh=fi["h"], fw=fi["w"])
    if hidden is not None:
        name, shape, hi = _hidden_dims(hidden, images, d, layout)
        if hi["c"] % groups:
            raise ValueError(f"groups={groups} must divide the filter count F={hi['c']} "
                             f"({name} {tuple(shape)}, layout {layout})")
        d.update(n=hi["n"], f=hi["c"], oh=hi["h"], ow=hi["w"])
    return d


def check_hidden_hw(geom: ConvGeometry, image_hw, filter_hw, hidden_hw, name):
    expected = geom.output_hw(image_hw, filter_hw)
    if tuple(hidden_hw) != tuple(expected):
        raise ValueError(f"{name} has spatial size {tuple(hidden_hw)} but images of size "
                         f"{tuple(image_hw)} and filters of size {tuple(filter_hw)} with strides "
                         f"{geom.strides} and padding {geom.padding} give {expected}")


# ----------------------------------------------------------------------------- max pool

@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """Canonical max_pool parameters. Window o covers rows
    ``[o*stride - top, o*stride - top + window)`` clipped to the image; ``top`` is ``-start`` in
    cuda-convnet's convention (so it may be negative)."""
    layout: str
    window: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]

    def output_hw(self, image_hw) -> tuple[int, int]:
        return tuple(floor_rule_size(image_hw[k], self.window[k], self.strides[k], *self.padding[k])
                     for k in range(2))

    def winner_dtype(self) -> np.dtype:
        """dtype of the winners (each window's selected element as its row-major offset
        ``i * window_w + j`` in the whole, unclipped window): one byte while a window has at most
        256 elements, int32 beyond that."""
        elements = self.window[0] * self.window[1]
        if elements <= 256:
            return np.dtype(np.uint8)
        if elements <= 2 ** 31:
            return np.dtype(np.int32)
        raise ValueError(f"ds={self.window}: windows of more than 2**31 elements cannot be "
                         f"differentiated (their winners do not fit int32)")

    def ffi_attrs(self) -> dict:
        i64 = np.int64
        return dict(layout=i64(LAYOUT_CODES[self.layout]), window_h=i64(self.window[0]),
                    window_w=i64(self.window[1]), stride_h=i64(self.strides[0]),
                    stride_w=i64(self.strides[1]), pad_top=i64(self.padding[0][0]),
                    pad_left=i64(self.padding[1][0]))


def pool_geometry(image_hw, ds, *, stride=None, start=0, padding=None, layout="C01B"):
    layout = check_layout(layout)
    window = int_pair(ds, "ds", minimum=1)
    stride = window if stride is None else int_pair(stride, "stride", minimum=1)
    if padding is not None:
        if not (_is_int(start) and start == 0) and int_pair(start, "start") != (0, 0):
            raise ValueError(f"give either start= (cuda-convnet) or padding= (XLA rule), "
                             f"not both: start={start!r}, padding={padding!r}")
        pads = _explicit_padding(padding, image_hw, window, stride)
        for k in range(2):
            if image_hw[k] + sum(pads[k]) < window[k]:
                raise ValueError(f"ds={window} is larger than the padded image {tuple(image_hw)} "
                                 f"(padding {pads})")
        check_padded_extents(image_hw, pads, "padding")
        return PoolGeometry(layout, window, stride, pads)
    start = int_pair(start, "start")
    pads = []
    for k in range(2):
        axis = ("rows", "cols")[k]
        if window[k] > image_hw[k]:
            raise ValueError(f"ds={window} must not exceed the image size {tuple(image_hw)} "
                             f"({axis})")
        if stride[k] > window[k]:
            raise ValueError(f"stride={stride} must be <= ds={window} in cuda-convnet's convention "
                             f"(use padding= for strides larger than the window)")
        if not 0 <= start[k] < image_hw[k]:
            raise ValueError(f"start={start} must satisfy 0 <= start < image size "
                             f"{tuple(image_hw)} ({axis})")
        out = ceil_rule_size(image_hw[k] - start[k], window[k], stride[k])
        if out < 1:
            raise ValueError(f"start={start} with ds={window} and stride={stride} leaves no "
                             f"window in the image {tuple(image_hw)} ({axis})")
        # ceil rule: the last window may overhang the bottom/right edge; it is clipped.
        pads.append((-start[k], (out - 1) * stride[k] + window[k] - image_hw[k] + start[k]))
    check_padded_extents(image_hw, pads, "start with ds and stride (the ceil rule's overhang)")
    return PoolGeometry(layout, window, stride, tuple(pads))


def max_pool_output_size(image_size, ds, *, stride=None, start=0, padding=None):
    """(Ho, Wo) of ``max_pool`` (and ``avg_pool``, whose windows are the same) for an image of
    ``image_size`` (int or (H, W))."""
    image_hw = int_pair(image_size, "image_size", minimum=1)
    return pool_geometry(image_hw, ds, stride=stride, start=start, padding=padding).output_hw(image_hw)


def check_count_include_pad(value) -> bool:
    """``count_include_pad``: a bool (``True`` / ``False``, NumPy's included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"count_include_pad must be True or False, got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class AvgPoolGeometry(PoolGeometry):
    """Canonical avg_pool parameters: the windows of :class:`PoolGeometry`, each output the sum
    of its window's in-image elements divided by ``window_h * window_w`` when
    ``count_include_pad`` (flax's ``padding=`` with ``count_include_pad=True``), else by the
    number of those elements (cuda-convnet's convention, where the ceil rule's last window is
    clipped, and flax's ``count_include_pad=False``; a window wholly in the padding gives 0/0,
    NaN, as in flax)."""
    count_include_pad: bool

    def ffi_attrs(self) -> dict:
        return dict(super().ffi_attrs(), count_include_pad=np.int64(self.count_include_pad))


def pool_operand_hw(images, layout):
    ax = image_axes(check_layout(layout))
    shape, _ = check_array(images, "images", batch_axis=ax["n"])
    return int(shape[ax["h"]]), int(shape[ax["w"]])


# ----------------------------------------------------------------------------- per-op entry points
# Each public op (and its reference twin) turns its arguments into canonical geometry here.

def _conv_geometry(d, *, stride, pad, padding, partial_sum, layout, precision, groups=1):
    return conv_geometry(image_hw=(d["h"], d["w"]), filter_hw=(d["fh"], d["fw"]),
                         channels=d["c"], filters=d["f"], stride=stride, pad=pad, padding=padding,
                         partial_sum=partial_sum, layout=layout, precision=precision,
                         groups=groups)


def filter_acts_geometry(images, filters, *, stride, pad, padding, partial_sum, layout,
                         precision, groups=1) -> ConvGeometry:
    d = conv_operand_dims(images=images, filters=filters, layout=layout, groups=groups)
    check_same_dtype(images=images, filters=filters)
    geom = _conv_geometry(d, stride=stride, pad=pad, padding=padding, partial_sum=partial_sum,
                          layout=layout, precision=precision, groups=groups)
    out_hw = geom.output_hw((d["h"], d["w"]), (d["fh"], d["fw"]))
    check_elements(image_shape(layout, d["n"], d["f"], *out_hw),
                   "filter_acts' output (from the images, filters, stride and padding)")
    return geom


def _spatial_from_shape(value, name, full_shape_of, batch_axis=None):
    """Accepts a full 4-d shape in the layout's order or just (H, W); returns (H, W). Every size
    is in [1, MAX_EXTENT]; only the 4-d form's ``batch_axis`` entry may be symbolic (it must then
    be the operands' own batch size)."""
    def size_ok(i, v):
        return _is_int(v) or (i == batch_axis and _is_symbolic(v))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (2, 4) \
            and all(size_ok(i if len(value) == 4 else None, v) for i, v in enumerate(value)):
        sizes = tuple(int(v) if _is_int(v) else v for v in value)
        for v in sizes:
            if _is_int(v):
                check_extent(v, f"every size in {name}", what=value, minimum=1)
        return full_shape_of(sizes) if len(sizes) == 4 else sizes
    raise TypeError(f"{name} must be a 4-d shape in the layout's order or (rows, cols), "
                    f"got {value!r}")


def _image_hw_from_shape(image_shape, d, layout):
    """(H, W) of image_acts' (and local_image_acts') ``image_shape``: the images' full shape in
    the layout's order, checked against the batch and channels in ``d``, or (rows, cols)."""
    ax = image_axes(layout)

    def from_full(shape):
        if shape[ax["n"]] != d["n"] or shape[ax["c"]] != d["c"]:
            raise ValueError(f"image_shape {shape} ({layout}) must have batch {d['n']} and "
                             f"{d['c']} channels to match hid_acts and filters")
        return shape[ax["h"]], shape[ax["w"]]

    hw = _spatial_from_shape(image_shape, "image_shape", from_full, ax["n"])
    check_elements(_image_shape_of(layout, d["n"], d["c"], *hw), "image_shape")
    return hw


def image_acts_geometry(hid_acts, filters, image_shape, *, stride, pad, padding, partial_sum,
                        layout, precision, groups=1):
    d = conv_operand_dims(filters=filters, hidden=hid_acts, layout=layout, groups=groups)
    check_same_dtype(hid_acts=hid_acts, filters=filters)
    d["h"], d["w"] = _image_hw_from_shape(image_shape, d, layout)
    geom = _conv_geometry(d, stride=stride, pad=pad, padding=padding, partial_sum=partial_sum,
                          layout=layout, precision=precision, groups=groups)
    check_hidden_hw(geom, (d["h"], d["w"]), (d["fh"], d["fw"]), (d["oh"], d["ow"]), "hid_acts")
    return geom, (d["h"], d["w"])


def weight_acts_geometry(images, hid_grads, filter_shape, *, stride, pad, padding, partial_sum,
                         layout, precision, groups=1):
    d = conv_operand_dims(images=images, hidden=hid_grads, layout=layout, groups=groups)
    check_same_dtype(images=images, hid_grads=hid_grads)
    ax = filter_axes(layout)
    channels = d["c"] // groups

    def from_full(shape):
        if shape[ax["c"]] != channels or shape[ax["f"]] != d["f"]:
            grouped = "" if groups == 1 else f" (C // groups, groups={groups})"
            raise ValueError(f"filter_shape {shape} ({layout}) must have {channels} "
                             f"channels{grouped} and {d['f']} filters to match images and "
                             f"hid_grads")
        return shape[ax["h"]], shape[ax["w"]]

    d["fh"], d["fw"] = _spatial_from_shape(filter_shape, "filter_shape", from_full)
    check_elements(_filter_shape_of(layout, d["f"], channels, d["fh"], d["fw"]),
                   "filter_shape")
    geom = _conv_geometry(d, stride=stride, pad=pad, padding=padding, partial_sum=partial_sum,
                          layout=layout, precision=precision, groups=groups)
    check_hidden_hw(geom, (d["h"], d["w"]), (d["fh"], d["fw"]), (d["oh"], d["ow"]), "hid_grads")
    return geom, (d["fh"], d["fw"])


def _checked_pool_geometry(images, ds, *, stride, start, padding, layout, op) -> PoolGeometry:
    """The checks and the geometry every pool op shares (``op`` names it in errors)."""
    image_hw = pool_operand_hw(images, layout)
    geom = pool_geometry(image_hw, ds, stride=stride, start=start, padding=padding, layout=layout)
    ax = image_axes(layout)
    check_elements(image_shape(layout, images.shape[ax["n"]], images.shape[ax["c"]],
                               *geom.output_hw(image_hw)),
                   f"{op}'s output (from the images, ds, stride and padding)")
    return geom


def max_pool_geometry(images, ds, *, stride, start, padding, layout) -> PoolGeometry:
    return _checked_pool_geometry(images, ds, stride=stride, start=start, padding=padding,
                                  layout=layout, op="max_pool")


def avg_pool_geometry(images, ds, *, stride, start, padding, count_include_pad,
                      layout) -> AvgPoolGeometry:
    """max_pool's windows and output size (both conventions, the same checks); without
    ``padding`` every window is divided by its in-image element count whatever
    ``count_include_pad`` says (there is no padding to count)."""
    include = check_count_include_pad(count_include_pad)
    geom = _checked_pool_geometry(images, ds, stride=stride, start=start, padding=padding,
                                  layout=layout, op="avg_pool")
    return AvgPoolGeometry(geom.layout, geom.window, geom.strides, geom.padding,
                           include and padding is not None)


# ----------------------------------------------------------------------------- response norms
# y = x * d ** (-pow_scale), d = min_div + add_scale * S, S the sum of x**2 over a window:
# cross_map_norm's over channels, response_norm's over a size x size square of the same channel.

NORM_KINDS = ("cross_map", "same_map")


def _finite_float(value, name: str, *, minimum: float | None = None,
                  strictly: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number (a Python or NumPy scalar), "
                        f"got {value!r} of type {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (v <= minimum if strictly else v < minimum):
        raise ValueError(f"{name} must be {'>' if strictly else '>='} {minimum}, got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class NormGeometry:
    """Canonical response-norm parameters. Along each windowed axis (channels for "cross_map",
    rows and columns for "same_map") output ``a`` sums over ``[a + lo, a + lo + size)`` clipped
    to the axis, ``lo = -(size // 2)``; with ``blocked`` (cross_map only) over the block
    ``[(a // size) * size, (a // size) * size + size)`` clipped. The gradient sums over the
    transposed windows: ``lo = size // 2 - size + 1`` (the same blocks when blocked)."""
    layout: str
    kind: str
    size: int
    blocked: bool
    add_scale: float
    pow_scale: float
    min_div: float

    def window_lo(self, transposed: bool = False) -> int:
        return self.size // 2 - self.size + 1 if transposed else -(self.size // 2)

    def window(self, a: int, extent: int, transposed: bool = False) -> tuple[int, int]:
        """``[begin, end)`` of the window of output ``a`` on an axis of ``extent``, clipped."""
        if self.blocked:
            begin = (a // self.size) * self.size
        else:
            begin = a + self.window_lo(transposed)
        return max(begin, 0), min(begin + self.size, extent)

    def ffi_attrs(self) -> dict:
        i64, f64 = np.int64, np.float64
        return dict(layout=i64(LAYOUT_CODES[self.layout]),
                    same_map=i64(self.kind == "same_map"), size=i64(self.size),
                    blocked=i64(self.blocked), add_scale=f64(self.add_scale),
                    pow_scale=f64(self.pow_scale), min_div=f64(self.min_div))


def norm_residual_dtype(dtype) -> np.dtype:
    """dtype of the denominators kept for the backward: the operands' own, except float32 for
    float16 (whose range would overflow where ``add_scale * S`` passes 65504; bfloat16 has
    float32's range)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.dtype(np.float16) else dtype


def norm_params(size, *, kind, add_scale, pow_scale, min_div, blocked, layout) -> NormGeometry:
    """Checks the arguments of cross_map_norm (``kind="cross_map"``) / response_norm
    (``"same_map"``) other than the operand. ``min_div > 0`` and ``add_scale >= 0`` keep every
    denominator >= min_div."""
    layout = check_layout(layout)
    assert kind in NORM_KINDS, kind
    if not _is_int(size):
        raise TypeError(f"size must be an int, got {size!r}")
    check_extent(int(size), "size", minimum=1)
    if not isinstance(blocked, (bool, np.bool_)):
        raise TypeError(f"blocked must be a bool, got {blocked!r}")
    if blocked and kind != "cross_map":
        raise ValueError("blocked=True exists for cross_map_norm only")
    return NormGeometry(layout, kind, int(size), bool(blocked),
                        _finite_float(add_scale, "add_scale", minimum=0.0),
                        _finite_float(pow_scale, "pow_scale"),
                        _finite_float(min_div, "min_div", minimum=0.0, strictly=True))


def norm_geometry(x, size, *, kind, add_scale, pow_scale, min_div, blocked, layout) \
        -> NormGeometry:
    """:func:`norm_params` after checking the operand ``x``."""
    check_array(x, "x", batch_axis=image_axes(check_layout(layout))["n"])
    return norm_params(size, kind=kind, add_scale=add_scale, pow_scale=pow_scale,
                       min_div=min_div, blocked=blocked, layout=layout)


# ----------------------------------------------------------------------------- locally connected
# cuda-convnet's ``local`` layer: filter_acts' geometry (output sizes, both padding conventions,
# the same ConvGeometry with partial_sum 0) with one filter bank per output position. Filters
# are 6-d: C01B (Ho, Wo, C, fh, fw, F), NHWC (Ho, Wo, fh, fw, C, F); images and hidden
# activations are as in filter_acts.

def local_filter_axes(layout: str) -> dict[str, int]:
    """Axis of output rows 'oh' / cols 'ow', channels 'c', filter rows 'h' / cols 'w' and
    filters 'f' in a locally connected filter tensor."""
    return {"C01B": dict(oh=0, ow=1, c=2, h=3, w=4, f=5),
            "NHWC": dict(oh=0, ow=1, h=2, w=3, c=4, f=5)}[layout]


def local_filter_shape(layout: str, out_hw, f: int, c: int, h: int, w: int) -> tuple[int, ...]:
    oh, ow = out_hw
    return (oh, ow, c, h, w, f) if layout == "C01B" else (oh, ow, h, w, c, f)


def local_operand_dims(images=None, filters=None, hidden=None, *, layout):
    """Logical sizes of the given operands of the local family, cross-checked: n, c, f, h, w,
    fh, fw, oh, ow (those the operands determine; the filters' oh, ow as 'foh', 'fow')."""
    layout = check_layout(layout)
    d = {}
    batch_axis = image_axes(layout)["n"]
    if images is not None:
        shape, _ = check_array(images, "images", batch_axis=batch_axis)
        im = _dims(shape, image_axes(layout))
        d.update(n=im["n"], c=im["c"], h=im["h"], w=im["w"])
    if filters is not None:
        shape, _ = check_array(filters, "filters", rank=6)
        fi = _dims(shape, local_filter_axes(layout))
        if "c" in d and fi["c"] != d["c"]:
            raise ValueError(f"filters have {fi['c']} input channels but images have {d['c']} "
                             f"(layout {layout}: filters {tuple(shape)}, images "
                             f"{tuple(images.shape)})")
        d.update(c=fi["c"], f=fi["f"], fh=fi["h"], fw=fi["w"], foh=fi["oh"], fow=fi["ow"])
    if hidden is not None:
        _, _, hi = _hidden_dims(hidden, images, d, layout)
        d.update(n=hi["n"], f=hi["c"], oh=hi["h"], ow=hi["w"])
    return d


def _check_local_filter_positions(d, out_hw, geom: ConvGeometry):
    """The filters hold one bank per output position: their leading (Ho, Wo) is the output size."""
    if (d["foh"], d["fow"]) != tuple(out_hw):
        shape = local_filter_shape(geom.layout, out_hw, d["f"], d["c"], d["fh"], d["fw"])
        raise ValueError(f"filters have {d['foh']}x{d['fow']} output positions but images of "
                         f"size {(d['h'], d['w'])} with filter size {(d['fh'], d['fw'])}, "
                         f"strides {geom.strides} and padding {geom.padding} give an output of "
                         f"{tuple(out_hw)}: filters must have shape {shape} "
                         f"(layout {geom.layout})")


def _local_geometry(d, *, stride, pad, padding, layout, precision) -> ConvGeometry:
    return _conv_geometry(d, stride=stride, pad=pad, padding=padding, partial_sum=None,
                          layout=layout, precision=precision)


def local_filter_acts_geometry(images, filters, *, stride, pad, padding, layout,
                               precision) -> ConvGeometry:
    d = local_operand_dims(images=images, filters=filters, layout=layout)
    check_same_dtype(images=images, filters=filters)
    geom = _local_geometry(d, stride=stride, pad=pad, padding=padding, layout=layout,
                           precision=precision)
    out_hw = geom.output_hw((d["h"], d["w"]), (d["fh"], d["fw"]))
    _check_local_filter_positions(d, out_hw, geom)
    check_elements(image_shape(layout, d["n"], d["f"], *out_hw),
                   "local_filter_acts' output (from the images, filters, stride and padding)")
    return geom


def local_image_acts_geometry(hid_acts, filters, image_shape, *, stride, pad, padding, layout,
                              precision):
    d = local_operand_dims(filters=filters, hidden=hid_acts, layout=layout)
    check_same_dtype(hid_acts=hid_acts, filters=filters)
    d["h"], d["w"] = _image_hw_from_shape(image_shape, d, layout)
    geom = _local_geometry(d, stride=stride, pad=pad, padding=padding, layout=layout,
                           precision=precision)
    check_hidden_hw(geom, (d["h"], d["w"]), (d["fh"], d["fw"]), (d["oh"], d["ow"]), "hid_acts")
    _check_local_filter_positions(d, (d["oh"], d["ow"]), geom)
    return geom, (d["h"], d["w"])


def local_weight_acts_geometry(images, hid_grads, filter_shape, *, stride, pad, padding, layout,
                               precision):
    """``filter_shape``: the filters' full 6-d shape in the layout's order, or their (fh, fw)."""
    d = local_operand_dims(images=images, hidden=hid_grads, layout=layout)
    check_same_dtype(images=images, hid_grads=hid_grads)
    ax = local_filter_axes(layout)
    if isinstance(filter_shape, Sequence) and not isinstance(filter_shape, str) \
            and len(filter_shape) == 6 and all(_is_int(v) for v in filter_shape):
        shape = tuple(int(v) for v in filter_shape)
        if (shape[ax["c"]] != d["c"] or shape[ax["f"]] != d["f"]
                or (shape[ax["oh"]], shape[ax["ow"]]) != (d["oh"], d["ow"])):
            raise ValueError(f"filter_shape {shape} ({layout}) must have {d['c']} channels, "
                             f"{d['f']} filters and {d['oh']}x{d['ow']} output positions to "
                             f"match images and hid_grads")
        for v in shape:
            check_extent(v, "every size in filter_shape", what=filter_shape, minimum=1)
        d["fh"], d["fw"] = shape[ax["h"]], shape[ax["w"]]
    elif isinstance(filter_shape, Sequence) and not isinstance(filter_shape, str) \
            and len(filter_shape) == 2 and all(_is_int(v) for v in filter_shape):
        d["fh"], d["fw"] = (check_extent(int(v), "every size in filter_shape",
                                         what=filter_shape, minimum=1) for v in filter_shape)
    else:
        raise TypeError(f"filter_shape must be a 6-d shape in the layout's order or "
                        f"(rows, cols), got {filter_shape!r}")
    check_elements(local_filter_shape(layout, (d["oh"], d["ow"]), d["f"], d["c"], d["fh"],
                                      d["fw"]), "filter_shape")
    geom = _local_geometry(d, stride=stride, pad=pad, padding=padding, layout=layout,
                           precision=precision)
    check_hidden_hw(geom, (d["h"], d["w"]), (d["fh"], d["fw"]), (d["oh"], d["ow"]), "hid_grads")
    return geom, (d["fh"], d["fw"])
