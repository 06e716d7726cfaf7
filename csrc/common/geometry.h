// Geometry of the conv and pool families as the kernels see it: the C++ mirror of
// jax_convnet/geometry.py. The Python side turns both padding conventions into explicit
// per-side padding; kernels only ever see the canonical parameters below and re-check them
// against the buffer shapes they receive (never trusting the caller, never crashing).
#pragma once

#include <cstdint>
#include <algorithm>
#include <string>

namespace jax_convnet {

// ceil(a / b) and a rounded up to a multiple of b, for a >= 0 and b > 0.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Attribute values; keep in sync with geometry.py (LAYOUT_CODES, PRECISION_CODES).
enum class Layout : int64_t { kC01B = 0, kNHWC = 1 };
enum class Precision : int64_t { kDefault = 0, kHigh = 1, kHighest = 2 };

// Bounds (geometry.py's MAX_EXTENT, MAX_ELEMENTS): every size, window, stride and pad, and every
// padded extent, fits a signed 32-bit int; every tensor has at most 2**58 elements. The Python
// side rejects larger values with a ValueError; the handlers re-check and return an error.
constexpr int64_t kMaxExtent = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxElements = int64_t(1) << 58;

inline bool extent_ok(int64_t v) { return v >= -kMaxExtent && v <= kMaxExtent; }

// The four dims are each in [1, kMaxExtent] and their product is at most kMaxElements.
inline bool tensor_dims_ok(const int64_t* d) {
  int64_t elements = 1;
  for (int i = 0; i < 4; ++i) {
    if (d[i] < 1 || d[i] > kMaxExtent) return false;
    if (elements > kMaxElements / d[i]) return false;
    elements *= d[i];
  }
  return true;
}

// Element strides of a logical 4-d tensor (batch-or-filter, channel, row, col).
struct Strides4 {
  int64_t n, c, y, x;
};

// Logical (n, c, h, w) sizes read off a buffer's dims in the given layout.
// C01B images (C, H, W, B) / NHWC images (B, H, W, C).
struct ImageDims {
  int64_t n, c, h, w;
};

inline ImageDims image_dims(Layout layout, const int64_t* d) {
  if (layout == Layout::kC01B) return {d[3], d[0], d[1], d[2]};
  return {d[0], d[3], d[1], d[2]};
}

inline Strides4 image_strides(Layout layout, const ImageDims& s) {
  if (layout == Layout::kC01B)  // (C, H, W, B)
    return {1, s.h * s.w * s.n, s.w * s.n, s.n};
  return {s.h * s.w * s.c, 1, s.w * s.c, s.c};  // (B, H, W, C)
}

// Filters: C01B (C, fh, fw, F) / NHWC "HWIO" (fh, fw, C, F). Logical (f, c, y, x).
struct FilterDims {
  int64_t f, c, h, w;
};

inline FilterDims filter_dims(Layout layout, const int64_t* d) {
  if (layout == Layout::kC01B) return {d[3], d[0], d[1], d[2]};
  return {d[3], d[2], d[0], d[1]};
}

inline Strides4 filter_strides(Layout layout, const FilterDims& s) {
  if (layout == Layout::kC01B)  // (C, fh, fw, F)
    return {1, s.h * s.w * s.f, s.w * s.f, s.f};
  return {1, s.f, s.w * s.c * s.f, s.c * s.f};  // (fh, fw, C, F)
}

// Canonical attributes of filter_acts / image_acts / weight_acts (FFI attribute names in quotes):
// "layout", "stride_h", "stride_w", "pad_top", "pad_bottom", "pad_left", "pad_right",
// "partial_sum" (0 = one sum over all output positions), "precision"; and "groups"
// (cuda-convnet's numGroups), present only where it is not 1 and taken by the CPU handlers only:
// C and F split into `groups` equal parts, filter f reading the C / groups channels of group
// f / (F / groups).
struct ConvParams {
  Layout layout;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;
  int64_t partial_sum;
  Precision precision;
  int64_t groups = 1;
};

// Everything a conv kernel needs, derived from the three buffers' dims and checked.
// Output (hidden activations) are an image tensor with n = batch, c = filters.
struct ConvGeometry {
  Layout layout;
  int64_t batch, channels, filters;
  int64_t in_h, in_w, filter_h, filter_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_top, pad_left;
  int64_t partial_sum;  // always >= 1 here: 0 from the caller becomes out_h * out_w
  Precision precision;
  Strides4 image, filter, hidden;
  // channels and filters count all groups; the filters hold channels / groups channels each.
  int64_t groups = 1;
};

// The floor rule on explicit per-side padding; the ceil rule arrives here already turned into
// extra bottom/right padding.
inline int64_t conv_out_size(int64_t in, int64_t filter, int64_t stride, int64_t lo, int64_t hi) {
  int64_t span = in + lo + hi - filter;
  if (span < 0) return 0;
  return span / stride + 1;
}

// Fills `g` from the dims of the images, filters and hidden buffers (each rank 4, in the
// layout's order). Returns an empty string when consistent, otherwise what is wrong.
inline std::string make_conv_geometry(const ConvParams& p, const int64_t* image_d,
                                      const int64_t* filter_d, const int64_t* hidden_d,
                                      ConvGeometry* g) {
  if (p.layout != Layout::kC01B && p.layout != Layout::kNHWC) return "layout must be 0 or 1";
  if (p.stride_h < 1 || p.stride_w < 1) return "strides must be >= 1";
  if (p.pad_top < 0 || p.pad_bottom < 0 || p.pad_left < 0 || p.pad_right < 0)
    return "padding must be >= 0";
  if (p.partial_sum < 0) return "partial_sum must be >= 0";
  if (p.groups < 1 || p.groups > kMaxExtent) return "groups must be in [1, 2**31 - 1]";
  if (!extent_ok(p.stride_h) || !extent_ok(p.stride_w) || !extent_ok(p.pad_top) ||
      !extent_ok(p.pad_bottom) || !extent_ok(p.pad_left) || !extent_ok(p.pad_right))
    return "strides and padding must be at most 2**31 - 1";
  ImageDims im = image_dims(p.layout, image_d);
  FilterDims fi = filter_dims(p.layout, filter_d);
  ImageDims hid = image_dims(p.layout, hidden_d);
  if (im.n < 1 || im.c < 1 || im.h < 1 || im.w < 1) return "images must be non-empty";
  if (fi.f < 1 || fi.c < 1 || fi.h < 1 || fi.w < 1) return "filters must be non-empty";
  if (!tensor_dims_ok(image_d) || !tensor_dims_ok(filter_d) || !tensor_dims_ok(hidden_d))
    return "every dimension must be in [1, 2**31 - 1] and every tensor at most 2**58 elements";
  if (p.groups == 1 && fi.c != im.c) return "filters' channel count differs from the images'";
  if (fi.c * p.groups != im.c) return "filters' channel count times groups differs from the images'";
  if (fi.f % p.groups != 0) return "groups must divide the filter count";
  if (im.h + p.pad_top + p.pad_bottom > kMaxExtent || im.w + p.pad_left + p.pad_right > kMaxExtent)
    return "the padded image must be at most 2**31 - 1 in each axis";
  if (hid.n != im.n) return "hidden batch size differs from the images'";
  if (hid.c != fi.f) return "hidden channel count differs from the filter count";
  int64_t oh = conv_out_size(im.h, fi.h, p.stride_h, p.pad_top, p.pad_bottom);
  int64_t ow = conv_out_size(im.w, fi.w, p.stride_w, p.pad_left, p.pad_right);
  if (oh < 1 || ow < 1) return "filter larger than the padded image";
  if (hid.h != oh || hid.w != ow) return "hidden spatial size does not follow from the geometry";
  int64_t positions = oh * ow;
  int64_t ps = p.partial_sum == 0 ? positions : p.partial_sum;
  if (positions % ps != 0) return "partial_sum must divide out_h * out_w";
  // An axis with one output position reads the same pixels at any stride; stride 1 there keeps
  // the kernels' coordinates small (a stride of 2**31 - 1 is valid).
  const int64_t stride_h = oh == 1 ? 1 : p.stride_h, stride_w = ow == 1 ? 1 : p.stride_w;
  *g = ConvGeometry{p.layout, im.n, im.c, fi.f, im.h, im.w, fi.h, fi.w, oh, ow,
                    stride_h, stride_w, p.pad_top, p.pad_left, ps, p.precision,
                    image_strides(p.layout, im), filter_strides(p.layout, fi),
                    image_strides(p.layout, hid), p.groups};
  return "";
}

// Convolutions of stride 1 with large filters run on the GPU through 2-d FFTs
// (csrc/cuda/conv_fft.cuh): every plane of the two operands zero-padded to ph x pw (the padded
// image's extent rounded up to a power of two), transformed, multiplied bin by bin (a complex
// GEMM over channels, filters or batch per frequency bin on the tensor cores) and transformed
// back. The transforms are float32; the bin GEMM is 3xTF32 (float32-accurate) for float32 at a
// precision above default and TF32 otherwise, so every dtype and precision may take it. It runs
// where the direct GEMM needs kFftMinSaving* times the complex GEMM's multiply-adds or more: the
// margin pays for the transforms and the complex GEMM's lower rate. Where it won
// (benchmarks/history/2026-11-29_session5_fft.md): at float32 accuracy from L4 / AlexNet conv2
// (7x7 / 5x5) on, TF32 only from L3 / L2 (9x9); 16-bit types lose even on L2 to the tensor cores. weight_acts takes it only for one sum over all positions
// (the transform sums over positions in its own order). The workspace (conv_workspace.h) holds
// the spectra of the images, the filters and the hidden tensor (N*C, C*F and N*F planes of
// ph * (pw/2 + 1) complex float bins), each rounded up to 256 bytes, in that order; the path runs
// exactly when the workspace has this plan's size.
struct FftConvPlan {
  int64_t ph = 0, pw = 0;  // 0: the path does not run
  int64_t spectrum_bytes[3] = {0, 0, 0};
  int64_t bytes = 0;
};
constexpr int64_t kFftMinSize = 8, kFftMaxSize = 64;
constexpr double kFftMinSavingFloat32Accurate = 3.0, kFftMinSavingTf32 = 12.0,
                 kFftMinSaving16Bit = 40.0;
constexpr int64_t kFftMaxBytes = int64_t(2) << 30;

inline int64_t fft_size(int64_t extent) {
  int64_t size = kFftMinSize;
  while (size < extent) size *= 2;
  return size;
}

// cap_bytes: the most the spectra may take (the lowering may turn the path off with 0).
inline FftConvPlan fft_conv_plan(bool weight_acts, const ConvGeometry& g, int64_t itemsize,
                                 int64_t cap_bytes = kFftMaxBytes) {
  FftConvPlan none;
  if (g.stride_h != 1 || g.stride_w != 1) return none;
  if (weight_acts && g.partial_sum != g.out_h * g.out_w) return none;
  // Stride 1: the padded image's extent is out + filter - 1.
  const int64_t ph = fft_size(g.out_h + g.filter_h - 1), pw = fft_size(g.out_w + g.filter_w - 1);
  if (std::max(ph, pw) > kFftMaxSize) return none;
  const int64_t bins = ph * (pw / 2 + 1);
  const double saving =
      double(g.out_h * g.out_w * g.filter_h * g.filter_w) / double(4 * bins);
  const double need = itemsize == 2                         ? kFftMinSaving16Bit
                      : g.precision == Precision::kDefault ? kFftMinSavingTf32
                                                            : kFftMinSavingFloat32Accurate;
  if (saving < need) return none;
  FftConvPlan plan;
  const int64_t planes[3] = {g.batch * g.channels, g.channels * g.filters, g.batch * g.filters};
  for (int i = 0; i < 3; ++i) {
    plan.spectrum_bytes[i] = (planes[i] * bins * 8 + 255) / 256 * 256;
    plan.bytes += plan.spectrum_bytes[i];
  }
  if (plan.bytes > std::min(cap_bytes, kFftMaxBytes)) return none;
  plan.ph = ph;
  plan.pw = pw;
  return plan;
}

// Canonical attributes of max_pool and its JVP / gradient:
// "layout", "window_h", "window_w", "stride_h", "stride_w", "pad_top", "pad_left".
// Window o covers rows [o*stride_h - pad_top, o*stride_h - pad_top + window_h) clipped to the
// image (pad_top is -start in cuda-convnet's convention, so it may be negative). An empty
// window yields -inf and passes no gradient. The output size comes from the output buffer.
struct PoolParams {
  Layout layout;
  int64_t window_h, window_w, stride_h, stride_w, pad_top, pad_left;
};

struct PoolGeometry {
  Layout layout;
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  int64_t window_h, window_w, stride_h, stride_w, pad_top, pad_left;
  Strides4 image, pooled;
};

// Canonical attributes of avg_pool and its gradient: PoolParams' and "count_include_pad" (0 or 1).
// The windows are max_pool's; each window's divisor is window_h * window_w when
// count_include_pad is 1, else the number of its elements inside the image (which may be 0 for a
// window wholly in the padding: 0 / 0 gives NaN).
struct AvgPoolParams {
  PoolParams windows;
  int64_t count_include_pad;
};

inline std::string make_pool_geometry(const PoolParams& p, const int64_t* image_d,
                                      const int64_t* pooled_d, PoolGeometry* g) {
  if (p.layout != Layout::kC01B && p.layout != Layout::kNHWC) return "layout must be 0 or 1";
  if (p.window_h < 1 || p.window_w < 1) return "window must be >= 1";
  if (p.stride_h < 1 || p.stride_w < 1) return "strides must be >= 1";
  if (!extent_ok(p.window_h) || !extent_ok(p.window_w) || !extent_ok(p.stride_h) ||
      !extent_ok(p.stride_w) || !extent_ok(p.pad_top) || !extent_ok(p.pad_left))
    return "windows, strides and padding must be at most 2**31 - 1 in magnitude";
  ImageDims im = image_dims(p.layout, image_d);
  ImageDims out = image_dims(p.layout, pooled_d);
  if (im.n < 1 || im.c < 1 || im.h < 1 || im.w < 1) return "images must be non-empty";
  if (out.n != im.n || out.c != im.c) return "pooled batch/channels differ from the images'";
  if (out.h < 1 || out.w < 1) return "pooled output must be non-empty";
  if (!tensor_dims_ok(image_d) || !tensor_dims_ok(pooled_d))
    return "every dimension must be in [1, 2**31 - 1] and every tensor at most 2**58 elements";
  *g = PoolGeometry{p.layout, im.n, im.c, im.h, im.w, out.h, out.w,
                    p.window_h, p.window_w, p.stride_h, p.stride_w, p.pad_top, p.pad_left,
                    image_strides(p.layout, im), image_strides(p.layout, out)};
  return "";
}

}  // namespace jax_convnet
