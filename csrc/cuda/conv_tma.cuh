// Hopper's TMA-fed, warp-specialized implicit GEMMs for convolutions (sm_90a): filter_acts,
// image_acts at stride 1 (the convolution of the hidden tensor with the flipped, transposed taps)
// and weight_acts, in 16-bit types in both layouts, and in float32 as TF32 where TF32's wgmma can
// read both operands k-contiguous (K-major, its only form): NHWC filter_acts (the taps copied
// k-contiguous by tf32_taps_kernel first), NHWC image_acts and C01B weight_acts.
//
// A k-block is 128 bytes of k: 64 elements of a 16-bit type, 32 floats (kTmaK).
// filter_acts / image_acts (TmaMode::kForward / kFlipped) see one problem: a forward convolution
// of X (cin channels) by the taps of W into Y (cout channels): M = output pixels, N = cout, K =
// taps x cin, walked tap by tap, one k-block of channels at a time. weight_acts (kWeights):
// M = filters, N = (tap, channel) pairs (64-channel blocks of one tap each), K = output pixels, a
// k-block at a time, split into `splits` ranges whose float32 sums an ordered reduction adds. A block of
// 384 threads:
//  - warpgroup 0, the producer: one thread issues the Tensor Memory Accelerator's copies of each
//    k-block's A (128 rows) and B (BN columns) tiles into a ring of STAGES shared-memory stages,
//    each guarded by a "full" mbarrier (the copies' bytes landed) and an "empty" one (both
//    consumers are done with it);
//  - warpgroups 1 and 2, the consumers: rows 0-63 and 64-127 of the tile, all BN columns, with
//    wgmma reading both operands from the stages; each releases a stage once its wgmma finished.
// Blocks are persistent (one per SM) and take tiles in a fixed order, so results do not depend
// on timing. Padding, image borders and channels past cin are the copies' zero fill: no branch
// in the main loop.
//
// Operand A, the X pixels of a tile:
//  - NHWC: 128 consecutive output pixels (raster order across rows and images), a k-block of
//    channels each: one im2col-mode copy per k-block; the tap (r, s) is the copy's offset. The tiles are
//    k-contiguous (128-byte swizzled).
//  - C01B (C, H, W, B): one output row, two output columns, 64 images: per k-block two tiled
//    copies of a (64 channels x 64 images) box at the tap's input pixel; images contiguous, so the
//    tiles are M-major (wgmma's transposed A).
// Operand B, the taps: W is (C, fh, fw, F) or (fh, fw, C, F), filters contiguous.
//  - filter_acts: B[k = c][n = f]: BN / 64 boxes of 64 filters x 64 channels (N-major); TF32:
//    one box of a k-block of channels x BN filters from the k-contiguous copy (fh, fw, F, C).
//  - image_acts: B[k = f][n = c] at the flipped tap: one box of a k-block of filters x BN
//    channels (k-contiguous).
// weight_acts reads the hidden tensor as A (filters x pixels) and the images as B (pixels x
// channels, one copy per 64-column block at its tap): NHWC the hidden tensor as a (pixels x F)
// matrix in boxes of 64 x 64 (M-major) and the images through im2col copies of 64 pixels
// (N-major); C01B both in boxes of a k-block of images (k-contiguous): the hidden tensor 128
// filters deep, the images 64 channels deep.
// The epilogue stores each consumer's accumulators straight to global memory: pairs of elements
// (C01B pairs neighbouring images through a shuffle), or weight_acts' float32 partial sums.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (the encoders come from the driver at run time)

#include <cstdint>
#include <type_traits>

#include "conv_common.cuh"
#include "conv_wgmma.cuh"
#include "wgmma_ops.cuh"

namespace jax_convnet {
namespace cuda_conv {

constexpr int kTmaThreads = 384;  // a producer warpgroup and two consumer warpgroups
constexpr int kTmaBM = 128;
template <typename T>
constexpr int kTmaK = 128 / int(sizeof(T));  // k elements per k-block
constexpr int kTmaABytes = kTmaBM * 128;  // A stage: 128 rows of 128 bytes
constexpr int kTmaStageBudget = 200 * 1024;

// One tile width's shared memory: STAGES stages of A then of B, then the full and empty
// barriers, from a 1024-aligned base (swizzle atoms; SMEM includes the slack to align).
template <int BN>
struct TmaPlan {
  static_assert(BN % 64 == 0 && BN <= 256, "wgmma widths of 64 to 256");
  static constexpr int B_BYTES = BN * 128;
  static constexpr int STAGE_BYTES = kTmaABytes + B_BYTES;
  static constexpr int STAGES =
      kTmaStageBudget / STAGE_BYTES > 8 ? 8 : kTmaStageBudget / STAGE_BYTES;
  static constexpr int B_OFF = STAGES * kTmaABytes;
  static constexpr int BAR_OFF = B_OFF + STAGES * B_BYTES;
  static constexpr int SMEM = BAR_OFF + 2 * 8 * STAGES + 1024;
};

enum class TmaMode { kForward, kFlipped, kWeights };

// The problem as the kernel sees it (see the top of this file); all sizes fit 31 bits (the
// host's rule). weight_acts: cin = image channels, cout = filters, and out_h / out_w the hidden
// tensor's.
struct TmaConvParams {
  int32_t batch, cin, cout, out_h, out_w, fh, fw, stride_h, stride_w, pad_top, pad_left;
  int32_t cblocks;  // per tap: k-blocks of channels (weight_acts: 64-channel column blocks)
  int32_t kblocks;  // k-blocks per tile: passes * fh * fw * cblocks (weight_acts: per split)
  // 3xTF32 runs K three times (passes 3), each pass kblocks_pass long: A's residue times B, A
  // times B's residue, then A times B (the small terms first); else passes 1.
  int32_t passes, kblocks_pass;
  int32_t tiles_n, tiles;
  int32_t b_runs, x_pairs;  // C01B: runs of images (64; weight_acts: a k-block), column pairs
  int64_t m_total;          // batch * out_h * out_w
  Str4 ys;                  // Y's element strides (n, c, y, x); weight_acts: the filters'
  void* y;                  // weight_acts: the float32 partial sums, [split][filter element]
  int32_t tiles_m, splits, kblocks_total;  // weight_acts
  int64_t filter_elems;                    // weight_acts: one split's slot
};

#ifdef JCN_WGMMA_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_tile_4d(uint32_t dst, const CUtensorMap* map,
                                                 uint32_t bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void tma_load_tile_2d(uint32_t dst, const CUtensorMap* map,
                                                 uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_im2col_4d(uint32_t dst, const CUtensorMap* map,
                                                   uint32_t bar, int c, int w, int h, int n,
                                                   uint16_t off_w, uint16_t off_h) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.im2col.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2], {%7, %8};\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c), "r"(w), "r"(h), "r"(n),
      "h"(off_w), "h"(off_h)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// One wgmma over 32 bytes of k: k16 of a 16-bit type, k8 of TF32.
template <typename T, int BN, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_tile_step(float (&d)[BN / 2], uint64_t da, uint64_t db) {
  if constexpr (std::is_same_v<T, float>) {
    static_assert(!kTransA && !kTransB, "TF32 reads K-major operands only");
    if constexpr (BN == 64) wgmma_m64n64k8_tf32(d, da, db);
    if constexpr (BN == 128) wgmma_m64n128k8_tf32(d, da, db);
    if constexpr (BN == 192) wgmma_m64n192k8_tf32(d, da, db);
    if constexpr (BN == 256) wgmma_m64n256k8_tf32(d, da, db);
  } else {
    constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
    if constexpr (BN == 64) wgmma_m64n64k16<kTransA, kTransB, kBf16>(d, da, db);
    if constexpr (BN == 128) wgmma_m64n128k16<kTransA, kTransB, kBf16>(d, da, db);
    if constexpr (BN == 192) wgmma_m64n192k16<kTransA, kTransB, kBf16>(d, da, db);
    if constexpr (BN == 256) wgmma_m64n256k16<kTransA, kTransB, kBf16>(d, da, db);
  }
}

// Where a tile or k-block starts: NHWC image n, output pixel (oy, ox); C01B output pixel
// (oy, ox) and images b0 .. b0 + 63.
struct TmaTileOrigin {
  int n, oy, ox, b0;
};
// The output pixel of raster index m0 (NHWC).
__device__ __forceinline__ TmaTileOrigin tma_pixel(const TmaConvParams& p, int64_t m0) {
  TmaTileOrigin o{};
  const int64_t plane = int64_t(p.out_h) * p.out_w;
  o.n = int(m0 / plane);
  const int rem = int(m0 - int64_t(o.n) * plane);
  o.oy = rem / p.out_w;
  o.ox = rem - o.oy * p.out_w;
  return o;
}
// Row tile `tm` of filter_acts / image_acts: NHWC 128 consecutive pixels; C01B output columns
// ox and ox + 1 of row oy.
template <bool kC01B>
__device__ __forceinline__ TmaTileOrigin tma_tile_origin(const TmaConvParams& p, int tm) {
  if constexpr (kC01B) {
    TmaTileOrigin o{};
    const int run = tm % p.b_runs, rest = tm / p.b_runs;
    o.b0 = run * 64;
    o.ox = (rest % p.x_pairs) * 2;
    o.oy = rest / p.x_pairs;
    return o;
  } else {
    return tma_pixel(p, int64_t(tm) * kTmaBM);
  }
}
// weight_acts' k-block `kb` of kK pixels: NHWC consecutive ones; C01B kK images of one pixel.
template <bool kC01B, int kK>
__device__ __forceinline__ TmaTileOrigin tma_k_block_origin(const TmaConvParams& p, int kb) {
  if constexpr (kC01B) {
    TmaTileOrigin o{};
    const int run = kb % p.b_runs, rest = kb / p.b_runs;
    o.b0 = run * kK;
    o.ox = rest % p.out_w;
    o.oy = rest / p.out_w;
    return o;
  } else {
    return tma_pixel(p, int64_t(kb) * kK);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_f32<T>(lo), b = from_f32<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return uint32_t(ua) | (uint32_t(ub) << 16);
}
// Two neighbouring elements at `at` (aligned to both).
template <typename T>
__device__ __forceinline__ void store2(T* at, float lo, float hi) {
  if constexpr (std::is_same_v<T, float>)
    *reinterpret_cast<float2*>(at) = make_float2(lo, hi);
  else
    *reinterpret_cast<uint32_t*>(at) = pack2<T>(lo, hi);
}

// A tile's place: its split of K (weight_acts), row tile and column tile.
struct TmaTileIndex {
  int split, tm, tn;
};
template <TmaMode kMode>
__device__ __forceinline__ TmaTileIndex tma_tile_index(const TmaConvParams& p, int tile) {
  if constexpr (kMode == TmaMode::kWeights) {
    const int per_split = p.tiles_m * p.tiles_n, rem = tile % per_split;
    return {tile / per_split, rem / p.tiles_n, rem % p.tiles_n};
  } else {
    return {0, tile / p.tiles_n, tile % p.tiles_n};
  }
}
// A tile's k-blocks: all of them, or weight_acts' split.
template <TmaMode kMode>
__device__ __forceinline__ void tma_k_range(const TmaConvParams& p, int split, int& kb0,
                                            int& kb1) {
  if constexpr (kMode == TmaMode::kWeights) {
    kb0 = split * p.kblocks;
    kb1 = min(kb0 + p.kblocks, p.kblocks_total);
  } else {
    kb0 = 0;
    kb1 = p.kblocks;
  }
}
// weight_acts' column block `nb` (64 columns): its tap (clamped to the last: the columns past
// the last tap are loaded but not stored) and first channel.
__device__ __forceinline__ void tma_column_block(const TmaConvParams& p, int nb, int& r, int& s,
                                                 int& c0) {
  int tap = nb / p.cblocks;
  c0 = (nb - tap * p.cblocks) * 64;
  tap = min(tap, p.fh * p.fw - 1);
  r = tap / p.fw;
  s = tap - r * p.fw;
}
#endif  // JCN_WGMMA_DEVICE

// map_a / map_b: the operands; map_a_residue / map_b_residue: their TF32 residues (3xTF32; the
// operands' maps again otherwise).
template <Layout L, typename T, int BN, TmaMode kMode>
__global__ void __launch_bounds__(kTmaThreads, 1)
    conv_tma_kernel(const __grid_constant__ CUtensorMap map_a,
                    const __grid_constant__ CUtensorMap map_b,
                    const __grid_constant__ CUtensorMap map_a_residue,
                    const __grid_constant__ CUtensorMap map_b_residue,
                    const __grid_constant__ TmaConvParams p) {
#ifdef JCN_WGMMA_DEVICE
  using Plan = TmaPlan<BN>;
  constexpr int STAGES = Plan::STAGES;
  constexpr bool kC01B = L == Layout::kC01B;
  constexpr bool kFlip = kMode == TmaMode::kFlipped, kWeights = kMode == TmaMode::kWeights;
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kK = kTmaK<T>;
  // Stage layouts (WgmmaStage): which operands arrive M- / N-major (wgmma's transposed ones).
  // TF32 filter_acts reads the taps' k-contiguous copy.
  constexpr bool kAMajorM = kWeights ? !kC01B : kC01B;
  constexpr bool kBMajorN = kTf32 ? false : kWeights ? !kC01B : !kFlip;
  static_assert(!kTf32 || !kAMajorM, "TF32: NHWC filter_acts / image_acts, C01B weight_acts");
  using SA = WgmmaStage<kAMajorM, int(sizeof(T))>;
  using SB = WgmmaStage<kBMajorN, int(sizeof(T))>;
  static_assert(SA::BK == kK && SB::BK == kK, "128 bytes of k per stage");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t base = smem_addr(wgmma_smem(smem_raw));
  const uint32_t a_base = base, b_base = base + Plan::B_OFF;
  const uint32_t full_bar = base + Plan::BAR_OFF, empty_bar = full_bar + 8 * STAGES;
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int wg = warp >> 2;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full_bar + 8 * s, 1);   // the producer's arrive with the copies' bytes
      mbar_init(empty_bar + 8 * s, 2);  // one arrive per consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // ---- producer ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 0 && lane == 0) {
      tma_prefetch_map(&map_a);
      tma_prefetch_map(&map_b);
      if (p.passes > 1) {
        tma_prefetch_map(&map_a_residue);
        tma_prefetch_map(&map_b_residue);
      }
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
        const TmaTileIndex t = tma_tile_index<kMode>(p, tile);
        const int n0 = t.tn * BN;
        const TmaTileOrigin o = kWeights ? TmaTileOrigin{} : tma_tile_origin<kC01B>(p, t.tm);
        int kb0, kb1;
        tma_k_range<kMode>(p, t.split, kb0, kb1);
        for (int kb = kb0; kb < kb1; ++kb) {
          mbar_wait(empty_bar + 8 * stage, phase ^ 1);  // both consumers released the stage
          const uint32_t bar = full_bar + 8 * stage;
          mbar_expect_tx(bar, Plan::STAGE_BYTES);  // zero-filled bytes count too
          const uint32_t a_dst = a_base + stage * kTmaABytes;
          const uint32_t b_dst = b_base + stage * Plan::B_BYTES;
          // This k-block's pass and place in it, and the pass's operands.
          const int pass = kb / p.kblocks_pass, kp = kb - pass * p.kblocks_pass;
          const CUtensorMap* const ma = pass == 0 && p.passes > 1 ? &map_a_residue : &map_a;
          const CUtensorMap* const mb = pass == 1 ? &map_b_residue : &map_b;
          if constexpr (kWeights) {
            // A: the hidden tensor, 128 filters x kK pixels; B: the images at each column
            // block's tap, kK pixels x 64 channels.
            const TmaTileOrigin k = tma_k_block_origin<kC01B, kK>(p, kp);
            const int f0 = t.tm * kTmaBM;
            if constexpr (kC01B) {  // map_a (B, Wo, Ho, F), map_b (B, W, H, C)
              tma_load_tile_4d(a_dst, ma, bar, k.b0, k.ox, k.oy, f0);
            } else {  // map_a (F, pixels), map_b im2col (C, W, H, B)
#pragma unroll
              for (int j = 0; j < 2; ++j)
                tma_load_tile_2d(a_dst + j * 8192, ma, bar, f0 + 64 * j, kp * kK);
            }
#pragma unroll
            for (int j = 0; j < BN / 64; ++j) {
              int r, s, c0;
              tma_column_block(p, n0 / 64 + j, r, s, c0);
              if constexpr (kC01B)
                tma_load_tile_4d(b_dst + j * 8192, mb, bar, k.b0,
                                 k.ox * p.stride_w + s - p.pad_left,
                                 k.oy * p.stride_h + r - p.pad_top, c0);
              else
                tma_load_im2col_4d(b_dst + j * 8192, mb, bar, c0,
                                   k.ox * p.stride_w - p.pad_left,
                                   k.oy * p.stride_h - p.pad_top, k.n, uint16_t(s),
                                   uint16_t(r));
            }
          } else {
            const int tap = kp / p.cblocks, c0 = (kp - tap * p.cblocks) * kK;
            const int r = tap / p.fw, s = tap - r * p.fw;
            if constexpr (kC01B) {  // map_a dims (B, W, H, C)
              const int iy = o.oy * p.stride_h + r - p.pad_top;
#pragma unroll
              for (int j = 0; j < 2; ++j)
                tma_load_tile_4d(a_dst + j * 8192, ma, bar, o.b0,
                                 (o.ox + j) * p.stride_w + s - p.pad_left, iy, c0);
            } else {  // map_a dims (C, W, H, B), im2col: the tap is the offset
              tma_load_im2col_4d(a_dst, ma, bar, c0, o.ox * p.stride_w - p.pad_left,
                                 o.oy * p.stride_h - p.pad_top, o.n, uint16_t(s), uint16_t(r));
            }
            // map_b dims: C01B (F, fw, fh, C), NHWC (F, C, fw, fh).
            const int wr = kFlip ? p.fh - 1 - r : r, ws = kFlip ? p.fw - 1 - s : s;
            if constexpr (!kBMajorN) {  // k-contiguous: one box of BN columns (n0)
              if constexpr (kC01B)
                tma_load_tile_4d(b_dst, mb, bar, c0, ws, wr, n0);
              else
                tma_load_tile_4d(b_dst, mb, bar, c0, n0, ws, wr);
            } else {  // k = channels (c0), n = filters: one box per 64 filters
#pragma unroll
              for (int j = 0; j < BN / 64; ++j) {
                if constexpr (kC01B)
                  tma_load_tile_4d(b_dst + j * 8192, mb, bar, n0 + 64 * j, ws, wr, c0);
                else
                  tma_load_tile_4d(b_dst + j * 8192, mb, bar, n0 + 64 * j, c0, ws, wr);
              }
            }
          }
          if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {  // ---- consumers: rows 64 * cw ... + 63 of each tile ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1;
    const uint64_t a_desc = SA::desc(a_base, cw * 64), b_desc = SB::desc(b_base, 0);
    const uint32_t a_lo = uint32_t(a_desc), a_hi = uint32_t(a_desc >> 32);
    const uint32_t b_lo = uint32_t(b_desc), b_hi = uint32_t(b_desc >> 32);
    const bool releaser = (threadIdx.x & 127) == 0;
    const int wi = warp & 3, g = lane >> 2, q = lane & 3;
    int stage = 0;
    uint32_t phase = 0;
    float d[BN / 2];
    for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
      const TmaTileIndex t = tma_tile_index<kMode>(p, tile);
      int kb0, kb1;
      tma_k_range<kMode>(p, t.split, kb0, kb1);
#pragma unroll
      for (int e = 0; e < BN / 2; ++e) d[e] = 0.f;
      int prev = 0;
      for (int kb = kb0; kb < kb1; ++kb) {
        mbar_wait(full_bar + 8 * stage, phase);
        const uint32_t a_st = a_lo + uint32_t((stage * kTmaABytes) >> 4);
        const uint32_t b_st = b_lo + uint32_t((stage * Plan::B_BYTES) >> 4);
        wgmma_fence_operands(d);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)  // 32 bytes of k each
          wgmma_tile_step<T, BN, kAMajorM ? 1 : 0, kBMajorN ? 1 : 0>(
              d, pack_desc(a_st + uint32_t(ks * (SA::kStepBytes >> 4)), a_hi),
              pack_desc(b_st + uint32_t(ks * (SB::kStepBytes >> 4)), b_hi));
        wgmma_commit();
        wgmma_wait<1>();  // the previous k-block's wgmma finished: its stage is free
        wgmma_fence_operands(d);
        if (kb > kb0 && releaser) mbar_arrive(empty_bar + 8 * prev);
        prev = stage;
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
      }
      wgmma_wait<0>();
      wgmma_fence_operands(d);
      if (releaser) mbar_arrive(empty_bar + 8 * prev);

      // Epilogue: thread (wi, g, q) holds rows 16 wi + g (+ 8) of its 64, columns 8 j + 2 q (+ 1).
      const int n0 = t.tn * BN;
      if constexpr (kWeights) {
        // Rows are filters, columns (tap, channel): float32 partial sums into the split's slot,
        // laid out as the filters.
        float* const slot = static_cast<float*>(p.y) + int64_t(t.split) * p.filter_elems;
        const int f = t.tm * kTmaBM + 64 * cw + 16 * wi + g;
#pragma unroll
        for (int jb = 0; jb < BN / 64; ++jb) {
          const int nb = n0 / 64 + jb, tap = nb / p.cblocks;
          const int c0 = (nb - tap * p.cblocks) * 64 + 2 * q;
          const int r = tap / p.fw, s = tap - r * p.fw;
          if (tap < p.fh * p.fw) {
            float* const at = slot + int64_t(r) * p.ys.y + int64_t(s) * p.ys.x;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = c0 + 8 * j + e;
#pragma unroll
                for (int h = 0; h < 2; ++h)
                  if (c < p.cin && f + 8 * h < p.cout)
                    at[int64_t(f + 8 * h) * p.ys.n + int64_t(c) * p.ys.c] =
                        d[4 * (8 * jb + j) + 2 * h + e];
              }
            }
          }
        }
      } else if constexpr (kC01B) {
        static_assert(!kTf32, "16-bit pairs");
        // Rows are images: lanes g and g ^ 1 swap halves so each stores two neighbouring images.
        const TmaTileOrigin o = tma_tile_origin<kC01B>(p, t.tm);
        const int x = o.ox + cw;
        if (x < p.out_w) {
          const bool even = (g & 1) == 0;
          T* const pix = static_cast<T*>(p.y) + int64_t(o.oy) * p.ys.y + int64_t(x) * p.ys.x;
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
              const float other = __shfl_xor_sync(0xffffffffu, even ? v1 : v0, 4);
              const int f = n0 + 8 * j + 2 * q + (even ? 0 : 1);
              const int b = o.b0 + 16 * wi + 8 * h + (g & ~1);
              if (f < p.cout && b < p.batch) {
                const uint32_t v = even ? pack2<T>(v0, other) : pack2<T>(other, v1);
                *reinterpret_cast<uint32_t*>(pix + int64_t(f) * p.ys.c + b) = v;
              }
            }
          }
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t m = int64_t(t.tm) * kTmaBM + 64 * cw + 16 * wi + g + 8 * h;
          if (m < p.m_total) {
            T* const row = static_cast<T*>(p.y) + m * p.cout + n0;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
              const int f = 8 * j + 2 * q;
              if (n0 + f < p.cout) store2<T>(row + f, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
            }
          }
        }
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm_90a code: the host never launches it here
#endif  // JCN_WGMMA_DEVICE
}

// A float32 (O, P, I) tensor copied to (I, P, O): NHWC (B, pixels, C) to C01B (C, pixels, B) and
// back, for the TF32 kernel, which reads both operands k-contiguous. Through 64 x 64 tiles of
// (o, i) per pixel, V floats per global access (4 where O, I and both pointers allow float4):
// every thread holds its 16 loads in registers before the tile is written, so that enough bytes
// are in flight to run at the copy rate. Block 256, grid (ceil(I / 64), ceil(O / 64),
// min(P, 65535)).
constexpr int kSwapTile = 64, kSwapThreads = 256;
template <int V>
__global__ void __launch_bounds__(kSwapThreads)
    swap_outer_inner_kernel(const float* __restrict__ src, float* __restrict__ dst,
                            int64_t outer, int64_t pixels, int64_t inner) {
  using Vec = std::conditional_t<V == 4, float4, float>;
  constexpr int kChunks = kSwapTile / V, kRowsPerPass = kSwapThreads / kChunks,
                kPasses = kSwapTile / kRowsPerPass;
  __shared__ float tile[kSwapTile][kSwapTile + 1];
  const int chunk = int(threadIdx.x) % kChunks, row = int(threadIdx.x) / kChunks;
  const int64_t i0 = int64_t(blockIdx.x) * kSwapTile, o0 = int64_t(blockIdx.y) * kSwapTile;
  for (int64_t p = blockIdx.z; p < pixels; p += gridDim.z) {
    Vec v[kPasses];
#pragma unroll
    for (int l = 0; l < kPasses; ++l) {  // rows o, i along the chunks
      const int64_t o = o0 + row + l * kRowsPerPass, i = i0 + chunk * V;
      if (o < outer && i < inner)
        v[l] = *reinterpret_cast<const Vec*>(src + (o * pixels + p) * inner + i);
    }
#pragma unroll
    for (int l = 0; l < kPasses; ++l)
#pragma unroll
      for (int e = 0; e < V; ++e)
        tile[row + l * kRowsPerPass][chunk * V + e] = reinterpret_cast<const float*>(&v[l])[e];
    __syncthreads();
#pragma unroll
    for (int l = 0; l < kPasses; ++l) {  // rows i, o along the chunks
      const int r = row + l * kRowsPerPass;
#pragma unroll
      for (int e = 0; e < V; ++e) reinterpret_cast<float*>(&v[l])[e] = tile[chunk * V + e][r];
      const int64_t i = i0 + r, o = o0 + chunk * V;
      if (o < outer && i < inner)
        *reinterpret_cast<Vec*>(dst + (i * pixels + p) * outer + o) = v[l];
    }
    __syncthreads();
  }
}

// TF32 filter_acts' taps, k-contiguous: W (f, c, r, s) at element strides ws (its filters
// contiguous, ws.n = 1) copied to dense (fh, fw, F, C), through 32 x 32 tiles of (c, f) per tap.
// Block (32, 8); grid (ceil(F / 32), ceil(C / 32), fh * fw).
static __global__ void tf32_taps_kernel(const float* __restrict__ w, float* __restrict__ out,
                                 int64_t filters, int64_t channels, int fw, Str4 ws) {
  __shared__ float tile[32][33];
  const int tap = int(blockIdx.z), r = tap / fw, s = tap - r * fw;
  const int64_t f0 = int64_t(blockIdx.x) * 32, c0 = int64_t(blockIdx.y) * 32;
  const float* const src = w + r * ws.y + s * ws.x;
  for (int i = int(threadIdx.y); i < 32; i += 8) {  // rows c, filters along the lanes
    const int64_t c = c0 + i, f = f0 + threadIdx.x;
    if (c < channels && f < filters) tile[i][threadIdx.x] = src[c * ws.c + f];
  }
  __syncthreads();
  float* const dst = out + int64_t(tap) * filters * channels;
  for (int i = int(threadIdx.y); i < 32; i += 8) {  // rows f, channels along the lanes
    const int64_t f = f0 + i, c = c0 + threadIdx.x;
    if (c < channels && f < filters) dst[f * channels + c] = tile[threadIdx.x][i];
  }
}

}  // namespace cuda_conv
}  // namespace jax_convnet
