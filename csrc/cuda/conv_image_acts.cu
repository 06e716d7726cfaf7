// CUDA handler of image_acts (the conv gradient to the images): conv_launch.cuh for IA only.
// The workspace result holds the column buffer of the few-channel path (possibly 0 bytes: then
// it is not taken; see run_ia_columns in conv_launch.cuh).
#include "conv_launch.cuh"

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ImageActsCuda, ConvImplWithWorkspace<OpKind::kIA>,
    JCN_CONV_BINDING.Ret<ffi::AnyBuffer>().Attrs<jax_convnet::ConvParams>(),
    {ffi::Traits::kCmdBufferCompatible});
