// Geometry of the locally connected family (local_filter_acts, local_image_acts,
// local_weight_acts) as the kernels see it: the C++ mirror of jax_convnet/geometry.py's
// local_* rules. The attributes are the conv family's (ConvParams; partial_sum is 0), the sizes
// come from the buffers and are re-checked here.
//
// Filters are 6-d, one bank of K = C * fh * fw rows by F columns per output position:
//   C01B (Ho, Wo, C, fh, fw, F): row k = (c * fh + i) * fw + j
//   NHWC (Ho, Wo, fh, fw, C, F): row k = (i * fw + j) * C + c
// so filters[pos][k][f] sits at (pos * K + k) * F + f, pos = oy * Wo + ox.
#pragma once

#include <cstdint>
#include <string>

#include "geometry.h"

namespace jax_convnet {

struct LocalGeometry {
  Layout layout;
  int64_t batch, channels, filters;
  int64_t in_h, in_w, filter_h, filter_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_top, pad_left;
  Strides4 image, hidden;  // element strides (n, c, y, x) of images and hidden activations
  int64_t k_c, k_i, k_j;   // a filter row k = c * k_c + i * k_i + j * k_j

  int64_t positions() const { return out_h * out_w; }
  int64_t rows() const { return channels * filter_h * filter_w; }  // K
};

// The six dims are each in [1, kMaxExtent] and their product is at most kMaxElements.
inline bool tensor_dims6_ok(const int64_t* d) {
  int64_t elements = 1;
  for (int i = 0; i < 6; ++i) {
    if (d[i] < 1 || d[i] > kMaxExtent) return false;
    if (elements > kMaxElements / d[i]) return false;
    elements *= d[i];
  }
  return true;
}

// Fills `g` from the dims of the images (rank 4), filters (rank 6) and hidden (rank 4) buffers.
// Returns an empty string when consistent, otherwise what is wrong.
inline std::string make_local_geometry(const ConvParams& p, const int64_t* image_d,
                                       const int64_t* filter_d, const int64_t* hidden_d,
                                       LocalGeometry* g) {
  if (p.layout != Layout::kC01B && p.layout != Layout::kNHWC) return "layout must be 0 or 1";
  if (p.stride_h < 1 || p.stride_w < 1) return "strides must be >= 1";
  if (p.pad_top < 0 || p.pad_bottom < 0 || p.pad_left < 0 || p.pad_right < 0)
    return "padding must be >= 0";
  if (p.partial_sum != 0) return "partial_sum must be 0 (the local family has none)";
  if (p.precision != Precision::kDefault && p.precision != Precision::kHigh &&
      p.precision != Precision::kHighest)
    return "precision must be 0, 1 or 2";
  if (!extent_ok(p.stride_h) || !extent_ok(p.stride_w) || !extent_ok(p.pad_top) ||
      !extent_ok(p.pad_bottom) || !extent_ok(p.pad_left) || !extent_ok(p.pad_right))
    return "strides and padding must be at most 2**31 - 1";
  if (!tensor_dims_ok(image_d) || !tensor_dims6_ok(filter_d) || !tensor_dims_ok(hidden_d))
    return "every dimension must be in [1, 2**31 - 1] and every tensor at most 2**58 elements";
  const bool c01b = p.layout == Layout::kC01B;
  ImageDims im = image_dims(p.layout, image_d);
  ImageDims hid = image_dims(p.layout, hidden_d);
  // Logical filter sizes: positions (oh, ow), channels, taps (fh, fw), filters.
  const int64_t f_oh = filter_d[0], f_ow = filter_d[1], f_f = filter_d[5];
  const int64_t f_c = c01b ? filter_d[2] : filter_d[4];
  const int64_t f_h = c01b ? filter_d[3] : filter_d[2];
  const int64_t f_w = c01b ? filter_d[4] : filter_d[3];
  if (f_c != im.c) return "filters' channel count differs from the images'";
  if (im.h + p.pad_top + p.pad_bottom > kMaxExtent || im.w + p.pad_left + p.pad_right > kMaxExtent)
    return "the padded image must be at most 2**31 - 1 in each axis";
  if (hid.n != im.n) return "hidden batch size differs from the images'";
  if (hid.c != f_f) return "hidden channel count differs from the filter count";
  const int64_t oh = conv_out_size(im.h, f_h, p.stride_h, p.pad_top, p.pad_bottom);
  const int64_t ow = conv_out_size(im.w, f_w, p.stride_w, p.pad_left, p.pad_right);
  if (oh < 1 || ow < 1) return "filter larger than the padded image";
  if (hid.h != oh || hid.w != ow) return "hidden spatial size does not follow from the geometry";
  if (f_oh != oh || f_ow != ow)
    return "filters' output positions (their leading two dims) differ from the output size";
  *g = LocalGeometry{p.layout, im.n, im.c, f_f, im.h, im.w, f_h, f_w, oh, ow,
                     p.stride_h, p.stride_w, p.pad_top, p.pad_left,
                     image_strides(p.layout, im), image_strides(p.layout, hid),
                     c01b ? f_h * f_w : 1, c01b ? f_w : f_w * f_c, c01b ? 1 : f_c};
  return "";
}

}  // namespace jax_convnet
