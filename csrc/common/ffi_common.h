// XLA FFI plumbing shared by the CPU and CUDA handlers: attribute decoding of the canonical
// parameter structs, dtype checks and the names of the FFI targets (mirrored in
// jax_convnet/_native.py).
#pragma once

#include <string>

#include "geometry.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_convnet::Layout);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_convnet::Precision);

// Both parameter structs are decoded from the custom call's flat attribute dictionary with
// `.Attrs<jax_convnet::ConvParams>()` / `.Attrs<jax_convnet::PoolParams>()`.
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

namespace jax_convnet {

namespace ffi = ::xla::ffi;

inline ffi::Error invalid(const std::string& op, const std::string& what) {
  return ffi::Error::InvalidArgument("jax_convnet " + op + ": " + what);
}

inline bool is_rank4(const ffi::AnyBuffer& b) { return b.dimensions().size() == 4; }

// Every operand and result of one call shares a dtype; `allow_f64` is true on the CPU only.
inline bool supported_dtype(ffi::DataType t, bool allow_f64) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16 ||
         (allow_f64 && t == ffi::DataType::F64);
}

}  // namespace jax_convnet
