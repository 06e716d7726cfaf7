// image_acts into a few channels with large filters (RGB first layers: L1, AlexNet conv1) through
// a float32 column buffer, one chunk of images at a time:
//   1. cols[n][m] = sum_f hid[m, f] * w[f, n]: a plain GEMM with K = F (OpIACols in
//      conv_ops.cuh, run by the tensor-core kernel): m = hidden position, n = (channel, tap).
//   2. img[b, c, y, x] = sum over the taps (i, j) reaching (y, x) of cols[(c, i, j)][(b, oy, ox)],
//      oy = (y + pt - i) / sh, ox = (x + pl - j) / sw (this file): a gather in a fixed order.
//
// Why: the implicit GEMM of image_acts has N = C = 3 columns (every staged hidden element feeds
// 3 products) and the direct FFMA kernel is bound by its instruction issue; this GEMM has N = C *
// fh * fw (363 on both layers) and K = F, the shape tensor cores run well, at the price of writing
// and reading the buffer (C * fh * fw / (sh * sw) floats per image element). Accumulation is
// float32 throughout; bitwise reproducible (no atomics).
//
// The gather reads coalesced: a warp's lanes are consecutive images (C01B) or columns (NHWC); for
// one tap the lanes of a residue class read consecutive hidden positions m, and cols is
// contiguous along m. The host (conv_launch.cuh) chooses the chunk so that the buffer fits the
// workspace jax_convnet/conv.py sized for it (geometry.image_acts_column_bytes).
#pragma once

#include "conv_common.cuh"
#include "geometry.h"

namespace jax_convnet {
namespace cuda_conv {

constexpr int kColumnMaxChannels = 4;  // mirrors geometry.IMAGE_ACTS_COLUMN_MAX_CHANNELS

// One chunk: p.B images from p.out on, p.slots = cols of p.M = p.B * Ho * Wo positions.
template <typename T, Layout L>
__global__ void __launch_bounds__(256) conv_ia_col2im_kernel(const __grid_constant__ KParams p) {
  const float* __restrict__ cols = p.slots;
  T* const out = static_cast<T*>(p.out);
  const int B = int(p.B), C = int(p.C), H = int(p.H), W = int(p.W), Ho = int(p.Ho),
            Wo = int(p.Wo), fh = int(p.fh), fw = int(p.fw), sh = int(p.sh), sw = int(p.sw),
            pt = int(p.pt), pl = int(p.pl), M = int(p.M), taps = fh * fw;
  const int total = B * H * W;
  for (int e = int(blockIdx.x * blockDim.x + threadIdx.x); e < total;
       e += int(gridDim.x * blockDim.x)) {
    int b, y, x;
    if constexpr (L == Layout::kC01B) {
      b = e % B;
      const int pos = e / B;
      y = pos / W;
      x = pos % W;
    } else {
      x = e % W;
      const int r = e / W;
      y = r % H;
      b = r / H;
    }
    // Taps i = i0, i0 + sh, ... reach row y from hidden rows oy = oy0, oy0 - 1, ... (columns alike).
    const int i0 = (y + pt) % sh, j0 = (x + pl) % sw;
    const int oy0 = (y + pt - i0) / sh, ox0 = (x + pl - j0) / sw;
    float acc[kColumnMaxChannels] = {0.f, 0.f, 0.f, 0.f};
    for (int i = i0, oy = oy0; i < fh && oy >= 0; i += sh, --oy) {
      if (oy >= Ho) continue;
      for (int j = j0, ox = ox0; j < fw && ox >= 0; j += sw, --ox) {
        if (ox >= Wo) continue;
        const int m = L == Layout::kC01B ? (oy * Wo + ox) * B + b : (b * Ho + oy) * Wo + ox;
        const int tap = i * fw + j;
#pragma unroll
        for (int c = 0; c < kColumnMaxChannels; ++c) {
          if (c >= C) break;
          const int n = L == Layout::kC01B ? c * taps + tap : tap * C + c;
          acc[c] += cols[int64_t(n) * M + m];
        }
      }
    }
    const int64_t at = int64_t(b) * p.is.n + int64_t(y) * p.is.y + int64_t(x) * p.is.x;
#pragma unroll
    for (int c = 0; c < kColumnMaxChannels; ++c) {
      if (c >= C) break;
      out[at + int64_t(c) * p.is.c] = from_f32<T>(acc[c]);
    }
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
