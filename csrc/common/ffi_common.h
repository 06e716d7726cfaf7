// XLA FFI plumbing shared by the CPU and CUDA handlers: attribute decoding of the canonical
// parameter structs, dtype checks and the names of the FFI targets (mirrored in
// jax_convnet/_native.py).
#pragma once

#include <exception>
#include <string>

#include "geometry.h"
#include "pool_select.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_convnet::Layout);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_convnet::Precision);

// The parameter structs are decoded from the custom call's flat attribute dictionary with
// `.Attrs<jax_convnet::ConvParams>()` / `.Attrs<jax_convnet::PoolParams>()` /
// `.Attrs<jax_convnet::AvgPoolParams>()`.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_convnet::ConvParams,
                                      ::xla::ffi::StructMember<jax_convnet::Layout>("layout"),
                                      ::xla::ffi::StructMember<int64_t>("stride_h"),
                                      ::xla::ffi::StructMember<int64_t>("stride_w"),
                                      ::xla::ffi::StructMember<int64_t>("pad_top"),
                                      ::xla::ffi::StructMember<int64_t>("pad_bottom"),
                                      ::xla::ffi::StructMember<int64_t>("pad_left"),
                                      ::xla::ffi::StructMember<int64_t>("pad_right"),
                                      ::xla::ffi::StructMember<int64_t>("partial_sum"),
                                      ::xla::ffi::StructMember<jax_convnet::Precision>("precision"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_convnet::PoolParams,
                                      ::xla::ffi::StructMember<jax_convnet::Layout>("layout"),
                                      ::xla::ffi::StructMember<int64_t>("window_h"),
                                      ::xla::ffi::StructMember<int64_t>("window_w"),
                                      ::xla::ffi::StructMember<int64_t>("stride_h"),
                                      ::xla::ffi::StructMember<int64_t>("stride_w"),
                                      ::xla::ffi::StructMember<int64_t>("pad_top"),
                                      ::xla::ffi::StructMember<int64_t>("pad_left"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_convnet::AvgPoolParams,
                                      ::xla::ffi::StructMember<jax_convnet::Layout>("layout"),
                                      ::xla::ffi::StructMember<int64_t>("window_h"),
                                      ::xla::ffi::StructMember<int64_t>("window_w"),
                                      ::xla::ffi::StructMember<int64_t>("stride_h"),
                                      ::xla::ffi::StructMember<int64_t>("stride_w"),
                                      ::xla::ffi::StructMember<int64_t>("pad_top"),
                                      ::xla::ffi::StructMember<int64_t>("pad_left"),
                                      ::xla::ffi::StructMember<int64_t>("count_include_pad"));

namespace jax_convnet {

namespace ffi = ::xla::ffi;

inline ffi::Error invalid(const std::string& op, const std::string& what) {
  return ffi::Error::InvalidArgument("jax_convnet " + op + ": " + what);
}

inline bool is_rank4(const ffi::AnyBuffer& b) { return b.dimensions().size() == 4; }

// A handler's computation (`compute()` returns false where a worker thread failed), its failures
// and exceptions turned into FFI errors: nothing escapes into XLA.
template <typename F>
ffi::Error run_guarded(const std::string& op, F&& compute) {
  try {
    if (!compute()) return ffi::Error::Internal("jax_convnet " + op + ": a worker thread failed");
  } catch (const std::exception& e) {
    return ffi::Error::Internal("jax_convnet " + op + ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal("jax_convnet " + op + ": unknown failure");
  }
  return ffi::Error::Success();
}

// Every operand and result of one call shares a dtype; `allow_f64` is true on the CPU only.
inline bool supported_dtype(ffi::DataType t, bool allow_f64) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16 ||
         (allow_f64 && t == ffi::DataType::F64);
}

// Checks shared by the pool handlers of both platforms; `pooled` is the buffer whose dims give the
// output size.
inline ffi::Error check_pool_call(const char* op, const PoolParams& p, const ffi::AnyBuffer& images,
                                  const ffi::AnyBuffer& pooled, bool allow_f64, PoolGeometry* g) {
  if (!is_rank4(images) || !is_rank4(pooled))
    return invalid(op, "operands and result must be rank 4");
  if (!supported_dtype(images.element_type(), allow_f64))
    return invalid(op, allow_f64 ? "dtype must be float32, bfloat16, float16 or float64"
                                 : "dtype must be float32, bfloat16 or float16 on the GPU");
  if (pooled.element_type() != images.element_type())
    return invalid(op, "operands and result must share one dtype");
  std::string e =
      make_pool_geometry(p, images.dimensions().begin(), pooled.dimensions().begin(), g);
  if (e.empty()) e = pool::check_pool_extent(*g);
  if (!e.empty()) return invalid(op, e);
  return ffi::Error::Success();
}

}  // namespace jax_convnet
