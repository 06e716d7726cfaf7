// Max-pool helpers shared by the CPU (csrc/cpu/pool.cc) and CUDA (csrc/cuda/pool.cu) kernels:
// the selection rule of the contract, the winners' encoding, the integer arithmetic that finds
// the windows covering an image position, and the host-side range checks that keep every index
// the kernels form free of overflow (so both backends accept and reject exactly the same calls).
#pragma once

#include <cstdint>
#include <string>

#include "geometry.h"

#if defined(__CUDACC__)
#define JCN_POOL_HD __host__ __device__ __forceinline__
#else
#define JCN_POOL_HD inline
#endif

namespace jax_convnet {
namespace pool {

// Scanning a window in row-major order, element `v` replaces the current `best` when it is the
// first element of the window, when it is larger, or when it is NaN and `best` is not. The
// selected element is therefore the first NaN if there is one, otherwise the first maximum.
// F is float (float32 / bfloat16 / float16 compared as float32) or double (float64).
// Written with bitwise operators (no short-circuit) so it compiles to selects, not branches.
template <typename F>
JCN_POOL_HD bool takes(bool first, F v, F best) {
  return first | (v > best) | ((v != v) & (best == best));
}

// The same rule for a scan whose `best` starts at -inf instead of at the first element: `v` is
// taken when it is larger than `best` or NaN, unless `best` is already NaN (`!(v <= best)` is
// true for v > best and for a NaN v). Equal to takes() at every step once an element larger
// than -inf or a NaN has been taken; before that (a run of -inf) nothing is taken, and the
// selected element is the window's first. Three comparisons and no first-element case.
template <typename F>
JCN_POOL_HD bool takes_over(F v, F best) {
  return !(v <= best) & (best == best);
}

// Floor / ceil of a / b for b > 0 and any sign of a.
template <typename I>
JCN_POOL_HD I floor_div(I a, I b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
template <typename I>
JCN_POOL_HD I ceil_div(I a, I b) {
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// Window o covers positions [o*stride - pad, o*stride - pad + window) along one axis. The windows
// covering at least one position of [lo, hi] (lo <= hi) are [*first, *last] (empty when
// *first > *last), clipped to [0, n_out):
//   o*stride - pad <= hi            <=>  o <= floor((hi + pad) / stride)
//   o*stride - pad + window - 1 >= lo <=>  o >= ceil((lo + pad - window + 1) / stride)
template <typename I>
JCN_POOL_HD void covering_windows(I lo, I hi, I pad, I window, I stride, I n_out, I* first,
                                  I* last) {
  I f = ceil_div<I>(lo + pad - window + 1, stride);
  I l = floor_div<I>(hi + pad, stride);
  *first = f < 0 ? I(0) : f;
  *last = l > n_out - 1 ? n_out - 1 : l;
}

// avg_pool: the number of positions of [start, start + window) inside [0, n) (0 when none).
template <typename I>
JCN_POOL_HD I clipped_extent(I start, I window, I n) {
  const I lo = start < 0 ? I(0) : start;
  const I hi = start + window < n ? start + window : n;
  return hi > lo ? hi - lo : I(0);
}

// avg_pool: the divisor of the window whose first row / col is (y0, x0) (may be outside the
// image): window_h * window_w with count_include_pad, else its in-image element count.
template <typename I>
JCN_POOL_HD I window_divisor(bool count_include_pad, I y0, I x0, I window_h, I window_w, I in_h,
                             I in_w) {
  return count_include_pad
             ? window_h * window_w
             : clipped_extent<I>(y0, window_h, in_h) * clipped_extent<I>(x0, window_w, in_w);
}

// Largest |value| of any spatial coordinate / window bound the kernels compute along one axis is
// below (n_out - 1)*stride + window + |pad| + in. True when that sum is <= lim (no overflow).
inline bool axis_extent_within(int64_t n_out, int64_t stride, int64_t window, int64_t pad,
                               int64_t in, int64_t lim) {
  if (n_out < 1 || stride < 1 || window < 1 || in < 1) return false;
  if (window > lim || stride > lim || in > lim || pad > lim || pad < -lim) return false;
  int64_t abs_pad = pad < 0 ? -pad : pad;
  int64_t rest = lim - window;  // >= 0
  if (abs_pad > rest) return false;
  rest -= abs_pad;
  if (in > rest) return false;
  rest -= in;
  return n_out == 1 || stride <= rest / (n_out - 1);
}

// Rejects attribute values so large that window coordinates could overflow 64-bit integers
// (e.g. a stride near 2^63); anything a real model uses passes. Same rule on CPU and CUDA.
inline std::string check_pool_extent(const PoolGeometry& g) {
  const int64_t lim = int64_t(1) << 60;
  if (!axis_extent_within(g.out_h, g.stride_h, g.window_h, g.pad_top, g.in_h, lim) ||
      !axis_extent_within(g.out_w, g.stride_w, g.window_w, g.pad_left, g.in_w, lim))
    return "window / stride / padding values too large";
  return "";
}

// True when every index the CUDA kernels form (flat offsets into all operands, thread indices
// plus the grid stride, window coordinates) fits comfortably in int32 (|value| <= 2^30), so the
// kernels may use 32-bit index arithmetic. `image_elems` / `pooled_elems` are element counts.
inline bool fits_int32(const PoolGeometry& g, int64_t image_elems, int64_t pooled_elems) {
  const int64_t lim = int64_t(1) << 30;
  return image_elems <= lim && pooled_elems <= lim &&
         axis_extent_within(g.out_h, g.stride_h, g.window_h, g.pad_top, g.in_h, lim) &&
         axis_extent_within(g.out_w, g.stride_w, g.window_w, g.pad_left, g.in_w, lim);
}

// Bytes per winner (each window's selected element as its row-major offset i * window_w + j in
// the whole, unclipped window; jax_convnet/geometry.py PoolGeometry.winner_dtype): 1 (uint8)
// while a window has at most 256 elements, 4 (int32) up to 2^31 elements, 0 beyond (such windows
// cannot be differentiated). An empty window's winner is 0: offset (0, 0) lies outside the image
// for every empty window, so the JVP and the gradient find no element there.
inline int winner_bytes(const PoolGeometry& g) {
  if (g.window_h < 1 || g.window_w < 1) return 0;
  if (g.window_h <= 256 && g.window_w <= 256 / g.window_h) return 1;
  const int64_t lim = int64_t(1) << 31;
  if (g.window_h <= lim && g.window_w <= lim / g.window_h) return 4;
  return 0;
}

// Both layouts store images as [outer][H][W][inner] with `inner` contiguous:
// C01B (C, H, W, B): outer = C, inner = B;  NHWC (B, H, W, C): outer = B, inner = C.
inline int64_t outer_size(const PoolGeometry& g) {
  return g.layout == Layout::kC01B ? g.channels : g.batch;
}
inline int64_t inner_size(const PoolGeometry& g) {
  return g.layout == Layout::kC01B ? g.batch : g.channels;
}

}  // namespace pool
}  // namespace jax_convnet
