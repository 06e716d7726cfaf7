// The checks every max-pool FFI handler makes, on the CPU (csrc/cpu/pool.cc) and CUDA
// (csrc/cuda/pool.cu) alike, so both backends accept and reject exactly the same calls.
#pragma once

#include <string>

#include "ffi_common.h"
#include "pool_select.h"

namespace jax_convnet {

// The forward with winners (images -> pooled, winners), the JVP (tangents, winners -> pooled
// tangents) and the gradient (cotangents, winners -> image cotangents) all hold one image-shaped
// buffer `images`, one pooled-shaped float buffer `pooled` of the same dtype and the pooled-shaped
// `winners` (uint8 or int32 by the window size, pool::winner_bytes). Fills *g on success.
inline ffi::Error check_pool_winners_call(const char* op, const PoolParams& p,
                                          const ffi::AnyBuffer& images,
                                          const ffi::AnyBuffer& pooled,
                                          const ffi::AnyBuffer& winners, bool allow_f64,
                                          PoolGeometry* g) {
  ffi::Error checked = check_pool_call(op, p, images, pooled, allow_f64, g);
  if (checked.failure()) return checked;
  const int bytes = pool::winner_bytes(*g);
  if (bytes == 0)
    return invalid(op, "windows of more than 2^31 elements have no winners (int32 offsets)");
  const ffi::DataType want = bytes == 1 ? ffi::DataType::U8 : ffi::DataType::S32;
  if (winners.element_type() != want)
    return invalid(op, bytes == 1 ? "winners must be uint8 for windows of at most 256 elements"
                                  : "winners must be int32 for windows of more than 256 elements");
  if (!(winners.dimensions() == pooled.dimensions()))
    return invalid(op, "winners' shape differs from the pooled shape");
  return ffi::Error::Success();
}

// avg_pool (images -> pooled) and its gradient (pooled cotangents -> image cotangents): the max-pool
// checks of the windows and buffers, and count_include_pad in {0, 1}.
inline ffi::Error check_avg_pool_call(const char* op, const AvgPoolParams& p,
                                      const ffi::AnyBuffer& images, const ffi::AnyBuffer& pooled,
                                      bool allow_f64, PoolGeometry* g) {
  if (p.count_include_pad != 0 && p.count_include_pad != 1)
    return invalid(op, "count_include_pad must be 0 or 1");
  return check_pool_call(op, p.windows, images, pooled, allow_f64, g);
}

}  // namespace jax_convnet
