// CUDA handler of weight_acts (the conv gradient to the filters): conv_launch.cuh for WA only.
// The workspace result holds the partial sums (see Workspace in conv_launch.cuh).
#include "conv_launch.cuh"

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    WeightActsCuda, ConvImplWithWorkspace<OpKind::kWA>,
    JCN_CONV_BINDING.Ret<ffi::AnyBuffer>().Attrs<jax_convnet::ConvParams>(),
    {ffi::Traits::kCmdBufferCompatible});
