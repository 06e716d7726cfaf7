// CUDA handler of image_acts (the conv gradient to the images): conv_launch.cuh for IA only.
#include "conv_launch.cuh"

ffi::Error ImageActsImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer y,
                         ffi::Result<ffi::AnyBuffer> res, jax_convnet::ConvParams cp) {
  return ConvImpl<OpKind::kIA>(stream, Workspace{nullptr, 0}, x, y, res, cp);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImageActsCuda, ImageActsImpl,
                              JCN_CONV_BINDING.Attrs<jax_convnet::ConvParams>(),
                              {ffi::Traits::kCmdBufferCompatible});
