// PLACEHOLDER: to be replaced by the real kernels.
#include "ffi_common.h"
#include "targets.h"
namespace ffi = xla::ffi;
static ffi::Error NotYet(ffi::RemainingArgs, ffi::RemainingRets) { return ffi::Error(ffi::ErrorCode::kUnimplemented, "not implemented yet"); }
XLA_FFI_DEFINE_HANDLER_SYMBOL(FilterActsCpu, NotYet, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ImageActsCpu, NotYet, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(WeightActsCpu, NotYet, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
