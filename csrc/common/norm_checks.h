// Response norms (cross_map_norm, response_norm): the parameters as the kernels receive them,
// their memory view and the checks every handler makes, on the CPU (csrc/cpu/norm.cc) and CUDA
// (csrc/cuda/norm.cu) alike. The C++ mirror of geometry.py's NormGeometry.
//
// y = x * d^-p, d = min_div + add_scale * S, S the sum of x^2 over each element's window. Every
// layout and both ops are one memory pattern [O][A1][A2][I] (I contiguous) with the window on A1
// (and on A2 for the same-map op):
//   cross-map C01B (C, H, W, B): O = 1,     A1 = C, A2 = 1, I = H*W*B
//   cross-map NHWC (B, H, W, C): O = B*H*W, A1 = C, A2 = 1, I = 1
//   same-map  C01B (C, H, W, B): O = C,     A1 = H, A2 = W, I = B
//   same-map  NHWC (B, H, W, C): O = B,     A1 = H, A2 = W, I = C
// Window of output a on an axis of extent A: [a + lo, a + lo + size) clipped to [0, A), with
// lo = -(size / 2) for the forward and the JVP, lo = size / 2 - size + 1 for the gradient (the
// transposed windows); blocked (cross-map only): [(a / size) * size, +size) clipped, both ways.
// S is summed in float32 (float64 for float64) from 0, over the window's rows in increasing
// order and, within a row, its columns in increasing order.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "ffi_common.h"

namespace jax_convnet {

// FFI attributes "layout", "same_map", "size", "blocked", "add_scale", "pow_scale", "min_div".
struct NormParams {
  Layout layout;
  int64_t same_map, size, blocked;
  double add_scale, pow_scale, min_div;
};

struct NormDims {
  int64_t O, A1, A2, I;
  int64_t size;
  bool same_map, blocked;
};

namespace norm {

#if defined(__CUDACC__)
#define JCN_NORM_HD __host__ __device__ __forceinline__
#else
#define JCN_NORM_HD inline
#endif

// [begin, end) of the window of a on an axis of `extent`; `lo` as above.
template <typename Int>
JCN_NORM_HD void window(Int a, Int extent, Int size, Int lo, bool blocked, Int* begin, Int* end) {
  Int b = blocked ? (a / size) * size : a + lo;
  Int e = b + size;
  *begin = b < 0 ? Int(0) : b;
  *end = e > extent ? extent : e;
}

inline int64_t lo_of(int64_t size, bool transposed) {
  return transposed ? size / 2 - size + 1 : -(size / 2);
}

inline int64_t elements(const NormDims& d) { return d.O * d.A1 * d.A2 * d.I; }

}  // namespace norm

// The buffers of one norm call, null where the op has none: x; v, the tangents (JVP) or the
// cotangents (gradient); den, the denominators the JVP and the gradient read; out; d_out, the
// denominators the forward with residual writes.
struct NormBuffers {
  const ffi::AnyBuffer *x, *v, *den;
  ffi::AnyBuffer *out, *d_out;

  // The same as a backend's Typed<T, R>{x, v, den, out, d_out} of typed pointers (T the
  // operands' storage type, R the denominators').
  template <template <typename, typename> class Typed, typename T, typename R>
  Typed<T, R> typed() const {
    return {static_cast<const T*>(x->untyped_data()),
            v ? static_cast<const T*>(v->untyped_data()) : nullptr,
            den ? static_cast<const R*>(den->untyped_data()) : nullptr,
            static_cast<T*>(out->untyped_data()),
            d_out ? static_cast<R*>(d_out->untyped_data()) : nullptr};
  }
};

// Checks `p` and that every buffer of `b` has the shape of x; x, v and out share x's dtype, the
// denominators are float32 for float16, the operands' dtype otherwise. Fills *d on success.
inline ffi::Error check_norm_call(const char* op, const NormParams& p, const NormBuffers& b,
                                  bool allow_f64, NormDims* d) {
  const ffi::AnyBuffer* arrays[5];
  int n = 0;
  arrays[n++] = b.x;
  if (b.v) arrays[n++] = b.v;
  arrays[n++] = b.out;
  const int n_like = n;
  if (b.den) arrays[n++] = b.den;
  if (b.d_out) arrays[n++] = b.d_out;
  for (int k = 0; k < n; ++k)
    if (!is_rank4(*arrays[k])) return invalid(op, "operands and results must be rank 4");
  const ffi::DataType t = arrays[0]->element_type();
  ffi::Error checked = check_supported_dtype(op, t, allow_f64);
  if (checked.failure()) return checked;
  const ffi::DataType residual = t == ffi::DataType::F16 ? ffi::DataType::F32 : t;
  for (int k = 0; k < n; ++k) {
    if (arrays[k]->element_type() != (k < n_like ? t : residual))
      return invalid(op, "operands must share one dtype and the denominators be float32 for "
                         "float16, the operands' dtype otherwise");
    if (!(arrays[k]->dimensions() == arrays[0]->dimensions()))
      return invalid(op, "operands and results must have one shape");
  }
  const int64_t* s = arrays[0]->dimensions().begin();
  if (!tensor_dims_ok(s)) return invalid(op, "every dimension must be in [1, 2^31 - 1] and the "
                                             "tensor have at most 2^58 elements");
  if (p.layout != Layout::kC01B && p.layout != Layout::kNHWC) return invalid(op, "bad layout");
  if (p.same_map != 0 && p.same_map != 1) return invalid(op, "same_map must be 0 or 1");
  if (p.blocked != 0 && p.blocked != 1) return invalid(op, "blocked must be 0 or 1");
  if (p.blocked && p.same_map) return invalid(op, "blocked windows exist for cross-map only");
  if (p.size < 1 || p.size > kMaxExtent) return invalid(op, "size must be in [1, 2^31 - 1]");
  if (!std::isfinite(p.add_scale) || p.add_scale < 0)
    return invalid(op, "add_scale must be finite and >= 0");
  if (!std::isfinite(p.pow_scale)) return invalid(op, "pow_scale must be finite");
  if (!std::isfinite(p.min_div) || !(p.min_div > 0))
    return invalid(op, "min_div must be finite and > 0");
  const ImageDims im = image_dims(p.layout, s);
  const bool c01b = p.layout == Layout::kC01B;
  if (p.same_map)
    *d = c01b ? NormDims{im.c, im.h, im.w, im.n, p.size, true, false}
              : NormDims{im.n, im.h, im.w, im.c, p.size, true, false};
  else
    *d = c01b ? NormDims{1, im.c, 1, im.h * im.w * im.n, p.size, false, p.blocked != 0}
              : NormDims{im.n * im.h * im.w, im.c, 1, 1, p.size, false, p.blocked != 0};
  return ffi::Error::Success();
}

}  // namespace jax_convnet

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_convnet::NormParams,
                                      ::xla::ffi::StructMember<jax_convnet::Layout>("layout"),
                                      ::xla::ffi::StructMember<int64_t>("same_map"),
                                      ::xla::ffi::StructMember<int64_t>("size"),
                                      ::xla::ffi::StructMember<int64_t>("blocked"),
                                      ::xla::ffi::StructMember<double>("add_scale"),
                                      ::xla::ffi::StructMember<double>("pow_scale"),
                                      ::xla::ffi::StructMember<double>("min_div"));
