// The FFI handler symbols each backend defines (CPU: suffix Cpu, CUDA: suffix Cuda) and the
// target names they are registered under; jax_convnet/_native.py uses the same names.
#pragma once

#include "xla/ffi/api/ffi.h"

#define JCN_FOR_EACH_TARGET(X)                      \
  X("jax_convnet_filter_acts", FilterActs)          \
  X("jax_convnet_image_acts", ImageActs)            \
  X("jax_convnet_weight_acts", WeightActs)          \
  X("jax_convnet_max_pool", MaxPool)                \
  X("jax_convnet_max_pool_winners", MaxPoolWinners) \
  X("jax_convnet_max_pool_jvp", MaxPoolJvp)         \
  X("jax_convnet_max_pool_grad", MaxPoolGrad)       \
  X("jax_convnet_avg_pool", AvgPool)                \
  X("jax_convnet_avg_pool_grad", AvgPoolGrad)       \
  X("jax_convnet_norm", Norm)                       \
  X("jax_convnet_norm_fwd", NormFwd)                \
  X("jax_convnet_norm_jvp", NormJvp)                \
  X("jax_convnet_norm_grad", NormGrad)              \
  X("jax_convnet_local_filter_acts", LocalFilterActs) \
  X("jax_convnet_local_image_acts", LocalImageActs)   \
  X("jax_convnet_local_weight_acts", LocalWeightActs)

#define JCN_DECLARE_CPU(name, sym) XLA_FFI_DECLARE_HANDLER_SYMBOL(sym##Cpu);
#define JCN_DECLARE_CUDA(name, sym) XLA_FFI_DECLARE_HANDLER_SYMBOL(sym##Cuda);
