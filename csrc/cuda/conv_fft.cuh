// The conv family through 2-d FFTs, for stride 1 and large filters (the rule and its reasons:
// fft_conv_plan in csrc/common/geometry.h).
//
// Every plane of the two operands is zero-padded to Ph x Pw, transformed (fft_forward_kernel),
// the spectra are multiplied bin by bin (cgemm_bins_kernel: per frequency bin a complex GEMM
// over the summed index) and the result transformed back and cropped (fft_inverse_kernel):
//   filter_acts   Y[n,f] = sum_c X[n,c] conj(W[c,f])   correlation of the padded images
//   image_acts   DX[n,c] = sum_f G[n,f] W[c,f]         full convolution, cropped by the padding
//   weight_acts  DW[c,f] = sum_n X[n,c] conj(G[n,f])   correlation, cropped to the filter
// Images sit in their plane at (pad_top, pad_left), the others at (0, 0); Ph, Pw >= the padded
// image's extent, so no circular wrap reaches a kept output. float32 arithmetic throughout (FMA
// and exact twiddles), a fixed order everywhere: bitwise reproducible.
//
// Spectra are stored bin-major, [bin][a][b] for plane (a, b), bins (ky, kx <= Pw/2) of the real
// planes' half spectra; b is the plane index along which the tensor is contiguous (NHWC: channels
// or filters; C01B: batch), so that a block transforming consecutive b reads and writes whole
// sectors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "conv_common.cuh"
#include "geometry.h"

namespace jax_convnet {
namespace cuda_conv {

constexpr int kFftThreads = 256;
// A block transforms 2^lnp planes (2 to 8: consecutive b, 32 bytes of float32 per pixel and 64
// per bin), as pairs: plane 2i the real part and 2i + 1 the imaginary part of one complex
// transform (half the work of one transform per real plane). Their 2^(lnp - 1) complex planes
// hold at most 8192 values (64 KiB: three blocks per SM).
constexpr int kFftLog2BlockValues = 14, kFftLog2MaxPlanes = 3;

// na x nb planes of a strided 4-d tensor; plane (a, b), element (y, x) of it at
// a * sa + b * sb + y * sy + x * sx. Forward: the h x w plane goes to (oy, ox) of the
// transform's buffer; inverse: the h x w crop starting at (oy, ox) of the buffer is written.
struct FftPlanes {
  int64_t na, nb, sa, sb, sy, sx;
  int h, w, oy, ox;
};

__device__ __forceinline__ int bit_reverse(int v, int bits) {
  return int(__brev(unsigned(v)) >> (32 - bits));
}

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(fmaf(a.x, b.x, -a.y * b.y), fmaf(a.x, b.y, a.y * b.x));
}

constexpr int fft_log2_planes_per_block(int lph, int lpw) {
  const int l = kFftLog2BlockValues - lph - lpw;
  return l < 1 ? 1 : (l > kFftLog2MaxPlanes ? kFftLog2MaxPlanes : l);
}
// Shared memory of a block: its complex planes, PP + 1 values apart (the loads and stores that
// run across planes then hit distinct banks), and the twiddles.
constexpr int fft_shared_bytes(int lph, int lpw) {
  return 8 * (((1 << (lph + lpw)) + 1) << (fft_log2_planes_per_block(lph, lpw) - 1)) +
         4 * int(kFftMaxSize);
}
// The most any plane size takes (each kernel opts in to it once).
constexpr int fft_max_shared_bytes() {
  int most = 0;
  for (int lph = 3; (1 << lph) <= kFftMaxSize; ++lph)
    for (int lpw = 3; (1 << lpw) <= kFftMaxSize; ++lpw)
      most = fft_shared_bytes(lph, lpw) > most ? fft_shared_bytes(lph, lpw) : most;
  return most;
}

// buf[i0], buf[i1] <- buf[i0] +- w buf[i1] (kInverse: the conjugate twiddle).
template <bool kInverse>
__device__ __forceinline__ void butterfly(float2* buf, int i0, int i1, float2 w) {
  if (kInverse) w.y = -w.y;
  const float2 t = cmul(w, buf[i1]), u = buf[i0];
  buf[i0] = make_float2(u.x + t.x, u.y + t.y);
  buf[i1] = make_float2(u.x - t.x, u.y - t.y);
}

// In-place radix-2 FFTs (decimation in time: inputs stored at bit-reversed row and column
// indices, outputs in natural order) of 2^lnp planes of Ph x Pw, PP + 1 values apart, rows
// then columns. tw[t] = exp(-2 pi i t / Pm) for t < Pm / 2, Pm = max(Ph, Pw); kInverse uses
// its conjugates.
template <bool kInverse>
__device__ void fft2d_in_place(float2* buf, int lnp, int lph, int lpw, const float2* tw,
                               int lpm) {
  const int Pw = 1 << lpw, PS = (1 << (lph + lpw)) + 1;
  const int tid = int(threadIdx.x);
  for (int s = 0; s < lpw; ++s) {  // rows: butterflies of span 2^s, consecutive threads along x
    const int half = 1 << s, n = 1 << (lnp + lph + lpw - 1);
    for (int j = tid; j < n; j += kFftThreads) {
      const int row = j >> (lpw - 1), pos = j & ((Pw >> 1) - 1);
      const int k = pos & (half - 1);
      const int i0 = (row >> lph) * PS + (row & ((1 << lph) - 1)) * Pw +
                     ((pos >> s) << (s + 1)) + k,
                i1 = i0 + half;
      butterfly<kInverse>(buf, i0, i1, tw[k << (lpm - s - 1)]);
    }
    __syncthreads();
  }
  for (int s = 0; s < lph; ++s) {  // columns: consecutive threads on consecutive columns
    const int half = 1 << s, n = 1 << (lnp + lph + lpw - 1);
    for (int j = tid; j < n; j += kFftThreads) {
      const int x = j & (Pw - 1), rest = j >> lpw;
      const int p = rest >> (lph - 1), pos = rest & ((1 << (lph - 1)) - 1);
      const int k = pos & (half - 1);
      const int y0 = ((pos >> s) << (s + 1)) + k;
      const int i0 = p * PS + y0 * Pw + x, i1 = i0 + half * Pw;
      butterfly<kInverse>(buf, i0, i1, tw[k << (lpm - s - 1)]);
    }
    __syncthreads();
  }
}

// Fills tw[t] = exp(-2 pi i t / Pm), t < Pm / 2 (read after the block's next barrier).
__device__ __forceinline__ const float2* fft_twiddles(float2* tw, int lpm) {
  const int Pm = 1 << lpm;
  for (int t = int(threadIdx.x); t < Pm / 2; t += kFftThreads) {
    float s, c;
    sincospif(-2.f * float(t) / float(Pm), &s, &c);  // exact argument: t / Pm is a dyadic
    tw[t] = make_float2(c, s);
  }
  return tw;
}

// A transform block: 2^lnp planes (np, in pairs) of Ph x Pw = PP values, the pairs' complex
// planes PS apart in shared memory; Pm = 2^lpm = max(Ph, Pw); HW bins per half-spectrum row.
struct FftBlockShape {
  int lnp, np, Ph, Pw, PP, PS, lpm, HW;
};
__device__ __forceinline__ FftBlockShape fft_block_shape(int lph, int lpw) {
  const int lnp = fft_log2_planes_per_block(lph, lpw), PP = 1 << (lph + lpw);
  return {lnp, 1 << lnp, 1 << lph, 1 << lpw, PP, PP + 1, lph > lpw ? lph : lpw, (1 << lpw) / 2 + 1};
}

// spec[bin * na * nb + a * nb + b] = bin (ky, kx), kx <= Pw / 2, of plane (a, b)'s transform.
// A pair's transform Z splits as X_2i[k] = (Z[k] + conj(Z[-k])) / 2 and
// X_2i+1[k] = (Z[k] - conj(Z[-k])) / 2i.
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_forward_kernel(const T* __restrict__ src, FftPlanes pl, int lph, int lpw,
                       float2* __restrict__ spec) {
  extern __shared__ float2 fft_smem[];
  const auto [lnp, np, Ph, Pw, PP, PS, lpm, HW] = fft_block_shape(lph, lpw);
  const int bins = Ph * HW;
  float2* const buf = fft_smem;
  float* const buf_parts = reinterpret_cast<float*>(fft_smem);
  const float2* const tw = fft_twiddles(fft_smem + (np >> 1) * PS, lpm);
  const int tid = int(threadIdx.x);
  const int64_t groups_b = (pl.nb + np - 1) >> lnp, planes = pl.na * pl.nb;
  for (int64_t gi = blockIdx.x; gi < pl.na * groups_b; gi += gridDim.x) {
    const int64_t a = gi / groups_b, b0 = (gi % groups_b) << lnp;
    for (int e = tid; e < PP << lnp; e += kFftThreads) {  // plane index fastest: contiguous b
      const int p = e & (np - 1), yx = e >> lnp, y = yx >> lpw, x = yx & (Pw - 1);
      const int sy = y - pl.oy, sx = x - pl.ox;
      float v = 0.f;
      if (b0 + p < pl.nb && unsigned(sy) < unsigned(pl.h) && unsigned(sx) < unsigned(pl.w))
        v = to_f32<T>(src[a * pl.sa + (b0 + p) * pl.sb + sy * pl.sy + sx * pl.sx]);
      buf_parts[2 * ((p >> 1) * PS + (bit_reverse(y, lph) << lpw) + bit_reverse(x, lpw)) +
                (p & 1)] = v;
    }
    __syncthreads();
    fft2d_in_place<false>(buf, lnp - 1, lph, lpw, tw, lpm);
    for (int e = tid; e < bins << lnp; e += kFftThreads) {
      const int p = e & (np - 1), bin = e >> lnp, ky = bin / HW, kx = bin % HW;
      if (b0 + p >= pl.nb) continue;
      const float2* const pair = buf + (p >> 1) * PS;
      const float2 z = pair[ky * Pw + kx], zc = pair[((Ph - ky) & (Ph - 1)) * Pw + ((Pw - kx) & (Pw - 1))];
      // zc holds Z[-k]; conj(Z[-k]) = (zc.x, -zc.y)
      spec[int64_t(bin) * planes + a * pl.nb + b0 + p] =
          (p & 1) ? make_float2(0.5f * (z.y + zc.y), -0.5f * (z.x - zc.x))
                  : make_float2(0.5f * (z.x + zc.x), 0.5f * (z.y - zc.y));
    }
    __syncthreads();  // buf is refilled by the next group
  }
}

// The inverse of fft_forward_kernel's layout: the half spectra of planes 2i and 2i + 1,
// completed by Hermitian symmetry (Y[-k] = conj(Y[k]) for a real plane), combine into
// Z = Y_2i + i Y_2i+1, whose inverse transform is y_2i + i y_2i+1; the crops are written, times
// `scale` (1 / (Ph * Pw)).
template <typename T>
__global__ void __launch_bounds__(kFftThreads)
    fft_inverse_kernel(const float2* __restrict__ spec, FftPlanes pl, int lph, int lpw,
                       float scale, T* __restrict__ dst) {
  extern __shared__ float2 fft_smem[];
  const auto [lnp, np, Ph, Pw, PP, PS, lpm, HW] = fft_block_shape(lph, lpw);
  float2* const buf = fft_smem;
  const float2* const tw = fft_twiddles(fft_smem + (np >> 1) * PS, lpm);
  const int tid = int(threadIdx.x);
  const int64_t groups_b = (pl.nb + np - 1) >> lnp, planes = pl.na * pl.nb;
  for (int64_t gi = blockIdx.x; gi < pl.na * groups_b; gi += gridDim.x) {
    const int64_t a = gi / groups_b, b0 = (gi % groups_b) << lnp;
    for (int e = tid; e < PP << (lnp - 1); e += kFftThreads) {
      const int i = e & ((np >> 1) - 1), yx = e >> (lnp - 1), ky = yx >> lpw, kx = yx & (Pw - 1);
      const bool mirrored = kx >= HW;  // Y[ky][kx] = conj(Y[-ky][-kx])
      const int64_t bin = mirrored ? ((Ph - ky) & (Ph - 1)) * HW + (Pw - kx) : ky * HW + kx;
      const int64_t plane = a * pl.nb + b0 + 2 * i;
      float2 ye = make_float2(0.f, 0.f), yo = make_float2(0.f, 0.f);
      if (b0 + 2 * i < pl.nb) ye = spec[bin * planes + plane];
      if (b0 + 2 * i + 1 < pl.nb) yo = spec[bin * planes + plane + 1];
      if (mirrored) {
        ye.y = -ye.y;
        yo.y = -yo.y;
      }
      buf[i * PS + (bit_reverse(ky, lph) << lpw) + bit_reverse(kx, lpw)] =
          make_float2(ye.x - yo.y, ye.y + yo.x);
    }
    __syncthreads();
    fft2d_in_place<true>(buf, lnp - 1, lph, lpw, tw, lpm);
    for (int e = tid; e < (pl.h * pl.w) << lnp; e += kFftThreads) {
      const int p = e & (np - 1), yx = e >> lnp, y = yx / pl.w, x = yx % pl.w;
      if (b0 + p < pl.nb) {
        const float2 z = buf[(p >> 1) * PS + (y + pl.oy) * Pw + x + pl.ox];
        dst[a * pl.sa + (b0 + p) * pl.sb + y * pl.sy + x * pl.sx] =
            from_f32<T>(((p & 1) ? z.y : z.x) * scale);
      }
    }
    __syncthreads();
  }
}

// Per bin q: C_q = A_q * op(B_q) (op: conjugate or not), M x N = (M x K) (K x N), complex
// float. Element strides: (m, k) of A at q * sAq + m * sAm + k * sAk, and so on.
struct CgemmParams {
  int64_t M, N, K;
  int64_t sAq, sAm, sAk, sBq, sBk, sBn, sCq, sCm, sCn;
  const float2* A = nullptr;
  const float2* B = nullptr;
  float2* C = nullptr;
};

constexpr int kCgBM = 64, kCgBN = 64, kCgBK = 16, kCgThreads = 256, kCgPitch = kCgBM + 8;

// The bin GEMM on the tensor cores (mma.sync m16n8k8, TF32), kSplit: 3xTF32 (float32-accurate:
// each product as big * big + big * small + small * big, small terms first), else one TF32 mma
// per product. Complex as four real products: Re += Ar Br - Ai Bi, Im += Ar Bi + Ai Br.
// kAUnitK: A is contiguous along k (else along m); kBUnitN: B along n (else along k). Loads run
// along the contiguous dimension, the next k-tile's while the current one is multiplied, into
// real and imaginary planes [k][m or n], kCgPitch floats apart (a fragment's 32 reads then hit
// 32 banks). 64 x 64 tiles, 8 warps of 32 x 16 (2 x 2 tiles of 16 x 8).
template <bool kAUnitK, bool kBUnitN, bool kConjB, bool kSplit>
__global__ void __launch_bounds__(kCgThreads, 2) cgemm_bins_kernel(const CgemmParams p) {
  __shared__ float As[2][kCgBK][kCgPitch], Bs[2][kCgBK][kCgPitch];  // [re / im][k][m or n]
  constexpr int kLoads = kCgBM * kCgBK / kCgThreads;  // 4 per operand and thread
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm0 = (warp & 1) * 32, wn0 = (warp >> 1) * 16;
  const int64_t q = blockIdx.y;
  const float2* const A = p.A + q * p.sAq;
  const float2* const B = p.B + q * p.sBq;
  float2 ra[kLoads], rb[kLoads];
  auto load = [&](int64_t m0, int64_t n0, int64_t k0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int e = tid + l * kCgThreads;
      const int am = kAUnitK ? e / kCgBK : e % kCgBM, ak = kAUnitK ? e % kCgBK : e / kCgBM;
      const int bk = kBUnitN ? e / kCgBN : e % kCgBK, bn = kBUnitN ? e % kCgBN : e / kCgBK;
      const int64_t gm = m0 + am, gk = k0 + ak, hk = k0 + bk, gn = n0 + bn;
      ra[l] = (gm < p.M && gk < p.K) ? A[gm * p.sAm + gk * p.sAk] : make_float2(0.f, 0.f);
      rb[l] = (hk < p.K && gn < p.N) ? B[hk * p.sBk + gn * p.sBn] : make_float2(0.f, 0.f);
      if (kConjB) rb[l].y = -rb[l].y;
    }
  };
  // Fragment (16 x 8 of A, 8 x 8 of B) of plane `part` at k-step kk, in mma.sync's order;
  // kSplit: also the TF32 residues.
  auto frag_a = [&](uint32_t (&f)[4], uint32_t (&r)[4], int part, int kk, int m) {
    const float* s = &As[part][kk][m];
    f[0] = __float_as_uint(s[t * kCgPitch + g]);
    f[1] = __float_as_uint(s[t * kCgPitch + g + 8]);
    f[2] = __float_as_uint(s[(t + 4) * kCgPitch + g]);
    f[3] = __float_as_uint(s[(t + 4) * kCgPitch + g + 8]);
    if constexpr (kSplit) split_tf32<4>(f, r);
  };
  auto frag_b = [&](uint32_t (&f)[2], uint32_t (&r)[2], int part, int kk, int n) {
    const float* s = &Bs[part][kk][n];
    f[0] = __float_as_uint(s[t * kCgPitch + g]);
    f[1] = __float_as_uint(s[(t + 4) * kCgPitch + g]);
    if constexpr (kSplit) split_tf32<2>(f, r);
  };
  // d += a b, as 3xTF32 (small terms first) or one TF32 mma.
  auto product = [](float (&d)[4], const uint32_t (&a)[4], const uint32_t (&as)[4],
                    const uint32_t (&b)[2], const uint32_t (&bs)[2]) {
    if constexpr (kSplit) {
      mma_16x8<float>(d, as, b);
      mma_16x8<float>(d, a, bs);
    }
    mma_16x8<float>(d, a, b);
  };
  const int64_t tiles_n = (p.N + kCgBN - 1) / kCgBN;
  for (int64_t tile = blockIdx.x; tile < ((p.M + kCgBM - 1) / kCgBM) * tiles_n;
       tile += gridDim.x) {
    const int64_t m0 = (tile / tiles_n) * kCgBM, n0 = (tile % tiles_n) * kCgBN;
    float re[2][2][4] = {}, im[2][2][4] = {};
    load(m0, n0, 0);
    for (int64_t k0 = 0; k0 < p.K; k0 += kCgBK) {
      __syncthreads();  // the previous k-tile's reads are done
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const int e = tid + l * kCgThreads;
        const int ak = kAUnitK ? e % kCgBK : e / kCgBM, am = kAUnitK ? e / kCgBK : e % kCgBM;
        const int bk = kBUnitN ? e / kCgBN : e % kCgBK, bn = kBUnitN ? e % kCgBN : e / kCgBK;
        As[0][ak][am] = ra[l].x;
        As[1][ak][am] = ra[l].y;
        Bs[0][bk][bn] = rb[l].x;
        Bs[1][bk][bn] = rb[l].y;
      }
      __syncthreads();
      if (k0 + kCgBK < p.K) load(m0, n0, k0 + kCgBK);
#pragma unroll
      for (int kk = 0; kk < kCgBK; kk += 8) {
        uint32_t br[2][2], bi[2][2], brs[2][2] = {}, bis[2][2] = {};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          frag_b(br[j], brs[j], 0, kk, wn0 + 8 * j);
          frag_b(bi[j], bis[j], 1, kk, wn0 + 8 * j);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          uint32_t ar[4], ai[4], ars[4] = {}, ais[4] = {};
          frag_a(ar, ars, 0, kk, wm0 + 16 * i);
          frag_a(ai, ais, 1, kk, wm0 + 16 * i);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            uint32_t nbi[2], nbis[2];  // -Bi: the sign bit (exact, in both TF32 parts)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              nbi[e] = bi[j][e] ^ 0x80000000u;
              nbis[e] = bis[j][e] ^ 0x80000000u;
            }
            product(re[i][j], ar, ars, br[j], brs[j]);
            product(re[i][j], ai, ais, nbi, nbis);
            product(im[i][j], ar, ars, bi[j], bis[j]);
            product(im[i][j], ai, ais, br[j], brs[j]);
          }
        }
      }
    }
    float2* C = p.C + q * p.sCq;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // accumulator e: row g (+ 8 from e = 2), column 2t + e % 2
          const int64_t m = m0 + wm0 + 16 * i + g + 8 * (e >> 1);
          const int64_t n = n0 + wn0 + 8 * j + 2 * t + (e & 1);
          if (m < p.M && n < p.N)
            C[m * p.sCm + n * p.sCn] = make_float2(re[i][j][e], im[i][j][e]);
        }
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
