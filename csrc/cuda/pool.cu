// PLACEHOLDER: to be replaced by the real kernels.
#include "ffi_common.h"
#include "targets.h"
namespace ffi = xla::ffi;
static ffi::Error NotYet(ffi::RemainingArgs, ffi::RemainingRets) { return ffi::Error(ffi::ErrorCode::kUnimplemented, "not implemented yet"); }
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolCuda, NotYet, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolJvpCuda, NotYet, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolGradCuda, NotYet, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
