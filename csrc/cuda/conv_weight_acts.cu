// CUDA handler of weight_acts (the conv gradient to the filters): conv_launch.cuh for WA only.
// The workspace result holds the partial sums (see Workspace in conv_launch.cuh).
#include "conv_launch.cuh"

ffi::Error WeightActsImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer y,
                          ffi::Result<ffi::AnyBuffer> res, ffi::Result<ffi::AnyBuffer> workspace,
                          jax_convnet::ConvParams cp) {
  if (workspace->dimensions().size() != 1 || workspace->element_type() != ffi::DataType::U8)
    return jax_convnet::invalid("weight_acts", "the workspace result must be a 1-d uint8 buffer");
  return ConvImpl<OpKind::kWA>(stream, Workspace{workspace->untyped_data(),
                                                 int64_t(workspace->size_bytes())},
                               x, y, res, cp);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    WeightActsCuda, WeightActsImpl,
    JCN_CONV_BINDING.Ret<ffi::AnyBuffer>().Attrs<jax_convnet::ConvParams>(),
    {ffi::Traits::kCmdBufferCompatible});
