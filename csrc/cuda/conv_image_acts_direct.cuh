// image_acts into a few channels (C <= 4: the gradient of an RGB first layer), computed directly
// with FFMA instead of as an implicit GEMM.
//
// Why: the GEMM of image_acts has N = C columns, so every hidden element it copies into shared
// memory feeds C products only; on L1 (121 taps, 3 channels) the tensor-core kernels spent their
// time copying the k-tiles from L2 (benchmarks/history/2026-11-29_session2_direct_image_acts.md).
// Here each hidden element loaded into a register feeds up to nI * C products: a warp owns R
// consecutive rows of one image column of a residue class (y = ry + yq * sh, x = rx + xq * sw, as
// OpIA in conv_ops.cuh), and for each filter f and column tap jj slides a window of R + nI - 1
// hidden rows down the column:
//   img[b, c, y(yq0 + r), x] += hid[b, f, oy = qy + yq0 + r - ii, ox = qx + xq - jj] * w[f,c,i,j]
// with i = i0 + ii * sh, j = j0 + jj * sw. Window slot t holds oy = qy + yq0 - (KMAX - 1) + t, so
// the slot of (r, ii) is the compile-time r - ii + KMAX - 1.
//
// Lanes read the hidden tensor along its contiguous dimension:
//   C01B  lane = image b (32 consecutive images), every filter in order; no reduction.
//   NHWC  lane = (column xq0 + lane / 8, filters f = lane % 8, + 8, ...); the 8 partial sums of a
//         column are added across its lanes at the end (a fixed butterfly order).
// Both are bitwise reproducible. Products and sums are float32 FFMA: float32 accuracy at every
// precision (bf16 / f16 operands are widened when loaded).
#pragma once

#include "conv_common.cuh"
#include "conv_ops.cuh"
#include "geometry.h"

namespace jax_convnet {
namespace cuda_conv {

constexpr int kDirectMaxChannels = 4;  // image_acts with C <= this runs here
constexpr int kDirectWarps = 8;        // warps per block
constexpr int kDirectFilterLanes = 8;  // NHWC: lanes sharing one column, one filter each

// R, the image rows of a warp, for windows of up to KMAX rows of taps: 16, or 8 for long windows
// (a warp holds R + KMAX - 1 hidden values, KMAX * C filter values and R * C sums in registers).
constexpr int direct_rows(int kmax) { return kmax <= 4 ? 16 : 8; }

// Work units: ((class * outer + o) * row_blocks + rb) * col_units + cu; o is the batch group of 32
// (C01B) or the image (NHWC), cu the column (C01B) or the group of 4 columns (NHWC).
struct DirectIAPlan {
  int outer, row_blocks, col_units;
  int64_t units;
};

inline DirectIAPlan direct_ia_plan(const KParams& p, bool c01b, int rows) {
  DirectIAPlan d;
  constexpr int kColsPerWarp = 32 / kDirectFilterLanes;
  d.outer = int(c01b ? (p.B + 31) / 32 : p.B);
  d.row_blocks = int((p.hq0 + rows - 1) / rows);
  d.col_units = int(c01b ? p.wq0 : (p.wq0 + kColsPerWarp - 1) / kColsPerWarp);
  d.units = p.ncy * p.ncx * int64_t(d.outer) * d.row_blocks * d.col_units;
  return d;
}

// KMAX >= the class's rows of taps nI (unrolled window; the host picks it). 32-bit indices.
template <typename T, Layout L, int C, int KMAX>
__global__ void __launch_bounds__(32 * kDirectWarps)
    conv_ia_direct_kernel(const __grid_constant__ KParams p, const DirectIAPlan d) {
  constexpr int R = direct_rows(KMAX), WIN = R + KMAX - 1;
  constexpr bool kC01B = L == Layout::kC01B;
  constexpr int kFL = kC01B ? 1 : kDirectFilterLanes;  // filter stride of a lane
  constexpr int kOut = (R * C + kFL - 1) / kFL;         // NHWC: results stored per lane
  const T* const hid = static_cast<const T*>(p.a);
  const T* const fil = static_cast<const T*>(p.b);
  T* const img = static_cast<T*>(p.out);
  const int lane = int(threadIdx.x) & 31;
  const int F = int(p.F), Ho = int(p.Ho), Wo = int(p.Wo), sh = int(p.sh), sw = int(p.sw);
  const int hsn = int(p.hs.n), hsc = int(p.hs.c), hsy = int(p.hs.y), hsx = int(p.hs.x);
  const int fsn = int(p.fs.n), fsc = int(p.fs.c), fsy = int(p.fs.y), fsx = int(p.fs.x);

  const int64_t step = int64_t(gridDim.x) * kDirectWarps;
  for (int64_t u = int64_t(blockIdx.x) * kDirectWarps + (threadIdx.x >> 5); u < d.units;
       u += step) {
    int64_t r = u;
    const int cu = int(r % d.col_units);
    r /= d.col_units;
    const int rb = int(r % d.row_blocks);
    r /= d.row_blocks;
    const int o = int(r % d.outer);
    const int cls = int(r / d.outer);
    const int ry = cls / int(p.ncx), rx = cls % int(p.ncx);
    const IAClass<int> rc = ia_class<int>(p, ry, rx);
    const int i0 = rc.i0, j0 = rc.j0, nI = rc.nI, nJ = rc.nJ, hq = rc.hq, wq = rc.wq;
    const int qy = rc.qy, qx = rc.qx;
    const int yq0 = rb * R;
    const int b = kC01B ? o * 32 + lane : o;
    const int xq = kC01B ? cu : cu * (32 / kFL) + lane / kFL;
    if (yq0 >= hq || (kC01B && xq >= wq)) continue;  // uniform across the warp
    const bool lane_ok = kC01B ? b < int(p.B) : xq < wq;

    float acc[R][C];
#pragma unroll
    for (int rr = 0; rr < R; ++rr)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[rr][c] = 0.f;

    const int oy_lo = qy + yq0 - (KMAX - 1);  // hidden row of window slot 0
    for (int f = kC01B ? 0 : lane % kFL; f < F; f += kFL) {
      const int hrow = b * hsn + f * hsc;
      const int frow = f * fsn;
      for (int jj = 0; jj < nJ; ++jj) {
        const int ox = qx + xq - jj;
        const bool col_ok = lane_ok && unsigned(ox) < unsigned(Wo);
        // Every load of the step first, so that their latencies overlap (the filter values
        // come from L2 as often as not: loaded next to their FMAs, each waited on its own).
        float hv[WIN], wv[KMAX][C];
#pragma unroll
        for (int t = 0; t < WIN; ++t) {
          const int oy = oy_lo + t;
          const bool ok = col_ok && t >= KMAX - nI && unsigned(oy) < unsigned(Ho);
          hv[t] = ok ? to_f32(hid[hrow + oy * hsy + ox * hsx]) : 0.f;
        }
        const int fcol = frow + (j0 + jj * sw) * fsx + i0 * fsy;
#pragma unroll
        for (int ii = 0; ii < KMAX; ++ii)
#pragma unroll
          for (int c = 0; c < C; ++c)
            wv[ii][c] = ii < nI ? to_f32(fil[fcol + c * fsc + ii * sh * fsy]) : 0.f;
#pragma unroll
        for (int ii = 0; ii < KMAX; ++ii) {
          if (ii < nI) {
#pragma unroll
            for (int rr = 0; rr < R; ++rr)
#pragma unroll
              for (int c = 0; c < C; ++c)
                acc[rr][c] = fmaf(hv[rr - ii + KMAX - 1], wv[ii][c], acc[rr][c]);
          }
        }
      }
    }

    const int x = rx + xq * sw;
    auto store = [&](int rr, int c, float v) {
      const int yq = yq0 + rr;
      if (lane_ok && yq < hq)
        img[b * int(p.is.n) + c * int(p.is.c) + (ry + yq * sh) * int(p.is.y) + x * int(p.is.x)] =
            from_f32<T>(v);
    };
    if constexpr (kC01B) {
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int c = 0; c < C; ++c) store(rr, c, acc[rr][c]);
    } else {
      // Sum the kFL lanes of each column; lane k of a column keeps results k, k + kFL, ...
      float mine[kOut];
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int c = 0; c < C; ++c) {
          float v = acc[rr][c];
#pragma unroll
          for (int off = kFL / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
          const int k = rr * C + c;
          if (lane % kFL == k % kFL) mine[k / kFL] = v;
        }
#pragma unroll
      for (int s = 0; s < kOut; ++s) {
        const int k = s * kFL + lane % kFL;
        if (k < R * C) store(k / C, k % C, mine[s]);
      }
    }
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
