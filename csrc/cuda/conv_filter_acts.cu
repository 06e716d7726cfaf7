// CUDA handler of filter_acts (the conv forward): conv_launch.cuh instantiated for FA only.
#include "conv_launch.cuh"

ffi::Error FilterActsImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer y,
                          ffi::Result<ffi::AnyBuffer> res, jax_convnet::ConvParams cp) {
  return ConvImpl<OpKind::kFA>(stream, Workspace{nullptr, 0}, x, y, res, cp);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FilterActsCuda, FilterActsImpl,
                              JCN_CONV_BINDING.Attrs<jax_convnet::ConvParams>(),
                              {ffi::Traits::kCmdBufferCompatible});
