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
// workspace csrc/common/conv_workspace.h sized for it (ia_column_bytes).
#pragma once

#include "conv_common.cuh"
#include "conv_ops.cuh"
#include "geometry.h"

namespace jax_convnet {
namespace cuda_conv {

constexpr int kColumnMaxChannels = 4;  // mirrors geometry.IMAGE_ACTS_COLUMN_MAX_CHANNELS

constexpr int kGatherUnroll = 4;       // column taps whose loads are issued together

// One chunk: p.B images from p.out on, p.slots = cols of p.M = p.B * Ho * Wo positions; C
// channels. A thread sums one pixel's taps in a fixed order (rows ii, then columns jj); the
// loads of kGatherUnroll column taps go out together (the sums are latency-bound otherwise: a
// chunk of L1 has 363 taps per pixel and one wave of threads).
template <typename T, Layout L, int C>
__global__ void __launch_bounds__(256) conv_ia_col2im_kernel(const __grid_constant__ KParams p) {
  const float* __restrict__ cols = p.slots;
  T* const out = static_cast<T*>(p.out);
  const int B = int(p.B), H = int(p.H), W = int(p.W), Ho = int(p.Ho), Wo = int(p.Wo),
            fh = int(p.fh), fw = int(p.fw), sh = int(p.sh), sw = int(p.sw);
  const int64_t M = p.M, taps = int64_t(fh) * fw;
  // cols offset of tap (i, j), channel c, position (oy, ox), as steps: one row of taps (ii + 1:
  // i += sh, oy -= 1), one column of taps (jj + 1: j += sw, ox -= 1), one channel.
  constexpr bool c01b = L == Layout::kC01B;
  const int64_t n_i = c01b ? fw : int64_t(fw) * C, n_j = c01b ? 1 : C;  // n per tap row / column
  const int64_t m_oy = c01b ? int64_t(Wo) * B : Wo, m_ox = c01b ? B : 1;
  const int64_t d_ii = sh * n_i * M - m_oy, d_jj = sw * n_j * M - m_ox;
  const int64_t d_c = c01b ? taps * M : M;
  const int total = B * H * W;
  for (int e = int(blockIdx.x * blockDim.x + threadIdx.x); e < total;
       e += int(gridDim.x * blockDim.x)) {
    int b, y, x;
    if constexpr (c01b) {
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
    // Taps i = i0 + ii * sh (ii < nI) reach row y = ry + yq * sh from hidden rows oy = oy0 - ii,
    // oy0 = qy + yq (its residue class, as OpIA; columns alike); the live ones: 0 <= oy < Ho.
    const IAClass<int> rc = ia_class<int>(p, y % sh, x % sw);
    const int i0 = rc.i0, j0 = rc.j0, oy0 = rc.qy + y / sh, ox0 = rc.qx + x / sw;
    const int ilo = max(0, oy0 - Ho + 1), ihi = min(rc.nI, oy0 + 1);
    const int jlo = max(0, ox0 - Wo + 1), jhi = min(rc.nJ, ox0 + 1);
    const int64_t m0 =
        c01b ? (int64_t(oy0) * Wo + ox0) * B + b : (int64_t(b) * Ho + oy0) * Wo + ox0;
    const float* base = cols + (int64_t(i0) * n_i + int64_t(j0) * n_j) * M + m0;
    float acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = 0.f;
    for (int ii = ilo; ii < ihi; ++ii) {
      const float* row = base + ii * d_ii;
      int jj = jlo;
      for (; jj + kGatherUnroll <= jhi; jj += kGatherUnroll) {
        float v[kGatherUnroll][C];
#pragma unroll
        for (int u = 0; u < kGatherUnroll; ++u)
#pragma unroll
          for (int c = 0; c < C; ++c) v[u][c] = __ldg(row + (jj + u) * d_jj + c * d_c);
#pragma unroll
        for (int u = 0; u < kGatherUnroll; ++u)
#pragma unroll
          for (int c = 0; c < C; ++c) acc[c] += v[u][c];
      }
      for (; jj < jhi; ++jj)
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] += __ldg(row + jj * d_jj + c * d_c);
    }
    const int64_t at = int64_t(b) * p.is.n + int64_t(y) * p.is.y + int64_t(x) * p.is.x;
#pragma unroll
    for (int c = 0; c < C; ++c) out[at + c * p.is.c] = from_f32<T>(acc[c]);
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
