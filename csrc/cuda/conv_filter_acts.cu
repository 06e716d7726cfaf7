// CUDA handler of filter_acts (the conv forward): conv_launch.cuh instantiated for FA only.
// The workspace result holds the FFT path's spectra (0 bytes where the path does not run).
#include "conv_launch.cuh"

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FilterActsCuda, ConvImplWithWorkspace<OpKind::kFA>,
    JCN_CONV_BINDING.Ret<ffi::AnyBuffer>().Attrs<jax_convnet::ConvParams>(),
    {ffi::Traits::kCmdBufferCompatible});
