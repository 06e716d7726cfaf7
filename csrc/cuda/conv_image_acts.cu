// CUDA handler of image_acts (the conv gradient to the images): conv_launch.cuh for IA only.
// The workspace result holds the column buffer of the few-channel path (possibly 0 bytes: then
// it is not taken; see run_ia_columns in conv_launch.cuh).
#include "conv_launch.cuh"

ffi::Error ImageActsImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer y,
                         ffi::Result<ffi::AnyBuffer> res, ffi::Result<ffi::AnyBuffer> workspace,
                         jax_convnet::ConvParams cp) {
  if (workspace->dimensions().size() != 1 || workspace->element_type() != ffi::DataType::U8)
    return jax_convnet::invalid("image_acts", "the workspace result must be a 1-d uint8 buffer");
  return ConvImpl<OpKind::kIA>(stream, Workspace{workspace->untyped_data(),
                                                 int64_t(workspace->size_bytes())},
                               x, y, res, cp);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ImageActsCuda, ImageActsImpl,
    JCN_CONV_BINDING.Ret<ffi::AnyBuffer>().Attrs<jax_convnet::ConvParams>(),
    {ffi::Traits::kCmdBufferCompatible});
