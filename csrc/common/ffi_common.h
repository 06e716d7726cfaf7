// XLA FFI plumbing shared by the CPU and CUDA handlers: attribute decoding of the canonical
// parameter structs, dtype checks and the names of the FFI targets (mirrored in
// jax_convnet/_native.py).
#pragma once

#include <exception>
#include <initializer_list>
#include <string>

#include "geometry.h"
#include "pool_select.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_convnet::Layout);
XLA_FFI_REGISTER_ENUM_ATTR_DECODING(jax_convnet::Precision);

// The parameter structs are decoded from the custom call's flat attribute dictionary: a handler
// takes one of them by value (or binds `.Attrs<jax_convnet::ConvParams>()` explicitly).
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

// PoolParams' attributes, in the struct's order; AvgPoolParams holds a PoolParams first, so its
// attributes are these and then its own (the decoder fills the nested struct by brace elision).
#define JCN_POOL_PARAMS_MEMBERS                                        \
  ::xla::ffi::StructMember<jax_convnet::Layout>("layout"),             \
      ::xla::ffi::StructMember<int64_t>("window_h"),                   \
      ::xla::ffi::StructMember<int64_t>("window_w"),                   \
      ::xla::ffi::StructMember<int64_t>("stride_h"),                   \
      ::xla::ffi::StructMember<int64_t>("stride_w"),                   \
      ::xla::ffi::StructMember<int64_t>("pad_top"),                    \
      ::xla::ffi::StructMember<int64_t>("pad_left")

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_convnet::PoolParams, JCN_POOL_PARAMS_MEMBERS);

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_convnet::AvgPoolParams, JCN_POOL_PARAMS_MEMBERS,
                                      ::xla::ffi::StructMember<int64_t>("count_include_pad"));

#undef JCN_POOL_PARAMS_MEMBERS

// FFI handlers take their binding from the implementation's signature (XLA's inferred binding):
// ffi::AnyBuffer parameters are the operands, ffi::Result<ffi::AnyBuffer> the results, in order,
// and a parameter struct registered above decodes the attributes. CPU handlers are defined with
// `XLA_FFI_DEFINE_HANDLER_SYMBOL(Symbol, Impl);`, CUDA handlers with
// `JCN_DEFINE_CUDA_HANDLER(Symbol, Impl);`, whose Impl takes the stream first.
#if defined(__CUDACC__)
#include <cuda_runtime.h>

namespace xla::ffi {
template <>
struct CtxBinding<cudaStream_t> {  // a cudaStream_t parameter is the call's stream
  using Ctx = PlatformStream<cudaStream_t>;
};
}  // namespace xla::ffi

// The CUDA handler symbol `fn` of `impl`, marked CUDA-graph safe (kCmdBufferCompatible): its
// launches may not synchronise, allocate or read device memory on the host.
#define JCN_DEFINE_CUDA_HANDLER(fn, impl)                                                     \
  extern "C" XLA_FFI_Error* fn(XLA_FFI_CallFrame* call_frame) {                             \
    static auto* handler =                                                                  \
        ::xla::ffi::Ffi::BindTo(impl, {::xla::ffi::Traits::kCmdBufferCompatible}).release(); \
    return handler->Call(call_frame);                                                       \
  }                                                                                         \
  static_assert(true, "") /* takes the semicolon after the macro */
#endif

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

inline ffi::Error check_supported_dtype(const std::string& op, ffi::DataType t, bool allow_f64) {
  if (supported_dtype(t, allow_f64)) return ffi::Error::Success();
  return invalid(op, allow_f64 ? "dtype must be float32, bfloat16, float16 or float64"
                               : "dtype must be float32, bfloat16 or float16 on the GPU");
}

// The buffers (operands and results) share the first's dtype, a supported one.
inline ffi::Error check_one_dtype(const std::string& op,
                                  std::initializer_list<const ffi::AnyBuffer*> buffers,
                                  bool allow_f64) {
  const ffi::DataType t = (*buffers.begin())->element_type();
  ffi::Error checked = check_supported_dtype(op, t, allow_f64);
  if (checked.failure()) return checked;
  for (const ffi::AnyBuffer* b : buffers)
    if (b->element_type() != t) return invalid(op, "operands and result must share one dtype");
  return ffi::Error::Success();
}

// Checks shared by the pool handlers of both platforms; `pooled` is the buffer whose dims give the
// output size.
inline ffi::Error check_pool_call(const char* op, const PoolParams& p, const ffi::AnyBuffer& images,
                                  const ffi::AnyBuffer& pooled, bool allow_f64, PoolGeometry* g) {
  if (!is_rank4(images) || !is_rank4(pooled))
    return invalid(op, "operands and result must be rank 4");
  ffi::Error checked = check_one_dtype(op, {&images, &pooled}, allow_f64);
  if (checked.failure()) return checked;
  std::string e =
      make_pool_geometry(p, images.dimensions().begin(), pooled.dimensions().begin(), g);
  if (e.empty()) e = pool::check_pool_extent(*g);
  if (!e.empty()) return invalid(op, e);
  return ffi::Error::Success();
}

}  // namespace jax_convnet
